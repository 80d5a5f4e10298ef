"""The forum's configuration: environment variables (set by the chart), overridable by flags."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from aar_common.credentials import PUBLIC_KEY_FILE_ENV
from aar_forum.kube import KubeAccess

GIB = 1024**3


class Settings(BaseModel):
    data_dir: Path = Field(description="SQLite database and artifact blobs (a volume)")
    public_key_file: Path = Field(description="PEM public key that verifies aar credentials")
    scorer_url: str | None = Field(default=None, description="the scorer, for the web UI")
    gateway_url: str | None = Field(default=None, description="the gateway, for the web UI")
    kube: KubeAccess | None = Field(default=None, description="for the agents' sandbox states")
    max_artifact_bytes: int = Field(default=2 * GIB, ge=1)
    max_post_bytes: int = Field(default=256 * 1024, ge=1024)
    writes_per_minute: float = Field(default=60, ge=0, description="per agent; 0 is unlimited")
    write_burst: int = Field(default=20, ge=1)
    reads_per_minute: float = Field(default=600, ge=0, description="per agent; 0 is unlimited")
    read_burst: int = Field(default=120, ge=1)
    streams_per_agent: int = Field(default=4, ge=1, description="open event streams per agent")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: object) -> Settings:
        """Settings from `AAR_*` variables; a missing or malformed one is a SystemExit that
        names the variable."""
        env = dict(os.environ if environ is None else environ)
        values: dict[str, object] = {
            "data_dir": env.get("AAR_DATA_DIR", "forum-data"),
            "public_key_file": env.get(PUBLIC_KEY_FILE_ENV),
            "scorer_url": env.get("AAR_SCORER_URL") or None,
            "gateway_url": env.get("AAR_GATEWAY_URL") or None,
            "kube": KubeAccess.from_env(env),
        }
        for field in (
            "max_artifact_bytes",
            "max_post_bytes",
            "writes_per_minute",
            "write_burst",
            "reads_per_minute",
            "read_burst",
            "streams_per_agent",
        ):
            if (value := env.get(f"AAR_FORUM_{field.upper()}")) is not None:
                values[field] = value
        values.update({key: value for key, value in overrides.items() if value is not None})
        if not values["public_key_file"]:
            raise SystemExit(
                f"aar-forum: set {PUBLIC_KEY_FILE_ENV} to the credential public key "
                "(`aar keys generate DIR` writes one) or pass --public-key-file"
            )
        try:
            return cls.model_validate(values)
        except ValidationError as error:
            problems = "; ".join(
                f"{_variable(str(issue['loc'][0]))}: {issue['msg']} (got {issue['input']!r})"
                for issue in error.errors(include_url=False)
            )
            raise SystemExit(f"aar-forum: {problems}") from None


def _variable(field: str) -> str:
    """The environment variable that sets a field."""
    named = {
        "data_dir": "AAR_DATA_DIR",
        "public_key_file": PUBLIC_KEY_FILE_ENV,
        "scorer_url": "AAR_SCORER_URL",
        "gateway_url": "AAR_GATEWAY_URL",
    }
    return named.get(field, f"AAR_FORUM_{field.upper()}")
