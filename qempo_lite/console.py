"""What the ``qempo-lite`` command shows before its work starts: one line per error, nothing before it.

Libraries print while they import. bitsandbytes, which peft imports and transformers' training
arguments import in turn, logs a warning on CPUs with AVX512-BF16 but without its optional
``kernels`` package; vLLM and others print banners. A command's config classes are
subclasses of TRL's, so they cannot be built without those imports. The command therefore
*holds* what is written to stdout and stderr (Python and C level alike) from its start until it
has read and validated its whole input, then calls :func:`release_output`: held text is shown
then, after validation, or dropped when validation fails, so a user's one-line error is the
only line they see (``QEMPO_LITE_DEBUG=1`` shows it all, with the traceback).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile

from .errors import QempoError

_held: "_HeldOutput | None" = None


def debug_enabled() -> bool:
    return os.environ.get("QEMPO_LITE_DEBUG", "").strip() not in ("", "0", "false", "no")


class _HeldOutput:
    """stdout/stderr redirected to temporary files at the file-descriptor level, and Python's streams to buffers."""

    def __init__(self):
        self.streams = (sys.stdout, sys.stderr)
        self.buffers = (io.StringIO(), io.StringIO())
        self.files: dict[int, tempfile.TemporaryFile] = {}
        self.saved: dict[int, int] = {}
        for stream in self.streams:
            _flush(stream)
        for fd in (1, 2):
            try:
                saved = os.dup(fd)
            except OSError:  # no such descriptor (an embedding host): hold Python-level writes only
                continue
            self.saved[fd] = saved
            self.files[fd] = tempfile.TemporaryFile()
            os.dup2(self.files[fd].fileno(), fd)
        sys.stdout, sys.stderr = self.buffers

    def stop(self, show: bool) -> None:
        sys.stdout, sys.stderr = self.streams
        for fd, saved in self.saved.items():
            os.dup2(saved, fd)
            os.close(saved)
        if not show:
            for handle in self.files.values():
                handle.close()
            return
        for fd, stream, buffer in zip((1, 2), self.streams, self.buffers):
            handle = self.files.get(fd)
            if handle is not None:
                handle.seek(0)
                data = handle.read()
                handle.close()
                if data:
                    _flush(stream)
                    os.write(fd, data)
            if buffer.getvalue():
                stream.write(buffer.getvalue())
                _flush(stream)


def _flush(stream) -> None:
    try:
        stream.flush()
    except (OSError, ValueError, AttributeError):
        pass


def hold_output() -> None:
    """Start holding stdout/stderr (the ``qempo-lite`` dispatcher calls this before importing a command)."""
    global _held
    if _held is None and not debug_enabled():
        _held = _HeldOutput()


def release_output(show: bool = True) -> None:
    """Stop holding: show what was held (``show``) or drop it. Commands call this once their input is validated."""
    global _held
    if _held is not None:
        held, _held = _held, None
        held.stop(show)


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one-line :class:`QempoError`s, not a usage block."""

    def error(self, message: str):
        raise QempoError(f"{message}; see '{self.prog} --help'")


__all__ = ["ArgumentParser", "debug_enabled", "hold_output", "release_output"]
