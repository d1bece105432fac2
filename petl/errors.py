"""User-facing errors and the CLI's one-line reporting of them."""
from __future__ import annotations

import functools
import os
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


class PetlError(Exception):
    """Base class of petl errors whose message is a complete, one-line instruction to the user."""


def one_line_errors(func: F) -> F:
    """Decorate a CLI command: bad input is printed as ``Error: ...`` (exit code 2), no traceback.

    Set ``PETL_DEBUG=1`` to see the full traceback instead.
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (PetlError, ValueError, FileNotFoundError, KeyError, ImportError) as exc:
            if os.environ.get("PETL_DEBUG"):
                raise
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if isinstance(exc, KeyError):
                message = f"missing key {message}"
            print(f"Error: {message}", file=sys.stderr)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
