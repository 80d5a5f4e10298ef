"""The gateway as agents and the operator use it: the official anthropic SDK through real HTTP to
the gateway, and from there to the local Messages-API stand-in. Metered tokens and dollars are
compared with what the stand-in reported; budgets, rate limits and upstream failures are driven
through the same path."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import pytest
import yaml
from agent_env import REAL_API_KEY
from gateway_harness import (
    HI,
    ISSUER,
    KEY,
    Gateway,
    gateway_before,
    metric,
    process_env,
    served_as_process,
    started,
    stream_breaking_off,
    stream_broken_off,
    unreachable_url,
    write_keys,
)
from helm_template import helm_template

from aar_common.credentials import public_key_pem
from aar_common.ports import free_port
from aar_devcluster.anthropic_stub import AnthropicStub, Reply
from aar_gateway.main import main as gateway_main
from aar_gateway.pricing import USAGE_FIELDS

MODEL = "claude-opus-4-6"
# claude-opus-4-6 in $ per million tokens: input 5, output 25, cache write 6.25, cache read 0.50.
OPUS_46 = {
    "input_tokens": Decimal(5),
    "output_tokens": Decimal(25),
    "cache_creation_input_tokens": Decimal("6.25"),
    "cache_read_input_tokens": Decimal("0.50"),
}


def dollars(usage: dict[str, int]) -> Decimal:
    """What `usage` costs on claude-opus-4-6, worked out independently of the gateway."""
    return sum((usage[k] * OPUS_46[k] for k in USAGE_FIELDS), Decimal(0)) / 10**6


@pytest.fixture
async def gateway(
    tmp_path: Path, upstream_stub: tuple[AnthropicStub, str]
) -> AsyncIterator[Gateway]:
    instance = Gateway(*upstream_stub, tmp_path)
    async with started(instance, usd=100.0):
        yield instance


USAGE = {
    "input_tokens": 1000,
    "output_tokens": 200,
    "cache_creation_input_tokens": 300,
    "cache_read_input_tokens": 4000,
}


async def test_a_message_is_metered_to_the_cent_and_the_agent_credential_stays_here(
    gateway: Gateway,
) -> None:
    gateway.stub.script(Reply.text("Here is the answer.", usage=USAGE))
    async with gateway.client() as client:
        message = await client.messages.create(model=MODEL, max_tokens=100, messages=HI)
    assert message.content[0].text == "Here is the answer."  # type: ignore[union-attr]
    upstream_headers = {k.lower(): v for k, v in gateway.stub.requests[0]["headers"].items()}
    assert upstream_headers["x-api-key"] == REAL_API_KEY
    assert "authorization" not in upstream_headers
    assert not any("aar1." in value for value in upstream_headers.values())

    spend = await gateway.spend()
    assert {k: spend["run"][k] for k in USAGE_FIELDS} == gateway.stub.usage_reported == USAGE
    # 1000*5 + 200*25 + 300*6.25 + 4000*0.5 micro-dollars, independently of the stand-in.
    assert Decimal(spend["run"]["usd"]) == Decimal("0.013875") == dollars(USAGE)
    assert spend["agents"]["w2s-1"] == spend["run"]
    assert spend["run"]["requests"] == 1


async def test_a_stream_passes_through_and_its_cumulative_output_count_is_billed_once(
    gateway: Gateway,
) -> None:
    text = "The weak teacher's labels are noisy on long prompts. " * 5
    gateway.stub.script(Reply.text(text, usage={"cache_read_input_tokens": 64}))
    async with (
        gateway.client() as client,
        client.messages.stream(model=MODEL, max_tokens=500, messages=HI) as stream,
    ):
        chunks = [piece async for piece in stream.text_stream]
        final = await stream.get_final_message()
    assert "".join(chunks) == text
    assert len(chunks) > 10
    spend = await gateway.spend()
    reported = gateway.stub.usage_reported
    # message_start says output_tokens=1; message_delta has the total: adding them over-bills.
    assert spend["run"]["output_tokens"] == final.usage.output_tokens == reported["output_tokens"]
    assert {k: spend["run"][k] for k in USAGE_FIELDS} == reported
    assert Decimal(spend["run"]["usd"]) == dollars(reported)


async def test_many_agents_mixed_streams_add_up_to_exactly_what_upstream_reported(
    gateway: Gateway,
) -> None:
    agents = ["w2s-1", "w2s-2", "w2s-3"]
    for index in range(12):
        gateway.stub.script(
            Reply.text(
                "x" * (7 * index + 3),
                usage={
                    "cache_creation_input_tokens": 11 * index,
                    "cache_read_input_tokens": 997 * index,
                },
            )
        )

    async def one(index: int) -> None:
        async with gateway.client(agents[index % 3]) as client:
            if index % 2:
                async with client.messages.stream(
                    model=MODEL, max_tokens=50, messages=HI
                ) as stream:
                    await stream.get_final_message()
            else:
                await client.messages.create(model=MODEL, max_tokens=50, messages=HI)

    for index in range(12):  # in order, so each agent's scripted replies are known
        await one(index)
    spend = await gateway.spend()
    assert {k: spend["run"][k] for k in USAGE_FIELDS} == gateway.stub.usage_reported
    assert Decimal(spend["run"]["usd"]) == dollars(gateway.stub.usage_reported)
    assert sum(Decimal(spend["agents"][a]["usd"]) for a in agents) == Decimal(spend["run"]["usd"])
    assert spend["run"]["requests"] == 12
    metrics = await gateway.metrics()
    labels = {"run": "ns/w2s", "agent": "w2s-2", "model": MODEL}
    assert metric(metrics, "aar_llm_requests_total", status="200", **labels) == 4
    assert (
        metric(metrics, "aar_llm_tokens_total", type="output", **labels)
        == spend["agents"]["w2s-2"]["output_tokens"]
    )
    assert metric(metrics, "aar_llm_spend_usd_total", **labels) == pytest.approx(
        float(spend["agents"]["w2s-2"]["usd"])
    )
    assert metric(metrics, "aar_budget_remaining_usd", run="ns/w2s", agent="") == pytest.approx(
        100 - float(spend["run"]["usd"])
    )
    assert (
        metric(metrics, "aar_llm_upstream_latency_seconds_count", run="ns/w2s", model=MODEL) == 12
    )


async def test_the_credential_is_taken_from_x_api_key_or_bearer(gateway: Gateway) -> None:
    credential = ISSUER.mint_agent("ns", "w2s", "w2s-1")
    body = {"model": MODEL, "max_tokens": 10, "messages": HI}
    async with aiohttp.ClientSession() as http:
        for headers in (
            {"x-api-key": credential, "anthropic-version": "2023-06-01"},
            {"Authorization": f"Bearer {credential}"},
            {"x-api-key": "sk-ant-guessed"},
        ):
            async with http.post(
                gateway.url + "/v1/messages", json=body, headers=headers
            ) as response:
                answer = await response.json()
                if headers.get("x-api-key") == "sk-ant-guessed":
                    assert response.status == 401
                    assert answer["error"]["type"] == "authentication_error"
                else:
                    assert response.status == 200, answer
    assert (await gateway.spend())["run"]["requests"] == 2


async def test_a_run_budget_reached_mid_run_refuses_the_next_request_with_the_reason(
    gateway: Gateway,
) -> None:
    await gateway.budget(0.02)  # each request below costs $0.013875
    gateway.stub.script(*[Reply.text("ok", usage=USAGE) for _ in range(3)])
    async with gateway.client(max_retries=3) as client:
        await client.messages.create(model=MODEL, max_tokens=10, messages=HI)
        await client.messages.create(model=MODEL, max_tokens=10, messages=HI)
        with pytest.raises(anthropic.APIStatusError) as refused:
            await client.messages.create(model=MODEL, max_tokens=10, messages=HI)
    assert refused.value.status_code == 402
    assert refused.value.response.headers["x-should-retry"] == "false"
    error = refused.value.body["error"]  # type: ignore[index]
    assert error["type"] == "billing_error"
    assert "run budget of ns/w2s is spent: cap $0.02, spent $0.03" in error["message"]
    # Refused before the upstream, and not retried by the SDK despite max_retries=3.
    assert len(gateway.stub.requests) == 2
    metrics = await gateway.metrics()
    labels = {"run": "ns/w2s", "agent": "w2s-1", "model": MODEL}
    assert metric(metrics, "aar_llm_requests_total", status="402", **labels) == 1
    assert metric(metrics, "aar_budget_remaining_usd", run="ns/w2s", agent="") == 0
    # Raising the cap lets the run go on.
    await gateway.budget(1.0)
    async with gateway.client() as client:
        await client.messages.create(model=MODEL, max_tokens=10, messages=HI)


async def test_a_budget_spent_to_the_nano_dollar_refuses_the_next_request(
    gateway: Gateway,
) -> None:
    # The cap is exactly two requests' cost: the third finds spent == cap, which is spent.
    cost = dollars(USAGE)
    await gateway.budget(float(2 * cost))
    gateway.stub.responder = lambda _: Reply.text("ok", usage=USAGE)
    async with gateway.client() as client:
        for _ in range(2):
            await client.messages.create(model=MODEL, max_tokens=10, messages=HI)
        assert Decimal((await gateway.spend())["run"]["usd"]) == 2 * cost
        with pytest.raises(anthropic.APIStatusError) as refused:
            await client.messages.create(model=MODEL, max_tokens=10, messages=HI)
    assert refused.value.status_code == 402
    assert "run budget of ns/w2s is spent" in str(refused.value)
    assert len(gateway.stub.requests) == 2


async def test_an_agent_budget_stops_that_agent_and_not_its_neighbours(gateway: Gateway) -> None:
    await gateway.budget(None, {"w2s-1": 0.01, "w2s-2": None})
    gateway.stub.responder = lambda _: Reply.text("ok", usage=USAGE)
    async with gateway.client("w2s-1") as first, gateway.client("w2s-2") as second:
        await first.messages.create(model=MODEL, max_tokens=10, messages=HI)
        with pytest.raises(anthropic.APIStatusError) as refused:
            await first.messages.create(model=MODEL, max_tokens=10, messages=HI)
        for _ in range(3):
            await second.messages.create(model=MODEL, max_tokens=10, messages=HI)
    assert refused.value.status_code == 402
    assert "agent budget of w2s-1 is spent: cap $0.01, spent $0.01" in str(refused.value)
    assert (await gateway.spend())["agents"]["w2s-2"]["requests"] == 3


async def test_a_run_the_operator_has_not_registered_is_refused(gateway: Gateway) -> None:
    async with gateway.client(run="unknown") as client:
        with pytest.raises(anthropic.PermissionDeniedError) as refused:
            await client.messages.create(model=MODEL, max_tokens=10, messages=HI)
    assert "run ns/unknown has no budget registered" in str(refused.value)
    assert gateway.stub.requests == []


async def test_a_model_without_a_price_is_refused_before_it_costs_anything(
    gateway: Gateway,
) -> None:
    async with gateway.client() as client:
        with pytest.raises(anthropic.PermissionDeniedError) as refused:
            await client.messages.create(model="claude-next-9", max_tokens=10, messages=HI)
        # A dated snapshot the price table lists is priced as the model it names.
        await client.messages.create(model="claude-haiku-4-5-20251001", max_tokens=10, messages=HI)
    assert "model 'claude-next-9' has no price" in str(refused.value)
    assert "gateway.prices" in str(refused.value)
    assert len(gateway.stub.requests) == 1


async def test_a_configured_default_price_bills_unknown_models(
    tmp_path: Path, upstream_stub: tuple[AnthropicStub, str]
) -> None:
    prices = tmp_path / "prices.yaml"
    prices.write_text(
        "version: ours-1\ndefault: {input: 2, output: 10, cache_write: 2.5, cache_read: 0.2}\n"
    )
    instance = Gateway(*upstream_stub, tmp_path, {"prices_file": prices})
    async with started(instance, usd=10.0):
        upstream_stub[0].script(
            Reply.text("ok", usage={"input_tokens": 1000, "output_tokens": 100})
        )
        async with instance.client() as client:
            await client.messages.create(model="claude-next-9", max_tokens=10, messages=HI)
        assert (await instance.spend())["run"]["usd"] == "0.003000000"  # 1000*2 + 100*10 µ$


async def test_overloaded_and_server_errors_come_back_with_the_upstream_retry_hints(
    gateway: Gateway,
) -> None:
    gateway.stub.script(Reply.failure(529, "overloaded_error", "Overloaded", retry_after=7))
    async with gateway.client() as client:
        with pytest.raises(anthropic.APIStatusError) as failed:
            await client.messages.create(model=MODEL, max_tokens=10, messages=HI)
    assert failed.value.status_code == 529
    assert failed.value.response.headers["retry-after"] == "7"
    assert failed.value.body == {  # type: ignore[comparison-overlap]
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
    }
    # The SDK retries a 500 as the upstream's hint says; only the answered attempt is billed.
    gateway.stub.script(
        Reply.failure(500, "api_error", "Internal server error", retry_after=0.01),
        Reply.text("second time lucky", usage=USAGE),
    )
    async with gateway.client(max_retries=2) as client:
        message = await client.messages.create(model=MODEL, max_tokens=10, messages=HI)
    assert message.content[0].text == "second time lucky"  # type: ignore[union-attr]
    spend = await gateway.spend()
    assert spend["run"]["requests"] == 1
    assert Decimal(spend["run"]["usd"]) == dollars(USAGE)


async def test_an_unreachable_or_silent_upstream_is_a_retryable_502_or_504(
    tmp_path: Path, upstream_stub: tuple[AnthropicStub, str]
) -> None:
    unreachable = Gateway(upstream_stub[0], unreachable_url(), tmp_path / "a")
    silent = Gateway(*upstream_stub, tmp_path / "b", {"upstream_timeout": 0.2})
    async with started(unreachable, silent, usd=1.0):
        upstream_stub[0].script(Reply.text("too late", delay=1))
        for instance, status, kind in (
            (unreachable, 502, "api_error"),
            (silent, 504, "timeout_error"),
        ):
            async with instance.client() as client:
                with pytest.raises(anthropic.APIStatusError) as failed:
                    await client.messages.create(model=MODEL, max_tokens=10, messages=HI)
            assert failed.value.status_code == status
            assert failed.value.response.headers["x-should-retry"] == "true"
            assert failed.value.body["error"]["type"] == kind  # type: ignore[index]
            assert instance.url != ""
            assert (await instance.spend())["run"]["requests"] == 0


async def test_the_agent_rate_limit_answers_429_with_retry_after(
    tmp_path: Path, upstream_stub: tuple[AnthropicStub, str]
) -> None:
    instance = Gateway(*upstream_stub, tmp_path, {"agent_requests_per_minute": 2})
    async with started(instance, usd=1.0):
        async with instance.client() as client, instance.client("w2s-2") as neighbour:
            for _ in range(2):
                await client.messages.create(model=MODEL, max_tokens=10, messages=HI)
            with pytest.raises(anthropic.RateLimitError) as limited:
                await client.messages.create(model=MODEL, max_tokens=10, messages=HI)
            await neighbour.messages.create(model=MODEL, max_tokens=10, messages=HI)
        # Two a minute: the third request waits about 30 s for the bucket to refill one.
        assert int(limited.value.response.headers["retry-after"]) in (29, 30)
        assert "over its 2 requests per minute" in str(limited.value)


async def test_count_tokens_is_forwarded_with_the_real_key_and_not_billed(
    gateway: Gateway,
) -> None:
    async with gateway.client() as client:
        counted = await client.messages.count_tokens(model=MODEL, messages=HI)
    assert counted.input_tokens > 0
    assert (await gateway.spend())["run"]["requests"] == 0


async def test_a_stream_the_agent_abandons_is_still_read_to_the_end_and_billed(
    gateway: Gateway,
) -> None:
    gateway.stub.chunk_delay = 0.01
    gateway.stub.script(Reply.text("y" * 400))
    await gateway.hang_up_on_a_stream(MODEL)  # the agent hangs up after the first bytes
    for _ in range(500):  # the gateway keeps reading the upstream: wait for its ledger row
        if (await gateway.spend())["run"]["requests"]:
            break
        await asyncio.sleep(0.02)
    spend = await gateway.spend()
    assert {k: spend["run"][k] for k in USAGE_FIELDS} == gateway.stub.usage_reported


async def test_totals_and_budgets_survive_a_restart_on_the_same_database(
    gateway: Gateway,
) -> None:
    await gateway.budget(0.02)
    gateway.stub.responder = lambda _: Reply.text("ok", usage=USAGE)
    async with gateway.client() as client:
        for _ in range(2):
            await client.messages.create(model=MODEL, max_tokens=10, messages=HI)
    before = await gateway.spend()
    await gateway.stop()
    await gateway.start()
    assert await gateway.spend() == before
    async with gateway.client() as client:
        with pytest.raises(anthropic.APIStatusError) as refused:
            await client.messages.create(model=MODEL, max_tokens=10, messages=HI)
    assert refused.value.status_code == 402
    metrics = await gateway.metrics()
    assert metric(metrics, "aar_budget_remaining_usd", run="ns/w2s", agent="") == 0


async def test_admin_endpoints_need_an_admin_and_a_well_formed_budget(gateway: Gateway) -> None:
    agent = ISSUER.mint_agent("ns", "w2s", "w2s-1")
    async with aiohttp.ClientSession() as http:
        async with http.get(
            gateway.url + "/api/v1/spend/ns/w2s", headers={"x-api-key": agent}
        ) as response:
            assert response.status == 403
        async with http.put(
            gateway.url + "/api/v1/budgets/ns/w2s",
            json={"agents": {}},
            headers={"x-api-key": agent},
        ) as response:
            assert response.status == 403
    status, answer = await gateway.admin("PUT", "/api/v1/budgets/ns/w2s", {"usd": -1})
    assert status == 400
    assert "usd" in answer["error"]["message"]
    status, answer = await gateway.admin("PUT", "/api/v1/budgets/ns/w2s", {"agents": {}})
    assert status == 400
    assert "usd: Field required" in answer["error"]["message"]
    status, answer = await gateway.admin("GET", "/api/v1/spend/ns/never")
    assert status == 404
    assert "no budget registered" in answer["error"]["message"]
    status, answer = await gateway.admin(
        "PUT", "/api/v1/budgets/ns/w2s", {"usd": 0.1, "agents": {"w2s-1": 0.05}}
    )
    assert (status, answer) == (
        200,
        {"run": "ns/w2s", "usd": "0.100000000", "agents": {"w2s-1": "0.050000000"}},
    )


async def test_a_killed_gateway_process_restarts_with_the_spend_it_reported(
    tmp_path: Path, upstream_stub: tuple[AnthropicStub, str]
) -> None:
    upstream_stub[0].responder = lambda _: Reply.text("ok", usage=USAGE)
    instance = Gateway(*upstream_stub, tmp_path)
    async with served_as_process(instance) as process:
        await instance.budget(0.05)
        async with instance.client() as client:
            await client.messages.create(model=MODEL, max_tokens=10, messages=HI)
            async with client.messages.stream(model=MODEL, max_tokens=10, messages=HI) as stream:
                await stream.get_final_message()
            await client.messages.create(model=MODEL, max_tokens=10, messages=HI)
        before = await instance.spend()  # answered from what is on disk
        await process.kill()  # nothing flushed on the way out
        await process.start()
        spend = await instance.spend()
        assert spend == before
        assert spend["run"]["requests"] == 3
        assert Decimal(spend["run"]["usd"]) == 3 * dollars(USAGE)
        async with instance.client() as client:
            await client.messages.create(model=MODEL, max_tokens=10, messages=HI)
            with pytest.raises(anthropic.APIStatusError) as refused:  # $0.0555 of $0.05 spent
                await client.messages.create(model=MODEL, max_tokens=10, messages=HI)
        assert refused.value.status_code == 402


async def test_when_spend_cannot_be_written_the_gateway_refuses_further_requests(
    gateway: Gateway,
) -> None:
    async with gateway.client() as client:
        await client.messages.create(model=MODEL, max_tokens=10, messages=HI)
        await gateway.spend()  # the first request's row is written (just after its answer)
        with sqlite3.connect(gateway.directory / "data" / "gateway.sqlite3") as db:
            db.execute("DROP TABLE ledger")  # the volume lost the ledger under the gateway
        await client.messages.create(model=MODEL, max_tokens=10, messages=HI)
        await gateway.spend()  # waits for the failed write
        with pytest.raises(anthropic.InternalServerError) as refused:
            await client.messages.create(model=MODEL, max_tokens=10, messages=HI)
    assert refused.value.status_code == 503
    assert "cannot record spend: OperationalError: no such table: ledger" in str(refused.value)
    assert len(gateway.stub.requests) == 2


# The chart: what it renders is what the gateway reads.

CHART_VALUES = """
gateway:
  enabled: true
  apiKey: {existingSecret: anthropic-api-key, key: key}
  agentRequestsPerMinute: 30
  prices:
    version: ours-2026-03-01
    models:
      claude-custom-1: {input: 4.5, output: 22.5, cache_write: 5.625, cache_read: 0.45}
