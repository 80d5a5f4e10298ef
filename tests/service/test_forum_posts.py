"""Posting, threads, search and authorisation over the forum's real HTTP API."""

from __future__ import annotations

from typing import Any

from forum_harness import Forum


async def get(forum: Forum, path: str, headers: dict[str, str]) -> tuple[int, Any]:
    async with forum.http.get(f"{forum.url}{path}", headers=headers) as response:
        return response.status, await response.json()


async def test_a_post_names_its_author_and_run_from_the_credential(forum: Forum) -> None:
    post = await forum.post(
        forum.agent("w2s-1"),
        kind="result",
        title="Confidence-weighted loss recovers 0.71 PGR",
        body="Aux loss **0.5**",
        tags=["Loss", "pgr"],
        submissions=[17],
    )
    assert post["author"] == "w2s-1"
    assert post["run"] == "lab/w2s"
    assert post["tags"] == ["loss", "pgr"]
    assert post["submissions"] == ["17"]
    assert post["parent"] is None
    status, listed = await get(forum, "/api/v1/posts", forum.agent("w2s-2"))
    assert status == 200
    assert [p["id"] for p in listed["posts"]] == [post["id"]]


async def test_an_agent_cannot_post_as_another_or_into_another_run(forum: Forum) -> None:
    # Fields naming the author or run are refused outright, not silently ignored.
    body = {"kind": "insight", "title": "t", "author": "w2s-2", "run": "lab/other"}
    async with forum.http.post(
        f"{forum.url}/api/v1/posts", json=body, headers=forum.agent("w2s-1")
    ) as response:
        assert response.status == 400
        message = (await response.json())["error"]["message"]
        assert "author" in message
        assert "run" in message
    forged = forum.agent("w2s-2")["Authorization"][:-4] + "AAAA"
    async with forum.http.post(
        f"{forum.url}/api/v1/posts",
        json={"kind": "insight", "title": "t"},
        headers={"Authorization": forged},
    ) as response:
        assert response.status == 401


async def test_agents_see_only_their_own_run_and_admins_see_every_run(forum: Forum) -> None:
    mine = await forum.post(forum.agent("a-1", "lab/one"), title="in run one")
    theirs = await forum.post(forum.agent("b-1", "lab/two"), title="in run two")
    _, seen = await get(forum, "/api/v1/posts", forum.agent("a-2", "lab/one"))
    assert [p["id"] for p in seen["posts"]] == [mine["id"]]
    status, _ = await get(forum, f"/api/v1/posts/{theirs['id']}", forum.agent("a-2", "lab/one"))
    assert status == 404
    _, everything = await get(forum, "/api/v1/posts", forum.admin())
    assert {p["id"] for p in everything["posts"]} == {mine["id"], theirs["id"]}
    _, one = await get(forum, "/api/v1/posts?run=lab/two", forum.admin())
    assert [p["id"] for p in one["posts"]] == [theirs["id"]]


async def test_replies_form_a_thread_in_the_same_run(forum: Forum) -> None:
    root = await forum.post(forum.agent("w2s-1"), kind="hypothesis", title="Label noise is 30%")
    first = await forum.post(forum.agent("w2s-2"), title="Measured 28%", parent=root["id"])
    second = await forum.post(forum.agent("w2s-1"), title="Thanks", parent=root["id"])
    status, thread = await get(forum, f"/api/v1/posts/{root['id']}", forum.agent("w2s-3"))
    assert status == 200
    assert thread["post"]["title"] == "Label noise is 30%"
    assert [reply["id"] for reply in thread["replies"]] == [first["id"], second["id"]]
    async with forum.http.post(
        f"{forum.url}/api/v1/posts",
        json={"kind": "insight", "title": "hijack", "parent": root["id"]},
        headers=forum.agent("x-1", "lab/other"),
    ) as response:
        assert response.status == 400
        assert "does not exist in run lab/other" in (await response.json())["error"]["message"]


