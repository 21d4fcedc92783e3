"""The service's parts without Label Studio: extra params, project ids, Dataloop hook bodies, the
job list and scheduler in SQLite (two workers, two processes), the Flask routes, and the
stand-in's outgoing trigger webhooks. Fast: no Label Studio, no job ever runs."""

from __future__ import annotations

import json
import logging
import multiprocessing
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import box_annotation, video_item
from dataloop_standin import DataloopStandIn
from dl2ls import server, service
from dl2ls.server import dataloop_resource
from dl2ls.service import (DEFAULT_EVERY, JOB_ATTEMPTS, ParamsError, ProjectParams, ServiceDB, parse_params,
                           project_id_of)
from service_harness import CONFIG

SECRET = "s3cret"


# ----------------------------------------------------------------------------- parse_params


@pytest.mark.parametrize("extra, check", [
    (None, lambda p: p == ProjectParams()),
    ("", lambda p: p == ProjectParams()),
    ({}, lambda p: p == ProjectParams()),
    ({"dataset": "ds1"}, lambda p: p.dataset == "ds1" and p.sync_every == DEFAULT_EVERY),
    ('{"dataset": "ds1", "match": "item-id"}', lambda p: p.dataset == "ds1" and p.match == "item-id"),
    ({"dataset": "ds1", "filter": {"dir": "/a"}}, lambda p: p.filters == ({"dir": "/a"},)),
    ({"dataset": "ds1", "filter": [{"dir": "/a"}, {"hidden": False}]}, lambda p: len(p.filters) == 2),
    ({"label_map": {"car": "vehicle", "bus": "vehicle"}},
     lambda p: p.label_map == (("bus", "vehicle"), ("car", "vehicle"))),
    ({"model_version": "dl-{source}-{dataset_id}"}, lambda p: p.model_version == "dl-{source}-{dataset_id}"
     and p.shown_version() == "dl-human-"),
    ({"match": "filename"}, lambda p: p.match == "filename"),
    ({"sync_every": "15m"}, lambda p: p.sync_every == 900),
    ({"sync_every": 90}, lambda p: p.sync_every == 90),
    ({"sync_every": "2h"}, lambda p: p.sync_every == 7200),
    ({"sync_every": " 30 s "}, lambda p: p.sync_every == 30),
    ({"sync_every": 1.5}, lambda p: p.sync_every == 1.5),
])
def test_parse_params_good(extra, check):
    assert check(parse_params(extra))


def test_parse_params_defaults_come_from_the_environment_unless_given():
    assert parse_params({}, default_dataset="envds", default_version="v9") == ProjectParams("envds", model_version="v9")
    assert parse_params({"dataset": "mine"}, default_dataset="envds").dataset == "mine"
    assert parse_params({"dataset": None}, default_dataset="envds").dataset is None  # said explicitly


@pytest.mark.parametrize("extra, names", [
    ("{not json", "extra params"),
    ("[1, 2]", "extra params"),
    ([{"dataset": "ds1"}], "extra params"),
    (42, "extra params"),
    ({"datasett": "ds1"}, "datasett"),
    ({"dataset": "ds1", "zzz": 1}, "zzz"),
    ({"dataset": "has space"}, "dataset"),
    ({"dataset": "../etc"}, "dataset"),
    ({"dataset": 12}, "dataset"),
    ({"dataset": "x" * 65}, "dataset"),
    ({"filter": "dir = /a"}, "filter"),
    ({"filter": [{"dir": "/a"}, "x"]}, "filter"),
    ({"label_map": ["car"]}, "label_map"),
    ({"label_map": {"car": 1}}, "label_map"),
    ({"model_version": 3}, "model_version"),
    ({"model_version": "dl-{nope}"}, "model_version"),
    ({"model_version": "dl-{source"}, "model_version"),
    ({"match": "fuzzy"}, "match"),
    ({"sync_every": "0"}, "sync_every"),
    ({"sync_every": 0}, "sync_every"),
    ({"sync_every": "abc"}, "sync_every"),
    ({"sync_every": "15 minutes"}, "sync_every"),
    ({"sync_every": -5}, "sync_every"),
    ({"sync_every": True}, "sync_every"),
    ({"sync_every": None}, "sync_every"),
    ({"sync_every": "8d"}, "sync_every"),
    ({"sync_every": 8 * 86400}, "sync_every"),
    ({"sync_every": float("nan")}, "sync_every"),
])
def test_parse_params_bad_names_the_key(extra, names):
    with pytest.raises(ParamsError) as caught:
        parse_params(extra)
    message = str(caught.value)
    assert names in message and "\n" not in message


