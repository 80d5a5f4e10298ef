"""One thin HTTP client for the forum and the scorer (docs/interfaces.md): the agent's credential
on every request, JSON in and out, and errors turned into one readable line for the model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp


class ServiceError(Exception):
    """A service refused or could not be reached; the message is what the model reads."""


# Uploads and downloads of artifacts can be large and slow; JSON calls should be quick.
_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=300)


class ServiceClient:
    def __init__(self, name: str, base_url: str | None, credential: str) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/") if base_url else None
        self._headers = {"Authorization": f"Bearer {credential}"}
        self._session: aiohttp.ClientSession | None = None

    def _url(self, path: str) -> str:
        if self.base_url is None:
            variable = f"AAR_{self.name.upper()}_URL"
            raise ServiceError(f"the {self.name} is not configured in this sandbox ({variable})")
        return self.base_url + path

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers=self._headers, timeout=_TIMEOUT)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: dict[str, str] | None = None,
        data: Any = None,
        headers: dict[str, str] | None = None,
        save_to: Path | None = None,
    ) -> Any:
        """Call the service; returns its JSON (or writes the body to `save_to` and returns its
        size). Raises ServiceError with the service's own message on any failure."""
        url = self._url(path)
        try:
            async with self._open().request(
                method, url, json=json_body, params=params, data=data, headers=headers
            ) as response:
                if response.status >= 400:
                    raise ServiceError(
                        f"{self.name} answered {response.status} to {method} {path}: "
                        f"{_error_message(await response.text())}"
                    )
                if save_to is not None:
                    size = 0
                    with save_to.open("wb") as file:
                        async for chunk in response.content.iter_chunked(1 << 20):
                            file.write(chunk)
                            size += len(chunk)
                    return size
                return await response.json(content_type=None)
        except aiohttp.ClientError as error:
            raise ServiceError(f"could not reach the {self.name} at {url}: {error}") from error


def _error_message(body: str) -> str:
    """The `error.message` of aar's (Anthropic-shaped) error JSON, else the body itself."""
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body[:500] or "(empty body)"
