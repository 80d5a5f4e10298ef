"""Budgets that cannot be overshot: the official anthropic SDK (AsyncAnthropic) through real HTTP to
the gateway and on to the local Messages-API stand-in, with the gateway's real SQLite ledger. Each
request's worst-case cost is held against its budgets before it goes upstream, and settled to its
real cost however it ends; many requests at a cap at once never spend past it."""

from __future__ import annotations

import asyncio
import functools
import json
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import pytest
from aiohttp import web
from gateway_harness import (
    HI,
    ISSUER,
    Gateway,
    gateway_before,
    metric,
    served_as_process,
    started,
    stream_breaking_off,
    stream_broken_off,
    unreachable_url,
)

from aar_devcluster.anthropic_stub import AnthropicStub, Reply

# claude-3-haiku in nano-dollars a token: input 250, output 1250, cache writes 300 (5 min) and
# 500 (1 h), reads 30; the dearest an input token can be billed at is 500.
HAIKU = "claude-3-haiku"
HAIKU_IN, HAIKU_OUT, HAIKU_DEAREST_IN = 250, 1250, 500
# claude-opus-4-6: output 25000, and an input token at most 10000 (a 1 h cache write).
OPUS = "claude-opus-4-6"
OPUS_OUT, OPUS_DEAREST_IN = 25_000, 10_000


def nano(usd: str) -> int:
    return int(Decimal(usd) * 10**9)


@pytest.fixture
async def gateway(
    tmp_path: Path, upstream_stub: tuple[AnthropicStub, str]
) -> AsyncIterator[Gateway]:
    instance = Gateway(*upstream_stub, tmp_path)
    async with started(instance, usd=None):
        yield instance


async def ledger_nano(gateway: Gateway, agent: str | None = None) -> int:
    """What the ledger on disk holds, summed, in nano-dollars."""
    await gateway.spend()  # read after every pending ledger write is on disk
    query = "SELECT coalesce(sum(cost_nano), 0) FROM ledger"
    with sqlite3.connect(gateway.directory / "data" / "gateway.sqlite3") as db:
        if agent is None:
            return int(db.execute(query).fetchone()[0])
        return int(db.execute(query + " WHERE agent = ?", (agent,)).fetchone()[0])


async def reserved(gateway: Gateway, agent: str = "") -> float:
    return metric(await gateway.metrics(), "aar_budget_reserved_usd", run="ns/w2s", agent=agent)


async def all_at_once(
    gateway: Gateway, calls: list[Callable[[], Awaitable[Any]]]
) -> tuple[int, list[anthropic.APIStatusError]]:
    """Start every call at once while the stand-in holds each answer until all were either let
    through or refused; then let the answers go. Returns how many went upstream, and the
    refusals."""
    release, all_in = asyncio.Event(), asyncio.Event()
    answers = gateway.stub.responder
    went: list[dict[str, Any]] = []
    refused: list[anthropic.APIStatusError] = []

    def count() -> None:
        if len(went) + len(refused) == len(calls):
            all_in.set()

    async def held(body: dict[str, Any]) -> Reply:
        went.append(body)
        count()
        await release.wait()
        assert answers is not None
        reply = answers(body)
        assert isinstance(reply, Reply)
        return reply

    async def one(call: Callable[[], Awaitable[Any]]) -> None:
        try:
            await call()
        except anthropic.APIStatusError as error:
            refused.append(error)
            count()

    gateway.stub.responder = held
    tasks = [asyncio.create_task(one(call)) for call in calls]
    await all_in.wait()
    release.set()
    await asyncio.gather(*tasks)
    gateway.stub.responder = answers
    return len(went), refused


