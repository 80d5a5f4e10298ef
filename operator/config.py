"""The operator's settings: flags, each with an environment variable and a default that matches
the chart's Service names, so an operator installed by the chart needs none of them."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from aar_common.credentials import SIGNING_KEY_FILE_ENV

# A namespace's name is a DNS label (RFC 1123).
NAMESPACE_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


class OperatorConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    namespace: str = Field(default="aar-system", description="Where the signing key lives.")
    gateway_url: str = "http://aar-gateway.aar-system:8080"
    forum_url: str = "http://aar-forum.aar-system:8080"
    scorer_url: str = "http://aar-scorer.aar-scorer:8080"
    # Where the services' Pods run, for the sandboxes' NetworkPolicy egress rules.
    services_namespace: str = "aar-system"
    scorer_namespace: str = "aar-scorer"
    # Where reproduction Jobs run: no network, no credential, the task volumes of the
    # reproduction targets (docs/operator.md, Reproduction). Never a run's namespace.
    verification_namespace: str = "aar-verify"
    # The allow-list of namespaces runs and sandboxes may be in; empty: any namespace but the
    # scorer's and the operator's own, which are never allowed (aar_operator.namespaces).
    run_namespaces: tuple[str, ...] = ()
    # Watch only run_namespaces instead of the whole cluster (for namespaced RBAC: Roles there).
    namespaced: bool = False
    signing_key_file: Path | None = None
    # How often every run and sandbox is reconciled even when nothing changed (level-triggered).
    resync_seconds: float = Field(default=60.0, gt=0)
    # How often a run's spend and best score are read from the gateway and the scorer.
    poll_seconds: float = Field(default=30.0, gt=0)
    # Whether to call the gateway and the scorer at all (off for clusters without them).
    services: bool = True
    # The dollar cap of a run whose spec gives none (and does not say usdUnlimited); unset, such
    # a run is refused rather than left uncapped.
    default_budget_usd: float | None = Field(default=None, ge=0, le=10_000_000)
    metrics_port: int = Field(default=9090, ge=0, le=65535)
    liveness_port: int = Field(default=8080, ge=0, le=65535)
    # Kopf's per-object workers; a 900-agent run wants many in flight at once.
    workers: int = Field(default=200, ge=1)

    @field_validator("run_namespaces", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        """`a,b` from a flag or the environment; order kept, repeats dropped."""
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",")]
        if isinstance(value, list | tuple):
            return tuple(dict.fromkeys(str(part) for part in value if part))
        return value

    @model_validator(mode="after")
    def _run_namespaces_are_possible(self) -> OperatorConfig:
        for namespace in self.run_namespaces:
            if not NAMESPACE_NAME.fullmatch(namespace):
                raise ValueError(
                    f"--run-namespaces: {namespace!r} is not a namespace name "
                    "(lower-case letters, digits and '-', at most 63 characters)"
                )
        never = {
            self.scorer_namespace: "the scorer's namespace",
            self.namespace: "the operator's own namespace",
            self.verification_namespace: "where reproductions run",
        }
        for namespace in self.run_namespaces:
            if namespace in never:
                raise ValueError(
                    f"--run-namespaces must not list {namespace}: it is {never[namespace]}, "
                    "where no run may ever be"
                )
        if self.namespaced and not self.run_namespaces:
            raise ValueError(
                "--namespaced watches only the namespaces of --run-namespaces; list at least one"
            )
        return self


# flag -> (field, environment variable)
_FLAGS = {
    "--namespace": ("namespace", "AAR_OPERATOR_NAMESPACE"),
    "--gateway-url": ("gateway_url", "AAR_GATEWAY_URL"),
    "--forum-url": ("forum_url", "AAR_FORUM_URL"),
    "--scorer-url": ("scorer_url", "AAR_SCORER_URL"),
    "--services-namespace": ("services_namespace", "AAR_SERVICES_NAMESPACE"),
    "--scorer-namespace": ("scorer_namespace", "AAR_SCORER_NAMESPACE"),
    "--verification-namespace": ("verification_namespace", "AAR_VERIFICATION_NAMESPACE"),
    "--run-namespaces": ("run_namespaces", "AAR_RUN_NAMESPACES"),
    "--signing-key-file": ("signing_key_file", SIGNING_KEY_FILE_ENV),
    "--resync-seconds": ("resync_seconds", "AAR_OPERATOR_RESYNC_SECONDS"),
    "--poll-seconds": ("poll_seconds", "AAR_OPERATOR_POLL_SECONDS"),
    "--metrics-port": ("metrics_port", "AAR_OPERATOR_METRICS_PORT"),
    "--liveness-port": ("liveness_port", "AAR_OPERATOR_LIVENESS_PORT"),
    "--workers": ("workers", "AAR_OPERATOR_WORKERS"),
    "--default-budget-usd": ("default_budget_usd", "AAR_OPERATOR_DEFAULT_BUDGET_USD"),
}


# field -> (flag, the value the flag sets, environment variable, help): on/off settings.
_SWITCHES = {
    "services": (
        "--no-services",
        False,
        "AAR_OPERATOR_SERVICES",
        "do not call the gateway and scorer ($AAR_OPERATOR_SERVICES=false)",
    ),
    "namespaced": (
        "--namespaced",
        True,
        "AAR_OPERATOR_NAMESPACED",
        "watch only the --run-namespaces, not the whole cluster, for namespaced RBAC "
        "($AAR_OPERATOR_NAMESPACED=true)",
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = OperatorConfig()
    for flag, (field, env) in _FLAGS.items():
        default = getattr(defaults, field)
        if field == "run_namespaces":
            default = (
                "any namespace but the scorer's, the operator's own and the verification namespace"
            )
        if field == "default_budget_usd":
            default = "none: a run without spec.budget.usd is refused"
        parser.add_argument(flag, dest=field, default=None, help=f"${env} (default: {default})")
    for field, (flag, value, _, help) in _SWITCHES.items():
        action = "store_true" if value else "store_false"
        parser.add_argument(flag, dest=field, action=action, default=None, help=help)


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
    for field, (_, _, variable, _) in _SWITCHES.items():
        switch = getattr(args, field, None)
        if switch is None and env.get(variable):
            switch = env[variable].lower() not in {"0", "false", "no"}
        if switch is not None:
            values[field] = switch
    return OperatorConfig.model_validate(values)