def test_parse_params_unknown_field_in_model_version_is_named():
    with pytest.raises(ParamsError, match=r"model_version.*\{nope\}"):
        parse_params({"model_version": "dl-{nope}"})


def test_parse_params_message_escapes_what_the_user_typed():
    with pytest.raises(ParamsError) as caught:
        parse_params({"bad\nkey\x1b[31m": 1})
    assert "\n" not in str(caught.value) and "\x1b" not in str(caught.value)


# ----------------------------------------------------------------------------- project_id_of


@pytest.mark.parametrize("ref, expected", [
    ("12.1700000000", 12),
    ("12", 12),
    (12, 12),
    ({"id": 12}, 12),
    ({"id": "12.1700000000"}, 12),
    ({"title": "no id"}, None),
    ("abc", None),
    ("", None),
    ("-1.17", None),
    ("0.17", None),
    (True, None),
    (False, None),
    (-1, None),
    (0, None),
    (None, None),
    (12.0, None),
    ([12], None),
    ("9" * 30, None),
])
def test_project_id_of(ref, expected):
    assert project_id_of(ref) == expected


@pytest.mark.parametrize("ref", ["²", "12².17"])
def test_project_id_of_non_ascii_digits_is_no_id(ref):
    assert project_id_of(ref) is None


# ----------------------------------------------------------------------------- dataloop_resource


ANNOTATION = {"id": "ann1", "itemId": "item1", "datasetId": "ds1", "type": "box", "label": "car"}
ITEM = {"id": "item1", "datasetId": "ds1", "type": "file", "filename": "/clip.mp4"}


@pytest.mark.parametrize("body, item, dataset, says", [
    (ANNOTATION, "item1", "ds1", "annotation ann1 of item item1"),
    (dict(ANNOTATION, datasetId=None), "item1", None, "annotation ann1"),
    (ITEM, "item1", "ds1", "item item1"),
    ({"id": "item1", "type": "file"}, "item1", None, "item item1"),
    ({"input": ANNOTATION}, "item1", "ds1", "annotation ann1"),
    ({"resource": ITEM}, "item1", "ds1", "item item1"),
    ({"data": ANNOTATION, "event": "updated"}, "item1", "ds1", "annotation ann1"),
    ({"annotation": ANNOTATION}, "item1", "ds1", "annotation ann1"),
])
def test_dataloop_resource_reads_the_resource(body, item, dataset, says):
    got = dataloop_resource(body)
    assert got[:2] == (item, dataset)
    assert says in got[2]


@pytest.mark.parametrize("body", [
    [ANNOTATION], "item1", None, {}, 42, {"id": 5, "datasetId": 7}, {"input": "x"}, {"id": "exec1"},
    {"itemId": 12}, {"input": {"input": ANNOTATION}},
])
def test_dataloop_resource_garbage_means_every_project(body):
    item, dataset, says = dataloop_resource(body)
    assert (item, dataset) == (None, None)
    assert isinstance(says, str) and "cannot read" in says


def test_dataloop_resource_escapes_ids_for_the_log():
    item, _, says = dataloop_resource({"itemId": "i\n1", "id": "a\x1b[2J"})
    assert item == "i\n1" and "\n" not in says and "\x1b" not in says


# ----------------------------------------------------------------------------- ServiceDB


@pytest.fixture
def db(tmp_path):
    return ServiceDB(tmp_path / "svc.sqlite3")


def always(_owner: str) -> bool:
    return True


def never(_owner: str) -> bool:
    return False


def job_rows(db: ServiceDB, where: str = "1") -> list[tuple]:
    return db.connect().execute(f"SELECT id, kind, project_id, state, payload, attempts FROM jobs WHERE {where} "
                                "ORDER BY id").fetchall()


