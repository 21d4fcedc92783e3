"""`dl2ls push` and `dl2ls serve` against a real Label Studio 1.23 server (started by the
`label_studio` fixture): idempotence, matching existing tasks, resuming an interrupted push, and
the server calling our ML backend over HTTP. What the server stores is read back and checked
frame by frame with the editor evaluator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from label_studio_sdk.label_interface import LabelInterface

from conftest import SAMPLES, free_port, wait_http
from dl2ls.cli import main
from dl2ls.dataloop.model import MediaDefaults
from dl2ls.dataloop.read import iter_items
from dl2ls.labelstudio import push as push_module
from dl2ls.labelstudio.evaluate import compare_item
from dl2ls.tracks import item_tracks

TRACKER = json.loads((SAMPLES / "video_tracker_webm_2024.json").read_text())


def make_export(folder: Path, n: int, label: str = "person") -> Path:
    """n video items (the real tracker sample under new ids and file names), one JSON per item."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        item = json.loads(json.dumps(TRACKER))
        item["id"] = f"item{i:04d}"
        item["filename"] = f"/videos/clip_{i}.webm"
        item["name"] = f"clip_{i}.webm"
        item["stream"] = f"https://example.com/clip_{i}.webm"
        for k, ann in enumerate(item["annotations"]):
            ann["id"] = f"ann{i:04d}_{k}"
            ann["label"] = label
            for s in ann["metadata"]["system"]["snapshots_"]:
                s["label"] = label
        (folder / f"clip_{i}.webm.json").write_text(json.dumps(item))
    return folder


def run(capsys, *argv) -> tuple[int, dict | None, str]:
    code = main([str(a) for a in argv])
    _, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, None, err


def push_report(capsys, tmp_path: Path, *argv) -> tuple[int, dict]:
    report = tmp_path / f"report{len(list(tmp_path.glob('report*.json')))}.json"
    code, _, err = run(capsys, "push", *argv, "--report", report)
    assert report.exists(), err
    return code, json.loads(report.read_text())


def stored(ls, project_id: int) -> dict[str, dict]:
    """item id -> {task, predictions by version}"""
    out = {}
    for task in ls.tasks.list(project=project_id, fields="all"):
        preds: dict[str, list] = {}
        for p in task.predictions or []:
            p = p if isinstance(p, dict) else p.model_dump()
            preds.setdefault(p["model_version"], []).append(p)
        out[task.data.get("dataloop_item_id") or task.data.get("video")] = {"task": task, "predictions": preds}
    return out


def assert_frame_exact_on_server(ls, project_id: int, source: Path, version: str):
    project = ls.projects.get(project_id)
    interface = LabelInterface(project.label_config)
    held = stored(ls, project_id)
    checked = 0
    for entry in iter_items(source):
        item = item_tracks(entry.item, entry.origin, MediaDefaults())
        (prediction,) = held[item.info.item_id]["predictions"][version]
        assert interface.validate_prediction(prediction, return_errors=True) == []
        verdict = compare_item(item, {"predictions": [prediction]})
        assert verdict.ok(), verdict.mismatches[:3]
        checked += 1
    return checked


def test_push_into_a_new_project_then_again_changes_nothing(ls_env, tmp_path, capsys):
    src = make_export(tmp_path / "export", 3)
    code, rep = push_report(capsys, tmp_path, src, "--new-project", "push twice")
    assert code == 0
    pid = rep["push"]["project"]
    assert rep["push"]["tasks_created"] == 3 and rep["push"]["predictions_created"] == 3
    assert ls_env.projects.get(pid).model_version == "dataloop-human"  # shown in the labeling stream
    assert assert_frame_exact_on_server(ls_env, pid, src, "dataloop-human") == 3
    before = {k: [p["id"] for p in v["predictions"]["dataloop-human"]] for k, v in stored(ls_env, pid).items()}

    code, rep = push_report(capsys, tmp_path, src, "--project", pid)
    assert code == 0
    assert rep["push"]["tasks_created"] == 0 and rep["push"]["predictions_unchanged"] == 3
    assert rep["push"]["predictions_created"] == 0 and rep["push"]["predictions_replaced"] == 0
    after = {k: [p["id"] for p in v["predictions"]["dataloop-human"]] for k, v in stored(ls_env, pid).items()}
    assert after == before


