"""The service's jobs on RQ (REDIS_URL): a real redis-server (tests/redis_harness.py), RQ's own
workers. First the rules one at a time (keys, the project lease, retries and the failed registry,
a busy project), run by RQ's SimpleWorker in this process; then end to end with the real Label
Studio, the Dataloop stand-in, the service and two `dl2ls worker` processes: a sync converges,
a sync split into subsets converges, and a worker killed mid-job leaves every prediction present
exactly once after its job's retry."""

from __future__ import annotations

import json
import logging
import re
import time

import pytest
import requests

from dl2ls import jobs, sync
from dl2ls.dataloop.api import DataloopError
from dl2ls.service import ParamsError, ProjectParams, Service
from service_harness import CONFIG, WorkerProcess, connect, wait_for, webhook_registered
from test_dataloop_api import sample_item
from test_service import (SECRET, assert_exact, item_of, moved, predictions_by_task, services,  # noqa: F401
                          standin, tasks_of)


@pytest.fixture
def store(redis_client, redis_server, monkeypatch, tmp_path):
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "model"))
    monkeypatch.setenv("DL2LS_RETRY_SECONDS", "0")  # retried at once: no scheduler needed in these tests
    monkeypatch.setattr(jobs, "_service", None)
    return jobs.RedisStore(redis_server.url)


def run_jobs(store: jobs.RedisStore) -> None:
    """RQ's SimpleWorker (no fork) over the service's queues until they are empty."""
    from rq.serializers import JSONSerializer

    worker = jobs.make_worker_class(simple=True)(list(store.queues.values()), connection=store.client,
                                                 serializer=JSONSerializer)
    worker.work(burst=True, logging_level="WARNING")


def queued(store: jobs.RedisStore) -> dict[str, int]:
    return {q: n for (q, state), n in store.queue_counts().items() if state == "queued"}


# ----------------------------------------------------------------------------- the rules


@pytest.mark.parametrize("kind, payload, key", [
    ("sync", {}, "sync:3"),
    ("connect", {}, "connect:3"),
    ("preannotate", {"task_ids": [2, 1]}, None),  # a hash of the sorted task ids
    ("subset", {"lo": "a1", "hi": "b2", "items": ["a1"]}, "subset:3:a1"),
])
def test_job_keys(kind, payload, key):
    got = jobs.job_key(kind, 3, payload)
    if key is not None:
        assert got == key
    else:
        assert got.startswith("preannotate:3:")
        assert got == jobs.job_key(kind, 3, {"task_ids": [1, 2, 2]})
        assert got != jobs.job_key(kind, 3, {"task_ids": [1, 3]})
    assert jobs.QUEUE_OF[kind] == (jobs.HOOKS if kind in ("connect", "preannotate") else jobs.SYNCS)


def test_a_queued_job_is_not_queued_twice_until_it_starts(store):
    first = store.enqueue("sync", 5, reason="schedule")
    assert store.enqueue("sync", 5, reason="Dataloop hook") == first  # a burst of hooks: one job
    assert queued(store)[jobs.SYNCS] == 1
    store.started("sync:5", first)  # it runs: a change seen now needs a run of its own
    second = store.enqueue("sync", 5)
    assert second != first and queued(store)[jobs.SYNCS] == 2
    # a webhook delivered twice is one job; another batch of tasks is another
    a = store.enqueue("preannotate", 5, {"task_ids": [1, 2]})
    assert store.enqueue("preannotate", 5, {"task_ids": [2, 1]}) == a
    assert store.enqueue("preannotate", 5, {"task_ids": [3]}) != a
    assert queued(store)[jobs.HOOKS] == 2
    assert store.pending_tasks(5) == {1, 2, 3}  # /predict leaves these to their jobs


@pytest.mark.parametrize("first, second, together", [
    ("alone", "alone", False),
    ("alone", "sync r1", False),
    ("sync r1", "alone", False),
    ("sync r1", "sync r1", True),  # the subsets of one sync
    ("sync r1", "sync r2", False),  # subsets of two syncs: their ranges may overlap
])
def test_the_project_lease(store, first, second, together):
    def lease(job_id, mode):
        return jobs.Lease(store.client, store.prefix, 9, job_id, group=None if mode == "alone" else mode)

    a, b, other = lease("job-a", first), lease("job-b", second), jobs.Lease(store.client, store.prefix, 10, "job-c")
    assert a.acquire()
    assert b.acquire() is together
    assert other.acquire()  # another project is another lease
    a.release()
    if not together:
        assert b.acquire()
    b.release()
    other.release()


