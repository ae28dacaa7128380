"""What the ``qempo-lite`` command shows before its work starts: one line per error, nothing before it.

Libraries print while they import. bitsandbytes, which peft imports and transformers' training
arguments import in turn, logs a warning on CPUs with AVX512-BF16 but without its optional
``kernels`` package; vLLM and others print banners. A command's config classes are
subclasses of TRL's, so they cannot be checked without those imports. The dispatcher
therefore *holds* what is written to stdout and stderr (Python and C level alike) while it
imports the command and the command reads its arguments; the command then calls
:func:`input_read`, which drops that import-time chatter, so that a later one-line error is
the only line a user sees. ``--help`` shows what was held; ``QEMPO_LITE_DEBUG=1`` holds nothing
and shows tracebacks.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile

from .errors import QempoError

_held: "_HeldOutput | None" = None


def debug_enabled() -> bool:
    """Whether ``QEMPO_LITE_DEBUG`` is set (to anything but empty, 0, false or no): show tracebacks."""
    return os.environ.get("QEMPO_LITE_DEBUG", "").strip() not in ("", "0", "false", "no")


class _HeldOutput:
    """stdout/stderr redirected to temporary files at the file-descriptor level, and Python's streams to buffers."""

    def __init__(self, fds: tuple[int, ...] = (1, 2)):
        self.streams = (sys.stdout, sys.stderr)
        self.buffers = (io.StringIO() if 1 in fds else sys.stdout, io.StringIO() if 2 in fds else sys.stderr)
        self.files: dict[int, tempfile.TemporaryFile] = {}
        self.saved: dict[int, int] = {}
        for stream in self.streams:
            _flush(stream)
        for fd in fds:
            try:
                saved = os.dup(fd)
            except OSError:  # no such descriptor (an embedding host): hold Python-level writes only
                continue
            self.saved[fd] = saved
            self.files[fd] = tempfile.TemporaryFile()
            os.dup2(self.files[fd].fileno(), fd)
        sys.stdout, sys.stderr = self.buffers

    def stop(self, show: bool, show_stderr: bool = True) -> str:
        """Restore the streams; write what was held to them when ``show`` (stderr only with ``show_stderr``).
        Returns the held stderr text."""
        for buffer, stream in zip(self.buffers, self.streams):
            if buffer is not stream:
                _flush(buffer)
        _flush(sys.__stdout__)
        _flush(sys.__stderr__)
        sys.stdout, sys.stderr = self.streams
        for fd, saved in self.saved.items():
            os.dup2(saved, fd)
            os.close(saved)
        held_stderr = ""
        for fd, stream, buffer in zip((1, 2), self.streams, self.buffers):
            data = b""
            handle = self.files.get(fd)
            if handle is not None:
                handle.seek(0)
                data = handle.read()
                handle.close()
            text = "" if buffer is stream else buffer.getvalue()
            if fd == 2:
                held_stderr = data.decode("utf-8", "replace") + text
            if show and (fd == 1 or show_stderr):
                if data:
                    _flush(stream)
                    os.write(fd, data)
                if text:
                    stream.write(text)
                    _flush(stream)
        return held_stderr


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


@contextlib.contextmanager
def quiet_setup():
    """Hold stderr while a command loads its data and model: shown once that succeeds, dropped if it fails.

    Loading prints progress bars and library warnings to stderr; a failure there (a model that
    cannot load, every pair too long) then stays one line. Commands report their phases on stdout.
    """
    global _held
    if _held is not None or debug_enabled():
        yield
        return
    _held = _HeldOutput(fds=(2,))
    try:
        yield
    except BaseException:
        release_output(show=False)
        raise
    release_output(show=True)


def release_output(show: bool = True, show_stderr: bool = True) -> str:
    """Stop holding: show what was held (``show``; stderr only with ``show_stderr``) or drop it. Returns the
    held stderr text ("" if none)."""
    global _held
    if _held is None:
        return ""
    held, _held = _held, None
    return held.stop(show, show_stderr)


def input_read() -> None:
    """A command has read its arguments: drop the libraries' import-time output and stop holding."""
    release_output(show=False)


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one-line :class:`QempoError`s, not a usage block."""

    def error(self, message: str):
        raise QempoError(f"{message}; see '{self.prog} --help'")


__all__ = ["ArgumentParser", "debug_enabled", "hold_output", "input_read", "quiet_setup", "release_output"]
