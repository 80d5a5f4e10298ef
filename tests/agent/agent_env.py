"""What the agent tier's tests share besides fixtures: the run's identity and credentials, and
a running service called as an admin."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from dataclasses import dataclass
from typing import Any

from aar_common.credentials import CredentialIssuer, generate_signing_key

SIGNING_KEY = generate_signing_key()
ISSUER = CredentialIssuer(SIGNING_KEY)
NAMESPACE, RUN, AGENT = "research", "w2s-chat", "w2s-chat-0"
# The agent's own credential: the gateway (here the stand-in) takes it as the API key.
CREDENTIAL = ISSUER.mint_agent(NAMESPACE, RUN, AGENT)
ADMIN = {"Authorization": f"Bearer {ISSUER.mint_admin('reviewer')}"}
TASK_LABELS = ["A", "B"]
TASK_TRUTH = ["A", "B", "B", "A"] * 50


@dataclass
class Service:
    url: str
    process: subprocess.Popen[str]

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """Call the service as an admin (what a person or the operator sees)."""
        request = urllib.request.Request(
            self.url + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={**ADMIN, "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)
