"""`/api/v1`: posts, search, the live stream and artifacts, for agents and admins."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import PurePosixPath

from aiohttp import web

from aar_common.credentials import Role
from aar_common.web import fail, json_response, read_model, whole_number
from aar_forum.blobs import CHUNK, TooLargeError
from aar_forum.forum import forum, view_run, viewer
from aar_forum.models import DIGEST_RE, MAX_ID, Artifact, Kind, PostIn
from aar_forum.store import NotFoundError, PostFilter, normalise_time, now_iso
from aar_forum.stream import sse_frame

MAX_LIMIT = 500
REPLAY_BATCH = 500
UPLOAD_BATCH = 1024 * 1024


def post_filter(request: web.Request, run: str | None) -> PostFilter:
    """Parse the query of `GET /api/v1/posts` (shared with the web UI's feed)."""
    query = request.query
    kind = query.get("kind") or None
    if kind is not None and kind not in Kind.__members__.values():
        fail(400, f"kind must be one of {', '.join(k.value for k in Kind)} (got {kind!r})")
    since_id = since_time = None
    if since := query.get("since", "").strip():
        if since.isdigit():
            since_id = whole_number(since, "since", 0, MAX_ID)
        else:
            try:
                since_time = normalise_time(since)
            except ValueError:
                fail(400, f"since must be an ISO-8601 time or a post id (got {since!r})")
    return PostFilter(
        run=run,
        q=query.get("q", "").strip(),
        kind=Kind(kind) if kind else None,
        tag=query.get("tag") or None,
        author=query.get("author") or None,
        since_id=since_id,
        since_time=since_time,
        limit=whole_number(query.get("limit", "50"), "limit", 1, MAX_LIMIT),
    )


async def create_post(request: web.Request) -> web.Response:
    state = forum(request)
    principal = viewer(request)
    run = view_run(request, principal, write=True)
    assert run is not None
    state.limit(principal, "write")
    body = await read_model(request, PostIn)
    try:
        post = await state.store.call(state.store.add_post, run, principal.name, body)
    except ValueError as error:
        fail(400, str(error))
    state.metrics.posts.labels(post.kind.value).inc()
    state.hub.publish(post)
    return json_response(post, status=201)


async def list_posts(request: web.Request) -> web.Response:
    state = forum(request)
    principal = viewer(request)
    state.limit(principal, "read")
    where = post_filter(request, view_run(request, principal))
    started = time.perf_counter()
    posts = await state.store.call(state.store.search, where)
    state.metrics.search_seconds.observe(time.perf_counter() - started)
    state.metrics.searches.inc()
    return json_response({"posts": [post.model_dump() for post in posts]})


async def get_post(request: web.Request) -> web.Response:
    state = forum(request)
    principal = viewer(request)
    state.limit(principal, "read")
    post_id = whole_number(request.match_info["id"], "post id", 1, MAX_ID)
    try:
        post = await state.store.call(state.store.get_post, post_id, view_run(request, principal))
    except NotFoundError as error:
        fail(404, str(error))
    replies = await state.store.call(state.store.replies, post_id)
    return json_response(
        {"post": post.model_dump(), "replies": [reply.model_dump() for reply in replies]}
    )


async def stream(request: web.Request) -> web.StreamResponse:
    """New posts as server-sent events; with `Last-Event-ID`, first every post missed since."""
    state = forum(request)
    principal = viewer(request, allow_cookie=True)
    run = view_run(request, principal)
    last_header = request.headers.get("Last-Event-ID", "").strip()
    sent: int | None = None
    if last_header:
        sent = whole_number(last_header, "Last-Event-ID", 0, MAX_ID)
    owner = f"{principal.run_key}/{principal.agent}" if principal.role is Role.AGENT else ""
    limit = state.settings.streams_per_agent
    if owner and state.hub.held_by(owner) >= limit:
        state.metrics.rate_limited.labels("stream").inc()
        fail(
            429,
            f"agent {principal.agent} already has {limit} streams open, the most allowed; "
            "close one (one stream is all an agent needs)",
            headers={"retry-after": "5"},
        )
    # Subscribe before reading the backlog, so no post falls between the two.
    subscriber = state.hub.subscribe(run, owner, lambda: _connected(request))
    state.metrics.subscribers.inc()
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    try:
        await response.prepare(request)
        await response.write(b"retry: 1000\n: connected\n\n")
        while sent is not None:
            backlog = await state.store.call(state.store.posts_after, sent, run, REPLAY_BATCH)
            for post in backlog:
                await response.write(sse_frame(post))
                sent = post.id
            if len(backlog) < REPLAY_BATCH:
                break
        # Live posts already sent by the replay are skipped; no others, whatever their order.
        replayed = sent
        delivery = state.metrics.delivery_seconds
        while not subscriber.closed:
            await subscriber.wake.wait()
            subscriber.wake.clear()
            wrote = False
            while subscriber.frames:
                post_id, frame, published = subscriber.frames.popleft()
                if replayed is None or post_id > replayed:
                    await response.write(frame)
                    delivery.observe(time.monotonic() - published)
                    wrote = True
            if subscriber.heartbeat_due:
                subscriber.heartbeat_due = False
                if not wrote:
                    await response.write(b": keepalive\n\n")
            if subscriber.overflowed:
                break  # the client reconnects with Last-Event-ID and catches up
    except (ConnectionResetError, ConnectionError):
        pass
    finally:
        state.hub.unsubscribe(subscriber)
        state.metrics.subscribers.dec()
    return response


def _connected(request: web.Request) -> bool:
    transport = request.transport
    return transport is not None and not transport.is_closing()


# Artifacts


def _digest(text: str) -> str:
    digest = text if text.startswith("sha256:") else f"sha256:{text}"
    if not DIGEST_RE.match(digest):
        fail(400, f"an artifact digest is 'sha256:' and 64 lowercase hex digits (got {text!r})")
    return digest


async def upload_artifact(request: web.Request) -> web.Response:
    state = forum(request)
    principal = viewer(request)
    run = view_run(request, principal, write=True)
    assert run is not None
    state.limit(principal, "write")
    limit = state.settings.max_artifact_bytes
    too_large = (
        f"artifact is larger than the forum's limit of {limit} bytes; upload a smaller file "
        "(for example without optimizer state) or raise AAR_FORUM_MAX_ARTIFACT_BYTES"
    )
    if request.content_length is not None and request.content_length > limit:
        state.metrics.artifacts.labels("too_large").inc()
        fail(413, too_large)
    description = request.headers.get("X-Aar-Description", "")
    if len(description) > 2000:
        fail(400, "X-Aar-Description must be at most 2000 characters")
    # Only the last path part, in characters that are safe in a Content-Disposition header.
    filename = re.sub(
        r"[^A-Za-z0-9._+-]", "_", PurePosixPath(request.headers.get("X-Aar-Filename", "")).name
    )[:255]
    parent = request.headers.get("X-Aar-Parent") or None
    if parent is not None:
        parent = _digest(parent)
        try:
            await state.store.call(state.store.get_artifact, parent, run)
        except NotFoundError:
            fail(400, f"X-Aar-Parent: artifact {parent} not found in run {run}; upload it first")
    upload = state.blobs.upload(limit)
    try:
        # Hashing and writing happen off the event loop, a megabyte at a time, so a large
        # upload never stalls the stream or other requests (not even under write-back).
        pending = bytearray()
        async for chunk in request.content.iter_chunked(CHUNK):
            pending += chunk
            if len(pending) >= UPLOAD_BATCH:
                await asyncio.to_thread(upload.write, bytes(pending))
                pending.clear()
        await asyncio.to_thread(upload.write, bytes(pending))
    except TooLargeError:
        upload.abort()
        state.metrics.artifacts.labels("too_large").inc()
        fail(413, too_large)
    except BaseException:
        upload.abort()
        raise
    async with state.artifact_lock:
        digest = await upload.commit()
        record = Artifact(
            digest=digest,
            run=run,
            size=upload.size,
            author=principal.name,
            parent=parent,
            description=description,
            filename=filename,
            created_at=now_iso(),
        )
        artifact, created = await state.store.call(state.store.add_artifact, record)
    state.metrics.artifacts.labels("created" if created else "existing").inc()
    if created:
        state.metrics.artifact_bytes.inc(artifact.size)
    return json_response(artifact, status=201 if created else 200)


async def _find_artifact(request: web.Request, *, deleting: bool = False) -> Artifact:
    state = forum(request)
    # The web UI's artifact links are plain GETs: they may use its cookie.
    # The operator's verifier reads the artifacts it reproduces; it never deletes one.
    principal = viewer(request, allow_cookie=not deleting, verifier=not deleting)
    state.limit(principal, "read")
    digest = _digest(request.match_info["digest"])
    # An admin deletes from one named run: the same bytes may belong to several.
    run = view_run(request, principal, write=deleting)
    try:
        return await state.store.call(state.store.get_artifact, digest, run)
    except NotFoundError as error:
        fail(404, str(error))


async def artifact_meta(request: web.Request) -> web.Response:
    return json_response(await _find_artifact(request))


async def download_artifact(request: web.Request) -> web.StreamResponse:
    artifact = await _find_artifact(request)
    response = web.StreamResponse(
        headers={
            "Content-Type": "application/octet-stream",
            "ETag": f'"{artifact.digest}"',
            "Cache-Control": "private, max-age=31536000, immutable",
        }
    )
    response.content_length = artifact.size
    if artifact.filename:
        response.headers["Content-Disposition"] = f'attachment; filename="{artifact.filename}"'
    await response.prepare(request)
    async for chunk in forum(request).blobs.read(artifact.digest):
        await response.write(chunk)
    await response.write_eof()
    return response


async def list_artifacts(request: web.Request) -> web.Response:
    state = forum(request)
    principal = viewer(request)
    state.limit(principal, "read")
    limit = whole_number(request.query.get("limit", "100"), "limit", 1, MAX_LIMIT)
    artifacts = await state.store.call(
        state.store.list_artifacts,
        view_run(request, principal),
        request.query.get("author") or None,
        limit,
    )
    return json_response({"artifacts": [artifact.model_dump() for artifact in artifacts]})


async def delete_artifact(request: web.Request) -> web.Response:
    state = forum(request)
    principal = viewer(request)
    state.limit(principal, "write")
    artifact = await _find_artifact(request, deleting=True)
    if principal.role is not Role.ADMIN and artifact.author != principal.name:
        fail(
            403,
            f"artifact {artifact.digest} belongs to {artifact.author}; only its author or an "
            "admin can delete it",
        )
    async with state.artifact_lock:
        orphaned = await state.store.call(
            state.store.delete_artifact, artifact.run, artifact.digest
        )
        if orphaned:
            await state.blobs.delete(artifact.digest)
    return json_response({"deleted": artifact.digest, "run": artifact.run})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/v1/posts", create_post)
    app.router.add_get("/api/v1/posts", list_posts)
    app.router.add_get("/api/v1/posts/{id}", get_post)
    app.router.add_get("/api/v1/stream", stream)
    app.router.add_post("/api/v1/artifacts", upload_artifact)
    app.router.add_get("/api/v1/artifacts", list_artifacts)
    app.router.add_get("/api/v1/artifacts/{digest}", download_artifact)
    app.router.add_get("/api/v1/artifacts/{digest}/meta", artifact_meta)
    app.router.add_delete("/api/v1/artifacts/{digest}", delete_artifact)
