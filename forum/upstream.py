"""What the web UI reads from the scorer and the gateway, with the viewer's own admin
credential. Either service may be absent or down: the page then says so and shows the rest."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp

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
    if not base_url:
        return Reading(problem=f"{service} unavailable: not configured (set {setting})")
    url = base_url.rstrip("/") + path
    try:
        async with http.get(
            url, headers={"Authorization": f"Bearer {token}"}, timeout=TIMEOUT
        ) as response:
            text = await response.text()
            if response.status != 200:
                return Reading(
                    problem=f"{service} unavailable: HTTP {response.status} {_message(text)}"
                )
            return Reading(data=json.loads(text))
    except (aiohttp.ClientError, TimeoutError, ValueError) as error:
        reason = str(error) or type(error).__name__
        return Reading(problem=f"{service} unavailable: {reason}")


def _message(text: str) -> str:
    try:
        return str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return text[:200]


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
