"""`dl2ls sync` between the Dataloop stand-in and a real Label Studio: the first run, a run with
nothing to do, edits / deletions / new items, a run killed halfway, and two runs at once."""

from __future__ import annotations

import json

import pytest

from conftest import assert_frame_exact
from dataloop_standin import DataloopStandIn
from dl2ls.cli import main
from dl2ls.labelstudio import push as push_module
from dl2ls.sync import State
from test_dataloop_api import sample_item

CONFIG = ('<View><Video name="video" value="$video" frameRate="$fps"/>'
          '<Labels name="videoLabels" toName="video"><Label value="person"/><Label value="pedestrian"/></Labels>'
          '<VideoRectangle name="box" toName="video"/></View>')


@pytest.fixture
def world(ls_env, tmp_path, monkeypatch):
    standin = DataloopStandIn().start()
    for i in range(6):
        standin.put_item("ds1", sample_item(i))
    monkeypatch.setenv("DATALOOP_API_URL", standin.url)
    monkeypatch.setenv("DATALOOP_API_KEY", standin.api_key)
    project = ls_env.projects.create(title="synced", label_config=CONFIG)
    yield standin, project.id, tmp_path / "state.sqlite"
    standin.stop()


def sync(capsys, project_id, state, *extra) -> tuple[int, str]:
    code = main(["sync", "--dataset", "ds1", "--project", str(project_id), "--once", "--state", str(state),
                 *map(str, extra)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def held(ls, project_id) -> dict[str, dict]:
    """item id -> {"task": task id, "annotations": n, "versions": {version: [prediction]}}"""
    out = {}
    tasks = {t.id: t for t in ls.tasks.list(project=project_id, include="id,data,total_annotations")}
    for t in tasks.values():
        out[t.data["dataloop_item_id"]] = {"task": t.id, "annotations": t.total_annotations, "versions": {}}
    for p in ls.predictions.list(project=project_id):
        item = tasks[p.task].data["dataloop_item_id"]
        out[item]["versions"].setdefault(p.model_version, []).append(p)
    return out


def count_writes(monkeypatch) -> list[str]:
    calls = []
    for name in ("import_tasks", "import_predictions", "delete_prediction", "delete_task", "update_task",
                 "set_model_version", "existing_tasks", "project"):
        original = getattr(push_module.Pusher, name)

        def wrapper(self, *args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(push_module.Pusher, name, wrapper)
    return calls


def test_first_sync_then_a_run_with_nothing_to_do(world, ls_env, capsys, monkeypatch):
    standin, pid, state = world
    code, err = sync(capsys, pid, state)
    assert code == 0 and "items seen 6, read 6, changed 6" in err
    now = held(ls_env, pid)
    assert len(now) == 6 and all(len(h["versions"]["dataloop-human"]) == 1 for h in now.values())
    item = standin.datasets["ds1"][sorted(standin.datasets["ds1"])[0]]
    prediction = now[item["id"]]["versions"]["dataloop-human"][0]
    for ann in item["annotations"]:
        assert_frame_exact(ann, {"predictions": [prediction.model_dump()]}, fps=25, width=1280, height=720)

    standin.requests.clear()
    calls = count_writes(monkeypatch)
    code, err = sync(capsys, pid, state)
    assert code == 0 and "read 0, changed 0" in err
    assert sum(standin.requests.values()) == 2  # one page of items, one annotations query
    assert calls == ["project"]  # one read of the labeling config (part of every item's hash), no writes


def test_edits_deleted_annotations_deleted_items_and_new_items(world, ls_env, capsys):
    standin, pid, state = world
    sync(capsys, pid, state)
    ids = sorted(standin.datasets["ds1"])
    items = standin.datasets["ds1"]
    relabelled = json.loads(json.dumps(items[ids[0]]))
    for ann in relabelled["annotations"]:
        ann["label"] = "pedestrian"
        for s in ann["metadata"]["system"]["snapshots_"]:
            s["label"] = "pedestrian"
    standin.put_item("ds1", relabelled)
    trimmed = json.loads(json.dumps(items[ids[1]]))
    trimmed["annotations"] = trimmed["annotations"][:1]
    standin.put_item("ds1", trimmed, touch=False)  # only the annotation count tells
    before = held(ls_env, pid)
    ls_env.annotations.create(before[ids[3]]["task"], result=[], was_cancelled=False)
    del items[ids[2]], items[ids[3]]  # deleted in Dataloop; ids[3] was annotated in Label Studio
    standin.put_item("ds1", sample_item(100))
    standin.requests.clear()

    code, err = sync(capsys, pid, state)
    assert code == 0 and "changed 3, deleted 2" in err
    assert standin.requests["/api/v1/items/<item_id>/annotations"] == 3  # about K items, not the dataset
    now = held(ls_env, pid)
    assert set(now) == {ids[0], ids[1], ids[3], ids[4], ids[5], sample_item(100)["id"]}
    (p0,) = now[ids[0]]["versions"]["dataloop-human"]
    assert {r["value"]["labels"][0] for r in p0.result} == {"pedestrian"}
    (p1,) = now[ids[1]]["versions"]["dataloop-human"]
    assert len(p1.result) == 1
    assert now[ids[3]]["versions"] == {} and now[ids[3]]["annotations"] == 1  # the task stays for the people
    assert all(len(now[i]["versions"]["dataloop-human"]) == 1 for i in (ids[4], ids[5], sample_item(100)["id"]))


def test_a_sync_killed_halfway_converges(world, ls_env, capsys, monkeypatch, killed_after_import):
    standin, pid, state = world
    monkeypatch.setattr(push_module, "BATCH_TASKS", 2)
    monkeypatch.setattr(push_module, "FIRST_BATCH", 2)
    killed_after_import.arm()
    code, _ = sync(capsys, pid, state)
    assert code == 130 and len(held(ls_env, pid)) == 2
    killed_after_import.disarm()
    code, err = sync(capsys, pid, state)
    assert code == 0
    now = held(ls_env, pid)
    assert len(now) == 6 and all(len(h["versions"]["dataloop-human"]) == 1 for h in now.values())


def test_two_syncs_on_one_state_are_refused(world, capsys):
    _, pid, state = world
    holder = State(state)
    try:
        code, err = sync(capsys, pid, state)
        assert code == 2 and "another dl2ls sync is running" in err
    finally:
        holder.close()


def test_many_candidates_are_read_through_one_export(world, ls_env, capsys, monkeypatch):
    from dl2ls import sync as sync_module

    standin, pid, state = world
    monkeypatch.setattr(sync_module, "EXPORT_AT", 1)
    standin.export_polls = 0
    code, _ = sync(capsys, pid, state)
    assert code == 0
    assert standin.requests["/api/v1/datasets/<dataset_id>/export"] == 1
    assert standin.requests["/api/v1/items/<item_id>/annotations"] == 0
    assert len(held(ls_env, pid)) == 6


def test_every_runs_on_a_schedule_until_interrupted(world, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    _, pid, state = world
    proc = subprocess.Popen([sys.executable, "-m", "dl2ls.cli", "sync", "--dataset", "ds1", "--project", str(pid),
                             "--every", "10s", "--state", str(state)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        line = ""
        while time.monotonic() < deadline and "sync: items seen" not in line:
            line = proc.stderr.readline()
        assert "sync: items seen 6" in line
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    assert proc.returncode == 0
