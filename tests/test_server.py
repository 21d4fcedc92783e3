"""The ML backend's Flask app on its own (Label Studio calling it for real is in test_push_server)."""

from __future__ import annotations

import json
import os
import time

import pytest

from conftest import box_annotation, video_item
from dl2ls import server

CONFIG = ('<View><Video name="v" value="$video" frameRate="$fps"/><Labels name="l" toName="v">'
          '<Label value="car"/><Label value="bus"/></Labels><VideoRectangle name="b" toName="v"/></View>')


@pytest.fixture
def app(tmp_path, monkeypatch):
    monkeypatch.setattr(server, "RESCAN_SECONDS", 0.0)
    for key in ("BASIC_AUTH_USER", "BASIC_AUTH_PASS"):
        monkeypatch.delenv(key, raising=False)
    (tmp_path / "clip.mp4.json").write_text(json.dumps(video_item([box_annotation("a1", label="car", end=5)])))
    return server.create_app(str(tmp_path)).test_client(), tmp_path


def predict(client, data):
    r = client.post("/predict", json={"tasks": [{"data": data}], "label_config": CONFIG, "project": "1.1"})
    assert r.status_code == 200, r.json
    return r.json["results"][0]


def test_predict_matches_by_id_then_file_name_and_answers_unknown_tasks_empty(app):
    client, _ = app
    by_id = predict(client, {"dataloop_item_id": "item1", "video": "x"})
    by_name = predict(client, {"video": "s3://bucket/any/clip.mp4"})
    assert by_id["result"] == by_name["result"] and by_id["result"][0]["value"]["labels"] == ["car"]
    assert by_id["model_version"] == "dataloop"
    assert predict(client, {"video": "s3://bucket/other.mp4"}) == {"result": [], "model_version": "dataloop"}


def test_a_changed_source_is_picked_up_without_a_restart(app):
    client, folder = app
    assert predict(client, {"dataloop_item_id": "item1"})["result"][0]["value"]["labels"] == ["car"]
    time.sleep(0.01)
    path = folder / "clip.mp4.json"
    path.write_text(json.dumps(video_item([box_annotation("a1", label="bus", end=5)])))
    os.utime(path, None)
    assert predict(client, {"dataloop_item_id": "item1"})["result"][0]["value"]["labels"] == ["bus"]


def test_setup_returns_the_model_version_and_refuses_unreadable_configs(app):
    client, _ = app
    assert client.post("/setup", json={"project": "1.1", "schema": CONFIG}).json == {"model_version": "dataloop"}
    r = client.post("/setup", json={"project": "1.1", "schema": "<View>"})
    assert r.status_code == 400 and "not valid XML" in r.json["error"]
    assert client.get("/health").json["status"] == "UP"


def test_basic_auth_needs_both_halves_and_takes_any_text(tmp_path, monkeypatch):
    import base64

    (tmp_path / "clip.mp4.json").write_text(json.dumps(video_item([box_annotation("a1", end=5)])))
    monkeypatch.setenv("BASIC_AUTH_USER", "ls")
    monkeypatch.delenv("BASIC_AUTH_PASS", raising=False)
    with pytest.raises(SystemExit, match="both BASIC_AUTH_USER and BASIC_AUTH_PASS"):
        server.create_app(str(tmp_path))
    monkeypatch.setenv("BASIC_AUTH_PASS", "pässwörd")
    client = server.create_app(str(tmp_path)).test_client()
    good = base64.b64encode("ls:pässwörd".encode()).decode()
    odd = base64.b64encode("lß:x".encode()).decode()
    assert client.post("/setup", json={}, headers={"Authorization": f"Basic {good}"}).status_code == 200
    assert client.post("/setup", json={}, headers={"Authorization": f"Basic {odd}"}).status_code == 401
    assert client.post("/setup", json={}).status_code == 401
    assert client.get("/health").status_code == 200