async def test_forty_requests_at_once_on_an_agent_with_little_left_never_spend_past_its_cap(
    gateway: Gateway,
) -> None:
    cap = nano("0.01")
    await gateway.budget(None, {"w2s-1": 0.01})
    # Spend $0.008 first: 31995 input and 1 output token of claude-3-haiku.
    gateway.stub.script(Reply.text("ok", usage={"input_tokens": 31_995, "output_tokens": 1}))
    async with gateway.client() as client:
        await client.messages.create(model=HAIKU, max_tokens=10, messages=HI)
    assert await ledger_nano(gateway) == 31_995 * HAIKU_IN + HAIKU_OUT == cap - nano("0.002")

    # Each answer uses all of its max_tokens: the worst case on output, as near the hold as it gets.
    gateway.stub.responder = lambda _: Reply.text("answer", usage={"output_tokens": 100})
    async with gateway.client() as client:
        went, refused = await all_at_once(
            gateway,
            [
                functools.partial(
                    client.messages.create,
                    model=HAIKU,
                    max_tokens=100,
                    messages=[{"role": "user", "content": f"question {i}"}],
                )
                for i in range(40)
            ],
        )
        spend = await gateway.spend()
        assert nano(spend["agents"]["w2s-1"]["usd"]) == await ledger_nano(gateway, "w2s-1") <= cap
        # $0.002 holds a handful of worst cases (about $0.00017 each) at a time, not 40; the
        # rest may retry once those are billed.
        assert 2 <= went <= 12
        assert len(refused) == 40 - went
        assert {error.status_code for error in refused} == {429}
        assert "the agent budget of w2s-1 has $0.002 left of its cap $0.01" in str(refused[0])
        assert "held by" in str(refused[0])
        assert await reserved(gateway, "w2s-1") == 0
        assert await reserved(gateway) == 0

        # Then one at a time, until what is left cannot hold one more worst case.
        for _ in range(20):
            try:
                await client.messages.create(model=HAIKU, max_tokens=100, messages=HI)
            except anthropic.APIStatusError as error:
                final = error
                break
        else:
            raise AssertionError("the agent was never refused")
    assert final.status_code == 402
    assert "max_tokens of at most" in str(final)
    spent = await ledger_nano(gateway, "w2s-1")
    assert nano((await gateway.spend())["agents"]["w2s-1"]["usd"]) == spent <= cap
    assert (
        cap - spent < 100 * HAIKU_OUT + 200 * HAIKU_DEAREST_IN
    )  # it went as near as it safely could


async def test_a_run_cap_shared_by_several_agents_is_never_passed_either(gateway: Gateway) -> None:
    cap = nano("0.003")
    await gateway.budget(0.003)  # the run's cap; no agent has one of its own
    gateway.stub.responder = lambda _: Reply.text("answer", usage={"output_tokens": 100})
    agents = [f"w2s-{n}" for n in range(1, 5)]
    clients = [gateway.client(agent) for agent in agents]
    try:
        went, refused = await all_at_once(
            gateway,
            [
                functools.partial(client.messages.create, model=HAIKU, max_tokens=100, messages=HI)
                for client in clients
                for _ in range(10)
            ],
        )
    finally:
        for client in clients:
            await client.close()
    spend = await gateway.spend()
    assert nano(spend["run"]["usd"]) == await ledger_nano(gateway) <= cap
    assert 2 <= went <= 18
    assert {error.status_code for error in refused} == {429}
    assert "the run budget of ns/w2s has $0.003 left" in str(refused[0])
    assert sum(nano(spend["agents"][a]["usd"]) for a in spend["agents"]) == nano(
        spend["run"]["usd"]
    )
    assert len(spend["agents"]) > 1
    assert await reserved(gateway) == 0


async def post(gateway: Gateway, body: bytes, path: str = "/v1/messages") -> tuple[int, Any]:
    """A request with exactly these bytes as its body."""
    headers = {
        "x-api-key": ISSUER.mint_agent("ns", "w2s", "w2s-1"),
        "content-type": "application/json",
    }
    async with (
        aiohttp.ClientSession() as http,
        http.post(gateway.url + path, data=body, headers=headers) as response,
    ):
        return response.status, await response.json()


def opus_body(max_tokens: int) -> bytes:
    return json.dumps({"model": OPUS, "max_tokens": max_tokens, "messages": HI}).encode()


