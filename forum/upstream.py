"""What the web UI reads from the scorer and the gateway, with the viewer's own admin
credential. Either service may be absent or down: the page then says so and shows the rest."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
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


def rows(data: Any) -> tuple[list[str], list[dict[str, str]]]:
    """A table of whatever list of records an answer holds (the list itself, or the first list
    in an object), with every field as text: the UI shows the services' fields as they are."""
    records: list[Any] = []
    if isinstance(data, list):
        records = data
    elif isinstance(data, dict):
        records = next((value for value in data.values() if isinstance(value, list)), [data])
    columns: list[str] = []
    table = []
    for record in records:
        item = record if isinstance(record, dict) else {"value": record}
        for key in item:
            if key not in columns:
                columns.append(key)
        table.append({key: _text(key, value) for key, value in item.items()})
    return columns, table


def _text(key: str, value: Any) -> str:
    if key.endswith("_at") and isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, str):
        # A digest is recognisable by its start; the rest only widens the table.
        return value[:19] + "…" if value.startswith("sha256:") else value
    if isinstance(value, float):
        return f"{value:.6g}"
    return json.dumps(value, separators=(",", ":"))
