"""The Messages API as agents see it: their own aar credential in, the real key upstream, every
byte of the answer passed back as it arrives, and the usage it reports metered and billed.

Retries: the gateway never retries upstream itself. A failed exchange (timeout, 5xx, 529) goes
back to the agent with the upstream's retry hints, and the agent's SDK decides; each upstream
exchange that consumed tokens gets its own ledger row, recorded once. An exchange the agent
stopped listening to (it timed out, or its connection dropped) is still read to the end and
billed, because the upstream bills it. A retry that sends the same `Idempotency-Key` as an
answered request gets that answer again, from the ledger, with no new exchange and no new bill;
one of a request still in flight waits for it. Without a key a retry is a new exchange, billed as
the upstream bills it. So the ledger matches the upstream's bill: nothing is counted twice and
nothing paid for is left out.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, NoReturn

import aiohttp
from aiohttp import web

from aar_common.credentials import Role
from aar_common.web import authenticate, error_body, fail
from aar_gateway.limits import RateLimiter, budget_refusal, retry_after
from aar_gateway.meter import StreamMeter
from aar_gateway.metrics import Metrics
from aar_gateway.pricing import PriceTable, PricingError, Usage
from aar_gateway.store import RUN_ROW, Exchange, Replay, Store

log = logging.getLogger(__name__)

DEFAULT_ANTHROPIC_VERSION = "2023-06-01"
# Request headers the upstream may see; everything else (the agent's credential above all) stays.
_FORWARD_REQUEST = ("anthropic-version", "anthropic-beta", "content-type", "accept")
# Response headers the agent may see: the retry hints its SDK obeys, and the upstream's ids.
_FORWARD_RESPONSE = ("content-type", "request-id", "retry-after", "x-should-retry", "cache-control")
_FORWARD_RESPONSE_PREFIXES = ("anthropic-ratelimit-", "retry-after-")


@dataclass(frozen=True)
class Call:
    """Who asked for what: the facts every ledger row and metric of one request carries."""

    request_id: str
    run: str
    agent: str
    model: str
    replay_key: str | None = None  # run/agent/Idempotency-Key, when the agent sent one
    digest: str | None = None  # the body's sha256, to tell a retry from a reused key


class Proxy:
    def __init__(
        self,
        *,
        upstream: str,
        api_key: str,
        store: Store,
        prices: PriceTable,
        metrics: Metrics,
        limiter: RateLimiter,
        timeout: aiohttp.ClientTimeout,
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self._api_key = api_key
        self.store = store
        self.prices = prices
        self.metrics = metrics
        self.limiter = limiter
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._in_flight: dict[str, asyncio.Event] = {}  # replay keys of requests under way

    async def start(self) -> None:
        """Open the one pooled client session every upstream call goes through."""
        self._session = aiohttp.ClientSession(
            timeout=self._timeout,
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
            auto_decompress=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    # Handlers

    async def messages(self, request: web.Request) -> web.StreamResponse:
        call, raw = await self._identify(request)
        key = request.headers.get("idempotency-key")
        if not key:
            self._admit(call)
            return await self._forward(request, call, "/v1/messages", raw)
        if len(key) > 255:
            fail(400, "Idempotency-Key: at most 255 characters (a UUID is plenty)")
        # A retry of an answered request gets that answer again, without a new exchange or a new
        # bill (even once the budget is spent: it is paid for); one of a request still in flight
        # waits for it. The key is the agent's own: another agent's same key is another request.
        digest = hashlib.sha256(raw).hexdigest()
        scope = f"{call.run}/{call.agent}/{key}"
        call = replace(call, replay_key=scope, digest=digest)
        while (pending := self._in_flight.get(scope)) is not None:
            await pending.wait()
        if (answer := await self.store.replay(scope)) is not None:
            if answer.digest != digest:
                fail(
                    400,
                    f"Idempotency-Key {key!r} was used for a different request body; "
                    "use a new key for each new request",
                )
            self.metrics.requests.labels(call.run, call.agent, call.model, "200").inc()
            return web.Response(
                body=answer.body,
                headers={"content-type": answer.content_type, "x-aar-replayed": "true"},
            )
        self._in_flight[scope] = asyncio.Event()
        try:
            self._admit(call)
            return await self._forward(request, call, "/v1/messages", raw)
        finally:
            self._in_flight.pop(scope).set()

    async def count_tokens(self, request: web.Request) -> web.StreamResponse:
        # Counting is free upstream: authenticated and forwarded, neither budgeted nor billed.
        call, raw = await self._identify(request)
        return await self._forward(request, call, "/v1/messages/count_tokens", raw)

    async def _identify(self, request: web.Request) -> tuple[Call, bytes]:
        """Who asks (an agent) and for which model."""
        principal = authenticate(request)
        if principal.role is not Role.AGENT:
            fail(
                403,
                "the model API is for agents: an admin credential names no run to bill; "
                "use an agent credential (`aar credential mint --namespace --run --agent`)",
            )
        run, agent = principal.run_key, principal.agent
        raw = await request.read()
        model = _model_of(raw)
        return Call(f"gw_{uuid.uuid4().hex}", run, agent, model), raw

    def _admit(self, call: Call) -> None:
        """Refuse, before anything is spent, a request that may not start now."""
        run, agent = call.run, call.agent
        if self.store.failure is not None:
            # Fail closed: no request starts while spend cannot be persisted.
            self._refuse(
                call, 503, "api_error", f"the gateway cannot record spend: {self.store.failure}"
            )
        try:
            self.prices.price(call.model)
        except PricingError as error:
            # Not the request's fault, and no retry or shorter prompt would help: a policy refusal.
            self._refuse(call, 403, "permission_error", str(error))
        if refusal := budget_refusal(self.store, run, agent):
            self._refuse(call, refusal.status, refusal.error_type, refusal.message)
        # Last, so that only requests about to go upstream use up the agent's rate.
        if wait := self.limiter.wait(f"{run}/{agent}", time.monotonic()):
            self._refuse(
                call,
                429,
                "rate_limit_error",
                f"agent {agent} is over its {self.limiter.per_minute:g} requests per minute; "
                f"retry in {retry_after(wait)} s",
                {"retry-after": retry_after(wait)},
            )

    def _refuse(
        self,
        call: Call,
        status: int,
        error_type: str,
        message: str,
        headers: dict[str, str] | None = None,
    ) -> NoReturn:
        self.metrics.requests.labels(call.run, call.agent, call.model, str(status)).inc()
        # Only a rate limit passes; the SDK must not retry anything else refused here.
        should_retry = "true" if status == 429 else "false"
        fail(status, message, error_type, {"x-should-retry": should_retry, **(headers or {})})

    async def _forward(
        self, request: web.Request, call: Call, path: str, raw: bytes
    ) -> web.StreamResponse:
        assert self._session is not None, "the proxy is used before its application started"
        headers = {
            name: value
            for name in _FORWARD_REQUEST
            if (value := request.headers.get(name)) is not None
        }
        headers.setdefault("anthropic-version", DEFAULT_ANTHROPIC_VERSION)
        headers["content-type"] = "application/json"
        headers["x-api-key"] = self._api_key
        headers["accept-encoding"] = "identity"  # usage is read from the bytes as they pass
        started = time.perf_counter()
        try:
            async with self._session.post(
                self.upstream + path, data=raw, headers=headers
            ) as upstream:
                self.metrics.upstream_latency.labels(call.run, call.model).observe(
                    time.perf_counter() - started
                )
                status = upstream.status
                if path == "/v1/messages" and status == 200:
                    if upstream.content_type == "text/event-stream":
                        response = await self._relay_stream(request, call, upstream)
                    else:
                        response = await self._relay_message(call, upstream)
                else:
                    response = await self._relay_other(upstream)
        except TimeoutError:
            self._upstream_failed(
                call,
                path,
                504,
                "timeout_error",
                f"the upstream {self.upstream} did not answer within "
                f"{self._timeout.sock_read:g} s; retry the request",
            )
        except aiohttp.ClientError as error:
            self._upstream_failed(
                call,
                path,
                502,
                "api_error",
                f"the upstream {self.upstream} could not be reached: {error}",
            )
        if path == "/v1/messages":
            self.metrics.requests.labels(call.run, call.agent, call.model, str(status)).inc()
        return response

    def _upstream_failed(
        self, call: Call, path: str, status: int, error_type: str, message: str
    ) -> NoReturn:
        log.warning("Upstream failed for %s of %s: %s", call.agent, call.run, message)
        if path == "/v1/messages":
            self.metrics.requests.labels(call.run, call.agent, call.model, str(status)).inc()
        fail(status, message, error_type, {"x-should-retry": "true", "retry-after": "1"})

    async def _relay_message(
        self, call: Call, upstream: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        body = await upstream.read()
        try:
            message = json.loads(body)
            usage = Usage.from_api(message.get("usage") or {})
            message_id = message.get("id")
        except (ValueError, AttributeError):
            log.error("Upstream answered 200 with a body that is not a message: %.200r", body)
            usage, message_id = Usage(), None
        self._bill(call, usage, message_id, upstream, complete=True, answer=body)
        return web.Response(body=body, status=200, headers=_response_headers(upstream))

    async def _relay_stream(
        self, request: web.Request, call: Call, upstream: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers=_response_headers(upstream))
        meter = StreamMeter()
        listening = True
        try:
            await response.prepare(request)
        except ConnectionResetError:
            listening = False  # gone before the first byte; the answer is still paid for
        kept: list[bytes] = []  # the whole stream, to answer a retry with the same key
        try:
            async for chunk in upstream.content.iter_any():
                meter.feed(chunk)
                if call.replay_key is not None:
                    kept.append(chunk)
                if listening:
                    try:
                        await response.write(chunk)
                    except ConnectionResetError:
                        # The tokens are generated and paid for anyway: read on to meter them.
                        listening = False
                        log.info("Agent %s of %s left a stream; metering it", call.agent, call.run)
        except (TimeoutError, aiohttp.ClientError) as error:
            log.warning("Upstream stream broke for %s of %s: %r", call.agent, call.run, error)
            if listening:
                event = error_body(
                    502, f"the upstream stream broke off: {error or type(error).__name__}"
                )
                await _write_quietly(
                    response, f"event: error\ndata: {json.dumps(event)}\n\n".encode()
                )
        # Only a complete stream is kept for replay: a retry of a broken one asks again.
        self._bill(
            call,
            meter.usage,
            meter.message_id,
            upstream,
            complete=meter.stopped,
            answer=b"".join(kept) if meter.stopped and meter.error is None else None,
        )
        if listening:
            with contextlib.suppress(ConnectionResetError):
                await response.write_eof()
        return response

    async def _relay_other(self, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
        """Errors (with their retry hints) and count_tokens answers, passed back as they are."""
        body = await upstream.read()
        headers = _response_headers(upstream)
        if upstream.status >= 400 and not _is_error_json(body):
            # A proxy or load balancer in front of the API may answer in HTML; the SDK wants JSON.
            text = body.decode(errors="replace").strip()[:300]
            body = json.dumps(
                error_body(upstream.status, f"upstream answered {upstream.status}: {text}")
            ).encode()
            headers["content-type"] = "application/json"
        return web.Response(body=body, status=upstream.status, headers=headers)

    def _bill(
        self,
        call: Call,
        usage: Usage,
        message_id: str | None,
        upstream: aiohttp.ClientResponse,
        *,
        complete: bool,
        answer: bytes | None = None,
    ) -> None:
        if not usage.billable:
            return
        replay = None
        if call.replay_key is not None and call.digest is not None and answer is not None:
            replay = Replay(call.replay_key, call.digest, upstream.content_type, answer)
        cost = self.prices.cost_nano(call.model, usage)
        exchange = Exchange(
            request_id=call.request_id,
            run=call.run,
            agent=call.agent,
            model=call.model,
            price_version=self.prices.version,
            usage=usage,
            cost_nano=cost,
            message_id=message_id,
            upstream_request_id=upstream.headers.get("request-id"),
            complete=complete,
            replay=replay,
        )
        self.store.record(exchange)  # counted now, on disk within an fsync
        self.metrics.billed(call.run, call.agent, call.model, usage, cost)
        self.refresh_remaining(call.run, call.agent)

    def refresh_remaining(self, run: str, agent: str | None = None) -> None:
        """Set aar_budget_remaining_usd for a run (and one agent, or all it caps)."""
        budget = self.store.budgets.get(run)
        if budget is None:
            return
        spent = self.store.spent(run, RUN_ROW).cost_nano
        self.metrics.budget_left(run, RUN_ROW, budget.cap_nano, spent)
        for name, cap in budget.agents.items():
            if agent is None or name == agent:
                self.metrics.budget_left(run, name, cap, self.store.spent(run, name).cost_nano)


def _model_of(raw: bytes) -> str:
    """The request's model, or a 400 that says what is wrong with the body."""
    try:
        body: Any = json.loads(raw)
    except ValueError as error:
        fail(400, f"the request body is not JSON: {error}")
    model = body.get("model") if isinstance(body, dict) else None
    if not isinstance(model, str) or not model:
        fail(400, "model: Field required (the request body must be a JSON object naming a model)")
    return model


def _is_error_json(body: bytes) -> bool:
    try:
        parsed = json.loads(body)
    except ValueError:
        return False
    return isinstance(parsed, dict) and parsed.get("type") == "error"


def _response_headers(upstream: aiohttp.ClientResponse) -> dict[str, str]:
    return {
        name: value
        for name, value in upstream.headers.items()
        if name.lower() in _FORWARD_RESPONSE or name.lower().startswith(_FORWARD_RESPONSE_PREFIXES)
    }


async def _write_quietly(response: web.StreamResponse, data: bytes) -> None:
    with contextlib.suppress(ConnectionResetError):
        await response.write(data)
