"""One line per problem on stderr, each starting with ``error:``, so a person (and a script) reads what to fix."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


def print_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def print_validation_error(exc: ValidationError, prefix: str = "") -> None:
    """Each invalid field as ``error: <prefix><dotted.location>: <message>``."""
    for err in exc.errors():
        print_error(f"{prefix}{'.'.join(str(p) for p in err['loc'])}: {err['msg']}")