def test_enqueue_merges_a_queued_job_of_the_same_kind_and_project(db):
    first = db.enqueue("preannotate", 1, {"task_ids": [3, 1], "tasks": [{"id": 3, "data": {"v": "old"}}]})
    second = db.enqueue("preannotate", 1, {"task_ids": [2, 3], "tasks": [{"id": 3, "data": {"v": "new"}},
                                                                        {"id": 2, "data": {"v": "b"}}]})
    other_project = db.enqueue("preannotate", 2, {"task_ids": [9]})
    other_kind = db.enqueue("sync", 1)
    assert first == second and len({first, other_project, other_kind}) == 3
    rows = job_rows(db)
    assert [(r[1], r[2], r[3]) for r in rows] == [("preannotate", 1, "queued"), ("preannotate", 2, "queued"),
                                                   ("sync", 1, "queued")]
    assert json.loads(rows[0][4]) == {"task_ids": [1, 2, 3], "tasks": [{"id": 2, "data": {"v": "b"}},
                                                                      {"id": 3, "data": {"v": "new"}}]}
    assert db.counts() == {"queued": 3}


def test_a_running_job_does_not_take_new_work_a_new_job_is_queued_beside_it(db):
    db.enqueue("preannotate", 1, {"task_ids": [1]})
    job = db.claim("w:1", always)
    assert job.payload == {"task_ids": [1]}
    db.enqueue("preannotate", 1, {"task_ids": [2]})
    assert [(r[3], json.loads(r[4])) for r in job_rows(db)] == [("running", {"task_ids": [1]}),
                                                                 ("queued", {"task_ids": [2]})]


def test_claim_runs_at_most_one_job_per_project(db):
    db.enqueue("sync", 1)
    db.enqueue("preannotate", 1, {"task_ids": [5]})
    db.enqueue("sync", 2)
    first = db.claim("w:1", always)
    assert (first.kind, first.project_id, first.attempts) == ("preannotate", 1, 1)  # by priority
    second = db.claim("w:2", always)
    assert (second.kind, second.project_id) == ("sync", 2)  # project 1 is busy; project 2 is not
    assert db.claim("w:3", always) is None  # project 1's sync waits for its pre-annotation
    assert db.finish(first, "w:1") == "done"
    third = db.claim("w:3", always)
    assert (third.kind, third.project_id) == ("sync", 1)
    assert db.claim("w:1", always) is None


def test_a_job_whose_worker_died_is_queued_again_and_claimed(db, caplog):
    db.enqueue("sync", 1, reason="test")
    job = db.claim("host:111", always)
    assert db.claim("host:222", always) is None  # its owner lives: the project stays busy
    again = db.claim("host:222", never)  # now its owner is gone
    assert again is not None and again.id == job.id and again.attempts == 2
    assert job_rows(db, "state = 'running'")[0][0] == job.id
    assert "stopped mid-job" in caplog.text


def test_a_dead_workers_job_merges_into_its_queued_twin(db):
    db.enqueue("preannotate", 1, {"task_ids": [1]})
    dead = db.claim("host:111", always)
    db.enqueue("preannotate", 1, {"task_ids": [2]})
    again = db.claim("host:222", never)
    assert again.id != dead.id and again.payload["task_ids"] == [1, 2]
    assert dict((r[0], r[3]) for r in job_rows(db)) == {dead.id: "superseded", again.id: "running"}


def test_an_expired_lease_is_claimed_again_even_if_the_owner_lives(db):
    db.enqueue("sync", 1)
    job = db.claim("host:111", always)
    db.connect().execute("UPDATE jobs SET lease_until = ? WHERE id = ?", (time.time() - 1, job.id))
    assert db.claim("host:222", always).id == job.id


def test_finish_with_an_error_retries_with_a_backoff_then_fails(db):
    db.enqueue("sync", 1)
    waits = []
    for attempt in range(1, JOB_ATTEMPTS + 1):
        job = db.claim("w:1", always)
        assert job is not None and job.attempts == attempt
        outcome = db.finish(job, "w:1", f"boom {attempt}")
        state, not_before, error = db.connect().execute(
            "SELECT state, not_before, error FROM jobs WHERE id = ?", (job.id,)).fetchone()
        assert error == f"boom {attempt}"
        if attempt < JOB_ATTEMPTS:
            assert outcome.startswith("retried in") and state == "queued"
            waits.append(not_before - time.time())
            assert db.claim("w:1", always) is None  # not before its backoff
            db.connect().execute("UPDATE jobs SET not_before = 0 WHERE id = ?", (job.id,))  # time passes
        else:
            assert outcome == "failed" and state == "failed"
    assert all(w > 0 for w in waits) and waits == sorted(waits)  # it backs off more each time
    assert db.claim("w:1", always) is None
    assert db.counts() == {"failed": 1}


