"""The operator's settings: flags, each with an environment variable and a default that matches
the chart's Service names, so an operator installed by the chart needs none of them."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from aar_common.credentials import SIGNING_KEY_FILE_ENV


class OperatorConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    namespace: str = Field(default="aar-system", description="Where the signing key lives.")
    gateway_url: str = "http://aar-gateway.aar-system:8080"
    forum_url: str = "http://aar-forum.aar-system:8080"
    scorer_url: str = "http://aar-scorer.aar-scorer:8080"
    # Where the services' Pods run, for the sandboxes' NetworkPolicy egress rules.
    services_namespace: str = "aar-system"
    scorer_namespace: str = "aar-scorer"
    signing_key_file: Path | None = None
    # How often every run and sandbox is reconciled even when nothing changed (level-triggered).
    resync_seconds: float = Field(default=60.0, gt=0)
    # How often a run's spend and best score are read from the gateway and the scorer.
    poll_seconds: float = Field(default=30.0, gt=0)
    # Whether to call the gateway and the scorer at all (off for clusters without them).
    services: bool = True
    metrics_port: int = Field(default=8000, ge=0, le=65535)
    liveness_port: int = Field(default=8080, ge=0, le=65535)
    # Kopf's per-object workers; a 900-agent run wants many in flight at once.
    workers: int = Field(default=200, ge=1)


# flag -> (field, environment variable)
_FLAGS = {
    "--namespace": ("namespace", "AAR_OPERATOR_NAMESPACE"),
    "--gateway-url": ("gateway_url", "AAR_GATEWAY_URL"),
    "--forum-url": ("forum_url", "AAR_FORUM_URL"),
    "--scorer-url": ("scorer_url", "AAR_SCORER_URL"),
    "--services-namespace": ("services_namespace", "AAR_SERVICES_NAMESPACE"),
    "--scorer-namespace": ("scorer_namespace", "AAR_SCORER_NAMESPACE"),
    "--signing-key-file": ("signing_key_file", SIGNING_KEY_FILE_ENV),
    "--resync-seconds": ("resync_seconds", "AAR_OPERATOR_RESYNC_SECONDS"),
    "--poll-seconds": ("poll_seconds", "AAR_OPERATOR_POLL_SECONDS"),
    "--metrics-port": ("metrics_port", "AAR_OPERATOR_METRICS_PORT"),
    "--liveness-port": ("liveness_port", "AAR_OPERATOR_LIVENESS_PORT"),
    "--workers": ("workers", "AAR_OPERATOR_WORKERS"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = OperatorConfig()
    for flag, (field, env) in _FLAGS.items():
        parser.add_argument(
            flag, dest=field, default=None, help=f"${env} (default: {getattr(defaults, field)})"
        )
    parser.add_argument(
        "--no-services",
        dest="services",
        action="store_false",
        default=None,
        help="do not call the gateway and scorer ($AAR_OPERATOR_SERVICES=false)",
    )


def from_arguments(
    args: argparse.Namespace, environ: dict[str, str] | None = None
) -> OperatorConfig:
    """Flags win over environment variables, which win over defaults."""
    env = os.environ if environ is None else environ
    values: dict[str, object] = {}
    for field, variable in _FLAGS.values():
        given = getattr(args, field, None)
        if given is None:
            given = env.get(variable) or None
        if given is not None:
            values[field] = given
    services = getattr(args, "services", None)
    if services is None and env.get("AAR_OPERATOR_SERVICES"):
        services = env["AAR_OPERATOR_SERVICES"].lower() not in {"0", "false", "no"}
    if services is not None:
        values["services"] = services
    return OperatorConfig.model_validate(values)
