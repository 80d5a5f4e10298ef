"""The research console in headless Chromium, over a real run: the operator on the real
apiserver, the gateway, the scorer and the forum as local processes, and agents that spend,
post, publish artifacts and submit through the real APIs with their own credentials. A human
signs in, finds the run, reads its page and charts, rejects a flagged submission and approves
another, and the run's status.best follows on the apiserver.

With AAR_CONSOLE_SCREENSHOTS=DIR the run page and the review page are saved there at
1280x800 (docs/images holds the README's)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from archives import tar_gz
from operator_process import eventually
from playwright.sync_api import Page, expect, sync_playwright
from service_processes import LABELS, Services, call, publish

from aar_devcluster.controlplane import ControlPlane
from aar_devcluster.tools import Tool

pytestmark = pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="Debian's chromium is not installed (apt-get install chromium; CI installs it)",
)


def answers(right: int, flips: tuple[int, ...] = ()) -> list[int]:
    """Predictions with the first `right` labels true and the rest wrong, then `flips` flipped."""
    predictions = [label if index < right else 1 - label for index, label in enumerate(LABELS)]
    for index in flips:
        predictions[index] = 1 - predictions[index]
    return predictions


def sign_in(page: Page, forum: str, credential: str) -> None:
    page.goto(f"{forum}/")
    page.fill("input[name=credential]", credential)
    page.click("button[type=submit]")
    expect(page).to_have_url(f"{forum}/")


def test_a_reviewer_reads_the_run_and_decides_in_the_browser(
    control_plane: ControlPlane,
    kubectl: Tool,
    namespace: str,
    operator_namespace: str,
    crds: None,
    tmp_path: Path,
) -> None:
    # Feedback open for the whole test (the default leakage budget closes a 40-label task's
    # feedback at once), so the public line of the chart has points; probes are flagged for a
    # reviewer rather than refused.
    services = Services(
        tmp_path,
        {
            "feedback": {"leakage_budget": None, "allow_vacuous_bound": True},
            "probing": {"action": "flag"},
        },
    )
    services.start()
    state = control_plane.read_state()
    assert state is not None
    forum = services.start_forum(state.server, state.token, control_plane.pki_dir / "ca.crt")
    operator = services.operator(
        control_plane.kubeconfig_path, operator_namespace, tmp_path / "operator.log"
    )
    operator.start()
    try:
        kubectl.apply(
            {
                "apiVersion": "aar.dev/v1alpha1",
                "kind": "ResearchRun",
                "metadata": {"name": "console"},
                "spec": {
                    "agents": 3,
                    "task": {"name": "w2s-chat"},
                    "sandbox": {"image": "agent:test"},
                    "budget": {"usd": 5, "deadline": "48h"},
                    "review": {"required": True},
                },
            }
        )

        def registered() -> bool:
            run = kubectl.json("get", "rr", "console")
            conditions = (run.get("status") or {}).get("conditions", [])
            return any(
                c["type"] == "ServicesReachable" and c["status"] == "True" for c in conditions
            )

        eventually(registered, what="the run registered with the gateway and the scorer")
        agent = {n: services.agent(namespace, "console", f"console-{n}") for n in range(3)}

        # The agents at work: model requests, posts, artifacts, submissions.
        for n in (0, 1, 1, 2):
            status, answer = call(
                f"{services.gateway}/v1/messages",
                agent[n],
                {"model": "claude-opus-4-6", "max_tokens": 64,
                 "messages": [{"role": "user", "content": "Plan the next experiment. " * 30}]},
                method="POST",
            )  # fmt: skip
            assert status == 200, answer
        first = publish(
            forum, agent[1], "experiments.tar.gz",
            tar_gz({"experiments/train.py": b"loss = 'confidence'\n",
                     "experiments/seed0.json": b"{}"}),
        )  # fmt: skip
        second = publish(
            forum, agent[1], "experiments.tar.gz",
            tar_gz({"experiments/train.py": b"loss = 'confidence'  # alpha 0.75\n",
                     "experiments/seed0.json": b"{}", "experiments/seed1.json": b"{}"}),
        )  # fmt: skip
        submitted: dict[str, int] = {}
        for key, n, predictions, method, artifact in [
            ("weak", 0, answers(20), "logistic probe on the weak labels", None),
            ("good", 1, answers(34), "confidence loss, alpha 0.75\nthree seeds", first),
            ("probe", 1, answers(34, (35, 36, 37)), "confidence loss, alpha 0.8\nthree seeds",
             second),
        ]:  # fmt: skip
            status, answer = call(
                f"{services.scorer}/api/v1/submissions",
                agent[n],
                {"task": "w2s-chat", "predictions": predictions, "method": method,
                 "artifact": artifact},
                method="POST",
            )  # fmt: skip
            assert status == 200, answer
            submitted[key] = answer["id"]
        flagged, good = submitted["probe"], submitted["good"]
        status, answer = call(
            f"{forum}/api/v1/posts",
            agent[1],
            {"kind": "result", "title": "Confidence loss: 0.83 PGR on three seeds",
             "body": "Submitted as the run's best so far.", "submissions": [str(good)]},
            method="POST",
        )  # fmt: skip
        assert status in (200, 201), answer

        screenshots = Path(os.environ.get("AAR_CONSOLE_SCREENSHOTS") or tmp_path)
        screenshots.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as playwright:
            # Root in a container has no user namespace for Chromium's sandbox.
            browser = playwright.chromium.launch(
                executable_path=shutil.which("chromium"), args=["--no-sandbox"]
            )
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            sign_in(page, forum, services.issuer.mint_admin("alice"))

            # The run, from the cluster, with its summary.
            row = page.locator(f"#runs tr[data-run='{namespace}/console']")
            expect(row).to_be_visible()
            expect(row.locator("td.agents")).to_contain_text("/3 ready")
            expect(row.locator("td.spend")).to_contain_text("of $5.00")
            expect(row.locator("meter")).to_have_count(1)
            # None approved yet; the best pending one is shown beside it.
            expect(row.locator("td.best")).to_have_text(re.compile(r"^— · \d+\.\d{3}$"))
            row.locator("a.run").click()
            expect(page).to_have_url(f"{forum}/runs/{namespace}/console")

            # Its page: summary, charts drawn from the services' histories, leaderboard.
            summary = page.locator("#summary")
            expect(summary.locator(".model")).to_have_text("claude-opus-4-6")
            expect(summary.locator(".task")).to_have_text("w2s-chat")
            expect(summary.locator(".ends")).to_contain_text("UTC")
            for chart, series in [
                ("#chart-spend", "spent (USD)"),
                ("#chart-scores", "best public feedback"),
                ("#chart-submissions", "submissions"),
            ]:
                path = page.locator(f"{chart} svg path[data-series='{series}']")
                expect(path).to_have_attribute("d", re.compile(r"^M[\d.]+,[\d.]+"))
            expect(page.locator("#chart-states svg path.bar")).not_to_have_count(0)
            board = page.locator("#leaderboard tbody tr")
            expect(board).to_have_count(3)
            expect(board.first).to_contain_text("console-1")
            agents = page.locator("#agents tbody tr")
            expect(agents.locator("td:first-child")).to_have_text(
                ["console-0", "console-1", "console-2"]
            )
            page.screenshot(path=str(screenshots / "console-run.png"))

            # The review queue: the flagged submission first.
            page.goto(f"{forum}/review")
            queue = page.locator("table.queue tbody tr")
            expect(queue.first).to_have_attribute("data-submission", str(flagged))
            expect(queue.first).to_contain_text("flagged")
            queue.first.locator("a").click()
            expect(page).to_have_url(f"{forum}/submissions/{flagged}")
            expect(page.locator("#probe")).to_contain_text(f"#{good}")
            expect(page.locator("#diff pre.diff .add")).to_contain_text(["alpha 0.8"])
            expect(page.locator("#diff ul.files-diff li")).to_contain_text(
                ["added experiments/seed1.json", "changed experiments/train.py"]
            )
            expect(page.locator("#artifact table.files td code")).to_contain_text(
                ["experiments/train.py"]
            )
            expect(page.locator("#posts article")).to_contain_text(["Confidence loss: 0.83 PGR"])
            page.screenshot(path=str(screenshots / "console-review.png"))
            page.fill("form.decide textarea[name=comment]", f"Three answers off #{good}: a probe.")
            page.click("form.decide button.reject")
            audit = page.locator("#reviews table.audit tbody tr")
            expect(audit).to_have_count(1)
            expect(audit.locator("td")).to_contain_text(
                ["UTC", "admin:alice", "reject", f"Three answers off #{good}"]
            )
            expect(page.locator(".review-state")).to_have_text("reject")

            # A decision without a reason is not taken.
            page.goto(f"{forum}/submissions/{good}")
            page.locator("form.decide textarea[name=comment]").evaluate(
                "area => area.removeAttribute('required')"
            )
            page.click("form.decide button.approve")
            expect(page.locator("#problem")).to_contain_text("Say why")
            page.fill("form.decide textarea[name=comment]", "Reproduced from the artifact.")
            page.click("form.decide button.approve")
            expect(page.locator(".review-state")).to_have_text("approve")
            browser.close()

        def best() -> dict[str, Any] | None:
            found = (kubectl.json("get", "rr", "console").get("status") or {}).get("best")
            return found if found and found.get("submission") == str(good) else None

        counted = eventually(best, what="status.best: the approved submission")
        assert counted["agent"] == "console-1"
    finally:
        operator.stop()
        services.stop()
        print(f"--- operator log (tail) ---\n{operator.log()}")
