"""An intake worker process: it accepts connections on the scorer's listening socket, parses
and packs each submission, sends it to the deciding process and answers with what that decides;
every other request it passes through to the deciding process's own HTTP server.

`aar-scorer` starts each one itself, with `python -c "from aar_scorer.intake.worker import main;
..."` (`supervisor.WORKER_COMMAND`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Mapping, Sequence

import aiohttp
from aiohttp import web

from aar_common.web import fail, json_errors_app, read_body, settle_collector
from aar_scorer.intake.parsing import SUBMISSIONS_PATH, Parser, receive
from aar_scorer.intake.protocol import (
    STOP_SECONDS,
    TO_WORKER,
    Answer,
    Facts,
    FrameError,
    FrameReader,
    Kind,
    Submission,
    frame,
)

log = logging.getLogger(__name__)

# prctl(2): the signal a process gets when its parent dies.
_PR_SET_PDEATHSIG = 1
# A request passed on to the deciding process: its answers take milliseconds.
_PASS_TIMEOUT = aiohttp.ClientTimeout(total=60)

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
        self.facts: asyncio.Future[Facts] = loop.create_future()
        self.stopping = asyncio.Event()  # told to stop, or the deciding process is gone
        self._pending: dict[int, asyncio.Future[Answer]] = {}
        self._number = 0
        self._reader = FrameReader(TO_WORKER)
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def write(self, data: bytes) -> None:
        assert self._transport is not None
        self._transport.write(data)

    async def ask(self, submission: Submission) -> Answer:
        """The deciding process's answer; a ConnectionError whose message is for the client if
        there is none."""
        if self._transport is None or self._transport.is_closing():
            raise ConnectionError(_NOT_SENT)
        # Numbers are 32 bits; they wrap around.
        self._number = number = (self._number + 1) % 0x1_0000_0000
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._pending[number] = future
        self.write(frame(Kind.SUBMISSION, submission, number))
        return await future

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._reader.feed(data)
        except FrameError as error:
            # Nothing more on this socket can be trusted; closing it stops the worker.
            log.error("the scorer sent %s; closing the socket to it", error)
            assert self._transport is not None
            self._transport.close()
            return
        for received in frames:
            if received.kind is Kind.FACTS:
                assert isinstance(received.body, Facts)
                if not self.facts.done():
                    self.facts.set_result(received.body)
            elif received.kind is Kind.PING:
                self.write(frame(Kind.PING))
            elif received.kind is Kind.STOP:
                self.stopping.set()
            else:
                assert isinstance(received.body, Answer)
                future = self._pending.pop(received.number, None)
                if future is not None and not future.done():
                    future.set_result(received.body)

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
    facts = await link.facts
    app = _worker_app(link, Parser(facts.tasks), facts.private_address, facts.client_max_size)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=STOP_SECONDS - 2)
    await runner.setup()
    settle_collector()
    await web.SockSite(runner, listener).start()
    link.write(frame(Kind.READY))
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
        prog="aar_scorer.intake.worker",
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
