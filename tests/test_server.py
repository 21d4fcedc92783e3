"""The ML backend's Flask app on its own (Label Studio calling it for real is in test_push_server)."""

from __future__ import annotations

import json
import logging
import os
import time

import pytest

from conftest import box_annotation, image_item, video_item
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


def reindexed(client, before: int | None = None) -> None:
    """Wait until the index has seen a change made to the source (it is watched in a thread)."""
    import time

    start = client.get("/health").json["index_generation"] if before is None else before
    deadline = time.monotonic() + 10
    while client.get("/health").json["index_generation"] <= start:
        assert time.monotonic() < deadline, "the index never saw the change"
        time.sleep(0.02)


def generation(client) -> int:
    return client.get("/health").json["index_generation"]


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
    before = generation(client)
    path = folder / "clip.mp4.json"
    path.write_text(json.dumps(video_item([box_annotation("a1", label="bus", end=5)])))
    os.utime(path, None)
    reindexed(client, before)  # seen by the index's own thread, not by a request
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


# ----------------------------------------------------------------------------- one task, one answer


def post_tasks(client, tasks, config=CONFIG):
    r = client.post("/predict", json={"tasks": tasks, "label_config": config, "project": "1.1"})
    assert r.status_code == 200, r.json
    assert len(r.json["results"]) == len(tasks)
    return r.json["results"]


def labels(answer):
    return [r["value"]["labels"][0] for r in answer["result"]]


def messages(caplog, level=logging.INFO):
    return [r.getMessage() for r in caplog.records if r.levelno >= level and r.name.startswith("dl2ls")]


def test_predict_never_fails_a_batch_for_one_bad_task(app, caplog):
    client, _ = app
    empty = {"result": [], "model_version": "dataloop"}
    caplog.set_level(logging.INFO)
    results = post_tasks(client, [
        {"id": 1, "data": {"dataloop_item_id": "item1"}},
        {"id": 2, "data": {"dataloop_item_id": ["item1"], "video": "s3://b/clip.mp4"}},  # id ignored: by path
        {"id": 3, "data": {"dataloop_item_id": {"$ne": None}}},
        {"id": 4, "data": {"video": "http://[::1"}},
        "not a task",
        {"id": 6, "data": "not an object"},
        {"id": 7, "data": {"video": ["s3://b/clip.mp4"], "dataloop_filename": 5}},
    ])
    assert labels(results[0]) == labels(results[1]) == ["car"]
    assert results[2] == results[3] == results[6] == empty
    assert results[4] == results[5] == []
    lines = messages(caplog, logging.WARNING)
    assert any("task #5 of the request: not an object" in m for m in lines)
    assert any("task 6: its `data` is not an object" in m for m in lines)