def test_a_retried_job_is_not_its_own_first_run(store):
    """RQ retries a job under its id: the retry must wait for the first run's lease (the first
    run's work horse may outlive its worker)."""
    first = jobs.Lease(store.client, store.prefix, 9, "rq-job-1")
    assert first.acquire()
    assert not jobs.Lease(store.client, store.prefix, 9, "rq-job-1").acquire()
    first.release()


def test_an_alone_job_waiting_stops_further_subsets(store):
    """A long split sync lets a pre-annotation in between its subsets."""
    def subset(n):
        return jobs.Lease(store.client, store.prefix, 9, f"subset-{n}", group="sync r1")

    running = subset(1)
    assert running.acquire()
    hook = jobs.Lease(store.client, store.prefix, 9, "preannotate")
    assert not hook.acquire()  # and now it waits
    assert not subset(2).acquire()
    running.release()
    assert hook.acquire()
    hook.release()
    third = subset(3)
    assert third.acquire()
    third.release()


def test_a_lease_ends_with_the_process_that_stopped_renewing_it(store, monkeypatch):
    monkeypatch.setattr(jobs, "LEASE", 0.5)
    monkeypatch.setattr(jobs, "RENEW", 60.0)
    dead = jobs.Lease(store.client, store.prefix, 9, "dead-job")
    assert dead.acquire()  # and never renewed, never released: its worker was killed
    taker = jobs.Lease(store.client, store.prefix, 9, "next-job")
    assert not taker.acquire()
    assert taker.acquire(wait=2.0)
    taker.release()
    dead.stop.set()


def test_one_scheduler_wins_each_slot(store, redis_server):
    other = jobs.RedisStore(redis_server.url)
    params = ProjectParams(dataset="ds1", sync_every=60)
    assert store.setup(4, "4.1", "http://ls", "tok", params, None, "<View/>")
    store.client.delete(store.key("sync-due", 4))  # due now
    assert store.due_syncs(lambda p: 60) == [4]
    assert other.due_syncs(lambda p: 60) == []
    assert store.due_syncs(lambda p: 60) == []


def test_the_key_of_a_job_that_died_before_it_started_is_taken_over(store):
    lost = store.enqueue("sync", 7)
    store.client.hset(f"rq:job:{lost}", "status", "failed")
    assert store.enqueue("sync", 7) != lost


def _failing(error: Exception):
    def run_job(self, job):
        raise error
    return run_job


def test_a_failing_job_is_retried_then_kept_in_the_failed_registry(store, monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(Service, "run_job", _failing(DataloopError("Dataloop answered 503 five times")))
    store.enqueue("sync", 6, reason="schedule")
    with caplog.at_level(logging.INFO, logger="dl2ls"):
        run_jobs(store)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("dl2ls")]
    failures = [line for line in lines if "failed after" in line]
    assert len(failures) == 5  # five attempts, one line each
    assert "attempt 1" in failures[0] and "retried in 0 s" in failures[0]
    assert "attempt 5" in failures[-1] and "failed for good" in failures[-1]
    assert not any("Traceback" in r.getMessage() for r in caplog.records)
    counts = store.queue_counts()
    assert counts[(jobs.SYNCS, "failed")] == 1
    metrics = Service(tmp_path, redis_url=store.url).metrics()
    assert f'dl2ls_rq_jobs{{queue="{jobs.SYNCS}",state="failed"}} 1' in metrics


def test_a_setting_no_retry_can_mend_fails_at_once(store, monkeypatch, caplog):
    monkeypatch.setattr(Service, "run_job", _failing(ParamsError("project 6 names no Dataloop dataset")))
    store.enqueue("sync", 6)
    with caplog.at_level(logging.INFO, logger="dl2ls"):
        run_jobs(store)
    failures = [r.getMessage() for r in caplog.records if "failed after" in r.getMessage()]
    assert len(failures) == 1 and "failed for good" in failures[0]
    assert store.queue_counts()[(jobs.SYNCS, "failed")] == 1


