"""The service's jobs on RQ: with REDIS_URL set they run on `dl2ls worker` processes, on this
machine or any other, instead of inside the service.

One job code path, two executors. A job is a plain function of plain arguments (kind, project,
payload) that `Service.attempt` runs; without REDIS_URL the service's own runner threads take
jobs from its SQLite list (`service.ServiceDB`), with it RQ queues hold them and `perform` is what
a worker runs. Everything the jobs share then lives in Redis, so that workers on other machines
need nothing but REDIS_URL and the credentials: the projects' settings from /setup (`RedisStore`,
the twin of ServiceDB), each project's sync state (`sync.RedisState`), and the jobs.

The rules, as the embedded runner keeps them:
- keyed: a job's key names its work (`sync:<project>`, `preannotate:<project>:<tasks>`,
  `upsert:<project>` with the items hooks named in a set beside it, `subset:<project>:<first id>`); while a job with that key waits in a queue, enqueueing it again
  adds nothing (a webhook delivered twice, a burst of Dataloop hooks). A job that has started
  gives its key up, so a change seen after it began gets a run of its own;
- one runner per project: a job holds its project's lease in Redis (15 s, renewed every 3 s by
  the job itself, so it ends with the process that does the work). The subsets of one
  sync share it with each other and run side by side; every other job needs it alone. A job that
  finds its project busy is queued again a little later (that is not a failure);
- failures: retried with backoff (RQ's Retry, 15 s, 1, 4 and 16 min), then left in RQ's failed
  registry; one log line each, counted in /metrics. A worker killed mid-job leaves its job in
  RQ's started registry without a heartbeat: after 20 s (its lease over by then) it is retried
  the same way. Jobs are
  idempotent (the planner and the records decide what to write), so a re-run writes nothing twice.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import socket
import threading
import time
import uuid
from datetime import timedelta
from typing import Any, Callable
from urllib.parse import urlsplit

import orjson

from dl2ls.report import describe, escape
from dl2ls.service import (DEFAULT_EVERY, JOB_ATTEMPTS, Job, ParamsError, ProjectParams, ProjectRow, Service,
                           parse_params)

log = logging.getLogger("dl2ls.jobs")

HOOKS, SYNCS = "dl2ls-hooks", "dl2ls-sync"
QUEUE_OF = {"connect": HOOKS, "preannotate": HOOKS, "upsert": HOOKS, "sync": SYNCS, "subset": SYNCS}
QUEUES = (HOOKS, SYNCS)  # a worker takes from the first that has a job: hooks go ahead of syncs
LEASE = 15.0  # seconds a project's lease outlives its last renewal: over before RQ retries a dead worker's job
RENEW = 3.0
HEARTBEAT = 5  # seconds between a worker's heartbeats on a running job (RQ's job_monitoring_interval)
ABANDONED_AFTER = 15  # a running job with no heartbeat for HEARTBEAT + this is its dead worker's
RETRY_SECONDS = (15, 60, 240, 960)
QUEUED_TTL = 3600  # a queued job's key is given up after this even if the job never started
JOB_TIMEOUT = {HOOKS: 3600, SYNCS: 6 * 3600}
BUSY_FIRST, BUSY_MAX = 2.0, 15.0  # a busy project's job waits this long, doubling, before it is tried again
PENDING_TTL = 3600.0  # /predict leaves a task to its queued pre-annotation for at most this long


class JobFailed(Exception):
    """A job's failure, already logged in one line: RQ keeps this instead of a traceback."""


