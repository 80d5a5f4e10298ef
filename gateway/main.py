"""`aar-gateway`: settings from flags or the environment, then serving the application."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path

from aar_common.credentials import PUBLIC_KEY_FILE_ENV
from aar_common.web import add_metrics_port, metrics_listener, serve
from aar_gateway.app import build_app
from aar_gateway.settings import Settings

log = logging.getLogger(__name__)


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def main(argv: list[str] | None = None) -> None:
    """Read flags and the environment into Settings, then serve the gateway until stopped."""
    env = os.environ
    parser = argparse.ArgumentParser(
        prog="aar-gateway",
        description="The Anthropic API gateway: holds the real key, meters spend, caps budgets.",
    )
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8080)
    add_metrics_port(parser)
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
    parser.add_argument(
        "--per-agent-metrics",
        action=argparse.BooleanOptionalAction,
        default=env.get("AAR_GATEWAY_PER_AGENT_METRICS", "false").lower() in ("1", "true", "yes"),
        help="series per agent, not only per run (default $AAR_GATEWAY_PER_AGENT_METRICS, off)",
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
        per_agent_metrics=args.per_agent_metrics,
    )
    app = build_app(settings)
    metrics = metrics_listener("aar-gateway", args.host, args.metrics_port)
    asyncio.run(
        serve(
            app,
            host=args.host,
            port=args.port,
            metrics=metrics,
            ready=lambda name: log.info("Serving the gateway on %s for %s", name, args.upstream),
        )
    )
