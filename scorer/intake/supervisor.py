"""Submission intake: the HTTP requests that bring submissions, received, parsed and packed in
worker processes.

Receiving a submission over HTTP, reading thousands of answers out of its JSON and packing them
is most of what a submission costs, and none of it needs what the scorer decides with. The
deciding side (credentials, quotas, probe detection, the Ladder, the store) is one event loop,
so every microsecond it spends there is queueing for every other agent. Intake workers accept
the scorer's connections on the listening socket the scorer made (they share it, and the kernel
gives each connection to one of them), parse each submission and send the deciding process only
the credential and the packed answers; it sends back the HTTP answer. Every other request (the
leaderboard, review, health, metrics) is passed through unchanged to the deciding process's own
HTTP server on a private Unix socket.

A worker is given each task's public facts only: its allowed answers and its size. Hidden
labels, the split and every submission stay in the deciding process, and every decision is made
there, in the order the submissions come in.

Frames on each worker's socket, both ways: a header (payload length, number) and the payload.
The first frame carries the tasks' facts, and the worker's answer to it says it is accepting
connections. Then the worker sends each submission (a pickled `Submission`) under a number of
its own and gets the pickled `Answer` under the same number; the scorer pings each worker every
second and kills one that stops answering. A worker that exits is started again; the
connections it held are closed, so their clients see a dropped connection and send again.

Without workers (`--intake-workers 0`), the deciding process serves everything itself and parses
with the same `Parser`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import logging
import os
import pickle
import secrets
import signal
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from prometheus_client import Counter
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from aar_common.validation import describe
from aar_common.web import (
    LISTEN_BACKLOG,
    fail,
    json_errors_app,
    presented_token,
    read_body,
    settle_collector,
    too_large,
)
from aar_scorer.packing import Packer

log = logging.getLogger(__name__)

SUBMISSIONS_PATH = "/api/v1/submissions"

_HEADER = struct.Struct("<II")  # payload length, number

# Frame numbers: the tasks' facts, and a worker's answer that it accepts connections; a ping and
# its answer; the scorer telling a worker to stop; the first submission number.
_READY, _PING, _STOP, _FIRST_SUBMISSION = 0, 1, 2, 3
_PING_SECONDS = 1.0
# How long a worker may stay silent before it counts as stuck.
_SILENCE_SECONDS = 30.0
# How long a worker may take to import, load the tasks and start accepting.
_READY_SECONDS = 60.0
# How long a stopping worker may take to finish what it holds.
_STOP_SECONDS = 15.0
# A worker that exited before it was ready is started again only after this pause, so one that
# cannot start (a broken install) does not spin.
_RESTART_PAUSE_SECONDS = 1.0
# prctl(2): the signal a process gets when its parent dies.
_PR_SET_PDEATHSIG = 1
# A request passed on to the deciding process: its answers take milliseconds.
_PASS_TIMEOUT = aiohttp.ClientTimeout(total=60)


class SubmissionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1)
    predictions: list[StrictInt | StrictStr] = Field(min_length=1)
    method: str = Field(min_length=1, max_length=20_000, description="what was done")
    artifact: str | None = Field(default=None, pattern=r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class ParsedSubmission:
    """A valid body. Whether its answers fit the task is the scorer's to say, after it checked
    the run and the task: `packed` holds them when they do, `answer_error` says why not."""

    task: str
    method: str
    artifact: str | None
    packed: int | None
    answer_error: str | None


@dataclass(frozen=True)
class BodyError:
    """A body that is no valid submission; `message` names each field that is wrong."""

    message: str
    status: int = 400


@dataclass(frozen=True)
class Submission:
    """What the deciding process gets of one submission request."""

    token: str | None  # the credential presented, unverified
    parsed: ParsedSubmission | BodyError
    # When the request arrived, by time.monotonic(): one clock for every process of the machine.
    arrived: float


@dataclass(frozen=True)
class Answer:
    """The HTTP answer to a submission."""

    status: int
    body: bytes
    headers: dict[str, str]

    def response(self) -> web.Response:
        return web.Response(status=self.status, body=self.body, headers=self.headers)


Decide = Callable[[Submission], Awaitable[Answer]]


@dataclass(frozen=True)
class TaskFacts:
    """What intake needs of a task; nothing in it is secret."""

    labels: list[int | str]
    size: int


class Parser:
    """Parses bodies for a set of tasks; the same code in a worker and on the event loop."""

    def __init__(self, tasks: Mapping[str, TaskFacts]) -> None:
        self._tasks = {name: (Packer(facts.labels), facts.size) for name, facts in tasks.items()}

    def parse(self, raw: bytes) -> ParsedSubmission | BodyError:
        try:
            body = SubmissionRequest.model_validate_json(raw)
        except ValidationError as error:
            return BodyError(f"invalid request body: {describe(error)}")
        packed = answer_error = None
        known = self._tasks.get(body.task)
        if known is not None:
            packer, size = known
            if len(body.predictions) != size:
                answer_error = (
                    f"predictions has {len(body.predictions)} answers; task {body.task} needs "
                    f"exactly {size}, one per item in the task bundle's order"
                )
            else:
                try:
                    packed = packer.pack(body.predictions)
                except ValueError as error:
                    answer_error = f"predictions: {error}"
        return ParsedSubmission(body.task, body.method, body.artifact, packed, answer_error)


async def receive(request: web.Request, parser: Parser) -> Submission:
    """A submission request as the deciding process takes it: the same in a worker and there."""
    arrived = time.monotonic()
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as error:
        parsed: ParsedSubmission | BodyError = BodyError(too_large(error), error.status)
    else:
        parsed = parser.parse(raw)
    return Submission(presented_token(request), parsed, arrived)


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
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._deciding: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def write_frame(self, number: int, payload: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(_frame(number, payload))

    def data_received(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        self.heard = loop.time()
        self._buffer += data
        for number, payload in _take_frames(self._buffer):
            if number == _READY:
                self.ready.set_result(True)
            elif number >= _FIRST_SUBMISSION:
                task = loop.create_task(self._answer(number, pickle.loads(payload)))
                self._deciding.add(task)
                task.add_done_callback(self._deciding.discard)
            # _PING: the worker's answer to a ping; hearing it is all it is for.

    async def _answer(self, number: int, submission: Submission) -> None:
        answer = await self._decide(submission)
        # A worker that exited meanwhile took the client's connection with it.
        self.write_frame(number, pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL))

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
            worker.write_frame(_STOP, b"")
        await asyncio.gather(*(_reap(worker.process, _STOP_SECONDS) for worker in workers))
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
                # Imported, not run as __main__: its classes then unpickle as the scorer's.
                "from aar_scorer.intake import main; raise SystemExit(main())",
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
        facts = {
            "tasks": {name: [f.labels, f.size] for name, f in self._tasks.items()},
            "client_max_size": self._client_max_size,
            "private_address": self._private_address,
        }
        worker.write_frame(_READY, json.dumps(facts).encode())
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
                    worker.write_frame(_PING, b"")

    async def _restart(self, worker: _Worker, pause: float) -> None:
        await asyncio.sleep(pause)
        if not self._closing:
            await self._start_worker()
        await _reap(worker.process, _STOP_SECONDS)


async def _reap(process: asyncio.subprocess.Process, seconds: float) -> None:
    try:
        await asyncio.wait_for(process.wait(), seconds)
    except TimeoutError:
        process.kill()
        await process.wait()


def _frame(number: int, payload: bytes) -> bytes:
    return _HEADER.pack(len(payload), number) + payload


def _take_frames(buffer: bytearray) -> list[tuple[int, bytes]]:
    """The whole frames at the start of `buffer` (number, payload), removed from it; a frame
    that has not fully arrived stays."""
    frames = []
    offset = 0
    while len(buffer) - offset >= _HEADER.size:
        length, number = _HEADER.unpack_from(buffer, offset)
        end = offset + _HEADER.size + length
        if len(buffer) < end:
            break
        frames.append((number, bytes(buffer[offset + _HEADER.size : end])))
        offset = end
    del buffer[:offset]
    return frames


# In a worker process.

# What a worker's client is told when the deciding process is gone: before the submission was
# handed over, and after.
_NOT_SENT = "the scorer is restarting; nothing was stored, send it again"
_SENT_UNANSWERED = (
    "the scorer stopped before it answered; the submission may have been stored (sent again, it "
    "is then refused or flagged as a near duplicate): send it again"
)


class _Link(asyncio.Protocol):
    """A worker's end of its socket to the deciding process."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.facts: asyncio.Future[bytes] = loop.create_future()
        self.stopping = asyncio.Event()  # told to stop, or the deciding process is gone
        self._pending: dict[int, asyncio.Future[Answer]] = {}
        self._number = _FIRST_SUBMISSION - 1
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def write_frame(self, number: int, payload: bytes) -> None:
        assert self._transport is not None
        # One write, one system call: the copy costs less than a second send.
        self._transport.write(_frame(number, payload))

    async def ask(self, submission: Submission) -> Answer:
        """The deciding process's answer; a ConnectionError whose message is for the client if
        there is none."""
        if self._transport is None or self._transport.is_closing():
            raise ConnectionError(_NOT_SENT)
        # Numbers are 32 bits; they wrap around, skipping the control frames' numbers.
        self._number = max(_FIRST_SUBMISSION, (self._number + 1) % 0x1_0000_0000)
        number = self._number
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._pending[number] = future
        self.write_frame(number, pickle.dumps(submission, protocol=pickle.HIGHEST_PROTOCOL))
        return await future

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        for number, payload in _take_frames(self._buffer):
            if number == _READY:
                self.facts.set_result(payload)
            elif number == _PING:
                self.write_frame(_PING, b"")
            elif number == _STOP:
                self.stopping.set()
            else:
                future = self._pending.pop(number, None)
                if future is not None and not future.done():
                    future.set_result(pickle.loads(payload))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.facts.done():
            self.facts.set_exception(ConnectionError("the deciding process is gone"))
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(ConnectionError(_SENT_UNANSWERED))
        self.stopping.set()


