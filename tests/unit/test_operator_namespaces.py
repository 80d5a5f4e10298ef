"""Where runs may be: the refusal and its message, and the allow-list's settings."""

from __future__ import annotations

import argparse

import pytest

from aar_operator.config import OperatorConfig, add_arguments, from_arguments
from aar_operator.namespaces import refusal

CONFIG = OperatorConfig(namespace="aar-system", scorer_namespace="aar-scorer")
LISTED = CONFIG.model_copy(update={"run_namespaces": ("research", "team-b")})


def settings(*argv: str, **environ: str) -> OperatorConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return from_arguments(parser.parse_args(list(argv)), environ)


@pytest.mark.parametrize("config", [CONFIG, LISTED])
def test_the_scorers_namespace_is_refused_whatever_the_allow_list(config: OperatorConfig) -> None:
    message = refusal("ResearchRun", "aar-scorer", config)
    assert message.startswith(
        "no ResearchRun may run in namespace aar-scorer: it is the scorer's namespace"
    )


@pytest.mark.parametrize("config", [CONFIG, LISTED])
def test_the_operators_own_namespace_is_refused(config: OperatorConfig) -> None:
    message = refusal("AgentSandbox", "aar-system", config)
    assert message.startswith(
        "no AgentSandbox may run in namespace aar-system: it is the operator's own namespace"
    )


def test_without_an_allow_list_every_other_namespace_is_allowed_and_the_message_says_so() -> None:
    assert refusal("ResearchRun", "research", CONFIG) == ""
    assert refusal("ResearchRun", "default", CONFIG) == ""
    message = refusal("ResearchRun", "aar-scorer", CONFIG)
    assert "create it in any namespace but aar-scorer, aar-system, aar-verify" in message
    assert "operator.runNamespaces" in message


@pytest.mark.parametrize("config", [CONFIG, LISTED])
def test_the_verification_namespace_is_refused(config: OperatorConfig) -> None:
    message = refusal("ResearchRun", "aar-verify", config)
    assert message.startswith(
        "no ResearchRun may run in namespace aar-verify: it is the verification namespace"
    )


def test_with_an_allow_list_only_listed_namespaces_are_allowed() -> None:
    assert refusal("ResearchRun", "research", LISTED) == ""
    assert refusal("AgentSandbox", "team-b", LISTED) == ""
    message = refusal("ResearchRun", "default", LISTED)
    assert message == (
        "no ResearchRun may run in namespace default: it is not on the operator's allow-list "
        "of run namespaces; delete it and create it in one of the allowed namespaces "
        "(research, team-b), or add default to the allow-list: the chart value "
        "operator.runNamespaces, or aar-operator run --run-namespaces ($AAR_RUN_NAMESPACES)"
    )


def test_a_forbidden_namespace_is_never_offered_for_the_allow_list() -> None:
    message = refusal("ResearchRun", "aar-scorer", LISTED)
    assert "allowed namespaces (research, team-b)" in message
    assert "add aar-scorer" not in message


def test_run_namespaces_come_from_a_flag_or_the_environment_as_a_list() -> None:
    assert settings("--run-namespaces", "a, b,a,").run_namespaces == ("a", "b")
    assert settings(AAR_RUN_NAMESPACES="x,y").run_namespaces == ("x", "y")
    assert settings("--run-namespaces", "a", AAR_RUN_NAMESPACES="x").run_namespaces == ("a",)
    assert settings(AAR_RUN_NAMESPACES="").run_namespaces == ()
    assert settings().namespaced is False
    assert settings("--run-namespaces", "a", "--namespaced").namespaced is True
    namespaced = settings(AAR_RUN_NAMESPACES="a", AAR_OPERATOR_NAMESPACED="true")
    assert namespaced.namespaced is True


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (["--run-namespaces", "research,aar-scorer"], "must not list aar-scorer: it is the scorer"),
        (["--run-namespaces", "aar-system"], "must not list aar-system: it is the operator's own"),
        (["--run-namespaces", "aar-verify"], "must not list aar-verify: it is where reproductions"),
        (
            ["--run-namespaces", "ops", "--namespace", "ops"],
            "must not list ops: it is the operator's own",
        ),
        (["--run-namespaces", "Research"], "'Research' is not a namespace name"),
        (["--run-namespaces", "team_b"], "'team_b' is not a namespace name"),
        (["--namespaced"], "--namespaced watches only the namespaces of --run-namespaces"),
    ],
)
def test_impossible_allow_lists_stop_the_operator_with_the_fix(
    argv: list[str], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        settings(*argv)
