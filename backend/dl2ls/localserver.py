"""Start and stop a local Label Studio (the `label-studio` extra) for tests, benchmarks and demos:
SQLite in a data folder, loopback only, a legacy API token, and the two settings that let it
call an ML backend on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, seconds: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {seconds:.0f} s")


@dataclass
class LocalLabelStudio:
    data_dir: Path
    port: int
    token: str
    username: str = "admin@example.com"
    password: str = "dl2ls-local-password"
    media_root: Path | None = None  # served at /data/local-files/?d=<path under it>
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 300) -> "LocalLabelStudio":
        exe = Path(sys.executable).with_name("label-studio")
        exe = str(exe) if exe.exists() else shutil.which("label-studio")
        if not exe:
            raise RuntimeError("label-studio is not installed: pip install 'dl2ls[label-studio]'")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "LABEL_STUDIO_BASE_DATA_DIR": str(self.data_dir),
               "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
               "LABEL_STUDIO_USERNAME": self.username, "LABEL_STUDIO_PASSWORD": self.password,
               "LABEL_STUDIO_USER_TOKEN": self.token,
               # let the server call an ML backend on 127.0.0.1
               "ML_BLOCK_LOCAL_IP": "false", "SSRF_PROTECTION_ENABLED": "false",
               "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": ""}
        if self.media_root is not None:
            env.update(LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED="true",
                       LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=str(self.media_root))
        log = open(self.data_dir / "server.log", "ab")
        self.proc = subprocess.Popen(
            [exe, "start", "--no-browser", "--port", str(self.port), "--internal-host", "127.0.0.1"],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.data_dir)
        log.close()
        try:
            wait_http(f"{self.url}/health", timeout, self.proc)
        except RuntimeError as err:
            self.stop()
            tail = (self.data_dir / "server.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"Label Studio did not start: {err}\n{tail}") from None
        return self

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


def stop_process(proc: subprocess.Popen | None, seconds: float = 30) -> None:
    """SIGTERM, then SIGKILL if it has not gone within `seconds`."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(seconds)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
