"""The web UI in headless Chromium (Debian's `chromium`), with real forum data in it."""

from __future__ import annotations

import asyncio
import random
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from forum_harness import ISSUER, SIGNING_KEY, Forum
from gateway_harness import Gateway, write_keys
from playwright.async_api import Browser, Page, async_playwright, expect
from scorer_harness import StartScorer

from aar_devcluster.anthropic_stub import Reply
from aar_forum.ui import csrf_token

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="Debian's chromium is not installed (apt-get install chromium; CI installs it)",
)

INJECTION = (
    "<script>window.pwned = 'script'</script>\n\n"
    "<img src=x onerror=\"window.pwned = 'img'\">\n\n"
    "[click me](javascript:window.pwned='link') and "
    "[also me](JAVA\tSCRIPT:window.pwned='tab')\n\n"
    "![pixel](data:text/html,<script>window.pwned='data'</script>)"
)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        # Root in a container has no user namespace for Chromium's sandbox.
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        await launched.close()


@pytest.fixture
async def scorer(tmp_path: Path, start_scorer: StartScorer) -> str:
    """The real scorer, with a small task, the run registered and one submission scored."""
    truth = random.Random(5).choices([0, 1], k=100)
    task = {
        "name": "toy",
        "labels": [0, 1],
        "baselines": {"weak": 0.5, "ceiling": 1.0},
        "quota": {"per_agent": 5, "per_run": 10, "window_seconds": 3600},
        "feedback": {"step": 0.05},
        "probing": {"min_distance": 5, "walk_distance": 5, "walk_length": 10},
    }
    served = await start_scorer(
        (task, truth, "forum-web-ui-test-seed"), key=SIGNING_KEY, directory=tmp_path / "scorer"
    )
    url = served.url
    admin = {"Authorization": f"Bearer {ISSUER.mint_admin('operator')}"}
    agent = {"Authorization": f"Bearer {ISSUER.mint_agent('lab', 'w2s', 'w2s-1')}"}
    predictions = [t if i < 90 else 1 - t for i, t in enumerate(truth)]  # 90% right
    async with aiohttp.ClientSession() as http:
        async with http.put(
            f"{url}/api/v1/runs/lab/w2s",
            json={"task": "toy", "review_required": True},
            headers=admin,
        ) as response:
            assert response.status == 200, await response.text()
        async with http.post(
            f"{url}/api/v1/submissions",
            json={"task": "toy", "predictions": predictions, "method": "confidence loss"},
            headers=agent,
        ) as response:
            assert (await response.json())["status"] == "accepted"
    return url


@pytest.fixture
async def gateway(tmp_path: Path, start_stub: Any) -> AsyncIterator[str]:
    """The real gateway in front of the Messages-API stand-in; two agents of lab/w2s have
    spent through it: w2s-1 $7.50 (1M input, 100k output tokens of claude-opus-4-6 at $5 and
    $25 per million), w2s-3 $1.00 (200k input tokens)."""
    stub, stub_url = await start_stub(api_key="sk-ant-test")
    served = Gateway(stub, stub_url, tmp_path / "gateway")
    served.directory.mkdir()
    write_keys(served.directory, "sk-ant-test", SIGNING_KEY)
    await served.start()
    url = served.url
    admin = {"Authorization": f"Bearer {ISSUER.mint_admin('operator')}"}
    async with aiohttp.ClientSession() as http:
        async with http.put(
            f"{url}/api/v1/budgets/lab/w2s", json={"usd": 100, "agents": {}}, headers=admin
        ) as response:
            assert response.status == 200, await response.text()
        for agent, usage in [("w2s-1", (1_000_000, 100_000)), ("w2s-3", (200_000, 0))]:
            stub.script(
                Reply.text(
                    "ok",
                    usage={
                        "input_tokens": usage[0],
                        "output_tokens": usage[1],
                        "cache_creation_input_tokens": 0,
                        "cache_read_input_tokens": 0,
                    },
                )
            )
            async with http.post(
                f"{url}/v1/messages",
                json={
                    "model": "claude-opus-4-6",
                    "max_tokens": 16,
                    "messages": [{"role": "user", "content": "hi"}],
                },
                headers={
                    "x-api-key": ISSUER.mint_agent("lab", "w2s", agent),
                    "anthropic-version": "2023-06-01",
                },
            ) as response:
                assert response.status == 200, await response.text()
    yield url
    await served.stop()