async def test_a_request_fits_when_its_worst_case_is_exactly_what_is_left_and_not_a_token_more(
    gateway: Gateway,
) -> None:
    most = 1234
    body = opus_body(most)
    assert len(opus_body(most + 1)) == len(body)
    worst = len(body) * OPUS_DEAREST_IN + most * OPUS_OUT  # a byte of body is at most a token
    await gateway.budget(float(Decimal(worst) / 10**9))
    gateway.stub.script(Reply.text("ok", usage={"input_tokens": 8, "output_tokens": 5}))

    status, answer = await post(gateway, opus_body(most + 1))
    assert status == 402, answer
    assert answer["error"]["type"] == "billing_error"
    message = answer["error"]["message"]
    assert f"could cost up to ${Decimal(worst + OPUS_OUT) / 10**9:f}" in message
    assert f"from the body's {len(body)} bytes, and max_tokens 1,235" in message
    assert f"with this input, max_tokens of at most {most:,} would fit" in message
    assert gateway.stub.requests == []

    status, answer = await post(gateway, body)  # exactly the cap: it fits
    assert status == 200, answer
    assert (await gateway.spend())["run"]["usd"] == f"{(8 * 5000 + 5 * 25000) / 10**9:.9f}"


async def test_an_enormous_max_tokens_is_refused_with_what_would_fit_and_not_billed(
    gateway: Gateway,
) -> None:
    # A conversation whose input alone could cost more than is left is told to shorten it.
    await gateway.budget(0.0001)
    status, answer = await post(gateway, opus_body(1))
    assert status == 402
    assert "its input alone could cost" in answer["error"]["message"]
    assert "shorten the conversation" in answer["error"]["message"]

    await gateway.budget(1.0)
    async with gateway.client(max_retries=2) as client:
        with pytest.raises(anthropic.APIStatusError) as refused:
            async with client.messages.stream(
                model=OPUS, max_tokens=1_000_000_000, messages=HI
            ) as stream:
                await stream.get_final_message()
        assert refused.value.status_code == 402
        assert refused.value.response.headers["x-should-retry"] == "false"
        message = str(refused.value)
        assert "could cost up to $25000.0" in message
        assert "more than the run budget of ns/w2s has left: $1 of its cap $1" in message
        # $1 buys 40,000 output tokens of opus, less what the body's bytes may cost as input.
        largest = int(message.split("max_tokens of at most ")[1].split(" ")[0].replace(",", ""))
        assert 39_000 < largest < 40_000
        async with client.messages.stream(model=OPUS, max_tokens=largest, messages=HI) as stream:
            await stream.get_final_message()
    assert len(gateway.stub.requests) == 1


async def test_a_stream_cut_mid_way_is_billed_what_it_used_and_gives_back_its_hold(
    tmp_path: Path,
) -> None:
    async with gateway_before(stream_breaking_off(input_tokens=20), tmp_path) as instance:
        # Room for one worst case at a time: a leaked hold would refuse every later request.
        await instance.budget(0.05, {"w2s-1": 0.02})
        async with instance.client() as client:
            for _ in range(3):
                await stream_broken_off(client, OPUS, max_tokens=500)
        spend = await instance.spend()
        assert spend["run"]["requests"] == 3
        assert nano(spend["run"]["usd"]) == 3 * (20 * 5000 + 1 * OPUS_OUT)
        assert await reserved(instance, "w2s-1") == await reserved(instance) == 0


@pytest.mark.parametrize("ending", ["upstream_error", "agent_hangs_up", "unreachable"])
async def test_a_request_that_ends_any_other_way_gives_back_its_hold(
    tmp_path: Path, upstream_stub: tuple[AnthropicStub, str], ending: str
) -> None:
    upstream = unreachable_url() if ending == "unreachable" else upstream_stub[1]
    gateway = Gateway(upstream_stub[0], upstream, tmp_path)
    # Room for one worst case at a time (each about $0.013): a leaked hold refuses the next.
    async with started(gateway, usd=0.02):
        for _ in range(3):
            await end_a_request(gateway, ending)
            for _ in range(500):  # a stream the agent left is read to its end, then billed
                if await reserved(gateway) == 0:
                    break
                await asyncio.sleep(0.02)
            assert await reserved(gateway) == await reserved(gateway, "w2s-1") == 0
        spend = await gateway.spend()
    if ending == "agent_hangs_up":
        assert spend["run"]["requests"] == 3
        assert nano(spend["run"]["usd"]) <= nano("0.02")
    else:
        assert spend["run"]["requests"] == 0


