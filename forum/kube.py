"""Each agent's sandbox state, read from its Pod in the Kubernetes API (the forum's own
ServiceAccount may list Pods, nothing more). Outside a cluster it is simply unavailable."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

from aar_forum.upstream import TIMEOUT, Reading

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


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


async def agent_states(
    http: aiohttp.ClientSession, access: KubeAccess | None, namespace: str, run: str
) -> Reading:
    """`{agent: state}` for the run's sandbox Pods (labels `aar.dev/run`, `aar.dev/agent`)."""
    if access is None:
        return Reading(problem="sandbox states unavailable: the forum is not running in a cluster")
    selector = quote(f"aar.dev/run={run},aar.dev/agent", safe="")
    url = f"{access.server}/api/v1/namespaces/{quote(namespace)}/pods?labelSelector={selector}"
    try:
        # Read each time: projected ServiceAccount tokens are rotated on disk.
        token = access.token_file.read_text().strip()
        async with http.get(
            url,
            headers={"Authorization": f"Bearer {token}"},
            ssl=access.ssl_context,
            timeout=TIMEOUT,
        ) as response:
            if response.status != 200:
                return Reading(
                    problem=f"sandbox states unavailable: Kubernetes API answered "
                    f"{response.status} {(await response.text())[:200]}"
                )
            pods = (await response.json())["items"]
    except (OSError, aiohttp.ClientError, TimeoutError, ValueError, KeyError) as error:
        reason = str(error) or type(error).__name__
        return Reading(problem=f"sandbox states unavailable: {reason}")
    return Reading(
        data={pod["metadata"]["labels"]["aar.dev/agent"]: pod_state(pod) for pod in pods}
    )


def pod_state(pod: dict[str, Any]) -> str:
    """One line a human reads: the phase and, when something is wrong, the reason."""
    status = pod.get("status", {})
    phase = status.get("phase", "Unknown")
    if pod["metadata"].get("deletionTimestamp"):
        return "Terminating"
    for container in status.get("containerStatuses", []):
        for kind in ("waiting", "terminated"):
            reason = container.get("state", {}).get(kind, {}).get("reason")
            if reason:
                return f"{phase}: {reason}"
    conditions = {c["type"]: c for c in status.get("conditions", [])}
    scheduled = conditions.get("PodScheduled")
    if scheduled and scheduled.get("status") == "False":
        message = scheduled.get("message", "")
        return f"{phase}: {scheduled.get('reason', 'NotScheduled')}" + (
            f" ({message})" if message else ""
        )
    if phase == "Running":
        ready = conditions.get("Ready", {}).get("status") == "True"
        return "Running, ready" if ready else "Running, not ready"
    return str(phase)
