"""The servers the tests start (vLLM, the app) do not outlive a test process that is killed (Linux, as CI)."""

import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import start_process_group, stop_process_group

TESTS = Path(__file__).resolve().parent
SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


def _alive(pid: int) -> bool:
    """Running, not gone and not a zombie left for a parent that does not reap."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_killed_test_process_takes_its_server_along():
    code = (f"import sys, time; sys.path.insert(0, {str(TESTS)!r}); from conftest import start_process_group; "
            f"p = start_process_group({SLEEPER!r}); print(p.pid, flush=True); time.sleep(120)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        server = int(parent.stdout.readline())
        assert _alive(server) and os.getsid(server) == server  # a session (and group) of its own
        parent.kill()  # SIGKILL: no finalizer of the test process runs
        parent.wait()
        deadline = time.monotonic() + 10
        while _alive(server) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(server), "the server outlived the killed test process"
    finally:
        parent.kill()


def test_stopping_the_group_stops_what_the_server_started(tmp_path):
    pid_file = tmp_path / "grandchild"
    code = (f"import subprocess, time; p = subprocess.Popen({SLEEPER!r}); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(120)")
    server = start_process_group([sys.executable, "-c", code])
    deadline = time.monotonic() + 30
    while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    grandchild = int(pid_file.read_text())
    stop_process_group(server, timeout=10)
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.returncode is not None and not _alive(grandchild)