async def end_a_request(gateway: Gateway, ending: str) -> None:
    """One request that ends without an answer read to its end."""
    if ending == "agent_hangs_up":
        gateway.stub.chunk_delay = 0.01
        gateway.stub.script(Reply.text("y" * 200, usage={"output_tokens": 50}))
        await gateway.hang_up_on_a_stream(OPUS)
        return
    gateway.stub.script(Reply.failure(529, "overloaded_error", "Overloaded"))
    async with gateway.client() as client:
        with pytest.raises(anthropic.APIStatusError) as failed:
            await client.messages.create(model=OPUS, max_tokens=500, messages=HI)
    assert failed.value.status_code == (529 if ending == "upstream_error" else 502)


async def test_count_tokens_is_refused_as_any_request_is_and_otherwise_forwarded(
    gateway: Gateway,
) -> None:
    await gateway.budget(0.01)
    async with gateway.client() as client:
        counted = await client.messages.count_tokens(model=OPUS, messages=HI)
        assert counted.input_tokens > 0
        with pytest.raises(anthropic.PermissionDeniedError) as unpriced:
            await client.messages.count_tokens(model="claude-next-9", messages=HI)
        with pytest.raises(anthropic.PermissionDeniedError) as dated:
            await client.messages.count_tokens(model="claude-opus-4-6-20260101", messages=HI)
    async with gateway.client(run="unknown") as client:
        with pytest.raises(anthropic.PermissionDeniedError) as unregistered:
            await client.messages.count_tokens(model=OPUS, messages=HI)
    assert "model 'claude-next-9' has no price" in str(unpriced.value)
    assert "model 'claude-opus-4-6-20260101' has no price" in str(dated.value)
    assert "run ns/unknown has no budget registered" in str(unregistered.value)
    # Spend the budget; counting is then refused too, and never retried by the SDK.
    gateway.stub.script(Reply.text("ok", usage={"input_tokens": 2000}))
    async with gateway.client(max_retries=2) as client:
        await client.messages.create(model=OPUS, max_tokens=10, messages=HI)
        with pytest.raises(anthropic.APIStatusError) as spent:
            await client.messages.count_tokens(model=OPUS, messages=HI)
    assert spent.value.status_code == 402
    assert "the run budget of ns/w2s is spent" in str(spent.value)
    assert (await gateway.spend())["run"]["requests"] == 1
    # Refused counts are not Messages requests in the request metric.
    metrics = await gateway.metrics()
    labels = {"run": "ns/w2s", "agent": "w2s-1"}
    assert metric(metrics, "aar_llm_requests_total", model=OPUS, status="402", **labels) == 0


async def test_a_dated_alias_is_priced_only_when_the_table_lists_it(
    tmp_path: Path, upstream_stub: tuple[AnthropicStub, str]
) -> None:
    dated = "claude-opus-4-6-20260101"
    plain = Gateway(*upstream_stub, tmp_path / "plain")
    prices = tmp_path / "prices.yaml"
    prices.write_text(
        "version: ours-1\n"
        f"aliases: {{{dated}: claude-opus-4-6}}\n"
        "models:\n"
        "  claude-sonnet-4-5-20990101: {input: 1, output: 2, cache_write: 3, cache_read: 0.1}\n"
    )
    listed = Gateway(*upstream_stub, tmp_path / "listed", {"prices_file": prices})
    async with started(plain, listed, usd=1.0):
        async with plain.client() as client:
            with pytest.raises(anthropic.PermissionDeniedError) as refused:
                await client.messages.create(model=dated, max_tokens=10, messages=HI)
        assert f"model '{dated}' has no price" in str(refused.value)
        assert "aliases" in str(refused.value)
        assert upstream_stub[0].requests == []
        upstream_stub[0].script(
            Reply.text("ok", usage={"input_tokens": 1000, "output_tokens": 100}),
            Reply.text("ok", usage={"input_tokens": 1000, "output_tokens": 100}),
        )
        async with listed.client() as client:
            await client.messages.create(model=dated, max_tokens=10, messages=HI)
            assert (await listed.spend())["run"]["usd"] == "0.007500000"  # as claude-opus-4-6
            await client.messages.create(
                model="claude-sonnet-4-5-20990101", max_tokens=10, messages=HI
            )
        assert (await listed.spend())["run"]["usd"] == "0.008700000"  # + 1000*1 + 100*2 $/MTok
        # What the operator asks before it starts a run on a model: the same rule.
        status, unpriced = await plain.admin("GET", f"/api/v1/models/{dated}")
        assert status == 404
        assert f"model '{dated}' has no price" in unpriced["error"]["message"]
        assert "The gateway prices: claude-" in unpriced["error"]["message"]
        status, priced = await listed.admin("GET", f"/api/v1/models/{dated}")
        assert (status, priced) == (
            200,
            {"model": dated, "priced_as": "claude-opus-4-6", "price_table": "ours-1"},
        )
        async with aiohttp.ClientSession() as http:
            as_an_agent = {"Authorization": f"Bearer {ISSUER.mint_agent('ns', 'w2s', 'w2s-1')}"}
            async with http.get(f"{listed.url}/api/v1/models/{dated}", headers=as_an_agent) as r:
                assert r.status == 403


