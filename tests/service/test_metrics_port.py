"""Each service as it is deployed (`aar-forum`, `aar-scorer` with its intake workers,
`aar-gateway`, each its own process) serves /metrics on its metrics port and nowhere else: the
API port, the only one the agents' NetworkPolicy opens, answers 404 for it, so no agent reads
another run's counters (docs/operations.md, Network policies). What it serves passes promtool's
checks."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.request

import pytest
from agent_env import Service

# A metric each service declares, so a 200 with some other exporter's page would not pass.
DECLARED = {
    "forum": "aar_forum_posts_total",
    "scorer": "aar_scorer_submissions_total",
    "gateway": "aar_llm_requests_total",
}


@pytest.fixture
def served(services: tuple[Service, Service], gateway: Service) -> dict[str, Service]:
    forum, scorer = services
    return {"forum": forum, "scorer": scorer, "gateway": gateway}


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_each_service_serves_metrics_on_its_metrics_port_and_404_on_its_api_port(
    served: dict[str, Service],
) -> None:
    for name, service in served.items():
        status, text = get(f"{service.metrics_url}/metrics")
        assert status == 200, f"{name}: {text}"
        assert f"# HELP {DECLARED[name]} " in text, name
        status, text = get(f"{service.url}/metrics")
        assert status == 404, f"{name} serves /metrics on its API port"
        assert json.loads(text)["error"]["type"] == "not_found_error"
        assert DECLARED[name] not in text
        # The API port still answers what it is for.
        assert get(f"{service.url}/healthz") == (200, "ok")


def test_promtool_finds_nothing_wrong_in_each_services_metrics(
    served: dict[str, Service],
) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is missing: `make tools` installs Debian's prometheus package")
    for name, service in served.items():
        status, text = get(f"{service.metrics_url}/metrics")
        assert status == 200, f"{name}: {text}"
        checked = subprocess.run(
            [promtool, "check", "metrics"],
            input=text,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        problems = checked.stdout + checked.stderr
        assert (checked.returncode, problems) == (0, ""), f"promtool on the {name}'s: {problems}"
        # Not a series per label set that nothing reads.
        assert "_created" not in text, name