def test_push_matches_tasks_imported_earlier_by_id_and_by_file_name(ls_env, tmp_path, capsys):
    src = make_export(tmp_path / "export", 3)
    config = tmp_path / "config.xml"
    assert main(["label-config", str(src), "-o", str(config)]) == 0
    project = ls_env.projects.create(title="existing tasks", label_config=config.read_text())
    ls_env.projects.import_tasks(project.id, request=[
        {"data": {"video": "https://example.com/clip_0.webm", "dataloop_item_id": "item0000"}},
        {"data": {"video": "s3://bucket/from-storage/videos/clip_1.webm"}},  # no Dataloop id: cloud storage
    ])
    code, rep = push_report(capsys, tmp_path, src, "--project", project.id, "--match", "filename")
    assert code == 0
    assert rep["push"]["tasks_created"] == 1 and rep["push"]["predictions_created"] == 3
    held = stored(ls_env, project.id)
    assert len(held) == 3
    storage_task = held["item0001"]["task"]
    assert storage_task.data["video"] == "s3://bucket/from-storage/videos/clip_1.webm"  # the media stays
    assert storage_task.data["fps"] == 25  # what frameRate="$fps" needs
    assert all(len(v["predictions"]["dataloop-human"]) == 1 for v in held.values())
    assert_frame_exact_on_server(ls_env, project.id, src, "dataloop-human")


def test_changes_replace_only_their_version_and_leave_annotations_alone(ls_env, tmp_path, capsys):
    src = make_export(tmp_path / "export", 2)
    code, rep = push_report(capsys, tmp_path, src, "--new-project", "replace")
    pid = rep["push"]["project"]
    held = stored(ls_env, pid)
    task = held["item0000"]["task"]
    other = ls_env.predictions.create(task=task.id, result=[], model_version="someone-else", score=0.5)
    ls_env.annotations.create(task.id, result=[], was_cancelled=False)

    make_export(tmp_path / "export", 2, label="pedestrian")  # Dataloop relabelled everything
    cfg = ls_env.projects.get(pid).label_config
    ls_env.projects.update(pid, label_config=cfg.replace('<Label value="person"/>',
                                                         '<Label value="person"/><Label value="pedestrian"/>'))
    code, rep = push_report(capsys, tmp_path, src, "--project", pid)
    assert code == 0 and rep["push"]["predictions_replaced"] == 2
    held = stored(ls_env, pid)
    assert [p["id"] for p in held["item0000"]["predictions"]["someone-else"]] == [other.id]
    assert held["item0000"]["task"].total_annotations == 1
    (new,) = held["item0000"]["predictions"]["dataloop-human"]
    assert new["result"][0]["value"]["labels"] == ["pedestrian"]


def test_an_interrupted_push_converges_on_the_next_run(ls_env, tmp_path, capsys, monkeypatch, killed_after_import):
    src = make_export(tmp_path / "export", 5)
    monkeypatch.setattr(push_module, "BATCH_TASKS", 2)
    monkeypatch.setattr(push_module, "FIRST_BATCH", 2)
    killed_after_import.arm()  # killed right after the first batch landed
    code, _, _ = run(capsys, "push", src, "--new-project", "interrupted")
    assert code == 130 and killed_after_import.sizes == [2]
    pid = next(p.id for p in ls_env.projects.list() if p.title == "interrupted")
    assert len(stored(ls_env, pid)) == 2

    killed_after_import.disarm()
    code, rep = push_report(capsys, tmp_path, src, "--project", pid)
    assert code == 0 and rep["push"]["tasks_created"] == 3 and rep["push"]["predictions_unchanged"] == 2
    held = stored(ls_env, pid)
    assert len(held) == 5
    assert all(len(v["predictions"]["dataloop-human"]) == 1 for v in held.values())


