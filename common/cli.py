"""`aar`: the human's command line. Subcommands are added by the components that own them.

A component declares its subcommand in the entry-point group `aar.commands` (pyproject.toml):
the entry is a function that adds its parser to `aar`'s subparsers. `common` never imports a
component, so the arrow points from the component to the command line.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from aar_common.credentials import (
    SIGNING_KEY_FILE_ENV,
    CredentialIssuer,
    generate_signing_key,
    public_key_pem,
)


def _signing_key_path(given: str | None) -> Path:
    path = given or os.environ.get(SIGNING_KEY_FILE_ENV)
    if not path:
        raise SystemExit(
            f"aar: no signing key; pass --signing-key FILE or set {SIGNING_KEY_FILE_ENV} "
            "(create one with `aar keys generate DIR`)"
        )
    if not Path(path).is_file():
        raise SystemExit(f"aar: signing key {path} does not exist")
    return Path(path)


def _keys_generate(args: argparse.Namespace) -> int:
    directory = Path(args.directory)
    directory.mkdir(parents=True, exist_ok=True)
    private, public = directory / "signing-key.pem", directory / "public-key.pem"
    if private.exists() and not args.force:
        raise SystemExit(f"aar: {private} exists; pass --force to replace it")
    pem = generate_signing_key()
    descriptor = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(pem)
    public.write_bytes(public_key_pem(pem))
    print(f"Wrote {private} (keep it secret: the operator's) and {public} (for the services)")
    return 0


def _credential_mint(args: argparse.Namespace) -> int:
    issuer = CredentialIssuer.from_file(_signing_key_path(args.signing_key))
    if args.admin:
        print(issuer.mint_admin(args.admin, ttl_seconds=args.ttl))
    else:
        if not (args.namespace and args.run and args.agent):
            raise SystemExit("aar: an agent credential needs --namespace, --run and --agent")
        print(issuer.mint_agent(args.namespace, args.run, args.agent))
    return 0


def _add_keys(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = commands.add_parser("keys", help="credential signing keys")
    sub = keys.add_subparsers(dest="keys_command", required=True)
    generate = sub.add_parser("generate", help="write a new signing key and its public key")
    generate.add_argument("directory")
    generate.add_argument("--force", action="store_true", help="replace an existing key")
    generate.set_defaults(handler=_keys_generate)


def _add_credential(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    credential = commands.add_parser("credential", help="aar credentials")
    sub = credential.add_subparsers(dest="credential_command", required=True)
    mint = sub.add_parser("mint", help="mint an admin or agent credential")
    mint.add_argument("--signing-key", help=f"private key file (default: ${SIGNING_KEY_FILE_ENV})")
    mint.add_argument("--admin", metavar="SUBJECT", help="an admin credential for this person")
    mint.add_argument("--ttl", type=int, default=None, help="admin credential lifetime, seconds")
    mint.add_argument("--namespace")
    mint.add_argument("--run")
    mint.add_argument("--agent")
    mint.set_defaults(handler=_credential_mint)


# A string: argparse's subparsers class is generic to type checkers only.
AddSubcommand = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]
COMMAND_GROUP = "aar.commands"


def subcommands() -> list[AddSubcommand]:
    """`aar`'s own subcommands, then each component's from the entry-point group, by name."""
    declared = sorted(importlib.metadata.entry_points(group=COMMAND_GROUP), key=lambda e: e.name)
    if not declared:
        # The group comes from the installed package's metadata: none at all means an install
        # older than the group (e.g. an editable install made before it was added).
        raise SystemExit(f"aar: no {COMMAND_GROUP} entry points; reinstall aar (make venv)")
    return [_add_keys, _add_credential, *(entry.load() for entry in declared)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aar", description="aar: fleets of research agents")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in subcommands():
        add(commands)
    args = parser.parse_args(argv)
    result: int = args.handler(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
