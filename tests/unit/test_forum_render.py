"""Post bodies render to HTML in which nothing can run: agents write, humans read."""

from __future__ import annotations

import pytest

from aar_forum.ratelimit import RateLimiter
from aar_forum.render import markdown
from aar_forum.store import fts_query, normalise_time
from aar_forum.ui import _local


@pytest.mark.parametrize(
    "attack",
    [
        "<script>alert(1)</script>",
        "<img src=x onerror=alert(1)>",
        '<a href="javascript:alert(1)">x</a>',
        "[x](javascript:alert(1))",
        "[x](JavaScript:alert(1))",
        "[x](java\tscript:alert(1))",
        "[x](%6Aavascript:alert(1))",
        "[x](vbscript:msgbox(1))",
        "[x](data:text/html;base64,PHNjcmlwdD4=)",
        "![x](javascript:alert(1))",
        "[x]: javascript:alert(1)\n\n[go][x]",
        "<svg onload=alert(1)>",
        "<iframe src=//evil.example></iframe>",
    ],
)
def test_script_injection_renders_inert(attack: str) -> None:
    html = str(markdown(attack)).lower()
    assert "<script" not in html
    assert '<img src="x"' not in html
    assert "<svg" not in html
    assert "<iframe" not in html
    assert 'href="javascript' not in html
    assert 'href="vbscript' not in html
    assert 'href="data:' not in html
    assert 'src="javascript' not in html


def test_ordinary_markdown_still_renders() -> None:
    html = str(markdown("**PGR** 0.8, see [run](https://example.org/x) or [#3](/posts/3)"))
    assert "<strong>PGR</strong>" in html
    assert '<a href="https://example.org/x">run</a>' in html
    assert '<a href="/posts/3">#3</a>' in html
    table = str(markdown("| a | b |\n|---|---|\n| 1 | 2 |"))
    assert "<td>1</td>" in table


def test_search_text_is_literal_fts5() -> None:
    assert fts_query('pgr "0.8" ensembl*') == '"pgr" """0.8""" "ensembl"*'
    assert fts_query("NEAR(a b) OR c") == '"NEAR(a" "b)" "OR" "c"'


def test_times_are_normalised_to_utc() -> None:
    assert normalise_time("2026-01-02T03:04:05+02:00") == "2026-01-02T01:04:05.000000Z"
    assert normalise_time("2026-01-02T03:04:05Z") == "2026-01-02T03:04:05.000000Z"
    assert normalise_time("2026-01-02") == "2026-01-02T00:00:00.000000Z"


def test_rate_limiter_allows_a_burst_then_the_rate() -> None:
    limiter = RateLimiter(per_minute=60, burst=3)
    assert [limiter.take("a", now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a", now=0.0) == pytest.approx(1.0)
    assert limiter.take("b", now=0.0) == 0.0  # keys are independent
    assert limiter.take("a", now=1.0) == 0.0
    assert RateLimiter(per_minute=0, burst=1).take("a") == 0.0


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("/runs/lab/w2s?x=1&y=2", "/runs/lab/w2s?x=1&y=2"),
        ("//evil.example/", "/"),
        ("/\\evil.example/", "/"),
        ("https://evil.example/", "/"),
        ("", "/"),
    ],
)
def test_after_login_only_a_path_on_this_site_is_followed(given: str, kept: str) -> None:
    assert _local(given) == kept
