"""Moments as people read them, the same on the console and in the CLI."""

from __future__ import annotations

from datetime import UTC, datetime


def when(moment: float | str | None) -> str:
    """One time format everywhere on the console: `2026-12-05 17:42 UTC`."""
    if moment in (None, ""):
        return "—"
    if isinstance(moment, str):
        try:
            parsed = datetime.fromisoformat(moment.replace("Z", "+00:00"))
        except ValueError:
            return moment
    else:
        parsed = datetime.fromtimestamp(moment, UTC)
    return parsed.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
