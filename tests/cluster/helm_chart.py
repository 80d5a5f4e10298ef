"""charts/aar as cluster tests install it. A module of its own, not conftest: test folders each
have a conftest, and only one can be imported by that name."""

from __future__ import annotations

from pathlib import Path

from aar_devcluster.tools import Tool


class Chart:
    """charts/aar installed into one test's namespace. The chart also makes cluster-wide objects
    (the scorer's and the verification namespace, ClusterRoleBindings), so each test gets those
    namespaces of its own and every release is uninstalled afterwards: installs in other tests
    never collide."""

    def __init__(self, helm: Tool, path: Path, namespace: str) -> None:
        self.helm = helm
        self.path = str(path)
        self.scorer_namespace = f"{namespace}-scorer"
        self.verification_namespace = f"{namespace}-verify"
        self.releases: list[str] = []

    @property
    def values(self) -> list[str]:
        return [
            "--set",
            f"scorer.namespace={self.scorer_namespace}",
            "--set",
            f"operator.verificationNamespace={self.verification_namespace}",
        ]

    def template(self, *args: str, release: str = "aar") -> str:
        return self.helm.run("template", release, self.path, *self.values, *args)

    def install(self, *args: str, release: str = "aar") -> None:
        # No --wait: without a kubelet the chart's Deployments never become ready.
        self.helm.run("install", release, self.path, *self.values, *args)
        self.releases.append(release)

    def uninstall_all(self) -> None:
        for release in self.releases:
            self.helm.run("uninstall", release, "--wait=false", check=False)
