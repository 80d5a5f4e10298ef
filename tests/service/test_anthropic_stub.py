"""The local Messages-API stand-in behaves like the real API where aar depends on it: the official
SDK parses its JSON and streams, usage arrives where the API puts it, and bad tool pairing is
refused."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anthropic
import pytest

from aar_devcluster.anthropic_stub import AnthropicStub, Reply, conversation_problem, serving


@pytest.fixture
async def stub() -> AsyncIterator[tuple[AnthropicStub, anthropic.AsyncAnthropic]]:
    server = AnthropicStub(api_key="real-key")
    async with serving(server) as url:
        client = anthropic.AsyncAnthropic(api_key="real-key", base_url=url, max_retries=0)
        yield server, client
        await client.close()


async def test_sdk_reads_a_scripted_tool_call_and_its_usage(
    stub: tuple[AnthropicStub, anthropic.AsyncAnthropic],
) -> None:
    server, client = stub
    server.script(Reply.tool("bash", {"command": "ls"}, text="Let me look."))
    message = await client.messages.create(
        model="claude-opus-4-6", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
    )
    assert message.stop_reason == "tool_use"
    tool_use = message.content[1]
    assert tool_use.type == "tool_use"
    assert tool_use.input == {"command": "ls"}
    assert server.usage_reported["output_tokens"] == message.usage.output_tokens > 1


async def test_a_stream_carries_final_usage_in_message_delta(
    stub: tuple[AnthropicStub, anthropic.AsyncAnthropic],
) -> None:
    server, client = stub
    server.script(Reply.text("a" * 100, usage={"cache_read_input_tokens": 7}))
    async with client.messages.stream(
        model="m", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        chunks = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert "".join(chunks) == "a" * 100
    assert len(chunks) > 1
    assert final.usage.output_tokens == server.usage_reported["output_tokens"] == 25
    assert final.usage.cache_read_input_tokens == 7


async def test_wrong_key_and_scripted_errors_reach_the_sdk_as_api_errors(
    stub: tuple[AnthropicStub, anthropic.AsyncAnthropic],
) -> None:
    server, client = stub
    with pytest.raises(anthropic.AuthenticationError):
        await client.with_options(api_key="agent-credential").messages.create(
            model="m", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        )
    server.script(Reply.failure(529, "overloaded_error", "Overloaded"))
    with pytest.raises(anthropic.APIStatusError) as raised:
        await client.messages.create(
            model="m", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        )
    assert raised.value.status_code == 529
    assert server.messages_answered == 0


def test_unanswered_or_orphaned_tool_results_are_refused() -> None:
    call = {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "x"}]}
    answer = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1"}]}
    user = {"role": "user", "content": "go"}
    assert conversation_problem([user, call, answer]) is None
    assert "without tool_result" in str(conversation_problem([user, call, user]))
    assert "unexpected tool_use_id" in str(conversation_problem([user, answer]))
    assert "first message" in str(conversation_problem([call, answer]))


async def test_as_the_offline_researcher_it_answers_labelled_turns_after_any_scripted_ones() -> (
    None
):
    server = AnthropicStub(researcher=True)
    async with serving(server) as url:
        client = anthropic.AsyncAnthropic(api_key="any", base_url=url, max_retries=0)
        server.script(Reply.text("scripted first"))
        asked = {"role": "user", "content": "Begin."}
        first = await client.messages.create(model="m", max_tokens=10, messages=[asked])
        second = await client.messages.create(
            model="claude-opus-4-6", max_tokens=10, messages=[asked]
        )
        await client.close()
    assert first.content[0].type == "text"
    assert first.content[0].text == "scripted first"
    # The model asked for is the one answered; the text says who really answered.
    assert second.model == "claude-opus-4-6"
    assert second.content[0].type == "text"
    assert second.content[0].text.startswith("[offline researcher] step explore:")
    assert [block.type for block in second.content] == ["text", "tool_use"]
    assert second.usage.input_tokens > 0
    assert second.usage.output_tokens > 1
