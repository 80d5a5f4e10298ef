"""Live fan-out of new posts to server-sent-event subscribers, in process.

Each subscriber has its own bounded buffer: publishing never waits on a subscriber, so a slow
one cannot hold up the others. A subscriber that falls a whole buffer behind is cut off; its
client reconnects with `Last-Event-ID` and catches up from the database.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from aar_forum.models import Post

BUFFER = 1024


def sse_frame(post: Post) -> bytes:
    """One post as an SSE event; made once per post, shared by every subscriber."""
    return f"id: {post.id}\nevent: post\ndata: {post.model_dump_json()}\n\n".encode()


class Subscriber:
    def __init__(self, run: str | None, owner: str, connected: Callable[[], bool]) -> None:
        self.run = run  # None: every run (admins)
        self.owner = owner
        self.connected = connected
        # (post id, SSE frame, when it was published: time.monotonic())
        self.frames: deque[tuple[int, bytes, float]] = deque()
        self.overflowed = False
        self.closed = False
        self.heartbeat_due = False
        self.wake = asyncio.Event()

    def offer(self, post_id: int, frame: bytes, published: float) -> None:
        if len(self.frames) >= BUFFER:
            self.overflowed = True
        else:
            self.frames.append((post_id, frame, published))
        self.wake.set()

    def close(self) -> None:
        self.closed = True
        self.wake.set()


class Hub:
    def __init__(self) -> None:
        self._subscribers: set[Subscriber] = set()

    def __len__(self) -> int:
        return len(self._subscribers)

    def subscribe(
        self, run: str | None, owner: str, connected: Callable[[], bool] = lambda: True
    ) -> Subscriber:
        subscriber = Subscriber(run, owner, connected)
        self._subscribers.add(subscriber)
        return subscriber

    def held_by(self, owner: str) -> int:
        """How many streams `owner` has open. One whose client has gone is ended here: an idle
        stream would otherwise notice only at its next heartbeat."""
        held = 0
        for subscriber in self._subscribers:
            if subscriber.owner != owner:
                continue
            if subscriber.connected():
                held += 1
            else:
                subscriber.close()
        return held

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.discard(subscriber)

    def publish(self, post: Post) -> None:
        frame, published = sse_frame(post), time.monotonic()
        for subscriber in self._subscribers:
            if subscriber.run is None or subscriber.run == post.run:
                subscriber.offer(post.id, frame, published)

    def heartbeat(self) -> None:
        """Ask every stream for a keepalive. One timer for all of them: a timer per stream
        (`wait_for`) costs a task for every post delivered, 900 times a post at 900 agents."""
        for subscriber in self._subscribers:
            subscriber.heartbeat_due = True
            subscriber.wake.set()

    def close_all(self) -> None:
        for subscriber in self._subscribers:
            subscriber.close()
