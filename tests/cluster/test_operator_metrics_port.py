"""The operator as `aar-operator run` serves it: /metrics on its metrics port alone, not on its
health port (Kopf's, for the kubelet's probes), and what it serves passes promtool's checks."""

from __future__ import annotations

import shutil
import subprocess
import urllib.error
import urllib.request

import pytest
from operator_process import OperatorProcess, eventually


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError:
        return 0, ""  # not listening yet


def test_the_operator_serves_metrics_on_its_metrics_port_and_not_its_health_port(
    aar_operator: OperatorProcess,
) -> None:
    health = f"http://127.0.0.1:{aar_operator.liveness_port}"
    # Kopf answers /healthz once the operator has started.
    eventually(lambda: get(f"{health}/healthz")[0] == 200, what="the operator's /healthz")
    assert get(f"{health}/metrics")[0] == 404
    status, text = get(f"http://127.0.0.1:{aar_operator.metrics_port}/metrics")
    assert status == 200
    assert "aar_operator_reconcile_duration_seconds" in text
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is missing: `make tools` installs Debian's prometheus package")
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    problems = checked.stdout + checked.stderr
    assert (checked.returncode, problems) == (0, ""), f"promtool on the operator's: {problems}"
    assert "_created" not in text