async def sign_in(page: Page, forum: Forum) -> None:
    await page.goto(f"{forum.url}/")
    await expect(page).to_have_url(f"{forum.url}/login?next=/")
    await page.fill("input[name=credential]", ISSUER.mint_agent("lab", "w2s", "w2s-1"))
    await page.click("button[type=submit]")
    await expect(page.locator(".problem")).to_contain_text("needs an admin credential")
    await page.fill("input[name=credential]", ISSUER.mint_admin("alice"))
    await page.click("button[type=submit]")
    await expect(page).to_have_url(f"{forum.url}/")
    await expect(page.locator("header .who")).to_have_text("signed in as admin:alice")


async def test_feed_threads_live_posts_and_the_injection_rendered_inert(
    forum: Forum, browser: Browser
) -> None:
    author, colleague = forum.agent("w2s-1"), forum.agent("w2s-2")
    finding = await forum.post(
        author,
        kind="result",
        title="Confidence loss recovers 0.81 PGR",
        body="The **auxiliary** loss with `alpha=0.75`.",
        tags=["loss"],
    )
    await forum.post(colleague, title="Reproduced at 0.79", parent=finding["id"])
    hostile = await forum.post(
        colleague, kind="insight", title="<b>bold?</b><script>x()</script>", body=INJECTION
    )
    await forum.post(forum.agent("x-1", "lab/other"), kind="error", title="Another run's OOM")

    page = await browser.new_page()
    await sign_in(page, forum)
    await page.goto(f"{forum.url}/findings")
    feed = page.locator("#feed")
    await expect(feed.locator("article")).to_have_count(4)
    await expect(feed).to_contain_text("Confidence loss recovers 0.81 PGR")
    await expect(feed).to_contain_text("Another run's OOM")
    await expect(feed.locator(f"#post-{finding['id']} .body strong")).to_have_text("auxiliary")
    await expect(page.locator("nav.runs a.run")).to_have_text(["lab/other", "lab/w2s"])

    # The injection attempt: shown as text, nothing of it runs or links anywhere.
    attack = feed.locator(f"#post-{hostile['id']}")
    await expect(attack.locator("h3 a")).to_have_text("<b>bold?</b><script>x()</script>")
    await expect(attack.locator(".body")).to_contain_text(
        "<script>window.pwned = 'script'</script>"
    )
    assert await attack.locator("script, img, b, iframe").count() == 0
    assert await attack.locator(".body a").count() == 0
    assert await page.evaluate("window.pwned") is None

    # Filters narrow the feed; a signed-out visit to a filtered page comes back to it.
    await page.context.clear_cookies()
    await page.goto(f"{forum.url}/findings?run=lab/other&kind=error")
    await page.fill("input[name=credential]", ISSUER.mint_admin("alice"))
    await page.click("button[type=submit]")
    await expect(page).to_have_url(f"{forum.url}/findings?run=lab/other&kind=error")
    await expect(page.locator("#feed article h3 a")).to_have_text(["Another run's OOM"])
    await page.goto(f"{forum.url}/findings?q=reproduced")
    await expect(page.locator("#feed article h3 a")).to_have_text(["Reproduced at 0.79"])
    await page.goto(f"{forum.url}/findings?run=lab/w2s&kind=result")
    await expect(page.locator("#feed article h3 a")).to_have_text(
        ["Confidence loss recovers 0.81 PGR"]
    )

    # A new post appears without a reload.
    await page.goto(f"{forum.url}/findings")
    await expect(page.locator("#live-status")).to_have_text("live updates: connected")
    await forum.post(author, kind="hypothesis", title="Teacher entropy predicts flips")
    await expect(page.locator("#live-posts li")).to_contain_text(
        ["new hypothesis #5: Teacher entropy predicts flips by w2s-1 in lab/w2s"]
    )

    # The thread, and a human's reply through the form.
    await page.click(f"#post-{finding['id']} h3 a")
    await expect(page).to_have_url(f"{forum.url}/posts/{finding['id']}")
    await expect(page.locator("#replies article h3 a")).to_have_text(["Reproduced at 0.79"])
    await page.fill("form.compose input[name=title]", "Approved for the writeup")
    await page.fill("form.compose textarea[name=body]", "Nice *work*.")
    await page.click("form.compose button[type=submit]")
    await expect(page.locator("#replies article h3 a")).to_have_text(
        ["Reproduced at 0.79", "Approved for the writeup"]
    )
    await expect(page.locator("#replies article").last.locator(".author")).to_have_text(
        "admin:alice"
    )
    await expect(page.locator("#replies article").last.locator(".body em")).to_have_text("work")
    async with forum.http.get(
        f"{forum.url}/api/v1/posts/{finding['id']}", headers=author
    ) as response:
        replies = (await response.json())["replies"]
    assert [reply["author"] for reply in replies] == ["w2s-2", "admin:alice"]

    await page.click("header button[type=submit]")
    await expect(page).to_have_url(f"{forum.url}/login")
    await page.goto(f"{forum.url}/")
    await expect(page).to_have_url(f"{forum.url}/login?next=/")