def test_finish_after_losing_the_lease_leaves_the_new_owners_job_alone(db):
    db.enqueue("sync", 1)
    stalled = db.claim("h:1", always)
    db.connect().execute("UPDATE jobs SET lease_until = 0 WHERE id = ?", (stalled.id,))  # no heartbeat for 30 s
    assert db.claim("h:2", always).id == stalled.id  # another worker takes it over
    db.finish(stalled, "h:1", "boom")  # the stalled worker comes back with an error
    db.connect().execute("UPDATE jobs SET not_before = 0")
    assert db.claim("h:3", always) is None  # project 1 is h:2's: never two jobs at once


def test_finish_with_an_error_beside_a_queued_twin_leaves_the_work_to_it(db):
    db.enqueue("sync", 1)
    job = db.claim("w:1", always)
    twin = db.enqueue("sync", 1)
    assert db.finish(job, "w:1", "boom") == "superseded"
    assert dict((r[0], r[3]) for r in job_rows(db)) == {job.id: "superseded", twin: "queued"}


def _project(db: ServiceDB, project_id: int, every: float, due_at: float) -> None:
    params = ProjectParams(dataset="ds1", sync_every=every)
    assert db.setup(project_id, f"{project_id}.1", None, None, params, None, CONFIG)
    db.note(project_id, next_sync=due_at)


def test_setup_again_with_the_same_body_changes_nothing(db):
    params = ProjectParams(dataset="ds1")
    assert db.setup(1, "1.1", "http://ls", "tok", params, None, CONFIG)
    assert not db.setup(1, "1.1", "http://ls", "tok", params, None, CONFIG)
    assert db.setup(1, "1.1", "http://ls", "tok2", params, None, CONFIG)
    row = db.projects(ProjectParams())[1]
    assert (row.params, row.token, row.hostname) == (params, "tok2", "http://ls")


