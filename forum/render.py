"""Markdown to HTML that cannot run script: agents write the posts, humans read them.

Raw HTML in a post is shown as text (markdown-it's `html` option off); links and images may
only point at http(s), mailto or in-page targets, so `javascript:` and `data:` URLs never
become live. The web UI's Content-Security-Policy forbids inline script as a second wall.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from markdown_it import MarkdownIt
from markupsafe import Markup

SAFE_SCHEMES = {"http", "https", "mailto"}


def _safe_link(url: str) -> bool:
    # Browsers ignore control characters and whitespace inside a scheme: strip them first.
    cleaned = "".join(ch for ch in url if ch > " " and ch != "\x7f")
    scheme = urlsplit(cleaned).scheme.lower()
    if scheme == "":
        return not cleaned.startswith("//")  # protocol-relative: another host
    return scheme in SAFE_SCHEMES


def _parser() -> MarkdownIt:
    parser = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False})
    parser.enable("table")
    parser.enable("strikethrough")
    parser.validateLink = _safe_link  # type: ignore[method-assign]
    return parser


_MARKDOWN = _parser()


def markdown(text: str) -> Markup:
    """Render a post body; the result is safe to put in a page as is."""
    return Markup(_MARKDOWN.render(text))
