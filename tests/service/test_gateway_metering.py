"""Pricing, reading usage from a stream, the ledger and the rate limit: the gateway's arithmetic,
without HTTP."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from pathlib import Path

import pytest

from aar_gateway.limits import RateLimiter, retry_after
from aar_gateway.meter import StreamMeter
from aar_gateway.pricing import (
    BUILTIN_VERSION,
    PricingError,
    Usage,
    builtin_table,
    load_table,
    usd_text,
    usd_to_nano,
)
from aar_gateway.store import Exchange, Store


def test_costs_are_exact_nano_dollars_and_listed_snapshots_are_priced_as_their_model() -> None:
    table = builtin_table()
    usage = Usage(input_tokens=3, output_tokens=7, cache_read_input_tokens=1)
    # claude-3-haiku: 0.25 in, 1.25 out, 0.03 read ($/MTok): 0.75 + 8.75 + 0.03 micro-dollars.
    assert table.cost_nano("claude-3-haiku-20240307", usage) == 9530
    assert usd_text(table.cost_nano("claude-3-haiku", usage)) == "0.000009530"
    assert table.price("claude-opus-4-6") == table.price("claude-opus-4-5-20251101")
    assert table.price("claude-3-7-sonnet-latest") == table.price("claude-3-7-sonnet")
    # A million requests of that size add up to exactly a million times as much.
    assert 10**6 * table.cost_nano("claude-3-haiku", usage) == usd_to_nano("9.53")


def test_one_hour_cache_writes_are_priced_apart_from_five_minute_ones() -> None:
    usage = Usage.from_api(
        {
            "input_tokens": 0,
            "output_tokens": 0,
            "cache_creation_input_tokens": 300,
            "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200},
            "cache_read_input_tokens": None,
        }
    )
    # opus 4.6: 5-minute writes 6.25, 1-hour writes 10 $/MTok.
    assert builtin_table().cost_nano("claude-opus-4-6", usage) == 100 * 6250 + 200 * 10000


def test_an_unknown_model_is_refused_with_how_to_price_it() -> None:
    with pytest.raises(PricingError) as refused:
        builtin_table().price("claude-opus-9")
    message = str(refused.value)
    assert "'claude-opus-9' has no price" in message
    assert BUILTIN_VERSION in message
    assert "gateway.prices.models" in message


def test_a_configured_table_overrides_by_model_and_names_its_version(tmp_path: Path) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text(
        "version: negotiated-2026-03\n"
        "models:\n"
        "  claude-opus-4-6: {input: 4.5, output: 22.5, cache_write: 5.625, cache_read: 0.45}\n"
    )
    table = load_table(path)
    assert table.version == "negotiated-2026-03"
    assert table.price("claude-opus-4-6").input == Decimal("4.5")
    assert table.price("claude-opus-4-6").nano_per_token()[3] == 9000  # 1 h writes: 2x input
    assert table.price("claude-haiku-4-5") == builtin_table().price("claude-haiku-4-5")
    assert table.default is None


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("models: {}\n", "must be a mapping with a 'version'"),
        (
            "version: v\nmodels: {m: {input: 0.0001, output: 1, cache_write: 1, cache_read: 1}}\n",
            "at most 3 decimals",
        ),
        (
            "version: v\nmodels: {m: {input: 1, output: 1}}\n",
            "models.m.cache_write: Field required",
        ),
        (
            "version: v\nmodels: {m: {input: -1, output: 1, cache_write: 1, cache_read: 1}}\n",
            "models.m.input: Input should be greater than or equal to 0",
        ),
    ],
)
def test_a_bad_price_table_is_refused_saying_what_is_wrong(
    tmp_path: Path, text: str, complaint: str
) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text(text)
    with pytest.raises(PricingError, match=r"prices\.yaml") as refused:
        load_table(path)
    assert complaint in str(refused.value)


def test_dollars_convert_to_nano_dollars_without_float_error() -> None:
    assert usd_to_nano(0.1) == 100_000_000
    assert usd_to_nano(18000) == 18_000 * 10**9
    assert usd_to_nano(Decimal("0.000000001")) == 1


def _event(kind: str, data: dict[str, object]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()


STREAM = b"".join(
    [
        _event(
            "message_start",
            {
                "message": {
                    "id": "msg_1",
                    "usage": {
                        "input_tokens": 120,
                        "output_tokens": 1,
                        "cache_creation_input_tokens": 30,
                        "cache_read_input_tokens": 900,
                    },
                }
            },
        ),
        _event("ping", {}),
        _event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        # A text that mentions the event names must not confuse the meter.
        _event(
            "content_block_delta",
            {"index": 0, "delta": {"type": "text_delta", "text": "message_delta message_stop"}},
        ),
        _event("content_block_stop", {"index": 0}),
        _event("message_delta", {"delta": {"stop_reason": None}, "usage": {"output_tokens": 40}}),
        _event(
            "message_delta",
            {
                "delta": {"stop_reason": "end_turn"},
                "usage": {"output_tokens": 57, "input_tokens": None},
            },
        ),
        _event("message_stop", {}),
    ]
)


@pytest.mark.parametrize("size", [1, 2, 7, 64, len(STREAM)])
def test_usage_is_read_from_a_stream_however_it_is_cut_into_chunks(size: int) -> None:
    meter = StreamMeter()
    stopped_at = [
        offset
        for offset in range(0, len(STREAM), size)
        if meter.feed(STREAM[offset : offset + size])
    ]
    assert meter.usage == Usage(
        input_tokens=120,
        output_tokens=57,  # the last cumulative count, not 1 + 40 + 57
        cache_creation_input_tokens=30,
        cache_read_input_tokens=900,
    )
    assert meter.message_id == "msg_1"
    assert meter.stopped
    assert len(stopped_at) == 1
    assert stopped_at[0] + size >= len(STREAM)  # only the chunk that ends message_stop says so


def test_a_stream_with_crlf_line_ends_and_an_error_event_is_read_too() -> None:
    meter = StreamMeter()
    meter.feed(STREAM.split(b"event: ping")[0].replace(b"\n", b"\r\n"))
    meter.feed(_event("error", {"error": {"type": "overloaded_error", "message": "Overloaded"}}))
    assert meter.usage.input_tokens == 120
    assert meter.error == {"type": "overloaded_error", "message": "Overloaded"}
    assert not meter.stopped


async def test_an_exchange_is_recorded_once_and_totals_reload_equal_to_the_ledger(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "gateway.sqlite3")
    usage = Usage(input_tokens=10, output_tokens=5)
    exchanges = [
        Exchange(f"gw_{i}", "ns/r", f"r-{i % 2}", "claude-opus-4-6", "v", usage, 175 + i)
        for i in range(4)
    ]
    for exchange in exchanges:
        assert await store.record(exchange)
    assert not await store.record(exchanges[0])  # the same exchange again changes nothing
    assert store.spent("ns/r").requests == 4
    store.close()

    reopened = Store(tmp_path / "gateway.sqlite3")
    try:
        assert await reopened.ledger_size() == 4
        assert reopened.spent("ns/r").cost_nano == sum(175 + i for i in range(4))
        assert reopened.spent("ns/r").output_tokens == 20
        assert reopened.spent("ns/r", "r-1").requests == 2
        assert set(reopened.agents_of("ns/r")) == {"r-0", "r-1"}
    finally:
        reopened.close()


async def test_exchanges_recorded_while_a_commit_is_on_disk_go_in_the_next_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path / "gateway.sqlite3")
    batches: list[int] = []
    write = store._write_exchanges

    def counted(batch: list[Exchange]) -> list[bool]:
        batches.append(len(batch))
        return write(batch)

    monkeypatch.setattr(store, "_write_exchanges", counted)
    usage = Usage(input_tokens=3, output_tokens=2)
    recorded = [
        store.record(Exchange(f"gw_{i}", "ns/r", "r-0", "m", "v", usage, 1000 + i))
        for i in range(50)
    ]
    assert store.spent("ns/r").cost_nano == sum(1000 + i for i in range(50))  # counted at once
    assert all(await asyncio.gather(*recorded))
    assert sum(batches) == 50
    assert batches[0] == 1  # the first went alone; the rest queued behind its fsync
    assert len(batches) < 50
    # A stop with writes still queued finishes them before the database closes.
    for i in range(50, 60):
        store.record(Exchange(f"gw_{i}", "ns/r", "r-0", "m", "v", usage, 1000 + i))
    store.close()
    reopened = Store(tmp_path / "gateway.sqlite3")
    try:
        assert await reopened.ledger_size() == 60
        assert reopened.spent("ns/r").cost_nano == sum(1000 + i for i in range(60))
        assert reopened.spent("ns/r", "r-0").requests == 60
    finally:
        reopened.close()


def test_the_rate_limit_refills_one_request_per_minute_share_on_a_clock_of_its_own() -> None:
    limiter = RateLimiter(per_minute=6)  # one request per 10 s once the first minute's are spent
    assert [limiter.wait("w2s-1", now=0.0) for _ in range(6)] == [0.0] * 6
    assert limiter.wait("w2s-1", now=0.0) == pytest.approx(10.0)
    assert retry_after(limiter.wait("w2s-1", now=4.0)) == "6"
    assert limiter.wait("w2s-1", now=10.0) == 0.0
    assert limiter.wait("w2s-1", now=10.0) == pytest.approx(10.0)
    assert limiter.wait("w2s-2", now=10.0) == 0.0  # each agent has a bucket of its own
    # An idle hour refills the bucket to a minute's worth, no more.
    assert [limiter.wait("w2s-1", now=3610.0) for _ in range(7)][-2:] == [0.0, pytest.approx(10.0)]
    assert RateLimiter(per_minute=0).wait("w2s-1", now=0.0) == 0.0


def test_retry_after_is_whole_seconds_and_never_zero() -> None:
    assert [retry_after(s) for s in (0.0, 0.2, 1.0, 29.01, 30.0)] == ["1", "1", "1", "30", "30"]