def test_due_syncs_two_workers_at_once_each_project_once(tmp_path):
    path = tmp_path / "svc.sqlite3"
    workers = [ServiceDB(path), ServiceDB(path)]  # two gunicorn workers on one file
    for p in (1, 2, 3):
        _project(workers[0], p, 60.0, time.time() - 1)
    for _ in range(5):
        barrier = threading.Barrier(len(workers))
        got: list[list[int]] = [[] for _ in workers]

        def call(n):
            barrier.wait()
            got[n] = workers[n].due_syncs(lambda p: 60.0)

        threads = [threading.Thread(target=call, args=(n,)) for n in range(len(workers))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert sorted(got[0] + got[1]) == [1, 2, 3]  # across both: each project exactly once
        assert workers[0].due_syncs(lambda p: 60.0) == [] == workers[1].due_syncs(lambda p: 60.0)
        next_sync = workers[1].connect().execute("SELECT MIN(next_sync) FROM projects").fetchone()[0]
        assert next_sync > time.time() + 50  # moved on by one interval
        for p in (1, 2, 3):
            workers[0].note(p, next_sync=time.time() - 1)  # due again for the next round


def _due_worker(path: str, ready, go, start_at, out) -> None:
    """A gunicorn worker's scheduler, in its own process: due_syncs as often as it can for 3 s."""
    from pathlib import Path

    db = ServiceDB(Path(path))
    ready.release()
    go.wait(30)
    while time.time() < start_at.value:
        time.sleep(0.005)
    due = 0
    while time.time() < start_at.value + 3.0:
        due += len(db.due_syncs(lambda p: 1.0))
        time.sleep(0.01)
    out.put(due)


def test_due_syncs_from_two_processes_one_sync_per_interval(tmp_path):
    path = tmp_path / "svc.sqlite3"
    db = ServiceDB(path)
    ctx = multiprocessing.get_context("spawn")
    out, ready, go, start_at = ctx.Queue(), ctx.Semaphore(0), ctx.Event(), ctx.Value("d", 0.0)
    procs = [ctx.Process(target=_due_worker, args=(str(path), ready, go, start_at, out)) for _ in range(2)]
    for proc in procs:
        proc.start()
    for _ in procs:
        assert ready.acquire(timeout=30), "a worker process did not start"
    start_at.value = time.time() + 0.2
    _project(db, 1, 1.0, start_at.value)  # due when both begin, then every second
    go.set()
    counts = [out.get(timeout=30) for _ in procs]
    for proc in procs:
        proc.join(10)
        assert proc.exitcode == 0
    # due at 0, ~1, ~2 (and ~3 when the jitter brings it in before the end): never twice a slot
    assert 3 <= sum(counts) <= 4, counts


# ----------------------------------------------------------------------------- the routes


@pytest.fixture
def service_app(tmp_path, monkeypatch):
    for key in ("DL2LS_SOURCE", "DL2LS_DATASET", "BASIC_AUTH_USER", "BASIC_AUTH_PASS", "LABEL_STUDIO_URL",
                "LABEL_STUDIO_API_KEY", "DL2LS_PUBLIC_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("DL2LS_NO_RUNNER", "1")
    monkeypatch.setenv("DL2LS_DATALOOP_HOOK_SECRET", SECRET)
    monkeypatch.setenv("DATALOOP_API_KEY", "x")
    # DL2LS_NO_RUNNER keeps create_app from starting the runner, but the before_request hook starts
    # it at the first request anyway (see the report): no job may run in these tests
    monkeypatch.setattr(service.Service, "start", lambda self: None)
    app = server.create_app(model_dir=str(tmp_path))
    svc = app.extensions["dl2ls.service"]
    return app.test_client(), svc


def setup_project(client, project: str = "3.1700000000", dataset: str = "ds1"):
    r = client.post("/setup", json={"project": project, "schema": CONFIG, "extra_params": {"dataset": dataset}})
    assert r.status_code == 200, r.json
    return r


def queued(svc, kind: str | None = None) -> list[tuple[str, int, dict]]:
    rows = svc.db.connect().execute("SELECT kind, project_id, payload FROM jobs WHERE state = 'queued' "
                                    "ORDER BY id").fetchall()
    return [(k, p, json.loads(payload)) for k, p, payload in rows if kind is None or k == kind]


def test_no_runner_means_no_runner_threads(tmp_path, monkeypatch):
    for key in ("DL2LS_SOURCE", "BASIC_AUTH_USER", "BASIC_AUTH_PASS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("DL2LS_NO_RUNNER", "1")
    monkeypatch.setenv("DATALOOP_API_KEY", "x")
    started = []
    monkeypatch.setattr(service.Service, "start", lambda self: started.append(1))  # no thread really starts
    server.create_app(model_dir=str(tmp_path)).test_client().get("/health")
    assert started == []


def test_setup_records_the_project_and_queues_its_connection(service_app):
    client, svc = service_app
    assert setup_project(client).json == {"model_version": "dataloop"}
    assert queued(svc) == [("connect", 3, {})]
    setup_project(client)  # Label Studio sends /setup again and again: nothing new
    assert queued(svc) == [("connect", 3, {})]
    health = client.get("/health").json
    assert health["mode"] == "service" and health["projects"]["3"]["dataset"] == "ds1"


@pytest.mark.parametrize("extra, says", [
    ({"datasett": "ds1"}, "datasett"),
    ({"dataset": "ds1", "sync_every": "abc"}, "sync_every"),
    ("{broken", "not JSON"),
    ({"dataset": "ds1", "model_version": "{nope}"}, "model_version"),
])
def test_setup_with_bad_extra_params_answers_400_with_the_reason(service_app, extra, says):
    client, svc = service_app
    r = client.post("/setup", json={"project": "4.17", "schema": CONFIG, "extra_params": extra})
    assert r.status_code == 400 and says in r.json["error"]
    assert queued(svc) == []
    svc.refresh()  # the scheduler's tick, once a second in a running service
    assert says in client.get("/health").json["projects"]["4"]["error"]


def test_dataloop_hook_needs_the_secret(service_app, caplog):
    client, svc = service_app
    setup_project(client)
    caplog.set_level(logging.DEBUG)
    assert client.post("/dataloop/webhook", json=ANNOTATION).status_code == 403
    assert client.post("/dataloop/webhook?secret=wrong", json=ANNOTATION).status_code == 403
    assert client.post("/dataloop/webhook", json=ANNOTATION, headers={"X-Dl2ls-Secret": "s3cre"}).status_code == 403
    assert client.post("/dataloop/webhook?secret=", json=ANNOTATION).status_code == 403
    assert queued(svc, "sync") == []
    assert SECRET not in caplog.text


def test_dataloop_hook_off_without_a_secret(tmp_path, monkeypatch):
    for key in ("DL2LS_SOURCE", "DL2LS_DATALOOP_HOOK_SECRET", "BASIC_AUTH_USER", "BASIC_AUTH_PASS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("DL2LS_NO_RUNNER", "1")
    monkeypatch.setenv("DATALOOP_API_KEY", "x")
    monkeypatch.setattr(service.Service, "start", lambda self: None)
    client = server.create_app(model_dir=str(tmp_path)).test_client()
    r = client.post("/dataloop/webhook?secret=anything", json=ANNOTATION)
    assert r.status_code == 404 and "DL2LS_DATALOOP_HOOK_SECRET" in r.json["error"]
    assert client.post("/dataloop/webhook", json=ANNOTATION).status_code == 404


@pytest.mark.parametrize("how", ["query", "header"])
def test_dataloop_hook_queues_an_upsert_for_the_projects_on_its_dataset(service_app, caplog, how):
    client, svc = service_app
    caplog.set_level(logging.DEBUG)
    setup_project(client, "3.1700000000", "ds1")
    setup_project(client, "5.1700000000", "ds2")
    setup_project(client, "6.1700000000", "ds1")
    url, headers = ("/dataloop/webhook?secret=" + SECRET, {}) if how == "query" else \
        ("/dataloop/webhook", {"X-Dl2ls-Secret": SECRET})
    r = client.post(url, json=ANNOTATION, headers=headers)
    assert r.status_code == 202 and r.json["projects"] == [3, 6] and r.json["dataset"] == "ds1"
    first = ANNOTATION["itemId"]
    assert [(k, p, j) for k, p, j in queued(svc, "upsert")] == [("upsert", 3, {"items": [first]}),
                                                                ("upsert", 6, {"items": [first]})]
    r = client.post(url, json={"input": ITEM}, headers=headers)  # a burst: still one job per project
    assert r.status_code == 202 and r.json["item"] == "item1"
    assert [(k, p, j) for k, p, j in queued(svc, "upsert")] == [("upsert", 3, {"items": [first]}),
                                                                ("upsert", 6, {"items": [first]})]
    client.post(url, json=dict(ANNOTATION, itemId="item2"), headers=headers)  # another item joins the job
    assert [(k, p, j) for k, p, j in queued(svc, "upsert")] == [("upsert", 3, {"items": ["item1", "item2"]}),
                                                                ("upsert", 6, {"items": ["item1", "item2"]})]
    assert queued(svc, "sync") == []
    assert SECRET not in caplog.text


def test_dataloop_hook_for_another_dataset_queues_nothing(service_app):
    client, svc = service_app
    setup_project(client)
    r = client.post("/dataloop/webhook?secret=" + SECRET, json=dict(ANNOTATION, datasetId="elsewhere"))
    assert r.status_code == 202 and r.json["projects"] == []
    assert queued(svc, "sync") == queued(svc, "upsert") == []


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b"{}", b"", b'{"id": 5}'])
def test_dataloop_hook_it_cannot_read_syncs_every_connected_project(service_app, raw):
    client, svc = service_app
    setup_project(client, "3.1700000000", "ds1")
    setup_project(client, "5.1700000000", "ds2")
    client.post("/setup", json={"project": "7.17", "schema": CONFIG, "extra_params": {}})  # no dataset
    r = client.post("/dataloop/webhook?secret=" + SECRET, data=raw, content_type="application/json")
    assert r.status_code == 202 and r.json["projects"] == [3, 5]
    assert sorted(p for _, p, _ in queued(svc, "sync")) == [3, 5]


def test_tasks_created_twice_is_one_preannotation_of_both(service_app):
    client, svc = service_app
    setup_project(client)
    for ids in ([1, 2], [2, 3, 4]):
        r = client.post("/webhook", json={"action": "TASKS_CREATED", "project": {"id": 3, "title": "p"},
                                          "tasks": [{"id": i, "data": {}} for i in ids]})
        assert r.status_code == 201, r.json
    [(kind, project, payload)] = queued(svc, "preannotate")
    assert (kind, project, payload["task_ids"]) == ("preannotate", 3, [1, 2, 3, 4])
    # what Label Studio said of each task travels with the job (the later delivery wins)
    assert [t["id"] for t in payload["tasks"]] == [1, 2, 3, 4]
    bad = client.post("/webhook", json={"action": "TASKS_CREATED", "project": {"id": 3}, "tasks": [{"id": True}]})
    assert bad.status_code == 400


def test_start_training_queues_a_sync(service_app):
    client, svc = service_app
    setup_project(client)
    r = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 3}})
    assert r.status_code == 201 and queued(svc, "sync") == [("sync", 3, {})]
    assert client.post("/train", json={"project": "3.17"}).status_code == 201
    assert queued(svc, "sync") == [("sync", 3, {})]
    assert client.post("/webhook", json={"action": "ANNOTATION_CREATED"}).json["status"] == "ignored"


