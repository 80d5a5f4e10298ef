"""Structured logs (one JSON object a line on stdout, which `kubectl logs` collects) and the
agent's Prometheus counters."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

LOGGER_NAME = "aar_agent"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "message": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def setup_logging() -> logging.Logger:
    logger = logging.getLogger(LOGGER_NAME)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


def log(level: int, message: str, exc_info: bool = False, **fields: Any) -> None:
    """Log `message` with `fields` as top-level keys of the JSON line (and, with `exc_info`,
    the exception being handled as `error`)."""
    logging.getLogger(LOGGER_NAME).log(level, message, exc_info=exc_info, extra={"fields": fields})


class Metrics:
    """Counters for one agent process, in their own registry (tests make many agents)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.steps = Counter("aar_agent_steps", "Model calls completed", registry=self.registry)
        self.tool_calls = Counter(
            "aar_agent_tool_calls",
            "Tool calls by tool and outcome (ok or error)",
            ["tool", "outcome"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "aar_agent_tokens",
            "Tokens reported by the API, by kind (input, output, cache_read, cache_creation)",
            ["kind"],
            registry=self.registry,
        )
        self.trims = Counter(
            "aar_agent_context_trims", "Times the conversation was trimmed", registry=self.registry
        )
        self.api_errors = Counter(
            "aar_agent_api_errors",
            "Failed model calls by HTTP status (0: no answer)",
            ["status"],
            registry=self.registry,
        )
        self.step_seconds = Histogram(
            "aar_agent_step_duration_seconds",
            "Seconds per step: the model call and its tool calls",
            buckets=(1, 5, 15, 60, 300, 900, 3600),
            registry=self.registry,
        )
