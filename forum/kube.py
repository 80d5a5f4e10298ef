"""The runs and their agents as the cluster knows them: ResearchRuns and AgentSandboxes, whose
status the operator keeps (the forum's ServiceAccount may get and list these two, nothing
more). Outside a cluster they are simply unavailable."""

from __future__ import annotations

import ssl
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

from aar_forum.upstream import TIMEOUT, Reading

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
GROUP = "/apis/aar.dev/v1alpha1"
RUN_LABEL = "aar.dev/run"


@dataclass(frozen=True)
class KubeAccess:
    """Where the API server is and how to prove who we are to it."""

    server: str
    token_file: Path
    ca_file: Path | None = None

    @classmethod
    def from_env(cls, environ: dict[str, str]) -> KubeAccess | None:
        """`AAR_FORUM_KUBE_API` if set, else the in-cluster API server and ServiceAccount."""
        server = environ.get("AAR_FORUM_KUBE_API")
        if not server and (host := environ.get("KUBERNETES_SERVICE_HOST")):
            port = environ.get("KUBERNETES_SERVICE_PORT", "443")
            server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
        if not server:
            return None
        token = Path(environ.get("AAR_FORUM_KUBE_TOKEN_FILE", SERVICE_ACCOUNT / "token"))
        ca = environ.get("AAR_FORUM_KUBE_CA_FILE") or str(SERVICE_ACCOUNT / "ca.crt")
        return cls(server, token, Path(ca) if Path(ca).exists() else None)

    @cached_property
    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)


def _conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c.get("type", ""): c for c in (obj.get("status") or {}).get("conditions", [])}


def _dollars(text: str) -> Decimal | None:
    """`$1,234.56` (the operator's printer text) as a number; None for `unlimited` or nothing."""
    try:
        return Decimal(text.replace("$", "").replace(",", "")) if text.startswith("$") else None
    except InvalidOperation:
        return None


@dataclass(frozen=True)
class RunView:
    """One ResearchRun as the console shows it, from the status the operator wrote."""

    namespace: str
    name: str
    state: str  # the Ready condition's reason: AgentsReady, BudgetExhausted, UnknownTask, ...
    ready: bool
    message: str
    agents: dict[str, int]  # desired, ready, scheduled, suspended
    spent: str  # `$12.34`
    budget: str  # `$100.00`, `unlimited` or empty before the operator has looked
    cap_usd: float | None  # the dollar cap; None without one
    spent_fraction: float | None  # of the dollar cap, 0..1; None without a cap
    best: float | None  # the best counted (approved) private PGR
    best_agent: str
    ends: str
    model: str
    task: str
    created: str

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @classmethod
    def of(cls, obj: dict[str, Any]) -> RunView:
        spec, status = obj.get("spec") or {}, obj.get("status") or {}
        ready = _conditions(obj).get("Ready", {})
        spent, budget = status.get("spent", "$0.00"), status.get("budget", "")
        cap = _dollars(budget)
        used = _dollars(spent) or Decimal(0)
        best = status.get("best") or {}
        return cls(
            namespace=obj["metadata"]["namespace"],
            name=obj["metadata"]["name"],
            state=ready.get("reason", "Pending"),
            ready=ready.get("status") == "True",
            message=ready.get("message", "the operator has not reconciled this run yet"),
            agents={"desired": spec.get("agents", 0), **(status.get("agents") or {})},
            spent=spent,
            budget=budget,
            cap_usd=float(cap) if cap is not None else None,
            spent_fraction=min(1.0, float(used / cap)) if cap else None,
            best=best.get("score"),
            best_agent=best.get("agent", ""),
            ends=status.get("ends", ""),
            model=spec.get("model", ""),
            task=(spec.get("task") or {}).get("name", ""),
            created=obj["metadata"].get("creationTimestamp", ""),
        )


@dataclass(frozen=True)
class SandboxView:
    """One agent's sandbox: its state is the Ready condition's reason, as the operator counts."""

    agent: str
    state: str
    ready: bool
    message: str
    spent: str
    pod: str

    @classmethod
    def of(cls, obj: dict[str, Any]) -> SandboxView:
        status = obj.get("status") or {}
        ready = _conditions(obj).get("Ready", {})
        return cls(
            agent=obj["metadata"]["name"],
            state=ready.get("reason", "Pending"),
            ready=ready.get("status") == "True",
            message=ready.get("message", ""),
            spent=status.get("spent", "$0.00"),
            pod=status.get("pod", ""),
        )


def states(sandboxes: list[SandboxView]) -> list[tuple[str, int]]:
    """Agents by state, the commonest first."""
    return Counter(sandbox.state for sandbox in sandboxes).most_common()


async def _get(
    http: aiohttp.ClientSession, access: KubeAccess | None, path: str, what: str
) -> Reading:
    if access is None:
        return Reading(problem=f"{what} unavailable: the forum is not running in a cluster")
    try:
        # Read each time: projected ServiceAccount tokens are rotated on disk.
        token = access.token_file.read_text().strip()
        async with http.get(
            f"{access.server}{path}",
            headers={"Authorization": f"Bearer {token}"},
            ssl=access.ssl_context,
            timeout=TIMEOUT,
        ) as response:
            if response.status != 200:
                return Reading(
                    problem=f"{what} unavailable: the Kubernetes API answered "
                    f"{response.status} {(await response.text())[:200]}"
                )
            return Reading(data=await response.json())
    except (OSError, aiohttp.ClientError, TimeoutError, ValueError) as error:
        return Reading(problem=f"{what} unavailable: {str(error) or type(error).__name__}")


async def research_runs(http: aiohttp.ClientSession, access: KubeAccess | None) -> Reading:
    """Every ResearchRun in the cluster, as `list[RunView]`, newest first."""
    reading = await _get(http, access, f"{GROUP}/researchruns", "runs")
    if reading.problem is not None:
        return reading
    runs = [RunView.of(item) for item in reading.data.get("items", [])]
    return Reading(data=sorted(runs, key=lambda run: (run.created, run.key), reverse=True))


async def research_run(
    http: aiohttp.ClientSession, access: KubeAccess | None, namespace: str, name: str
) -> Reading:
    """One ResearchRun as a `RunView`."""
    path = f"{GROUP}/namespaces/{quote(namespace)}/researchruns/{quote(name)}"
    reading = await _get(http, access, path, "the run's status")
    return reading if reading.problem is not None else Reading(data=RunView.of(reading.data))


async def agent_sandboxes(
    http: aiohttp.ClientSession, access: KubeAccess | None, namespace: str, run: str
) -> Reading:
    """The run's AgentSandboxes as `list[SandboxView]`, by name."""
    selector = quote(f"{RUN_LABEL}={run}", safe="")
    path = f"{GROUP}/namespaces/{quote(namespace)}/agentsandboxes?labelSelector={selector}"
    reading = await _get(http, access, path, "sandbox states")
    if reading.problem is not None:
        return reading
    return Reading(
        data=sorted((SandboxView.of(item) for item in reading.data.get("items", [])),
                    key=lambda sandbox: sandbox.agent)
    )  # fmt: skip
