"""The chart's forum: installed with helm into a real API server."""

from __future__ import annotations

from pathlib import Path

import pytest

from aar_devcluster.tools import Tool, ToolError


def test_helm_install_creates_the_forum_deployment_service_and_volume(
    helm: Tool, kubectl: Tool, namespace: str, repo_root: Path
) -> None:
    helm.run(
        "install",
        "aar",
        str(repo_root / "charts" / "aar"),
        "--set",
        "forum.storage.size=5Gi",
        "--set",
        "forum.maxArtifactBytes=1048576",
    )
    deployment = kubectl.json("get", "deployment", "aar-forum")
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["AAR_DATA_DIR"] == "/data"
    assert env["AAR_FORUM_MAX_ARTIFACT_BYTES"] == "1048576"
    assert env["AAR_GATEWAY_URL"] == f"http://aar-gateway.{namespace}:8080"
    assert env["AAR_CREDENTIAL_PUBLIC_KEY_FILE"].startswith("/etc/aar/credential/")
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    assert env["AAR_CREDENTIAL_PUBLIC_KEY_FILE"].startswith(mounts["public-key"])
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["public-key"]["configMap"]["name"] == "aar-credential-public-key"
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "aar-forum-data"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True

    service = kubectl.json("get", "service", "aar-forum")
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(8080, "http")]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    claim = kubectl.json("get", "pvc", "aar-forum-data")
    assert claim["spec"]["resources"]["requests"]["storage"] == "5Gi"


def test_the_values_schema_refuses_unknown_forum_keys(helm: Tool, repo_root: Path) -> None:
    with pytest.raises(ToolError) as refused:
        helm.run("template", "aar", str(repo_root / "charts" / "aar"), "--set", "forum.replicas=2")
    assert "replicas" in refused.value.stderr


def test_the_forum_can_be_left_out(helm: Tool, repo_root: Path) -> None:
    rendered = helm.run(
        "template", "aar", str(repo_root / "charts" / "aar"), "--set", "forum.enabled=false"
    )
    assert "aar-forum" not in rendered
