#!/usr/bin/env python3
"""Benchmark the service (`dl2ls serve` without --source): import -> predictions, against `dl2ls push`.

    .venv/bin/python bench/bench_service.py [--items 1000] [--predict 100] [--variants media,fps]

In one run, against a real local Label Studio (started here) and the Dataloop stand-in
(tests/dataloop_standin.py, in this process) holding N video items (tests/test_dataloop_api.py's
sample_item: /cam1|/cam2, clip<i>.webm, 2 tracks x 50 keyframes):
1. baseline: one `dl2ls push --new-project` of the same N items from a local export folder
   (json/<dir>/<name>.json, as Dataloop's export lays it out);
2. the service (a fresh process each time) connected to a fresh project (Extra params
   {"dataset": "ds1"}), then ONE import of N tasks: seconds from the start of the import call until
   the project's last prediction is there (polled every 0.1 s), and where the time went (the
   stand-in's request times, the service's job line and job table, Label Studio's request log).
   Twice: tasks holding media paths only, then media paths and the `fps` the labeling config's
   frameRate="$fps" reads (which the service otherwise writes into each task, one request each);
3. /predict of the last service, straight, for --predict tasks of items it never converted, then
   the same tasks again (cached): seconds and requests to Dataloop.
Prints seconds and ratios; never fails on a target.
"""

from __future__ import annotations

import argparse
import calendar
import json
import os
import re
import sqlite3
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from dataloop_standin import DataloopStandIn  # noqa: E402
from service_harness import CONFIG, ServiceProcess, connect, wait_for  # noqa: E402
from test_dataloop_api import sample_item  # noqa: E402

from dl2ls.cli import main as dl2ls  # noqa: E402
from dl2ls.localserver import LocalLabelStudio, free_port  # noqa: E402

TOKEN = "5e7ce5e7ce5e7ce5e7ce5e7ce5e7ce5e7ce5e7ce"
POLL = 0.1
JOB_LINE = re.compile(r"job (\d+) preannotate project (\d+)[^:]*: (.*); ([\d.]+) s\s*$")
LS_LINE = re.compile(r'^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})\] \[django\.server[^\]]*\] \[\w+\] '
                     r'"(\w+) (\S+) HTTP/[\d.]+" (\d+)')


class Timeline:
    """Wall-clock start and end of every request the stand-in serves (a WSGI middleware)."""

    def __init__(self, standin: DataloopStandIn):
        self.calls: list[tuple[float, float, str]] = []
        self.lock = threading.Lock()
        inner = standin.app.wsgi_app

        def timed(environ, start_response):
            t = time.time()
            try:
                return inner(environ, start_response)
            finally:
                with self.lock:
                    self.calls.append((t, time.time(), environ.get("PATH_INFO", "")))

        standin.app.wsgi_app = timed

    def since(self, t0: float) -> list[tuple[float, float, str]]:
        with self.lock:
            return [c for c in self.calls if c[0] >= t0]


class PredictionWatch(threading.Thread):
    """Polls the project's prediction count every POLL s; keeps (time, count) at every change."""

    def __init__(self, url: str, project_id: int):
        super().__init__(daemon=True)
        self.url = f"{url}/api/projects/{project_id}?bench-poll=1"  # told apart in Label Studio's log
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Token {TOKEN}"
        self.changes: list[tuple[float, int]] = []
        self.polls = 0
        self.halt = threading.Event()

    def run(self) -> None:
        last = 0
        while not self.halt.is_set():
            try:
                r = self.session.get(self.url, timeout=30)
                n = int(r.json().get("total_predictions_number") or 0) if r.ok else last
            except (requests.RequestException, ValueError):
                n = last
            self.polls += 1
            if n != last:
                self.changes.append((time.time(), n))
                last = n
            self.halt.wait(POLL)

    @property
    def current(self) -> int:
        return self.changes[-1][1] if self.changes else 0


