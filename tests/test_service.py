"""The service end to end: the real Label Studio the suite starts, `dl2ls serve` (gunicorn) as a
child process, the Dataloop stand-in. No dl2ls command is run: the backend is connected through
Label Studio's API with extra params, tasks arrive through Label Studio's own import API and a
local-files storage sync, and everything after that is the service's doing."""

from __future__ import annotations

import copy
import re
import threading
import time

import pytest
import requests

from conftest import assert_frame_exact
from dataloop_standin import DataloopStandIn
from dl2ls.service import ServiceDB
from service_harness import CONFIG, ServiceProcess, connect, wait_for, webhook_registered
from test_dataloop_api import sample_item

SECRET = "hook-secret-123"


@pytest.fixture
def standin():
    server = DataloopStandIn().start()
    yield server
    server.stop()


@pytest.fixture
def services(label_studio, standin, tmp_path):
    """Start services on demand; every one is stopped at the end."""
    started: list[ServiceProcess] = []

    def start(workers: int = 2, model_dir=None, port: int = 0, **env) -> ServiceProcess:
        service = ServiceProcess(standin.url, standin.api_key, label_studio[0], model_dir or tmp_path / "model",
                                 workers=workers, env={"DL2LS_DATALOOP_HOOK_SECRET": SECRET, **env}, port=port)
        started.append(service)
        return service.start()

    yield start
    for service in started:
        service.stop()


def predictions_by_task(ls, project_id: int) -> dict[int, list]:
    out: dict[int, list] = {}
    for p in ls.predictions.list(project=project_id):
        out.setdefault(p.task, []).append(p)
    return out


def tasks_of(ls, project_id: int) -> dict[int, dict]:
    return {t.id: t.data for t in ls.tasks.list(project=project_id, fields="all")}


def item_of(data: dict, items: dict[str, dict]) -> dict:
    """The stand-in item a task's media names (by file name: the test's paths are unique)."""
    path = data["video"]
    return next(i for i in items.values() if path.endswith(i["filename"]))


def assert_exact(item: dict, result: list) -> None:
    system = item["metadata"]["system"]
    for ann in item["annotations"]:
        assert_frame_exact(ann, {"predictions": [{"result": result}]}, item["metadata"]["fps"], system["width"],
                           system["height"])


def all_predicted(ls, project_id: int, count: int, with_fps: bool = False):
    def check():
        got = predictions_by_task(ls, project_id)
        if len(got) < count:
            return None
        if with_fps and any("fps" not in data for data in tasks_of(ls, project_id).values()):
            return None  # the service adds fps after the predictions
        return got
    return check


def moved(item: dict, dx: float) -> list[dict]:
    """The item's annotations with every box shifted right by dx pixels (an edit in Dataloop)."""
    anns = copy.deepcopy(item["annotations"])
    for ann in anns:
        for point in ann["coordinates"][:2]:
            point["x"] += dx
        for snap in ann["metadata"]["system"].get("snapshots_") or []:
            for point in snap["data"][:2]:
                point["x"] += dx
    return anns


