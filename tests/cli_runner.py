"""Run ``python -m qempo_lite.cli ARGS`` (or any ``python ARGS``) in a fresh process without paying torch's import
each time.

Most command-line tests run a command that fails in its first second (a bad flag, a hostile recipe)
or trains a tiny model for a few steps; starting Python and importing torch, transformers, PEFT and
TRL took about 6 s of CPU per run, most of the suite's command-line time. :func:`run_cli` sends the
command to one helper process (started on first use, stopped when the tests end) that has imported
those libraries once and nothing else. For each command the helper forks: the child gets its own
working directory, environment, stdin from /dev/null and stdout/stderr into files, runs
``qempo_lite.cli`` as ``__main__`` exactly as ``python -m qempo_lite.cli`` does (:func:`run_python`: a
script, ``-c CODE`` or another module, with ``PYTHONPATH`` put first on ``sys.path`` as Python puts it), and
ends as that process would (an uncaught exception printed, exit status 1; the ``atexit`` handlers run; output
flushed), except that the interpreter's module teardown (2-3 s with torch and TRL loaded) is
skipped. The test gets its exit status (a signal as ``-N``, as ``subprocess`` reports it), stdout
and stderr as a ``subprocess.CompletedProcess``. qempo-lite's own modules are imported in the
child, so each command imports them afresh; the environment is applied before they are. Libraries that read an environment variable when imported read the
helper's, which is the test process's plus ``HF_HUB_OFFLINE=1`` and ``HF_DATASETS_OFFLINE=1``
(every command runs with those). A whole process of its own, teardown included, is still what
``tests/test_wheel.py``, ``tests/test_cli_offline.py`` (the installed command's one error line) and
the torchrun tests run.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
PRELOADED = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "safetensors", "yaml")

_helper: subprocess.Popen | None = None
_socket_path: str | None = None
_lock = threading.Lock()


def command_env(**env: str) -> dict[str, str]:
    """The environment a command runs with: this process's, qempo-lite from this checkout, offline, and ``env``."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, **BASE_ENV, "PYTHONPATH": path, **env}


def _start() -> str:
    global _helper, _socket_path
    with _lock:
        if _helper is None or _helper.poll() is not None:
            _socket_path = os.path.join(tempfile.mkdtemp(prefix="qempo-cli-"), "socket")
            log = Path(_socket_path).with_name("helper.log")  # what the libraries print when imported
            with open(log, "w") as stderr:
                _helper = subprocess.Popen([sys.executable, __file__, _socket_path], env=command_env(),
                                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, text=True)
            ready = _helper.stdout.readline().strip()
            if ready != "ready":
                raise RuntimeError(f"the command helper did not start (exit {_helper.poll()}): "
                                   f"{log.read_text()[-2000:]}")
            atexit.register(stop)
        return _socket_path


def stop() -> None:
    """Stop the helper and remove its folder (at exit; a running command's child is left to finish or be killed by
    its test)."""
    global _helper
    if _helper is not None and _helper.poll() is None:
        _helper.terminate()
        _helper.wait(timeout=30)
    _helper = None
    if _socket_path is not None:
        shutil.rmtree(os.path.dirname(_socket_path), ignore_errors=True)


def run_cli(argv: list[str], cwd: Path | str, *, env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m qempo_lite.cli *argv`` in ``cwd`` with ``env`` (default :func:`command_env`), in a fresh process."""
    return run_python(["-m", "qempo_lite.cli", *argv], cwd, env=env, timeout=timeout)


def run_python(args: list[str], cwd: Path | str, *, env: dict[str, str] | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """``python *args`` (``-m MODULE ...``, ``-c CODE ...`` or ``SCRIPT ...``) in ``cwd`` with ``env`` (default
    :func:`command_env`), in a fresh process."""
    args = [str(a) for a in args]
    if not args or (args[0].startswith("-") and (args[0] not in ("-m", "-c") or len(args) < 2)):
        raise ValueError(f"run_python runs '-m MODULE ...', '-c CODE ...' or 'SCRIPT ...', not {args[:1]}")
    path = _start()
    with tempfile.TemporaryDirectory(prefix="qempo-cli-run-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        request = {"args": args, "cwd": str(cwd), "env": env if env is not None else command_env(),
                   "stdout": str(out), "stderr": str(err)}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(path)
            conn.sendall(json.dumps(request).encode() + b"\n")
            reader = conn.makefile("r")
            pid = int(reader.readline())
            conn.settimeout(timeout)
            try:
                status = reader.readline()
            except (socket.timeout, TimeoutError):
                os.kill(pid, signal.SIGKILL)
                raise subprocess.TimeoutExpired([sys.executable, *args], timeout) from None
        return subprocess.CompletedProcess([sys.executable, *args], int(status), out.read_text(errors="replace"),
                                           err.read_text(errors="replace"))


# ------------------------------------------------------------------------------------------------- the helper


def _python_path(first: str, env: dict[str, str]) -> list[str]:
    """``sys.path`` as Python builds it for ``env``: ``first``, then ``PYTHONPATH``, then the interpreter's own
    entries (the helper's, less its own first entry and the ``PYTHONPATH`` it was started with)."""
    own = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    wanted = [os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    return [first, *wanted, *(p for p in sys.path[1:] if p not in own and os.path.abspath(p) not in wanted)]


def _run_command(request: dict) -> None:
    """In the forked child: become ``python ARGS`` and end as that process would."""
    import runpy

    os.chdir(request["cwd"])
    sys.path[:] = _python_path(_first_path(request["args"]), request["env"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, name, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY | os.O_CREAT),
                            (2, request["stderr"], os.O_WRONLY | os.O_CREAT)):
        opened = os.open(name, flags, 0o600)
        os.dup2(opened, fd)
        os.close(opened)
    kind, *rest = request["args"]
    try:
        if kind == "-m":  # raises SystemExit(main()) for qempo_lite.cli
            sys.argv = [kind, *rest[1:]]  # runpy puts the module's file first, as python -m does
            runpy.run_module(rest[0], run_name="__main__", alter_sys=True)
        elif kind == "-c":
            sys.argv = ["-c", *rest[1:]]
            exec(compile(rest[0], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        else:
            sys.argv = [kind, *rest]
            runpy.run_path(kind, run_name="__main__")
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1
        if isinstance(exit_.code, str):
            print(exit_.code, file=sys.stderr)
    except BaseException:  # what the interpreter does with an exception nothing caught
        import traceback

        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # the module teardown that follows in a real process takes 2-3 s with torch and TRL loaded


def _first_path(args: list[str]) -> str:
    """What Python puts first on ``sys.path``: the working directory for ``-m`` and ``-c``, a script's folder."""
    return os.getcwd() if args[0] in ("-m", "-c") else os.path.dirname(os.path.abspath(args[0]))


def _handle(conn: socket.socket) -> None:
    """In a child of the helper: fork the command, send its pid, wait for it, send its exit status."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    request = json.loads(conn.makefile("r").readline())
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        conn.close()
        _run_command(request)  # never returns
    conn.sendall(f"{pid}\n".encode())
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    try:
        conn.sendall(f"{code}\n".encode())
    finally:
        os._exit(0)


def _serve(path: str) -> None:
    for name in PRELOADED:
        __import__(name)
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401  - the lazy modules commands use
    from trl import DPOTrainer, GRPOTrainer  # noqa: F401

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the handlers are reaped by the system
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        if os.fork() == 0:
            server.close()
            _handle(conn)  # never returns
        conn.close()


if __name__ == "__main__":
    _serve(sys.argv[1])
