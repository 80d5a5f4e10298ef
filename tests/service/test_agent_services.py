"""The agent's forum, scorer and artifact tools against the real `aar-forum` and `aar-scorer`
processes, and the last note a spent budget leaves on the forum."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Callable
from typing import Any

from agent_env import ISSUER, NAMESPACE, RUN, TASK_TRUTH, Service

from aar_agent.config import Settings
from aar_agent.loop import Agent, Outcome
from aar_devcluster.anthropic_stub import AnthropicStub, Reply

RUN_KEY = f"{NAMESPACE}/{RUN}"

Step = Callable[[list[str]], Reply]


def drive(stub: AnthropicStub, steps: list[Step]) -> list[str]:
    """Script the model as a function of the tool results so far (ids and digests are only
    known once the services answer); returns the list those results are collected in."""
    results: list[str] = []
    queue = list(steps)

    def respond(body: dict[str, Any]) -> Reply:
        content = body["messages"][-1]["content"]
        if isinstance(content, list):
            results.extend(b["content"] for b in content if b.get("type") == "tool_result")
        return queue.pop(0)(results) if queue else Reply.text("Done.")

    stub.responder = respond
    return results


def with_services(make_settings: Callable[..., Settings], forum: Service, scorer: Service) -> Agent:
    return Agent(make_settings(forum_url=forum.url, scorer_url=scorer.url))


def post_as_other_agent(forum: Service, title: str) -> None:
    credential = ISSUER.mint_agent(NAMESPACE, RUN, "w2s-chat-1")
    request = urllib.request.Request(
        forum.url + "/api/v1/posts",
        method="POST",
        data=json.dumps({"kind": "hypothesis", "title": title, "body": "worth a try"}).encode(),
        headers={"Authorization": f"Bearer {credential}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 201


async def test_posts_submissions_and_artifacts_reach_the_real_services(
    stub: AnthropicStub,
    make_settings: Callable[..., Settings],
    services: tuple[Service, Service],
) -> None:
    forum, scorer = services
    post_as_other_agent(forum, "Reweighting by teacher confidence")
    # 80% right: the first 40 answers are flipped.
    predictions = [("B" if t == "A" else "A") if i < 40 else t for i, t in enumerate(TASK_TRUTH)]

    def digest(results: list[str]) -> str:
        found = re.search(r"sha256:[0-9a-f]{64}", results[2])
        assert found, results[2]
        return found.group(0)

    def submission(results: list[str]) -> int:
        return int(json.loads(results[5])["id"])

    results = drive(
        stub,
        [
            lambda r: Reply.tool("forum_new", {}),
            lambda r: Reply.tool("write_file", {"path": "code/train.py", "content": "print(1)\n"}),
            lambda r: Reply.tool(
                "artifact_publish", {"path": "code", "description": "reweighting, seeds 1-3"}
            ),
            lambda r: Reply.tool(
                "write_file", {"path": "preds.json", "content": json.dumps(predictions)}
            ),
            lambda r: Reply.tool("scorer_task", {}),
            lambda r: Reply.tool(
                "scorer_submit",
                {
                    "predictions_path": "preds.json",
                    "method": "teacher-confidence reweighting, 3 seeds",
                    "artifact": digest(r),
                },
            ),
            lambda r: Reply.tool(
                "forum_post",
                {
                    "kind": "result",
                    "title": "Reweighting recovers most of the gap",
                    "body": "PGR 0.6 +- 0.05 over 3 seeds",
                    "tags": ["reweighting"],
                    "submissions": [submission(r)],
                    "artifacts": [digest(r)],
                },
            ),
            lambda r: Reply.tool("forum_search", {"q": "recovers"}),
            lambda r: Reply.tool("forum_read", {"id": int(r[6].split("#")[1].split(":")[0])}),
            lambda r: Reply.tool("scorer_leaderboard", {}),
            lambda r: Reply.tool(
                "artifact_fetch", {"digest": digest(r), "destination": "fetched", "extract": True}
            ),
            lambda r: Reply.tool("artifact_list", {}),
            lambda r: Reply.tool("forum_new", {}),
        ],
    )
    agent = with_services(make_settings, forum, scorer)
    try:
        outcome = await agent.run()
    finally:
        await agent.close()

    assert outcome is Outcome.DONE
    assert not any(b.get("is_error") for r in stub.requests for b in _results(r)), results
    new, _, published, _, task, submitted, _, found, thread, board, fetched, listed, again = results
    assert "Reweighting by teacher confidence by w2s-chat-1" in new
    assert json.loads(task)["labels"] == ["A", "B"]
    assert json.loads(submitted)["status"] == "accepted"
    assert "Reweighting recovers most of the gap" in found
    assert "PGR 0.6 +- 0.05 over 3 seeds" in thread
    assert str(json.loads(submitted)["id"]) in board
    assert digest(results) in listed
    assert again == "nothing new on the forum"
    # The forum cursor is saved with the state, so a restarted agent is not shown old news.
    assert agent.state.forum_cursor == str(posts_seen_last(forum))
    # What the services themselves hold, seen as an admin.
    posts = forum.call("GET", f"/api/v1/posts?run={RUN_KEY}&author=w2s-chat-0")["posts"]
    assert len(posts) == 1
    assert posts[0]["kind"] == "result"
    assert posts[0]["submissions"] == [str(json.loads(submitted)["id"])]
    assert posts[0]["artifacts"] == [digest(results)]
    kept = scorer.call("GET", f"/api/v1/submissions/{json.loads(submitted)['id']}")
    assert "teacher-confidence reweighting" in json.dumps(kept)
    assert digest(results) in json.dumps(kept)
    meta = forum.call("GET", f"/api/v1/artifacts/{digest(results)}/meta?run={RUN_KEY}")
    assert meta["filename"] == "code.tar.gz"
    assert meta["author"] == "w2s-chat-0"
    workspace = agent.settings.workspace
    assert (workspace / "fetched" / "code" / "train.py").read_text() == "print(1)\n"
    assert "extracted" in fetched
    assert published.startswith("published code.tar.gz as sha256:")


def posts_seen_last(forum: Service) -> int:
    newest: int = forum.call("GET", f"/api/v1/posts?run={RUN_KEY}&limit=1")["posts"][0]["id"]
    return newest


def _results(request: dict[str, Any]) -> list[dict[str, Any]]:
    content = request["body"]["messages"][-1]["content"]
    return [b for b in content if isinstance(b, dict) and b.get("type") == "tool_result"]


async def test_a_spent_budget_ends_the_run_with_a_last_note_on_the_forum(
    stub: AnthropicStub,
    make_settings: Callable[..., Settings],
    services: tuple[Service, Service],
) -> None:
    forum, scorer = services
    spent = "agent budget research/w2s-chat/w2s-chat-0 of $5.00 is spent ($5.02)"
    stub.script(
        Reply.tool("notebook_write", {"title": "lr sweep", "entry": "lr 1e-5 best over 3 seeds"}),
        Reply.failure(402, "billing_error", spent),
    )
    agent = with_services(make_settings, forum, scorer)
    try:
        assert await agent.run() is Outcome.BUDGET_EXHAUSTED
    finally:
        await agent.close()
    # The SDK does not retry a 402: one refused request, then the loop ended.
    assert len(stub.requests) == 2
    posts = forum.call("GET", f"/api/v1/posts?run={RUN_KEY}&author=w2s-chat-0")["posts"]
    assert len(posts) == 1
    note = posts[0]
    assert note["kind"] == "error"
    assert note["title"] == "w2s-chat-0 stopped: budget spent"
    assert spent in note["body"]
    assert "lr 1e-5 best over 3 seeds" in note["body"]

    # A restart asks once more (the budget may have been raised) but does not post again.
    stub.script(Reply.failure(402, "billing_error", spent))
    again = with_services(make_settings, forum, scorer)
    try:
        assert await again.run() is Outcome.BUDGET_EXHAUSTED
    finally:
        await again.close()
    assert len(forum.call("GET", f"/api/v1/posts?run={RUN_KEY}&author=w2s-chat-0")["posts"]) == 1


async def test_the_scorers_refusals_reach_the_model_in_its_own_words(
    stub: AnthropicStub,
    make_settings: Callable[..., Settings],
    services: tuple[Service, Service],
) -> None:
    forum, scorer = services
    honest = [("B" if t == "A" else "A") if i < 60 else t for i, t in enumerate(TASK_TRUTH)]
    probe = ["B" if honest[0] == "A" else "A", *honest[1:]]  # one answer flipped
    stub.script(
        Reply.tool("write_file", {"path": "honest.json", "content": json.dumps(honest)}),
        Reply.tool("write_file", {"path": "probe.json", "content": json.dumps(probe)}),
        Reply.tool("write_file", {"path": "short.txt", "content": "A\nB\n"}),
        Reply.tool("notebook_write", {"title": "baseline", "entry": "expect about 0.6"}),
        Reply.tool("scorer_submit", {"predictions_path": "honest.json", "method": "baseline"}),
        Reply.tool("scorer_submit", {"predictions_path": "probe.json", "method": "flip one"}),
        Reply.tool("scorer_submit", {"predictions_path": "short.txt", "method": "two answers"}),
        Reply.text("Done."),
        Reply.text("Finished."),
    )
    agent = with_services(make_settings, forum, scorer)
    try:
        assert await agent.run() is Outcome.DONE
    finally:
        await agent.close()
    first, second, third = (_results(r)[0] for r in stub.requests[5:8])
    assert json.loads(first["content"])["status"] == "accepted"
    # Its reviewers see the notebook as it stood when it submitted.
    stored = scorer.call("GET", f"/api/v1/submissions/{json.loads(first['content'])['id']}")
    assert stored["notebook"].endswith(": baseline\n\nexpect about 0.6")
    # A probe is the scorer's verdict, not a failed call: the model reads why it was refused.
    refused = json.loads(second["content"])
    assert refused["status"] == "refused"
    assert refused["feedback"]["message"].startswith("refused: ")
    assert "is_error" not in second
    # A malformed submission is an error, in the scorer's words.
    assert third["is_error"] is True
    assert third["content"].startswith("scorer answered 400 to POST /api/v1/submissions: ")
    assert "predictions" in third["content"]
