"""The live stream: server-sent events to many subscribers, per run, resumable."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
from forum_harness import Forum, connected, next_event

from aar_forum import app as forum_app
from aar_forum import stream as stream_module


async def test_every_subscriber_of_the_run_hears_a_new_post(forum: Forum) -> None:
    streams = [
        await forum.http.get(f"{forum.url}/api/v1/stream", headers=forum.agent(f"w2s-{i}"))
        for i in range(5)
    ]
    try:
        await asyncio.gather(*(connected(stream) for stream in streams))
        post = await forum.post(forum.agent("w2s-0"), kind="result", title="PGR 0.8")
        events = await asyncio.wait_for(
            asyncio.gather(*(next_event(stream) for stream in streams)), 10
        )
    finally:
        for stream in streams:
            stream.close()
    for event_id, data in events:
        assert event_id == str(post["id"])
        assert data == post


async def test_agents_hear_only_their_own_run_and_admins_hear_all(forum: Forum) -> None:
    mine = await forum.http.get(f"{forum.url}/api/v1/stream", headers=forum.agent("a-1", "lab/one"))
    everything = await forum.http.get(f"{forum.url}/api/v1/stream", headers=forum.admin())
    try:
        await connected(mine)
        await connected(everything)
        other = await forum.post(forum.agent("b-1", "lab/two"), title="other run")
        own = await forum.post(forum.agent("a-2", "lab/one"), title="own run")
        first_mine = await asyncio.wait_for(next_event(mine), 10)
        admin_events = [await asyncio.wait_for(next_event(everything), 10) for _ in range(2)]
    finally:
        mine.close()
        everything.close()
    assert first_mine[1]["id"] == own["id"]
    assert [data["id"] for _, data in admin_events] == [other["id"], own["id"]]


async def test_last_event_id_replays_what_a_reconnecting_client_missed(forum: Forum) -> None:
    agent = forum.agent("w2s-1")
    seen = await forum.post(agent, title="seen before the disconnect")
    missed = [await forum.post(agent, title=f"missed {i}") for i in range(3)]
    await forum.post(forum.agent("x-1", "lab/other"), title="another run, never replayed")
    async with forum.http.get(
        f"{forum.url}/api/v1/stream", headers={**agent, "Last-Event-ID": str(seen["id"])}
    ) as stream:
        replayed = [await asyncio.wait_for(next_event(stream), 10) for _ in missed]
        live = await forum.post(agent, title="after the reconnect")
        after = await asyncio.wait_for(next_event(stream), 10)
    assert [data["id"] for _, data in replayed] == [post["id"] for post in missed]
    assert after[1]["id"] == live["id"]


async def test_a_subscriber_that_stops_reading_does_not_hold_up_the_others(
    start_forum: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stream_module, "BUFFER", 32)
    forum: Forum = await start_forum(writes_per_minute=0)
    writer = forum.agent("w2s-0")
    stalled = await forum.http.get(f"{forum.url}/api/v1/stream", headers=forum.agent("slow"))
    healthy = await forum.http.get(f"{forum.url}/api/v1/stream", headers=forum.agent("fast"))
    await connected(stalled)
    await connected(healthy)
    count = 400
    heard: list[int] = []
    heard_all = asyncio.Event()

    async def listen() -> None:
        while len(heard) < count:
            heard.append((await next_event(healthy))[1]["id"])
        heard_all.set()

    listener = asyncio.create_task(listen())
    # Large posts fill the stalled reader's socket buffers, then its 32-post buffer.
    posts = [
        (await forum.post(writer, title=f"p{index}", body="x" * 60_000))["id"]
        for index in range(count)
    ]
    try:
        await asyncio.wait_for(heard_all.wait(), 30)
    finally:
        listener.cancel()
        healthy.close()
    assert heard == posts

    # The stalled reader was cut off after what it had buffered, and catches up on reconnect.
    received = []
    with contextlib.suppress(EOFError):
        while True:
            received.append((await asyncio.wait_for(next_event(stalled), 10))[1]["id"])
    stalled.close()
    assert 0 < len(received) < len(posts)
    assert received == posts[: len(received)]
    async with forum.http.get(
        f"{forum.url}/api/v1/stream",
        headers={**forum.agent("slow"), "Last-Event-ID": str(received[-1])},
    ) as again:
        rest = [
            (await asyncio.wait_for(next_event(again), 10))[1]["id"] for _ in posts[len(received) :]
        ]
    assert received + rest == posts


async def test_an_agent_may_hold_only_a_few_streams_open(start_forum: Any) -> None:
    forum: Forum = await start_forum(streams_per_agent=2)
    agent = forum.agent("w2s-1")
    held = [await forum.http.get(f"{forum.url}/api/v1/stream", headers=agent) for _ in range(2)]
    try:
        for stream in held:
            await connected(stream)
        async with forum.http.get(f"{forum.url}/api/v1/stream", headers=agent) as refused:
            assert refused.status == 429
            message = (await refused.json())["error"]["message"]
            assert "already has 2 streams open" in message
        # Another agent is not affected, and a closed stream frees its place.
        async with forum.http.get(
            f"{forum.url}/api/v1/stream", headers=forum.agent("w2s-2")
        ) as other:
            await connected(other)
        held.pop().close()
        for _ in range(50):
            async with forum.http.get(f"{forum.url}/api/v1/stream", headers=agent) as again:
                if again.status == 200:
                    await connected(again)
                    break
            await asyncio.sleep(0.05)  # the server notices the closed connection shortly
        else:
            raise AssertionError("a closed stream never freed its place")
    finally:
        for stream in held:
            stream.close()


async def test_an_idle_stream_gets_keepalives(
    start_forum: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(forum_app, "HEARTBEAT_S", 0.05)
    forum: Forum = await start_forum()
    async with forum.http.get(f"{forum.url}/api/v1/stream", headers=forum.agent("w2s-1")) as stream:
        await connected(stream)
        await asyncio.wait_for(stream.content.readuntil(b": keepalive\n\n"), 10)
        # A post in between is delivered as usual, and measured.
        post = await forum.post(forum.agent("w2s-2"), title="between heartbeats")
        assert (await asyncio.wait_for(next_event(stream), 10))[1]["id"] == post["id"]
    async with forum.http.get(f"{forum.metrics_url}/metrics") as response:
        assert "aar_forum_stream_delivery_seconds_count 1.0" in await response.text()
