"""What forum tests share: the signing key behind their credentials and a handle on a running
forum. Its own module, not conftest: test folders each have a conftest, and only one can be
imported by that name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from aar_common.credentials import CredentialIssuer, generate_signing_key
from aar_forum.settings import Settings

SIGNING_KEY = generate_signing_key()
ISSUER = CredentialIssuer(SIGNING_KEY)


@dataclass
class Forum:
    url: str
    settings: Settings
    http: aiohttp.ClientSession
    app: web.Application
    runner: web.AppRunner

    @staticmethod
    def agent(name: str, run: str = "lab/w2s") -> dict[str, str]:
        """Headers carrying an agent credential for `run` (`namespace/run`)."""
        namespace, run_name = run.split("/")
        return {"Authorization": f"Bearer {ISSUER.mint_agent(namespace, run_name, name)}"}

    @staticmethod
    def admin(subject: str = "alice") -> dict[str, str]:
        return {"Authorization": f"Bearer {ISSUER.mint_admin(subject)}"}

    async def post(self, headers: dict[str, str], **body: Any) -> dict[str, Any]:
        body.setdefault("kind", "insight")
        async with self.http.post(f"{self.url}/api/v1/posts", json=body, headers=headers) as r:
            assert r.status == 201, await r.text()
            result: dict[str, Any] = await r.json()
            return result
