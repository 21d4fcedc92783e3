#!/usr/bin/env python3
"""Benchmark `dl2ls sync`: cost proportional to the changes, not to the dataset.

    .venv/bin/python bench/bench_sync.py [--items 2000] [--changed 0.01]

A stand-in of Dataloop's API (tests/dataloop_standin.py) holds N items (the real tracker sample
under new ids); a real local Label Studio receives them. Times and counts, in one run: the first
sync (everything), a sync with nothing changed, and a sync after 1 % of the items changed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from dataloop_standin import DataloopStandIn  # noqa: E402
from test_dataloop_api import sample_item  # noqa: E402
from test_sync import CONFIG  # noqa: E402

from dl2ls.cli import main as dl2ls  # noqa: E402
from dl2ls.labelstudio import push  # noqa: E402
from dl2ls.localserver import LocalLabelStudio, free_port  # noqa: E402

TOKEN = "5e7c5e7c5e7c5e7c5e7c5e7c5e7c5e7c5e7c5e7c"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--changed", type=float, default=0.01, help="share of items changed (default %(default)s)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dl2ls-bench-sync-"))
    server = LocalLabelStudio(work / "ls", free_port(), TOKEN)
    print(f"starting Label Studio in {work} ...", flush=True)
    server.start()
    standin = DataloopStandIn().start()
    standin.export_polls = 1  # the export is ready at the first poll (2 s after it was asked for)
    try:
        for i in range(args.items):
            standin.put_item("ds1", sample_item(i))
        os.environ.update(LABEL_STUDIO_URL=server.url, LABEL_STUDIO_API_KEY=TOKEN, DATALOOP_API_URL=standin.url,
                          DATALOOP_API_KEY=standin.api_key)
        from label_studio_sdk import LabelStudio

        project = LabelStudio(base_url=server.url, api_key=TOKEN).projects.create(title="sync", label_config=CONFIG)
        writes = []
        for name in ("import_tasks", "import_predictions", "delete_prediction", "delete_task", "update_task"):
            original = getattr(push.Pusher, name)

            def counted(self, *a, _o=original, _n=name, **k):
                writes.append(_n)
                return _o(self, *a, **k)

            setattr(push.Pusher, name, counted)
        state = work / "state.sqlite"

        def run(label: str) -> None:
            standin.requests.clear()
            writes.clear()
            t = time.perf_counter()
            code = dl2ls(["-q", "sync", "--dataset", "ds1", "--project", str(project.id), "--once",
                          "--state", str(state)])
            seconds = time.perf_counter() - t
            assert code == 0, code
            reads = standin.requests["/api/v1/items/<item_id>/annotations"]
            exports = standin.requests["/api/v1/datasets/<dataset_id>/export"]
            print(f"{label:<34} {seconds:8.2f} s  {sum(standin.requests.values()):6d} Dataloop requests "
                  f"({reads} item reads, {exports} exports)  {len(writes):4d} Label Studio writes", flush=True)

        print(f"\n{args.items} items in the dataset\n")
        run("first sync (everything)")
        run("second sync (nothing changed)")
        ids = sorted(standin.datasets["ds1"])
        changed = ids[:: max(1, int(1 / args.changed))]
        for item_id in changed:
            item = json.loads(json.dumps(standin.datasets["ds1"][item_id]))
            for ann in item["annotations"]:
                ann["label"] = "pedestrian"
                for s in ann["metadata"]["system"]["snapshots_"]:
                    s["label"] = "pedestrian"
            standin.put_item("ds1", item)
        run(f"sync after {len(changed)} items changed")
        run("and again (nothing changed)")
    finally:
        standin.stop()
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