def test_a_job_finding_its_project_busy_waits_without_failing(store, monkeypatch):
    ran = []
    monkeypatch.setattr(Service, "run_job", lambda self, job: ran.append(job.kind) or "done")
    holder = jobs.Lease(store.client, store.prefix, 8, "running-elsewhere")
    assert holder.acquire()
    first = store.enqueue("sync", 8)
    run_jobs(store)
    assert ran == []
    counts = store.queue_counts()
    assert counts[(jobs.SYNCS, "scheduled")] == 1 and counts[(jobs.SYNCS, "failed")] == 0
    again = store.enqueue("sync", 8)  # its key is still taken: a new request adds nothing
    assert again != first and store.enqueue("sync", 8) == again
    holder.release()


def test_hooks_naming_items_are_one_upsert_that_keeps_its_items_until_written(store, monkeypatch):
    seen = []
    monkeypatch.setattr(Service, "run_job", lambda self, job: seen.append((job.kind, job.payload)) or "ok")
    first = store.enqueue("upsert", 4, {"items": ["i1"]})
    assert store.enqueue("upsert", 4, {"items": ["i2", "i1"]}) == first  # a burst of hooks: one job
    run_jobs(store)
    assert seen == [("upsert", {"items": ["i1", "i2"]})]
    assert store.upserts(4) == []
    monkeypatch.setattr(Service, "run_job", _failing(DataloopError("Dataloop answered 503")))
    store.enqueue("upsert", 4, {"items": ["i3"]})
    run_jobs(store)
    assert store.upserts(4) == ["i3"]  # failed for good: back for the next hook's run


def test_an_item_named_again_while_its_upsert_runs_is_written_again(store, monkeypatch):
    seen = []

    def run_job(self, job):
        seen.append(job.payload["items"])
        if len(seen) == 1:  # a hook for the same item arrives while the first run writes it
            store.enqueue("upsert", 4, {"items": ["i1"]})
        return "ok"

    monkeypatch.setattr(Service, "run_job", run_job)
    store.enqueue("upsert", 4, {"items": ["i1"]})
    run_jobs(store)
    assert seen == [["i1"], ["i1"]]
    assert store.upserts(4) == []


def test_split_subsets_cover_every_candidate_once():
    listed = [f"{i:024x}" for i in range(10)]
    parts = sync.split_subsets(reversed(listed), listed[1:8], 3)
    assert [(p.lo, p.hi) for p in parts] == [(listed[0], listed[2]), (listed[3], listed[5]), (listed[6], listed[8])]
    assert sum((p.items for p in parts), []) == listed[1:8]
    assert sync.split_subsets(listed, [], 3) == []


# ----------------------------------------------------------------------------- end to end


@pytest.fixture
def workers(label_studio, standin, redis_server, tmp_path):
    started: list[WorkerProcess] = []

    def start(n: int = 2, **env) -> list[WorkerProcess]:
        new = [WorkerProcess(redis_server.url, standin.url, standin.api_key, label_studio[0],
                             tmp_path / f"worker-{len(started) + k}.log", env={"DL2LS_MODEL_VERSION": "dataloop",
                                                                                 **env}).start()
               for k in range(n)]
        started.extend(new)
        return new

    yield start
    for worker in started:
        worker.stop()


def exactly_once(ls, project_id: int, count: int):
    def check():
        got = predictions_by_task(ls, project_id)
        return got if len(got) == count and all(len(v) == 1 for v in got.values()) else None
    return check


