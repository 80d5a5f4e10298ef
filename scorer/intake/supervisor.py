"""The deciding process's side of intake: it starts the workers, restarts one that exits or
stops answering, stops them with the scorer, and answers the submissions they send.

Without workers (`--intake-workers 0`) the deciding process receives submissions itself, with
the same `Parser`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping

from prometheus_client import Counter

from aar_common.web import LISTEN_BACKLOG
from aar_scorer.intake.parsing import Parser
from aar_scorer.intake.protocol import (
    STOP_SECONDS,
    TO_SCORER,
    Answer,
    Facts,
    FrameError,
    FrameReader,
    Kind,
    Submission,
    TaskFacts,
    frame,
)

log = logging.getLogger(__name__)

# What starts a worker: imported, so that the interpreter never runs it as __main__.
WORKER_COMMAND = "from aar_scorer.intake.worker import main; raise SystemExit(main())"
_PING_SECONDS = 1.0
# How long a worker may stay silent before it counts as stuck.
_SILENCE_SECONDS = 30.0
# How long a worker may take to import, load the tasks and start accepting.
_READY_SECONDS = 60.0
# A worker that exited before it was ready is started again only after this pause, so one that
# cannot start (a broken install) does not spin.
_RESTART_PAUSE_SECONDS = 1.0

Decide = Callable[[Submission], Awaitable[Answer]]


class IntakeError(Exception):
    """The intake workers could not start; the message says why."""


class _Worker(asyncio.Protocol):
    """The deciding process's end of one worker's socket."""

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        decide: Decide,
        on_lost: Callable[[_Worker], None],
    ) -> None:
        loop = asyncio.get_running_loop()
        self.process = process
        # True once the worker accepts connections, False if it exited before.
        self.ready: asyncio.Future[bool] = loop.create_future()
        self.heard = loop.time()  # when the worker last sent anything
        self._decide = decide
        self._on_lost = on_lost
        self._reader = FrameReader(TO_SCORER)
        self._broken = False
        self._transport: asyncio.Transport | None = None
        self._deciding: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def data_received(self, data: bytes) -> None:
        if self._broken:
            return
        loop = asyncio.get_running_loop()
        self.heard = loop.time()
        try:
            frames = self._reader.feed(data)
        except FrameError as error:
            # Nothing more from it can be trusted; killed, it is started again.
            self._broken = True
            log.error("submission intake worker %d sent %s; killing it", self.process.pid, error)
            self.kill()
            return
        for received in frames:
            if received.kind is Kind.READY:
                if not self.ready.done():
                    self.ready.set_result(True)
            elif received.kind is Kind.SUBMISSION:
                assert isinstance(received.body, Submission)
                task = loop.create_task(self._answer(received.number, received.body))
                self._deciding.add(task)
                task.add_done_callback(self._deciding.discard)
            # PING: the worker's answer to a ping; hearing it is all it is for.

    async def _answer(self, number: int, submission: Submission) -> None:
        answer = await self._decide(submission)
        # A worker that exited meanwhile took the client's connection with it.
        self.write(frame(Kind.ANSWER, answer, number))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_result(False)
        self._on_lost(self)

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class Intake:
    """Receives submissions in `workers` processes that share the scorer's listening socket; with
    no workers, the deciding process receives them itself (`receive` with the same `Parser`)."""

    def __init__(
        self,
        tasks: Mapping[str, TaskFacts],
        workers: int,
        client_max_size: int,
        restarts: Counter | None = None,
    ) -> None:
        if workers < 0:
            raise ValueError(f"intake workers must be 0 or more (got {workers})")
        self.parser = Parser(tasks)
        self.workers = workers
        self._tasks = dict(tasks)
        self._client_max_size = client_max_size
        self._restarts = restarts
        self._public: socket.socket | None = None
        self._private_address = ""
        self._decide: Decide | None = None
        self._running: list[_Worker] = []
        self._restarting: set[asyncio.Task[None]] = set()
        self._watchdog: asyncio.Task[None] | None = None
        self._closing = False
        # A worker silent this long (it answers a ping every second) is stuck: it is killed.
        self.silence_timeout = _SILENCE_SECONDS

    def listen(self, public: socket.socket) -> socket.socket:
        """The socket the deciding process serves its application on: `public` itself without
        workers; with workers, which accept on `public`, a private Unix socket they pass every
        request but submissions to. Call it before the application starts."""
        if not self.workers:
            return public
        self._public = public
        private = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # In the abstract namespace (Linux): no file, so a read-only root filesystem is no
        # obstacle. Whoever reaches it meets the same credential checks as on the public port.
        private.bind(f"\0aar-scorer-{os.getpid()}-{secrets.token_hex(8)}")
        private.listen(LISTEN_BACKLOG)
        self._private_address = private.getsockname().decode()
        return private

    async def start(self, decide: Decide) -> None:
        """Start the workers; returns once each accepts connections. `decide` answers each
        submission they send."""
        if not self.workers:
            return
        if self._public is None:
            raise RuntimeError("Intake.listen(public socket) comes before Intake.start")
        self._decide = decide
        workers = [await self._start_worker() for _ in range(self.workers)]
        self._watchdog = asyncio.get_running_loop().create_task(self._watch())
        for worker in workers:
            try:
                ready = await asyncio.wait_for(asyncio.shield(worker.ready), _READY_SECONDS)
            except TimeoutError:
                ready = False
            if not ready:
                await self.stop()
                raise IntakeError(
                    f"intake worker {worker.process.pid} did not start (exit code "
                    f"{worker.process.returncode}); its error is above. To receive submissions "
                    "in the scorer's own process instead, pass --intake-workers 0"
                )

    async def stop(self) -> None:
        """The workers stop accepting connections, finish the submissions they hold (decided
        here meanwhile), and exit."""
        self._closing = True
        for task in [*self._restarting, self._watchdog]:
            if task is not None:
                task.cancel()
        workers, self._running = self._running, []
        for worker in workers:
            worker.write(frame(Kind.STOP))
        await asyncio.gather(*(_reap(worker.process, STOP_SECONDS) for worker in workers))
        for worker in workers:
            worker.close()

    async def _start_worker(self) -> _Worker:
        assert self._public is not None
        assert self._decide is not None
        decide = self._decide
        ours, theirs = socket.socketpair()
        with theirs:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                WORKER_COMMAND,
                "--channel",
                str(theirs.fileno()),
                "--listener",
                str(self._public.fileno()),
                "--scorer",
                str(os.getpid()),
                pass_fds=[theirs.fileno(), self._public.fileno()],
            )
        _, worker = await asyncio.get_running_loop().connect_accepted_socket(
            lambda: _Worker(process, decide, self._lost), sock=ours
        )
        # What the worker needs is the first frame; it answers once it accepts connections.
        facts = Facts(self._tasks, self._client_max_size, self._private_address)
        worker.write(frame(Kind.FACTS, facts))
        self._running.append(worker)
        return worker

    def _lost(self, worker: _Worker) -> None:
        if worker in self._running:
            self._running.remove(worker)
        if self._closing:
            return
        # One that never got ready may not start at all: a pause keeps that from spinning.
        steady = worker.ready.result()
        log.error(
            "submission intake worker %d exited (code %s)%s; starting another",
            worker.process.pid,
            worker.process.returncode,
            "" if steady else " before it was ready",
        )
        if self._restarts is not None:
            self._restarts.inc()
        task = asyncio.get_running_loop().create_task(
            self._restart(worker, 0.0 if steady else _RESTART_PAUSE_SECONDS)
        )
        self._restarting.add(task)
        task.add_done_callback(self._restarting.discard)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(min(_PING_SECONDS, self.silence_timeout / 2))
            now = asyncio.get_running_loop().time()
            for worker in self._running:
                # One still starting has heard nothing since it was started.
                limit = self.silence_timeout if worker.ready.done() else _READY_SECONDS
                if now - worker.heard > limit:
                    log.error(
                        "submission intake worker %d was silent for %g s; killing it",
                        worker.process.pid,
                        limit,
                    )
                    worker.kill()
                elif worker.ready.done():
                    worker.write(frame(Kind.PING))

    async def _restart(self, worker: _Worker, pause: float) -> None:
        await asyncio.sleep(pause)
        if not self._closing:
            await self._start_worker()
        await _reap(worker.process, STOP_SECONDS)


async def _reap(process: asyncio.subprocess.Process, seconds: float) -> None:
    try:
        await asyncio.wait_for(process.wait(), seconds)
    except TimeoutError:
        process.kill()
        await process.wait()
