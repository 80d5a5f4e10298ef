"""A request's worst-case cost, the holds of requests in flight, and which model names are priced:
the gateway's budget arithmetic, without HTTP or a database."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from aar_gateway.pricing import PricingError, builtin_table, load_table
from aar_gateway.reservations import (
    ANTHROPIC_TOOL_TOKENS,
    TOOL_PROMPT_TOKENS,
    Reservations,
    input_bound,
    needs_count,
    unbounded_by,
)
from aar_gateway.store import RUN_ROW


def raw(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


def test_the_worst_case_bills_every_input_token_at_the_dearest_rate_and_all_of_max_tokens() -> None:
    # claude-opus-4-6 in nano-dollars a token: input 5000, 1 h cache write 10000, output 25000.
    price = builtin_table().price("claude-opus-4-6")
    assert price.worst_case_nano(100, 1000) == 100 * 10_000 + 1000 * 25_000
    # claude-3-haiku: input 250, 5 min write 300, 1 h write 500 (the dearest), output 1250.
    assert builtin_table().price("claude-3-haiku").worst_case_nano(10, 0) == 10 * 500


def test_the_input_bound_is_the_bodys_bytes_plus_what_the_api_adds_for_tools() -> None:
    text = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "héllo"}]}
    assert input_bound(len(raw(text)), text) == len(raw(text))
    custom = {**text, "tools": [{"name": "search", "input_schema": {"type": "object"}}]}
    assert input_bound(100, custom) == 100 + TOOL_PROMPT_TOKENS
    builtin = {**text, "tools": [{"type": "bash_20250124", "name": "bash"}, *custom["tools"]]}
    assert input_bound(100, builtin) == 100 + TOOL_PROMPT_TOKENS + ANTHROPIC_TOOL_TOKENS
    # Counted upstream (images, documents): the count and a tenth more, rounded up.
    assert input_bound(100, text, counted=1001) == 1001 + 101


@pytest.mark.parametrize(
    ("content", "counted"),
    [
        ("a picture of an image", False),  # the word, not a block
        ([{"type": "text", "text": '"image"'}], False),
        ([{"type": "image", "source": {"type": "base64", "data": "AAAA"}}], True),
        (
            [
                {
                    "type": "tool_result",
                    "tool_use_id": "t",
                    "content": [{"type": "document", "source": {"type": "file", "file_id": "f"}}],
                }
            ],
            True,
        ),
    ],
)
def test_images_and_documents_anywhere_in_the_body_are_counted_upstream(
    content: Any, counted: bool
) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": content}]}
    assert needs_count(raw(body), body) is counted


def test_a_type_spelled_with_json_escapes_is_still_found() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": [{"type": "image"}]}]}
    escaped = raw(body).replace(b'"image"', b'"\\u0069mage"')
    assert json.loads(escaped) == body
    assert needs_count(escaped, body)


def test_server_tools_are_named_as_what_makes_a_cost_unbounded() -> None:
    assert unbounded_by({"tools": [{"name": "mine", "input_schema": {}}]}) is None
    assert unbounded_by({"tools": [{"type": "text_editor_20250728", "name": "e"}]}) is None
    assert "'web_search_20250305'" in str(
        unbounded_by({"tools": [{"type": "web_search_20250305", "name": "web_search"}]})
    )
    assert "'code_execution_20250825'" in str(
        unbounded_by({"tools": [{"type": "code_execution_20250825", "name": "x"}]})
    )
    assert "mcp_servers" in str(unbounded_by({"mcp_servers": [{"url": "https://x"}]}))


def test_holds_add_up_per_agent_and_per_run_and_are_given_back_once() -> None:
    reservations = Reservations()
    first = reservations.hold("ns/r", "a", 700)
    second = reservations.hold("ns/r", "b", 300)
    assert reservations.held("ns/r", "a") == 700
    assert (reservations.held("ns/r"), reservations.in_flight("ns/r")) == (1000, 2)
    assert reservations.release(first)
    assert not reservations.release(first)  # the second release of a hold changes nothing
    assert reservations.held("ns/r", RUN_ROW) == 300
    assert reservations.held("ns/r", "a") == 0
    reservations.release(second)
    assert (reservations.held("ns/r"), reservations.in_flight("ns/r")) == (0, 0)


def test_a_dated_name_is_priced_only_when_listed_never_by_dropping_its_date() -> None:
    table = builtin_table()
    assert table.price("claude-haiku-4-5-20251001") == table.price("claude-haiku-4-5")
    assert table.price("claude-3-7-sonnet-latest") == table.price("claude-3-7-sonnet")
    for unlisted in ("claude-opus-4-6-20260101", "claude-opus-4-6-latest", "claude-opus-4-6x"):
        with pytest.raises(PricingError, match="has no price"):
            table.price(unlisted)


def test_a_configured_table_adds_aliases_that_follow_its_prices(tmp_path: Path) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text(
        "version: v\n"
        "aliases: {claude-opus-4-6-20260101: claude-opus-4-6}\n"
        "models: {claude-opus-4-6: {input: 4, output: 20, cache_write: 5, cache_read: 0.4}}\n"
    )
    table = load_table(path)
    assert table.price("claude-opus-4-6-20260101").input == 4
    assert table.price("claude-3-haiku-20240307") == builtin_table().price("claude-3-haiku")
    path.write_text("version: v\naliases: {claude-x-20260101: claude-x}\n")
    with pytest.raises(PricingError, match="claude-x-20260101 -> claude-x"):
        load_table(path)