async def test_server_tools_are_refused_and_images_are_counted_upstream_before_they_start(
    gateway: Gateway,
) -> None:
    await gateway.budget(0.1)
    async with gateway.client() as client:
        with pytest.raises(anthropic.PermissionDeniedError) as server_tool:
            await client.messages.create(
                model=OPUS,
                max_tokens=10,
                messages=HI,
                tools=[{"type": "web_search_20250305", "name": "web_search"}],
            )
        assert "the server tool 'web_search_20250305'" in str(server_tool.value)
        assert gateway.stub.requests == []
        image = {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
        }
        look = [{"role": "user", "content": [image, {"type": "text", "text": "what is it?"}]}]
        # The upstream counts this small body as 50,000 tokens (an image's tokens follow its
        # pixels, not its bytes): $0.55 of input at most, more than the $0.10 left.
        gateway.stub._input_tokens = lambda _: 50_000  # type: ignore[method-assign]
        with pytest.raises(anthropic.APIStatusError) as refused:
            await client.messages.create(model=OPUS, max_tokens=10, messages=look)
        assert refused.value.status_code == 402
        assert "the upstream's count of 50,000" in str(refused.value)
        assert gateway.stub.requests == []
        # The same text without the image is bounded by its bytes, and goes.
        await client.messages.create(
            model=OPUS, max_tokens=10, messages=[{"role": "user", "content": "what is it?"}]
        )
    assert len(gateway.stub.requests) == 1


@pytest.mark.parametrize(
    ("count_status", "status", "retried"),
    [(529, 502, "true"), (429, 429, "true"), (400, 400, "false")],
)
async def test_an_image_whose_count_fails_upstream_is_refused_holding_nothing(
    tmp_path: Path, count_status: int, status: int, retried: str
) -> None:
    async def count_fails(_: web.Request) -> web.Response:
        return web.json_response(
            {"type": "error", "error": {"type": "x", "message": "cannot count now"}},
            status=count_status,
        )

    async def never(_: web.Request) -> web.Response:
        raise AssertionError("a request whose count failed went upstream")

    app = web.Application()
    app.router.add_post("/v1/messages/count_tokens", count_fails)
    app.router.add_post("/v1/messages", never)
    async with gateway_before(app, tmp_path) as instance:
        await instance.budget(1.0)
        image = {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}
        async with instance.client() as client:
            with pytest.raises(anthropic.APIStatusError) as refused:
                await client.messages.create(
                    model=OPUS, max_tokens=10, messages=[{"role": "user", "content": [image]}]
                )
        assert refused.value.status_code == status
        assert refused.value.response.headers["x-should-retry"] == retried
        assert f"the count failed ({count_status}): " in str(refused.value)
        assert "cannot count now" in str(refused.value)
        assert await reserved(instance) == 0


