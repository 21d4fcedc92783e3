"""`make demo` end to end: it starts everything, shows the sample's predictions, and Ctrl-C stops it all."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import urllib.request

from conftest import free_port


def test_demo_starts_everything_and_stops_it_on_ctrl_c(tmp_path):
    port, backend = free_port(), free_port()
    # a relative --dir, as `make demo` passes it
    proc = subprocess.Popen([sys.executable, "-m", "dl2ls.demo", "--dir", "demo", "--port", str(port),
                             "--backend-port", str(backend)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=tmp_path)
    lines = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "Ctrl-C stops" in line or not line:
                break
        text = "".join(lines)
        assert "Label Studio is up" in text, text
        task_url = re.search(r"(http://\S+/projects/\d+/data\?task=\d+)", text).group(1)
        assert task_url.startswith(f"http://127.0.0.1:{port}/")
        with urllib.request.urlopen(f"http://127.0.0.1:{backend}/health", timeout=5) as r:
            assert r.status == 200
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    assert proc.returncode == 0
    for p in (port, backend):  # nothing left running
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{p}/health", timeout=2)
            raise AssertionError(f"something still answers on port {p}")
        except OSError:
            pass
