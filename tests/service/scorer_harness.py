"""What the scorer's tests share: a handle on a scorer served in this process, as `aar-scorer`
serves it. (A module of its own, not conftest: test modules import it by name; the
`start_scorer` fixture in conftest stops what it starts at the end of the test.)"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from aar_common.credentials import CredentialVerifier, public_key_pem
from aar_common.web import REGISTRY_KEY, address, listen, metrics_app
from aar_scorer.app import SCORER_KEY, build_app
from aar_scorer.store import Store
from aar_scorer.tasks import load_tasks, write_task_files

# A task as the scorer holds it: its spec, its hidden labels and the seed that splits them.
ScorerTask = tuple[dict[str, Any], list[Any], str]


class ServedScorer:
    """A scorer on a loopback port over its own SQLite file: the workers, if any, accept on the
    public socket, the deciding process serves the socket `Intake.listen` gives it, and its
    /metrics on a port of its own (`metrics_url`)."""

    def __init__(
        self,
        runner: web.AppRunner,
        store: Store,
        public: socket.socket,
        exporter: web.AppRunner,
        metrics_url: str,
    ) -> None:
        self.runner, self.store, self.public, self.exporter = runner, store, public, exporter
        self.port: int = public.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.metrics_url = metrics_url
        self._stopped: asyncio.Future[None] | None = None

    async def stop(self) -> None:
        """Stop serving and close the store; a test may stop it before the fixture does."""
        if self._stopped is None:
            self._stopped = asyncio.ensure_future(self._stop())
        await asyncio.shield(self._stopped)

    async def _stop(self) -> None:
        await self.runner.cleanup()
        await self.exporter.cleanup()
        self.store.close()
        self.public.close()


async def serve_scorer(
    directory: Path,
    task: ScorerTask | list[ScorerTask],
    key: bytes,
    clock: Callable[[], float] = time.time,
    workers: int = 0,
) -> ServedScorer:
    """Serve `task` (or several) on a free loopback port, its task files in `directory`/tasks and
    its database in `directory`/data/scorer.db, accepting credentials signed with `key`; `clock`
    and `workers` (intake worker processes) are build_app's."""
    tasks = load_tasks(
        write_task_files(directory / "tasks", task if isinstance(task, list) else [task])
    )
    store = Store(directory / "data" / "scorer.db")
    app = build_app(tasks, store, CredentialVerifier(public_key_pem(key)), clock, workers)
    public = listen("127.0.0.1", 0)
    runner = web.AppRunner(app)
    try:
        serving = app[SCORER_KEY].intake.listen(public)
        await runner.setup()
    except BaseException:
        store.close()
        public.close()
        raise
    await web.SockSite(runner, serving).start()
    exporter = web.AppRunner(metrics_app(app[REGISTRY_KEY]))
    await exporter.setup()
    metrics = listen("127.0.0.1", 0)
    await web.SockSite(exporter, metrics).start()
    return ServedScorer(runner, store, public, exporter, address(metrics))


# The `start_scorer` fixture: start_scorer(task, key=..., directory=..., clock=..., workers=...).
StartScorer = Callable[..., Awaitable[ServedScorer]]
