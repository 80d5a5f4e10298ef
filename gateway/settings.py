"""The gateway's settings, and reading the Anthropic API key file they name."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    api_key_file: Path = Field(description="the real Anthropic API key; only the gateway has it")
    public_key_file: Path = Field(description="verifies agents' and admins' aar credentials")
    data_dir: Path = Field(description="where gateway.sqlite3 (budgets, ledger, totals) lives")
    upstream: str = "https://api.anthropic.com"
    prices_file: Path | None = Field(default=None, description="a price table over the built-in")
    agent_requests_per_minute: float = Field(default=0, ge=0, description="0: unlimited")
    upstream_timeout: float = Field(
        default=600, gt=0, description="seconds the upstream may stay silent mid-answer"
    )
    connect_timeout: float = Field(default=10, gt=0)
    per_agent_metrics: bool = Field(
        default=False,
        description="label request, token and spend series by agent, and export each agent's "
        "remaining and reserved dollars (a 900-agent run: thousands of series)",
    )


def read_api_key(path: Path) -> str:
    """The Anthropic API key in `path`; exits with the fix when it is unreadable or empty."""
    try:
        key = path.read_text().strip()
    except OSError as error:
        raise SystemExit(
            f"aar-gateway: cannot read the Anthropic API key from {path}: {error.strerror}; "
            "set AAR_ANTHROPIC_API_KEY_FILE (the chart mounts gateway.apiKey.existingSecret)"
        ) from error
    if not key:
        raise SystemExit(f"aar-gateway: the Anthropic API key file {path} is empty")
    return key
