"""The web UI for humans: findings feed, threads, and per run the leaderboard, review queue,
spend and agents. Server-rendered (Jinja, autoescaped); a little JS adds posts as they arrive.

A human signs in with an admin credential, kept in an HttpOnly, SameSite=Strict cookie. Every
form that changes something carries a token derived from that credential (a cross-site page
cannot read it) and must come from this origin.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import jinja2
from aiohttp import web
from pydantic import ValidationError

from aar_common.credentials import CredentialError, Principal, Role
from aar_common.web import VERIFIER_KEY, fail
from aar_forum.api import post_filter
from aar_forum.forum import COOKIE, forum
from aar_forum.models import Kind, PostIn
from aar_forum.render import markdown
from aar_forum.store import NotFoundError

STATIC = Path(__file__).parent / "static"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' https:; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)

_templates = jinja2.Environment(
    loader=jinja2.PackageLoader("aar_forum", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)
_templates.filters["markdown"] = markdown


def template_functions(**functions: Any) -> None:
    """Functions every template may call (formatters the console's pages share)."""
    _templates.globals.update(functions)


class Viewer:
    def __init__(self, principal: Principal, token: str) -> None:
        self.principal = principal
        self.token = token
        self.csrf = csrf_token(token)


def csrf_token(credential: str) -> str:
    return hashlib.sha256(b"aar-forum-csrf\0" + credential.encode()).hexdigest()[:32]


def render(name: str, status: int = 200, **context: Any) -> web.Response:
    response = web.Response(
        text=_templates.get_template(name).render(kinds=[k.value for k in Kind], **context),
        status=status,
        content_type="text/html",
    )
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    return response


def _signed_in(request: web.Request) -> Viewer | None:
    token = request.cookies.get(COOKIE)
    if not token:
        return None
    try:
        principal = request.app[VERIFIER_KEY].verify(token)
    except CredentialError:
        return None
    return Viewer(principal, token) if principal.role is Role.ADMIN else None


def require_viewer(request: web.Request) -> Viewer:
    viewer = _signed_in(request)
    if viewer is None:
        raise web.HTTPSeeOther(f"/login?next={quote(request.path_qs, safe='/')}")
    return viewer


def _same_origin(request: web.Request) -> None:
    """Refuse a form posted from another site (the Origin header browsers send on POST)."""
    origin = request.headers.get("Origin")
    if origin and origin != "null" and urlsplit(origin).netloc != request.host:
        fail(
            403, f"a form posted from {origin} was refused: forms are accepted from this site only"
        )


async def checked_form(request: web.Request) -> tuple[Viewer, dict[str, str]]:
    _same_origin(request)
    viewer = require_viewer(request)
    form = {key: str(value) for key, value in (await request.post()).items()}
    if not hmac.compare_digest(form.get("csrf", ""), viewer.csrf):
        fail(403, "the form token is missing or stale: reload the page and submit again")
    return viewer, form


async def login_page(request: web.Request) -> web.Response:
    return render("login.html", next=request.query.get("next", "/"), problem=None, viewer=None)


def _local(path: str) -> str:
    # Only paths on this site: `next` must not send a fresh login to another host (and
    # browsers read a backslash after the first slash as a second slash).
    return path if path.startswith("/") and not path.startswith(("//", "/\\")) else "/"


async def login(request: web.Request) -> web.Response:
    _same_origin(request)
    form = await request.post()
    token = str(form.get("credential", "")).strip()
    next_path = _local(str(form.get("next", "/")))
    try:
        principal = request.app[VERIFIER_KEY].verify(token)
    except CredentialError as error:
        problem = f"That credential was not accepted: {error}."
        return render("login.html", status=401, next=next_path, problem=problem, viewer=None)
    if principal.role is not Role.ADMIN:
        problem = (
            "The web UI needs an admin credential: "
            "mint one with `aar credential mint --admin NAME`."
        )
        return render("login.html", status=403, next=next_path, problem=problem, viewer=None)
    response = web.HTTPSeeOther(next_path)
    response.set_cookie(
        COOKIE, token, httponly=True, samesite="Strict", secure=request.secure, path="/"
    )
    raise response


async def logout(request: web.Request) -> web.Response:
    await checked_form(request)
    response = web.HTTPSeeOther("/login")
    response.del_cookie(COOKIE, path="/")
    raise response


async def feed(request: web.Request) -> web.Response:
    viewer = require_viewer(request)
    state = forum(request)
    run = request.query.get("run", "").strip() or None
    where = post_filter(request, run)
    posts, runs = await asyncio.gather(
        state.store.call(state.store.search, where), state.store.call(state.store.runs)
    )
    state.metrics.searches.inc()
    return render(
        "feed.html", viewer=viewer, posts=posts, runs=runs, run=run or "", query=request.query
    )


async def thread(request: web.Request) -> web.Response:
    viewer = require_viewer(request)
    state = forum(request)
    try:
        post = await state.store.call(state.store.get_post, int(request.match_info["id"]), None)
    except (NotFoundError, ValueError):
        fail(404, f"post {request.match_info['id']} not found")
    replies = await state.store.call(state.store.replies, post.id)
    return render("thread.html", viewer=viewer, post=post, replies=replies, problem=None)


async def new_post(request: web.Request) -> web.Response:
    """A post or reply written by a human from the UI, as `admin:<subject>`."""
    viewer, form = await checked_form(request)
    state = forum(request)
    parent = int(form["parent"]) if form.get("parent", "").isdigit() else None
    run = form.get("run", "").strip()
    if parent is not None:
        try:
            run = (await state.store.call(state.store.get_post, parent, None)).run
        except NotFoundError:
            fail(404, f"post {parent} (the one replied to) not found")
    tags = [tag.strip() for tag in form.get("tags", "").split(",") if tag.strip()]
    try:
        if run.count("/") != 1 or run.startswith("/") or run.endswith("/"):
            raise ValueError(f"run must be 'namespace/run' (got {run!r})")
        body = PostIn(
            kind=form.get("kind", "insight"),  # type: ignore[arg-type]
            title=form.get("title", ""),
            body=form.get("body", ""),
            tags=tags,
            parent=parent,
        )
        post = await state.store.call(state.store.add_post, run, viewer.principal.name, body)
    except (ValidationError, ValueError) as error:
        fail(400, f"post not saved: {error}")
    state.metrics.posts.labels(post.kind.value).inc()
    state.hub.publish(post)
    raise web.HTTPSeeOther(f"/posts/{parent or post.id}")


def dollars(value: object) -> str:
    """An amount as the gateway sends it (a decimal string, exact; or a number), in cents."""
    try:
        return f"{Decimal(str(value)):.2f}"
    except InvalidOperation:
        return str(value)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/findings", feed)
    app.router.add_get("/login", login_page)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_get("/posts/{id}", thread)
    app.router.add_post("/posts", new_post)
    app.router.add_static("/static", STATIC)
