"""What the evaluate and predict command lines share: errors as one-line messages, never tracebacks."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable

import jax

from xrayjax.data import DataError
from xrayjax.distributed import check_backend, runtime_error


def one_line_warnings() -> None:
    """Warnings as ``warning: message`` lines on stderr, like the errors (no source line)."""
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"


def run_command(body: Callable[[], int]) -> int:
    """``body()``'s exit status after starting JAX's backend. Bad input (OSError, ValueError,
    DataError) exits 2, an accelerator failure 1, Ctrl-C 130, each with one line on stderr."""
    one_line_warnings()
    try:
        check_backend()
        return body()
    except (OSError, ValueError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except jax.errors.JaxRuntimeError as e:
        print(f"error: the accelerator failed: {runtime_error(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
