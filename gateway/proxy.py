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

Budgets: a request goes upstream only once its worst-case cost is held against its agent's and its
run's budget (reservations.py); when its answer ends the hold gives way to the real cost, and a
request that ends any other way gives its hold back, so requests in flight together never spend
past a cap.
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
from aar_gateway.limits import RateLimiter, Refusal, budget_refusal, retry_after, usd_exact
from aar_gateway.meter import StreamMeter
from aar_gateway.metrics import Metrics
from aar_gateway.pricing import Price, PriceTable, PricingError, Usage
from aar_gateway.reservations import (
    COUNT_MARGIN,
    Hold,
    Reservations,
    WorstCase,
    input_bound,
    needs_count,
    prompt_allowance,
    unbounded_by,
)
from aar_gateway.store import RUN_ROW, Exchange, Replay, Store

log = logging.getLogger(__name__)

DEFAULT_ANTHROPIC_VERSION = "2023-06-01"
# Request headers the upstream may see; everything else (the agent's credential above all) stays.
_FORWARD_REQUEST = ("anthropic-version", "anthropic-beta", "content-type", "accept")
# Response headers the agent may see: the retry hints its SDK obeys, and the upstream's ids.
_FORWARD_RESPONSE = ("content-type", "request-id", "retry-after", "x-should-retry", "cache-control")
_FORWARD_RESPONSE_PREFIXES = ("anthropic-ratelimit-", "retry-after-")
# What count_tokens takes of a Messages request (it refuses the rest, max_tokens included).
_COUNTED_FIELDS = ("model", "messages", "system", "tools", "tool_choice", "thinking")
MESSAGES, COUNT_TOKENS = "/v1/messages", "/v1/messages/count_tokens"


