"""The chart's forum: installed with helm into a real API server."""

from __future__ import annotations

import base64
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web
from helm_chart import Chart
from operator_process import eventually

from aar_common.credentials import CredentialIssuer, generate_signing_key, public_key_pem
from aar_devcluster.controlplane import ControlPlane
from aar_devcluster.tools import Tool, ToolError
from aar_forum.app import build_app
from aar_forum.kube import KubeAccess
from aar_forum.settings import Settings


def test_helm_install_creates_the_forum_deployment_service_and_volume(
    chart: Chart, kubectl: Tool, namespace: str
) -> None:
    chart.install(
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
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [
        (8080, "http"),
        (9090, "metrics"),
    ]
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
    # Other components name the forum's URL; no object of the forum's own is rendered.
    names = [o["metadata"]["name"] for o in yaml.safe_load_all(rendered) if o]
    assert [name for name in names if "aar-forum" in name] == []


async def test_the_console_reads_runs_and_sandboxes_with_the_charts_rbac(
    chart: Chart,
    kubectl: Tool,
    namespace: str,
    control_plane: ControlPlane,
    crds: None,
    tmp_path: Path,
    unused_tcp_port: int,
) -> None:
    chart.install()
    # The forum's own ServiceAccount token (1.20's token controller writes it into a Secret).
    secret = eventually(
        lambda: kubectl.json("get", "serviceaccount", "aar-forum").get("secrets"),
        what="the aar-forum ServiceAccount's token",
    )[0]["name"]
    data = kubectl.json("get", "secret", secret)["data"]
    (tmp_path / "token").write_bytes(base64.b64decode(data["token"]))
    (tmp_path / "ca.crt").write_bytes(base64.b64decode(data["ca.crt"]))
    config = yaml.safe_load(control_plane.kubeconfig_path.read_text())
    server = config["clusters"][0]["cluster"]["server"]
    forum = f"system:serviceaccount:{namespace}:aar-forum"
    for verb, resource, allowed in [
        ("list", "researchruns.aar.dev", "yes"),
        ("list", "agentsandboxes.aar.dev", "yes"),
        ("list", "pods", "no"),
        ("get", "secrets", "no"),
        ("patch", "researchruns.aar.dev", "no"),
    ]:
        said = kubectl.run("auth", "can-i", verb, resource, "--as", forum, check=False)
        assert said.strip() == allowed, (verb, resource, said)
    task = {"name": "w2s-chat"}
    sandbox = {"image": "aar-agent:test"}
    kubectl.apply(
        {
            "apiVersion": "aar.dev/v1alpha1",
            "kind": "ResearchRun",
            "metadata": {"name": "w2s"},
            "spec": {"agents": 1, "task": task, "sandbox": sandbox, "budget": {"usd": 10}},
        }
    )
    kubectl.apply(
        {
            "apiVersion": "aar.dev/v1alpha1",
            "kind": "AgentSandbox",
            "metadata": {"name": "w2s-1", "labels": {"aar.dev/run": "w2s"}},
            "spec": {"run": "w2s", "task": task, "sandbox": sandbox},
        }
    )

    key = generate_signing_key()
    (tmp_path / "public-key.pem").write_bytes(public_key_pem(key))
    settings = Settings(
        data_dir=tmp_path / "data",
        public_key_file=tmp_path / "public-key.pem",
        kube=KubeAccess(server, tmp_path / "token", tmp_path / "ca.crt"),
    )
    runner = web.AppRunner(build_app(settings))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
    admin = CredentialIssuer(key).mint_admin("alice")
    url = f"http://127.0.0.1:{unused_tcp_port}"
    try:
        async with aiohttp.ClientSession(cookies={"aar_credential": admin}) as http:
            async with http.get(f"{url}/") as response:
                runs = await response.text()
            async with http.get(f"{url}/runs/{namespace}/w2s") as response:
                page = await response.text()
            async with http.get(f"{url}/runs/{namespace}/none") as response:
                empty = await response.text()
    finally:
        await runner.cleanup()
    assert "runs-unavailable" not in runs
    assert f'<tr data-run="{namespace}/w2s">' in runs
    assert "sandbox states unavailable" not in page
    row = page[page.index('data-agent="w2s-1"') :].split("</tr>")[0]
    # No operator runs here: the sandbox has no status yet, and the console says so.
    assert ">Pending</td>" in row
    assert "the run&#39;s status unavailable: the Kubernetes API answered 404" in empty
