"""HTTP plumbing shared by the forum, scorer and gateway (aiohttp): authentication with aar
credentials, errors as JSON that say how to fix them, pydantic request bodies, the health
endpoint, and serving on TCP or a Unix socket until SIGTERM, with Prometheus' `/metrics` on a
listener of its own (the metrics port), never on the API's."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import signal
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ValidationError

from aar_common.credentials import CredentialError, CredentialVerifier, Principal, Role
from aar_common.validation import describe

Model = TypeVar("Model", bound=BaseModel)

# Allocations between young-generation collections, and collections between older ones, for a
# serving process (see serve()): a tenth of the collector's work of CPython's (700, 10, 10) at a
# thousand requests a second.
GC_THRESHOLDS = (7000, 10, 10)
# Connections the kernel holds for a server that has not accepted them yet: hundreds of agents
# reconnect at once after a restart.
LISTEN_BACKLOG = 1024
# The metrics port: Prometheus' alone; the sandboxes' NetworkPolicy opens only the API port.
METRICS_PORT_ENV = "AAR_METRICS_PORT"
DEFAULT_METRICS_PORT = 9090

VERIFIER_KEY = web.AppKey("verifier", CredentialVerifier)
REGISTRY_KEY = web.AppKey("registry", CollectorRegistry)

# Error types follow the Anthropic API's error JSON, so every aar service fails the same way.
_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
}


def error_body(status: int, message: str, error_type: str | None = None) -> dict[str, Any]:
    return {
        "type": "error",
        "error": {"type": error_type or _STATUS_TYPES.get(status, "api_error"), "message": message},
    }


def fail(
    status: int,
    message: str,
    error_type: str | None = None,
    headers: dict[str, str] | None = None,
) -> NoReturn:
    """Raise an HTTP error whose JSON body says what was wrong and how to fix it."""
    raise _with_status(status, message, error_type, headers)


def _with_status(
    status: int, message: str, error_type: str | None, headers: dict[str, str] | None
) -> web.HTTPException:
    error = web.HTTPException(
        text=json.dumps(error_body(status, message, error_type)),
        content_type="application/json",
        headers=headers,
    )
    error.set_status(status)
    return error


def whole_number(value: str, name: str, low: int, high: int) -> int:
    """A query parameter that must be an integer in [low, high], or a 400 that says so."""
    try:
        number = int(value)
    except ValueError:
        fail(400, f"{name} must be a whole number (got {value!r})")
    if not low <= number <= high:
        fail(400, f"{name} must be between {low} and {high} (got {number})")
    return number


def presented_token(request: web.Request) -> str | None:
    """The credential a client sent: `Authorization: Bearer ...` or `x-api-key` (the anthropic
    SDK sends one or the other, depending on its version)."""
    authorization = request.headers.get("Authorization", "")
    if authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return request.headers.get("x-api-key")


def authenticate(request: web.Request, *, admin: bool = False, verifier: bool = False) -> Principal:
    """The verified principal of a request, or a 401/403 that says why."""
    return verify_token(
        request.app[VERIFIER_KEY], presented_token(request), admin=admin, verifier=verifier
    )


def verify_token(
    keys: CredentialVerifier, token: str | None, *, admin: bool = False, verifier: bool = False
) -> Principal:
    """The verified principal of a presented credential, or a 401/403 that says why."""
    if not token:
        fail(401, "missing credential: send 'Authorization: Bearer <aar credential>'")
    try:
        principal = keys.verify(token)
    except CredentialError as error:
        fail(401, f"invalid credential: {error}")
    check_role(principal, admin=admin, verifier=verifier)
    return principal


def check_role(principal: Principal, *, admin: bool = False, verifier: bool = False) -> None:
    """403 unless the principal may call: a verifier only where `verifier`, and with `admin`
    nobody but an admin (or the verifier where allowed)."""
    if principal.role is Role.VERIFIER:
        if not verifier:
            fail(403, "a verifier credential reports reproductions only; this endpoint refuses it")
        return
    if admin and principal.role is not Role.ADMIN:
        fail(403, "this endpoint needs an admin credential (mint one with `aar credential mint`)")


async def read_body(request: web.Request) -> bytes:
    """The request's body; a 413 when it is larger than the application allows."""
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge as error:
        fail(413, too_large(error))


def too_large(error: web.HTTPRequestEntityTooLarge) -> str:
    """What a 413 says: the size allowed, the size sent, and the fix."""
    return f"{error.text}; send a smaller body"


async def read_model(request: web.Request, model: type[Model]) -> Model:
    """Parse and validate a JSON body; a 400 names each field that is wrong."""
    raw = await read_body(request)
    try:
        return model.model_validate_json(raw)
    except ValidationError as error:
        fail(400, f"invalid request body: {describe(error)}")


def json_response(
    payload: BaseModel | dict[str, Any] | list[Any], status: int = 200
) -> web.Response:
    if isinstance(payload, BaseModel):
        return web.Response(
            text=payload.model_dump_json(), status=status, content_type="application/json"
        )
    return web.json_response(payload, status=status)


