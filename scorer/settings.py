"""The scorer's settings, and the environment variables that supply them in a Pod."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

TASKS_FILE_ENV = "AAR_SCORER_TASKS_FILE"
DATA_DIR_ENV = "AAR_DATA_DIR"
INTAKE_WORKERS_ENV = "AAR_SCORER_INTAKE_WORKERS"
# Two keep two cores busy at full load, with the deciding process beside them (docs/scorer.md).
DEFAULT_INTAKE_WORKERS = 2


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tasks_file: Path = Field(description="the tasks: labels, split, feedback, quota, probing")
    data_dir: Path = Field(description="where scorer.db (runs, submissions, reviews) lives")
    public_key_file: Path = Field(description="verifies agents' and admins' aar credentials")
    intake_workers: int = Field(
        default=DEFAULT_INTAKE_WORKERS,
        ge=0,
        description="processes that receive and parse submissions; 0: the deciding one does",
    )

    @property
    def database(self) -> Path:
        return self.data_dir / "scorer.db"
