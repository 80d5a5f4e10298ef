"""Submission intake: a submission's JSON body parsed, validated and packed, in worker processes.

Reading thousands of answers out of JSON and packing them is the largest part of what a
submission costs (about 0.24 ms of 0.6 ms for 2,567 answers), and it needs nothing the scorer
decides with. The deciding side (credentials, quotas, probe detection, the Ladder, the store) is
one event loop, so every microsecond it spends parsing is queueing for every other agent. Worker
processes do the parsing on other cores; the event loop sends each body over a socket and gets
back the packed answers.

A worker is given each task's public facts only: its allowed answers and its size. Hidden
labels, the split and every submission stay in the scorer's process, and every decision is made
there, in the order the parsed submissions come back.

Frames on the socket, both ways: a header (payload length, request number) and the payload. The
first frame carries the tasks' facts, and the worker's answer to it says it is ready; then the
event loop sends each body as it came and the worker answers with a pickled `ParsedSubmission`
or `BodyError`. A worker that exits is started again; the
submissions it held are answered 503 with `retry-after`, never parsed on the event loop instead
(a body that brought a worker down must not reach the deciding process).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import pickle
import signal
import socket
import struct
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client import Counter
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from aar_common.validation import describe
from aar_scorer.packing import Packer

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<II")  # payload length, request number

# How long a worker may hold a submission before it counts as stuck (parsing takes a
# millisecond).
_ANSWER_SECONDS = 30.0
# Frame number of the tasks' facts, and of a worker's answer that it has loaded them.
_READY = 0
# How long a worker may take to import and load the tasks.
_READY_SECONDS = 60.0
# How long a submission waits for a worker when none is running, before it is answered 503.
_WAIT_FOR_WORKER_SECONDS = 5.0
# A worker that exited before it was ready is started again only after this pause, so one that
# cannot start (a broken install) does not spin.
_RESTART_PAUSE_SECONDS = 1.0


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


class IntakeUnavailableError(Exception):
    """No worker parsed the submission; nothing was stored and sending it again will do."""


class IntakeError(Exception):
    """The intake workers could not start; the message says why."""


class _Worker(asyncio.Protocol):
    """The event loop's end of one worker's socket."""

    def __init__(
        self, process: asyncio.subprocess.Process, on_lost: Callable[[_Worker], None]
    ) -> None:
        self.process = process
        # True once the worker has loaded the tasks, False if it exited before.
        self.ready: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        # Request number -> (its answer, loop time it was sent), oldest first.
        self.pending: dict[int, tuple[asyncio.Future[ParsedSubmission | BodyError], float]] = {}
        self._on_lost = on_lost
        self._lost_because = "exited"
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def send(self, number: int, raw: bytes) -> asyncio.Future[ParsedSubmission | BodyError]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ParsedSubmission | BodyError] = loop.create_future()
        self.pending[number] = (future, loop.time())
        self.write_frame(number, raw)
        return future

    def waiting_since(self) -> float | None:
        """When the oldest unanswered submission was sent (loop time), or None."""
        for _, sent in self.pending.values():
            return sent
        return None

    def abandon(self, why: str) -> None:
        """Kill the worker; what it holds is answered 503 saying `why`, and another starts."""
        self._lost_because = why
        if self.process.returncode is None:
            self.process.kill()

    def write_frame(self, number: int, payload: bytes) -> None:
        assert self._transport is not None
        # One write, one system call: the copy of the body costs less than a second send.
        self._transport.write(_frame(number, payload))

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        for number, payload in _take_frames(self._buffer):
            if number == _READY:
                self.ready.set_result(True)
                continue
            future, _ = self.pending.pop(number, (None, 0.0))
            if future is not None and not future.done():
                future.set_result(pickle.loads(payload))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_result(False)
        pending, self.pending = self.pending, {}
        for future, _ in pending.values():
            if not future.done():
                future.set_exception(
                    IntakeUnavailableError(
                        f"the scorer's intake worker holding this submission {self._lost_because};"
                        " nothing was stored, send it again"
                    )
                )
        self._on_lost(self)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class Intake:
    """Parses submissions in `workers` processes, or on the event loop when `workers` is 0."""

    def __init__(
        self, tasks: Mapping[str, TaskFacts], workers: int, restarts: Counter | None = None
    ) -> None:
        if workers < 0:
            raise ValueError(f"intake workers must be 0 or more (got {workers})")
        self._restarts = restarts
        self._tasks = dict(tasks)
        self._parser = Parser(self._tasks)
        self._wanted = workers
        self._workers: list[_Worker] = []
        self._number = _READY
        self._restarting: set[asyncio.Task[None]] = set()
        self._has_worker = asyncio.Event()
        self._watchdog: asyncio.Task[None] | None = None
        self._closing = False
        # A worker that holds a submission this long without answering is stuck: it is killed.
        self.answer_timeout = _ANSWER_SECONDS

    async def start(self) -> None:
        """Start the workers; returns once each has loaded the tasks."""
        workers = [await self._start_worker() for _ in range(self._wanted)]
        if workers:
            self._watchdog = asyncio.get_running_loop().create_task(self._watch())
        for worker in workers:
            try:
                ready = await asyncio.wait_for(asyncio.shield(worker.ready), _READY_SECONDS)
            except TimeoutError:
                ready = False
            if not ready:
                await self.close()
                raise IntakeError(
                    f"intake worker {worker.process.pid} did not start (exit code "
                    f"{worker.process.returncode}); its error is above. To parse submissions in "
                    "the scorer's own process instead, pass --intake-workers 0"
                )

    async def parse(self, raw: bytes) -> ParsedSubmission | BodyError:
        if not self._wanted:
            return self._parser.parse(raw)
        if not self._workers:
            # Between one worker's exit and its replacement's start.
            try:
                await asyncio.wait_for(self._has_worker.wait(), _WAIT_FOR_WORKER_SECONDS)
            except TimeoutError:
                raise IntakeUnavailableError(
                    "no intake worker is running (one is starting again); nothing was stored, "
                    "send it again"
                ) from None
        worker = min(self._workers, key=lambda w: len(w.pending))
        # Frame numbers are 32 bits; they wrap around, skipping _READY.
        self._number = self._number % 0xFFFFFFFF + 1
        return await worker.send(self._number, raw)

    def pending(self) -> int:
        """Submissions sent to workers and not answered yet."""
        return sum(len(worker.pending) for worker in self._workers)

    async def close(self) -> None:
        self._closing = True
        for task in [*self._restarting, self._watchdog]:
            if task is not None:
                task.cancel()
        workers, self._workers = self._workers, []
        for worker in workers:
            worker.close()  # the worker exits when its socket closes
        for worker in workers:
            await _reap(worker.process)

    async def _start_worker(self) -> _Worker:
        ours, theirs = socket.socketpair()
        with theirs:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                # Imported, not run as __main__: its classes then unpickle as the scorer's.
                "from aar_scorer.intake import main; raise SystemExit(main())",
                "--fd",
                str(theirs.fileno()),
                pass_fds=[theirs.fileno()],
            )
        _, worker = await asyncio.get_running_loop().connect_accepted_socket(
            lambda: _Worker(process, self._lost), sock=ours
        )
        # The tasks' facts are the first frame; the worker answers it once it is ready.
        facts = {name: [f.labels, f.size] for name, f in self._tasks.items()}
        worker.write_frame(_READY, json.dumps(facts).encode())
        self._workers.append(worker)
        self._has_worker.set()
        return worker

    def _lost(self, worker: _Worker) -> None:
        if worker in self._workers:
            self._workers.remove(worker)
        if not self._workers:
            self._has_worker.clear()
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
            await asyncio.sleep(min(1.0, self.answer_timeout / 2))
            now = asyncio.get_running_loop().time()
            for worker in self._workers:
                since = worker.waiting_since()
                if since is not None and now - since > self.answer_timeout:
                    worker.abandon(f"did not answer within {self.answer_timeout:g} s")

    async def _restart(self, worker: _Worker, pause: float) -> None:
        await asyncio.sleep(pause)
        if not self._closing:
            await self._start_worker()
        await _reap(worker.process)


async def _reap(process: asyncio.subprocess.Process) -> None:
    try:
        await asyncio.wait_for(process.wait(), 10)
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


def _serve(connection: socket.socket) -> None:
    """A worker's loop: answer every whole frame that has arrived, in one send."""
    buffer = bytearray()
    parser: Parser | None = None
    while True:
        chunk = connection.recv(1 << 20)
        if not chunk:
            return  # the scorer closed its end, or exited
        buffer += chunk
        answers = []
        for number, payload in _take_frames(buffer):
            if parser is None:  # the first frame is the tasks' public facts
                facts = json.loads(payload)
                parser = Parser({name: TaskFacts(*f) for name, f in facts.items()})
                answers.append(_frame(_READY, b""))
                continue
            parsed = parser.parse(payload)
            answers.append(_frame(number, pickle.dumps(parsed, protocol=pickle.HIGHEST_PROTOCOL)))
        if answers:
            connection.sendall(b"".join(answers))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="aar_scorer.intake",
        description="an aar-scorer intake worker; aar-scorer starts these itself",
    )
    parser.add_argument("--fd", type=int, required=True, help="the socket to the scorer")
    args = parser.parse_args(argv)
    # Ctrl-C in a terminal reaches the whole process group; the scorer decides when to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A broken pipe: the scorer went away first.
    with (
        socket.socket(fileno=args.fd) as connection,
        contextlib.suppress(BrokenPipeError, ConnectionResetError),
    ):
        _serve(connection)
    return 0