async def _healthz(_: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[REGISTRY_KEY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    # aiohttp's own 404/405/413 answer in plain text; clients of aar expect the JSON shape.
    try:
        return await handler(request)
    except web.HTTPException as error:
        if error.content_type == "application/json" or error.status < 400:
            raise
        raise _with_status(error.status, error.reason, None, None) from None


def json_errors_app(client_max_size: int = 1024**2) -> web.Application:
    """An application whose every error answers in aar's JSON shape."""
    return web.Application(client_max_size=client_max_size, middlewares=[_json_errors])


def make_app(
    verifier: CredentialVerifier,
    registry: CollectorRegistry,
    *,
    client_max_size: int = 1024**2,
) -> web.Application:
    """An application with the verifier and `/healthz` in place. Its `registry` is served by
    `metrics_app` on the metrics port, not here: agents reach the API port, and every run's
    counters would be a channel between runs."""
    app = json_errors_app(client_max_size)
    app[VERIFIER_KEY] = verifier
    app[REGISTRY_KEY] = registry
    app.router.add_get("/healthz", _healthz)
    return app


def metrics_app(registry: CollectorRegistry) -> web.Application:
    """`GET /metrics` of `registry` and nothing else, for the metrics port's listener."""
    app = json_errors_app()
    app[REGISTRY_KEY] = registry
    app.router.add_get("/metrics", _metrics)
    return app


def listen(
    host: str = "0.0.0.0", port: int = 8080, unix_socket: Path | None = None
) -> socket.socket:
    """A listening socket on `host`:`port`, or on `unix_socket` (a stale socket file there is
    replaced); an OSError says why it could not be made."""
    if unix_socket is None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host, port), family=family, backlog=LISTEN_BACKLOG)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(unix_socket.stat().st_mode):
            unix_socket.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(unix_socket))
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def add_metrics_port(parser: argparse.ArgumentParser) -> None:
    """The `--metrics-port` flag every service takes (default $AAR_METRICS_PORT or 9090)."""
    parser.add_argument(
        "--metrics-port",
        type=int,
        # A string: argparse converts it as it would the flag, so a malformed one is refused.
        default=os.environ.get(METRICS_PORT_ENV) or str(DEFAULT_METRICS_PORT),
        help=f"serve /metrics on this port, on the same host, and only there; 0: not at all "
        f"(default ${METRICS_PORT_ENV} or {DEFAULT_METRICS_PORT})",
    )


def metrics_listener(program: str, host: str, port: int) -> socket.socket | None:
    """The metrics port's listening socket on `host` (None for port 0: no metrics served); a
    SystemExit that says what to change when it cannot listen."""
    if not port:
        return None
    try:
        return listen(host, port)
    except OSError as error:
        raise SystemExit(
            f"{program}: cannot serve /metrics on {host}:{port}: {error.strerror}; pass another "
            f"--metrics-port (or set {METRICS_PORT_ENV}), or 0 to serve none"
        ) from error


def address(sock: socket.socket) -> str:
    """A listening socket's address as a URL (`http://unix:PATH:` for a Unix socket)."""
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"http://unix:{name if isinstance(name, str) else name.decode()}:"
    host = f"[{name[0]}]" if sock.family == socket.AF_INET6 else name[0]
    return f"http://{host}:{name[1]}"


def settle_collector() -> None:
    """Set a serving process's garbage collector up for serving, once it has started."""
    # What exists now (modules, the app, state loaded at start) lives as long as the process.
    # Frozen, the collector never walks it again: under load, a full collection of it stalled
    # the event loop for tens of milliseconds, each time in some request's latency. Requests
    # make almost no reference cycles, and hundreds in flight keep thousands of young objects
    # alive, which CPython's default of a collection every 700 allocations walked over and over.
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def serve(
    app: web.Application,
    *,
    host: str = "0.0.0.0",
    port: int = 8080,
    unix_socket: Path | None = None,
    sock: socket.socket | None = None,
    metrics: socket.socket | None = None,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Serve on `sock`, or else on a socket made from the address arguments, until SIGTERM or
    SIGINT, then finish in-flight requests and run cleanups. With `metrics`, a listening
    socket, this process also serves `/metrics` of the app's registry there."""
    if sock is None:
        sock = listen(host, port, unix_socket)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    exporter: web.AppRunner | None = None
    exporter_site: web.SockSite | None = None
    if metrics is not None:
        exporter = web.AppRunner(metrics_app(app[REGISTRY_KEY]), handle_signals=False)
        await exporter.setup()
        exporter_site = web.SockSite(exporter, metrics)
    settle_collector()
    if exporter_site is not None:
        await exporter_site.start()
    site = web.SockSite(runner, sock)
    await site.start()
    if ready is not None:
        ready(address(sock))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)
        await runner.cleanup()
        if exporter is not None:
            await exporter.cleanup()
