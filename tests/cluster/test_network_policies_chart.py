"""Who can reach which port of aar's components, decided from the NetworkPolicies as the API
server stores them: the chart's (installed here) and the operator's sandbox policy (its builder's
output, defaulted by a server-side dry run). No NetworkPolicy-enforcing CNI exists here
(DESIGN.md), so `allowed` below evaluates the policies by Kubernetes' rules: a connection needs
the source's egress and the destination's ingress to allow it; a Pod no policy of a direction
selects is open in that direction; within a direction the policies' rules add up.

What must hold (docs/operations.md, Network policies): an agent reaches each service's API port
and no metrics port, each layer on its own (the sandbox's egress and the services' ingress), so
that opening one by mistake still fails here; Prometheus reaches every metrics port; the
operator and the forum reach what they call.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from helm_chart import Chart

from aar_devcluster.controlplane import ControlPlane
from aar_devcluster.tools import Tool
from aar_operator import builders, reproductions
from aar_operator.config import OperatorConfig
from aar_operator.models import AgentSandboxSpec

API_PORT = 8080
# Kubernetes sets this label on every namespace from 1.21 on; the control plane here is 1.20.
NAME_LABEL = "kubernetes.io/metadata.name"
MONITORING = "monitoring"  # the chart's default networkPolicy.prometheus namespace


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    labels: dict[str, str]
    ports: dict[str, int] = field(default_factory=dict)  # container ports by name


# --- Kubernetes NetworkPolicy semantics, as written in the API reference -----------------------


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A label selector; `{}` selects everything."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for requirement in selector.get("matchExpressions") or []:
        key, operator, values = (
            requirement["key"],
            requirement["operator"],
            requirement.get("values"),
        )
        present = key in labels
        if operator == "In" and not (present and labels[key] in values):
            return False
        if operator == "NotIn" and present and labels[key] in values:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True


def peer_matches(
    peer: dict[str, Any], pod: Pod, policy_namespace: str, namespaces: dict[str, dict[str, str]]
) -> bool:
    assert "ipBlock" not in peer, "ipBlock peers name addresses, not Pods: not evaluated here"
    if "namespaceSelector" in peer:
        in_namespace = selects(peer["namespaceSelector"], namespaces[pod.namespace])
    else:
        in_namespace = pod.namespace == policy_namespace  # the policy's own namespace
    return in_namespace and selects(peer.get("podSelector") or {}, pod.labels)


def port_matches(ports: list[dict[str, Any]] | None, destination: Pod, port: int) -> bool:
    """A rule's ports against the destination Pod's port (TCP); none listed: every port."""
    if not ports:
        return True
    for entry in ports:
        if entry.get("protocol", "TCP") != "TCP":
            continue
        if "port" not in entry:
            return True
        named = entry["port"]
        if isinstance(named, str):
            if destination.ports.get(named) == port:
                return True
        elif named <= port <= entry.get("endPort", named):
            return True
    return False


def policy_types(spec: dict[str, Any]) -> list[str]:
    given: list[str] = spec.get("policyTypes") or []
    return given or ["Ingress", *(["Egress"] if spec.get("egress") else [])]


def direction_allows(
    policies: list[dict[str, Any]],
    direction: str,
    source: Pod,
    destination: Pod,
    port: int,
    namespaces: dict[str, dict[str, str]],
) -> bool:
    """Whether the policies of one side (the source's egress or the destination's ingress)
    let the connection through."""
    subject, other = (source, destination) if direction == "Egress" else (destination, source)
    rules_key, peers_key = ("egress", "to") if direction == "Egress" else ("ingress", "from")
    applying = [
        p
        for p in policies
        if p["metadata"]["namespace"] == subject.namespace
        and selects(p["spec"]["podSelector"], subject.labels)
        and direction in policy_types(p["spec"])
    ]
    if not applying:
        return True  # not isolated in this direction
    return any(
        port_matches(rule.get("ports"), destination, port)
        and (
            not rule.get(peers_key)
            or any(
                peer_matches(peer, other, policy["metadata"]["namespace"], namespaces)
                for peer in rule[peers_key]
            )
        )
        for policy in applying
        for rule in policy["spec"].get(rules_key) or []
    )


@dataclass
class Landscape:
    """The chart installed in `namespace`, an agent in `run_namespace`, and the policies."""

    policies: list[dict[str, Any]]
    namespaces: dict[str, dict[str, str]]
    components: dict[str, Pod]  # the chart's Pods by component, as their Deployments make them
    agent: Pod
    sandbox_policy: dict[str, Any]
    reproduction: Pod  # a reproduction Job's Pod, in the verification namespace

    def egress(self, source: Pod, destination: Pod, port: int) -> bool:
        return direction_allows(self.policies, "Egress", source, destination, port, self.namespaces)

    def ingress(self, source: Pod, destination: Pod, port: int) -> bool:
        return direction_allows(
            self.policies, "Ingress", source, destination, port, self.namespaces
        )

    def allowed(self, source: Pod, destination: Pod, port: int) -> bool:
        return self.egress(source, destination, port) and self.ingress(source, destination, port)


def component_pods(kubectl: Tool, namespace: str) -> dict[str, Pod]:
    pods = {}
    for deployment in kubectl.json("get", "deployments", "-n", namespace)["items"]:
        template = deployment["spec"]["template"]
        labels = template["metadata"]["labels"]
        ports = {
            p["name"]: p["containerPort"]
            for c in template["spec"]["containers"]
            for p in c.get("ports", [])
        }
        pods[labels["app.kubernetes.io/component"]] = Pod(
            f"{deployment['metadata']['name']}-0", namespace, labels, ports
        )
    return pods


Survey = Callable[..., Landscape]


@pytest.fixture
def survey(
    chart: Chart, control_plane: ControlPlane, namespace: str, more_namespaces: Any
) -> Survey:
    """Installs the chart, with `values(run_namespace)` (default none), and reads back what
    deciding a connection needs."""

    def make(values: Callable[[str], list[str]] = lambda _: []) -> Landscape:
        run_namespace = more_namespaces("run")
        chart.install(*values(run_namespace))
        admin = Tool("kubectl", control_plane.kubeconfig_path)
        return read_landscape(admin, namespace, chart.scorer_namespace, run_namespace)

    return make


@pytest.fixture
def landscape(survey: Survey) -> Landscape:
    return survey()


def read_landscape(
    admin: Tool, namespace: str, scorer_namespace: str, run_namespace: str
) -> Landscape:
    """The chart's Pods (as its Deployments make them) and policies in `namespace` and
    `scorer_namespace`, an agent and its sandbox policy in `run_namespace`."""
    components = {
        **component_pods(admin, namespace),
        **component_pods(admin, scorer_namespace),
    }
    # The operator's sandbox policy, for the namespaces the chart tells the operator.
    env = {
        e["name"]: e.get("value")
        for e in admin.json("get", "deployment", "-n", namespace, "aar-operator")["spec"][
            "template"
        ]["spec"]["containers"][0]["env"]
    }
    config = OperatorConfig(
        namespace=namespace,
        services_namespace=env["AAR_SERVICES_NAMESPACE"],
        scorer_namespace=env["AAR_SCORER_NAMESPACE"],
    )
    spec = AgentSandboxSpec.model_validate(
        {
            "run": "w2s",
            "task": {"name": "w2s-chat"},
            "sandbox": {"image": "agent:1", "resources": {"cpu": 1, "memory": "1Gi"}},
        }
    )
    sandbox = builders.Sandbox(run_namespace, "w2s-3", "uid-3", spec)
    agent_pod = builders.pod(sandbox, config)
    agent = Pod(agent_pod["metadata"]["name"], run_namespace, agent_pod["metadata"]["labels"])
    made = builders.network_policy(sandbox, config)
    del made["metadata"]["ownerReferences"]  # no AgentSandbox owns it here
    sandbox_policy = json.loads(
        admin.run("create", "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(made))
    )
    # What the operator puts in the verification namespace before its first reproduction Job.
    verification = env["AAR_VERIFICATION_NAMESPACE"]
    assert verification
    deny_all = json.loads(
        admin.run(
            "create", "--dry-run=server", "-o", "json", "-f", "-",
            input=json.dumps(reproductions.deny_all_policy(verification)),
        )
    )  # fmt: skip
    reproduction = Pod(
        "repro-7-w2s-chat-fresh-x", verification, {"app.kubernetes.io/component": "reproduction"}
    )
    stored = [
        policy
        for ns in (namespace, scorer_namespace)
        for policy in admin.json("get", "networkpolicies", "-n", ns)["items"]
    ]
    assert {p["metadata"]["name"] for p in stored} == {
        "aar-forum",
        "aar-gateway",
        "aar-scorer",
        "aar-operator",
    }
    namespaces = {
        item["metadata"]["name"]: {
            NAME_LABEL: item["metadata"]["name"],
            **(item["metadata"].get("labels") or {}),
        }
        for item in admin.json("get", "namespaces")["items"]
    }
    namespaces[MONITORING] = {NAME_LABEL: MONITORING}
    return Landscape(
        [*stored, sandbox_policy, deny_all],
        namespaces,
        components,
        agent,
        sandbox_policy,
        reproduction,
    )


SERVICES = ("forum", "gateway", "scorer")


def test_an_agent_reaches_each_services_api_port_and_nothing_else(landscape: Landscape) -> None:
    agent = landscape.agent
    for name, pod in landscape.components.items():
        assert set(pod.ports) >= {"metrics"}, f"{name} has no metrics port"
        for port_name, port in pod.ports.items():
            expected = name in SERVICES and port_name == "http"
            assert landscape.allowed(agent, pod, port) is expected, (name, port_name, port)
    for name in SERVICES:
        assert landscape.components[name].ports["http"] == API_PORT


def test_each_layer_alone_keeps_agents_off_every_metrics_port(landscape: Landscape) -> None:
    # The sandbox's egress and the services' ingress each refuse on their own: a mistake in
    # one of them is not hidden by the other.
    agent = landscape.agent
    for name, pod in landscape.components.items():
        metrics = pod.ports["metrics"]
        assert not landscape.egress(agent, pod, metrics), f"the sandbox policy opens {name}'s"
        assert not landscape.ingress(agent, pod, metrics), f"{name}'s policy admits agents"
        if name in SERVICES:
            assert landscape.egress(agent, pod, API_PORT), name
            assert landscape.ingress(agent, pod, API_PORT), name
    # The sandbox policy names its ports: no rule towards the services leaves them open.
    for rule in landscape.sandbox_policy["spec"]["egress"]:
        assert rule.get("ports"), rule
        assert all(isinstance(p.get("port"), int) for p in rule["ports"]), rule


def test_prometheus_reaches_every_metrics_port_and_no_api_port(landscape: Landscape) -> None:
    prometheus = Pod("prometheus-0", MONITORING, {"app.kubernetes.io/name": "prometheus"})
    elsewhere = Pod("prometheus-0", landscape.agent.namespace, prometheus.labels)
    for name, pod in landscape.components.items():
        assert landscape.allowed(prometheus, pod, pod.ports["metrics"]), name
        assert not landscape.allowed(elsewhere, pod, pod.ports["metrics"]), name
        for port_name, port in pod.ports.items():
            if port_name != "metrics":
                assert not landscape.allowed(prometheus, pod, port), (name, port_name)


def test_the_operator_and_the_forum_reach_the_services_they_call(landscape: Landscape) -> None:
    pods = landscape.components
    calls = {
        ("operator", "gateway"),
        ("operator", "scorer"),
        # The artifacts it reproduces, with a verifier credential.
        ("operator", "forum"),
        ("forum", "gateway"),
        ("forum", "scorer"),
    }
    for caller in ("operator", "forum", "gateway", "scorer"):
        for callee in SERVICES:
            if caller != callee:
                expected = (caller, callee) in calls
                got = landscape.allowed(pods[caller], pods[callee], API_PORT)
                assert got is expected, (caller, callee)
    # A Pod in a run's namespace without the agents' labels reaches no service.
    stranger = Pod("notebook", landscape.agent.namespace, {"app": "notebook"})
    for name in SERVICES:
        assert not landscape.allowed(stranger, pods[name], API_PORT), name


def test_a_reproduction_reaches_nothing_and_nothing_reaches_it(landscape: Landscape) -> None:
    job = landscape.reproduction
    dns = Pod("kube-dns-0", "kube-system", {"k8s-app": "kube-dns"}, {"dns": 53})
    for pod in [*landscape.components.values(), landscape.agent, dns]:
        for port in {API_PORT, 53, *pod.ports.values()}:
            assert not landscape.egress(job, pod, port), (pod.name, port)
            assert not landscape.ingress(pod, job, port), (pod.name, port)


def test_with_run_namespaces_listed_only_agents_there_reach_the_services(survey: Survey) -> None:
    landscape = survey(lambda run: ["--set", f"operator.runNamespaces={{{run}}}"])
    agent = landscape.agent
    # The same labels on a Pod in a namespace off the list: not an agent of any run.
    other = f"{agent.namespace}-other"
    landscape.namespaces[other] = {NAME_LABEL: other}
    impostor = Pod(agent.name, other, agent.labels)
    for name in SERVICES:
        pod = landscape.components[name]
        assert landscape.ingress(agent, pod, API_PORT), name
        assert not landscape.ingress(impostor, pod, API_PORT), name
