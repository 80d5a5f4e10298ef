"""The gateway's application: `build_app` and its route table (the handlers live in proxy.py and
admin.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from aar_common.credentials import PUBLIC_KEY_FILE_ENV, CredentialVerifier
from aar_common.web import make_app
from aar_gateway.admin import PROXY_KEY, get_model, get_spend, get_spend_history, put_budget
from aar_gateway.limits import RateLimiter
from aar_gateway.metrics import Metrics
from aar_gateway.pricing import PricingError, load_table
from aar_gateway.proxy import Proxy
from aar_gateway.settings import Settings, read_api_key
from aar_gateway.store import Store

# The Messages API takes requests up to 32 MB (images and documents inline).
MAX_REQUEST_BYTES = 32 * 1024**2


def build_app(settings: Settings) -> web.Application:
    """The gateway's application; its database opens on startup and closes on cleanup."""
    try:
        prices = load_table(settings.prices_file)
    except PricingError as error:
        raise SystemExit(f"aar-gateway: {error}") from error
    try:
        verifier = CredentialVerifier.from_file(settings.public_key_file)
    except OSError as error:
        raise SystemExit(
            f"aar-gateway: cannot read the credential public key {settings.public_key_file}: "
            f"{error.strerror}; set {PUBLIC_KEY_FILE_ENV} (the chart mounts the ConfigMap "
            "aar-credential-public-key)"
        ) from error
    registry = CollectorRegistry()
    app = make_app(verifier, registry, client_max_size=MAX_REQUEST_BYTES)
    metrics = Metrics(registry, per_agent=settings.per_agent_metrics)
    api_key = read_api_key(settings.api_key_file)

    async def lifespan(app: web.Application) -> AsyncIterator[None]:
        store = Store(settings.data_dir / "gateway.sqlite3")
        proxy = Proxy(
            upstream=settings.upstream,
            api_key=api_key,
            store=store,
            prices=prices,
            metrics=metrics,
            limiter=RateLimiter(settings.agent_requests_per_minute),
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=settings.connect_timeout,
                sock_read=settings.upstream_timeout,
            ),
        )
        app[PROXY_KEY] = proxy
        for run in store.budgets:
            proxy.refresh_remaining(run)
        await proxy.start()
        yield
        await proxy.close()
        store.close()

    app.cleanup_ctx.append(lifespan)
    app.router.add_post("/v1/messages", _messages)
    app.router.add_post("/v1/messages/count_tokens", _count_tokens)
    app.router.add_put("/api/v1/budgets/{namespace}/{run}", put_budget)
    app.router.add_get("/api/v1/spend/{namespace}/{run}", get_spend)
    app.router.add_get("/api/v1/spend/{namespace}/{run}/history", get_spend_history)
    app.router.add_get("/api/v1/models/{model}", get_model)
    return app


async def _messages(request: web.Request) -> web.StreamResponse:
    return await request.app[PROXY_KEY].messages(request)


async def _count_tokens(request: web.Request) -> web.StreamResponse:
    return await request.app[PROXY_KEY].count_tokens(request)
