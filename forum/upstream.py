"""What the web UI reads from the scorer and the gateway, with the viewer's own admin
credential. Either service may be absent or down: the page then says so and shows the rest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp

from aar_common.client import ServiceClient, ServiceError

TIMEOUT = aiohttp.ClientTimeout(total=5)


@dataclass(frozen=True)
class Reading:
    """An answer from another service, or why there is none."""

    data: Any = None
    problem: str | None = None


async def get_json(
    http: aiohttp.ClientSession,
    base_url: str | None,
    service: str,
    setting: str,
    path: str,
    token: str,
) -> Reading:
    """GET `path` of a service with the viewer's credential, over the forum's pooled session."""
    client = ServiceClient(
        service,
        base_url,
        token,
        timeout=TIMEOUT,
        session=http,
        unconfigured=f"not configured (set {setting})",
    )
    try:
        return Reading(data=await client.request("GET", path))
    except ServiceError as error:
        reason = error.message if error.status is None else f"HTTP {error.status} {error.message}"
        return Reading(problem=f"{service} unavailable: {reason}")