def test_imported_tasks_get_frame_exact_predictions_and_follow_dataloop(ls_env, label_studio, ls_media_root,
                                                                         standin, services):
    ls = ls_env
    items = {}
    for i in range(6):
        item = sample_item(i)
        standin.put_item("ds1", item)
        items[item["id"]] = standin.datasets["ds1"][item["id"]]
    # two of the videos sit in a folder a local-files storage imports
    storage = ls_media_root / "svc-storage"
    for i in (4, 5):
        path = storage / sample_item(i)["filename"].lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\x1aE\xdf\xa3 not really a video")

    service = services(workers=2, LOG_LEVEL="DEBUG")  # and no secret in the log, even so
    project = ls.projects.create(title="service e2e", label_config=CONFIG)
    backend = connect(ls, project.id, service, {"dataset": "ds1"})
    wait_for(lambda: webhook_registered(ls, project.id, service), 15,
             what="the TASKS_CREATED webhook registered")

    started = time.monotonic()
    ls.projects.import_tasks(project.id, request=[{"video": f"/data/local-files/?d=imported{items[k]['filename']}"}
                                                  for k in list(items)[:4]])
    local = ls.import_storage.local.create(project=project.id, path=str(storage), regex_filter=r".*\.webm",
                                           use_blob_urls=True, recursive_scan=True, title="videos")
    ls.import_storage.local.sync(id=local.id)
    got = wait_for(all_predicted(ls, project.id, 6, with_fps=True), 30, what="predictions on all 6 tasks")
    elapsed = time.monotonic() - started
    assert elapsed < 30

    data = tasks_of(ls, project.id)
    assert len(data) == 6
    for task_id, preds in got.items():
        assert len(preds) == 1 and preds[0].model_version == "dataloop"
        item = item_of(data[task_id], items)
        assert data[task_id]["fps"] == 25  # the config's frameRate reads it: the service added it
        assert "dataloop_item_id" not in data[task_id]  # nothing else of the task is touched
        assert_exact(item, preds[0].result)
    assert ls.projects.get(project.id).model_version == backend.title  # Label Studio asks /setup which to show
    assert "Traceback" not in service.log()

    # an edit in Dataloop reaches the task through Dataloop's hook, within seconds
    by_item = {item_of(d, items)["id"]: t for t, d in data.items()}
    first, second = list(items)[0], list(items)[1]
    standin.add_hook(f"{service.url}/dataloop/webhook?secret={SECRET}")
    standin.edit_annotations(first, moved(items[first], 40))

    def updated(item_id):
        def check():
            preds = predictions_by_task(ls, project.id).get(by_item[item_id], [])
            if len(preds) != 1:
                return None
            try:
                assert_exact(standin.datasets["ds1"][item_id], preds[0].result)
            except AssertionError:
                return None
            return preds
        return check

    wait_for(updated(first), 20, what="the hooked edit in the task")

    # another edit, no hook: "Start Training" in Label Studio syncs now
    standin.hooks.clear()
    wait_for(lambda: not {"queued", "running"} & set(service.health()["jobs"]), 20, what="an empty job list")
    standin.edit_annotations(second, moved(items[second], -30))
    time.sleep(0.5)
    assert len(predictions_by_task(ls, project.id)[by_item[second]]) == 1
    ls.ml.train(id=backend.id)
    wait_for(updated(second), 20, what="the edit after Start Training")

    # an item deleted in Dataloop: its predictions go with the hook, the task (the user's) stays
    third = list(items)[2]
    standin.add_hook(f"{service.url}/dataloop/webhook?secret={SECRET}")
    standin.delete_item(third)
    wait_for(lambda: by_item[third] not in predictions_by_task(ls, project.id), 20,
             what="the deleted item's prediction gone")
    assert by_item[third] in tasks_of(ls, project.id)

    final = predictions_by_task(ls, project.id)
    assert sorted(len(v) for v in final.values()) == [1] * 5
    log = service.log()
    hook_token = ServiceDB(service.model_dir / "dl2ls-service.sqlite3").hook_token
    for secret in (SECRET, label_studio[1], standin.api_key, hook_token):
        assert secret not in log
    health = service.health()
    assert health["projects"][str(project.id)]["label_studio"].startswith("ok")
    metrics = requests.get(f"{service.url}/metrics", timeout=5).text
    assert re.search(rf'dl2ls_predictions_written_total\{{project="{project.id}"\}} ([0-9]+)', metrics)


