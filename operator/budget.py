"""How a run's budget is shared among its agents."""

from __future__ import annotations

import math

from aar_operator.models import AgentBudget, ResearchRunSpec


def agent_budget(spec: ResearchRunSpec) -> AgentBudget:
    """Each agent's share of the run's caps: an even split."""
    budget = spec.budget
    return AgentBudget(
        # Rounded down to a micro-dollar: the shares never add up to more than the cap.
        usd=None if budget.usd is None else math.floor(budget.usd * 1e6 / spec.agents) / 1e6,
        agent_hours=None if budget.agent_hours is None else budget.agent_hours / spec.agents,
    )
