"""The run folder's lock: one training, or one evaluation, writes a run folder at a time."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path

from xrayjax.runfiles import (
    CONFIG_FILE, FROZEN_FILE, HISTORY_FILE, LOCK_FILE, RUN_FILES, SPLITS_FILE, TIMINGS_FILE, RunFolderError,
)


class RunFolderLock:
    """An exclusive lock on a run folder while a run trains: ``flock`` on ``<run>/.lock``.

    A second process is refused, naming the holder. The OS drops the lock of a process that
    dies, however it dies; the holder it names is then taken over, and ``note`` says so.
    Creating it creates the folder, and removes the temporary files that a killed run's
    writes of its own files left behind (``note`` counts them).
    """

    def __init__(self, run_dir: Path, busy: str = "wait for that run to end or choose another --out"):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / LOCK_FILE
        while True:
            self._file = open(self.path, "a+")
            try:
                fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                self._file.seek(0)
                holder = self._file.read().strip() or "another process"
                self._file.close()
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise RunFolderError(f"run folder {run_dir} is in use by {holder}; {busy}") from None
                raise RunFolderError(f"cannot lock {self.path} ({e.strerror}): the filesystem of {run_dir} "
                                     "does not support file locks; choose an --out on a local disk") from e
            if self.path.exists() and os.fstat(self._file.fileno()).st_ino == self.path.stat().st_ino:
                break
            self._file.close()  # the lock file was replaced while it was opened: lock the new one
        self._file.seek(0)
        previous = self._file.read().strip()
        notes = [f"took over the lock of {run_dir} left by {previous}, which is no longer running"] if previous else []
        stale = [tmp for name in RUN_FILES for tmp in run_dir.glob(f".{name}.*.tmp")]
        for tmp in stale:
            tmp.unlink(missing_ok=True)
        if stale:
            notes.append(f"removed {len(stale)} temporary file(s) of an interrupted write from {run_dir}")
        self.note = "; ".join(notes) or None
        self._write(f"process {os.getpid()} (host {socket.gethostname()})")

    def _write(self, text: str) -> None:
        self._file.seek(0)
        self._file.truncate()
        self._file.write(text)
        self._file.flush()

    def release(self, remove: bool = False) -> None:
        """Unlock; ``remove`` deletes the lock file first (a run that leaves nothing behind)."""
        try:
            if remove:
                self.path.unlink(missing_ok=True)
            else:
                self._write("")  # a clean end leaves no holder to report
        finally:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()


def in_use(run_dir: Path) -> str | None:
    """Who holds ``run_dir``'s :class:`RunFolderLock` (a run training, or an evaluation), or None."""
    try:
        with open(run_dir / LOCK_FILE) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as e:
                return (f.read().strip() or "another process") if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else None
            fcntl.flock(f, fcntl.LOCK_UN)
    except FileNotFoundError:
        pass
    return None


def discard_new_run(run_dir: Path, lock: RunFolderLock, before: set[str], created: bool) -> None:
    """Undo a run that stopped before its first checkpoint, holding its lock: remove the files it
    wrote (never one that was there before), then the lock, then the folder if it made it."""
    for name in (CONFIG_FILE, SPLITS_FILE, HISTORY_FILE, TIMINGS_FILE, FROZEN_FILE):
        if name not in before:
            (run_dir / name).unlink(missing_ok=True)
    lock.release(remove=LOCK_FILE not in before)
    if created and run_dir.is_dir() and not any(run_dir.iterdir()):
        run_dir.rmdir()
