"""Routing only: which Kopf cause calls what. The work is in `watchlist.py` and `handlers/`."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import kopf

from aar_common.credentials import CredentialIssuer
from aar_operator import keys
from aar_operator.builders import AGENT_LABEL
from aar_operator.config import OperatorConfig
from aar_operator.context import Context
from aar_operator.handlers import reproduction
from aar_operator.handlers.run import reconcile_run
from aar_operator.handlers.sandbox import reconcile_sandbox
from aar_operator.kube import Kube
from aar_operator.models import GROUP, VERSION
from aar_operator.services import Services
from aar_operator.watchlist import Watchlist

RUNS = (GROUP, VERSION, "researchruns")
SANDBOXES = (GROUP, VERSION, "agentsandboxes")


def connection(settings: kopf.OperatorSettings) -> kopf.ConnectionInfo:
    """The same credentials Kopf logs in with: the in-cluster service account, else kubeconfig."""
    info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(
        settings=settings
    )
    if info is None:
        raise kopf.PermanentError(
            "no Kubernetes credentials: run in a Pod with a service account or set KUBECONFIG"
        )
    return info


async def _remove_reproductions(context: Context, run: dict[str, Any]) -> None:
    """A deleted run's reproduction Jobs go with it (they live in another namespace, out of
    reach of its ownerReferences)."""
    if gone := await reproduction.remove(context, run["metadata"]["uid"]):
        name = f"{run['metadata']['namespace']}/{run['metadata']['name']}"
        logging.getLogger(__name__).info(f"Deleted {gone} reproduction objects of run {name}")


def register(registry: kopf.OperatorRegistry, config: OperatorConfig) -> None:
    """Every route of the operator, into `registry`."""

    @kopf.on.login(registry=registry)
    def login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo:
        return connection(settings)

    @kopf.on.startup(registry=registry)
    async def startup(
        settings: kopf.OperatorSettings, memo: kopf.Memo, logger: kopf.Logger, **_: Any
    ) -> None:
        # Event handlers write none of these; named under aar.dev/ should a handler ever need them.
        settings.persistence.finalizer = f"{GROUP}/finalizer"
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=GROUP, key="last-handled-configuration"
        )
        # Our own events say what changed; Kopf's per-handler chatter stays in the log.
        settings.posting.level = logging.WARNING
        settings.batching.worker_limit = config.workers
        settings.watching.server_timeout = 300
        kube = Kube.connect(connection(settings))
        pem = await keys.signing_key(kube, config)
        for failure in await keys.publish_public_key(kube, config, pem):
            logger.warning(f"Could not publish the public key: {failure}")
        issuer = CredentialIssuer(pem)
        services = None
        if config.services:
            services = Services(
                aiohttp.ClientSession(),
                config.gateway_url,
                config.scorer_url,
                config.forum_url,
                issuer,
            )
        context = Context(kube=kube, config=config, issuer=issuer, services=services)
        memo.context = context
        watchlist = Watchlist(
            context,
            {"ResearchRun": reconcile_run, "AgentSandbox": reconcile_sandbox},
            on_deleted={"ResearchRun": _remove_reproductions},
        )
        memo.watchlist = watchlist
        memo.resync = asyncio.create_task(watchlist.resync_forever(config.resync_seconds))
        memo.sweep = asyncio.create_task(
            reproduction.sweep_forever(
                context, lambda: watchlist.uids("ResearchRun"), config.resync_seconds
            )
        )

    @kopf.on.cleanup(registry=registry)
    async def cleanup(memo: kopf.Memo, **_: Any) -> None:
        context: Context | None = memo.get("context")
        for task in ("resync", "sweep"):
            if memo.get(task) is not None:
                memo[task].cancel()
        if memo.get("watchlist") is not None:
            await memo.watchlist.stop()
        if context is not None:
            await context.kube.close()
            if context.services is not None:
                await context.services.close()

    @kopf.on.event(*RUNS, registry=registry)
    async def run_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        await memo.watchlist.observe("ResearchRun", type, body)

    @kopf.on.event(*SANDBOXES, registry=registry)
    async def sandbox_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        await memo.watchlist.observe("AgentSandbox", type, body)

    # Only the agents' Pods (the label the operator puts on them), not every Pod it may see.
    @kopf.on.event("", "v1", "pods", labels={AGENT_LABEL: kopf.PRESENT}, registry=registry)
    async def pod_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        await memo.watchlist.observe_pod(type, body)
