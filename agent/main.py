"""`aar-agent`: the agent image's entrypoint. Reads the sandbox environment, runs the loop until
the model finishes, the budget is spent or SIGTERM arrives, and exits 0 for each of those (1 when
the environment or the gateway refuses the agent, with the reason on the last log line)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from prometheus_client import start_http_server

from aar_agent.config import ConfigError, settings_from_env
from aar_agent.loop import Agent, FatalError
from aar_agent.telemetry import Metrics, log, setup_logging


async def _run() -> int:
    settings = settings_from_env()
    metrics = Metrics()
    if settings.metrics_port:
        try:
            start_http_server(settings.metrics_port, registry=metrics.registry)
        except OSError as error:
            # Counters are worth less than the run: go on without them, and say why.
            log(
                logging.WARNING,
                f"Could not serve /metrics on port {settings.metrics_port}: {error}; "
                "set AAR_METRICS_PORT to a free port, or 0 for none",
            )
    agent = Agent(settings, metrics)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, agent.request_stop)
    try:
        outcome = await agent.run()
    finally:
        await agent.close()
    log(logging.INFO, "Exited", outcome=outcome.value, step=agent.state.step)
    return 0


def main() -> int:
    setup_logging()
    try:
        return asyncio.run(_run())
    except (ConfigError, FatalError) as error:
        log(logging.ERROR, str(error))
        return 1


if __name__ == "__main__":
    sys.exit(main())
