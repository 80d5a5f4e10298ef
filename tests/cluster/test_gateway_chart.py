"""The gateway's part of the chart, installed into a real API server: the objects are accepted
as rendered, and the pod mounts the API key's Secret, the public key and its volume."""

from __future__ import annotations

from pathlib import Path

from helm_chart import Chart

from aar_devcluster.tools import Tool


def test_helm_installs_the_gateway_with_its_key_secret_volume_and_service(
    chart: Chart, kubectl: Tool, tmp_path: Path
) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(
        "gateway:\n"
        "  enabled: true\n"
        "  apiKey: {existingSecret: anthropic-api-key}\n"
        "  prices:\n"
        "    version: ours-1\n"
        "    default: {input: 5, output: 25, cache_write: 6.25, cache_read: 0.5}\n"
        "    aliases: {claude-opus-4-6-20260101: claude-opus-4-6}\n"
    )
    kubectl.run(
        "create", "secret", "generic", "anthropic-api-key", "--from-literal=api-key=sk-ant-x"
    )
    chart.install("-f", str(values))

    deployment = kubectl.json("get", "deployment", "aar-gateway")
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert pod["automountServiceAccountToken"] is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["api-key"]["secret"]["secretName"] == "anthropic-api-key"
    assert volumes["api-key"]["secret"]["defaultMode"] == 0o440
    assert volumes["credential-public-key"]["configMap"]["name"] == "aar-credential-public-key"
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "aar-gateway-data"
    service = kubectl.json("get", "service", "aar-gateway")
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [
        (8080, "http"),
        (9090, "metrics"),
    ]
    # The Service selects the gateway's pods and nothing else the chart makes.
    selector = ",".join(f"{k}={v}" for k, v in service["spec"]["selector"].items())
    assert kubectl.json("get", "deployments", "-l", selector)["items"][0]["metadata"]["name"] == (
        "aar-gateway"
    )
    claim = kubectl.json("get", "pvc", "aar-gateway-data")
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    prices = kubectl.json("get", "configmap", "aar-gateway-prices")
    assert "version: ours-1" in prices["data"]["prices.yaml"]
    assert "claude-opus-4-6-20260101: claude-opus-4-6" in prices["data"]["prices.yaml"]
    # The Deployment made a ReplicaSet and a (Pending: no kubelet here) Pod from that template.
    pods = kubectl.json("get", "pods", "-l", selector)["items"]
    assert len(pods) == 1
