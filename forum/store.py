"""The forum's SQLite database: posts with full-text search (FTS5) and artifact metadata.

Synchronous on purpose: the service calls it from one worker thread (`Store.call`), so the
event loop never waits on a disk sync and SQLite sees one writer at a time.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import ParamSpec, TypeVar

from aar_common.sqlite import open_database, transaction
from aar_forum.models import Artifact, Kind, Post, PostIn

P = ParamSpec("P")
T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS posts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run TEXT NOT NULL,
    author TEXT NOT NULL,
    kind TEXT NOT NULL,
    title TEXT NOT NULL,
    body TEXT NOT NULL,
    tags TEXT NOT NULL,
    parent INTEGER REFERENCES posts(id),
    submissions TEXT NOT NULL,
    artifacts TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS posts_run ON posts(run, id);
CREATE INDEX IF NOT EXISTS posts_parent ON posts(parent, id);
CREATE INDEX IF NOT EXISTS posts_author ON posts(run, author, id);
CREATE TABLE IF NOT EXISTS post_tags (
    tag TEXT NOT NULL,
    post INTEGER NOT NULL REFERENCES posts(id),
    PRIMARY KEY (tag, post)
) WITHOUT ROWID;
-- External-content FTS: the text lives once, in posts; posts are never edited or deleted.
-- Prefix indexes make `word*` searches (2 or 3 letters and more) index lookups, not scans.
CREATE VIRTUAL TABLE IF NOT EXISTS posts_fts USING fts5(
    title, body, tags, content='posts', content_rowid='id', prefix='2 3'
);
CREATE TRIGGER IF NOT EXISTS posts_fts_insert AFTER INSERT ON posts BEGIN
    INSERT INTO posts_fts(rowid, title, body, tags) VALUES (new.id, new.title, new.body, new.tags);
END;
CREATE TABLE IF NOT EXISTS artifacts (
    run TEXT NOT NULL,
    digest TEXT NOT NULL,
    size INTEGER NOT NULL,
    author TEXT NOT NULL,
    parent TEXT,
    description TEXT NOT NULL,
    filename TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (run, digest)
);
CREATE INDEX IF NOT EXISTS artifacts_digest ON artifacts(digest);
"""


class NotFoundError(Exception):
    """A post or artifact that does not exist in the caller's view."""


def now_iso() -> str:
    """UTC, fixed width, so that text order is time order."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def normalise_time(text: str) -> str:
    """An ISO-8601 time as stored (UTC, fixed width); naive times are taken as UTC."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def fts_query(text: str) -> str:
    """Free text as an FTS5 query: every word must match, as a literal (no FTS5 syntax errors
    from user input); a trailing `*` keeps its prefix meaning."""
    terms = []
    for word in text.split():
        prefix = word.endswith("*") and len(word) > 1
        literal = word.rstrip("*") if prefix else word
        quoted = '"' + literal.replace('"', '""') + '"'
        terms.append(quoted + ("*" if prefix else ""))
    return " ".join(terms)


@dataclass(frozen=True)
class PostFilter:
    """What `GET /api/v1/posts` narrows by; `run=None` is every run (admins only)."""

    run: str | None = None
    q: str = ""
    kind: Kind | None = None
    tag: str | None = None
    author: str | None = None
    since_id: int | None = None
    since_time: str | None = None
    parent: int | None = None
    limit: int = 50


def _post(row: sqlite3.Row) -> Post:
    return Post(
        id=row["id"],
        run=row["run"],
        author=row["author"],
        kind=Kind(row["kind"]),
        title=row["title"],
        body=row["body"],
        tags=json.loads(row["tags"]),
        parent=row["parent"],
        submissions=json.loads(row["submissions"]),
        artifacts=json.loads(row["artifacts"]),
        created_at=row["created_at"],
    )


def _artifact(row: sqlite3.Row) -> Artifact:
    return Artifact(**{key: row[key] for key in row.keys()})  # noqa: SIM118 (sqlite3.Row)


