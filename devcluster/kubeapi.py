"""A small synchronous client for the local cluster's apiserver (JSON over HTTPS, bearer token),
for the development cluster's own processes; aar's components use kopf and aiohttp instead."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any


class ApiError(RuntimeError):
    """The apiserver answered with an error status; `status` is the HTTP code (0: no answer)."""

    def __init__(self, method: str, path: str, status: int, message: str) -> None:
        super().__init__(f"{method} {path}: {status} {message}")
        self.status = status


class KubeApi:
    """Requests to one apiserver as one bearer-token user."""

    def __init__(self, server: str, token: str, ca_file: Path, timeout: float = 10.0) -> None:
        self.server = server
        self.token = token
        self.context = ssl.create_default_context(cafile=str(ca_file))
        self.timeout = timeout

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
    ) -> Any:
        """Send a request and return the decoded JSON answer (None for an empty one); raise
        ApiError for a non-2xx status or no answer."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.server + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": content_type},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=self.context) as r:
                raw = r.read()
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")
            with contextlib.suppress(ValueError):
                detail = json.loads(detail).get("message", detail)
            raise ApiError(method, path, error.code, detail) from error
        except OSError as error:
            raise ApiError(method, path, 0, str(error)) from error
        return json.loads(raw) if raw else None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def create(self, path: str, body: dict[str, Any]) -> Any:
        """POST, tolerating an object that already exists (409)."""
        try:
            return self.request("POST", path, body)
        except ApiError as error:
            if error.status != 409:
                raise
            return None

    def delete(self, path: str) -> None:
        """DELETE, tolerating an object that is already gone (404)."""
        try:
            self.request("DELETE", path)
        except ApiError as error:
            if error.status != 404:
                raise


def run_every(seconds: float, step: Callable[[], None], what: str) -> None:
    """Call `step` every `seconds` until SIGTERM or SIGINT; an apiserver that does not answer
    (restarting, say) is reported and tried again next time."""
    stopping = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stopping:
        try:
            step()
        except ApiError as error:
            print(f"{what} failed: {error}", flush=True)
        time.sleep(seconds)


def add_api_arguments(parser: argparse.ArgumentParser) -> None:
    """--server, --token-file and --ca-file: how a development-cluster process reaches the
    apiserver."""
    parser.add_argument("--server", required=True)
    parser.add_argument("--token-file", type=Path, required=True)
    parser.add_argument("--ca-file", type=Path, required=True)


def api_from(args: argparse.Namespace) -> KubeApi:
    return KubeApi(args.server, args.token_file.read_text().strip(), args.ca_file)
