"""The dl2ls service as tests, benchmarks and the browser check run it: `dl2ls serve` (gunicorn,
dl2ls.web.Worker) in a child process on loopback, reading the Dataloop stand-in, its state in a
temp MODEL_DIR; started, restarted, stopped (SIGTERM, or SIGKILL mid-work)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from dl2ls.localserver import free_port, stop_process, wait_http

CONFIG = ('<View><Video name="video" value="$video" frameRate="$fps"/>'
          '<Labels name="videoLabels" toName="video"><Label value="person"/><Label value="pedestrian"/></Labels>'
          '<VideoRectangle name="box" toName="video"/></View>')


@dataclass
class ServiceProcess:
    dataloop_url: str
    dataloop_key: str
    label_studio_url: str
    model_dir: Path
    workers: int = 1
    env: dict = field(default_factory=dict)  # more environment (BASIC_AUTH_*, DL2LS_*...)
    port: int = 0
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> "ServiceProcess":
        self.port = self.port or free_port()
        self.model_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in ("LABEL_STUDIO_API_KEY", "DL2LS_SOURCE")}
        env.update({"DATALOOP_API_URL": self.dataloop_url, "DATALOOP_API_KEY": self.dataloop_key,
                    "MODEL_DIR": str(self.model_dir), "LABEL_STUDIO_URL": self.label_studio_url,
                    "WORKERS": str(self.workers), "THREADS": "4", "LOG_LEVEL": "INFO"})
        env.update(self.env)
        exe = Path(sys.executable).with_name("dl2ls")
        self.log_path = self.model_dir / f"serve-{self.port}.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([str(exe), "serve", "--host", "127.0.0.1", "--port", str(self.port)],
                                         env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_http(f"{self.url}/health", timeout, self.proc)
        return self

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL to gunicorn's whole process group: workers die mid-job, as on a crash."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def health(self) -> dict:
        return requests.get(f"{self.url}/health", timeout=5).json()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""


@dataclass
class WorkerProcess:
    """`dl2ls worker` in a child process (its own session), reading REDIS_URL, the stand-in and
    Label Studio as the service does; `kill()` is a machine going down mid-job: SIGKILL to the
    worker, its scheduler and its work horse (RQ puts the horse in a process group of its own)."""

    redis_url: str
    dataloop_url: str
    dataloop_key: str
    label_studio_url: str
    log_path: Path
    env: dict = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    def start(self) -> "WorkerProcess":
        env = {k: v for k, v in os.environ.items() if k not in ("LABEL_STUDIO_API_KEY", "DL2LS_SOURCE")}
        env.update({"REDIS_URL": self.redis_url, "DATALOOP_API_URL": self.dataloop_url,
                    "DATALOOP_API_KEY": self.dataloop_key, "LABEL_STUDIO_URL": self.label_studio_url,
                    "LOG_LEVEL": "INFO"})
        env.update(self.env)
        exe = Path(sys.executable).with_name("dl2ls")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([str(exe), "worker"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        return self

    def descendants(self) -> list[int]:
        """Every process under the worker (its scheduler, its work horse), from /proc."""
        parents: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        out, todo = [], [self.proc.pid] if self.proc else []
        while todo:
            for child in parents.get(todo.pop(), []):
                out.append(child)
                todo.append(child)
        return out

    def kill(self) -> None:
        if self.proc is not None:
            victims = self.descendants()
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            for pid in victims:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        """SIGTERM (RQ's warm shutdown: the job at hand finishes), then whatever is left killed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def wait_for(check, seconds: float, every: float = 0.25, what: str = "the condition"):
    """Poll `check()` until it returns something truthy; that value, or AssertionError."""
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {seconds:.0f} s")
        time.sleep(every)


def connect(ls, project_id: int, service: ServiceProcess, extra_params: dict, **kwargs):
    """Connect the service to a project as a user does in Settings > Model (Connect Model). The
    extra params go as JSON text, as Label Studio's form stores them (an object sent through the
    API shows as `[object Object]` in the form, and saving the form then sends that)."""
    text = extra_params if isinstance(extra_params, str) else json.dumps(extra_params)
    return ls.ml.create(project=project_id, url=service.url, title=kwargs.pop("title", "dl2ls"),
                        extra_params=text, **kwargs)


def webhook_registered(ls, project_id: int, service: ServiceProcess) -> bool:
    """Whether the service's connect job has registered its TASKS_CREATED webhook (its URL
    carries the service's token; Label Studio's own webhook to the backend has none)."""
    return any(w.url.startswith(f"{service.url}/webhook?token=") for w in ls.webhooks.list(project=project_id))


__all__ = ["CONFIG", "ServiceProcess", "WorkerProcess", "connect", "wait_for", "webhook_registered", "free_port", "stop_process", "wait_http"]