async def test_search_is_full_text_with_filters(forum: Forum) -> None:
    a1, a2 = forum.agent("w2s-1"), forum.agent("w2s-2")
    old = await forum.post(a1, kind="result", title="Ensembling teachers", tags=["ensemble"])
    await forum.post(a2, kind="error", title="OOM when ensembling", body="CUDA out of memory")
    await forum.post(a1, kind="insight", title="Unrelated note", body="tokenizer padding side")
    new = await forum.post(a2, kind="result", title="Bigger ensembles help", tags=["ensemble"])

    async def titles(query: str) -> list[str]:
        status, answer = await get(forum, f"/api/v1/posts?{query}", a1)
        assert status == 200, answer
        return [post["title"] for post in answer["posts"]]

    assert await titles("q=ensembl*") == [
        "Bigger ensembles help",
        "OOM when ensembling",
        "Ensembling teachers",
    ]
    assert await titles("q=memory") == ["OOM when ensembling"]
    assert await titles("q=ensembl*&kind=result") == [
        "Bigger ensembles help",
        "Ensembling teachers",
    ]
    assert await titles("tag=ensemble&author=w2s-1") == ["Ensembling teachers"]
    assert await titles(f"since={old['id']}&kind=result") == ["Bigger ensembles help"]
    assert await titles(f"since={new['created_at']}") == ["Bigger ensembles help"]
    assert await titles("limit=1") == ["Bigger ensembles help"]
    # FTS5 syntax in user input is taken literally, never a 500.
    assert await titles('q=" OR AND (') == []


async def test_bad_queries_and_bodies_say_how_to_fix_them(forum: Forum) -> None:
    a1 = forum.agent("w2s-1")
    for query, expected in [
        ("kind=rumour", "kind must be one of result, hypothesis, insight, error"),
        ("since=yesterday", "since must be an ISO-8601 time or a post id"),
        ("limit=0", "limit must be between 1 and 500"),
        (f"since={10**30}", "since must be between 0 and"),
    ]:
        status, answer = await get(forum, f"/api/v1/posts?{query}", a1)
        assert status == 400
        assert expected in answer["error"]["message"]
    async with forum.http.post(
        f"{forum.url}/api/v1/posts", json={"kind": "result", "title": ""}, headers=a1
    ) as response:
        assert response.status == 400
        assert "title" in (await response.json())["error"]["message"]
    async with forum.http.post(
        f"{forum.url}/api/v1/posts",
        json={"kind": "result", "title": "x", "parent": 10**30},
        headers=a1,
    ) as response:
        assert response.status == 400
        assert "parent" in (await response.json())["error"]["message"]
    async with forum.http.post(
        f"{forum.url}/api/v1/posts",
        json={"kind": "result", "title": "x", "artifacts": ["sha256:" + "0" * 64]},
        headers=a1,
    ) as response:
        assert response.status == 400
        assert "upload them first" in (await response.json())["error"]["message"]
    async with forum.http.post(
        f"{forum.url}/api/v1/posts", json={"kind": "result", "title": "x"}, headers=forum.admin()
    ) as response:
        assert response.status == 400
        assert "?run=namespace/run" in (await response.json())["error"]["message"]


async def test_a_body_over_the_size_limit_is_a_413(start_forum: Any) -> None:
    forum: Forum = await start_forum(max_post_bytes=4096)
    body = {"kind": "result", "title": "big", "body": "x" * 8000}
    async with forum.http.post(
        f"{forum.url}/api/v1/posts", json=body, headers=forum.agent("w2s-1")
    ) as response:
        assert response.status == 413
        assert (await response.json())["error"]["type"] == "request_too_large"


async def test_an_agent_over_its_rate_limit_gets_429_with_retry_after(start_forum: Any) -> None:
    forum: Forum = await start_forum(writes_per_minute=6, write_burst=3)
    greedy, other = forum.agent("w2s-1"), forum.agent("w2s-2")
    for index in range(3):
        await forum.post(greedy, title=f"post {index}")
    async with forum.http.post(
        f"{forum.url}/api/v1/posts", json={"kind": "insight", "title": "one more"}, headers=greedy
    ) as response:
        assert response.status == 429
        assert int(response.headers["retry-after"]) >= 1
        assert "rate limit of 6 writes per minute" in (await response.json())["error"]["message"]
    # The limit is per agent: another agent of the same run is not held back.
    await forum.post(other, title="unaffected")


async def test_metrics_count_posts_searches_and_subscribers(forum: Forum) -> None:
    await forum.post(forum.agent("w2s-1"), kind="result", title="counted")
    await get(forum, "/api/v1/posts?q=counted", forum.agent("w2s-1"))
    async with forum.http.get(f"{forum.url}/api/v1/stream", headers=forum.agent("w2s-1")) as stream:
        await stream.content.readuntil(b"\n\n")
        async with forum.http.get(f"{forum.metrics_url}/metrics") as response:
            text = await response.text()
    assert 'aar_forum_posts_total{kind="result"} 1.0' in text
    assert "aar_forum_searches_total 1.0" in text
    assert "aar_forum_stream_subscribers 1.0" in text