def safe_url(url: str) -> str:
    """A Redis URL fit for logs and /health: no user, no password."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(a Redis URL that cannot be read)"
    return f"{parts.scheme}://{host}{port}{parts.path}"


def connect(url: str):
    """A Redis client for REDIS_URL (redis://, rediss://, unix://), or a one-line error."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=10, health_check_interval=30)
    except ValueError as err:
        raise ValueError(f"REDIS_URL {safe_url(url)}: {err}") from None
    return client


def retry_seconds() -> list[int]:
    """Backoff between attempts (DL2LS_RETRY_SECONDS, e.g. "15,60,240,960")."""
    text = os.environ.get("DL2LS_RETRY_SECONDS")
    if not text:
        return list(RETRY_SECONDS)
    try:
        values = [int(float(v)) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError("DL2LS_RETRY_SECONDS: seconds between attempts, comma-separated (15,60,240,960)") from None
    if len(values) not in (1, JOB_ATTEMPTS - 1) or any(v < 0 for v in values):
        raise ValueError(f"DL2LS_RETRY_SECONDS: one number, or {JOB_ATTEMPTS - 1} comma-separated (15,60,240,960): "
                         "the seconds before each retry")
    return values * (JOB_ATTEMPTS - 1) if len(values) == 1 else values


def job_key(kind: str, project_id: int, payload: dict) -> str:
    """What a job is, as one short text: two jobs with one key do the same work."""
    if kind == "preannotate":
        ids = sorted(set(payload.get("task_ids") or []))
        return f"preannotate:{project_id}:{hashlib.sha1(orjson.dumps(ids)).hexdigest()[:16]}"
    if kind == "subset":
        return f"subset:{project_id}:{payload.get('lo')}"
    return f"{kind}:{project_id}"


# ----------------------------------------------------------------------------- the project lease

# KEYS: the alone holder (a string), the shared holders (a sorted set: "<group> <token>" -> expiry),
# the flag of an alone job waiting. ARGV: token, lease ms, "alone" or the shared group, renewal?
_LEASE_SCRIPT = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
if ARGV[3] == 'alone' then
  if redis.call('ZCARD', KEYS[2]) > 0 then
    redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
    return 0
  end
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  if redis.call('GET', KEYS[3]) == ARGV[1] then redis.call('DEL', KEYS[3]) end
  return 1
end
local member = ARGV[3] .. ' ' .. ARGV[1]
if ARGV[4] ~= '1' then
  if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
  for _, other in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
    if string.sub(other, 1, #ARGV[3] + 1) ~= ARGV[3] .. ' ' then return 0 end
  end
end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), member)
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""

_RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('ZREM', KEYS[2], ARGV[2] .. ' ' .. ARGV[1])
return 1
"""

_GIVE_UP_KEY = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# the items of a project's upsert, taken by one run (and kept for its retries) while new hooks
# gather in the project's set for the next run
_TAKE_UPSERTS = """
local waiting = redis.call('SMEMBERS', KEYS[1])
if #waiting > 0 then
  redis.call('SADD', KEYS[2], unpack(waiting))
  redis.call('DEL', KEYS[1])
end
redis.call('EXPIRE', KEYS[2], 604800)
return redis.call('SMEMBERS', KEYS[2])
"""


class Lease:
    """One runner per project, across every worker on every machine: a job holds its project's
    lease `alone`, or `shared` with the other subsets of the same sync (`group`: the sync's run;
    subsets of two different syncs never overlap). An alone job that finds the subsets running
    marks itself waiting, and no further subset starts until it has had its turn, so a long split
    sync does not hold back pre-annotations and hooks. Redis's clock decides expiry, so machines'
    clocks need not agree. The holder renews it from a thread of its own; a process that dies
    stops renewing and the lease ends LEASE seconds later. Every run has a token of its own (a
    retried RQ job keeps its id: its retry must not pass for the run it replaces)."""

    def __init__(self, client, prefix: str, project_id: int, job_id: str, group: str | None = None):
        self.client = client
        self.keys = [f"{prefix}:lease:{project_id}", f"{prefix}:lease:{project_id}:shared",
                     f"{prefix}:lease:{project_id}:waiting"]
        self.token = f"{job_id}:{uuid.uuid4().hex[:8]}"
        self.mode = group or "alone"
        self.project_id = project_id
        self.stop = threading.Event()
        self.lost = False
        self.thread: threading.Thread | None = None

    def _take(self, renewal: bool = False) -> bool:
        return bool(self.client.eval(_LEASE_SCRIPT, 3, *self.keys, self.token, int(LEASE * 1000), self.mode,
                                     "1" if renewal else "0"))

    def acquire(self, wait: float = 0.0) -> bool:
        """Take the lease, trying for up to `wait` seconds; then keep it until release()."""
        until = time.monotonic() + wait
        while not self._take():
            if time.monotonic() >= until:
                return False
            time.sleep(0.25)
        self.thread = threading.Thread(target=self._keep, name="dl2ls-lease", daemon=True)
        self.thread.start()
        return True

    def _keep(self) -> None:
        while not self.stop.wait(RENEW):
            try:
                if not self._take(renewal=True) and not self.lost:
                    self.lost = True
                    log.warning("project %d: this job lost its lease (another job may have taken it)",
                                self.project_id)
            except Exception as err:  # noqa: BLE001 - Redis away for a moment: the next renewal may reach it
                log.warning("project %d: renewing the job's lease: %s", self.project_id, escape(describe(err)))

    def release(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
        try:
            self.client.eval(_RELEASE_SCRIPT, 2, *self.keys[:2], self.token, self.mode)
        except Exception as err:  # noqa: BLE001 - unreleased, it ends by itself LEASE seconds later
            log.warning("project %d: releasing the lease: %s", self.project_id, escape(describe(err)))


# ----------------------------------------------------------------------------- what the jobs share


class RedisStore:
    """The service's memory in Redis, for the service and its workers wherever they run: the twin
    of service.ServiceDB (projects as /setup left them, their counters, the answered tasks), and
    the RQ side of its job list (enqueue)."""

    def __init__(self, url: str, prefix: str = "dl2ls"):
        from rq import Queue
        from rq.serializers import JSONSerializer

        self.url = url
        self.path = safe_url(url)
        self.prefix = prefix
        self.client = connect(url)
        # JSON, not pickle: a job's arguments are plain data, readable with any Redis client
        self.queues = {name: Queue(name, connection=self.client, serializer=JSONSerializer) for name in QUEUES}
        self.retry = retry_seconds()
        meta = f"{prefix}:meta"
        self.client.hsetnx(meta, "instance", os.urandom(8).hex())
        self.client.hsetnx(meta, "hook_token", os.urandom(24).hex())
        self.instance, self.hook_token = (v.decode() for v in self.client.hmget(meta, "instance", "hook_token"))

    def key(self, *parts: Any) -> str:
        return ":".join([self.prefix, *map(str, parts)])

    # -- projects -------------------------------------------------------------------------------

    def setup(self, project_id: int, ref: str | None, hostname: str | None, token: str | None,
              params: ProjectParams | None, params_error: str | None, schema: str | None) -> bool:
        digest = hashlib.sha1(orjson.dumps([ref, hostname, token, params.to_json() if params else None, params_error,
                                            schema], option=orjson.OPT_SORT_KEYS)).hexdigest()
        row = self.key("project", project_id)
        if (self.client.hget(row, "setup_hash") or b"").decode() == digest:
            self.client.hdel(row, "params_error")
            return False
        fields = {"ref": ref, "hostname": hostname, "token": token,
                  "params": orjson.dumps(params.to_json()).decode() if params else None,
                  "params_error": params_error, "setup_hash": digest, "setup_at": time.time()}
        every = params.sync_every if params else DEFAULT_EVERY
        due = self.key("sync-due", project_id)
        with self.client.pipeline() as pipe:
            pipe.hset(row, mapping={k: v for k, v in fields.items() if v is not None})
            pipe.hdel(row, *[k for k, v in fields.items() if v is None] or ["-"])
            pipe.sadd(self.key("projects"), project_id)
            pipe.execute()
        # the first sync after `every`; a shorter interval than before takes effect at once
        left = self.client.pttl(due)
        if left < 0 or left > every * 1000:
            self.client.set(due, 1, px=int(every * 1000 * random.uniform(0.9, 1.0)))
        return True

    def projects(self, default: ProjectParams) -> dict[int, ProjectRow]:
        ids = sorted(int(p) for p in self.client.smembers(self.key("projects")))
        with self.client.pipeline() as pipe:
            for p in ids:
                pipe.hgetall(self.key("project", p))
                pipe.smembers(self.key("jobs", p))
            answers = pipe.execute()
        out = {}
        for n, p in enumerate(ids):
            raw = {k.decode(): v.decode() for k, v in answers[2 * n].items()}
            queued, failed = self._live_jobs(p, [j.decode() for j in answers[2 * n + 1]])
            params, stored = default, False
            if raw.get("params"):
                try:
                    params = parse_params(orjson.loads(raw["params"]), default.dataset, default.model_version)
                    stored = True
                except ParamsError:
                    params = default

            def num(name: str, kind: Callable = int):
                return kind(raw[name]) if raw.get(name) else None

            out[p] = ProjectRow(p, params, raw.get("hostname"), raw.get("token"), raw.get("ref"),
                                raw.get("connection") or "not checked yet", num("last_sync", float),
                                raw.get("last_line"), num("items_behind") or 0, num("failures") or 0,
                                num("predictions_written") or 0, num("syncs") or 0, queued,
                                (num("jobs_failed") or 0) + failed, raw.get("version") or params.shown_version(),
                                raw.get("params_error"), stored)
        return out

    def _live_jobs(self, project_id: int, job_ids: list[str]) -> tuple[int, int]:
        """Jobs of the project still queued or running; those RQ has finished with leave the set
        (a failed one counted)."""
        if not job_ids:
            return 0, 0
        with self.client.pipeline() as pipe:
            for job_id in job_ids:
                pipe.hget(f"rq:job:{job_id}", "status")
            statuses = [(s or b"").decode() for s in pipe.execute()]
        done = [(j, s) for j, s in zip(job_ids, statuses) if s in ("", "finished", "failed", "canceled", "stopped")]
        for job_id, status in done:
            # whoever removes it counts it: the service and every worker look
            if self.client.srem(self.key("jobs", project_id), job_id) and status in ("failed", "stopped"):
                # (one a job's own failure did not count: its worker died on the last attempt)
                self.add_counts(project_id, jobs_failed=1, failures=1)
        return len(job_ids) - len(done), 0

    def note(self, project_id: int, **fields) -> None:
        if fields:
            row = self.key("project", project_id)
            with self.client.pipeline() as pipe:
                set_ = {k: v for k, v in fields.items() if v is not None}
                if set_:
                    pipe.hset(row, mapping=set_)
                if len(set_) < len(fields):
                    pipe.hdel(row, *[k for k, v in fields.items() if v is None])
                pipe.execute()

    def add_counts(self, project_id: int, **counts: int) -> None:
        with self.client.pipeline() as pipe:
            for name, n in counts.items():
                pipe.hincrby(self.key("project", project_id), name, n)
            pipe.execute()

    def renew(self, owner: str, job_ids: list) -> None:
        """Leases are the jobs' own (see Lease): nothing to renew for the service."""

    # -- the job list: RQ's queues --------------------------------------------------------------

    def enqueue(self, kind: str, project_id: int, payload: dict | None = None, reason: str = "",
                delay: float = 0.0, waited: int = 0, replaces: str | None = None) -> str:
        """Queue a job unless one with its key is waiting already (then that one's id)."""
        from rq import Retry

        payload = payload or {}
        key = job_key(kind, project_id, payload)
        marker = self.key("queued", key)
        if kind == "upsert" and payload.get("items"):
            # the items wait in a set: a queued upsert takes every item named until it starts
            self.client.sadd(self.key("upsert", project_id), *payload["items"])
            payload = {}
        job_id = f"dl2ls-{kind}-{project_id}-{uuid.uuid4().hex[:12]}"
        if replaces is not None:  # a busy project's job queued again: it keeps its key
            self.client.set(marker, job_id, ex=QUEUED_TTL)
        elif not self.client.set(marker, job_id, nx=True, ex=QUEUED_TTL):
            waiting = (self.client.get(marker) or b"").decode()
            status = (self.client.hget(f"rq:job:{waiting}", "status") or b"").decode() if waiting else ""
            if status in ("queued", "scheduled", "deferred", "started"):
                return waiting
            # the key's job is gone (failed before it started, or lost): this one takes the key over
            self.client.set(marker, job_id, ex=QUEUED_TTL)
        queue = self.queues[QUEUE_OF[kind]]
        count = len(payload.get("task_ids") or payload.get("items") or [])
        what = f"{kind} project {project_id}" + (f" ({count} {'tasks' if kind == 'preannotate' else 'items'})"
                                                  if count else "")
        options = dict(job_id=job_id, description=what, job_timeout=JOB_TIMEOUT[queue.name], result_ttl=3600,
                       failure_ttl=7 * 86400, retry=Retry(max=JOB_ATTEMPTS - 1, interval=self.retry),
                       meta={"project": project_id, "key": key})
        args = (kind, project_id, payload, key, reason[:200], waited)
        try:
            with self.client.pipeline() as pipe:
                pipe.sadd(self.key("jobs", project_id), job_id)
                if kind == "preannotate" and payload.get("task_ids"):
                    pipe.zadd(self.key("pending", project_id),
                              {str(t): time.time() + PENDING_TTL for t in payload["task_ids"]})
                pipe.execute()
            if delay > 0:
                queue.enqueue_in(timedelta(seconds=delay), perform, *args, **options)
            else:
                queue.enqueue(perform, *args, **options)
        except Exception:
            self.client.eval(_GIVE_UP_KEY, 1, marker, job_id)
            raise
        return job_id

    def started(self, key: str, job_id: str) -> None:
        """The job runs: its key is free for the next change's job."""
        self.client.eval(_GIVE_UP_KEY, 1, self.key("queued", key), job_id)

    def upserts(self, project_id: int, job_id: str | None = None) -> list[str]:
        """The items hooks named for the project; with `job_id`, taken by that job (and kept for
        its retries until it has written them: see `upserted`)."""
        if job_id is None:
            return sorted(i.decode() for i in self.client.smembers(self.key("upsert", project_id)))
        taken = self.client.eval(_TAKE_UPSERTS, 2, self.key("upsert", project_id),
                                 self.key("upsert", project_id, job_id))
        return sorted(i.decode() for i in taken)

    def upserted(self, project_id: int, job_id: str, written: bool) -> None:
        """The job's items are written, or (it failed for good) back with the project's for the
        next hook's run."""
        taken = self.key("upsert", project_id, job_id)
        if not written:
            self.client.sunionstore(self.key("upsert", project_id), [self.key("upsert", project_id), taken])
        self.client.delete(taken)

    def ended(self, project_id: int, job_id: str, payload: dict) -> None:
        with self.client.pipeline() as pipe:
            pipe.srem(self.key("jobs", project_id), job_id)
            if payload.get("task_ids"):
                pipe.zrem(self.key("pending", project_id), *map(str, payload["task_ids"]))
            pipe.execute()

    def pending_tasks(self, project_id: int) -> set[int]:
        """Tasks a queued or running pre-annotation of the project will write on."""
        key = self.key("pending", project_id)
        self.client.zremrangebyscore(key, "-inf", time.time())
        return {int(t) for t in self.client.zrange(key, 0, -1)}

    def due_syncs(self, every: Callable[[int], float]) -> list[int]:
        """Projects whose sync is due, each claimed by whoever sets its next due time first (the
        service and every worker ask; one wins each slot)."""
        due = []
        for p in sorted(int(p) for p in self.client.smembers(self.key("projects"))):
            seconds = every(p) * random.uniform(0.95, 1.05)
            if self.client.set(self.key("sync-due", p), 1, nx=True, px=int(seconds * 1000)):
                due.append(p)
        return due

    def mark_answered(self, project_id: int, task_ids: list[int]) -> None:
        if task_ids:
            self.client.sadd(self.key("answered", project_id), *task_ids)

    def answered(self, project_id: int, task_ids: list[int]) -> set[int]:
        out: set[int] = set()
        for i in range(0, len(task_ids), 500):
            chunk = task_ids[i:i + 500]
            out.update(t for t, yes in zip(chunk, self.client.smismember(self.key("answered", project_id), chunk))
                       if yes)
        return out

    def counts(self) -> dict[str, int]:
        """Jobs by state, summed over the queues (for /health)."""
        out: dict[str, int] = {}
        for (_, state), n in self.queue_counts().items():
            out[state] = out.get(state, 0) + n
        return out

    def queue_counts(self) -> dict[tuple[str, str], int]:
        """(queue, state) -> jobs, read from RQ's own keys without its clean-ups (no side effects)."""
        from rq.registry import (DeferredJobRegistry, FailedJobRegistry, FinishedJobRegistry, ScheduledJobRegistry,
                                 StartedJobRegistry)

        kinds = {"started": StartedJobRegistry, "scheduled": ScheduledJobRegistry, "failed": FailedJobRegistry,
                 "finished": FinishedJobRegistry, "deferred": DeferredJobRegistry}
        with self.client.pipeline() as pipe:
            order = []
            for name, queue in self.queues.items():
                pipe.llen(queue.key)
                order.append((name, "queued"))
                for state, registry in kinds.items():
                    pipe.zcard(registry(name, connection=self.client).key)
                    order.append((name, state))
            return dict(zip(order, pipe.execute()))

    def workers(self) -> int:
        from rq import Worker

        return len({w.name for q in self.queues.values() for w in Worker.all(queue=q)})


# ----------------------------------------------------------------------------- the RQ job


_service: Service | None = None


def worker_service() -> Service:
    """The Service a worker's jobs run in: one per process (a forked work horse builds its own,
    so nothing from its parent's threads comes along)."""
    global _service
    if _service is None or _service.started_pid != os.getpid():
        _service = service_from_env()
        _service.started_pid = os.getpid()
    return _service


def service_from_env() -> Service:
    from dl2ls.dataloop.model import MediaDefaults
    from dl2ls.server import DEFAULT_VERSION, _positive_env

    url = os.environ.get("REDIS_URL")
    if not url:
        raise ValueError("REDIS_URL is not set: dl2ls worker runs the jobs a service queued in Redis")
    defaults = MediaDefaults(*(_positive_env(k) for k in ("DL2LS_FPS", "DL2LS_WIDTH", "DL2LS_HEIGHT")))
    return Service(os.environ.get("MODEL_DIR") or "./dl2ls-model", defaults, os.environ.get("DL2LS_DATASET") or None,
                   os.environ.get("DL2LS_MODEL_VERSION") or DEFAULT_VERSION,
                   public_url=os.environ.get("DL2LS_PUBLIC_URL") or None, redis_url=url)


def perform(kind: str, project_id: int, payload: dict, key: str, reason: str = "", waited: int = 0) -> str:
    """What an RQ worker runs: the job's project lease, then `Service.attempt`, as the embedded
    runner does; a failure is one log line and a JobFailed for RQ to retry or keep."""
    from rq import get_current_job

    rq_job = get_current_job()
    job_id = rq_job.id if rq_job is not None else f"local-{uuid.uuid4().hex[:8]}"
    try:
        service = worker_service()
    except Exception as err:  # noqa: BLE001 - a worker that cannot build its service: one line, RQ retries
        log.warning("job %s %s project %d: this worker cannot run jobs: %s", job_id, kind, project_id,
                    escape(describe(err)))
        raise JobFailed(describe(err)) from None
    store: RedisStore = service.db
    lease = Lease(store.client, store.prefix, project_id, job_id,
                  group=f"sync {payload.get('run')}" if kind == "subset" else None)
    if not lease.acquire(wait=1.0):
        delay = min(BUSY_MAX, BUSY_FIRST * 2 ** min(waited, 8)) * random.uniform(0.8, 1.2)
        store.enqueue(kind, project_id, payload, reason, delay=delay, waited=waited + 1, replaces=job_id)
        store.ended(project_id, job_id, {})
        log.debug("job %s %s project %d: another job has the project: again in %.0f s", job_id, kind, project_id,
                  delay)
        return f"the project was busy: queued again in {delay:.0f} s"
    try:
        store.started(key, job_id)
        if kind == "upsert":
            payload = {"items": store.upserts(project_id, job_id)}
        retries_left = rq_job.retries_left if rq_job is not None and rq_job.retries_left is not None else 0
        attempt = JOB_ATTEMPTS - retries_left if rq_job is not None and rq_job.retry_intervals is not None else 1
        job = Job(job_id, kind, project_id, payload, attempts=max(1, attempt), reason=reason)
        outcome = service.attempt(job)
    finally:
        lease.release()
    if outcome.error is None:
        if kind == "upsert":  # (a retry, even after a kill, finds its items still taken)
            store.upserted(project_id, job_id, written=True)
        store.ended(project_id, job_id, payload)
        service.log_outcome(job, outcome, "")
        return outcome.line or ""
    if outcome.final and rq_job is not None:
        rq_job.retries_left = 0  # a setting no retry can mend
    more = rq_job is not None and (rq_job.retries_left or 0) > 0
    if more:  # the backoff the job was queued with (RQ's rule: the next of its intervals)
        what_next = f"retried in {rq_job.get_retry_interval()} s"
    else:
        if kind == "upsert":
            store.upserted(project_id, job_id, written=False)
        store.ended(project_id, job_id, payload)
        store.add_counts(project_id, failures=1, jobs_failed=1)
        what_next = f"failed for good: kept in RQ's failed registry ({QUEUE_OF[kind]})"
    service.log_outcome(job, outcome, what_next)
    raise JobFailed(outcome.error)


# ----------------------------------------------------------------------------- the worker


def make_worker_class(simple: bool = False):
    """RQ's forking Worker as dl2ls runs it (`simple`: RQ's SimpleWorker, no fork, for tests)."""
    from rq import SimpleWorker, Worker

    class DL2LSWorker(SimpleWorker if simple else Worker):
        """RQ's forking worker, with a heartbeat short enough that a dead worker's job is retried
        within seconds (RQ's default waits over a minute), and failures logged once: the job has
        already said why in one line, RQ would add the traceback of a JobFailed."""

        stopping: threading.Event | None = None  # set on a stop request: the maintenance stands down

        def get_heartbeat_ttl(self, job) -> int:
            return self.job_monitoring_interval + ABANDONED_AFTER

        def request_stop(self, signum, frame):
            if self.stopping is not None:
                self.stopping.set()
            super().request_stop(signum, frame)

        def handle_exception(self, job, *exc_info):
            if exc_info and exc_info[0] is not None and not issubclass(exc_info[0], JobFailed):
                log.warning("job %s (%s): %s", job.id, escape(job.description or ""),
                            escape(describe(exc_info[1]) if exc_info[1] is not None else exc_info[0].__name__))
            for handler in self._exc_handlers:
                if handler(job, *exc_info) is False:
                    break

    return DL2LSWorker


def _maintain(service: Service, worker, stop: threading.Event) -> None:
    """Beside the worker's loop (RQ does these every ten minutes, between jobs): retry the jobs of
    workers that died mid-job, keep a scheduler running for retries and delays, and add the
    projects' scheduled syncs. `service`: this thread's own, with its own Redis connections."""
    from rq.registry import StartedJobRegistry

    store: RedisStore = service.db
    registries = [StartedJobRegistry(name, connection=store.client, serializer=q.serializer)
                  for name, q in store.queues.items()]
    while not stop.wait(2.0):
        try:
            mine = f"{socket.gethostname()}:{os.getpid()}"
            if store.client.set(store.key("cleanup"), mine, nx=True, px=10_000):
                try:
                    for registry in registries:
                        for entry in registry.get_expired_job_ids():
                            job_id = entry.split(":")[0]
                            job = registry.job_class.fetch(job_id, connection=store.client,
                                                           serializer=registry.serializer) \
                                if store.client.exists(f"rq:job:{job_id}") else None
                            left = (job.retries_left or 0) if job is not None else 0
                            log.warning("job %s (%s): its worker stopped mid-job (no heartbeat for %d s): %s",
                                        escape(job_id), escape(job.description if job else "?"),
                                        HEARTBEAT + ABANDONED_AFTER,
                                        f"retried, {left - 1} retries left after this one" if left > 0
                                        else f"kept in RQ's failed registry ({registry.name})")
                        registry.cleanup()
                finally:
                    store.client.eval(_GIVE_UP_KEY, 1, store.key("cleanup"), mine)
            # as RQ's own maintenance does, but every few seconds: a dead worker's scheduler is
            # replaced within about a minute (RQ's lock); never once this worker is stopping
            if not stop.is_set() and worker.scheduler is not None and (
                    worker.scheduler._process is None or not worker.scheduler._process.is_alive()):
                worker.scheduler.acquire_locks(auto_start=True)
            service.refresh()
            for project_id in store.due_syncs(lambda p: service.params(p).sync_every):
                if service.params(project_id).dataset:
                    store.enqueue("sync", project_id, reason="schedule")
        except Exception as err:  # noqa: BLE001 - the maintenance must outlive any one failure
            log.warning("worker maintenance: %s", escape(describe(err)))


def run_worker(queues: list[str], burst: bool = False, name: str | None = None, verbose: bool = False) -> int:
    """`dl2ls worker`: run the service's jobs from Redis until stopped (SIGTERM: after the job
    at hand)."""
    from rq.serializers import JSONSerializer

    url = os.environ.get("REDIS_URL")
    if not url:
        raise ValueError("set REDIS_URL to the Redis the service queues its jobs in (redis://host:6379/0)")
    store = RedisStore(url)
    store.client.ping()
    # built here, in the main thread: a work horse forked while another thread imports a module
    # would wait forever on that module's lock; this imports everything a job needs first
    maintenance = service_from_env()
    import label_studio_sdk  # noqa: F401 - loaded lazily by Pusher: here once, not in every forked job
    worker_class = make_worker_class()
    worker = worker_class([store.queues[q] for q in queues], connection=store.client, serializer=JSONSerializer,
                          name=name, job_monitoring_interval=HEARTBEAT)
    stop = threading.Event()
    worker.stopping = stop
    keeper = threading.Thread(target=_maintain, args=(maintenance, worker, stop), name="dl2ls-maintenance",
                              daemon=True)
    if not burst:
        keeper.start()
    # RQ's own lines (one per job taken, done, kept) repeat ours: shown with -v only
    for noisy in ("rq.worker", "rq.job", "rq.queue", "rq.scheduler", "rq.registry"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)
    log.info("worker %s: jobs from %s on %s", worker.name, ", ".join(queues), safe_url(url))
    try:
        worker.work(burst=burst, with_scheduler=True, logging_level="DEBUG" if verbose else "WARNING")
    finally:
        stop.set()
        if keeper.is_alive():
            keeper.join(timeout=10)
        if worker.scheduler is not None and worker.scheduler._process is not None \
                and worker.scheduler._process.is_alive():
            worker.stop_scheduler()  # one the maintenance started late: Python would wait for it forever
    return 0
