"""How aar words a pydantic validation failure: each wrong field by its path, with the reason."""

from __future__ import annotations

from pydantic import ValidationError


def describe(error: ValidationError, whole: str = "body") -> str:
    """`field.path: reason; other: reason`; `whole` names a failure of the value as a whole."""
    return "; ".join(
        f"{'.'.join(str(part) for part in issue['loc']) or whole}: {issue['msg']}"
        for issue in error.errors(include_url=False)
    )
