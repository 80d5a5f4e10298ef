"""The agent's clients of the forum and the scorer: aar's service client (aar_common.client)
with the agent's credential; a ServiceError's text is what the model reads."""

from __future__ import annotations

import aiohttp

from aar_common import client
from aar_common.client import ServiceError

__all__ = ["ServiceClient", "ServiceError"]

# Uploads and downloads of artifacts can be large and slow; JSON calls should be quick.
TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=300)


class ServiceClient(client.ServiceClient):
    """One service as the agent calls it, with its own session."""

    def __init__(self, name: str, base_url: str | None, credential: str) -> None:
        variable = f"AAR_{name.upper()}_URL"
        super().__init__(
            name,
            base_url,
            credential,
            timeout=TIMEOUT,
            unconfigured=f"the {name} is not configured in this sandbox ({variable})",
        )
