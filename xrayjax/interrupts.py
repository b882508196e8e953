"""Ctrl-C and SIGTERM as exceptions that a library cannot swallow.

A signal handler's exception is raised wherever Python happens to be; in a finalizer (a
generator or object collected mid-step) Python prints it as "Exception ignored" and goes on.
So the handler also records the signal, and the training loop calls :func:`raise_if_pending`
at each step, which raises it again. Inside :func:`deferred` (an epoch) the first signal is
only recorded, so it is raised between two steps, where the state and the epoch's metrics
agree and a mid-epoch checkpoint can be written, or once the epoch's checkpoint is written;
a second one raises at once. Imports nothing heavy (the commands install it first).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

_pending: list[int] = []  # the signals received, while :func:`install` handles them
_deferring: list[bool] = []


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is (the last checkpoint is kept)."""


def _raise(signum: int, frame: object) -> None:
    _pending.append(signum)
    if _deferring and len(_pending) == 1:
        try:  # async-signal safe; stderr may be a closed pipe (a `| tee` that the Ctrl-C ended)
            again = b"Ctrl-C" if signum == signal.SIGINT else b"another signal"
            os.write(2, b"\nstopping after the step under way (" + again + b" again: at once)\n")
        except OSError:
            pass
        return
    raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


def install() -> None:
    """Ctrl-C raises KeyboardInterrupt and SIGTERM :class:`Terminated`, both recorded."""
    _pending.clear()
    signal.signal(signal.SIGINT, _raise)
    signal.signal(signal.SIGTERM, _raise)


def pending() -> bool:
    """Whether a signal was received since :func:`install` (it stays recorded once raised)."""
    return bool(_pending)


def raise_if_pending() -> None:
    """Raise the first signal :func:`install`'s handler received, in case it was swallowed."""
    if _pending:
        raise Terminated if _pending[0] == signal.SIGTERM else KeyboardInterrupt


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """The first signal inside is raised by the next :func:`raise_if_pending`, not where it lands."""
    _deferring.append(True)
    try:
        yield
    finally:
        _deferring.pop()