# Headers that describe one hop of a connection, not the request or answer passed through.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "content-length",
        "date",
        "host",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "server",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


def _end_to_end(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers.items() if k.lower() not in _HOP_BY_HOP]


def _worker_app(
    link: _Link, parser: Parser, private_address: str, client_max_size: int
) -> web.Application:
    app = json_errors_app(client_max_size)
    sessions: list[aiohttp.ClientSession] = []

    async def session(_: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.UnixConnector(path=private_address)
        async with aiohttp.ClientSession(
            connector=connector, auto_decompress=False, timeout=_PASS_TIMEOUT
        ) as opened:
            sessions.append(opened)
            yield

    async def submit(request: web.Request) -> web.Response:
        submission = await receive(request, parser)
        try:
            answer = await link.ask(submission)
        except ConnectionError as error:
            fail(503, str(error), headers={"retry-after": "1"})
        return answer.response()

    async def pass_on(request: web.Request) -> web.Response:
        body = await read_body(request)
        try:
            async with sessions[0].request(
                request.method,
                f"http://scorer{request.raw_path}",
                headers=_end_to_end(request.headers),
                data=body,
                allow_redirects=False,
            ) as upstream:
                payload = await upstream.read()
        except aiohttp.ClientError:
            fail(503, "the scorer is restarting; send it again", headers={"retry-after": "1"})
        return web.Response(
            status=upstream.status, body=payload, headers=_end_to_end(upstream.headers)
        )

    app.cleanup_ctx.append(session)
    app.router.add_post(SUBMISSIONS_PATH, submit)
    app.router.add_route("*", "/{path:.*}", pass_on)
    return app


async def _work(channel: socket.socket, listener: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    _, link = await loop.connect_accepted_socket(_Link, sock=channel)
    facts = json.loads(await link.facts)
    parser = Parser({name: TaskFacts(*f) for name, f in facts["tasks"].items()})
    app = _worker_app(link, parser, facts["private_address"], facts["client_max_size"])
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=_STOP_SECONDS - 2)
    await runner.setup()
    settle_collector()
    await web.SockSite(runner, listener).start()
    link.write_frame(_READY, b"")
    await link.stopping.wait()
    await runner.cleanup()  # stops accepting, then finishes the submissions in flight


def _die_with(parent: int) -> None:
    """Have the kernel kill this worker when the deciding process dies. A worker learns of that
    from its socket too, but one that is stuck would otherwise hold the port, and a restarted
    scorer could not listen on it."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("cannot ask to die with the scorer: %s", os.strerror(ctypes.get_errno()))
    if os.getppid() != parent:  # it died before the request took effect
        os._exit(0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="aar_scorer.intake",
        description="an aar-scorer intake worker; aar-scorer starts these itself",
    )
    parser.add_argument("--channel", type=int, required=True, help="the socket to the scorer")
    parser.add_argument("--listener", type=int, required=True, help="the scorer's listening socket")
    parser.add_argument("--scorer", type=int, required=True, help="the deciding process's id")
    args = parser.parse_args(argv)
    # Signals to a terminal's or a container's process group reach the workers too; the
    # deciding process says when they stop, and they stop when it is gone.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    _die_with(args.scorer)
    with contextlib.suppress(ConnectionError):
        asyncio.run(_work(socket.socket(fileno=args.channel), socket.socket(fileno=args.listener)))
    return 0
