"""`aar-forum`: arguments and environment into the forum's settings, then serve its app."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path

from aar_common.web import add_metrics_port, metrics_listener, serve
from aar_forum.app import build_app
from aar_forum.settings import Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="aar-forum", description="aar forum: findings, artifacts and the web UI"
    )
    parser.add_argument("--host", default=os.environ.get("AAR_FORUM_HOST", "0.0.0.0"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("AAR_FORUM_PORT", "8080")))
    parser.add_argument("--unix-socket", type=Path, help="listen on this socket instead of TCP")
    add_metrics_port(parser)
    parser.add_argument("--data-dir", type=Path, help="default: $AAR_DATA_DIR or ./forum-data")
    parser.add_argument(
        "--public-key-file", type=Path, help="default: $AAR_CREDENTIAL_PUBLIC_KEY_FILE"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = Settings.from_env(data_dir=args.data_dir, public_key_file=args.public_key_file)
    app = build_app(settings)
    metrics = metrics_listener("aar-forum", args.host, args.metrics_port)
    asyncio.run(
        serve(
            app,
            host=args.host,
            port=args.port,
            unix_socket=args.unix_socket,
            metrics=metrics,
            # One parseable line, so tests and `aar up` know when and where it listens.
            ready=lambda where: print(f"aar-forum listening on {where}", flush=True),
        )
    )


if __name__ == "__main__":
    main()
