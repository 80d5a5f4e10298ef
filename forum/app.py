"""The forum's aiohttp application: `build_app` and its routes, the agents' API (`api.py`) and
the humans' web UI (`ui.py`: sign-in, findings; `console.py`: runs, review)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from aar_common.credentials import CredentialVerifier
from aar_common.web import make_app
from aar_forum import api, console, ui
from aar_forum.blobs import BlobStore, VolumeBlobStore
from aar_forum.forum import FORUM_KEY, Forum
from aar_forum.metrics import Metrics
from aar_forum.settings import Settings
from aar_forum.store import Store

log = logging.getLogger("aar_forum")
# Comment lines keep idle streams open through proxies and load balancers.
HEARTBEAT_S = 15.0


def build_app(settings: Settings, blobs: BlobStore | None = None) -> web.Application:
    """The forum: the API, the web UI and /healthz, over `settings.data_dir`; its metrics
    registry is `serve`d on the metrics port, apart from these."""
    registry = CollectorRegistry()
    verifier = CredentialVerifier.from_file(settings.public_key_file)
    app = make_app(verifier, registry, client_max_size=settings.max_post_bytes)
    store = Store(settings.data_dir / "forum.db")
    state = Forum(
        settings=settings,
        store=store,
        blobs=blobs or VolumeBlobStore(settings.data_dir / "artifacts"),
        metrics=Metrics(registry),
    )
    app[FORUM_KEY] = state

    async def heartbeats() -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            state.hub.heartbeat()

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        state.http = aiohttp.ClientSession()
        beating = asyncio.create_task(heartbeats())
        yield
        beating.cancel()
        await state.http.close()
        await asyncio.to_thread(store.close)

    async def end_streams(_: web.Application) -> None:
        # Open streams would otherwise hold shutdown until their heartbeat.
        state.hub.close_all()

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(end_streams)
    # The routes: the agents' API under /api/v1 and the humans' web UI, each beside its handlers.
    api.add_routes(app)
    ui.add_routes(app)
    console.add_routes(app)
    return app
