"""The adapter folders a ``rollout: vllm_server`` run writes for the server, and those that ended runs left behind.

A run writes each synced adapter to ``ADAPTER_DIR/qempo-RUN-N`` and deletes the previous one, so
a run that is killed leaves its last folder behind. Each run holds an exclusive lock on
``ADAPTER_DIR/.qempo-RUN.lock`` while it lives (``flock``: the system releases it when the
process dies, however it dies). On its first sync and when it closes, a run deletes every
``qempo-*`` folder whose run holds no lock: those of ended runs, never those of a run still
using a shared ``vllm_server_adapter_dir``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path

_FOLDER = re.compile(r"qempo-([0-9a-f]+)-\d+")


def _lock_path(adapter_dir: Path, run: str) -> Path:
    return adapter_dir / f".qempo-{run}.lock"


def _try_lock(path: Path) -> int | None:
    """An open descriptor holding ``path``'s exclusive lock (the file created if missing), or None if a
    live process holds it."""
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:  # deleted by a sweep between open and lock: take a fresh one
            same = False
        if same:
            return fd
        os.close(fd)


class ServedDirs:
    """The lock of one run on ``adapter_dir``, and the sweep of what ended runs left there."""

    def __init__(self, adapter_dir: Path, run: str):
        self.adapter_dir, self.run = Path(adapter_dir), run
        self._fd: int | None = None

    def claim(self) -> None:
        """Create ``adapter_dir``, take this run's lock and delete what ended runs left (once per run)."""
        if self._fd is not None:
            return
        self.adapter_dir.mkdir(parents=True, exist_ok=True)
        self._fd = _try_lock(_lock_path(self.adapter_dir, self.run))
        self.sweep()

    def sweep(self) -> list[str]:
        """Delete the folders (and lock files) of every other run that holds no lock; their names."""
        if not self.adapter_dir.is_dir():
            return []
        removed = []
        runs: dict[str, list[Path]] = {}
        for entry in self.adapter_dir.iterdir():
            found = _FOLDER.fullmatch(entry.name)
            if found and entry.is_dir() and found.group(1) != self.run:
                runs.setdefault(found.group(1), []).append(entry)
            lock = re.fullmatch(r"\.qempo-([0-9a-f]+)\.lock", entry.name)
            if lock and lock.group(1) != self.run:
                runs.setdefault(lock.group(1), [])
        for run, folders in runs.items():
            lock = _lock_path(self.adapter_dir, run)
            fd = _try_lock(lock)
            if fd is None:
                continue  # that run is alive
            try:
                for folder in folders:
                    shutil.rmtree(folder, ignore_errors=True)
                    removed.append(folder.name)
                lock.unlink(missing_ok=True)
            finally:
                os.close(fd)
        return removed

    def release(self) -> None:
        """Drop this run's lock, delete what ended runs left, and ``adapter_dir`` itself once it is empty."""
        if self._fd is not None:
            _lock_path(self.adapter_dir, self.run).unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None
        self.sweep()
        with contextlib.suppress(OSError):
            self.adapter_dir.rmdir()  # only when nothing else is left in it


__all__ = ["ServedDirs"]