def test_predict_answers_400_with_json_for_bodies_that_are_not_a_json_object(app, monkeypatch):
    client, _ = app
    for raw in (b"[" * 100_000 + b"]" * 100_000, b'{"tasks": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                b"[]", b'"tasks"', b"{not json", b"\xff\xfe"):
        r = client.post("/predict", data=raw, content_type="application/json")
        assert r.status_code == 400 and "JSON object" in r.json["error"], (raw[:20], r.status_code)
    assert client.post("/webhook", data=b"[" * 100_000, content_type="application/json").status_code == 200
    r = client.post("/predict", json={"tasks": "x", "label_config": CONFIG})
    assert r.status_code == 400 and r.json["error"] == "`tasks` must be a list"
    assert client.get("/nowhere").json["error"] and client.get("/nowhere").status_code == 404


def test_predict_answers_413_for_bodies_over_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(server, "MAX_BODY", 1000)
    (tmp_path / "clip.mp4.json").write_text(json.dumps(video_item([box_annotation("a1", end=5)])))
    client = server.create_app(str(tmp_path)).test_client()
    r = client.post("/predict", data=b"{" + b" " * 2000 + b"}", content_type="application/json")
    assert r.status_code == 413 and r.json["error"]


def test_predict_gives_an_item_that_cannot_be_converted_an_empty_list_and_one_log_line(app, caplog):
    client, folder = app
    before = generation(client)
    (folder / "pic.jpg.json").write_text(json.dumps(image_item([])))  # the config has no <Image>
    reindexed(client, before)
    caplog.set_level(logging.INFO)
    results = post_tasks(client, [{"id": 41, "data": {"dataloop_item_id": "img1"}},
                                  {"id": 42, "data": {"dataloop_item_id": "item1"}}])
    assert results[0] == [] and labels(results[1]) == ["car"]
    (line,) = [m for m in messages(caplog, logging.WARNING) if "task 41" in m]
    assert "no prediction" in line and "pic.jpg.json" in line and "Image" in line


def test_predict_answers_a_task_with_an_unknown_id_alone_even_when_its_media_name_matches(app, caplog):
    client, _ = app
    caplog.set_level(logging.INFO)
    results = post_tasks(client, [{"id": 9, "data": {"dataloop_item_id": "other", "video": "s3://b/clip.mp4"}},
                                  {"id": 10, "data": {"dataloop_item_id": "item1"}}])
    assert results[0] == {"result": [], "model_version": "dataloop"} and labels(results[1]) == ["car"]
    assert any("task 9: no item: item id other is not in the source" in m for m in messages(caplog))


def test_predict_gives_a_file_changed_since_indexing_an_empty_list(app, monkeypatch, caplog):
    client, folder = app
    monkeypatch.setattr(server, "RESCAN_SECONDS", 3600.0)  # the index does not see the change
    (folder / "clip.mp4.json").write_text(json.dumps(video_item([box_annotation("a1")], item_id="swapped")))
    assert post_tasks(client, [{"id": 1, "data": {"dataloop_item_id": "item1"}}]) == [[]]
    (folder / "clip.mp4.json").write_text("{")
    assert post_tasks(client, [{"id": 1, "data": {"dataloop_item_id": "item1"}}]) == [[]]


# ----------------------------------------------------------------------------- identity


@pytest.fixture
def two_cams(tmp_path, monkeypatch):
    monkeypatch.setattr(server, "RESCAN_SECONDS", 0.0)
    for cam, label in (("cam1", "car"), ("cam2", "bus")):
        item = video_item([box_annotation("a1", label=label, end=5)], item_id=f"{cam}-id")
        item["filename"] = f"/{cam}/clip.mp4"
        (tmp_path / f"{cam}.json").write_text(json.dumps(item))
    return server.create_app(str(tmp_path)).test_client()


def test_identity_is_the_item_id_else_the_longest_shared_path_suffix(two_cams):
    results = post_tasks(two_cams, [
        {"data": {"video": "s3://bucket/cam2/clip.mp4"}},
        {"data": {"video": "/data/local-files/?d=exports/cam1/clip.mp4"}},
        {"data": {"video": "https://host/x/clip.mp4", "dataloop_filename": "/cam2/clip.mp4"}},
        {"data": {"video": "s3://bucket/cam2/clip.mp4", "dataloop_item_id": "cam1-id"}},
        {"data": {"video": "s3://bucket/cam3/other.mp4"}},
    ])
    assert [labels(r) for r in results] == [["bus"], ["car"], ["bus"], ["car"], []]


def test_identity_two_equally_good_items_mean_no_match_logged_with_both_names(two_cams, caplog):
    caplog.set_level(logging.INFO)
    assert post_tasks(two_cams, [{"id": 5, "data": {"video": "s3://bucket/clip.mp4"}}]) == [[]]
    (line,) = [m for m in messages(caplog, logging.WARNING) if "task 5" in m]
    assert "/cam1/clip.mp4" in line and "/cam2/clip.mp4" in line and "equally well" in line


# ----------------------------------------------------------------------------- the source index


def test_index_never_raises_and_health_counts_unreadable_entries(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(server, "RESCAN_SECONDS", 0.0)
    caplog.set_level(logging.INFO)
    (tmp_path / "clip.mp4.json").write_text(json.dumps(video_item([box_annotation("a1", end=5)])))
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "deep.json").write_text("[" * 100_000)
    client = server.create_app(str(tmp_path)).test_client()
    health = client.get("/health").json
    assert health["status"] == "UP" and health["items"] == 1 and health["unreadable"] == 3

    real = server.iter_items

    def reader_with_a_bug(path, *args, **kwargs):  # fails the whole folder: then each file is read alone
        for entry in real(path, *args, **kwargs):
            if entry.origin.endswith("later.json"):
                raise RuntimeError("a reader bug")
            yield entry

    monkeypatch.setattr(server, "iter_items", reader_with_a_bug)
    before = generation(client)
    (tmp_path / "later.json").write_text("{}")
    reindexed(client, before)
    assert labels(post_tasks(client, [{"data": {"dataloop_item_id": "item1"}}])[0]) == ["car"]
    assert client.get("/health").json["unreadable"] == 4
    before = generation(client)
    (tmp_path / "new.json").write_text("nonsense")
    reindexed(client, before)
    assert labels(post_tasks(client, [{"data": {"dataloop_item_id": "item1"}}])[0]) == ["car"]
    assert client.get("/health").json["unreadable"] == 5
    unreadable = [m for m in messages(caplog, logging.WARNING) if m.startswith("unreadable:")]
    assert len(unreadable) == 5 and sum("broken.json" in m for m in unreadable) == 1  # each once
    assert any("later.json" in m and "a reader bug" in m for m in unreadable)


def test_input_in_log_lines_has_control_characters_escaped(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(server, "RESCAN_SECONDS", 0.0)
    caplog.set_level(logging.DEBUG)
    (tmp_path / "clip.mp4.json").write_text(json.dumps(video_item([box_annotation("a1", end=5)])))
    (tmp_path / "evil\n\x1b[31mdl2ls: all good\x1b[0m.json").write_text("{")
    client = server.create_app(str(tmp_path)).test_client()
    post_tasks(client, [{"id": "7\nforged line", "data": "x"},
                        {"id": 8, "data": {"dataloop_item_id": "\x1b[2Jx\nnope", "video": "s3://b/clip.mp4"}}])
    client.post("/webhook", json={"action": "A\nforged\x1b[0m"})
    lines = messages(caplog, logging.DEBUG)
    assert any("evil" in m for m in lines) and any("forged" in m for m in lines)
    assert not [m for m in lines if "\n" in m or "\x1b" in m]