def test_metrics_speaks_prometheus_text(service_app):
    client, svc = service_app
    setup_project(client)
    client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 3}})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.mimetype == "text/plain"
    text = r.get_data(as_text=True)
    assert 'dl2ls_jobs_queued{project="3"} 2' in text  # connect and sync
    assert "# TYPE dl2ls_jobs_queued gauge" in text and 'dl2ls_jobs{state="queued"} 2' in text
    for line in text.splitlines():
        assert line.startswith("#") or line.split(" ")[0].startswith("dl2ls_")


# ----------------------------------------------------------------------------- the stand-in's hooks


class Receiver:
    """A loopback HTTP server that keeps what is posted to it."""

    def __init__(self, status: int = 202):
        self.got: list[tuple[str, dict | None]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                receiver.got.append((self.path, body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def standin():
    s = DataloopStandIn().start()
    s.put_item("ds1", video_item([box_annotation("a1", label="car", end=5)], item_id="item1"))
    yield s
    s.stop()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def test_standin_posts_an_annotation_hook_on_edit(standin, receiver):
    standin.add_hook(receiver.url + "/dataloop/webhook?secret=" + SECRET)
    before = standin.datasets["ds1"]["item1"]["updatedAt"]
    time.sleep(0.002)
    edited = box_annotation("a1", label="bus", end=5)
    added = box_annotation("a2", label="car", end=3)
    posted = standin.edit_annotations("item1", [edited, added])
    assert [a for a, _ in posted] == ["Updated", "Created"]
    assert standin.wait_hooks(10)
    assert standin.hook_errors == []
    assert [status for _, status in standin.hook_deliveries] == [202, 202]
    assert [path for path, _ in receiver.got] == ["/dataloop/webhook?secret=" + SECRET] * 2
    bodies = [body for _, body in receiver.got]
    assert [(b["id"], b["label"], b["itemId"], b["datasetId"]) for b in bodies] == \
        [("a1", "bus", "item1", "ds1"), ("a2", "car", "item1", "ds1")]
    item = standin.datasets["ds1"]["item1"]
    assert item["updatedAt"] > before and item["annotationsCount"] == 2
    assert all(a["updatedAt"] == item["updatedAt"] for a in item["annotations"])
    assert [dataloop_resource(b)[:2] for b in bodies] == [("item1", "ds1")] * 2  # what dl2ls reads of it


def test_standin_edit_only_touches_what_changed(standin, receiver):
    standin.add_hook(receiver.url)
    old = standin.datasets["ds1"]["item1"]["annotations"][0]
    posted = standin.edit_annotations("item1", [dict(old), box_annotation("a3", label="bus")])
    assert [(a, b["id"]) for a, b in posted] == [("Created", "a3")]
    kept = standin.datasets["ds1"]["item1"]["annotations"][0]
    assert kept["updatedAt"] == old["updatedAt"]
    posted = standin.edit_annotations("item1", [box_annotation("a3", label="bus")])
    assert [(a, b["id"]) for a, b in posted] == [("Deleted", "a1")]
    assert standin.edit_annotations("item1", [box_annotation("a3", label="bus")]) == []
    assert standin.wait_hooks(10) and len(receiver.got) == 2


def test_standin_item_hooks_and_no_blocking_on_a_dead_receiver(standin, receiver):
    dead = Receiver()
    dead_url = dead.url
    dead.close()
    standin.add_hook(dead_url + "/nobody")
    standin.add_hook(receiver.url)
    started = time.monotonic()
    standin.put_item("ds1", video_item([], item_id="item2"), notify=True)
    standin.put_item("ds1", video_item([], item_id="item2"), notify=True)
    gone = standin.delete_item("item1")
    assert time.monotonic() - started < 1.0  # the caller never waits for a delivery
    assert gone["id"] == "item1" and "item1" not in standin.datasets["ds1"]
    assert standin.wait_hooks(15)
    assert len(standin.hook_errors) == 3 and all(e.startswith(dead_url) for e in standin.hook_errors)
    assert [(r, a) for r, a, _ in standin.hook_sent][::2] == [("Item", "Created"), ("Item", "Updated"),
                                                                     ("Item", "Deleted")]
    bodies = [b for _, b in receiver.got]
    assert [(b["id"], b["datasetId"], "annotations" in b) for b in bodies] == \
        [("item2", "ds1", False), ("item2", "ds1", False), ("item1", "ds1", False)]
    assert [dataloop_resource(b)[:2] for b in bodies] == [("item2", "ds1"), ("item2", "ds1"), ("item1", "ds1")]


def test_standin_annotation_query_rows_carry_item_dataset_and_time(standin):
    import requests

    standin.edit_annotations("item1", [box_annotation("a1", label="bus")])
    r = requests.post(f"{standin.url}/datasets/ds1/query", json={"resource": "annotations", "filter": {}},
                      headers={"Authorization": f"Bearer {standin.api_key}"}, timeout=10)
    rows = r.json()["items"]
    assert [(a["id"], a["itemId"], a["datasetId"], bool(a["updatedAt"])) for a in rows] == \
        [("a1", "item1", "ds1", True)]


# ----------------------------------------------------------------------------- rules found in review


def test_state_files_are_private_from_the_start(tmp_path):
    db = ServiceDB(tmp_path / "svc.sqlite3")
    db.enqueue("sync", 1)  # writes through the WAL
    for name in ("svc.sqlite3", "svc.sqlite3-wal", "svc.sqlite3-shm"):
        path = tmp_path / name
        if path.exists():
            assert path.stat().st_mode & 0o777 == 0o600, name


def test_a_failed_job_hands_its_work_to_its_queued_twin(db):
    db.enqueue("preannotate", 1, {"task_ids": [1, 2, 3]})
    running = db.claim("h:1", always)
    db.enqueue("preannotate", 1, {"task_ids": [4]})
    assert db.finish(running, "h:1", "Label Studio answered 502") == "superseded"
    [(payload,)] = db.connect().execute("SELECT payload FROM jobs WHERE state = 'queued'").fetchall()
    assert json.loads(payload)["task_ids"] == [1, 2, 3, 4]


def test_jobs_only_for_projects_that_connected(service_app):
    client, svc = service_app
    r = client.post("/webhook", json={"action": "TASKS_CREATED", "project": {"id": 8}, "tasks": [{"id": 1}]})
    assert r.status_code == 200 and r.json["status"] == "ignored"
    assert client.post("/train", json={"project": "8.1700000000"}).status_code == 404
    assert queued(svc) == []


def test_the_webhook_token_stands_in_for_basic_auth_on_webhook_only(tmp_path, monkeypatch):
    for key in ("DL2LS_SOURCE", "DL2LS_DATASET"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("DL2LS_NO_RUNNER", "1")
    monkeypatch.setenv("DATALOOP_API_KEY", "x")
    monkeypatch.setenv("BASIC_AUTH_USER", "ls")
    monkeypatch.setenv("BASIC_AUTH_PASS", "pw")
    app = server.create_app(model_dir=str(tmp_path))
    client, svc = app.test_client(), app.extensions["dl2ls.service"]
    body = {"action": "START_TRAINING", "project": {"id": 3}}
    token = svc.db.hook_token
    assert client.post("/webhook", json=body).status_code == 401
    assert client.post("/webhook?token=wrong", json=body).status_code == 401
    assert client.post(f"/webhook?token={token}", json=body).status_code in (201, 404)  # authorised
    assert client.post(f"/setup?token={token}", json={"project": "3.1"}).status_code == 401


def test_predict_leaves_tasks_a_queued_job_will_write_to_it(service_app):
    client, svc = service_app
    setup_project(client)
    client.post("/webhook", json={"action": "TASKS_CREATED", "project": {"id": 3},
                                  "tasks": [{"id": 7, "data": {"video": "/x/clip.mp4"}}]})
    r = client.post("/predict", json={"project": "3.1700000000", "label_config": CONFIG,
                                      "tasks": [{"id": 7, "data": {"video": "/x/clip.mp4"}}]})
    assert r.status_code == 200 and r.json["results"] == [[]]


def test_catch_up_skips_tasks_no_item_fitted_lately(tmp_path):
    from dl2ls.sync import State

    state = State(tmp_path / "p.sqlite3")
    try:
        state.without_item([1, 2], now=time.time() - 10)
        state.without_item([3], now=time.time() - 2 * 86400)
        assert state.tried_lately([1, 2, 3, 4], 86400) == {1, 2}
    finally:
        state.close()
