"""The one client of aar's own services (docs/interfaces.md): a base URL, a Bearer credential,
timeouts, JSON or pydantic bodies in and out, and every failure one ServiceError that carries
the HTTP status and the service's own message from its error JSON."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import aiohttp
from pydantic import BaseModel, ValidationError

from aar_common.validation import describe

Model = TypeVar("Model", bound=BaseModel)
# A credential, or a function that gives a fresh one for each request.
Credential = str | Callable[[], str]


class ServiceError(Exception):
    """A service refused a request, or gave no usable answer. str() is one line naming the
    service and the call; `status` is the HTTP status of a refusal (None when no answer came or
    it was unusable) and `message` the service's own message, or why there was no answer."""

    def __init__(self, text: str, message: str, status: int | None = None) -> None:
        super().__init__(text)
        self.message = message
        self.status = status


def error_message(body: str) -> str:
    """The `error.message` of aar's (Anthropic-shaped) error JSON, else the body itself."""
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body[:500] or "(empty body)"


class ServiceClient:
    """Calls to one service. With `session` it borrows that pooled session (its owner closes
    it); without, it opens its own on first use and close() closes it. A base URL of None is a
    service not configured: each call then raises ServiceError(`unconfigured`)."""

    def __init__(
        self,
        name: str,
        base_url: str | None,
        credential: Credential,
        *,
        timeout: aiohttp.ClientTimeout,
        session: aiohttp.ClientSession | None = None,
        unconfigured: str | None = None,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/") if base_url else None
        self.timeout = timeout
        self._credential = credential
        self._session = session
        self._owns_session = session is None
        self._unconfigured = unconfigured or f"the {name} is not configured"

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or (self._owns_session and self._session.closed):
            self._session = aiohttp.ClientSession()
        return self._session

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()

    async def __aenter__(self) -> ServiceClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def _headers(self, extra: dict[str, str] | None) -> dict[str, str]:
        credential = self._credential if isinstance(self._credential, str) else self._credential()
        return {"Authorization": f"Bearer {credential}", **(extra or {})}

    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: BaseModel | Any = None,
        params: dict[str, str] | None = None,
        data: Any = None,
        headers: dict[str, str] | None = None,
        save_to: Path | None = None,
        raw: bool = False,
    ) -> Any:
        """Call the service; returns its JSON (None for an empty body), its bytes with `raw`,
        or writes the body to `save_to` and returns its size. Raises ServiceError on any
        failure."""
        if self.base_url is None:
            raise ServiceError(self._unconfigured, self._unconfigured)
        url = self.base_url + path
        headers = self._headers(headers)
        if json_body is not None:
            data = (
                json_body.model_dump_json()
                if isinstance(json_body, BaseModel)
                else json.dumps(json_body)
            )
            headers["Content-Type"] = "application/json"
        try:
            async with self._open().request(
                method, url, params=params, data=data, headers=headers, timeout=self.timeout
            ) as response:
                if response.status >= 400:
                    message = error_message(await response.text())
                    raise ServiceError(
                        f"{self.name} answered {response.status} to {method} {path}: {message}",
                        message,
                        response.status,
                    )
                if save_to is not None:
                    return await _save(response, save_to)
                body = await response.read()
        except (aiohttp.ClientError, TimeoutError) as error:
            reason = str(error) or type(error).__name__
            raise ServiceError(
                f"could not reach the {self.name} at {url}: {reason}", reason
            ) from error
        if raw:
            return body
        if not body:
            return None
        try:
            return json.loads(body)
        except ValueError as error:
            raise self._unusable(method, path, f"not JSON ({error})") from error

    async def get(
        self, path: str, model: type[Model], params: dict[str, str] | None = None
    ) -> Model:
        """GET a body of a known shape; one that does not fit it is a ServiceError."""
        answer = await self.request("GET", path, params=params)
        try:
            return model.model_validate(answer)
        except ValidationError as error:
            raise self._unusable(
                "GET", path, f"not a {model.__name__}: {describe(error)}"
            ) from error

    def _unusable(self, method: str, path: str, why: str) -> ServiceError:
        message = f"the answer is {why}"
        return ServiceError(f"{self.name}'s answer to {method} {path}: {message}", message)


async def _save(response: aiohttp.ClientResponse, path: Path) -> int:
    size = 0
    with path.open("wb") as file:
        async for chunk in response.content.iter_chunked(1 << 20):
            file.write(chunk)
            size += len(chunk)
    return size
