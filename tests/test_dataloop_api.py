"""The Dataloop client and `dl2ls fetch` against the local stand-in of Dataloop's REST API
(tests/dataloop_standin.py): paging, the export command, auth, retries and faults."""

from __future__ import annotations

import json
import time

import pytest

from conftest import SAMPLES, assert_frame_exact
from dataloop_standin import DataloopStandIn, make_jwt
from dl2ls.cli import main
from dl2ls.dataloop.api import DataloopClient, DataloopError

TRACKER = json.loads((SAMPLES / "video_tracker_webm_2024.json").read_text())
IMAGE = json.loads((SAMPLES / "image_box_point_class.json").read_text())


def sample_item(i: int, image: bool = False) -> dict:
    item = json.loads(json.dumps(IMAGE if image else TRACKER))
    item["id"] = f"{i:024x}"
    item["dir"] = "/cam1" if i % 2 else "/cam2"
    item["name"] = f"clip{i}.{'jpg' if image else 'webm'}"
    item["filename"] = f"{item['dir']}/{item['name']}"
    for k, ann in enumerate(item["annotations"]):
        ann["id"] = f"{i:020x}{k:04x}"
        ann["itemId"] = item["id"]
    return item


@pytest.fixture
def standin():
    server = DataloopStandIn().start()
    for i in range(7):
        server.put_item("ds1", sample_item(i, image=(i == 6)))
    yield server
    server.stop()


@pytest.fixture
def env(standin, monkeypatch):
    monkeypatch.setenv("DATALOOP_API_URL", standin.url)
    monkeypatch.setenv("DATALOOP_API_KEY", standin.api_key)
    for key in ("DATALOOP_USERNAME", "DATALOOP_PASSWORD"):
        monkeypatch.delenv(key, raising=False)
    return standin


def test_query_pages_by_key_like_dtlpy(env):
    client = DataloopClient(backoff=0.01)
    ids = [item["id"] for item in client.query("ds1", page_size=3)]
    assert ids == sorted(env.datasets["ds1"]) and len(ids) == 7
    assert env.requests["/api/v1/datasets/<dataset_id>/query"] == 3  # 3 + 3 + 1, no empty page
    newer = [{"updatedAt": {"$gt": "2000-01-01T00:00:00.000Z"}}, {"dir": "/cam1"}]
    assert len(list(client.query("ds1", newer))) == 3


def test_retries_429_503_and_a_dropped_connection_then_succeeds(env):
    env.faults = [("429", 0.05), ("503",), ("drop",)]
    client = DataloopClient(backoff=0.01)
    t = time.monotonic()
    assert client.me()["email"] == "tester@example.com"
    assert client.counters.retries == 3 and client.counters.requests == 4
    assert time.monotonic() - t >= 0.05  # Retry-After was honoured


def test_gives_up_after_a_bounded_wait_with_one_line(env):
    env.faults = [("503",)] * 50
    client = DataloopClient(backoff=0.01, max_wait=0.2)
    with pytest.raises(DataloopError) as err:
        client.dataset("ds1")
    assert "gave up after" in str(err.value) and "HTTP 503" in str(err.value)
    assert env.api_key not in str(err.value)


@pytest.mark.parametrize("key, message", [
    ("not-a-jwt", "401 unauthorized"),
    (make_jwt(time.time() - 10), "DATALOOP_API_KEY has expired"),
])
def test_bad_keys_are_one_line_and_never_echoed(env, key, message):
    client = DataloopClient(api_key=key, backoff=0.01)
    with pytest.raises(DataloopError, match=message) as err:
        client.me()
    assert key not in str(err.value)


def test_missing_dataset_and_item_are_404_lines(env):
    client = DataloopClient(backoff=0.01)
    with pytest.raises(DataloopError, match="dataset nope: 404 not found"):
        client.dataset("nope")
    with pytest.raises(DataloopError, match="item x: 404"):
        client.item("x")


def test_password_login_renews_an_expired_session(env, monkeypatch):
    monkeypatch.delenv("DATALOOP_API_KEY")
    client = DataloopClient(username="tester@example.com", password="pw", backoff=0.01)
    client.me()
    first = client._token
    env.expire_next.add(first)  # the server expires the session under us
    assert client.item(sorted(env.datasets["ds1"])[0])["id"]
    assert client._token != first and env.requests["/token"] == 2
    with pytest.raises(DataloopError, match="refused DATALOOP_USERNAME"):
        DataloopClient(username="tester@example.com", password="wrong", api_key="").me()


def test_export_command_is_polled_then_downloaded(env):
    env.export_polls = 3
    client = DataloopClient(backoff=0.01, poll_schedule=(0.01,))
    items = json.loads(client.export("ds1", [{"dir": "/cam2"}]))
    assert sorted(i["id"] for i in items) == sorted(k for k, v in env.datasets["ds1"].items() if v["dir"] == "/cam2")
    assert env.requests["/api/v1/commands/<cid>"] == 3 and all(i["annotations"] for i in items)


@pytest.mark.parametrize("method", ["export", "query"])
def test_fetch_writes_an_export_folder_that_converts_frame_exact(env, tmp_path, capsys, monkeypatch, method):
    from dl2ls.dataloop import api

    monkeypatch.setattr(api, "POLL_SCHEDULE", (0.01,))
    monkeypatch.setattr(DataloopClient.__init__, "__defaults__",
                        (None, None, None, None, 60.0, 300.0, (0.01,), 0.01))
    out = tmp_path / "export"
    assert main(["fetch", "--dataset", "ds1", "-o", str(out), "--method", method]) == 0
    err = capsys.readouterr().err
    assert "fetched 7 items" in err and env.api_key not in err
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.json"))
    assert files[0] == "json/cam1/clip1.webm.json" and len(files) == 7
    tasks = tmp_path / "tasks.json"
    assert main(["convert", str(out / "json" / "cam2"), "-o", str(tasks)]) == 0
    converted = json.loads(tasks.read_text())
    assert len(converted) == 4  # clips 0, 2, 4 and the image 6
    fetched = json.loads((out / "json" / "cam2" / "clip0.webm.json").read_text())
    for ann in fetched["annotations"]:
        task = next(t for t in converted if t["data"]["dataloop_item_id"] == fetched["id"])
        assert_frame_exact(ann, task, fps=25, width=1280, height=720)


def test_fetch_keeps_hostile_remote_names_inside_the_folder(env, tmp_path, capsys):
    item = sample_item(99)
    item["filename"] = "/../../../etc/evil.webm"
    env.put_item("ds1", item)
    env.export_polls = 0
    out = tmp_path / "export"
    assert main(["fetch", "--dataset", "ds1", "-o", str(out)]) == 0
    capsys.readouterr()
    assert (out / "json" / "etc" / "evil.webm.json").exists()
    assert not (tmp_path.parent / "etc").exists()


def test_fetch_without_credentials_is_a_usage_line(monkeypatch, tmp_path, capsys):
    for key in ("DATALOOP_API_KEY", "DATALOOP_USERNAME", "DATALOOP_PASSWORD"):
        monkeypatch.delenv(key, raising=False)
    assert main(["fetch", "--dataset", "ds1", "-o", str(tmp_path)]) == 2
    assert "no Dataloop credentials" in capsys.readouterr().err


def test_retry_after_zero_does_not_spin_forever(env):
    env.faults = [("429", 0)] * 100
    client = DataloopClient(backoff=0.01, max_wait=60)
    t = time.monotonic()
    with pytest.raises(DataloopError, match="gave up after 12 attempts"):
        client.me()
    assert time.monotonic() - t < 5
