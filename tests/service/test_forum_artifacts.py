"""The artifact store: content-addressed, immutable, streamed uploads, per-run authorisation."""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
from collections.abc import AsyncIterator
from typing import Any

from forum_harness import Forum

from aar_forum.api import UPLOAD_BATCH


async def upload(
    forum: Forum, headers: dict[str, str], data: Any, **extra: str
) -> tuple[int, dict[str, Any]]:
    async with forum.http.post(
        f"{forum.url}/api/v1/artifacts", data=data, headers={**headers, **extra}
    ) as response:
        return response.status, await response.json()


def blob_dir(forum: Forum) -> Any:
    return forum.settings.data_dir / "artifacts"


async def test_upload_download_and_metadata(forum: Forum) -> None:
    content = os.urandom(3 * 1024 * 1024 + 17)
    digest = "sha256:" + hashlib.sha256(content).hexdigest()
    status, meta = await upload(
        forum,
        forum.agent("w2s-1"),
        content,
        **{"X-Aar-Description": "student checkpoint, epoch 2", "X-Aar-Filename": "../ckpt 2.pt"},
    )
    assert status == 201
    assert meta["digest"] == digest
    assert meta["size"] == len(content)
    assert meta["author"] == "w2s-1"
    assert meta["run"] == "lab/w2s"
    assert meta["description"] == "student checkpoint, epoch 2"
    assert meta["filename"] == "ckpt_2.pt"  # the last part of a path, in safe characters
    reader = forum.agent("w2s-2")
    async with forum.http.get(f"{forum.url}/api/v1/artifacts/{digest}", headers=reader) as r:
        assert r.status == 200
        assert r.headers["Content-Length"] == str(len(content))
        assert r.headers["Content-Disposition"] == 'attachment; filename="ckpt_2.pt"'
        assert await r.read() == content
    async with forum.http.get(f"{forum.url}/api/v1/artifacts/{digest}/meta", headers=reader) as r:
        assert await r.json() == meta
    async with forum.http.get(f"{forum.url}/api/v1/artifacts?author=w2s-1", headers=reader) as r:
        assert [a["digest"] for a in (await r.json())["artifacts"]] == [digest]
    path = blob_dir(forum) / "sha256" / digest.removeprefix("sha256:")
    assert path.read_bytes() == content
    assert not path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)


async def test_the_same_bytes_uploaded_again_change_nothing(forum: Forum) -> None:
    status, first = await upload(
        forum, forum.agent("w2s-1"), b"weights", **{"X-Aar-Description": "original"}
    )
    assert status == 201
    status, again = await upload(
        forum, forum.agent("w2s-2"), b"weights", **{"X-Aar-Description": "a claim on it"}
    )
    assert status == 200
    assert again == first  # still w2s-1's, with its description


async def test_an_upload_is_streamed_to_disk_not_held_in_memory(forum: Forum) -> None:
    half = asyncio.Event()
    release = asyncio.Event()
    chunk = b"a" * (1024 * 1024)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield chunk
        half.set()
        await release.wait()
        for _ in range(4):
            yield chunk

    sending = asyncio.create_task(upload(forum, forum.agent("w2s-1"), body()))
    await asyncio.wait_for(half.wait(), 10)
    incoming = blob_dir(forum) / "incoming"

    async def written() -> int:
        while True:
            sizes = [path.stat().st_size for path in incoming.iterdir()]
            # All that was sent but the last batch, at most, is in the file.
            if sizes and max(sizes) >= 4 * len(chunk) - UPLOAD_BATCH:
                return max(sizes)
            await asyncio.sleep(0.02)

    # Half the upload is already in a file while the rest has not been sent.
    assert await asyncio.wait_for(written(), 10) >= 3 * len(chunk)
    release.set()
    status, meta = await sending
    assert status == 201
    assert meta["digest"] == "sha256:" + hashlib.sha256(chunk * 8).hexdigest()
    assert list(incoming.iterdir()) == []