class Store:
    def __init__(self, path: Path) -> None:
        self.connection = open_database(path, SCHEMA)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forum-db")

    async def call(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a store method on the database thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: function(*args, **kwargs))

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.connection.close()

    # Posts

    def add_post(self, run: str, author: str, post: PostIn) -> Post:
        """Store a post; its parent and artifacts must exist in the same run (ValueError)."""
        with transaction(self.connection) as db:
            if post.parent is not None:
                row = db.execute("SELECT run FROM posts WHERE id = ?", (post.parent,)).fetchone()
                if row is None or row["run"] != run:
                    raise ValueError(f"parent: post {post.parent} does not exist in run {run}")
            missing = [d for d in post.artifacts if not self._has_artifact(run, d)]
            if missing:
                raise ValueError(
                    f"artifacts: {', '.join(missing)} not found in run {run}; "
                    "upload them first with POST /api/v1/artifacts"
                )
            tags = sorted(set(post.tags))
            cursor = db.execute(
                "INSERT INTO posts (run, author, kind, title, body, tags, parent, submissions,"
                " artifacts, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run,
                    author,
                    post.kind.value,
                    post.title,
                    post.body,
                    json.dumps(tags),
                    post.parent,
                    json.dumps(post.submissions),
                    json.dumps(post.artifacts),
                    now_iso(),
                ),
            )
            post_id = cursor.lastrowid
            db.executemany(
                "INSERT INTO post_tags (tag, post) VALUES (?, ?)", [(t, post_id) for t in tags]
            )
            row = db.execute("SELECT * FROM posts WHERE id = ?", (post_id,)).fetchone()
        return _post(row)

    def get_post(self, post_id: int, run: str | None) -> Post:
        row = self.connection.execute("SELECT * FROM posts WHERE id = ?", (post_id,)).fetchone()
        if row is None or (run is not None and row["run"] != run):
            raise NotFoundError(f"post {post_id} not found")
        return _post(row)

    def replies(self, post_id: int) -> list[Post]:
        rows = self.connection.execute(
            "SELECT * FROM posts WHERE parent = ? ORDER BY id", (post_id,)
        ).fetchall()
        return [_post(row) for row in rows]

    def search(self, where: PostFilter) -> list[Post]:
        """Posts matching every filter, newest first."""
        clauses: list[str] = []
        params: list[object] = []
        source, order = "posts", "posts.id"
        if where.q:
            # The FTS index drives, newest match first (FTS5 walks rowids in descending order
            # itself), and the scan stops at `limit`. Left to itself the planner may instead
            # walk a run's posts and run one full-text query per post.
            source = "posts_fts CROSS JOIN posts ON posts.id = posts_fts.rowid"
            order = "posts_fts.rowid"
            clauses.append("posts_fts MATCH ?")
            params.append(fts_query(where.q))
        if where.run is not None:
            clauses.append("posts.run = ?")
            params.append(where.run)
        if where.kind is not None:
            clauses.append("posts.kind = ?")
            params.append(where.kind.value)
        if where.tag:
            # Checked row by row, newest first, stopping at `limit`: a common tag would
            # otherwise be read in full (tens of thousands of ids) for every query.
            clauses.append(
                "EXISTS (SELECT 1 FROM post_tags WHERE tag = ? AND post_tags.post = posts.id)"
            )
            params.append(where.tag.lower())
        if where.author:
            clauses.append("posts.author = ?")
            params.append(where.author)
        if where.since_id is not None:
            clauses.append("posts.id > ?")
            params.append(where.since_id)
        if where.since_time is not None:
            clauses.append("posts.created_at >= ?")
            params.append(where.since_time)
        if where.parent is not None:
            clauses.append("posts.parent = ?")
            params.append(where.parent)
        sql = f"SELECT posts.* FROM {source}"
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += f" ORDER BY {order} DESC LIMIT ?"
        params.append(where.limit)
        return [_post(row) for row in self.connection.execute(sql, params).fetchall()]

    def posts_after(self, after_id: int, run: str | None, limit: int) -> list[Post]:
        """Posts with an id above `after_id`, oldest first: what a reconnecting stream missed."""
        if run is None:
            rows = self.connection.execute(
                "SELECT * FROM posts WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)
            )
        else:
            rows = self.connection.execute(
                "SELECT * FROM posts WHERE run = ? AND id > ? ORDER BY id LIMIT ?",
                (run, after_id, limit),
            )
        return [_post(row) for row in rows.fetchall()]

    def runs(self) -> list[str]:
        rows = self.connection.execute(
            "SELECT run FROM posts UNION SELECT run FROM artifacts ORDER BY run"
        ).fetchall()
        return [row["run"] for row in rows]

    def activity(self, run: str) -> dict[str, dict[str, object]]:
        """Per author in a run: post and artifact counts and the time of their last write."""
        agents: dict[str, dict[str, object]] = {}
        for row in self.connection.execute(
            "SELECT author, COUNT(*) AS n, MAX(created_at) AS last FROM posts WHERE run = ?"
            " GROUP BY author",
            (run,),
        ):
            agents[row["author"]] = {"posts": row["n"], "artifacts": 0, "last": row["last"]}
        for row in self.connection.execute(
            "SELECT author, COUNT(*) AS n, MAX(created_at) AS last FROM artifacts WHERE run = ?"
            " GROUP BY author",
            (run,),
        ):
            entry = agents.setdefault(row["author"], {"posts": 0, "artifacts": 0, "last": ""})
            entry["artifacts"] = row["n"]
            entry["last"] = max(str(entry["last"] or ""), row["last"])
        return agents

    # Artifacts

    def _has_artifact(self, run: str, digest: str) -> bool:
        return (
            self.connection.execute(
                "SELECT 1 FROM artifacts WHERE run = ? AND digest = ?", (run, digest)
            ).fetchone()
            is not None
        )

    def add_artifact(self, artifact: Artifact) -> tuple[Artifact, bool]:
        """Record an artifact; if the run has that digest already, the existing record and
        False (uploads are immutable: a second upload changes nothing)."""
        with transaction(self.connection) as db:
            existing = db.execute(
                "SELECT * FROM artifacts WHERE run = ? AND digest = ?",
                (artifact.run, artifact.digest),
            ).fetchone()
            if existing is not None:
                return _artifact(existing), False
            if artifact.parent is not None and not self._has_artifact(
                artifact.run, artifact.parent
            ):
                raise ValueError(
                    f"X-Aar-Parent: artifact {artifact.parent} not found in run {artifact.run}"
                )
            db.execute(
                "INSERT INTO artifacts (run, digest, size, author, parent, description, filename,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    artifact.run,
                    artifact.digest,
                    artifact.size,
                    artifact.author,
                    artifact.parent,
                    artifact.description,
                    artifact.filename,
                    artifact.created_at,
                ),
            )
        return artifact, True

    def get_artifact(self, digest: str, run: str | None) -> Artifact:
        if run is None:
            row = self.connection.execute(
                "SELECT * FROM artifacts WHERE digest = ? ORDER BY created_at LIMIT 1", (digest,)
            ).fetchone()
        else:
            row = self.connection.execute(
                "SELECT * FROM artifacts WHERE run = ? AND digest = ?", (run, digest)
            ).fetchone()
        if row is None:
            raise NotFoundError(f"artifact {digest} not found")
        return _artifact(row)

    def list_artifacts(self, run: str | None, author: str | None, limit: int) -> list[Artifact]:
        clauses, params = [], []
        if run is not None:
            clauses.append("run = ?")
            params.append(run)
        if author:
            clauses.append("author = ?")
            params.append(author)
        sql = "SELECT * FROM artifacts"
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += " ORDER BY created_at DESC LIMIT ?"
        return [_artifact(r) for r in self.connection.execute(sql, [*params, limit]).fetchall()]

    def delete_artifact(self, run: str, digest: str) -> bool:
        """Forget a run's artifact; True when no run refers to those bytes any more."""
        with transaction(self.connection) as db:
            db.execute("DELETE FROM artifacts WHERE run = ? AND digest = ?", (run, digest))
            left = db.execute("SELECT 1 FROM artifacts WHERE digest = ? LIMIT 1", (digest,))
            return left.fetchone() is None
