"""The Dataloop client and `dl2ls fetch` against the local stand-in of Dataloop's REST API
(tests/dataloop_standin.py): paging, the export command, auth, retries and faults."""

from __future__ import annotations

import json
import os
import time
import tracemalloc

import pytest
import requests

from conftest import SAMPLES, assert_frame_exact
from dataloop_standin import DataloopStandIn, make_jwt
from dl2ls.cli import main
from dl2ls.dataloop.api import DataloopClient, DataloopError, item_key

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
    assert main(["convert", str(out / "json" / "cam2"), "-o", str(tasks), "--kind", "video"]) == 0
    converted = json.loads(tasks.read_text())
    assert len(converted) == 3  # clips 0, 2, 4 (the image 6 is of the other kind)
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


# ----------------------------------------------------------------------------- rules for bad answers and settings


def test_rule_an_api_url_without_a_scheme_is_one_line_at_construction(env, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("DATALOOP_API_URL", "gate.dataloop.ai/api/v1")
    with pytest.raises(DataloopError, match="not an http\\(s\\) URL") as err:
        DataloopClient()
    assert "\n" not in str(err.value) and env.api_key not in str(err.value)
    assert main(["fetch", "--dataset", "ds1", "-o", str(tmp_path)]) == 2
    out = capsys.readouterr().err
    assert "Traceback" not in out and "DATALOOP_API_URL 'gate.dataloop.ai/api/v1'" in out
    monkeypatch.setenv("DATALOOP_API_URL", "https://user:secret@host:port/api/v1")
    with pytest.raises(DataloopError) as err:
        DataloopClient()
    assert "secret" not in str(err.value)


@pytest.mark.parametrize("exc", [
    requests.exceptions.InvalidURL, requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema,
    requests.exceptions.ContentDecodingError, requests.exceptions.TooManyRedirects,
    requests.exceptions.InvalidHeader, requests.exceptions.RequestException, requests.exceptions.ChunkedEncodingError,
])
def test_rule_every_requests_exception_is_one_line_without_the_token(env, monkeypatch, exc):
    client = DataloopClient(backoff=0.001, max_wait=0.05)

    def fail(*args, **kwargs):
        raise exc(f"boom\nwith the header Bearer {env.api_key}")

    monkeypatch.setattr(client.session, "request", fail)
    with pytest.raises(DataloopError) as err:
        client.dataset("ds1")
    message = str(err.value)
    assert "\n" not in message and env.api_key not in message
    assert exc.__name__ in message


def test_rule_a_body_that_is_not_json_or_too_deep_is_one_line(env, monkeypatch):
    client = DataloopClient(backoff=0.01)
    for body in (b"<html>", b"[" * 100_000 + b"]" * 100_000):
        response = requests.Response()
        response.status_code, response._content = 200, body
        monkeypatch.setattr(client, "_send", lambda *a, **k: response)
        with pytest.raises(DataloopError, match="no readable JSON"):
            client.dataset("ds1")


def test_rule_item_key_is_id_else__id():
    assert item_key({"id": "a", "_id": "b"}) == "a"
    assert item_key({"_id": "b"}) == "b"
    assert item_key({"id": "", "_id": "b"}) == "b"
    assert item_key({"name": "x"}) is None and item_key({"id": 5}) is None and item_key("x") is None


def test_rule_query_pages_by_has_next_page_when_the_server_caps_page_sizes(env):
    env.page_cap = 2  # whatever pageSize asks
    client = DataloopClient(backoff=0.01)
    ids = [item["id"] for item in client.query("ds1", page_size=5)]
    assert ids == sorted(env.datasets["ds1"])  # all 7, though every page was "short"
    assert env.requests["/api/v1/datasets/<dataset_id>/query"] == 4


@pytest.mark.parametrize("omitted, requests_made", [
    ({"hasNextPage"}, 4),  # totalPagesCount says whether there is more
    ({"hasNextPage", "totalPagesCount"}, 5),  # neither: until an empty page
])
def test_rule_query_pages_without_has_next_page(env, omitted, requests_made):
    env.page_cap, env.omit_page_fields = 2, omitted
    client = DataloopClient(backoff=0.01)
    assert len(list(client.query("ds1", page_size=5))) == 7
    assert env.requests["/api/v1/datasets/<dataset_id>/query"] == requests_made


def id_only(i: int) -> dict:
    item = sample_item(i)
    item["_id"] = item.pop("id")
    return item


@pytest.mark.parametrize("method", ["export", "query"])
def test_rule_items_with_only__id_are_fetched_and_those_with_no_id_skipped(env, tmp_path, capsys, method):
    env.page_cap = 3
    env.export_polls = 0
    for i in (20, 21):
        env.put_item("ds1", id_only(i))
    nameless = sample_item(22)
    del nameless["id"]
    env.put_item("ds1", nameless)
    client = DataloopClient(backoff=0.01)
    keys = [item_key(item) for item in client.query("ds1", page_size=3)]
    assert keys == sorted(k for k in env.datasets["ds1"] if k) and client.counters.skipped == 1
    out = tmp_path / "export"
    code = main(["fetch", "--dataset", "ds1", "-o", str(out), "--method", method])
    err = capsys.readouterr().err
    assert "Traceback" not in err and "fetched 9 items" in err and "1 skipped" in err
    assert code == 1  # something was left out: say so
    assert json.loads((out / "json" / "cam2" / "clip20.webm.json").read_text())["_id"] == f"{20:024x}"
    assert main(["convert", str(out / "json" / "cam2" / "clip20.webm.json"), "-o", str(tmp_path / "t.json")]) == 0
    (task,) = json.loads((tmp_path / "t.json").read_text())
    assert task["data"]["dataloop_item_id"] == f"{20:024x}"


def test_rule_fetch_reports_and_skips_a_bad_export_element_and_goes_on(env, tmp_path, capsys):
    good = [json.dumps(sample_item(i)).encode() for i in (30, 31)]
    env.export_body = b"[" + b", ".join([
        good[0],
        b'{"id": }',  # not JSON
        b'{"name": "x.mp4", "annotations": []}',  # no id at all
        b'{"id": "s", "filename": "/clip\\udc80.mp4", "annotations": []}',  # a lone surrogate
        b'{"id": "d", "annotations": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}",  # nested too deeply
        b'{"id": "u", "filename": "/clip\xff.mp4", "annotations": []}',  # not UTF-8
        good[1],
    ]) + b"]"
    env.export_polls = 0
    out = tmp_path / "export"
    assert main(["fetch", "--dataset", "ds1", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "skipped export element" in line]
    assert [line.split("element ")[1].split(" ")[0].rstrip(":") for line in lines] == ["1", "2", "3", "4", "5"]
    assert "Traceback" not in err and "fetched 2 items" in err
    assert sorted(p.name for p in out.rglob("*.json")) == ["clip30.webm.json", "clip31.webm.json"]


def test_rule_a_truncated_export_is_one_line_after_the_items_before(env, tmp_path, capsys):
    env.export_body = (b"[" + json.dumps(sample_item(40)).encode() + b", " + json.dumps(sample_item(41)).encode()[:-30])
    env.export_polls = 0
    out = tmp_path / "export"
    assert main(["fetch", "--dataset", "ds1", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "not a JSON array of items: truncated" in err
    assert [p.name for p in out.rglob("*.json")] == ["clip40.webm.json"]


def test_rule_export_items_streams_through_a_file_that_is_gone_however_it_ends(env, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    env.export_polls = 0
    client = DataloopClient(backoff=0.01)
    ids = [json.loads(e.data)["id"] for e in client.export_items("ds1")]
    assert sorted(ids) == sorted(env.datasets["ds1"])
    it = client.export_items("ds1")
    next(it)
    assert list(tmp_path.iterdir()) == []  # unlinked at once: not even a kill leaves it behind
    held = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd") if _is_link(fd)]
    assert any(str(tmp_path) in link for link in held)
    it.close()  # the caller stops early
    held = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd") if _is_link(fd)]
    assert not any(str(tmp_path) in link for link in held)


def _is_link(fd: str) -> bool:
    try:
        os.readlink(f"/proc/self/fd/{fd}")
        return True
    except OSError:
        return False


def test_rule_export_items_memory_follows_the_largest_item(env):
    items = []
    for i in range(40):
        item = sample_item(i)
        item["description"] = "x" * (1 << 20)
        items.append(item)
    env.export_body = json.dumps(items).encode()  # 40 MB, prepared before measuring
    del items
    env.export_polls = 0
    client = DataloopClient(backoff=0.01)
    tracemalloc.start()
    try:
        count = sum(1 for element in client.export_items("ds1") if element.data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 40
    assert peak < 16 << 20, f"peak {peak / (1 << 20):.1f} MiB for 1 MB items"


def test_rule_export_elements_over_the_item_limit_come_with_a_reason(env):
    from dl2ls.dataloop.read import ReadLimits

    env.export_polls = 0
    client = DataloopClient(backoff=0.01)
    elements = list(client.export_items("ds1", limits=ReadLimits(max_item_bytes=1000)))
    assert len(elements) == 7 and all(e.data is None and "--max-item-size" in e.error for e in elements)