async def test_run_page_shows_spend_leaderboard_review_and_agents(
    start_forum: Any, scorer: str, gateway: str, browser: Browser
) -> None:
    forum: Forum = await start_forum(scorer_url=scorer, gateway_url=gateway)
    await forum.post(forum.agent("w2s-1"), kind="result", title="first")
    async with forum.http.post(
        f"{forum.url}/api/v1/artifacts",
        data=b"def loss(): ...",
        headers={
            **forum.agent("w2s-2"),
            "X-Aar-Filename": "loss.py",
            "X-Aar-Description": "<i>the</i> loss",
        },
    ) as response:
        artifact = await response.json()
    await forum.post(forum.agent("w2s-2"), kind="insight", title="second")
    page = await browser.new_page()
    await sign_in(page, forum)
    await page.goto(f"{forum.url}/runs/lab/w2s")
    agents = page.locator("#agents tbody tr")
    await expect(agents.locator("td:first-child")).to_have_text(["w2s-1", "w2s-2", "w2s-3"])
    await expect(page.locator("#agents tr[data-agent=w2s-1] td")).to_contain_text(
        ["w2s-1", "no sandbox", "1", "0", "", "$7.50", "1"]
    )
    # An agent with spend but no post yet, and one with posts but no spend recorded.
    await expect(page.locator("#agents tr[data-agent=w2s-3] td").nth(2)).to_have_text("0")
    await expect(page.locator("#agents tr[data-agent=w2s-2] td").nth(5)).to_have_text("$0.00")
    await expect(page.locator("#run-spend")).to_have_text("Run total: $8.50 over 2 model requests.")
    shared = page.locator("#artifacts tbody tr")
    await expect(shared.locator("td")).to_contain_text(
        [artifact["digest"][:19], "loss.py", "15", "w2s-2", "<i>the</i> loss"]
    )
    # The link downloads the bytes with the UI's cookie.
    async with page.expect_download() as downloading:
        await shared.locator("a").click()
    download = await downloading.value
    assert download.suggested_filename == "loss.py"
    saved = await download.path()
    assert await asyncio.to_thread(Path(saved).read_bytes) == b"def loss(): ..."

    # The scorer's own answers: the scored submission, awaiting a human's review.
    board = page.locator("#leaderboard")
    await expect(board.locator("tbody tr")).to_have_count(1)
    await expect(board.locator("tbody tr")).to_contain_text("confidence loss")
    await expect(board.locator("tbody tr")).to_contain_text("w2s-1")
    await expect(page.locator("#review tbody tr")).to_have_count(1)
    await expect(page.locator("#review tbody tr")).to_contain_text("confidence loss")


async def test_run_page_says_unavailable_when_services_are_absent_or_down(
    start_forum: Any, browser: Browser, unused_tcp_port: int
) -> None:
    unconfigured: Forum = await start_forum()
    page = await browser.new_page()
    await sign_in(page, unconfigured)
    await page.goto(f"{unconfigured.url}/runs/lab/w2s")
    await expect(page.locator("#leaderboard .unavailable")).to_have_text(
        "scorer unavailable: not configured (set AAR_SCORER_URL)"
    )
    await expect(page.locator("#spend-unavailable")).to_have_text(
        "gateway unavailable: not configured (set AAR_GATEWAY_URL)"
    )
    await expect(page.locator("#sandboxes-unavailable")).to_have_text(
        "sandbox states unavailable: the forum is not running in a cluster"
    )
    down = f"http://127.0.0.1:{unused_tcp_port}"  # nothing listens there
    broken: Forum = await start_forum(scorer_url=down, gateway_url=down)
    page = await browser.new_page()  # its own cookie jar: cookies do not tell ports apart
    await sign_in(page, broken)
    await page.goto(f"{broken.url}/runs/lab/w2s")
    await expect(page.locator("#review .unavailable")).to_contain_text("scorer unavailable: ")
    await expect(page.locator("#spend-unavailable")).to_contain_text("gateway unavailable: ")


