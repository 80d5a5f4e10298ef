"""Where runs and sandboxes may be. Never in the scorer's namespace: a Pod there could mount the
hidden labels' Secret without any permission on Secrets. Never in the operator's own namespace,
where its signing key is, nor in the verification namespace, where reproductions run on data
no agent may see. And, when the operator has an allow-list, only in a namespace on it."""

from __future__ import annotations

from aar_operator.config import OperatorConfig

# Where an operator's allow-list is set, for messages that say how to change it.
ALLOW_LIST = (
    "the chart value operator.runNamespaces, or aar-operator run --run-namespaces "
    "($AAR_RUN_NAMESPACES)"
)


def refusal(kind: str, namespace: str, config: OperatorConfig) -> str:
    """Why no `kind` may be reconciled in `namespace`, and the fix; "" when it may."""
    if namespace == config.scorer_namespace:
        why = "it is the scorer's namespace, where the hidden labels are kept"
    elif namespace == config.namespace:
        why = "it is the operator's own namespace, where its signing key is kept"
    elif namespace == config.verification_namespace:
        why = "it is the verification namespace, where reproductions run on data no agent sees"
    elif config.run_namespaces and namespace not in config.run_namespaces:
        why = "it is not on the operator's allow-list of run namespaces"
    else:
        return ""
    return f"no {kind} may run in namespace {namespace}: {why}; {_fix(namespace, config)}"


def _fix(namespace: str, config: OperatorConfig) -> str:
    never = (config.scorer_namespace, config.namespace, config.verification_namespace)
    forbidden = namespace in never
    if not config.run_namespaces:
        return (
            f"delete it and create it in any namespace but {', '.join(never)} "
            f"(an allow-list narrows that: {ALLOW_LIST})"
        )
    allowed = ", ".join(config.run_namespaces)
    if forbidden:
        return f"delete it and create it in one of the allowed namespaces ({allowed})"
    return (
        f"delete it and create it in one of the allowed namespaces ({allowed}), or add "
        f"{namespace} to the allow-list: {ALLOW_LIST}"
    )
