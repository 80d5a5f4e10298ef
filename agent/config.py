"""The agent's settings, read once from the sandbox environment the operator sets
(docs/interfaces.md); tests point the paths at temporary folders."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

DEFAULT_MODEL = "claude-opus-4-6"


class ConfigError(Exception):
    """The environment is missing or has a bad value; the message names the variable and the fix."""


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    namespace: str = ""
    run: str = ""
    agent: str
    direction: str = ""
    model: str = DEFAULT_MODEL
    task: str = ""
    task_dir: Path = Path("/task")
    workspace: Path = Path("/workspace")
    api_key: str
    anthropic_base_url: str | None = None
    forum_url: str | None = None
    scorer_url: str | None = None
    # Output tokens per model call; long enough for a full script in one tool call.
    max_tokens: int = Field(default=16_000, ge=1)
    # The model's context window; trimming starts well before it (see context.py).
    context_tokens: int = Field(default=200_000, ge=1_000)
    # A bound on steps for this process (0: none); the run normally ends on the model's own
    # end_turn, a spent budget, or SIGTERM.
    max_steps: int = Field(default=0, ge=0)
    bash_timeout: float = Field(default=600.0, gt=0)
    # Characters of tool output the model sees per call; the rest is saved to a file.
    output_chars: int = Field(default=20_000, ge=1_000)
    metrics_port: int = Field(default=9090, ge=0, le=65535)  # 0: no /metrics endpoint

    @property
    def state_dir(self) -> Path:
        return self.workspace / ".aar"


# Environment variable -> settings field; only those present are passed, so defaults apply.
_ENV = {
    "AAR_NAMESPACE": "namespace",
    "AAR_RUN": "run",
    "AAR_AGENT": "agent",
    "AAR_DIRECTION": "direction",
    "AAR_MODEL": "model",
    "AAR_TASK": "task",
    "AAR_TASK_DIR": "task_dir",
    "AAR_WORKSPACE": "workspace",
    "ANTHROPIC_BASE_URL": "anthropic_base_url",
    "AAR_FORUM_URL": "forum_url",
    "AAR_SCORER_URL": "scorer_url",
    "AAR_MAX_TOKENS": "max_tokens",
    "AAR_CONTEXT_TOKENS": "context_tokens",
    "AAR_MAX_STEPS": "max_steps",
    "AAR_BASH_TIMEOUT": "bash_timeout",
    "AAR_OUTPUT_CHARS": "output_chars",
    "AAR_METRICS_PORT": "metrics_port",
}
_FIELD_ENV = {field: name for name, field in _ENV.items()}


def settings_from_env(environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from the environment, or a ConfigError that names each bad variable."""
    env = os.environ if environ is None else environ
    values: dict[str, str] = {field: env[name] for name, field in _ENV.items() if env.get(name)}
    # The gateway takes the agent's credential as the API key; either variable carries it.
    api_key = env.get("ANTHROPIC_API_KEY") or env.get("AAR_CREDENTIAL")
    if api_key:
        values["api_key"] = api_key
    try:
        return Settings.model_validate(values)
    except ValidationError as error:
        problems = []
        for issue in error.errors(include_url=False):
            field = str(issue["loc"][0]) if issue["loc"] else ""
            if field == "api_key":
                name = "ANTHROPIC_API_KEY (or AAR_CREDENTIAL)"
            else:
                name = _FIELD_ENV.get(field, field)
            problems.append(f"{name}: {issue['msg']}")
        raise ConfigError(
            "aar-agent: bad environment: "
            + "; ".join(problems)
            + " (the operator sets these; see docs/interfaces.md)"
        ) from None