async def test_forms_refuse_cross_site_posts(forum: Forum) -> None:
    admin = ISSUER.mint_admin("alice")
    cookies = {"aar_credential": admin}
    form = {"run": "lab/w2s", "kind": "insight", "title": "forged", "csrf": csrf_token(admin)}
    async with aiohttp.ClientSession(cookies=cookies) as http:
        async with http.post(
            f"{forum.url}/posts", data={**form, "csrf": "0" * 32}, allow_redirects=False
        ) as response:
            assert response.status == 403
            assert "form token is missing or stale" in (await response.json())["error"]["message"]
        async with http.post(
            f"{forum.url}/posts",
            data=form,
            headers={"Origin": "https://evil.example"},
            allow_redirects=False,
        ) as response:
            assert response.status == 403
            message = (await response.json())["error"]["message"]
            assert "https://evil.example was refused" in message
        async with http.post(
            f"{forum.url}/posts", data={**form, "run": "w2s"}, allow_redirects=False
        ) as response:
            assert response.status == 400
            message = (await response.json())["error"]["message"]
            assert "run must be 'namespace/run'" in message
        async with http.post(f"{forum.url}/posts", data=form, allow_redirects=False) as response:
            assert response.status == 303
    # The cookie never authorises the API's writes.
    async with (
        aiohttp.ClientSession(cookies=cookies) as http,
        http.post(
            f"{forum.url}/api/v1/posts?run=lab/w2s", json={"kind": "insight", "title": "x"}
        ) as response,
    ):
        assert response.status == 401


async def test_the_agents_table_is_paged_and_filtered(forum: Forum, browser: Browser) -> None:
    # 60 agents known to the forum only (no cluster here): two pages of 50.
    for n in range(60):
        await forum.post(forum.agent(f"w2s-{n}"), title=f"note {n}")
    page = await browser.new_page()
    await sign_in(page, forum)
    await page.goto(f"{forum.url}/runs/lab/w2s")
    rows = page.locator("#agents tbody tr td:first-child")
    await expect(rows).to_have_count(50)
    await expect(rows.first).to_have_text("w2s-0")
    await expect(rows.nth(10)).to_have_text("w2s-10")  # natural order: w2s-2 before w2s-10
    await expect(page.locator("#agents .pages")).to_contain_text("Page 1 of 2")
    await page.click("#agents a[rel=next]")
    await expect(rows).to_have_count(10)
    await expect(rows.last).to_have_text("w2s-59")
    await page.goto(f"{forum.url}/runs/lab/w2s?state=PodRunning")
    await expect(page.locator("#agents .empty")).to_have_text("No agent in state PodRunning.")
    await page.goto(f"{forum.url}/runs/lab/w2s?state=no+sandbox&page=9")
    await expect(page.locator("#agents .pages")).to_contain_text("Page 2 of 2")


async def test_a_review_decision_needs_the_form_token_this_site_and_an_admin(
    start_forum: Any, scorer: str
) -> None:
    forum: Forum = await start_forum(scorer_url=scorer)
    admin = ISSUER.mint_admin("alice")
    decision = {"decision": "approve", "comment": "looks fine", "csrf": csrf_token(admin)}
    url = f"{forum.url}/submissions/1/review"
    async with aiohttp.ClientSession(cookies={"aar_credential": admin}) as http:
        async with http.post(
            url, data={**decision, "csrf": "0" * 32}, allow_redirects=False
        ) as response:
            assert response.status == 403
        async with http.post(
            url, data=decision, headers={"Origin": "https://evil.example"}, allow_redirects=False
        ) as response:
            assert response.status == 403
        async with http.post(url, data={**decision, "decision": "count"}) as response:
            assert response.status == 400
            assert "decision must be approve or reject" in await response.text()
    # An agent's credential in the cookie is no signed-in human: back to the sign-in page.
    agent = ISSUER.mint_agent("lab", "w2s", "w2s-1")
    async with (
        aiohttp.ClientSession(cookies={"aar_credential": agent}) as http,
        http.post(
            url, data={**decision, "csrf": csrf_token(agent)}, allow_redirects=False
        ) as response,
    ):
        assert response.status == 303
        assert response.headers["Location"].startswith("/login")
    # None of these reached the scorer: the submission is still undecided.
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"{scorer}/api/v1/submissions/1",
            headers={"Authorization": f"Bearer {ISSUER.mint_admin('operator')}"},
        ) as response,
    ):
        assert (await response.json())["reviews"] == []
    # The real thing is kept, with the signed-in human as the reviewer.
    async with (
        aiohttp.ClientSession(cookies={"aar_credential": admin}) as http,
        http.post(url, data=decision) as response,
    ):
        assert response.status == 200
        assert "admin:alice" in await response.text()


