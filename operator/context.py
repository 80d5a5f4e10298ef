"""What every handler shares for the operator's lifetime (kept in Kopf's memo)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field

from aar_common.credentials import CredentialIssuer
from aar_operator.config import OperatorConfig
from aar_operator.kube import Kube
from aar_operator.models import Best, Reproductions
from aar_operator.services import RunSpend, Services
from aar_operator.status import Stop


@dataclass
class RunKnowledge:
    """What the operator last learned about a run from the services; rebuilt after a restart."""

    spend: RunSpend | None = None
    best: Best | None = None
    polled_at: float = 0.0
    registered: str = ""  # digest of what the gateway and scorer were last told
    # The model and task last checked with the gateway and scorer, when, and what they refused.
    checked: tuple[str, str] | None = None
    checked_at: float = 0.0
    refusal: Stop | None = None
    # The run's reproduction Jobs as last counted (None: not since the operator started).
    reproductions: Reproductions | None = None


@dataclass
class Context:
    kube: Kube
    config: OperatorConfig
    issuer: CredentialIssuer
    services: Services | None
    runs: dict[tuple[str, str], RunKnowledge] = field(
        default_factory=lambda: defaultdict(RunKnowledge)
    )
    # The timer and the change handlers of one object must not reconcile it at the same time.
    locks: dict[str, asyncio.Lock] = field(default_factory=lambda: defaultdict(asyncio.Lock))
