#!/usr/bin/env python3
"""Benchmark the service's job executors: one large sync in-process against 1, 2 and 4 `dl2ls worker`s (RQ).

    .venv/bin/python bench/bench_workers.py [--items 20000] [--subset-size 2500] [--workers 1,2,4]

In one run, one real local Label Studio (started here), one Dataloop stand-in (tests/dataloop_standin.py,
in this process) holding N video items (tests/test_dataloop_api.py's sample_item: 2 tracks x 50
keyframes, ~24 KB of JSON each; `export_polls = 0`: every export is ready at once, as a small
Dataloop export is) and one redis-server (tests/redis_harness.py). Per configuration - the service
running its jobs itself (no REDIS_URL), then REDIS_URL and 1, 2, 4 `dl2ls worker` processes - a
fresh project gets the N tasks in one bulk import (media paths and `fps`, before the backend is
connected: no TASKS_CREATED pre-annotation), a fresh service (fresh MODEL_DIR; Redis flushed) is
connected (Extra params {"dataset": "ds1", "sync_every": "24h"}: no scheduled sync mid-measure)
and, once its connect job has registered the webhook:
1. first sync: seconds from Start Training (`ls.ml.train`) until the sync and every subset job it
   split off (DL2LS_SUBSET_SIZE, default 2500 here: 8 subsets of 20,000 items) have logged their
   line; then the project must hold N predictions and no task without one;
2. a 1 % change: the annotations of N/100 items (every 100th) edited in the stand-in (boxes shifted
   1 px, as tests/test_service.py's `moved`), Start Training again, seconds until that sync's line;
   N predictions still, one per task. The edited items are put back afterwards, so that every
   configuration starts from the same dataset and its cursor sees only its own edits.
Where the time goes, per phase: the jobs' own seconds (their log lines, timed as they appear) summed
against the wall (the parallelism achieved) and which process ran them; Dataloop: the time the
stand-in spent answering (a WSGI middleware, summed, and the wall it was busy); Label Studio: every
request the service and workers made to it, timed in those processes (a sitecustomize on PYTHONPATH
wraps httpx.Client.send and appends one line per request to a file: nothing else changes); and CPU
seconds (/proc: utime+stime of each process tree, children reaped included) of dl2ls (service and
workers), Label Studio, this process (the stand-in) and redis-server, against 2 cores x the wall.
Prints seconds and ratios; never fails on a target.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_service import TOKEN, Timeline  # noqa: E402
from dataloop_standin import DataloopStandIn  # noqa: E402
from redis_harness import REDIS_SERVER, RedisServer  # noqa: E402
from service_harness import CONFIG, ServiceProcess, WorkerProcess, connect, wait_for, webhook_registered  # noqa: E402
from test_dataloop_api import sample_item  # noqa: E402
from test_service import moved  # noqa: E402

from dl2ls.localserver import LocalLabelStudio, free_port  # noqa: E402

CORES = os.cpu_count() or 1
TICK = os.sysconf("SC_CLK_TCK")
JOB_LINE = re.compile(r"job (\S+) (sync|subset) project (\d+) \(([^)]*)\): (.*); ([\d.]+) s\s*$")
FAILED_LINE = re.compile(r"job (\S+) (\w+) project (\d+).*: failed after ")
# loaded by every dl2ls process started here (PYTHONPATH): one line per request through httpx,
# which label-studio-sdk (dl2ls's only way to Label Studio) uses; Dataloop goes through requests
HOOK = '''
import os, time
_dir = os.environ.get("DL2LS_BENCH_HTTP_LOG")
if _dir:
    import httpx
    _send, _fds = httpx.Client.send, {}

    def _timed_send(self, request, *args, **kwargs):
        t, status = time.time(), 0
        try:
            response = _send(self, request, *args, **kwargs)
            status = response.status_code
            return response
        finally:
            pid = os.getpid()  # an RQ work horse is a fork: a file of its own
            if pid not in _fds:
                _fds[pid] = os.open(os.path.join(_dir, f"{pid}.tsv"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            path = request.url.raw_path.decode(errors="replace").split("?")[0]
            os.write(_fds[pid], f"{t:.4f}\\t{time.time():.4f}\\t{request.method}\\t{path}\\t{status}\\n".encode())

    httpx.Client.send = _timed_send
'''


# ----------------------------------------------------------------------------- measuring


def tree_cpu(pid: int | None) -> float:
    """CPU seconds of a process and everything under it (a reaped child's are in its parent's)."""
    if pid is None:
        return 0.0
    stats: dict[int, list[str]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            stats[int(stat.parent.name)] = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        fields = stats.get(p)
        if fields is None:
            continue
        total += sum(int(v) for v in fields[11:15]) / TICK  # utime stime cutime cstime
        todo += [c for c, f in stats.items() if int(f[1]) == p]
    return total


def machine_cpu() -> float:
    """CPU seconds every process on the machine has used (/proc/stat: all but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / TICK


def busy(intervals: list[tuple[float, float]]) -> float:
    """Seconds during which at least one of the intervals was under way."""
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


class LogWatch(threading.Thread):
    """Follows the service's and the workers' logs; every job line keeps the moment it appeared
    (dl2ls's log lines carry no time), within POLL."""

    POLL = 0.05

    def __init__(self, sources: dict[str, Path]):
        super().__init__(daemon=True)
        self.sources = sources
        self.offsets = {name: 0 for name in sources}
        self.partial = {name: "" for name in sources}
        self.lines: list[tuple[float, str, str]] = []  # (seen, source, line)
        self.lock = threading.Lock()
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(self.POLL):
            self.read()

    def read(self) -> None:
        now = time.time()
        for name, path in self.sources.items():
            try:
                with open(path, "rb") as f:
                    f.seek(self.offsets[name])
                    data = f.read()
            except OSError:
                continue
            if not data:
                continue
            self.offsets[name] += len(data)
            text = self.partial[name] + data.decode(errors="replace")
            *done, self.partial[name] = text.split("\n")
            with self.lock:
                self.lines += [(now, name, line) for line in done]

    def since(self, t0: float) -> list[tuple[float, str, str]]:
        with self.lock:
            return [x for x in self.lines if x[0] >= t0]


@dataclass
class JobRun:
    source: str  # the process whose log holds its line
    kind: str  # sync | subset
    seconds: float  # the job's own
    seen: float  # when its line appeared (its end)
    line: str


def job_runs(lines: list[tuple[float, str, str]], project_id: int) -> list[JobRun]:
    out = []
    for seen, source, line in lines:
        m = JOB_LINE.search(line)
        if m and int(m.group(3)) == project_id:
            out.append(JobRun(source, m.group(2), float(m.group(6)), seen, m.group(5)))
    return out


def http_calls(folder: Path) -> list[tuple[float, float, str, str, int]]:
    """(start, end, method, path, status) of every request the hook saw (see HOOK)."""
    out = []
    for f in folder.glob("*.tsv"):
        for row in f.read_text(errors="replace").splitlines():
            parts = row.split("\t")
            if len(parts) == 5:
                out.append((float(parts[0]), float(parts[1]), parts[2], parts[3], int(parts[4] or 0)))
    return out


def ls_errors(log: Path, offset: int) -> list[str]:
    """The exceptions Label Studio logged after `offset` (its log holds every line twice), each once."""
    with open(log, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    found: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if re.match(r"^[\w.]*(Error|Exception)\b:? ", line) or "Internal Server Error" in line:
            found += [line[:200]] if line[:200] not in found else []
    return found


def ls_kind(method: str, path: str) -> str:
    if path.endswith("/import/predictions"):
        return "POST .../import/predictions"
    return method + " " + re.sub(r"/\d+", "/<id>", path.rstrip("/"))


@dataclass
class Phase:
    """One measured sync (and its subsets) and where its time went."""

    label: str
    seconds: float
    jobs: list[JobRun]
    failures: list[str]
    dataloop: list[tuple[float, float, str]]  # the stand-in's (start, end, path)
    label_studio: list[tuple[float, float, str, str, int]]
    cpu: dict[str, float]
    tasks: int = 0
    predictions: int = 0
    without: int = 0
    ls_errors: list[str] = field(default_factory=list)  # what Label Studio's log says of its errors

    @property
    def job_seconds(self) -> float:
        return sum(j.seconds for j in self.jobs)

    @property
    def dataloop_seconds(self) -> float:
        return sum(b - a for a, b, _ in self.dataloop)

    @property
    def ls_write_seconds(self) -> float:
        return sum(b - a for a, b, m, _, _ in self.label_studio if m in ("POST", "PATCH", "DELETE", "PUT"))

    @property
    def ls_seconds(self) -> float:
        return sum(b - a for a, b, *_ in self.label_studio)


@dataclass
class Config:
    name: str
    workers: int  # 0: in-process
    imported: float = 0.0  # seconds of the bulk task import (not measured further)
    phases: list[Phase] = field(default_factory=list)


# ----------------------------------------------------------------------------- one configuration


class Bench:
    def __init__(self, args, work: Path):
        self.args = args
        self.work = work
        self.server = LocalLabelStudio(work / "ls", free_port(), TOKEN)
        self.standin = DataloopStandIn()
        self.standin.export_polls = 0  # exports ready at once, as a small Dataloop export is
        self.timeline = Timeline(self.standin)
        self.redis = RedisServer()
        self.hook_dir = work / "hook"
        self.items: list[dict] = []
        self.changed: list[str] = []
        self.originals: dict[str, dict] = {}

    def start(self) -> None:
        self.hook_dir.mkdir(parents=True)
        (self.hook_dir / "sitecustomize.py").write_text(HOOK)
        print(f"starting Label Studio, the stand-in ({self.args.items} items) and redis-server in {self.work} ...",
              flush=True)
        extra = dict(e.split("=", 1) for e in self.args.ls_env)
        os.environ.update(extra)  # LocalLabelStudio starts with this process's environment; nobody else gets it
        try:
            self.server.start()
        finally:
            for name in extra:
                os.environ.pop(name, None)
        self.standin.start()
        self.redis.start()
        self.items = [sample_item(i) for i in range(self.args.items)]
        for item in self.items:
            self.standin.put_item("ds1", item)
        self.changed = [item["id"] for item in self.items[::100]]  # 1 %, spread over every id range
        self.originals = {i: copy.deepcopy(self.standin.datasets["ds1"][i]) for i in self.changed}

    def stop(self) -> None:
        for stop in (self.standin.stop, self.redis.stop, self.server.stop):
            try:
                stop()
            except Exception as err:  # noqa: BLE001 - stop the others all the same
                print(f"stopping: {err}", file=sys.stderr)

    def cpu(self, service: ServiceProcess, crew: list[WorkerProcess]) -> dict[str, float]:
        me = os.times()
        return {"machine": machine_cpu(),
                "dl2ls": tree_cpu(service.proc.pid if service.proc else None)
                + sum(tree_cpu(w.proc.pid if w.proc else None) for w in crew),
                "Label Studio": tree_cpu(self.server.proc.pid if self.server.proc else None),
                "stand-in": me.user + me.system,
                "redis": tree_cpu(self.redis.proc.pid) if crew and self.redis.proc else 0.0}

    def run(self, name: str, workers: int) -> Config:
        from label_studio_sdk import LabelStudio

        ls = LabelStudio(base_url=self.server.url, api_key=TOKEN)
        auth = {"Authorization": f"Token {TOKEN}"}
        config = Config(name, workers)
        project = ls.projects.create(title=f"workers {name}", label_config=CONFIG)
        # the tasks first (fps given, as the config's frameRate reads it), the backend after: only the sync writes
        body = json.dumps([{"video": f"/data/local-files/?d=videos{item['filename']}",
                            "fps": item["metadata"]["system"]["fps"]} for item in self.items]).encode()
        t = time.perf_counter()
        requests.post(f"{self.server.url}/api/projects/{project.id}/import", data=body, timeout=1800,
                      headers={**auth, "Content-Type": "application/json"}).raise_for_status()
        config.imported = time.perf_counter() - t
        http_dir = self.work / f"http-{name}"
        http_dir.mkdir()
        env = {"DL2LS_SUBSET_SIZE": str(self.args.subset_size), "DL2LS_BENCH_HTTP_LOG": str(http_dir),
               "PYTHONPATH": os.pathsep.join(p for p in (str(self.hook_dir), os.environ.get("PYTHONPATH")) if p)}
        if workers:
            self.redis.client().flushall()
            env["REDIS_URL"] = self.redis.url
        service = ServiceProcess(self.standin.url, self.standin.api_key, self.server.url, self.work / f"service-{name}",
                                 env=env)
        crew = [WorkerProcess(self.redis.url, self.standin.url, self.standin.api_key, self.server.url,
                              self.work / f"worker-{name}-{k + 1}.log",
                              env={**env, "MODEL_DIR": str(self.work / f"worker-{name}-{k + 1}")})
                for k in range(workers)]
        watch: LogWatch | None = None
        try:
            service.start()
            for worker in crew:
                worker.start()
            if workers:  # every worker listening before the clock starts
                wait_for(lambda: service.health()["executor"].get("workers") == workers, 60, 0.2,
                         f"{workers} workers registered")
            backend = connect(ls, project.id, service, {"dataset": "ds1", "sync_every": "24h"})
            wait_for(lambda: webhook_registered(ls, project.id, service), 60, 0.2, "the connect job's webhook")
            watch = LogWatch({"service": service.log_path,
                              **{f"worker {k + 1}": w.log_path for k, w in enumerate(crew)}})
            watch.start()
            phase = self.phase("first sync", ls, backend.id, project.id, service, crew, watch, http_dir)
            config.phases.append(phase)
            print(f"{name}: first sync {phase.seconds:.1f} s", flush=True)
            for item_id in self.changed:  # boxes 1 px to the right (the originals come back below)
                self.standin.edit_annotations(item_id, moved(self.standin.datasets["ds1"][item_id], 1.0))
            phase = self.phase("1 % change", ls, backend.id, project.id, service, crew, watch, http_dir)
            config.phases.append(phase)
            print(f"{name}: 1 % change {phase.seconds:.1f} s", flush=True)
            with self.standin.lock:  # the next configuration starts from the same dataset
                self.standin.datasets["ds1"].update(copy.deepcopy(self.originals))
            return config
        except AssertionError:
            for source, log in [("service", service.log())] + [(w.log_path.name, w.log()) for w in crew]:
                print(f"--- {source} (end)\n{log[-3000:]}", file=sys.stderr)
            raise
        finally:
            if watch is not None:
                watch.halt.set()
            for worker in crew:
                worker.stop()
            service.stop()

    def phase(self, label: str, ls, backend_id: int, project_id: int, service: ServiceProcess,
              crew: list[WorkerProcess], watch: LogWatch, http_dir: Path) -> Phase:
        """Start Training, then wait for the sync's line and those of every subset it queued."""
        cpu0 = self.cpu(service, crew)
        ls_log = self.server.data_dir / "server.log"
        log_from = ls_log.stat().st_size if ls_log.exists() else 0
        t0 = time.time()
        ls.ml.train(id=backend_id)
        reported: set[str] = set()

        def done() -> list[JobRun] | None:
            lines = watch.since(t0)
            for _, source, line in lines:
                if FAILED_LINE.search(line) and line not in reported:
                    reported.add(line)
                    print(f"  ({source}) {line}", file=sys.stderr, flush=True)
            runs = job_runs(lines, project_id)
            syncs = [j for j in runs if j.kind == "sync"]
            if not syncs:
                return None
            queued = re.search(r"subsets queued (\d+)", syncs[-1].line)
            subsets = [j for j in runs if j.kind == "subset"]
            return runs if len(subsets) >= (int(queued.group(1)) if queued else 0) else None

        runs = wait_for(done, self.args.timeout, 0.1, f"{label}: the sync and its subsets")
        t_end = max(j.seen for j in runs)
        cpu1 = self.cpu(service, crew)
        calls = [c for c in http_calls(http_dir) if t0 <= c[0] <= t_end]
        phase = Phase(label, t_end - t0, runs, sorted(reported),
                      [c for c in self.timeline.since(t0) if c[0] <= t_end], calls,
                      {k: cpu1[k] - cpu0[k] for k in cpu0 if k != "machine"})
        # whatever else ran meanwhile (another test run on this machine skews every figure)
        phase.cpu["other"] = max(0.0, cpu1["machine"] - cpu0["machine"] - sum(phase.cpu.values()))
        auth = {"Authorization": f"Token {TOKEN}"}
        p = requests.get(f"{self.server.url}/api/projects/{project_id}", headers=auth, timeout=60).json()
        phase.tasks, phase.predictions = p.get("task_number") or 0, p.get("total_predictions_number") or 0
        query = {"filters": {"conjunction": "and", "items": [{"filter": "filter:tasks:total_predictions",
                                                              "operator": "equal", "type": "Number", "value": 0}]}}
        r = requests.get(f"{self.server.url}/api/tasks", headers=auth, timeout=60,
                         params={"project": project_id, "page_size": 1, "include": "id",
                                 "query": json.dumps(query)}).json()
        phase.without = r.get("total") or 0
        phase.ls_errors = ls_errors(ls_log, log_from)
        return phase


# ----------------------------------------------------------------------------- printing


def print_config(config: Config, items: int) -> None:
    print(f"\n=== {config.name} ({items} tasks imported in one request: {config.imported:.1f} s, not counted)")
    for ph in config.phases:
        ok = ph.tasks == items and ph.predictions == items and not ph.without
        print(f"{ph.label}: {ph.seconds:.1f} s from Start Training to the last job's line; {ph.tasks} tasks, "
              f"{ph.predictions} predictions, {ph.without} tasks without one" + ("" if ok else "  <-- NOT EXACT"))
        syncs = [j for j in ph.jobs if j.kind == "sync"]
        subsets = [j for j in ph.jobs if j.kind == "subset"]
        what = f"sync {sum(j.seconds for j in syncs):.1f} s"
        if subsets:
            s = [j.seconds for j in subsets]
            what += f" + {len(s)} subsets {sum(s):.1f} s (each {min(s):.1f}..{max(s):.1f})"
        print(f"  jobs: {what}; job-seconds {ph.job_seconds:.1f} / wall {ph.seconds:.1f} = "
              f"{ph.job_seconds / ph.seconds:.2f} at once on average")
        by_source: dict[str, list[JobRun]] = {}
        for j in ph.jobs:
            by_source.setdefault(j.source, []).append(j)
        print("  ran on: " + "; ".join(
            f"{src} {sum(j.kind == 'sync' for j in js)} sync + {sum(j.kind == 'subset' for j in js)} subsets "
            f"({sum(j.seconds for j in js):.1f} s)" for src, js in sorted(by_source.items())))
        if ph.failures:
            print(f"  {len(ph.failures)} job attempts failed (retried): {ph.failures[0][:150]}")
        routes: dict[str, int] = {}
        for _, _, path in ph.dataloop:
            route = re.sub(r"/(items|datasets|commands)/[^/]+", r"/\1/<id>", path)
            routes[route] = routes.get(route, 0) + 1
        print(f"  Dataloop (the stand-in answering): {len(ph.dataloop)} requests, {ph.dataloop_seconds:.1f} s summed, "
              f"busy {busy([(a, b) for a, b, _ in ph.dataloop]):.1f} s of the wall ("
              + ", ".join(f"{n} {r.replace('/api/v1', '')}" for r, n in sorted(routes.items())) + ")")
        kinds: dict[str, list] = {}
        for a, b, method, path, _ in ph.label_studio:
            kinds.setdefault(ls_kind(method, path), []).append((a, b))
        for spans in kinds.values():
            spans.sort()
        print(f"  Label Studio (requests timed in dl2ls): {len(ph.label_studio)} requests, {ph.ls_seconds:.1f} s "
              f"summed, busy {busy([(a, b) for a, b, *_ in ph.label_studio]):.1f} s of the wall; writes "
              f"{ph.ls_write_seconds:.1f} s")
        for kind, spans in sorted(kinds.items(), key=lambda kv: -sum(b - a for a, b in kv[1])):
            # the prediction imports: the first and the last show how their cost follows the project's size
            ends = f"; first {spans[0][1] - spans[0][0]:.1f} s, last {spans[-1][1] - spans[-1][0]:.1f} s" \
                if kind.startswith("POST") and len(spans) > 1 else ""
            print(f"    {len(spans):5d} x {kind:<40} {sum(b - a for a, b in spans):7.1f} s summed, "
                  f"busy {busy(spans):6.1f} s{ends}")
        failed = [c for c in ph.label_studio if c[4] >= 500]
        if failed or ph.ls_errors:
            print(f"  Label Studio answered {len(failed)} requests with 5xx; its log: "
                  + (" | ".join(ph.ls_errors[:3]) or "nothing"))
        rest = ph.job_seconds - ph.dataloop_seconds - ph.ls_seconds
        print(f"  the rest of the job-seconds (conversion, planning, state; overlapping writes make it a floor): "
              f"{max(0.0, rest):.1f} s")
        total = sum(ph.cpu.values())
        print("  CPU s: " + ", ".join(f"{k} {v:.1f}" for k, v in ph.cpu.items())
              + f"; total {total:.1f} = {100 * total / (CORES * ph.seconds):.0f} % of {CORES} cores x the wall; "
              f"Label Studio alone {100 * ph.cpu['Label Studio'] / ph.seconds:.0f} % of one core")


def summary_table(configs: list[Config]) -> None:
    base = configs[0]

    def ratio(c: Config, n: int) -> str:
        return f"{c.phases[n].seconds / base.phases[n].seconds:.2f}" if len(c.phases) > n and len(base.phases) > n \
            else "?"

    print(f"\n{'configuration':<16} {'first sync s':>12} {'x in-proc':>9} {'1 % change s':>12} {'x in-proc':>9} "
          f"{'job-s/wall':>10} {'Dataloop s':>11} {'LS write s':>11} {f'CPU % of {CORES}':>10} {'LS CPU %':>8} "
          f"{'other CPU s':>11}")
    for c in configs:
        first, change = c.phases[0], c.phases[1] if len(c.phases) > 1 else None
        cpu = 100 * sum(first.cpu.values()) / (CORES * first.seconds)
        print(f"{c.name:<16} {first.seconds:12.1f} {ratio(c, 0):>9} "
              f"{change.seconds if change else float('nan'):12.1f} {ratio(c, 1):>9} "
              f"{first.job_seconds / first.seconds:10.2f} {first.dataloop_seconds:11.1f} "
              f"{first.ls_write_seconds:11.1f} {cpu:9.0f}% {100 * first.cpu['Label Studio'] / first.seconds:7.0f}% "
              f"{first.cpu['other']:11.1f}")
    print("(x in-proc: seconds / the in-process seconds, below 1 is faster; job-s/wall, Dataloop s, LS write s and CPU "
          "of the first sync;\n Dataloop s: the stand-in's answering summed; LS write s: POST/PATCH/DELETE to Label "
          "Studio summed as dl2ls timed them;\n CPU %: the machine's CPU over cores x wall; LS CPU %: Label Studio's "
          "over the wall, 100 % = one core; other CPU s: processes this run did not start)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20000, help="items in the dataset (default %(default)s)")
    parser.add_argument("--subset-size", type=int, default=2500,
                        help="DL2LS_SUBSET_SIZE: items per subset job (default %(default)s)")
    parser.add_argument("--workers", default="1,2,4", help="worker counts measured after in-process "
                                                             "(default %(default)s)")
    parser.add_argument("--timeout", type=float, default=1800, help="longest wait for one sync, s")
    parser.add_argument("--ls-env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment for Label Studio (repeatable), e.g. one of its feature flags")
    args = parser.parse_args()
    try:
        counts = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        parser.error("--workers: comma-separated whole numbers")
    if any(n < 1 for n in counts):
        parser.error("--workers: at least 1 each")
    if any("=" not in e for e in args.ls_env):
        parser.error("--ls-env: NAME=VALUE")
    if counts and not Path(REDIS_SERVER).exists():
        parser.error(f"no redis-server at {REDIS_SERVER}: apt-get install redis-server")

    # SIGTERM stops it as Ctrl-C does: through the finally below, which stops every process it started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="dl2ls-bench-workers-"))
    bench = Bench(args, work)
    configs: list[Config] = []
    try:
        bench.start()
        for name, n in [("in-process", 0)] + [(f"{n} worker" + ("s" if n > 1 else ""), n) for n in counts]:
            configs.append(bench.run(name, n))
    finally:
        bench.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{args.items} video items (2 tracks x 50 keyframes each), subsets of {args.subset_size} items, "
          f"{CORES} cores; one Label Studio 1.23 (SQLite, one process), the stand-in in this process"
          + (f"; Label Studio's environment: {', '.join(args.ls_env)}" if args.ls_env else ""))
    for config in configs:
        print_config(config, args.items)
    summary_table(configs)
    print(f"\nthe whole run: {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