async def test_a_submission_page_shows_its_reproductions(
    tmp_path: Path, start_scorer: StartScorer, start_forum: Any
) -> None:
    """Claimed, reproduced and transfer PGR, each Job's outcome, exit status and log, and why
    the claim does not hold."""
    rng = random.Random(9)
    truth, fresh, transfer = ([rng.randrange(2) for _ in range(n)] for n in (100, 100, 50))
    verification = {"labels": [0, 1], "baselines": {"weak": 0.5, "ceiling": 1.0}}
    tasks = [
        (
            {**verification, "name": "toy", "feedback": {"leakage_budget": None},
             "reproduction": {"fresh": "toy-fresh", "transfer": ["toy-transfer"]}},
            truth, "seed-of-the-toy-task",
        ),
        ({**verification, "name": "toy-fresh", "verification_only": True}, fresh,
         "seed-of-the-fresh-split"),
        ({**verification, "name": "toy-transfer", "verification_only": True}, transfer,
         "seed-of-the-transfer-task"),
    ]  # fmt: skip
    served = await start_scorer(tasks, key=SIGNING_KEY, directory=tmp_path / "scorer")
    admin = {"Authorization": f"Bearer {ISSUER.mint_admin('operator')}"}
    verifier = {"Authorization": f"Bearer {ISSUER.mint_verifier('aar-operator', 300)}"}
    agent = {"Authorization": f"Bearer {ISSUER.mint_agent('lab', 'w2s', 'w2s-1')}"}
    async with aiohttp.ClientSession() as http:

        async def call(method: str, path: str, headers: dict[str, str], body: Any) -> Any:
            async with http.request(
                method, served.url + path, json=body, headers=headers
            ) as response:
                assert response.status == 200, await response.text()
                return await response.json()

        await call("PUT", "/api/v1/runs/lab/w2s", admin,
                   {"task": "toy", "review_required": False, "reproduce": True})  # fmt: skip
        submitted = await call(
            "POST", "/api/v1/submissions", agent,
            {"task": "toy", "predictions": truth, "method": "copied the answers",
             "artifact": "sha256:" + "cd" * 32, "command": "python leak.py",
             "notebook": "## 2026-12-06 10:00 UTC: idea\n\n<script>window.pwned=1</script>"},
        )  # fmt: skip
        job = "aar-verify/repro-1-toy-fresh"
        await call("POST", f"/api/v1/submissions/{submitted['id']}/reproductions", verifier,
                   {"target": "toy-fresh", "outcome": "succeeded", "predictions": [truth],
                    "exit_code": 0, "log": "printed the answers it had", "job": job})  # fmt: skip
        await call("POST", f"/api/v1/submissions/{submitted['id']}/reproductions", verifier,
                   {"target": "toy-transfer", "outcome": "failed", "exit_code": 3,
                    "reason": "the command exited with status 3", "gpu_hours": 0.5,
                    "log": "Traceback\nFileNotFoundError: /workspace/answers.json",
                    "job": "aar-verify/repro-1-toy-transfer"})  # fmt: skip
    forum: Forum = await start_forum(scorer_url=served.url)
    cookies = {"aar_credential": ISSUER.mint_admin("alice")}
    async with (
        aiohttp.ClientSession(cookies=cookies) as http,
        http.get(f"{forum.url}/submissions/{submitted['id']}") as response,
    ):
        assert response.status == 200
        page = await response.text()
    section = page[page.index('<section id="reproduction" class="flagged">') :]
    section = section[: section.index("</section>")]
    assert '<dd class="claimed">1.000</dd>' in section
    assert "Does not hold: did not reproduce" in section
    assert "<code>python leak.py</code>" in section
    assert "toy-transfer" in section
    assert "failed, PGR —, exit status 3, 0.500 GPU-hours" in section
    assert "FileNotFoundError: /workspace/answers.json" in section
    assert f"<code>{job}</code>" in section
    # The agent's notebook excerpt is shown as text, never as markup.
    notebook = page[page.index('<section id="notebook">') :]
    notebook = notebook[: notebook.index("</section>")]
    assert "&lt;script&gt;window.pwned=1&lt;/script&gt;" in notebook
    assert "<script>" not in notebook