def test_restart_mid_work_and_webhooks_delivered_twice(ls_env, standin, services, tmp_path):
    ls = ls_env
    n = 40
    for i in range(n):
        standin.put_item("ds1", sample_item(i))
    service = services(workers=2)
    project = ls.projects.create(title="service restart", label_config=CONFIG)
    connect(ls, project.id, service, {"dataset": "ds1"})
    wait_for(lambda: webhook_registered(ls, project.id, service), 15,
             what="the webhook registered")
    standin.faults = [("503",)] * 3  # Dataloop answers slowly at first: the job is under way when killed
    result = ls.projects.import_tasks(project.id, request=[{"video": f"/data/local-files/?d=v{sample_item(i)['filename']}",
                                                            "fps": 25} for i in range(n)], return_task_ids=True)
    port = service.port
    service.kill()  # the whole process group, mid-work
    service.port = port
    restarted = services(workers=2, model_dir=service.model_dir, port=service.port)

    # Label Studio delivers TASKS_CREATED again, twice at once (as a retrying proxy would)
    payload = {"action": "TASKS_CREATED", "project": {"id": project.id},
               "tasks": [{"id": t.id, "data": t.data, "meta": {}, "total_predictions": 0, "total_annotations": 0}
                         for t in ls.tasks.list(project=project.id)]}
    posts = [threading.Thread(target=requests.post, args=(f"{restarted.url}/webhook",), kwargs={"json": payload})
             for _ in range(2)]
    for post in posts:
        post.start()
    for post in posts:
        post.join()
    wait_for(all_predicted(ls, project.id, n), 30, what=f"predictions on all {n} tasks after the restart")
    wait_for(lambda: not {"queued", "running"} & set(restarted.health()["jobs"]), 20, what="an empty job list")
    got = predictions_by_task(ls, project.id)
    assert sorted(len(v) for v in got.values()) == [1] * n
    assert {p.model_version for v in got.values() for p in v} == {"dataloop"}


def test_two_workers_one_scheduler(ls_env, standin, services):
    ls = ls_env
    for i in range(3):
        standin.put_item("ds1", sample_item(i))
    service = services(workers=2)
    project = ls.projects.create(title="service schedule", label_config=CONFIG)
    connect(ls, project.id, service, {"dataset": "ds1", "sync_every": 2})
    wait_for(lambda: service.health()["projects"].get(str(project.id), {}).get("last_sync"), 15,
             what="the first scheduled sync")
    time.sleep(8)
    syncs = re.findall(rf"job (\d+) sync project {project.id} \(schedule\)", service.log())
    workers = set(re.findall(r"job runner started: \d+ threads in process (\d+)", service.log()))
    assert len(workers) == 2
    assert len(syncs) == len(set(syncs))
    # one sync per 2-second interval over ~9 s: about 5, where two schedulers would make about 10
    assert 3 <= len(syncs) <= 6, syncs


def test_predict_live_from_dataloop(ls_env, standin, services):
    """/predict as Label Studio sends it (opening a task, Retrieve Predictions): answered from
    Dataloop; an item Dataloop does not have gets an empty result."""
    items = [sample_item(i) for i in range(3)]
    for item in items:
        standin.put_item("ds1", item)
    service = services(workers=1, DL2LS_DATASET="ds1")
    tasks = [{"id": 100 + i, "data": {"video": f"s3://bucket/x{item['filename']}"}} for i, item in enumerate(items)]
    tasks.append({"id": 200, "data": {"video": "s3://bucket/nowhere/else.webm"}})
    body = {"tasks": tasks, "project": "999.1700000000", "label_config": CONFIG}
    answer = requests.post(f"{service.url}/predict", json=body, timeout=30).json()
    results = answer["results"]
    assert len(results) == 4
    for item, result in zip(items, results[:3]):
        assert result["model_version"] == "dataloop"
        assert_exact(standin.datasets["ds1"][item["id"]], result["result"])
    assert results[3] == {"result": [], "model_version": "dataloop"}
    before = sum(standin.requests.values())
    again = requests.post(f"{service.url}/predict", json=body, timeout=30).json()
    assert again["results"] == results
    assert sum(standin.requests.values()) - before <= 2  # the item query; conversions come from the cache