async def test_a_gateway_killed_with_a_request_in_flight_comes_back_holding_nothing(
    tmp_path: Path, upstream_stub: tuple[AnthropicStub, str]
) -> None:
    arrived, release = asyncio.Event(), asyncio.Event()

    async def held(_: dict[str, Any]) -> Reply:
        if not arrived.is_set():  # only the first: one let through beside it answers at once
            arrived.set()
            await release.wait()
        return Reply.text("too late")

    instance = Gateway(*upstream_stub, tmp_path)
    async with served_as_process(instance) as process:
        try:
            await instance.budget(0.02)  # room for one worst case (about $0.0135) at a time
            upstream_stub[0].responder = held
            async with instance.client() as client:
                pending = asyncio.create_task(
                    client.messages.create(model=OPUS, max_tokens=500, messages=HI)
                )
                await arrived.wait()
                with pytest.raises(anthropic.RateLimitError) as held_back:
                    await client.messages.create(model=OPUS, max_tokens=500, messages=HI)
                assert "held by 1 request in flight" in str(held_back.value)
                await process.kill()  # with the hold taken: nothing runs on the way out
                with pytest.raises(anthropic.APIConnectionError):
                    await pending
                release.set()
                upstream_stub[0].responder = None
                await process.start()
                # The killed process's hold died with it: the whole budget is there again.
                await client.messages.create(model=OPUS, max_tokens=500, messages=HI)
        finally:
            release.set()  # the stand-in's handler ends, whatever the test came to


async def test_spend_history_adds_up_to_the_ledger_and_is_for_admins_only(
    gateway: Gateway,
) -> None:
    await gateway.budget(10)
    status, answer = await gateway.admin("GET", "/api/v1/spend/ns/w2s/history")
    assert status == 404
    assert "no request of run ns/w2s yet" in answer["error"]["message"]
    for agent, tokens in (("w2s-1", 1000), ("w2s-2", 3000), ("w2s-1", 2000)):
        gateway.stub.script(Reply.text("ok", usage={"input_tokens": tokens}))
        async with gateway.client(agent) as client:
            await client.messages.create(model=HAIKU, max_tokens=10, messages=HI)
    status, history = await gateway.admin("GET", "/api/v1/spend/ns/w2s/history?points=5")
    assert status == 200, history
    spent = history["series"]["usd"]
    assert len(spent) == len(history["times"]) == 5
    assert spent == sorted(spent)  # cumulative
    assert spent[-1] == float((await gateway.spend())["run"]["usd"]) > 6000 * HAIKU_IN / 1e9
    assert history["times"][-1] == history["end"] >= history["start"]

    status, answer = await gateway.admin("GET", "/api/v1/spend/ns/w2s/history?points=501")
    assert status == 400
    assert "points must be between 1 and 500" in answer["error"]["message"]
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"{gateway.url}/api/v1/spend/ns/w2s/history",
            headers={"Authorization": f"Bearer {ISSUER.mint_agent('ns', 'w2s', 'w2s-1')}"},
        ) as response,
    ):
        assert response.status == 403  # every agent's spend is in it


async def test_by_default_the_series_are_per_run_not_per_agent(
    tmp_path: Path, upstream_stub: tuple[AnthropicStub, str]
) -> None:
    instance = Gateway(*upstream_stub, tmp_path, options={"per_agent_metrics": False})
    async with started(instance, usd=None):
        await instance.budget(1.0, {"w2s-1": 0.5, "w2s-2": 0.5})
        for agent in ("w2s-1", "w2s-2"):
            instance.stub.script(Reply.text("ok", usage={"input_tokens": 1000}))
            async with instance.client(agent) as client:
                await client.messages.create(model=HAIKU, max_tokens=10, messages=HI)
        metrics = await instance.metrics()
    run = {"run": "ns/w2s", "model": HAIKU}
    assert metric(metrics, "aar_llm_requests_total", agent="", status="200", **run) == 2
    assert metric(metrics, "aar_llm_tokens_total", agent="", type="input", **run) == 2000
    assert 'agent="w2s-1"' not in metrics
    assert 'agent="w2s-2"' not in metrics
    # The run's own cap is still there for the alerts.
    assert metric(metrics, "aar_budget_remaining_usd", run="ns/w2s", agent="") > 0
