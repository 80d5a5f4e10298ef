"""Each body that crosses components is one class in aar_common.api: the service that answers
and the client that calls it use the same class object, no component defines it again, and the
JSON stays as docs/interfaces.md shows it."""

from __future__ import annotations

import ast
import inspect
import json
from decimal import Decimal
from pathlib import Path

from pydantic import BaseModel

from aar_agent import services as agent_services
from aar_common import api
from aar_forum import upstream as forum_upstream
from aar_gateway import admin as gateway_admin
from aar_operator import services as operator_services
from aar_operator.models import AgentBudget, ResearchRunSpec
from aar_scorer import app as scorer_app
from aar_scorer import scorer as scorer_domain

ROOT = Path(__file__).resolve().parents[2]
COMPONENTS = ("operator", "agent", "trainer", "forum", "scorer", "gateway", "devcluster")
BODIES = {
    name: model
    for name, model in vars(api).items()
    if inspect.isclass(model) and issubclass(model, BaseModel) and model.__module__ == api.__name__
}
# Same field names, another contract: the ResearchRun's status (camelCase, the id as text).
NOT_BODIES = {("operator/models.py", "Best")}


def test_server_and_client_use_the_same_class_objects() -> None:
    # The scorer's routes and the operator's client.
    assert scorer_app.RunRegistration is operator_services.RunRegistration
    assert scorer_app.RunRegistration is api.RunRegistration
    assert scorer_domain.RunRegistration is api.RunRegistration
    assert scorer_app.BestScore is api.BestScore
    assert scorer_domain.SubmissionResponse is api.SubmissionResponse
    # The gateway's routes and the operator's client.
    assert gateway_admin.api is api
    spec = ResearchRunSpec.model_validate(
        {"agents": 2, "task": {"name": "t"}, "sandbox": {"image": "i"}, "budget": {"usd": 10}}
    )
    assert type(operator_services.budget_request(spec, ["r-0"], AgentBudget())) is api.BudgetSpec
    # The operator reads spend into its status through subclasses that add no field.
    for mine, common in (
        (operator_services.Totals, api.Totals),
        (operator_services.RunSpend, api.RunSpend),
    ):
        assert issubclass(mine, common)
        assert mine.model_fields.keys() == common.model_fields.keys()
    # One error type for every client.
    assert operator_services.ServiceError is forum_upstream.ServiceError
    assert agent_services.ServiceError is forum_upstream.ServiceError


def test_no_component_defines_a_body_again() -> None:
    fields = {name: set(model.model_fields) for name, model in BODIES.items()}
    again = []
    for folder in COMPONENTS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            where = str(path.relative_to(ROOT))
            for node in ast.walk(ast.parse(path.read_text(), filename=where)):
                if not isinstance(node, ast.ClassDef) or (where, node.name) in NOT_BODIES:
                    continue
                declared = {
                    statement.target.id
                    for statement in node.body
                    if isinstance(statement, ast.AnnAssign)
                    and isinstance(statement.target, ast.Name)
                }
                bases = {ast.unparse(base).split(".")[-1] for base in node.bases}
                again += [
                    f"{where}: {node.name} is {name} again"
                    for name, names in fields.items()
                    if declared == names and name not in bases
                ]
    assert not again, again


def test_the_json_on_the_wire_is_as_documented() -> None:
    budget = api.BudgetSpec.model_validate({"usd": 0.1, "agents": {"a-0": 0.05, "a-1": None}})
    # Amounts the operator sends are JSON numbers; the gateway reads them exactly.
    assert budget.model_dump_json() == '{"usd":0.1,"agents":{"a-0":0.05,"a-1":null}}'
    assert budget.usd == Decimal("0.1")
    # Amounts the gateway reports are exact decimal strings, never floats or exponents.
    spent = api.RunSpend(
        run=api.Totals(usd=Decimal(12_345_678_000).scaleb(-9), requests=3),
        agents={"a-0": api.Totals(usd=Decimal(0).scaleb(-9))},
    )
    answer = json.loads(spent.model_dump_json())
    assert answer["run"]["usd"] == "12.345678000"
    assert answer["agents"]["a-0"]["usd"] == "0.000000000"
    assert set(answer["run"]) == {
        "usd",
        "input_tokens",
        "output_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
        "requests",
        "exhausted",
    }
    read = operator_services.RunSpend.model_validate_json(spent.model_dump_json())
    assert read.run.spend().usd == "12.345678"
    assert read.agents["a-0"].spend(agent_hours=1.5).agent_hours == 1.5