def write_export(folder: Path, items: list[dict]) -> Path:
    """Dataloop's export layout: json/<dir>/<name without extension>.json, one item per file."""
    for item in items:
        path = folder / "json" / item["dir"].strip("/") / (Path(item["name"]).stem + ".json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(item))
    return folder


def task_data(item: dict, with_fps: bool) -> dict:
    data = {"video": f"/data/local-files/?d=videos{item['filename']}"}
    if with_fps:
        data["fps"] = item["metadata"]["system"]["fps"]
    return data


def job_rows(model_dir: Path, kind: str) -> list[tuple]:
    db = sqlite3.connect(f"file:{model_dir / 'dl2ls-service.sqlite3'}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute("SELECT id, state, created, finished, error FROM jobs WHERE kind = ? ORDER BY id",
                          (kind,)).fetchall()
    finally:
        db.close()


def ls_requests(log: Path) -> list[tuple[float, str, str, int]]:
    """Label Studio's request log (time the answer went, method, path, status), each line once
    (its logging config writes every line twice)."""
    out, previous = [], None
    for line in log.read_text(errors="replace").splitlines():
        if line == previous:
            continue
        previous = line
        m = LS_LINE.match(line)
        if m:
            t = calendar.timegm(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000
            out.append((t, m.group(3), m.group(4), int(m.group(5))))
    return out


def ls_breakdown(log: Path, project_id: int, t0: float, t_imported: float) -> list[tuple[str, int, float, float]]:
    """The service's requests to Label Studio after the import, by kind: (kind, count, first, last
    answer, seconds after t0). The log's clock is aligned on the import request's own line."""
    rows = ls_requests(log)
    anchor = [t for t, method, path, _ in rows if method == "POST" and "/predictions" not in path
              and path.startswith(f"/api/projects/{project_id}/import")]
    if not anchor:
        return []
    offset = t_imported - anchor[-1]
    kinds: dict[str, list[float]] = {}
    for t, method, path, _ in rows:
        t += offset
        if t < t_imported - 0.001 or "bench-poll" in path:
            continue
        if method == "GET" and path.startswith("/api/tasks"):
            kind = "GET /api/tasks (read the new tasks)"
        elif method == "PATCH" and path.startswith("/api/tasks/"):
            kind = "PATCH /api/tasks/<id> (one task's data)"
        elif method == "POST" and path.endswith("/import/predictions"):
            kind = "POST .../import/predictions (bulk)"
        else:
            kind = method + " " + re.sub(r"/\d+", "/<id>", path.split("?")[0])
        kinds.setdefault(kind, []).append(t - t0)
    return [(k, len(ts), min(ts), max(ts)) for k, ts in sorted(kinds.items(), key=lambda kv: min(kv[1]))]


@dataclass
class Run:
    """One import into a project the service pre-annotates, and where its time went."""

    label: str
    tasks: int
    predictions: int
    seconds: float  # import call started -> last prediction seen
    first: float  # -> first prediction seen
    imported: float  # -> import call returned
    created: float | None  # -> webhook received (the job's row)
    body_started: float | None  # -> the job's body started (its end minus its own seconds)
    finished: float | None
    job_line: str
    job_seconds: float
    jobs: int
    dataloop: list  # (start, end, path) of the stand-in's requests, seconds after the import started
    label_studio: list  # (kind, count, first, last) of the service's requests to Label Studio
    polls: int


def service_run(label: str, work: Path, server: LocalLabelStudio, standin: DataloopStandIn, timeline: Timeline,
                items: list[dict], with_fps: bool, timeout: float, keep=None) -> Run:
    """A fresh service process, connected to a fresh project, then one import of the items' tasks.
    `keep(service, project_id)` runs before the service stops (the /predict step)."""
    from label_studio_sdk import LabelStudio

    ls = LabelStudio(base_url=server.url, api_key=TOKEN)
    auth = {"Authorization": f"Token {TOKEN}"}
    service = ServiceProcess(standin.url, standin.api_key, server.url, work / f"service-{label}")
    watch: PredictionWatch | None = None
    try:
        service.start()
        project = ls.projects.create(title=f"service {label}", label_config=CONFIG)
        connect(ls, project.id, service, {"dataset": "ds1"})
        wait_for(lambda: any(r[1] == "done" for r in job_rows(service.model_dir, "connect")), 60, 0.1,
                 "the connect job")
        hooked = [w for w in ls.webhooks.list(project=project.id) if w.url.startswith(f"{service.url}/webhook?token=")]
        assert hooked, "the service registered no webhook:\n" + service.log()[-2000:]
        body = json.dumps([task_data(item, with_fps) for item in items]).encode()
        watch = PredictionWatch(server.url, project.id)
        t0 = time.time()
        watch.start()
        r = requests.post(f"{server.url}/api/projects/{project.id}/import", data=body, timeout=600,
                          headers={**auth, "Content-Type": "application/json"})
        t_imported = time.time()
        r.raise_for_status()

        def job_done():
            done = [m for m in map(JOB_LINE.search, service.log().splitlines())
                    if m and int(m.group(2)) == project.id]
            failed = [row for row in job_rows(service.model_dir, "preannotate") if row[4]]
            assert not failed, f"the preannotate job failed ({failed[-1][1]}): {failed[-1][4]}"
            return done

        try:
            done = wait_for(job_done, timeout, 0.1, "the preannotate job")
        except AssertionError:
            print(service.log()[-3000:], file=sys.stderr)
            print(f"predictions so far: {watch.current}; Label Studio requests since the import:", file=sys.stderr)
            for kind, n, first, last in ls_breakdown(server.data_dir / "server.log", project.id, t0, t_imported):
                print(f"  {n:5d} x {kind}: {first:.2f} .. {last:.2f} s", file=sys.stderr)
            raise
        time.sleep(3 * POLL)  # the poller sees the final count
        watch.halt.set()
        watch.join(10)
        p = requests.get(f"{server.url}/api/projects/{project.id}?bench-poll=last", headers=auth, timeout=30).json()
        tasks, predictions = p.get("task_number") or 0, p.get("total_predictions_number") or 0
        t_final = next((t for t, n in watch.changes if n >= predictions), None)
        assert t_final is not None and predictions, "no prediction appeared"
        jobs = job_rows(service.model_dir, "preannotate")
        line = done[-1]
        finished = max((r[3] for r in jobs if r[3]), default=None)
        job_seconds = float(line.group(4))
        run = Run(label, tasks, predictions, t_final - t0, watch.changes[0][0] - t0, t_imported - t0,
                  jobs[0][2] - t0 if jobs else None, finished - job_seconds - t0 if finished else None,
                  finished - t0 if finished else None, line.group(3), job_seconds, len(jobs),
                  [(a - t0, b - t0, path) for a, b, path in timeline.since(t0)],
                  ls_breakdown(server.data_dir / "server.log", project.id, t0, t_imported), watch.polls)
        if keep is not None:
            keep(service, project.id)
        return run
    finally:
        if watch is not None:
            watch.halt.set()
        service.stop()


def print_run(run: Run, t_push: float) -> None:
    def at(t: float | None) -> str:
        return f"{t:7.2f}" if t is not None else "      ?"

    by_route: dict[str, int] = {}
    for _, _, path in run.dataloop:
        route = re.sub(r"/items/[^/]+", "/items/<id>", re.sub(r"/datasets/[^/]+", "/datasets/<id>", path))
        by_route[route] = by_route.get(route, 0) + 1
    print(f"\nservice, tasks with {run.label}: {run.tasks} tasks, {run.predictions} predictions; "
          f"seconds after the import call started:")
    print(f"  {at(run.created)}  webhook received, preannotate job queued ({run.jobs} job(s))")
    print(f"  {at(run.imported)}  import call returned (tasks created, webhook delivered)")
    print(f"  {at(run.body_started)}  job body started (after its pickup and reading the project)")
    if run.dataloop:
        print(f"  {at(min(c[0] for c in run.dataloop))}  first Dataloop request")
        print(f"  {at(max(c[1] for c in run.dataloop))}  last Dataloop answer ({len(run.dataloop)} requests: "
              f"{', '.join(f'{n} {r}' for r, n in sorted(by_route.items()))})")
    print(f"  {at(run.first)}  first prediction seen")
    print(f"  {at(run.seconds)}  last prediction seen  ({run.seconds / t_push:.2f}x push)")
    print(f"  {at(run.finished)}  job finished: {run.job_line}; {run.job_seconds:.1f} s")
    if run.label_studio:
        print("  its requests to Label Studio (answered between):")
        for kind, n, first, last in run.label_studio:
            print(f"  {first:7.2f} .. {last:6.2f}  {n:5d} x {kind}")
    print(f"  ({run.polls} polls of the project's prediction count by this benchmark)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1000, help="items imported (default %(default)s)")
    parser.add_argument("--predict", type=int, default=100, help="tasks of the /predict request (default %(default)s)")
    parser.add_argument("--variants", default="media,fps",
                        help="imports measured: media (media paths only), fps (media paths and fps) "
                             "(default %(default)s)")
    parser.add_argument("--timeout", type=float, default=300, help="longest wait for one import's predictions, s")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or any(v not in ("media", "fps") for v in variants):
        parser.error("--variants: media, fps or both")

    work = Path(tempfile.mkdtemp(prefix="dl2ls-bench-service-"))
    server = LocalLabelStudio(work / "ls", free_port(), TOKEN)
    standin = DataloopStandIn()
    timeline = Timeline(standin)
    runs: list[Run] = []
    predicted: dict = {}
    try:
        print(f"starting Label Studio in {work} ...", flush=True)
        server.start()
        standin.start()
        items = [sample_item(i) for i in range(args.items)]
        for item in items:
            standin.put_item("ds1", item)
        export = write_export(work / "export", items)
        config = work / "config.xml"
        config.write_text(CONFIG)
        os.environ.update(LABEL_STUDIO_URL=server.url, LABEL_STUDIO_API_KEY=TOKEN)
        from label_studio_sdk import LabelStudio

        ls = LabelStudio(base_url=server.url, api_key=TOKEN)

        # 1. baseline: one `dl2ls push` of the export folder into a fresh project
        t = time.perf_counter()
        code = dl2ls(["-q", "push", str(export), "--new-project", "push baseline", "--label-config", str(config)])
        t_push = time.perf_counter() - t
        assert code == 0, f"dl2ls push exited with {code}"
        pushed = next(p for p in ls.projects.list() if p.title == "push baseline")
        push_project = requests.get(f"{server.url}/api/projects/{pushed.id}", timeout=30,
                                    headers={"Authorization": f"Token {TOKEN}"}).json()
        print(f"push: {t_push:.2f} s", flush=True)

        # 3. /predict of items the service never converted, then the same again (cached)
        def predict_step(service: ServiceProcess, project_id: int) -> None:
            fresh = [sample_item(i) for i in range(args.items, args.items + args.predict)]
            for item in fresh:
                standin.put_item("ds1", item)
            body = {"tasks": [{"id": 10 ** 6 + k, "data": task_data(item, variants[-1] == "fps")}
                              for k, item in enumerate(fresh)],
                    "project": f"{project_id}.{int(time.time())}", "label_config": CONFIG}
            session = requests.Session()
            for name in ("cold", "warm"):
                before = sum(standin.requests.values())
                t = time.perf_counter()
                r = session.post(f"{service.url}/predict", json=body, timeout=120)
                seconds = time.perf_counter() - t
                r.raise_for_status()
                good = sum(1 for x in r.json()["results"] if (x.get("result") if isinstance(x, dict) else
                                                              isinstance(x, list) and x and all(p.get("result")
                                                                                                for p in x)))
                predicted[name] = (seconds, sum(standin.requests.values()) - before, good)

        # 2. the service: one import per variant, each into a fresh project with a fresh service
        for n, variant in enumerate(variants):
            label = "media path + fps" if variant == "fps" else "media path only"
            run = service_run(variant, work, server, standin, timeline, items, variant == "fps", args.timeout,
                              keep=predict_step if n == len(variants) - 1 else None)
            run.label = label
            runs.append(run)
            print(f"service, {label}: {run.seconds:.2f} s", flush=True)
    finally:
        for stop in (standin.stop, server.stop):
            try:
                stop()
            except Exception as err:  # noqa: BLE001 - stop the others all the same
                print(f"stopping: {err}", file=sys.stderr)

    print(f"\n{args.items} video items (2 tracks x 50 keyframes each); push: {push_project.get('task_number')} tasks, "
          f"{push_project.get('total_predictions_number')} predictions\n")
    print("step                                                     seconds   vs push")
    print(f"dl2ls push --new-project (export folder)                 {t_push:7.2f}   1.00")
    for run in runs:
        print(f"service: import -> last prediction ({run.label:<16})  {run.seconds:7.2f}   "
              f"{run.seconds / t_push:.2f}  (target <= 1.5)")
    for run in runs:
        print_run(run, t_push)
    if predicted:
        cold, warm = predicted["cold"], predicted["warm"]
        print(f"\n/predict of {args.predict} tasks ({runs[-1].label}), straight to the service")
        print(f"  items never converted: {cold[0]:6.2f} s, {cold[1]:3d} Dataloop requests, {cold[2]} predictions")
        print(f"  the same again:        {warm[0]:6.2f} s, {warm[1]:3d} Dataloop requests, {warm[2]} predictions")
    print()
    for run in runs:
        print(f"import ({run.label}) -> last prediction: {run.seconds:.2f} s; push: {t_push:.2f} s; "
              f"ratio {run.seconds / t_push:.2f}x")
    if predicted:
        print(f"/predict {args.predict} tasks: uncached {predicted['cold'][0]:.2f} s ({predicted['cold'][1]} Dataloop "
              f"requests), cached {predicted['warm'][0]:.2f} s ({predicted['warm'][1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