@dataclass(frozen=True)
class Call:
    """Who asked for what: the facts every ledger row and metric of one request carries."""

    request_id: str
    run: str
    agent: str
    model: str
    path: str = "/v1/messages"
    replay_key: str | None = None  # run/agent/Idempotency-Key, when the agent sent one
    digest: str | None = None  # the body's sha256, to tell a retry from a reused key
    hold: Hold | None = None  # its worst-case cost, reserved until the answer ends


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
        # In memory only: after a restart none is left, as every request holding one has ended.
        self.reservations = Reservations()
        # (run, ledger row) whose budget a 402 showed spent, until the run's budget is set again:
        # what the operator reads as BudgetExhausted, since holds keep spend from reaching a cap.
        self.exhausted: set[tuple[str, str]] = set()

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
        call, raw, body = await self._identify(request, MESSAGES)
        key = request.headers.get("idempotency-key")
        if not key:
            return await self._admit_and_forward(request, call, raw, body)
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
            self.metrics.answered(call.run, call.agent, call.model, 200)
            return web.Response(
                body=answer.body,
                headers={"content-type": answer.content_type, "x-aar-replayed": "true"},
            )
        self._in_flight[scope] = asyncio.Event()
        try:
            return await self._admit_and_forward(request, call, raw, body)
        finally:
            self._in_flight.pop(scope).set()

    async def count_tokens(self, request: web.Request) -> web.StreamResponse:
        # Counting is free upstream, so nothing is reserved or billed; but it is refused as any
        # request is (no run, no price, a spent budget): the key is not for runs that may not ask.
        call, raw, _ = await self._identify(request, COUNT_TOKENS)
        self._admissible(call)
        return await self._forward(request, call, COUNT_TOKENS, raw)

    async def _admit_and_forward(
        self, request: web.Request, call: Call, raw: bytes, body: dict[str, Any]
    ) -> web.StreamResponse:
        call = await self._admit(request, call, raw, body)
        try:
            return await self._forward(request, call, MESSAGES, raw)
        finally:
            # Billed already when an answer came (_bill); otherwise nothing was spent.
            assert call.hold is not None
            self._release(call.hold)

    async def _identify(
        self, request: web.Request, path: str
    ) -> tuple[Call, bytes, dict[str, Any]]:
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
        body = _body_of(raw)
        return Call(f"gw_{uuid.uuid4().hex}", run, agent, body["model"], path), raw, body

    def _admissible(self, call: Call) -> Price:
        """The model's price, unless the request is refused whatever it asks: spend cannot be
        recorded, the model has no price, the run is not registered or a budget is spent."""
        if self.store.failure is not None:
            # Fail closed: no request starts while spend cannot be persisted.
            self._refuse(
                call, 503, "api_error", f"the gateway cannot record spend: {self.store.failure}"
            )
        try:
            price = self.prices.price(call.model)
        except PricingError as error:
            # Not the request's fault, and no retry or shorter prompt would help: a policy refusal.
            self._refuse(call, 403, "permission_error", str(error))
        if refusal := budget_refusal(self.store, self.reservations, call.run, call.agent):
            self._refuse_for_budget(call, refusal)
        return price

    async def _admit(
        self, request: web.Request, call: Call, raw: bytes, body: dict[str, Any]
    ) -> Call:
        """Refuse, before anything is spent, a request that may not start now; otherwise hold
        its worst-case cost against its budgets and return the call holding it."""
        run, agent = call.run, call.agent
        price = self._admissible(call)
        if unbounded := unbounded_by(body):
            self._refuse(
                call,
                403,
                "permission_error",
                f"this gateway does not forward {unbounded}: the cost of such a request cannot "
                "be bounded before it starts, so no budget could be kept; use client tools",
            )
        worst = await self._worst_case(request, call, raw, body, price)
        # From here to the hold nothing awaits: no other request can take the room meanwhile.
        if refusal := budget_refusal(self.store, self.reservations, run, agent, worst):
            self._refuse_for_budget(call, refusal)
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
        hold = self.reservations.hold(run, agent, worst.nano)
        self._reserved_changed(hold)
        return replace(call, hold=hold)

    async def _worst_case(
        self,
        request: web.Request,
        call: Call,
        raw: bytes,
        body: dict[str, Any],
        price: Price,
    ) -> WorstCase:
        """The most the request can cost: its input bounded from the body (or counted upstream,
        for images and documents), and all of max_tokens as output."""
        max_tokens = body.get("max_tokens")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            fail(
                400,
                "max_tokens: a positive integer is required (the gateway reserves what the "
                f"answer may cost against the budget before it asks; got {max_tokens!r})",
            )
        if needs_count(raw, body):
            counted = await self._count_upstream(request, call, body)
            input_tokens = input_bound(len(raw), body, counted)
            basis = (
                f"the upstream's count of {counted:,} for this body of images or documents, "
                f"plus 1/{COUNT_MARGIN}"
            )
        else:
            input_tokens = input_bound(len(raw), body)
            basis = f"from the body's {len(raw):,} bytes"
            if allowance := prompt_allowance(body):
                basis += f" and {allowance:,} for the tools' prompt"
        return WorstCase(
            input_tokens=input_tokens,
            max_tokens=max_tokens,
            nano=price.worst_case_nano(input_tokens, max_tokens),
            output_nano_per_token=price.nano_per_token()[1],
            input_basis=basis,
        )

    async def _count_upstream(self, request: web.Request, call: Call, body: dict[str, Any]) -> int:
        """The upstream's count of the request's input tokens (count_tokens is free)."""
        assert self._session is not None, "the proxy is used before its application started"
        question = {name: body[name] for name in _COUNTED_FIELDS if name in body}
        try:
            async with self._session.post(
                self.upstream + COUNT_TOKENS,
                data=json.dumps(question).encode(),
                headers=self._upstream_headers(request),
            ) as upstream:
                answer = await upstream.read()
                status = upstream.status
        except (TimeoutError, aiohttp.ClientError) as error:
            answer, status = repr(error).encode(), 502
        counted = _input_tokens_of(answer) if status == 200 else None
        if counted is None:
            # What the upstream would not count, it would not answer either: say why, as it did.
            # A rate limit or a failure upstream is retried by the agent's SDK; the rest is not.
            if status == 429:
                refusal, error_type, retry = 429, "rate_limit_error", True
            elif 400 <= status < 500:
                refusal, error_type, retry = status, "invalid_request_error", False
            else:
                refusal, error_type, retry = 502, "api_error", True
            self._refuse(
                call,
                refusal,
                error_type,
                "a request with images or documents has its input counted upstream before it "
                f"starts, to reserve what it may cost, and the count failed ({status}): "
                f"{answer.decode(errors='replace')[:300]}",
                {"retry-after": "1"} if retry else None,
                retry=retry,
            )
        return counted

    def _refuse(
        self,
        call: Call,
        status: int,
        error_type: str,
        message: str,
        headers: dict[str, str] | None = None,
        *,
        retry: bool | None = None,
    ) -> NoReturn:
        if call.path == MESSAGES:
            self.metrics.answered(call.run, call.agent, call.model, status)
        # Unless told: only a rate limit passes; the SDK must not retry anything else refused here.
        should_retry = "true" if (status == 429 if retry is None else retry) else "false"
        fail(status, message, error_type, {"x-should-retry": should_retry, **(headers or {})})

    def _upstream_headers(self, request: web.Request) -> dict[str, str]:
        """The agent's headers the upstream may see, and the real key."""
        headers = {
            name: value
            for name in _FORWARD_REQUEST
            if (value := request.headers.get(name)) is not None
        }
        headers.setdefault("anthropic-version", DEFAULT_ANTHROPIC_VERSION)
        headers["content-type"] = "application/json"
        headers["x-api-key"] = self._api_key
        headers["accept-encoding"] = "identity"  # usage is read from the bytes as they pass
        return headers

    def _release(self, hold: Hold) -> None:
        if self.reservations.release(hold):
            self._reserved_changed(hold)

    def _reserved_changed(self, hold: Hold) -> None:
        for agent in (hold.agent, RUN_ROW):
            self.metrics.reserved(hold.run, agent, self.reservations.held(hold.run, agent))

    async def _forward(
        self, request: web.Request, call: Call, path: str, raw: bytes
    ) -> web.StreamResponse:
        assert self._session is not None, "the proxy is used before its application started"
        headers = self._upstream_headers(request)
        started = time.perf_counter()
        try:
            async with self._session.post(
                self.upstream + path, data=raw, headers=headers
            ) as upstream:
                self.metrics.upstream_latency.labels(call.run, call.model).observe(
                    time.perf_counter() - started
                )
                status = upstream.status
                if path == MESSAGES and status == 200:
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
        if path == MESSAGES:
            self.metrics.answered(call.run, call.agent, call.model, status)
        return response

    def _upstream_failed(
        self, call: Call, path: str, status: int, error_type: str, message: str
    ) -> NoReturn:
        log.warning("Upstream failed for %s of %s: %s", call.agent, call.run, message)
        if path == MESSAGES:
            self.metrics.answered(call.run, call.agent, call.model, status)
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
        # Settle: the hold gives way to the real cost in the same step, so no check sees neither.
        if call.hold is not None:
            self._release(call.hold)
        if not usage.billable:
            return
        replay = None
        if call.replay_key is not None and call.digest is not None and answer is not None:
            replay = Replay(call.replay_key, call.digest, upstream.content_type, answer)
        cost = self.prices.cost_nano(call.model, usage)
        if call.hold is not None and cost > call.hold.nano:
            log.warning(
                "Request %s of %s (%s) cost %s, more than the %s reserved for it: usage %s",
                call.agent,
                call.run,
                call.model,
                usd_exact(cost),
                usd_exact(call.hold.nano),
                usage.model_dump(),
            )
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

    def _refuse_for_budget(self, call: Call, refusal: Refusal) -> NoReturn:
        if refusal.exhausts is not None:
            self.exhausted.add((call.run, refusal.exhausts))
        self._refuse(call, refusal.status, refusal.error_type, refusal.message, refusal.headers)

    def budget_set(self, run: str) -> None:
        """The run's budget was set again: what was spent may fit again."""
        self.exhausted = {key for key in self.exhausted if key[0] != run}
        self.refresh_remaining(run)

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


def _body_of(raw: bytes) -> dict[str, Any]:
    """The request's body, naming a model, or a 400 that says what is wrong with it."""
    try:
        body: Any = json.loads(raw)
    except ValueError as error:
        fail(400, f"the request body is not JSON: {error}")
    model = body.get("model") if isinstance(body, dict) else None
    if not isinstance(model, str) or not model:
        fail(400, "model: Field required (the request body must be a JSON object naming a model)")
    result: dict[str, Any] = body
    return result


def _input_tokens_of(answer: bytes) -> int | None:
    """The count in a count_tokens answer, if it is one."""
    try:
        counted = json.loads(answer).get("input_tokens")
    except (ValueError, AttributeError):
        return None
    if isinstance(counted, int) and not isinstance(counted, bool) and counted >= 0:
        return counted
    return None


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
