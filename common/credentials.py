"""Agent credentials: minted by the operator, verified offline by forum, scorer and gateway.

A credential is `aar1.<payload>.<signature>`, both parts base64url without padding. The payload
is JSON naming the namespace, run and agent (or an admin role for humans) and is signed with
Ed25519. Only the operator holds the private key; services hold the public key, so an agent can
neither forge a credential for another agent nor change what its own one names.
"""

from __future__ import annotations

import base64
import json
import time
from enum import StrEnum
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, ValidationError

PREFIX = "aar1"

# Environment variables the chart and the operator set; one name each, used everywhere.
SIGNING_KEY_FILE_ENV = "AAR_CREDENTIAL_SIGNING_KEY_FILE"
PUBLIC_KEY_FILE_ENV = "AAR_CREDENTIAL_PUBLIC_KEY_FILE"
VERIFIED_CACHE_SIZE = 4096  # verified credentials remembered per verifier (a fleet's agents)


class Role(StrEnum):
    AGENT = "agent"
    ADMIN = "admin"  # a human (reviewer, operator of the fleet) or the aar operator itself
    # The operator reporting reproductions: it reads artifacts and the scorer's list of what to
    # reproduce, and reports results; every other endpoint refuses it (aar_common.web).
    VERIFIER = "verifier"


class CredentialError(Exception):
    """A credential that is malformed, forged or expired; the message says which."""


class Principal(BaseModel):
    """Who a verified credential names. Agents always have namespace, run and agent set."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Role
    namespace: str = ""
    run: str = ""
    agent: str = ""
    subject: str = ""  # for admins: who they are, for the audit trail
    issued_at: int
    expires_at: int | None = None

    @property
    def run_key(self) -> str:
        """`namespace/run`: runs are namespaced, so a run name alone is ambiguous."""
        return f"{self.namespace}/{self.run}"

    @property
    def name(self) -> str:
        """How logs, posts and submissions name this principal."""
        return self.agent if self.role is Role.AGENT else f"{self.role.value}:{self.subject}"


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def generate_signing_key() -> bytes:
    """A new Ed25519 private key, PEM (PKCS8)."""
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_key_pem(signing_key_pem: bytes) -> bytes:
    """The PEM public key that verifies credentials signed with `signing_key_pem`."""
    return (
        _load_signing_key(signing_key_pem)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def _load_signing_key(pem: bytes) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise CredentialError("the credential signing key must be an Ed25519 private key")
    return key


class CredentialIssuer:
    """Mints credentials; only the operator (and the `aar` CLI for admins) holds one."""

    def __init__(self, signing_key_pem: bytes) -> None:
        self._key = _load_signing_key(signing_key_pem)

    @classmethod
    def from_file(cls, path: Path) -> CredentialIssuer:
        return cls(path.read_bytes())

    def mint(self, principal: Principal) -> str:
        payload = principal.model_dump_json(exclude_defaults=True).encode()
        signature = self._key.sign(PREFIX.encode() + b"." + payload)
        return f"{PREFIX}.{_b64encode(payload)}.{_b64encode(signature)}"

    def mint_agent(self, namespace: str, run: str, agent: str) -> str:
        return self.mint(
            Principal(
                role=Role.AGENT,
                namespace=namespace,
                run=run,
                agent=agent,
                issued_at=int(time.time()),
            )
        )

    def mint_admin(self, subject: str, ttl_seconds: int | None = None) -> str:
        return self._mint_service(Role.ADMIN, subject, ttl_seconds)

    def mint_verifier(self, subject: str, ttl_seconds: int) -> str:
        return self._mint_service(Role.VERIFIER, subject, ttl_seconds)

    def _mint_service(self, role: Role, subject: str, ttl_seconds: int | None) -> str:
        now = int(time.time())
        return self.mint(
            Principal(
                role=role,
                subject=subject,
                issued_at=now,
                expires_at=None if ttl_seconds is None else now + ttl_seconds,
            )
        )


class CredentialVerifier:
    """Checks credentials with the public key alone: no call back to the operator."""

    def __init__(self, public_key_pem: bytes) -> None:
        key = serialization.load_pem_public_key(public_key_pem)
        if not isinstance(key, Ed25519PublicKey):
            raise CredentialError("the credential public key must be an Ed25519 public key")
        self._key = key
        # Checking a signature costs more than the rest of a typical request; a token that
        # verified once always will (only its expiry can change, and is checked on every use).
        self._verified: dict[str, Principal] = {}

    @classmethod
    def from_file(cls, path: Path) -> CredentialVerifier:
        return cls(path.read_bytes())

    def verify(self, token: str, now: float | None = None) -> Principal:
        principal = self._verified.get(token)
        if principal is None:
            principal = self._check_signed(token)
            if len(self._verified) >= VERIFIED_CACHE_SIZE:
                self._verified.pop(next(iter(self._verified)))  # the oldest
            self._verified[token] = principal
        current = time.time() if now is None else now
        if principal.expires_at is not None and current >= principal.expires_at:
            raise CredentialError("credential has expired; mint a new one")
        return principal

    def _check_signed(self, token: str) -> Principal:
        parts = token.strip().split(".")
        if len(parts) != 3 or parts[0] != PREFIX:
            raise CredentialError(f"not an aar credential (expected '{PREFIX}.<payload>.<sig>')")
        try:
            payload, signature = _b64decode(parts[1]), _b64decode(parts[2])
        except ValueError as error:
            raise CredentialError("credential is not valid base64url") from error
        try:
            self._key.verify(signature, PREFIX.encode() + b"." + payload)
        except InvalidSignature as error:
            raise CredentialError("credential signature does not verify") from error
        try:
            principal = Principal.model_validate(json.loads(payload))
        except (ValueError, ValidationError) as error:
            raise CredentialError("credential payload is malformed") from error
        if principal.role is Role.AGENT and not (
            principal.namespace and principal.run and principal.agent
        ):
            raise CredentialError("agent credential must name namespace, run and agent")
        return principal