"""


def gateway_objects(rendered: str) -> dict[tuple[str, str], dict[str, Any]]:
    """The rendered objects that belong to the gateway, by kind and name."""
    return {
        (o["kind"], o["metadata"]["name"]): o
        for o in yaml.safe_load_all(rendered)
        if o and o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "gateway"
    }


def test_the_chart_deploys_the_gateway_by_default_and_refuses_it_without_a_key_secret(
    repo_root: Path,
) -> None:
    default = helm_template(repo_root)
    assert default.returncode == 0, default.stderr
    pod = gateway_objects(default.stdout)[("Deployment", "aar-gateway")]["spec"]["template"]
    (key,) = [v for v in pod["spec"]["volumes"] if v["name"] == "api-key"]
    assert key["secret"]["secretName"] == "anthropic-api-key"
    keyless = helm_template(repo_root, "--set", "gateway.apiKey.existingSecret=")
    assert keyless.returncode != 0
    assert "gateway.apiKey.existingSecret: name the Secret" in keyless.stderr
    disabled = helm_template(repo_root, "--set", "gateway.enabled=false")
    assert gateway_objects(disabled.stdout) == {}
    unknown = helm_template(repo_root, "--set", "gateway.apikey.existingSecret=x")
    assert "additional properties 'apikey' not allowed" in unknown.stderr


async def test_the_gateway_serves_as_the_chart_configures_it(
    repo_root: Path, tmp_path: Path, upstream_stub: tuple[AnthropicStub, str]
) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(CHART_VALUES + f"  upstream: {upstream_stub[1]}\n")
    rendered = helm_template(repo_root, "-f", str(values))
    assert rendered.returncode == 0, rendered.stderr
    objects = gateway_objects(rendered.stdout)
    assert set(objects) == {
        ("Deployment", "aar-gateway"),
        ("Service", "aar-gateway"),
        ("PersistentVolumeClaim", "aar-gateway-data"),
        ("ConfigMap", "aar-gateway-prices"),
        ("NetworkPolicy", "aar-gateway"),
    }
    assert objects[("Service", "aar-gateway")]["spec"]["ports"][0]["port"] == 8080
    pod = objects[("Deployment", "aar-gateway")]["spec"]["template"]["spec"]
    # The real key's Secret is mounted by the gateway's pod and nothing else in the chart.
    assert rendered.stdout.count("anthropic-api-key") == 1
    (container,) = pod["containers"]
    # Lay out, under tmp_path, the files the pod's volumes would hold at their mount paths.
    volumes = {v["name"]: v for v in pod["volumes"]}
    root = tmp_path / "pod"
    for mount in container["volumeMounts"]:
        folder = root / mount["mountPath"].lstrip("/")
        folder.mkdir(parents=True)
        volume = volumes[mount["name"]]
        if "secret" in volume:
            assert volume["secret"]["secretName"] == "anthropic-api-key"
            assert volume["secret"]["items"] == [{"key": "key", "path": "api-key"}]
            (folder / "api-key").write_text(REAL_API_KEY)
        elif volume.get("configMap", {}).get("name") == "aar-credential-public-key":
            (folder / "public-key.pem").write_bytes(public_key_pem(KEY))
        elif "configMap" in volume:
            for name, text in objects[("ConfigMap", volume["configMap"]["name"])]["data"].items():
                (folder / name).write_text(text)
    env = {
        item["name"]: str(root / item["value"].lstrip("/"))
        if item["value"].startswith("/")
        else item["value"]
        for item in container["env"]
    }
    instance = Gateway(*upstream_stub, tmp_path)
    async with served_as_process(instance, env):
        await instance.budget(1.0)
        upstream_stub[0].script(
            Reply.text("ok", usage={"input_tokens": 1000, "output_tokens": 100})
        )
        async with instance.client() as client:
            # Priced only by the chart's table: 1000 * 4.5 + 100 * 22.5 micro-dollars.
            await client.messages.create(model="claude-custom-1", max_tokens=10, messages=HI)
        assert (await instance.spend())["run"]["usd"] == "0.006750000"
        assert upstream_stub[0].requests[0]["headers"]["x-api-key"] == REAL_API_KEY
    assert (root / "var/lib/aar/gateway.sqlite3").exists()  # the ledger is on the volume


async def test_usage_beyond_what_a_request_held_is_still_billed_in_full(
    gateway: Gateway,
) -> None:
    # The stand-in reports 1000 input tokens for a body of a hundred bytes, which the real API
    # cannot: each request holds about $0.001 (its bytes and max_tokens at worst) and costs
    # $0.013875. What was reported is billed all the same, never cut to what was held.
    await gateway.budget(0.02)
    all_in, release = asyncio.Event(), asyncio.Event()

    async def held(_: dict[str, Any]) -> Reply:
        if len(gateway.stub.requests) == 4:
            all_in.set()
        await release.wait()
        return Reply.text("ok", usage=USAGE)

    gateway.stub.responder = held
    async with gateway.client() as client:
        calls = [
            asyncio.create_task(client.messages.create(model=MODEL, max_tokens=10, messages=HI))
            for _ in range(4)
        ]
        await all_in.wait()  # four holds of about $0.001 fit in $0.02
        release.set()
        await asyncio.gather(*calls)
        with pytest.raises(anthropic.APIStatusError) as refused:
            await client.messages.create(model=MODEL, max_tokens=10, messages=HI)
    assert refused.value.status_code == 402
    spend = await gateway.spend()
    # Every request billed what it used; nothing started after.
    assert spend["run"]["requests"] == 4
    assert Decimal(spend["run"]["usd"]) == 4 * dollars(USAGE)


async def test_a_stream_that_breaks_off_upstream_ends_with_an_error_event_and_bills_its_input(
    tmp_path: Path,
) -> None:
    async with gateway_before(stream_breaking_off(input_tokens=5000), tmp_path) as instance:
        await instance.budget(1.0)
        async with instance.client() as client:
            await stream_broken_off(client, MODEL, max_tokens=10)
        spend = await instance.spend()
        assert spend["run"]["input_tokens"] == 5000
        assert spend["run"]["output_tokens"] == 1
        assert Decimal(spend["run"]["usd"]) == Decimal("0.025025")  # 5000*5 + 1*25 µ$


async def test_a_retry_with_the_same_idempotency_key_is_answered_again_and_not_billed(
    gateway: Gateway,
) -> None:
    await gateway.budget(0.02)
    gateway.stub.script(
        Reply.text("first answer", usage=USAGE), Reply.text("a streamed answer", usage=USAGE)
    )
    async with gateway.client() as client:
        once = {"extra_headers": {"Idempotency-Key": "turn-1"}}
        first = await client.messages.create(model=MODEL, max_tokens=10, messages=HI, **once)
        again = await client.messages.create(model=MODEL, max_tokens=10, messages=HI, **once)
        assert again.id == first.id
        twice = {"extra_headers": {"Idempotency-Key": "turn-2"}}
        streamed = []
        for _ in range(2):  # the second after the budget is spent: the replay is paid for already
            async with client.messages.stream(
                model=MODEL, max_tokens=10, messages=HI, **twice
            ) as stream:
                streamed.append(await stream.get_final_message())
        assert streamed[0].id == streamed[1].id
        assert streamed[1].content[0].text == "a streamed answer"  # type: ignore[union-attr]
        with pytest.raises(anthropic.BadRequestError) as reused:
            await client.messages.create(model=MODEL, max_tokens=99, messages=HI, **once)
        with pytest.raises(anthropic.APIStatusError) as spent:
            await client.messages.create(model=MODEL, max_tokens=10, messages=HI)
    assert "was used for a different request body" in str(reused.value)
    assert spent.value.status_code == 402
    assert len(gateway.stub.requests) == 2
    assert (await gateway.spend())["run"]["requests"] == 2


@pytest.mark.parametrize("key", [None, "turn-7"])
async def test_an_sdk_retry_after_its_timeout_is_billed_once_with_a_key_and_as_paid_without(
    gateway: Gateway, key: str | None
) -> None:
    # The first attempt outlives the SDK's timeout; the upstream generates it all the same.
    # The SDK gives up on the first attempt after 1 s, retries 0.4 to 0.5 s later and waits 1 s
    # more; the upstream answers the first at 1.6 s: well inside the retry's wait, either way.
    gateway.stub.responder = lambda _: Reply.text("slow but sure", usage=USAGE, delay=1.6)
    headers = {"Idempotency-Key": key} if key else {}
    async with gateway.client(max_retries=1, timeout=1.0) as client:
        if key:  # the retry waits for the attempt in flight and gets its answer
            message = await client.messages.create(
                model=MODEL, max_tokens=10, messages=HI, extra_headers=headers
            )
            assert message.content[0].text == "slow but sure"  # type: ignore[union-attr]
        else:  # each attempt is its own exchange upstream, and each is billed
            with pytest.raises(anthropic.APITimeoutError):
                await client.messages.create(model=MODEL, max_tokens=10, messages=HI)
    upstream_exchanges = 1 if key else 2
    for _ in range(500):  # the abandoned exchanges finish upstream, and are metered
        spend = await gateway.spend()
        if spend["run"]["requests"] >= upstream_exchanges:
            break
        await asyncio.sleep(0.02)
    assert len(gateway.stub.requests) == gateway.stub.messages_answered == upstream_exchanges
    assert spend["run"]["requests"] == upstream_exchanges
    assert Decimal(spend["run"]["usd"]) == upstream_exchanges * dollars(USAGE)


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"AAR_ANTHROPIC_API_KEY_FILE": None}, "--api-key-file or $AAR_ANTHROPIC_API_KEY_FILE"),
        ({"AAR_ANTHROPIC_API_KEY_FILE": "/nonexistent/key"}, "cannot read the Anthropic API key"),
        ({"AAR_CREDENTIAL_PUBLIC_KEY_FILE": "/nonexistent"}, "aar-credential-public-key"),
        ({"AAR_GATEWAY_PRICES_FILE": "prices.yaml"}, "must be a mapping with a 'version'"),
    ],
)
def test_a_misconfigured_gateway_exits_saying_what_to_fix(
    tmp_path: Path,
    change: dict[str, str | None],
    complaint: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    write_keys(tmp_path)
    (tmp_path / "prices.yaml").write_text("models: {}\n")
    monkeypatch.chdir(tmp_path)
    for name, value in {**process_env(tmp_path, "http://127.0.0.1:1"), **change}.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exited:
        gateway_main(["--port", str(free_port())])
    assert exited.value.code != 0
    assert complaint in f"{exited.value.code} {capsys.readouterr().err}"
