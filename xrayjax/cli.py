"""What every command line shares: errors as one-line messages, never tracebacks.

Each command (``train``, ``evaluate``, ``predict``, ``data``) calls :func:`quiet_interrupts`
before its heavy imports and runs its work through :func:`run_command`. This module imports
nothing heavy itself, so a Ctrl-C while JAX or TensorFlow Datasets load is one line too.
"""

from __future__ import annotations

import os
import signal
import sys
import warnings
from collections.abc import Callable

from xrayjax import interrupts

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM


def _exit_quietly(signum: int, frame: object) -> None:
    # Exits at once: an exception raised here could be swallowed by an importing library, and
    # nothing has been written yet.
    print("\ninterrupted", file=sys.stderr, flush=True)
    os._exit(EXIT_TERMINATED if signum == signal.SIGTERM else EXIT_INTERRUPTED)


def quiet_interrupts() -> None:
    """Until :func:`run_command` starts: Ctrl-C and SIGTERM exit with one line, no traceback
    (the imports of JAX and friends take seconds)."""
    signal.signal(signal.SIGINT, _exit_quietly)
    signal.signal(signal.SIGTERM, _exit_quietly)


def one_line_warnings() -> None:
    """Warnings as ``warning: message`` lines on stderr, like the errors (no source line)."""
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"


def run_command(body: Callable[[], int], *, start_backend: bool = True,
                interrupted: Callable[[], str] = lambda: "",
                known: tuple[type[BaseException], ...] = ()) -> int:
    """``body()``'s exit status, every failure as one line on stderr.

    Bad input (OSError, ValueError (``DataError`` among them), and the ``known`` error types) exits 2, an
    accelerator failure 1, Ctrl-C 130 and SIGTERM 143, each followed by ``interrupted()``'s
    hint. ``start_backend`` starts JAX's backend first, so a bad ``JAX_PLATFORMS`` is a message.
    """
    interrupts.install()
    one_line_warnings()
    try:
        if start_backend:
            from xrayjax.distributed import check_backend

            check_backend()
        return body()
    except KeyboardInterrupt as e:
        print(f"\ninterrupted{interrupted()}", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(e, interrupts.Terminated) else EXIT_INTERRUPTED
    except (OSError, ValueError, *known) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:
        jax = sys.modules.get("jax")
        if jax is None or not isinstance(e, jax.errors.JaxRuntimeError):
            raise
        from xrayjax.distributed import runtime_error

        if jax.process_count() == 1:
            print(f"error: the accelerator failed: {runtime_error(e)}", file=sys.stderr)
        else:
            print(f"error: a collective with the other processes failed ({runtime_error(e)}); another "
                  "process has probably died (see its log). Restart every process with the same flags "
                  "and --resume to continue from process 0's last checkpoint", file=sys.stderr, flush=True)
            sys.stdout.flush()
            # At exit JAX's shutdown barrier would wait for the dead process, then abort this one
            # (a C++ stack trace, status 134): leave now, the checkpoint already on disk.
            os._exit(EXIT_FAILED)
        return EXIT_FAILED
