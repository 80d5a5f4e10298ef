"""The forum: what every handler shares (`Forum`, kept on the aiohttp application under one key)
and the per-request accessors: `forum(request)`, the caller (`viewer`), the run it acts on
(`view_run`) and the web UI's credential cookie (`COOKIE`)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from aar_common.credentials import CredentialError, Principal, Role
from aar_common.web import VERIFIER_KEY, authenticate, check_role, fail, presented_token
from aar_forum.blobs import BlobStore
from aar_forum.metrics import Metrics
from aar_forum.ratelimit import RateLimiter
from aar_forum.settings import Settings
from aar_forum.store import Store
from aar_forum.stream import Hub

# The web UI keeps a human's admin credential in this cookie (HttpOnly, SameSite=Strict).
COOKIE = "aar_credential"


@dataclass
class Forum:
    settings: Settings
    store: Store
    blobs: BlobStore
    metrics: Metrics
    hub: Hub = field(default_factory=Hub)
    writes: RateLimiter = field(init=False)
    reads: RateLimiter = field(init=False)
    # Blob commits and deletes of the same bytes must not interleave (content is shared).
    artifact_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    http: aiohttp.ClientSession | None = None

    def __post_init__(self) -> None:
        self.writes = RateLimiter(self.settings.writes_per_minute, self.settings.write_burst)
        self.reads = RateLimiter(self.settings.reads_per_minute, self.settings.read_burst)

    def limit(self, principal: Principal, action: str) -> None:
        """Refuse an agent's request over its rate with a 429 and `retry-after`; admins (humans
        and the operator) and the operator's verifier are not limited."""
        if principal.role in (Role.ADMIN, Role.VERIFIER):
            return
        limiter = self.writes if action == "write" else self.reads
        wait = limiter.take(f"{principal.run_key}/{principal.agent}")
        if wait > 0:
            self.metrics.rate_limited.labels(action).inc()
            per_minute = limiter.per_minute
            fail(
                429,
                f"agent {principal.agent} is over its rate limit of {per_minute:g} {action}s "
                f"per minute; retry in {wait:.1f} s",
                headers={"retry-after": str(max(1, round(wait)))},
            )


FORUM_KEY = web.AppKey("forum", Forum)


def forum(request: web.Request) -> Forum:
    return request.app[FORUM_KEY]


def viewer(
    request: web.Request, *, allow_cookie: bool = False, verifier: bool = False
) -> Principal:
    """The caller: a credential in a header, or, for the web UI's own GET requests, the admin
    credential in the UI's cookie (only GETs: a cookie must never authorise a change).
    `verifier`: the operator's verifier credential may read here too (artifacts it reproduces)."""
    if allow_cookie and presented_token(request) is None and (token := request.cookies.get(COOKIE)):
        try:
            principal = request.app[VERIFIER_KEY].verify(token)
        except CredentialError:
            fail(401, "the web UI's stored credential is invalid; log in again at /login")
        check_role(principal, verifier=verifier)
        return principal
    return authenticate(request, verifier=verifier)


def view_run(request: web.Request, principal: Principal, *, write: bool = False) -> str | None:
    """The run a request acts on: an agent's own, always; for an admin the `run` query
    parameter (`namespace/run`), or every run (None) where that makes sense."""
    if principal.role is Role.AGENT:
        return principal.run_key
    run = request.query.get("run", "").strip()
    if not run:
        if write:
            fail(400, "an admin writing to the forum must name the run: add ?run=namespace/run")
        return None
    parts = run.split("/")
    if len(parts) != 2 or not all(parts):
        fail(400, f"run must be 'namespace/run' (got {run!r})")
    return run