def test_dry_run_writes_nothing(ls_env, tmp_path, capsys):
    src = make_export(tmp_path / "export", 2)
    project = ls_env.projects.create(title="dry", label_config=(Path(__file__).parent.parent / "label_config.xml")
                                     .read_text())
    code, rep = push_report(capsys, tmp_path, src, "--project", project.id, "--dry-run")
    assert code == 0 and rep["push"]["tasks_created"] == 2 and rep["push"]["dry_run"] is True
    assert stored(ls_env, project.id) == {}


def test_bad_token_and_missing_project_are_one_clear_line(ls_env, tmp_path, capsys, monkeypatch):
    src = make_export(tmp_path / "export", 1)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "not-a-token")
    code, _, err = run(capsys, "push", src, "--project", 1)
    assert code == 2 and "401 unauthorized: LABEL_STUDIO_API_KEY" in err
    monkeypatch.delenv("LABEL_STUDIO_API_KEY")
    code, _, err = run(capsys, "push", src, "--project", 1)
    assert code == 2 and "LABEL_STUDIO_API_KEY is not set" in err
    assert "not-a-token" not in err


@pytest.fixture
def backend(tmp_path):
    """`dl2ls serve` under gunicorn with basic auth, on loopback."""
    src = make_export(tmp_path / "served", 2)
    port = free_port()
    env = {**os.environ, "BASIC_AUTH_USER": "ls", "BASIC_AUTH_PASS": "backend-secret", "WORKERS": "2",
           "THREADS": "2"}
    log = open(tmp_path / "backend.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "dl2ls.cli", "serve", "--source", str(src), "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", 60, proc)
        yield url, src
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def test_label_studio_calls_the_backend_and_stores_its_predictions(ls_env, backend, tmp_path):
    url, src = backend
    config = tmp_path / "config.xml"
    assert main(["label-config", str(src), "-o", str(config)]) == 0
    project = ls_env.projects.create(title="backend", label_config=config.read_text())
    ls_env.projects.import_tasks(project.id, request=[
        {"data": {"video": "https://example.com/clip_0.webm", "dataloop_item_id": "item0000", "fps": 25}},
        {"data": {"video": "s3://bucket/clip_1.webm", "fps": 25}},  # found by file name
        {"data": {"video": "s3://bucket/unknown.webm", "fps": 25}},  # no such item: an empty result
    ])
    ls_env.ml.create(project=project.id, url=url, title="dl2ls", is_interactive=False, auth_method="BASIC_AUTH",
                     basic_auth_user="ls", basic_auth_pass="backend-secret")
    ls_env.actions.create(id="retrieve_tasks_predictions", project=project.id,
                          selected_items={"all": True, "excluded": []})
    held = stored(ls_env, project.id)
    versions = {v for h in held.values() for v in h["predictions"]}
    assert versions == {"dataloop"}
    interface = LabelInterface(project.label_config)
    for entry in iter_items(src):
        item = item_tracks(entry.item, entry.origin, MediaDefaults())
        key = item.info.item_id if item.info.item_id == "item0000" else "s3://bucket/clip_1.webm"
        (prediction,) = held[key]["predictions"]["dataloop"]
        assert prediction["result"], "the backend found the item"
        assert interface.validate_prediction(prediction, return_errors=True) == []
        assert compare_item(item, {"predictions": [prediction]}).ok()
    unknown = held["s3://bucket/unknown.webm"]["predictions"].get("dataloop", [])
    assert all(p["result"] == [] for p in unknown)


def test_backend_refuses_without_credentials_and_answers_bad_requests_with_4xx(backend):
    import requests

    url, _ = backend
    assert requests.get(f"{url}/health", timeout=5).status_code == 200
    assert requests.post(f"{url}/predict", json={"tasks": []}, timeout=5).status_code == 401
    auth = ("ls", "backend-secret")
    r = requests.post(f"{url}/predict", data=b"{not json", auth=auth, timeout=5,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON object" in r.json()["error"]
    r = requests.post(f"{url}/predict", json={"tasks": [{"data": {}}]}, auth=auth, timeout=5)
    assert r.status_code == 400 and "labeling config" in r.json()["error"]
    r = requests.post(f"{url}/predict", data=b"x" * (40 << 20), auth=auth, timeout=30,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    r = requests.post(f"{url}/webhook", json={"action": "START_TRAINING"}, auth=auth, timeout=5)
    assert r.status_code == 200
