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


async def ask(
    http: aiohttp.ClientSession,
    base_url: str | None,
    service: str,
    setting: str,
    token: str,
    method: str,
    path: str,
    body: Any = None,
) -> Reading:
    """Call `path` of a service with the viewer's credential, over the forum's pooled session:
    its JSON answer, or what went wrong in words for the page."""
    client = ServiceClient(
        service,
        base_url,
        token,
        timeout=TIMEOUT,
        session=http,
        unconfigured=f"not configured (set {setting})",
    )
    try:
        return Reading(data=await client.request(method, path, json_body=body))
    except ServiceError as error:
        if error.status is None:
            return Reading(problem=f"{service} unavailable: {error.message}")
        return Reading(problem=f"{service} answered {error.status}: {error.message}")