async def test_an_artifact_over_the_size_limit_is_refused_and_not_kept(start_forum: Any) -> None:
    forum: Forum = await start_forum(max_artifact_bytes=100_000)
    status, error = await upload(forum, forum.agent("w2s-1"), b"x" * 100_001)
    assert status == 413
    assert "larger than the forum's limit of 100000 bytes" in error["error"]["message"]
    assert "AAR_FORUM_MAX_ARTIFACT_BYTES" in error["error"]["message"]

    async def unsized() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b"y" * 10_000

    # Without a Content-Length the limit is found while streaming: the same 413. The body is
    # smaller than one write batch, so the forum has read all of it when it refuses, and the
    # answer cannot be lost to a connection closed under a client still sending.
    assert UPLOAD_BATCH > 20 * 10_000
    status, error = await upload(forum, forum.agent("w2s-1"), unsized())
    assert status == 413
    assert "larger than the forum's limit of 100000 bytes" in error["error"]["message"]
    assert list((blob_dir(forum) / "sha256").iterdir()) == []
    assert list((blob_dir(forum) / "incoming").iterdir()) == []
    status, _ = await upload(forum, forum.agent("w2s-1"), b"x" * 100_000)
    assert status == 201


async def test_only_the_author_or_an_admin_deletes_and_other_runs_never_see_it(
    forum: Forum,
) -> None:
    owner, colleague = forum.agent("w2s-1"), forum.agent("w2s-2")
    stranger = forum.agent("x-1", "lab/other")
    _, meta = await upload(forum, owner, b"w2s-1's code")
    digest = meta["digest"]
    url = f"{forum.url}/api/v1/artifacts/{digest}"
    async with forum.http.delete(url, headers=colleague) as response:
        assert response.status == 403
        assert "belongs to w2s-1" in (await response.json())["error"]["message"]
    for method in ("GET", "DELETE"):
        async with forum.http.request(method, url, headers=stranger) as response:
            assert response.status == 404
    async with forum.http.get(url, headers=colleague) as response:
        assert await response.read() == b"w2s-1's code"
    async with forum.http.delete(url, headers=owner) as response:
        assert response.status == 200
    async with forum.http.get(url, headers=colleague) as response:
        assert response.status == 404
    assert list((blob_dir(forum) / "sha256").iterdir()) == []

    _, meta = await upload(forum, owner, b"reviewed and removed")
    async with forum.http.delete(
        f"{forum.url}/api/v1/artifacts/{meta['digest']}?run=lab/w2s", headers=forum.admin()
    ) as response:
        assert response.status == 200


async def test_bytes_shared_by_two_runs_stay_until_both_delete(forum: Forum) -> None:
    one, two = forum.agent("a-1", "lab/one"), forum.agent("b-1", "lab/two")
    _, meta = await upload(forum, one, b"the same tarball")
    status, other = await upload(forum, two, b"the same tarball")
    assert status == 201  # new to run two: its own record, its own author
    assert other["author"] == "b-1"
    url = f"{forum.url}/api/v1/artifacts/{meta['digest']}"
    async with forum.http.delete(url, headers=one) as response:
        assert response.status == 200
    async with forum.http.get(url, headers=two) as response:
        assert await response.read() == b"the same tarball"


async def test_parents_and_posts_link_artifacts_of_the_run(forum: Forum) -> None:
    author = forum.agent("w2s-1")
    status, error = await upload(forum, author, b"child", **{"X-Aar-Parent": "sha256:" + "1" * 64})
    assert status == 400
    assert "X-Aar-Parent" in error["error"]["message"]
    _, parent = await upload(forum, author, b"parent")
    status, child = await upload(forum, author, b"child", **{"X-Aar-Parent": parent["digest"]})
    assert status == 201
    assert child["parent"] == parent["digest"]
    post = await forum.post(
        author, kind="result", title="code for 0.8", artifacts=[child["digest"]]
    )
    assert post["artifacts"] == [child["digest"]]
    async with forum.http.get(
        f"{forum.url}/api/v1/artifacts/not-a-digest", headers=author
    ) as response:
        assert response.status == 400
        assert "64 lowercase hex digits" in (await response.json())["error"]["message"]


async def test_a_post_or_upload_in_one_run_cannot_cite_an_artifact_of_another(forum: Forum) -> None:
    _, theirs = await upload(forum, forum.agent("x-1", "lab/other"), b"run other's checkpoint")
    author = forum.agent("w2s-1")
    body = {"kind": "result", "title": "built on theirs", "artifacts": [theirs["digest"]]}
    async with forum.http.post(f"{forum.url}/api/v1/posts", json=body, headers=author) as r:
        assert r.status == 400
        message = (await r.json())["error"]["message"]
        assert f"{theirs['digest']} not found in run lab/w2s" in message
    status, error = await upload(forum, author, b"child", **{"X-Aar-Parent": theirs["digest"]})
    assert status == 400
    assert "not found in run lab/w2s" in error["error"]["message"]
    async with forum.http.get(f"{forum.url}/api/v1/posts", headers=author) as r:
        assert (await r.json())["posts"] == []
