"""Generate the CustomResourceDefinitions from the pydantic models.

Pydantic writes JSON Schema with `$ref`s, `anyOf [X, null]` for optional fields and titles;
Kubernetes wants a structural schema: everything inlined, one `type` per node, no nulls. This
module translates one into the other, so the CRDs in `crds/` and `charts/aar/crds/` are a build
output (`aar-operator crds`), checked in sync by a unit test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from aar_operator.models import GROUP, VERSION, AgentSandboxSpec, ResearchRunSpec

# Keywords that a structural schema may carry; pydantic's titles and defaults of
# default_factory fields are dropped (defaults are applied by the models, in one place).
_KEPT = {
    "type",
    "description",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "pattern",
    "enum",
    "default",
    "x-kubernetes-int-or-string",
}


def _structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        resolved = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**resolved, **{k: v for k, v in node.items() if k != "$ref"}}
        return _structural(merged, defs)
    if node.get("x-kubernetes-int-or-string"):
        return {k: v for k, v in node.items() if k in _KEPT or k == "anyOf"}
    variants = node.get("anyOf")
    if variants is not None:
        # Optional[X] is X that may be left out; Kubernetes prunes nulls anyway.
        concrete = [v for v in variants if v.get("type") != "null"]
        if len(concrete) != 1:
            raise ValueError(f"cannot express a union in a structural schema: {variants}")
        outer = {k: v for k, v in node.items() if k != "anyOf"}
        merged = {**concrete[0], **outer}
        if merged.get("default", ...) is None:
            del merged["default"]
        return _structural(merged, defs)
    out: dict[str, Any] = {k: v for k, v in node.items() if k in _KEPT}
    if "description" in out:
        # A docstring's line breaks are the source's, not the reader's (kubectl explain wraps).
        out["description"] = " ".join(out["description"].split())
    if out.get("default") == "":
        del out["default"]  # the 1.20 apiserver reads an empty default as null, and refuses it
    if node.get("type") == "object" and "properties" in node:
        out["properties"] = {
            name: _structural(child, defs) for name, child in node["properties"].items()
        }
        if node.get("required"):
            out["required"] = list(node["required"])
    if node.get("type") == "array" and "items" in node:
        out["items"] = _structural(node["items"], defs)
    return out


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A structural OpenAPI v3 schema for `model`, as a CRD's `spec` property."""
    schema = model.model_json_schema(by_alias=True, mode="validation")
    return _structural(schema, schema.get("$defs", {}))


def _crd(
    *,
    kind: str,
    plural: str,
    short: str,
    spec_model: type[BaseModel],
    columns: list[dict[str, Any]],
    description: str,
) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "aar"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short],
                "categories": ["aar"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": description,
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": openapi_schema(spec_model),
                                # Status is written only by the operator, from its models.
                                "status": {
                                    "type": "object",
                                    "x-kubernetes-preserve-unknown-fields": True,
                                },
                            },
                        }
                    },
                }
            ],
        },
    }


def _ready_condition(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Ready")].reason',
    }


def _ready_message() -> dict[str, Any]:
    """Why the object is (not) ready, in the operator's words: with `kubectl get -o wide`."""
    return {
        "name": "Message",
        "type": "string",
        "priority": 1,
        "jsonPath": '.status.conditions[?(@.type=="Ready")].message',
    }


def definitions() -> dict[str, dict[str, Any]]:
    """File name -> CRD, for both kinds."""
    age = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
    spent = {"name": "Spent", "type": "string", "jsonPath": ".status.spent"}
    return {
        "researchruns.yaml": _crd(
            kind="ResearchRun",
            plural="researchruns",
            short="rr",
            spec_model=ResearchRunSpec,
            description="A fleet of research agents working on one task under one budget.",
            columns=[
                {"name": "Ready", "type": "string", "jsonPath": ".status.ready"},
                _ready_condition("Status"),
                {"name": "Model", "type": "string", "jsonPath": ".spec.model"},
                {"name": "Task", "type": "string", "jsonPath": ".spec.task.name"},
                spent,
                {"name": "Budget", "type": "string", "jsonPath": ".status.budget"},
                # The best counted submission's score: Performance Gap Recovered.
                {"name": "PGR", "type": "number", "jsonPath": ".status.best.score"},
                # Its score when its code ran again on data no agent saw (spec.review.reproduce).
                {"name": "Reproduced", "type": "number", "jsonPath": ".status.best.reproduced"},
                {"name": "Ends", "type": "string", "jsonPath": ".status.ends"},
                age,
                _ready_message(),
            ],
        ),
        "agentsandboxes.yaml": _crd(
            kind="AgentSandbox",
            plural="agentsandboxes",
            short="asb",
            spec_model=AgentSandboxSpec,
            description="One research agent: its Pod, workspace, credential and network policy.",
            columns=[
                {
                    "name": "Ready",
                    "type": "string",
                    "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
                },
                _ready_condition("Status"),
                {"name": "Run", "type": "string", "jsonPath": ".spec.run"},
                spent,
                age,
                _ready_message(),
            ],
        ),
    }


HEADER = "# Generated from aar_operator.models by `aar-operator crds`; do not edit.\n"


def render(crd: dict[str, Any]) -> str:
    return HEADER + yaml.safe_dump(crd, sort_keys=False, width=100)


def write(directories: list[Path]) -> list[Path]:
    """Write every CRD into each directory; returns the files written."""
    written = []
    for directory in directories:
        directory.mkdir(parents=True, exist_ok=True)
        for name, crd in definitions().items():
            path = directory / name
            path.write_text(render(crd))
            written.append(path)
    return written


def stale(directories: list[Path]) -> list[Path]:
    """The CRD files that differ from what the models generate (missing ones included)."""
    return [
        directory / name
        for directory in directories
        for name, crd in definitions().items()
        if not (directory / name).is_file() or (directory / name).read_text() != render(crd)
    ]
