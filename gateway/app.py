"""`aar-gateway`: settings from flags or the environment, the application, and serving it."""

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
from pydantic import BaseModel, ConfigDict, Field

from aar_common.credentials import PUBLIC_KEY_FILE_ENV, CredentialVerifier
from aar_common.web import make_app, serve
from aar_gateway.admin import PROXY_KEY, get_spend, put_budget
from aar_gateway.limits import RateLimiter
from aar_gateway.metrics import Metrics
from aar_gateway.pricing import PricingError, load_table
from aar_gateway.proxy import Proxy
from aar_gateway.store import Store

log = logging.getLogger(__name__)

# The Messages API takes requests up to 32 MB (images and documents inline).
MAX_REQUEST_BYTES = 32 * 1024**2


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    api_key_file: Path = Field(description="the real Anthropic API key; only the gateway has it")
    public_key_file: Path = Field(description="verifies agents' and admins' aar credentials")
    data_dir: Path = Field(description="where gateway.sqlite3 (budgets, ledger, totals) lives")
    upstream: str = "https://api.anthropic.com"
    prices_file: Path | None = Field(default=None, description="a price table over the built-in")
    agent_requests_per_minute: float = Field(default=0, ge=0, description="0: unlimited")
    upstream_timeout: float = Field(
        default=600, gt=0, description="seconds the upstream may stay silent mid-answer"
    )
    connect_timeout: float = Field(default=10, gt=0)


def _read_api_key(path: Path) -> str:
    try:
        key = path.read_text().strip()
    except OSError as error:
        raise SystemExit(
            f"aar-gateway: cannot read the Anthropic API key from {path}: {error.strerror}; "
            "set AAR_ANTHROPIC_API_KEY_FILE (the chart mounts gateway.apiKey.existingSecret)"
        ) from error
    if not key:
        raise SystemExit(f"aar-gateway: the Anthropic API key file {path} is empty")
    return key


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
    metrics = Metrics(registry)
    api_key = _read_api_key(settings.api_key_file)

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
    return app


async def _messages(request: web.Request) -> web.StreamResponse:
    return await request.app[PROXY_KEY].messages(request)


async def _count_tokens(request: web.Request) -> web.StreamResponse:
    return await request.app[PROXY_KEY].count_tokens(request)


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def main(argv: list[str] | None = None) -> None:
    env = os.environ
    parser = argparse.ArgumentParser(
        prog="aar-gateway",
        description="The Anthropic API gateway: holds the real key, meters spend, caps budgets.",
    )
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument(
        "--upstream", default=env.get("AAR_GATEWAY_UPSTREAM", "https://api.anthropic.com")
    )
    parser.add_argument("--api-key-file", default=_env_path("AAR_ANTHROPIC_API_KEY_FILE"))
    parser.add_argument("--public-key-file", default=_env_path(PUBLIC_KEY_FILE_ENV))
    parser.add_argument("--data-dir", default=env.get("AAR_DATA_DIR", "gateway-data"))
    parser.add_argument("--prices-file", default=_env_path("AAR_GATEWAY_PRICES_FILE"))
    parser.add_argument(
        "--agent-requests-per-minute",
        type=float,
        default=float(env.get("AAR_GATEWAY_AGENT_RPM", "0")),
        help="per-agent request rate limit (0: none)",
    )
    parser.add_argument(
        "--upstream-timeout",
        type=float,
        default=float(env.get("AAR_GATEWAY_UPSTREAM_TIMEOUT", "600")),
        help="seconds the upstream may stay silent before the request fails with 504",
    )
    args = parser.parse_args(argv)
    for flag, variable in (
        ("api_key_file", "AAR_ANTHROPIC_API_KEY_FILE"),
        ("public_key_file", PUBLIC_KEY_FILE_ENV),
    ):
        if getattr(args, flag) is None:
            parser.error(f"--{flag.replace('_', '-')} or ${variable} is required")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = Settings(
        api_key_file=args.api_key_file,
        public_key_file=args.public_key_file,
        data_dir=args.data_dir,
        upstream=args.upstream,
        prices_file=args.prices_file,
        agent_requests_per_minute=args.agent_requests_per_minute,
        upstream_timeout=args.upstream_timeout,
    )
    app = build_app(settings)
    asyncio.run(
        serve(
            app,
            host=args.host,
            port=args.port,
            ready=lambda name: log.info("Serving the gateway on %s for %s", name, args.upstream),
        )
    )
