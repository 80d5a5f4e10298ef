"""The operator's calls to the gateway and the scorer (docs/interfaces.md), with an admin
credential it mints itself: register each run's budget and task, read spend and the best score."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import aiohttp
from pydantic import BaseModel, ConfigDict

from aar_common.credentials import CredentialIssuer
from aar_operator.models import AgentBudget, Best, ResearchRunSpec, Spend

ADMIN_SUBJECT = "aar-operator"
ADMIN_TTL_SECONDS = 300
MICRO_DOLLAR = Decimal("0.000001")


class ServiceError(Exception):
    """A service answered with an error or could not be reached; the message says which."""


class Totals(BaseModel):
    """The gateway's spend totals for a run or an agent."""

    model_config = ConfigDict(extra="ignore")

    usd: Decimal = Decimal(0)
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    requests: int = 0

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
        )


class RunSpend(BaseModel):
    model_config = ConfigDict(extra="ignore")

    run: Totals = Totals()
    agents: dict[str, Totals] = {}


class BudgetRequest(BaseModel):
    usd: float | None
    agents: dict[str, float | None]


class RunRegistration(BaseModel):
    task: str
    review_required: bool


def budget_request(spec: ResearchRunSpec, agents: list[str], share: AgentBudget) -> BudgetRequest:
    """What the gateway is told before the run's Pods start: the run cap and each agent's share."""
    return BudgetRequest(usd=spec.budget.usd, agents={agent: share.usd for agent in agents})


class Services:
    """Admin calls to the gateway and scorer; every failure is a ServiceError."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        gateway_url: str,
        scorer_url: str,
        issuer: CredentialIssuer,
    ) -> None:
        self._session = session
        self._gateway = gateway_url.rstrip("/")
        self._scorer = scorer_url.rstrip("/")
        self._issuer = issuer

    async def _call(
        self, method: str, url: str, body: BaseModel | None = None
    ) -> dict[str, Any] | None:
        # A short-lived admin credential per call: nothing long-lived to leak.
        credential = self._issuer.mint_admin(ADMIN_SUBJECT, ADMIN_TTL_SECONDS)
        try:
            async with self._session.request(
                method,
                url,
                data=None if body is None else body.model_dump_json(),
                headers={
                    "Authorization": f"Bearer {credential}",
                    "Content-Type": "application/json",
                },
                timeout=aiohttp.ClientTimeout(total=10),
            ) as response:
                if response.status == 404 and method == "GET":
                    return None
                if response.status >= 400:
                    raise ServiceError(f"{method} {url}: {response.status} {await response.text()}")
                if response.content_type != "application/json":
                    return {}
                result: dict[str, Any] = await response.json()
                return result
        except (aiohttp.ClientError, TimeoutError) as error:
            raise ServiceError(f"{method} {url}: {error!r}") from error

    async def put_budget(self, namespace: str, run: str, request: BudgetRequest) -> None:
        await self._call("PUT", f"{self._gateway}/api/v1/budgets/{namespace}/{run}", request)

    async def spend(self, namespace: str, run: str) -> RunSpend:
        result = await self._call("GET", f"{self._gateway}/api/v1/spend/{namespace}/{run}")
        return RunSpend() if result is None else RunSpend.model_validate(result)

    async def register_run(self, namespace: str, run: str, registration: RunRegistration) -> None:
        await self._call("PUT", f"{self._scorer}/api/v1/runs/{namespace}/{run}", registration)

    async def best(self, namespace: str, run: str) -> Best | None:
        result = await self._call("GET", f"{self._scorer}/api/v1/runs/{namespace}/{run}/best")
        if result is None:
            return None
        return Best(
            score=result.get("score"),
            agent=str(result.get("agent") or ""),
            submission=str(result.get("submission") or ""),
        )

    async def close(self) -> None:
        await self._session.close()
