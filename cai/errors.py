"""One error type for bad user input: it becomes a one-line message and exit code 2."""

from __future__ import annotations

import functools
import sys


class CaiError(Exception):
    """Bad input from the user (file, field, value). The message names where and what was expected."""


class NonFiniteError(CaiError, FloatingPointError):
    """Training produced a NaN or inf (loss, gradient or weight) and stopped before saving it: a CaiError, so the
    CLIs print one line and exit 2, and a FloatingPointError for callers that catch the arithmetic kind."""


def cli_main(fn):
    """Wrap a CLI `main(argv)` so a CaiError prints one line to stderr and exits 2."""

    @functools.wraps(fn)
    def wrapper(argv=None):
        try:
            return fn(sys.argv[1:] if argv is None else argv)
        except CaiError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
