"""The run's forum: post, search, read a thread, and see what is new."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from aar_agent.tools.registry import Input, NoInput, ToolContext, ToolSet

_NEW_POSTS = 50  # per forum_new call

toolset = ToolSet()


def _render_post(post: dict[str, Any], full: bool = False) -> str:
    body = str(post.get("body", ""))
    if not full and len(body) > 400:
        body = body[:400] + " [...]"
    tags = ", ".join(post.get("tags") or [])
    return (
        f"#{post.get('id')} [{post.get('kind')}] {post.get('title')} by {post.get('author')} "
        f"at {post.get('created_at')}" + (f" tags: {tags}" if tags else "") + f"\n{body}"
    )


class ForumPostInput(Input):
    kind: Literal["result", "hypothesis", "insight", "error"]
    title: str
    body: str = Field(description="markdown; for results: method, seeds, mean and spread")
    tags: list[str] = Field(default_factory=list)
    parent: int | None = Field(default=None, description="post id this replies to")
    submissions: list[str | int] = Field(default_factory=list, description="scorer ids")
    artifacts: list[str] = Field(default_factory=list, description="artifact digests")


@toolset.tool(ForumPostInput)
async def forum_post(context: ToolContext, arguments: ForumPostInput, _: str) -> str:
    """Post to the run's forum, where the other agents and the humans read."""
    post = await context.forum.request("POST", "/api/v1/posts", json_body=arguments.model_dump())
    return f"posted #{post.get('id')}: {post.get('title')}"


class ForumSearchInput(Input):
    q: str | None = Field(default=None, description="full-text query")
    kind: Literal["result", "hypothesis", "insight", "error"] | None = None
    tag: str | None = None
    author: str | None = None
    limit: int = Field(default=20, ge=1, le=100)


@toolset.tool(ForumSearchInput)
async def forum_search(context: ToolContext, arguments: ForumSearchInput, _: str) -> str:
    """Search the forum, newest first."""
    params = {k: str(v) for k, v in arguments.model_dump().items() if v is not None}
    found = await context.forum.request("GET", "/api/v1/posts", params=params)
    posts = found.get("posts", [])
    return "\n\n".join(_render_post(p) for p in posts) or "no posts match"


class ForumReadInput(Input):
    id: int = Field(description="the post id")


@toolset.tool(ForumReadInput)
async def forum_read(context: ToolContext, arguments: ForumReadInput, _: str) -> str:
    """Read one post in full with its replies."""
    thread = await context.forum.request("GET", f"/api/v1/posts/{arguments.id}")
    replies = thread.get("replies", [])
    parts = [_render_post(thread["post"], full=True)]
    parts += [f"reply {_render_post(r, full=True)}" for r in replies]
    return "\n\n".join(parts)


@toolset.tool(NoInput)
async def forum_new(context: ToolContext, _: NoInput, __: str) -> str:
    """Posts that appeared since you last looked."""
    state = context.state
    params = {"limit": str(_NEW_POSTS)}
    if state.forum_cursor is not None:
        params["since"] = state.forum_cursor
    found = await context.forum.request("GET", "/api/v1/posts", params=params)
    posts = [p for p in found.get("posts", []) if str(p.get("id")) != state.forum_cursor]
    if posts:
        state.forum_cursor = str(posts[0]["id"])  # newest first
    # The agent's own posts are not news to it, but the cursor moves past them too.
    others = [p for p in posts if p.get("author") != context.settings.agent]
    if not others:
        return "nothing new on the forum"
    more = (
        f"\n\n[only the newest {_NEW_POSTS} are shown; find older ones with forum_search]"
        if len(posts) >= _NEW_POSTS
        else ""
    )
    return "\n\n".join(_render_post(p) for p in others) + more
