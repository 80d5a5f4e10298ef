"""A small asyncio Kubernetes client over aiohttp, logged in the same way Kopf is.

The operator needs only create, get, list, merge-patch and delete on a handful of kinds; this is
that and nothing more, sharing Kopf's credentials (kubeconfig or in-cluster service account).
"""

from __future__ import annotations

import base64
import logging
import ssl
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import kopf

PLURALS = {
    "ServiceAccount": "serviceaccounts",
    "Secret": "secrets",
    "ConfigMap": "configmaps",
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "Pod": "pods",
    "NetworkPolicy": "networkpolicies",
    "AgentSandbox": "agentsandboxes",
    "ResearchRun": "researchruns",
    "Event": "events",
    "Job": "jobs",
}

logger = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, method: str, path: str, message: str) -> None:
        super().__init__(f"{method} {path}: {status} {message}")
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Ref:
    """Where an object lives in the API."""

    api_version: str
    kind: str
    namespace: str
    name: str | None = None

    @classmethod
    def of(cls, manifest: dict[str, Any]) -> Ref:
        metadata = manifest["metadata"]
        return cls(
            manifest["apiVersion"], manifest["kind"], metadata["namespace"], metadata.get("name")
        )

    def collection(self) -> str:
        prefix = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        return f"{prefix}/namespaces/{self.namespace}/{PLURALS[self.kind]}"

    def path(self) -> str:
        assert self.name is not None, "a path to one object needs its name"
        return f"{self.collection()}/{self.name}"


def _ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    if info.insecure:
        return False
    context = ssl.create_default_context(
        cafile=str(info.ca_path) if info.ca_path else None,
        cadata=_text(info.ca_data) if info.ca_data else None,
    )
    if info.certificate_path or info.certificate_data:
        # ssl loads client certificates from files only.
        cert = (
            str(info.certificate_path)
            if info.certificate_path
            else _temporary(info.certificate_data)
        )
        key = (
            str(info.private_key_path)
            if info.private_key_path
            else _temporary(info.private_key_data)
        )
        context.load_cert_chain(cert, key)
    return context


def _text(data: str | bytes | None) -> str:
    if isinstance(data, bytes):
        return data.decode()
    if data and "-----BEGIN" not in data:
        return base64.b64decode(data).decode()
    return data or ""


def _temporary(data: str | bytes | None) -> str:
    file = tempfile.NamedTemporaryFile("w", suffix=".pem", delete=False)  # noqa: SIM115
    with file:
        file.write(_text(data))
    return file.name


class Kube:
    """Async calls to the apiserver; 404 on get is None, everything else non-2xx is ApiError."""

    def __init__(self, session: aiohttp.ClientSession, server: str) -> None:
        self._session = session
        self._server = server.rstrip("/")

    @classmethod
    def connect(cls, info: kopf.ConnectionInfo, connections: int = 100) -> Kube:
        headers = {}
        if info.token:
            headers["Authorization"] = f"{info.scheme or 'Bearer'} {info.token}"
        auth = aiohttp.BasicAuth(info.username, info.password or "") if info.username else None
        session = aiohttp.ClientSession(
            headers=headers,
            auth=auth,
            connector=aiohttp.TCPConnector(ssl=_ssl_context(info), limit=connections),
            timeout=aiohttp.ClientTimeout(total=60),
        )
        return cls(session, info.server)

    async def close(self) -> None:
        await self._session.close()

    async def _call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        async with self._session.request(
            method,
            self._server + path,
            json=body,
            params=params,
            headers={"Content-Type": content_type},
        ) as response:
            if response.status >= 400:
                try:
                    message = (await response.json()).get("message", "")
                except (aiohttp.ContentTypeError, ValueError):
                    message = await response.text()
                raise ApiError(response.status, method, path, message)
            result: dict[str, Any] = await response.json()
            return result

    async def get(self, ref: Ref) -> dict[str, Any] | None:
        try:
            return await self._call("GET", ref.path())
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    async def list(self, ref: Ref, selector: dict[str, str]) -> list[dict[str, Any]]:
        label_selector = ",".join(f"{key}={value}" for key, value in selector.items())
        result = await self._call("GET", ref.collection(), params={"labelSelector": label_selector})
        items: list[dict[str, Any]] = result.get("items", [])
        return items

    async def log(self, namespace: str, pod: str, container: str, limit_bytes: int) -> str:
        """The first `limit_bytes` of a container's log."""
        path = f"/api/v1/namespaces/{namespace}/pods/{pod}/log"
        params = {"container": container, "limitBytes": str(limit_bytes)}
        async with self._session.get(self._server + path, params=params) as response:
            if response.status >= 400:
                raise ApiError(response.status, "GET", path, await response.text())
            return (await response.read()).decode(errors="replace")

    async def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        return await self._call("POST", Ref.of(manifest).collection(), manifest)

    async def patch(self, ref: Ref, patch: dict[str, Any], subresource: str = "") -> dict[str, Any]:
        path = ref.path() + (f"/{subresource}" if subresource else "")
        return await self._call("PATCH", path, patch, content_type="application/merge-patch+json")

    async def replace(self, manifest: dict[str, Any]) -> dict[str, Any]:
        return await self._call("PUT", Ref.of(manifest).path(), manifest)

    async def event(
        self, involved: Mapping[str, Any], type: str, reason: str, message: str
    ) -> None:
        """Record a Kubernetes Event on `involved`; failing to is logged, never raised."""
        metadata = involved["metadata"]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "generateName": f"{metadata['name']}.",
                "namespace": metadata["namespace"],
            },
            "involvedObject": {
                "apiVersion": involved["apiVersion"],
                "kind": involved["kind"],
                "name": metadata["name"],
                "namespace": metadata["namespace"],
                "uid": metadata["uid"],
            },
            "type": type,
            "reason": reason,
            # The apiserver refuses messages over 1 KiB.
            "message": message[:1024],
            "source": {"component": "aar-operator"},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self.create(event)
        except (ApiError, aiohttp.ClientError) as error:
            logger.warning(f"Could not record event {reason} on {metadata['name']}: {error}")

    async def delete(self, ref: Ref, uid: str | None = None) -> bool:
        """Delete in the background; with `uid`, only that incarnation. False if already gone."""
        body: dict[str, Any] = {"propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            await self._call("DELETE", ref.path(), body)
        except ApiError as error:
            if error.status in (404, 409):
                return False
            raise
        return True
