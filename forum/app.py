"""`aar-forum`: build the forum's aiohttp application and serve it."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from aar_common.credentials import CredentialVerifier
from aar_common.web import make_app, serve
from aar_forum import api, ui
from aar_forum.blobs import BlobStore, VolumeBlobStore
from aar_forum.settings import Settings
from aar_forum.state import FORUM_KEY, Forum, Metrics
from aar_forum.store import Store

log = logging.getLogger("aar_forum")
# Comment lines keep idle streams open through proxies and load balancers.
HEARTBEAT_S = 15.0


def build_app(settings: Settings, blobs: BlobStore | None = None) -> web.Application:
    """The forum: the API, the web UI, /healthz and /metrics, over `settings.data_dir`."""
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
    api.add_routes(app)
    ui.add_routes(app)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="aar-forum", description="aar forum: findings, artifacts and the web UI"
    )
    parser.add_argument("--host", default=os.environ.get("AAR_FORUM_HOST", "0.0.0.0"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("AAR_FORUM_PORT", "8080")))
    parser.add_argument("--unix-socket", type=Path, help="listen on this socket instead of TCP")
    parser.add_argument("--data-dir", type=Path, help="default: $AAR_DATA_DIR or ./forum-data")
    parser.add_argument(
        "--public-key-file", type=Path, help="default: $AAR_CREDENTIAL_PUBLIC_KEY_FILE"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = Settings.from_env(data_dir=args.data_dir, public_key_file=args.public_key_file)
    app = build_app(settings)
    asyncio.run(
        serve(
            app,
            host=args.host,
            port=args.port,
            unix_socket=args.unix_socket,
            # One parseable line, so tests and `aar up` know when and where it listens.
            ready=lambda where: print(f"aar-forum listening on {where}", flush=True),
        )
    )


if __name__ == "__main__":
    main()