def test_workers_run_a_split_sync_to_convergence(ls_env, standin, services, workers, redis_client, redis_server):
    ls = ls_env
    standin.export_polls = 0  # exports ready at once
    n = 11
    items = {}
    for i in range(n):
        standin.put_item("ds1", sample_item(i))
        items[sample_item(i)["id"]] = standin.datasets["ds1"][sample_item(i)["id"]]
    project = ls.projects.create(title="workers split sync", label_config=CONFIG)
    # tasks first, the backend after: only a sync writes them
    ls.projects.import_tasks(project.id, request=[{"video": f"/data/local-files/?d=w{items[k]['filename']}", "fps": 25}
                                                  for k in items])
    service = services(workers=1, REDIS_URL=redis_server.url)
    crew = workers(2, DL2LS_SUBSET_SIZE="4")
    backend = connect(ls, project.id, service, {"dataset": "ds1"})
    wait_for(lambda: webhook_registered(ls, project.id, service), 30, what="the webhook registered by a worker")
    ls.ml.train(id=backend.id)  # Start Training: a sync now
    got = wait_for(exactly_once(ls, project.id, n), 60, what=f"one prediction on each of {n} tasks")
    data = tasks_of(ls, project.id)
    for task_id, preds in got.items():
        assert preds[0].model_version == "dataloop"
        assert_exact(item_of(data[task_id], items), preds[0].result)
    logs = "".join(w.log() for w in crew)
    assert re.search(r"sync project \d+ \(Start Training\): sync: .*subsets queued 3", logs), logs[-3000:]
    assert len(re.findall(r"subset project \d+ \(4 items of a split sync\): subset", logs)) == 2
    assert "Traceback" not in logs + service.log()
    metrics = requests.get(f"{service.url}/metrics", timeout=5).text
    assert 'dl2ls_rq_workers 2' in metrics
    assert service.health()["executor"]["workers"] == 2
    # a second sync finds nothing to write
    time.sleep(1)
    ls.ml.train(id=backend.id)
    wait_for(lambda: len(re.findall(r"sync project \d+ \(Start Training\)", "".join(w.log() for w in crew))) == 2,
             30, what="the second sync")
    final = predictions_by_task(ls, project.id)
    assert {t: [p.id for p in v] for t, v in final.items()} == {t: [p.id for p in v] for t, v in got.items()}
    # an edit in Dataloop, hooked: an upsert of that item, run by a worker
    edited = list(items)[3]
    by_item = {item_of(d, items)["id"]: t for t, d in data.items()}
    standin.add_hook(f"{service.url}/dataloop/webhook?secret={SECRET}")
    standin.edit_annotations(edited, moved(items[edited], 25))

    def updated():
        preds = predictions_by_task(ls, project.id).get(by_item[edited], [])
        try:
            return len(preds) == 1 and assert_exact(standin.datasets["ds1"][edited], preds[0].result) is None
        except AssertionError:
            return False

    wait_for(updated, 30, what="the hooked edit in its task")
    wait_for(lambda: re.search(r"upsert project \d+ \(Dataloop: [^)]*\): 1 tasks: 1 items",
                               "".join(w.log() for w in crew)), 10, what="the upsert's line")


def test_a_worker_killed_mid_job_leaves_every_prediction_exactly_once(ls_env, standin, services, workers,
                                                                      redis_client, redis_server):
    from rq import Worker

    ls = ls_env
    n = 1100  # pre-annotated in chunks of 50, 100, 200, 400 and 350 tasks; the first write holds 500
    for i in range(n):
        standin.put_item("ds1", sample_item(i))
    service = services(workers=1, REDIS_URL=redis_server.url)
    crew = workers(2, DL2LS_RETRY_SECONDS="0")
    project = ls.projects.create(title="workers kill -9", label_config=CONFIG)
    connect(ls, project.id, service, {"dataset": "ds1"})
    wait_for(lambda: webhook_registered(ls, project.id, service), 30, what="the webhook registered")
    # the last chunk's item query waits: the job stops there, its first 500 predictions written
    last = sample_item(n - 1)["name"]
    standin.hold = lambda body: last in json.dumps(body)
    ls.projects.import_tasks(project.id, request=[{"video": f"/data/local-files/?d=k{sample_item(i)['filename']}",
                                                   "fps": 25} for i in range(n)])
    first = wait_for(lambda: predictions_by_task(ls, project.id), 60, what="the first predictions")
    queues = jobs.RedisStore(redis_server.url).queues.values()
    busy = {w.name: w for q in queues for w in Worker.all(queue=q) if w.get_current_job_id()}
    assert len(busy) == 1
    victim = next(w for w in crew if next(iter(busy.values())).pid == w.proc.pid)
    victim.kill()  # the worker, its scheduler and its work horse
    standin.released.set()
    assert 0 < len(first) < n
    survivor = next(w for w in crew if w is not victim)
    # RQ's started registry shows the job without a heartbeat: the survivor retries it
    wait_for(lambda: re.search(r"preannotate project \d+ \(\d+ tasks created\): \d+ tasks:", survivor.log()), 120,
             what="the killed job retried by the other worker")
    assert "stopped mid-job" in survivor.log()
    got = wait_for(exactly_once(ls, project.id, n), 30, what=f"one prediction on each of {n} tasks after the retry")
    assert {p.model_version for v in got.values() for p in v} == {"dataloop"}
    # (the first 500 are kept, or replaced once when the kill came before their record was kept)
    assert "Traceback" not in survivor.log() + service.log()
