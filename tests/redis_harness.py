"""A real Redis for the tests: Debian's redis-server in a child process on loopback, a free port,
its files in a temp dir (no snapshot, no append-only file), stopped and removed at the end."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from dl2ls.localserver import free_port, stop_process

REDIS_SERVER = "/usr/bin/redis-server"


def require_redis() -> None:
    """Skip without Debian's redis-server locally; fail in CI, where .ci/run installs it."""
    if not Path(REDIS_SERVER).exists():
        message = f"no redis-server at {REDIS_SERVER}: apt-get install redis-server (.ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


class RedisServer:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="dl2ls-redis-"))
        self.port = free_port()
        self.log_path = self.dir / "redis.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self):
        import redis

        return redis.Redis.from_url(self.url)

    def start(self, timeout: float = 10) -> "RedisServer":
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--logfile", str(self.log_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        client, last = self.client(), None
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    last = f"redis-server exited with {self.proc.returncode}"
                    break
                try:
                    if client.ping():
                        return self
                except Exception as err:  # not listening yet
                    last = err
                time.sleep(0.05)
        finally:
            client.close()
        tail = self.log_tail()  # before stop() takes the dir away
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING within {timeout:.0f} s "
                           f"({last}); its log ends:\n{tail}")

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else "(no log)"

    def stop(self) -> None:
        stop_process(self.proc, seconds=10)
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)
