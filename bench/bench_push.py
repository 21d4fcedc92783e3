#!/usr/bin/env python3
"""Benchmark `dl2ls push` and the ML backend's /predict against a real local Label Studio.

    .venv/bin/python bench/bench_push.py [--items 300] [--one-by-one 60] [--requests 200]

In one run, on a fresh Label Studio (SQLite, single-process dev server, started here):
1. `dl2ls push --new-project` of N items (conversion included), vs one raw bulk POST of the same
   prepared tasks (what `dl2ls convert` wrote) to /api/projects/{id}/import, vs creating the
   predictions one request at a time (measured on a sample, extrapolated).
2. /predict latency of `dl2ls serve` (gunicorn, 2 workers) for an item with 50 tracks x 500 frames:
   sequential requests after the first (which indexes and converts), then 8 concurrent clients.
Prints seconds and ratios; never fails on a target.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import box_annotation, pts, snap, video_item  # noqa: E402
from test_push_server import make_export  # noqa: E402

from dl2ls.cli import main as dl2ls  # noqa: E402
from dl2ls.localserver import LocalLabelStudio, free_port, wait_http  # noqa: E402

TOKEN = "be7c4be7c4be7c4be7c4be7c4be7c4be7c4be7c4"


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def heavy_item(folder: Path, tracks: int = 50, frames: int = 500) -> dict:
    """One video item: `tracks` boxes with a snapshot on every frame (bending paths)."""
    anns = []
    for k in range(tracks):
        def box(f, k=k):
            x = 10 + k * 3 + (f if f < frames // 2 else frames - f) * 0.7
            return pts(x, 20 + k, x + 40, 60 + k)
        anns.append(box_annotation(f"heavy{k:03d}", coords=box(0), label="person",
                                   snapshots=[snap(f, box(f), label="person") for f in range(1, frames)]))
    item = video_item(anns, nb_frames=frames, item_id="heavy-item", width=1920, height=1080)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "heavy.json").write_text(json.dumps(item))
    return item


def percentiles(samples: list[float]) -> str:
    q = statistics.quantiles(samples, n=100)
    return f"p50 {q[49] * 1000:.1f} ms, p95 {q[94] * 1000:.1f} ms, max {max(samples) * 1000:.1f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=2000, help="items pushed (default %(default)s)")
    parser.add_argument("--repeat", type=int, default=3, help="best of N for push and raw POST (default %(default)s)")
    parser.add_argument("--one-by-one", type=int, default=60, help="predictions created singly (default %(default)s)")
    parser.add_argument("--requests", type=int, default=200, help="/predict requests per phase (default %(default)s)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dl2ls-bench-"))
    server = LocalLabelStudio(work / "ls", free_port(), TOKEN)
    print(f"starting Label Studio in {work} ...", flush=True)
    server.start()
    os.environ.update(LABEL_STUDIO_URL=server.url, LABEL_STUDIO_API_KEY=TOKEN)
    from label_studio_sdk import LabelStudio

    ls = LabelStudio(base_url=server.url, api_key=TOKEN)
    try:
        src = make_export(work / "export", args.items)
        config, tasks_file = work / "config.xml", work / "tasks.json"
        assert dl2ls(["-q", "label-config", str(src), "-o", str(config)]) == 0
        assert dl2ls(["-q", "convert", str(src), "-o", str(tasks_file), "--label-config", str(config)]) == 0
        payload = tasks_file.read_bytes()
        n_pred = sum(len(t["predictions"]) for t in json.loads(payload))
        print(f"{args.items} items, {n_pred} predictions, {len(payload) / 1e6:.1f} MB of tasks JSON\n")

        # 1a/1b. a raw bulk POST of the prepared payload vs `dl2ls push` (which converts too), each
        # into a fresh project, alternating, best of --repeat (the server slows as its DB grows)
        raw_times, push_times = [], []
        for round_ in range(args.repeat):
            project = ls.projects.create(title=f"raw {round_}", label_config=config.read_text())
            raw_url = f"{server.url}/api/projects/{project.id}/import"
            t_raw, r = timed(lambda url=raw_url: requests.post(url, data=payload, timeout=600, headers={
                "Authorization": f"Token {TOKEN}", "Content-Type": "application/json"}))
            r.raise_for_status()
            raw_times.append(t_raw)
            title = f"pushed {round_}"
            t_push, code = timed(lambda title=title: dl2ls(["-q", "push", str(src), "--new-project", title,
                                                            "--label-config", str(config)]))
            assert code == 0
            push_times.append(t_push)
        t_raw, t_push = min(raw_times), min(push_times)
        print(f"raw POST runs: {', '.join(f'{t:.2f}' for t in raw_times)} s; "
              f"push runs: {', '.join(f'{t:.2f}' for t in push_times)} s")
        # 1c. a second push: nothing changes (it reads the project's tasks a page at a time, with
        # the record of what dl2ls wrote on each, and writes nothing)
        pushed = next(p for p in ls.projects.list() if p.title == "pushed 0")
        again_times = []
        for _ in range(args.repeat):
            t, code = timed(lambda: dl2ls(["-q", "push", str(src), "--project", str(pushed.id)]))
            assert code == 0
            again_times.append(t)
        t_again = min(again_times)
        # 1d. one prediction per request
        single = ls.projects.create(title="single", label_config=config.read_text())
        tasks = json.loads(payload)[: args.one_by_one]
        ls.projects.import_tasks(single.id, request=[{"data": t["data"]} for t in tasks])
        ids = [t.id for t in ls.tasks.list(project=single.id)]
        preds = [p for t in tasks for p in t["predictions"]]
        t_one, _ = timed(lambda: [ls.predictions.create(task=i, result=p["result"], model_version=p["model_version"])
                                  for i, p in zip(ids, preds)])
        per_s = len(preds) / t_one
        print("step                                        seconds   vs raw bulk POST")
        print(f"raw bulk POST of the prepared tasks         {t_raw:7.2f}   1.00")
        print(f"dl2ls push --new-project (converts too)     {t_push:7.2f}   {t_push / t_raw:.2f}  (target <= 1.15)")
        print(f"dl2ls push again (nothing to change)        {t_again:7.2f}   {t_again / t_raw:.2f}  (target <= 0.5)")
        print(f"predictions.create one at a time            {n_pred / per_s:7.2f}   {n_pred / per_s / t_raw:.1f}"
              f"  ({per_s:.0f}/s measured on {len(preds)}, extrapolated to {n_pred})")
        print(f"bulk import rate: {n_pred / t_raw:.0f} predictions/s\n")

        # 2. /predict latency
        heavy_dir = work / "heavy"
        item = heavy_item(heavy_dir)
        port = free_port()
        env = {**os.environ, "WORKERS": "2", "THREADS": "4", "LOG_LEVEL": "WARNING"}
        proc = subprocess.Popen([sys.executable, "-m", "dl2ls.cli", "-q", "serve", "--source", str(heavy_dir),
                                 "--host", "127.0.0.1", "--port", str(port)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_http(f"{url}/health", 60, proc)
            body = {"tasks": [{"data": {"video": "x.mp4", "dataloop_item_id": item["id"], "fps": 25}}],
                    "label_config": config.read_text(), "project": "1.0"}
            session = requests.Session()

            def one(s=session):
                t = time.perf_counter()
                r = s.post(f"{url}/predict", json=body, timeout=60)
                r.raise_for_status()
                assert r.json()["results"][0]["result"]
                return time.perf_counter() - t

            first = [one() for _ in range(4)]  # each worker converts the item once
            seq = [one() for _ in range(args.requests)]
            with ThreadPoolExecutor(8) as pool:
                t_conc, conc = timed(lambda: list(pool.map(lambda _: one(requests.Session()), range(args.requests))))
            print("/predict, one item of 50 tracks x 500 frames (25,000 stored frames), 2 gunicorn workers")
            print(f"  first requests (index + convert): {', '.join(f'{x * 1000:.0f}' for x in first)} ms")
            print(f"  sequential, converted:  {percentiles(seq)}  (target p50 <= 20 ms)")
            print(f"  8 concurrent clients:   {percentiles(conc)}, {len(conc) / t_conc:.0f} requests/s")
        finally:
            proc.terminate()
            proc.wait(30)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
