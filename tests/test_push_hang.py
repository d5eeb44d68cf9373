"""A Hub that stops answering while push.py uploads (the test Hub paused with SIGSTOP as the upload starts): push.py
ends within a few --timeouts, with one line saying whether anything landed, and leaves no build folder."""

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sam_testing import hub_env

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "hf_push_hang_token"
TIMEOUT_S = 2


@contextlib.contextmanager
def hub_process(root):
    """tests/hub_server.py in its own process (so that it can be paused), logging every request, yielding (process,
    url)."""
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "hub_server.py"), "--root", str(root), "--token",
                               TOKEN, "--verbose"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield server, server.stdout.readline().strip()
    finally:
        server.send_signal(signal.SIGCONT)
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_a_hub_paused_as_the_upload_starts_ends_the_push_within_a_few_timeouts(tmp_path):
    with hub_process(tmp_path / "hub") as (server, url):
        push = subprocess.Popen(
            [sys.executable, str(ROOT / "push.py"), "--source", "random:sam-tiny", "--repo-id", "tester/paused",
             "--timeout", str(TIMEOUT_S)], cwd=tmp_path, env=hub_env(url, tmp_path / "home", token=TOKEN),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        paused = []

        def pause_after_the_preupload():  # the server logs a request once answered: the upload comes next
            for line in server.stderr:
                if "/preupload/" in line and not paused:
                    server.send_signal(signal.SIGSTOP)
                    paused.append(time.monotonic())

        threading.Thread(target=pause_after_the_preupload, daemon=True).start()
        try:
            stdout, stderr = push.communicate(timeout=20 * TIMEOUT_S + 200)
        except subprocess.TimeoutExpired:
            push.kill()
            stdout, stderr = push.communicate()
            pytest.fail(f"push.py still ran {time.monotonic() - paused[0]:.0f} s after the Hub was paused:\n"
                        f"{stdout}\n{stderr[-3000:]}")
        assert paused, stdout + stderr[-3000:]
        paused = paused[0]
        elapsed = time.monotonic() - paused
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    print(f"push.py ended {elapsed:.1f} s after the Hub was paused: {errors}")
    assert push.returncode == 1 and "Traceback" not in stderr and len(errors) == 1, stderr[-3000:]
    assert "Uploading" in stdout and "Committed" not in stdout
    assert re.search("nothing was committed|Whether it landed is unknown", errors[0], re.IGNORECASE), errors[0]
    assert elapsed < 15 * TIMEOUT_S + 30, (elapsed, errors[0])
    assert not [path for path in tmp_path.rglob(".sam-split-build-*")] and not list(Path(os.environ.get(
        "TMPDIR", "/tmp")).glob(f".sam-split-build-*{os.getpid()}*"))
