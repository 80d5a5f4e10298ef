"""The operator's calls to the gateway, the scorer and the forum (docs/interfaces.md), with
credentials it mints itself: as an admin, register each run's budget and task and read spend and
the best score; as the verifier, ask what to reproduce, fetch its artifact and report the result."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from decimal import Decimal
from typing import TypeVar
from urllib.parse import quote

import aiohttp
from pydantic import BaseModel, Field

from aar_common import api
from aar_common.api import (
    BestScore,
    BudgetSpec,
    ModelPrice,
    ReproductionReport,
    RunRegistration,
    WantedReproduction,
    WantedReproductions,
)
from aar_common.client import ServiceClient, ServiceError
from aar_common.credentials import CredentialIssuer
from aar_operator.models import AgentBudget, Best, ResearchRunSpec, Spend, TransferScore
from aar_operator.reproductions import ArtifactError

__all__ = [
    "RunRegistration",
    "RunSpend",
    "ServiceError",
    "Services",
    "Totals",
    "budget_request",
]

ADMIN_SUBJECT = "aar-operator"
ADMIN_TTL_SECONDS = 300
# The verifier's credential reads artifacts and reports reproductions, nothing else; one per
# call, as short-lived as the admin's.
VERIFIER_TTL_SECONDS = 300
MICRO_DOLLAR = Decimal("0.000001")
TIMEOUT = aiohttp.ClientTimeout(total=10)

Model = TypeVar("Model", bound=BaseModel)


class Totals(api.Totals):
    """The gateway's totals for a run or an agent, as the operator's status counts them."""

    def spend(self, agent_hours: float = 0.0, gpu_hours: float = 0.0) -> Spend:
        return Spend(
            # To the micro-dollar: a cap of a few cents must still be seen being reached.
            usd=f"{self.usd.quantize(MICRO_DOLLAR)}",
            input_tokens=self.input_tokens
            + self.cache_creation_input_tokens
            + self.cache_read_input_tokens,
            output_tokens=self.output_tokens,
            agent_hours=agent_hours,
            gpu_hours=gpu_hours,
            budget_exhausted=self.exhausted,
        )


class RunSpend(api.RunSpend):
    """The gateway's spend answer, its totals read as the operator's Totals."""

    run: Totals = Field(default_factory=Totals)
    agents: Mapping[str, Totals] = Field(default_factory=dict)


def budget_request(spec: ResearchRunSpec, agents: list[str], share: AgentBudget) -> BudgetSpec:
    """What the gateway is told before the run's Pods start: the run cap and each agent's share."""
    return BudgetSpec.model_validate(
        {"usd": spec.budget.usd, "agents": {agent: share.usd for agent in agents}}
    )


class Services:
    """Admin and verifier calls to the gateway, scorer and forum; every failure is a
    ServiceError."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        gateway_url: str,
        scorer_url: str,
        forum_url: str,
        issuer: CredentialIssuer,
    ) -> None:
        def credential() -> str:
            # A short-lived admin credential per call: nothing long-lived to leak.
            return issuer.mint_admin(ADMIN_SUBJECT, ADMIN_TTL_SECONDS)

        def verifier() -> str:
            return issuer.mint_verifier(ADMIN_SUBJECT, VERIFIER_TTL_SECONDS)

        self._session = session
        self._gateway = ServiceClient(
            "gateway", gateway_url, credential, timeout=TIMEOUT, session=session
        )
        self._scorer = ServiceClient(
            "scorer", scorer_url, credential, timeout=TIMEOUT, session=session
        )
        self._verifier = ServiceClient(
            "scorer", scorer_url, verifier, timeout=TIMEOUT, session=session
        )
        self._forum = ServiceClient("forum", forum_url, verifier, timeout=TIMEOUT, session=session)

    async def model_refusal(self, model: str) -> str | None:
        """The gateway's own words when it will not serve `model` (it has no price for it), or
        None when runs may use it."""
        try:
            await self._gateway.get(f"/api/v1/models/{quote(model, safe='')}", ModelPrice)
        except ServiceError as error:
            if error.status == 404:
                return error.message
            raise
        return None

    async def task_refusal(self, task: str) -> str | None:
        """The scorer's own words when it does not know `task`, or None when it does."""
        try:
            await self._scorer.request("GET", f"/api/v1/tasks/{quote(task, safe='')}")
        except ServiceError as error:
            if error.status == 404:
                return error.message
            raise
        return None

    async def put_budget(self, namespace: str, run: str, request: BudgetSpec) -> None:
        await self._gateway.request("PUT", f"/api/v1/budgets/{namespace}/{run}", json_body=request)

    async def spend(self, namespace: str, run: str) -> RunSpend:
        found = await _found(self._gateway, f"/api/v1/spend/{namespace}/{run}", RunSpend)
        return RunSpend() if found is None else found

    async def register_run(self, namespace: str, run: str, registration: RunRegistration) -> None:
        await self._scorer.request("PUT", f"/api/v1/runs/{namespace}/{run}", json_body=registration)

    async def best(self, namespace: str, run: str) -> Best | None:
        found = await _found(self._scorer, f"/api/v1/runs/{namespace}/{run}/best", BestScore)
        if found is None:
            return None
        return Best(
            score=found.score,
            agent=found.agent,
            submission=str(found.submission),
            reproduced=found.reproduced,
            transfer=[TransferScore(task=t, pgr=pgr) for t, pgr in sorted(found.transfer.items())],
        )

    async def wanted_reproductions(self, namespace: str, run: str) -> list[WantedReproduction]:
        """The run's submissions the scorer wants run again, with the targets still missing."""
        found = await _found(
            self._verifier, f"/api/v1/runs/{namespace}/{run}/reproductions", WantedReproductions
        )
        return [] if found is None else found.wanted

    async def report_reproduction(self, submission: int, report: ReproductionReport) -> None:
        await self._verifier.request(
            "POST", f"/api/v1/submissions/{submission}/reproductions", json_body=report
        )

    async def artifact(self, digest: str, limit: int) -> tuple[str, bytes]:
        """An artifact's file name and bytes, read with the verifier's credential; one over
        `limit` bytes raises ArtifactError before its bytes are read."""
        path = f"/api/v1/artifacts/{quote(digest, safe=':')}"
        meta = await self._forum.request("GET", f"{path}/meta")
        size, filename = int(meta.get("size", 0)), str(meta.get("filename") or "artifact")
        if size > limit:
            raise ArtifactError(
                f"artifact {digest} is {size:,} bytes; a reproduction takes artifacts up to "
                f"{limit:,} bytes: publish the code that trains the method, without weights or "
                "data (the task bundle is mounted for it)"
            )
        # In memory: the operator's root filesystem is read-only, and the size is bounded above.
        content: bytes = await self._forum.request("GET", path, raw=True)
        # What is run is what the submission names, byte for byte.
        if f"sha256:{hashlib.sha256(content).hexdigest()}" != digest:
            raise ArtifactError(
                f"the forum's bytes for {digest} do not match that digest; the artifact store "
                "is damaged: check the forum's volume"
            )
        return filename, content

    async def close(self) -> None:
        await self._session.close()


async def _found(service: ServiceClient, path: str, model: type[Model]) -> Model | None:
    """The body at `path`, or None where the service knows nothing there yet (404)."""
    try:
        return await service.get(path, model)
    except ServiceError as error:
        if error.status == 404:
            return None
        raise
