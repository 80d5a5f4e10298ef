"""Where the console finds the Kubernetes API and how it proves who it is."""

from __future__ import annotations

from pathlib import Path

from aar_forum.kube import KubeAccess


def test_access_comes_from_the_cluster_or_an_explicit_server(tmp_path: Path) -> None:
    assert KubeAccess.from_env({}) is None
    inside = KubeAccess.from_env({"KUBERNETES_SERVICE_HOST": "10.0.0.1"})
    assert inside is not None
    assert inside.server == "https://10.0.0.1:443"
    assert inside.token_file == Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    ipv6 = KubeAccess.from_env(
        {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "6443"}
    )
    assert ipv6 is not None
    assert ipv6.server == "https://[fd00::1]:6443"
    ca = tmp_path / "ca.crt"
    ca.write_text("")
    explicit = KubeAccess.from_env(
        {
            "AAR_FORUM_KUBE_API": "https://127.0.0.1:6443",
            "AAR_FORUM_KUBE_TOKEN_FILE": str(tmp_path / "token"),
            "AAR_FORUM_KUBE_CA_FILE": str(ca),
        }
    )
    assert explicit == KubeAccess("https://127.0.0.1:6443", tmp_path / "token", ca)
