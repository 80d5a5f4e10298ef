"""Agent credentials: verified offline with the public key, unforgeable without the private."""

from __future__ import annotations

import base64
import json

import pytest

from aar_common import credentials
from aar_common.cli import main as aar
from aar_common.credentials import (
    CredentialError,
    CredentialIssuer,
    CredentialVerifier,
    Principal,
    Role,
    generate_signing_key,
    public_key_pem,
)


@pytest.fixture(scope="module")
def signing_key() -> bytes:
    return generate_signing_key()


@pytest.fixture(scope="module")
def verifier(signing_key: bytes) -> CredentialVerifier:
    return CredentialVerifier(public_key_pem(signing_key))


def test_agent_credential_names_namespace_run_and_agent(
    signing_key: bytes, verifier: CredentialVerifier
) -> None:
    token = CredentialIssuer(signing_key).mint_agent("research", "w2s-chat", "w2s-chat-3")
    principal = verifier.verify(token)
    assert principal.role is Role.AGENT
    assert (principal.namespace, principal.run, principal.agent) == (
        "research",
        "w2s-chat",
        "w2s-chat-3",
    )
    assert principal.run_key == "research/w2s-chat"
    assert principal.name == "w2s-chat-3"


def test_changing_the_payload_breaks_the_signature(
    signing_key: bytes, verifier: CredentialVerifier
) -> None:
    prefix, payload, signature = (
        CredentialIssuer(signing_key).mint_agent("ns", "run", "run-0").split(".")
    )
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["agent"] = "run-1"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(CredentialError, match="signature does not verify"):
        verifier.verify(f"{prefix}.{forged}.{signature}")


def test_a_credential_signed_by_another_key_is_refused(verifier: CredentialVerifier) -> None:
    impostor = CredentialIssuer(generate_signing_key()).mint_admin("mallory")
    with pytest.raises(CredentialError, match="signature does not verify"):
        verifier.verify(impostor)


def test_a_remembered_payload_with_another_signature_is_refused(
    signing_key: bytes, verifier: CredentialVerifier
) -> None:
    # Once a genuine credential is remembered, its payload under any other signature is a forgery.
    issuer = CredentialIssuer(signing_key)
    prefix, payload, signature = issuer.mint_agent("ns", "run", "run-0").split(".")
    assert verifier.verify(f"{prefix}.{payload}.{signature}").agent == "run-0"
    other = issuer.mint_agent("ns", "run", "run-1").split(".")[2]
    for wrong in (other, "A" * len(signature), ""):
        with pytest.raises(CredentialError):
            verifier.verify(f"{prefix}.{payload}.{wrong}")


@pytest.mark.parametrize("missing", ["namespace", "run", "agent"])
def test_an_agent_credential_that_does_not_name_its_namespace_run_and_agent_is_refused(
    signing_key: bytes, verifier: CredentialVerifier, missing: str
) -> None:
    # Signed by the operator's own key, so only the claims check stands in the way. Forum,
    # scorer and gateway all accept a credential through CredentialVerifier.verify alone.
    claims = {"namespace": "ns", "run": "run", "agent": "run-0", missing: ""}
    token = CredentialIssuer(signing_key).mint(Principal(role=Role.AGENT, issued_at=1, **claims))
    with pytest.raises(CredentialError, match="must name namespace, run and agent"):
        verifier.verify(token)


@pytest.mark.parametrize("token", ["", "Bearer x", "aar1.x", "aar2.e30.e30", "aar1.!!.??"])
def test_garbage_is_refused_with_a_reason(verifier: CredentialVerifier, token: str) -> None:
    with pytest.raises(CredentialError):
        verifier.verify(token)


def test_admin_credentials_expire(signing_key: bytes, verifier: CredentialVerifier) -> None:
    token = CredentialIssuer(signing_key).mint_admin("alice", ttl_seconds=60)
    principal = verifier.verify(token)
    assert principal.name == "admin:alice"
    with pytest.raises(CredentialError, match="expired"):
        verifier.verify(token, now=principal.issued_at + 61)


def test_cli_generates_keys_and_mints_credentials(
    tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = str(tmp_path)
    assert aar(["keys", "generate", directory]) == 0
    with pytest.raises(SystemExit, match="--force"):
        aar(["keys", "generate", directory])
    capsys.readouterr()
    key = f"{directory}/signing-key.pem"
    assert aar(["credential", "mint", "--signing-key", key, "--admin", "alice"]) == 0
    token = capsys.readouterr().out.strip()
    public = CredentialVerifier.from_file(__import__("pathlib").Path(directory, "public-key.pem"))
    assert public.verify(token).subject == "alice"
    with pytest.raises(SystemExit, match="--namespace, --run and --agent"):
        aar(["credential", "mint", "--signing-key", key, "--run", "r"])


def test_a_remembered_credential_still_expires_and_memory_stays_bounded(
    signing_key: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(credentials, "VERIFIED_CACHE_SIZE", 8)
    verifier = CredentialVerifier(public_key_pem(signing_key))
    issuer = CredentialIssuer(signing_key)
    token = issuer.mint_admin("bob", ttl_seconds=60)
    issued = verifier.verify(token).issued_at
    assert verifier.verify(token, now=issued + 59).name == "admin:bob"  # answered from memory
    with pytest.raises(CredentialError, match="expired"):
        verifier.verify(token, now=issued + 60)
    for index in range(20):
        verifier.verify(issuer.mint_agent("ns", "run", f"run-{index}"))
    assert len(verifier._verified) == 8
