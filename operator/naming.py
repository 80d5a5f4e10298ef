"""Every name the operator gives an object: deterministic, so a reconcile finds what an earlier
one made, and a scaled-down agent gets its old workspace back."""

from __future__ import annotations


def agent_name(run: str, index: int) -> str:
    """Agent `index` of a run: its AgentSandbox, and the prefix of its children's names."""
    return f"{run}-{index}"


def agent_index(run: str, name: str) -> int | None:
    """The index in `<run>-<i>`, or None for a name that is not one of this run's agents."""
    prefix = f"{run}-"
    if not name.startswith(prefix) or not name[len(prefix) :].isdigit():
        return None
    return int(name[len(prefix) :])


def service_account_name(agent: str) -> str:
    return agent


def credential_secret_name(agent: str) -> str:
    return f"{agent}-credential"


def workspace_name(agent: str) -> str:
    return f"{agent}-workspace"


def network_policy_name(agent: str) -> str:
    return agent


def pod_name(agent: str) -> str:
    return agent


def task_claim_name(task: str) -> str:
    """The read-only volume holding a task's bundle, provisioned with the task."""
    return f"aar-task-{task}"
