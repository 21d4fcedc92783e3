"""The service: per connected Label Studio project, pre-annotate imported tasks and keep them in
step with Dataloop, by itself.

What it keeps (SQLite under MODEL_DIR, the ML-backend framework's convention; a restart loses
nothing, and every gunicorn worker shares it):
- `projects`: what `/setup` sent per project (extra params, Label Studio's URL and token, the
  labeling config's hash), when it next syncs, and what it last did (for /health and /metrics);
- `jobs`: the persisted job list. A webhook or a button only adds a job and answers; the job
  runner threads of every worker claim jobs with a lease, at most one job per project at a time
  across all workers and restarts (a job whose worker died is claimed again when its lease ends
  or, on this machine, as soon as its process is gone). Jobs are idempotent (the planner and the
  records decide what to write), so a job run twice writes nothing twice;
- per project, the sync state of `dl2ls sync` (`sync.State`) in `projects/<id>.sqlite3`: item
  rows, cursors, and dl2ls's record of what it wrote on each task.

Three kinds of job, one code path (`run_job`), whichever executor runs it:
- `connect`: choose Label Studio credentials (the /setup token, else LABEL_STUDIO_API_KEY), find
  this backend's URL in the project's ML backend records, register the TASKS_CREATED webhook;
- `preannotate`: the given tasks (from TASKS_CREATED) get their items' predictions;
- `sync`: `sync.run_once` over the project's dataset, then the tasks still without predictions
  (a webhook Label Studio did not deliver) are pre-annotated.
The scheduler (in every worker; the database lets one win each slot) adds a `sync` per project
every `sync_every`, with jitter.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import socket
import sqlite3
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from dl2ls import live, sync
from dl2ls.dataloop.api import DataloopClient, DataloopError
from dl2ls.dataloop.model import MediaDefaults
from dl2ls.labelstudio import config as lsconfig
from dl2ls.labelstudio import push
from dl2ls.labelstudio.tasks import VERSION_FIELDS, ConvertOptions, check_template
from dl2ls.report import InputError, Report, describe, escape

log = logging.getLogger("dl2ls.service")

DEFAULT_EVERY = 15 * 60.0
LEASE = 30.0  # seconds a claimed job is a worker's without a heartbeat
JOB_ATTEMPTS = 5
RETRY_FIRST, RETRY_MAX = 15.0, 30 * 60.0
POLL = 0.5  # how often an idle runner looks for jobs other workers added
CATCH_UP = 2000  # tasks without predictions pre-annotated per sync
RETRY_WITHOUT_ITEM = 24 * 3600.0  # a task no item fitted is looked for again by the catch-up after this
CHUNK_TASKS = 400  # tasks read, resolved and converted together while the previous chunk is written
FIRST_CHUNK = 50
AHEAD = 2  # chunks prepared at once
WRITE_BATCH = 500  # predictions in the first bulk write (then up to push.BATCH_TASKS)
PRIORITY = {"connect": 0, "preannotate": 1, "upsert": 1, "sync": 2, "subset": 2}
UPSERT_MAX = 200  # items one upsert writes item by item; more at once (a bulk edit) are a sync's work
MATCH_MODES = ("filename", "item-id")


class ParamsError(ValueError):
    """The extra params of a connection cannot be used: one line saying which and why."""


# ----------------------------------------------------------------------------- a project's settings


@dataclass(frozen=True)
class ProjectParams:
    """What a project's connection asks for (Label Studio's "Extra params", or the environment)."""

    dataset: str | None = None
    filters: tuple = ()
    label_map: tuple = ()  # (dataloop label, Label Studio label) pairs
    model_version: str = "dataloop"
    match: str = "filename"
    sync_every: float = DEFAULT_EVERY

    @property
    def scope(self) -> live.Scope | None:
        return live.Scope(self.dataset, self.filters) if self.dataset else None

    def options(self, config: lsconfig.LabelConfig) -> ConvertOptions:
        return ConvertOptions(config=config, label_map=dict(self.label_map), model_version=self.model_version)

    def data_keys(self, config: lsconfig.LabelConfig) -> list[str]:
        """The task data a live lookup may match an item by besides `dataloop_item_id`: the
        media (match `filename`), or nothing (match `item-id`)."""
        return [o.data_key for o in config.objects] if self.match == "filename" else []

    def shown_version(self) -> str:
        """The version the project's labeling stream should show: the template itself, or (a
        template with fields gives one version per source) its human annotations' version."""
        return self.model_version.format(**{f: ("human" if f == "source" else "") for f in VERSION_FIELDS})

    def to_json(self) -> dict:
        return {"dataset": self.dataset, "filter": list(self.filters), "label_map": dict(self.label_map),
                "model_version": self.model_version, "match": self.match, "sync_every": self.sync_every}


def parse_every(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and re.fullmatch(r"\s*\d+(\.\d+)?\s*[smh]?\s*", value):
        text = value.strip()
        unit = text[-1] if text[-1] in "smh" else "s"
        seconds = float(text.rstrip("smh").strip()) * {"s": 1, "m": 60, "h": 3600}[unit]
    else:
        raise ParamsError(f"sync_every {escape(str(value))[:40]!r}: use seconds, or a number and s, m or h (15m)")
    if not 1 <= seconds <= 7 * 86400:
        raise ParamsError("sync_every: between 1 second and 7 days")
    return seconds


def parse_params(extra: Any, default_dataset: str | None = None, default_version: str = "dataloop") -> ProjectParams:
    """Extra params as Label Studio sends them (an object, or the JSON text of one)."""
    if extra in (None, "", {}):
        extra = {}
    if isinstance(extra, str):
        try:
            extra = json.loads(extra)
        except ValueError:
            raise ParamsError("extra params: not JSON; write an object like {\"dataset\": \"<id>\"}") from None
    if not isinstance(extra, dict):
        raise ParamsError("extra params: must be a JSON object like {\"dataset\": \"<id>\"}")
    known = {"dataset", "filter", "label_map", "model_version", "match", "sync_every"}
    unknown = sorted(k for k in extra if k not in known)
    if unknown:
        raise ParamsError(f"extra params: unknown key {escape(str(unknown[0]))[:40]!r}; known: {', '.join(sorted(known))}")
    dataset = extra.get("dataset", default_dataset)
    if dataset is not None and (not isinstance(dataset, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", dataset)):
        raise ParamsError("extra params: `dataset` must be a Dataloop dataset id")
    flt = extra.get("filter") or []
    if isinstance(flt, dict):
        flt = [flt]
    if not isinstance(flt, list) or not all(isinstance(f, dict) for f in flt):
        raise ParamsError("extra params: `filter` must be a DQL object (or a list of them)")
    label_map = extra.get("label_map") or {}
    if not isinstance(label_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in label_map.items()):
        raise ParamsError("extra params: `label_map` must map Dataloop labels to Label Studio labels")
    version = extra.get("model_version") or default_version
    if not isinstance(version, str):
        raise ParamsError("extra params: `model_version` must be a text")
    try:
        check_template(version, VERSION_FIELDS, "extra params: `model_version`")
    except ValueError as err:
        raise ParamsError(str(err)) from None
    match = extra.get("match") or "filename"
    if match not in MATCH_MODES:
        raise ParamsError(f"extra params: `match` is one of {', '.join(MATCH_MODES)}")
    every = parse_every(extra["sync_every"]) if "sync_every" in extra else DEFAULT_EVERY
    return ProjectParams(dataset, tuple(flt), tuple(sorted(label_map.items())), version, match, every)


def project_id_of(ref: Any) -> int | None:
    """Label Studio names a project `<id>.<created unix time>` in /setup and /predict, an object
    with `id` in webhooks, an integer elsewhere."""
    if isinstance(ref, dict):
        ref = ref.get("id")
    if isinstance(ref, bool):
        return None
    if isinstance(ref, int):
        return ref if ref > 0 else None
    if isinstance(ref, str):
        head = ref.split(".", 1)[0].strip()
        return int(head) if head.isascii() and head.isdigit() and 0 < int(head) < 2 ** 62 else None
    return None


# ----------------------------------------------------------------------------- the database


@dataclass
class Job:
    id: int | str  # the embedded list's row id, or RQ's job id
    kind: str
    project_id: int
    payload: dict
    attempts: int = 0
    reason: str = ""

    def name(self) -> str:
        return f"job {self.id} {self.kind} project {self.project_id}"


@dataclass
class Outcome:
    """How one run of a job ended: its summary line, or its error and whether retrying can help."""

    line: str | None
    error: str | None = None
    final: bool = False
    seconds: float = 0.0


@dataclass
class ProjectRow:
    project_id: int
    params: ProjectParams
    hostname: str | None = None
    token: str | None = None
    ref: str | None = None
    connection: str = "not checked yet"
    last_sync: float | None = None
    last_line: str | None = None
    items_behind: int = 0
    failures: int = 0
    predictions_written: int = 0
    syncs: int = 0
    jobs_queued: int = 0
    jobs_failed: int = 0
    version: str = "dataloop"
    params_error: str | None = None
    stored: bool = False  # the params come from a /setup (not the defaults)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS projects (
    project_id INTEGER PRIMARY KEY, ref TEXT, hostname TEXT, token TEXT, params TEXT, params_error TEXT,
    setup_hash TEXT, setup_at REAL, next_sync REAL, connection TEXT DEFAULT 'not checked yet',
    titles TEXT DEFAULT '[]', version TEXT, last_sync REAL, last_line TEXT, items_behind INTEGER DEFAULT 0,
    failures INTEGER DEFAULT 0, predictions_written INTEGER DEFAULT 0, syncs INTEGER DEFAULT 0);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, project_id INTEGER NOT NULL, key TEXT NOT NULL,
    payload TEXT NOT NULL DEFAULT '{}', state TEXT NOT NULL DEFAULT 'queued', priority INTEGER DEFAULT 2,
    attempts INTEGER DEFAULT 0, not_before REAL DEFAULT 0, owner TEXT, lease_until REAL DEFAULT 0,
    created REAL, finished REAL, error TEXT, reason TEXT);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_queued_key ON jobs (key) WHERE state = 'queued';
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, priority, id);
CREATE TABLE IF NOT EXISTS answered (project_id INTEGER, task_id INTEGER, PRIMARY KEY (project_id, task_id));
"""


def _merge(kind: str, old: dict, new: dict) -> dict:
    """Two queued jobs with one key are one job: a pre-annotation takes both sets of tasks."""
    if kind == "upsert":
        return {"items": sorted(set(old.get("items") or []) | set(new.get("items") or []))}
    if kind == "preannotate":
        tasks = {t["id"]: t for t in (old.get("tasks") or []) + (new.get("tasks") or [])}
        return {"task_ids": sorted(set(old.get("task_ids") or []) | set(new.get("task_ids") or [])),
                "tasks": [tasks[k] for k in sorted(tasks)]}
    return {**old, **new}


class ServiceDB:
    """The service's SQLite database: one connection per thread, WAL, a busy timeout; every
    decision two workers could race on is one IMMEDIATE transaction."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.local = threading.local()
        # it holds Label Studio tokens: 0600 before SQLite opens it (its -wal and -shm files take
        # the database's mode)
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
        with self.connect() as db:
            db.executescript(_SCHEMA)
        row = self.connect().execute("SELECT value FROM meta WHERE key = 'instance'").fetchone()
        if row is None:
            with self.transaction() as db:
                db.execute("INSERT OR IGNORE INTO meta VALUES ('instance', ?)", (os.urandom(8).hex(),))
            row = self.connect().execute("SELECT value FROM meta WHERE key = 'instance'").fetchone()
        self.instance = row[0]
        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO meta VALUES ('hook_token', ?)", (os.urandom(24).hex(),))
        self.hook_token = self.connect().execute("SELECT value FROM meta WHERE key = 'hook_token'").fetchone()[0]

    def connect(self) -> sqlite3.Connection:
        db = getattr(self.local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=LEASE / 3, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self.local.db = db
        return db

    def transaction(self):
        db = self.connect()

        class Tx:
            def __enter__(self_inner):
                db.execute("BEGIN IMMEDIATE")
                return db

            def __exit__(self_inner, kind, value, tb):
                db.execute("COMMIT" if kind is None else "ROLLBACK")
                return False

        return Tx()

    # -- projects -------------------------------------------------------------------------------

    def setup(self, project_id: int, ref: str | None, hostname: str | None, token: str | None,
              params: ProjectParams | None, params_error: str | None, schema: str | None) -> bool:
        """Record what /setup sent; True when anything changed (the project is connected anew)."""
        digest = hashlib.sha1(json.dumps([ref, hostname, token, params.to_json() if params else None, params_error,
                                          schema], sort_keys=True).encode()).hexdigest()
        now = time.time()
        with self.transaction() as db:
            row = db.execute("SELECT setup_hash FROM projects WHERE project_id = ?", (project_id,)).fetchone()
            if row is not None and row[0] == digest:
                db.execute("UPDATE projects SET params_error = NULL WHERE project_id = ?", (project_id,))
                return False
            every = params.sync_every if params else DEFAULT_EVERY
            if row is None:
                db.execute("INSERT INTO projects (project_id, next_sync) VALUES (?, ?)",
                           (project_id, now + every * random.uniform(0.9, 1.0)))
            db.execute("UPDATE projects SET ref = ?, hostname = ?, token = ?, params = ?, params_error = ?, "
                       "setup_hash = ?, setup_at = ?, next_sync = MIN(COALESCE(next_sync, ?), ?) WHERE project_id = ?",
                       (ref, hostname, token, json.dumps(params.to_json()) if params else None, params_error,
                        digest, now, now + every, now + every, project_id))
            return True

    def projects(self, default: ProjectParams) -> dict[int, ProjectRow]:
        db = self.connect()
        queued = dict(db.execute("SELECT project_id, COUNT(*) FROM jobs WHERE state IN ('queued', 'running') "
                                 "GROUP BY project_id").fetchall())
        failed = dict(db.execute("SELECT project_id, COUNT(*) FROM jobs WHERE state = 'failed' "
                                 "GROUP BY project_id").fetchall())
        out = {}
        for r in db.execute("SELECT project_id, params, hostname, token, ref, connection, last_sync, last_line, "
                            "items_behind, failures, predictions_written, syncs, version, params_error "
                            "FROM projects"):
            params, stored = default, False
            if r[1]:
                try:
                    params = parse_params(json.loads(r[1]), default.dataset, default.model_version)
                    stored = True
                except ParamsError:
                    params = default
            out[r[0]] = ProjectRow(r[0], params, r[2], r[3], r[4], r[5] or "", r[6], r[7], r[8] or 0, r[9] or 0,
                                   r[10] or 0, r[11] or 0, queued.get(r[0], 0), failed.get(r[0], 0),
                                   r[12] or params.shown_version(), r[13], stored)
        return out

    def note(self, project_id: int, **fields) -> None:
        if not fields:
            return
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self.transaction() as db:
            db.execute(f"UPDATE projects SET {sets} WHERE project_id = ?", (*fields.values(), project_id))

    def add_counts(self, project_id: int, **counts: int) -> None:
        sets = ", ".join(f"{k} = {k} + ?" for k in counts)
        with self.transaction() as db:
            db.execute(f"UPDATE projects SET {sets} WHERE project_id = ?", (*counts.values(), project_id))

    # -- jobs -----------------------------------------------------------------------------------

    def enqueue(self, kind: str, project_id: int, payload: dict | None = None, reason: str = "",
                delay: float = 0.0) -> int:
        """Add a job, or merge it into the queued job with its key (a webhook delivered twice, a
        burst of Dataloop hooks, a second press of the button: one job)."""
        payload = payload or {}
        # one queued job per kind and project (merged), but each subset of a split sync on its own
        key = f"{kind}:{project_id}" + (f":{payload.get('lo')}" if kind == "subset" else "")
        now = time.time()
        with self.transaction() as db:
            row = db.execute("SELECT id, payload FROM jobs WHERE key = ? AND state = 'queued'", (key,)).fetchone()
            if row is not None:
                merged = _merge(kind, json.loads(row[1]), payload)
                if kind == "preannotate":
                    reason = f"{len(merged['task_ids'])} tasks created"
                elif kind == "upsert":
                    reason = f"Dataloop: {len(merged['items'])} items changed"
                db.execute("UPDATE jobs SET payload = ?, not_before = MIN(not_before, ?), reason = ? WHERE id = ?",
                           (json.dumps(merged), now + delay, reason[:200], row[0]))
                return row[0]
            cur = db.execute("INSERT INTO jobs (kind, project_id, key, payload, priority, not_before, created, reason) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (kind, project_id, key, json.dumps(payload), PRIORITY.get(kind, 2), now + delay, now,
                              reason[:200]))
            return cur.lastrowid

    def claim(self, owner: str, alive: Callable[[str], bool]) -> Job | None:
        """The next job no other job of its project is running beside, leased to `owner`."""
        now = time.time()
        with self.transaction() as db:
            for job_id, job_owner, key, kind, payload in db.execute(
                    "SELECT id, owner, key, kind, payload FROM jobs WHERE state = 'running'").fetchall():
                if db.execute("SELECT lease_until FROM jobs WHERE id = ?", (job_id,)).fetchone()[0] > now \
                        and alive(job_owner or ""):
                    continue
                # its worker is gone: the job goes back to the queue (merged into a queued twin)
                twin = db.execute("SELECT id, payload FROM jobs WHERE key = ? AND state = 'queued'", (key,)).fetchone()
                if twin is not None:
                    merged = _merge(kind, json.loads(payload), json.loads(twin[1]))
                    attempts = db.execute("SELECT attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
                    db.execute("UPDATE jobs SET payload = ?, attempts = MAX(attempts, ?) WHERE id = ?",
                               (json.dumps(merged), attempts, twin[0]))
                    db.execute("UPDATE jobs SET state = 'superseded', finished = ? WHERE id = ?", (now, job_id))
                elif db.execute("SELECT attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()[0] >= JOB_ATTEMPTS:
                    # a job that takes its worker down every time it runs is given up on
                    db.execute("UPDATE jobs SET state = 'failed', finished = ?, error = 'its worker stopped "
                               "mid-job on every attempt' WHERE id = ?", (now, job_id))
                else:
                    db.execute("UPDATE jobs SET state = 'queued', owner = NULL WHERE id = ?", (job_id,))
                log.warning("job %d %s: its worker %s stopped mid-job: queued again", job_id, escape(key),
                            escape(job_owner or "?"))
            row = db.execute(
                "SELECT id, kind, project_id, payload, attempts, reason FROM jobs WHERE state = 'queued' AND "
                "not_before <= ? AND project_id NOT IN (SELECT project_id FROM jobs WHERE state = 'running') "
                "ORDER BY priority, id LIMIT 1", (now,)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state = 'running', owner = ?, lease_until = ?, attempts = attempts + 1 "
                       "WHERE id = ?", (owner, now + LEASE, row[0]))
            return Job(row[0], row[1], row[2], json.loads(row[3]), row[4] + 1, row[5] or "")

    def renew(self, owner: str, job_ids: list[int]) -> None:
        if job_ids:
            with self.transaction() as db:
                db.executemany("UPDATE jobs SET lease_until = ? WHERE id = ? AND owner = ? AND state = 'running'",
                               [(time.time() + LEASE, j, owner) for j in job_ids])

    def finish(self, job: Job, owner: str, error: str | None = None, final: bool = False) -> str:
        """Done, queued again with a backoff, or failed for good; returns which."""
        now = time.time()
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM jobs WHERE id = ? AND owner = ? AND state = 'running'",
                          (job.id, owner)).fetchone() is None:
                return "lost its lease: another worker has the job"
            if error is None:
                db.execute("UPDATE jobs SET state = 'done', finished = ?, owner = NULL WHERE id = ? AND owner = ?",
                           (now, job.id, owner))
                db.execute("DELETE FROM jobs WHERE state IN ('done', 'superseded') AND finished < ?", (now - 3600,))
                return "done"
            final = final or job.attempts >= JOB_ATTEMPTS
            twin = db.execute("SELECT id, payload FROM jobs WHERE key = (SELECT key FROM jobs WHERE id = ?) AND "
                              "state = 'queued'", (job.id,)).fetchone()
            if twin is not None and not final:  # the queued twin does this job's work too
                merged = _merge(job.kind, job.payload, json.loads(twin[1]))
                db.execute("UPDATE jobs SET payload = ?, attempts = MAX(attempts, ?) WHERE id = ?",
                           (json.dumps(merged), job.attempts, twin[0]))
            if final or twin is not None:
                db.execute("UPDATE jobs SET state = ?, finished = ?, error = ?, owner = NULL WHERE id = ?",
                           ("failed" if final else "superseded", now, error[:500], job.id))
                return "failed" if final else "superseded"
            wait = min(RETRY_MAX, RETRY_FIRST * 4 ** (job.attempts - 1)) * random.uniform(0.8, 1.2)
            db.execute("UPDATE jobs SET state = 'queued', not_before = ?, error = ?, owner = NULL WHERE id = ?",
                       (now + wait, error[:500], job.id))
            return f"retried in {wait:.0f} s"

    def due_syncs(self, every: Callable[[int], float]) -> list[int]:
        """Projects whose sync is due, each claimed for this caller alone: the first worker to move
        a project's next_sync on enqueues its sync; the others find it moved."""
        now = time.time()
        due = []
        with self.transaction() as db:
            for (project_id,) in db.execute("SELECT project_id FROM projects WHERE next_sync <= ?", (now,)).fetchall():
                seconds = every(project_id)
                db.execute("UPDATE projects SET next_sync = ? WHERE project_id = ?",
                           (now + seconds * random.uniform(0.95, 1.05), project_id))
                due.append(project_id)
        return due

    def pending_tasks(self, project_id: int) -> set[int]:
        """Tasks a queued or running pre-annotation of the project will write on."""
        out: set[int] = set()
        for (payload,) in self.connect().execute("SELECT payload FROM jobs WHERE kind = 'preannotate' AND "
                                                 "project_id = ? AND state IN ('queued', 'running')", (project_id,)):
            out.update(json.loads(payload).get("task_ids") or [])
        return out

    def mark_answered(self, project_id: int, task_ids: list[int]) -> None:
        """Tasks /predict answered: Label Studio stores those answers itself, so a pre-annotation
        must read such a task back rather than take it as TASKS_CREATED described it."""
        if task_ids:
            with self.transaction() as db:
                db.executemany("INSERT OR IGNORE INTO answered VALUES (?, ?)", [(project_id, t) for t in task_ids])

    def answered(self, project_id: int, task_ids: list[int]) -> set[int]:
        out: set[int] = set()
        for i in range(0, len(task_ids), 500):
            chunk = task_ids[i:i + 500]
            out.update(t for (t,) in self.connect().execute(
                f"SELECT task_id FROM answered WHERE project_id = ? AND task_id IN ({','.join('?' * len(chunk))})",
                [project_id, *chunk]))
        return out

    def counts(self) -> dict[str, int]:
        return dict(self.connect().execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())


# ----------------------------------------------------------------------------- the service


@dataclass
class Connection:
    pusher: push.Pusher
    which: str  # for /health and the logs: which credentials serve
    titles: list[str] = field(default_factory=list)


def _host() -> str:
    return socket.gethostname()


def _alive(owner: str) -> bool:
    """Whether the process that owns a lease still runs (known only for this machine)."""
    host, _, pid = owner.rpartition(":")
    if host != _host() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Service:
    """Everything a job needs, and the job runner of this process."""

    def __init__(self, model_dir: str | os.PathLike, defaults: MediaDefaults | None = None,
                 default_dataset: str | None = None, model_version: str = "dataloop", threads: int = 2,
                 public_url: str | None = None, basic_auth: tuple[str, str] | None = None,
                 redis_url: str | None = None):
        self.model_dir = Path(model_dir)
        if redis_url:  # jobs on RQ workers: everything they share lives in Redis (see dl2ls.jobs)
            from dl2ls.jobs import RedisStore

            self.db: Any = RedisStore(redis_url)
        else:
            self.db = ServiceDB(self.model_dir / "dl2ls-service.sqlite3")
        self.on_rq = bool(redis_url)
        self.workers = 0
        self.queue_counts: dict = {}
        self.defaults = defaults or MediaDefaults()
        self.default_params = ProjectParams(dataset=default_dataset, model_version=model_version)
        self.threads = max(1, threads)
        self.public_url = public_url.rstrip("/") if public_url else None
        self.basic_auth = basic_auth
        self.cache = live.ConversionCache()
        self.connections: dict[int, Connection] = {}
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.started: int | None = None
        self.started_pid: int | None = None  # (dl2ls.jobs: the process a worker's Service belongs to)
        self.running: dict[int, Job] = {}
        self.snapshot: dict[int, ProjectRow] = {}
        self.job_counts: dict[str, int] = {}
        self._dataloop: DataloopClient | None = None
        self.dataloop_error: str | None = None
        self.refresh()

    # -- shared parts ---------------------------------------------------------------------------

    @property
    def owner(self) -> str:
        return f"{_host()}:{os.getpid()}"

    def dataloop(self) -> DataloopClient:
        if self._dataloop is None:
            try:
                self._dataloop = DataloopClient(timeout=30.0, max_wait=60.0)
                self.dataloop_error = None
            except DataloopError as err:
                self.dataloop_error = str(err)
                raise
        return self._dataloop

    def params(self, project_id: int | None) -> ProjectParams:
        row = self.snapshot.get(project_id) if project_id is not None else None
        return row.params if row is not None else self.default_params

    def refresh(self) -> None:
        """The in-memory view /health, /predict and /metrics read (no I/O in /health)."""
        try:
            self.snapshot = self.db.projects(self.default_params)
            self.job_counts = self.db.counts()
            if self.on_rq:
                self.queue_counts = self.db.queue_counts()
                self.workers = self.db.workers()
        except Exception as err:  # noqa: BLE001 - SQLite or Redis: /health says so, the next refresh retries
            log.error("reading the service state %s: %s", self.db.path, escape(describe(err)))

    # -- requests (fast: they only write the database) ------------------------------------------

    def setup(self, body: dict) -> ProjectRow | None:
        project_id = project_id_of(body.get("project"))
        if project_id is None:
            return None
        error = None
        try:
            params = parse_params(body.get("extra_params"), self.default_params.dataset,
                                  self.default_params.model_version)
        except ParamsError as err:
            params, error = None, str(err)
        token = body.get("access_token") if isinstance(body.get("access_token"), str) else None
        hostname = body.get("hostname") if isinstance(body.get("hostname"), str) else None
        schema = body.get("schema") if isinstance(body.get("schema"), str) else None
        if error:
            # refused: Label Studio keeps the connection's previous settings, and so does the service
            if project_id in self.db.projects(self.default_params):
                self.db.note(project_id, params_error=error)
            else:
                self.db.setup(project_id, str(body.get("project"))[:100], hostname, token, None, error, schema)
            self.refresh()
            raise ParamsError(error)
        changed = self.db.setup(project_id, str(body.get("project"))[:100], hostname, token, params, error, schema)
        if changed:
            with self.lock:
                self.connections.pop(project_id, None)
            self.db.enqueue("connect", project_id, reason="/setup")
            log.info("project %d: connected (dataset %s)", project_id, escape(params.dataset or "none"))
            self.wake.set()
        self.refresh()
        return self.snapshot.get(project_id)

    def enqueue(self, kind: str, project_id: int, payload: dict | None = None, reason: str = "") -> int:
        job_id = self.db.enqueue(kind, project_id, payload, reason)
        self.wake.set()
        return job_id

    def known(self, project_id: int | None) -> bool:
        """Whether the project connected this backend (a /setup): only those get jobs."""
        if project_id in self.snapshot:
            return True
        self.refresh()
        return project_id in self.snapshot

    def projects_on_dataset(self, dataset_id: str | None) -> list[int]:
        """Connected projects a Dataloop event may concern (every project when the dataset is unknown)."""
        return [p for p, row in self.snapshot.items()
                if row.params.dataset and (dataset_id is None or row.params.dataset == dataset_id)]

    # -- Label Studio ---------------------------------------------------------------------------

    def connection(self, project_id: int) -> Connection:
        """Label Studio, for this project: LABEL_STUDIO_URL (else the hostname /setup sent) with
        the token /setup sent, else with LABEL_STUDIO_API_KEY. The first that can read the
        project serves; which one is said in /health and the log."""
        with self.lock:
            known = self.connections.get(project_id)
        if known is not None:
            return known
        row = self.db.projects(self.default_params).get(project_id)
        url = os.environ.get("LABEL_STUDIO_URL") or (row.hostname if row else None)
        tried = []
        for which, token in (("the token Label Studio sent in /setup", row.token if row else None),
                             ("LABEL_STUDIO_API_KEY", os.environ.get("LABEL_STUDIO_API_KEY"))):
            if not url or not token:
                continue
            try:
                pusher = push.Pusher(url, token, timeout=60.0)
                pusher.project(project_id)
            except push.PushError as err:
                tried.append(f"{which}: {err}")
                continue
            found = Connection(pusher, which)
            with self.lock:
                self.connections[project_id] = found
            if (row.connection if row else "") != f"ok: {which}":
                self.db.note(project_id, connection=f"ok: {which}")
                log.info("project %d: Label Studio at %s, with %s", project_id, escape(url), which)
            return found
        why = "; ".join(tried) or ("no Label Studio URL: set LABEL_STUDIO_URL" if not url else
                                  "no token: Label Studio sent none; set LABEL_STUDIO_API_KEY")
        self.db.note(project_id, connection=f"failing: {why}"[:500])
        raise push.PushError(f"project {project_id}: cannot reach Label Studio: {why}")

    # -- the jobs -------------------------------------------------------------------------------

    def run_job(self, job: Job) -> str:
        """One job, whichever executor runs it; returns its one-line summary."""
        if job.kind == "connect":
            return self.connect(job.project_id)
        if job.kind == "preannotate":
            return self.preannotate(job.project_id, job.payload.get("task_ids") or [], told=job.payload.get("tasks"))
        if job.kind == "sync":
            return self.sync(job.project_id)
        if job.kind == "subset":
            return self.sync(job.project_id, sync.Subset.from_json(job.payload))
        if job.kind == "upsert":
            return self.upsert(job.project_id, job.payload.get("items") or [])
        raise ValueError(f"unknown job kind {job.kind!r}")

    def connect(self, project_id: int) -> str:
        conn = self.connection(project_id)
        backends = conn.pusher.ml_backends(project_id)
        conn.titles = [b.get("title") for b in backends if isinstance(b.get("title"), str)]
        self.db.note(project_id, titles=json.dumps(conn.titles))
        hook = self._own_url(backends)
        if hook is None:
            self.db.note(project_id, connection=f"ok: {conn.which}; no webhook: set DL2LS_PUBLIC_URL")
            return ("webhook not registered: none of the project's ML backends answers as this service; set "
                    "DL2LS_PUBLIC_URL to this backend's URL as Label Studio reaches it")
        # the webhook carries its own token, never the backend's basic auth: Label Studio shows a
        # webhook's URL and headers to the project's admins, and this token only lets its holder
        # queue pre-annotations and syncs
        base = hook + "/webhook"
        url = f"{base}?token={self.db.hook_token}"
        # Label Studio makes a webhook to a connected backend's /webhook itself (all actions): it
        # is kept, and given what it lacks (the token, TASKS_CREATED, payloads)
        mine = [w for w in conn.pusher.webhooks(project_id)
                if isinstance(w.get("url"), str) and w["url"].split("?", 1)[0] == base]
        mine.sort(key=lambda w: w.get("url") != url)  # one already ours first
        if not mine:
            conn.pusher.create_webhook(project_id, url, ["TASKS_CREATED"], {})
            what = "registered"
        else:
            found = mine[0]
            actions = list(found.get("actions") or [])
            covered = found.get("send_for_all_actions") or "TASKS_CREATED" in actions
            if covered and found.get("url") == url and found.get("is_active", True) \
                    and found.get("send_payload", True) and not found.get("headers"):
                what = "already registered"
            else:
                conn.pusher.update_webhook(found["id"], url, actions if covered else actions + ["TASKS_CREATED"],
                                           {}, all_actions=bool(found.get("send_for_all_actions")))
                what = "updated"
        return f"webhook TASKS_CREATED -> {base}: {what}"

    def _own_url(self, backends: list[dict]) -> str | None:
        if self.public_url:
            return self.public_url
        import requests

        for backend in backends:
            url = backend.get("url")
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                continue
            try:
                answer = requests.get(url.rstrip("/") + "/health", timeout=5).json()
            except (requests.RequestException, ValueError):
                continue
            if isinstance(answer, dict) and answer.get("instance") == self.db.instance:
                return url.rstrip("/")
        return None

    def _project_parts(self, project_id: int):
        row = self.db.projects(self.default_params).get(project_id)
        if row is None:
            raise ParamsError(f"project {project_id} never connected this backend (no /setup from Label Studio)")
        params = row.params
        if row.params_error and not row.stored:  # refused, and nothing good to fall back on
            raise ParamsError(row.params_error)
        if params.scope is None:
            raise ParamsError(f"project {project_id} names no Dataloop dataset: put {{\"dataset\": \"<id>\"}} in the "
                              "connection's Extra params, or set DL2LS_DATASET")
        conn = self.connection(project_id)
        if not conn.titles:
            try:
                conn.titles = [b.get("title") for b in conn.pusher.ml_backends(project_id)
                               if isinstance(b.get("title"), str)]
            except push.PushError:
                pass
        project = conn.pusher.project(project_id)
        try:
            config = lsconfig.parse(project.label_config or "")
        except lsconfig.ConfigError as err:
            raise InputError(f"project {project_id}", None, f"its labeling config: {err}") from None
        return params, conn, project, config

    def _state(self, project_id: int) -> sync.State | sync.RedisState:
        if self.on_rq:  # shared by workers on every machine; the job's project lease keeps it to one run
            return sync.RedisState(self.db.client, project_id, prefix=self.db.prefix)
        return sync.State(self.model_dir / "projects" / f"{project_id}.sqlite3")

    def preannotate(self, project_id: int, task_ids: list[int], told: list[dict] | None = None) -> str:
        """`told`: the tasks as TASKS_CREATED described them (data, meta, counts)."""
        params, conn, project, config = self._project_parts(project_id)
        state = self._state(project_id)
        try:
            return self._preannotate(project_id, params, conn, project, config, state, task_ids, None, told)
        finally:
            state.close()

    def _preannotate(self, project_id, params, conn, project, config, state, task_ids, tasks, told=None) -> str:
        """Pre-annotate tasks, a chunk at a time: a chunk's items are found, read and converted
        and its changes planned while the previous chunk is written. A task is taken as
        TASKS_CREATED described it only when it had no prediction then and dl2ls has never
        written (nor begun to write) on it; every other task is read back from Label Studio
        first, so a webhook delivered twice, or a job re-run after a crash, finds what it wrote."""
        told_by_id = {t["id"]: t for t in told or [] if isinstance(t, dict) and isinstance(t.get("id"), int)}
        started = time.monotonic()
        options = params.options(config)
        data_keys = params.data_keys(config)
        client = self.dataloop()
        report, stats = Report(), push.Stats()
        counts: Counter = Counter()
        failed: list = []
        planners: list[push.Planner] = []

        def as_told(task_id: int) -> push.ExistingTask | None:
            t = told_by_id.get(task_id)
            if t is None or t.get("total_predictions") or not isinstance(t.get("data"), dict) or not t["data"]:
                return None
            meta = t.get("meta") if isinstance(t.get("meta"), dict) else {}
            if meta.get(push.META_KEY):
                return None
            people = (t.get("total_annotations") or 0) + (t.get("cancelled_annotations") or 0)
            return push.ExistingTask(task_id, dict(t["data"]), people, 0, [], dict(meta))

        def prepare(part):
            """One chunk: its tasks (as told, or read back), their items found, read and converted."""
            if tasks is not None:
                chunk = part
            else:
                touched = state.written_to(part) | self.db.answered(project_id, part)
                known = {i: as_told(i) for i in part if i not in touched}
                ask = [i for i in part if known.get(i) is None]
                read = {t.id: t for t in state.with_records(conn.pusher.existing_tasks(project_id, task_ids=ask))} \
                    if ask else {}
                chunk = [known.get(i) or read[i] for i in part if known.get(i) is not None or i in read]
            return chunk, live.resolve(client, params.scope, [t.data for t in chunk], data_keys, options,
                                       self.defaults, self.cache)

        def prepared():
            """Chunks in order, the next ones prepared while this one is planned and written."""
            source = tasks if tasks is not None else sorted(set(task_ids))
            parts, start, size = [], 0, FIRST_CHUNK  # small first: the first write starts early
            while start < len(source):
                parts.append(source[start:start + size])
                start, size = start + size, min(2 * size, CHUNK_TASKS)
            with ThreadPoolExecutor(AHEAD, thread_name_prefix="dl2ls-prepare") as pool:
                pending = [pool.submit(prepare, part) for part in parts[:AHEAD]]
                for n in range(len(parts)):
                    chunk, fetched = pending.pop(0).result()
                    if n + AHEAD < len(parts):
                        pending.append(pool.submit(prepare, parts[n + AHEAD]))
                    yield chunk, fetched

        def changes():
            for chunk, fetched in prepared():
                counts["tasks"] += len(chunk)
                report.merge(fetched.report)
                counts["cached"] += fetched.cache_hits
                planner = push.Planner(chunk, config.objects[0].data_key,
                                       warn=lambda line: report.warn(f"project {project_id}", line),
                                       **planner_options(config, params.match))
                planners.append(planner)
                converted = {}
                for task, got in zip(chunk, fetched.tasks):
                    if got.retry:
                        report.warn(f"task {task.id}", got.retry)
                    elif got.item is None:
                        counts["no item"] += 1
                        without.append(task.id)
                    elif got.converted is not None and got.converted.task is not None:
                        converted[got.item_id] = (got.item, got.converted)
                counts["items"] += len(converted)
                planner.match_paths({key: item.get("filename") for key, (item, _) in converted.items()})
                planned = [planner.plan(done.task, done.body, stats) for _, done in converted.values()]
                state.intend(c for c in planned if c is not None and c.writes_anything)
                yield from planned

        late: list[push.Change] = []
        without: list[int] = []

        def landed(result: push.BatchResult) -> None:
            state.keep_records(result.landed)
            failed.extend(result.refused)
            late.extend(c for c in result.landed if c.data_late)

        requests_before = client.counters.requests
        # few large writes: Label Studio's cost per prediction import grows with the project
        planned = changes()
        try:
            push.apply(conn.pusher, project_id, planned, on_batch=landed, first_batch=WRITE_BATCH)
        finally:
            planned.close()  # a failed write: the chunks being prepared finish before the state closes
        failed.extend(push.complete_late(conn.pusher, late))  # fps, once every prediction is in
        state.without_item(without)
        counts["requests"] = client.counters.requests - requests_before
        if not counts["tasks"]:
            return "no tasks"
        for change, why in failed:
            report.warn(f"project {project_id}", f"item {escape(change.item or '?')}: Label Studio refused it: {why}")
        version = planners[-1].model_version(project.model_version, stats, conn.titles) if planners else None
        if version:
            conn.pusher.set_model_version(project_id, version)
        written = stats.predictions_created + stats.predictions_replaced
        top = stats.versions.most_common(1)[0][0] if stats.versions else None
        self.db.add_counts(project_id, predictions_written=written, failures=len(failed))
        if top:
            self.db.note(project_id, version=top)
        for problem in report.problems[:20]:
            log.warning("project %d: %s", project_id, problem.line())
        return (f"{counts['tasks']} tasks: {counts['items']} items from Dataloop ({counts['requests']} requests, "
                f"{counts['cached']} cached), {counts['no item']} without an item; Label Studio: {stats.summary()}; "
                f"{time.monotonic() - started:.1f} s")

    def upsert(self, project_id: int, item_ids: list[str]) -> str:
        """Items a Dataloop hook named, written on the tasks dl2ls keeps them on (its records), with
        no listing of the dataset or of the project: a few requests per item. An item dl2ls has
        not written yet, one Dataloop no longer has (a deletion), or a bulk edit of more than
        UPSERT_MAX items is a sync's work: one is queued (it reads what changed since its cursor)."""
        if len(item_ids) > UPSERT_MAX:
            self.db.enqueue("sync", project_id, reason=f"Dataloop: {len(item_ids)} items changed at once")
            self.wake.set()
            return f"{len(item_ids)} items: a sync queued instead"
        params, conn, project, config = self._project_parts(project_id)
        state = self._state(project_id)
        try:
            client = self.dataloop()
            where = state.tasks_of(item_ids)
            present = [i for i in item_ids if i in where and client.find_item(i) is not None]
            others = len(item_ids) - len(present)
            if others:
                self.db.enqueue("sync", project_id, reason=f"Dataloop: {others} items new or deleted")
                self.wake.set()
            if not present:
                return f"{len(item_ids)} items: new or deleted, a sync queued"
            tasks = list(state.with_records(conn.pusher.existing_tasks(project_id,
                                                                        task_ids=sorted({where[i] for i in present}))))
            line = self._preannotate(project_id, params, conn, project, config, state, [], tasks)
            return line + (f"; {others} items new or deleted: a sync queued" if others else "")
        finally:
            state.close()

    def sync(self, project_id: int, subset: sync.Subset | None = None) -> str:
        """A sync of the project; when its changed items span several export subsets, each is
        queued as a job of its own (`subset`), which RQ workers run side by side."""
        params, conn, project, config = self._project_parts(project_id)
        state = self._state(project_id)
        try:
            report = Report()
            parts: list[sync.Subset] = []
            run = os.urandom(4).hex()

            def hand_over(ranges: list[sync.Subset]) -> None:
                """Queued before the run moves its cursor (see sync.run_once)."""
                for part in ranges:
                    self.db.enqueue("subset", project_id, {**part.to_json(), "run": run},
                                    reason=f"{len(part.items)} items of a split sync")
                parts.extend(ranges)
                self.wake.set()

            summary = sync.run_once(
                self.dataloop(), conn.pusher, params.dataset, project_id, state, list(params.filters),
                params.options(config), self.defaults, report,
                planner_options=planner_options(config, params.match),
                live=conn.titles, on_subsets=hand_over if subset is None else None, subset=subset)
            for problem in report.problems[:20]:
                log.warning("project %d: %s", project_id, problem.line())
            written = summary.stats.predictions_created + summary.stats.predictions_replaced
            top = summary.stats.versions.most_common(1)[0][0] if summary.stats.versions else None
            if subset is not None:
                self.db.add_counts(project_id, predictions_written=written)
                if top:
                    self.db.note(project_id, version=top)
                return f"subset {subset.lo}..{subset.hi} of " + summary.line()
            self.db.note(project_id, last_sync=time.time(), last_line=summary.line()[:500],
                         items_behind=summary.failed + summary.quarantined, **({"version": top} if top else {}))
            self.db.add_counts(project_id, predictions_written=written, syncs=1)
            if parts:  # the subsets write the tasks still without predictions; the next sync catches up
                return summary.line()
            # tasks Label Studio never told us about (a webhook it did not deliver, a restart), and
            # tasks still without the fps the config reads (a run stopped before it was written)
            waiting: list[push.ExistingTask] = []
            page: list[push.ExistingTask] = []
            lacking = planner_options(config)["complete"]

            def untried(tasks: list[push.ExistingTask]) -> list[push.ExistingTask]:
                lately = state.tried_lately([t.id for t in tasks], RETRY_WITHOUT_ITEM)
                return [t for t in tasks if t.id not in lately]

            # newest first; tasks no item fitted lately wait a day, so the others are reached
            for task in conn.pusher.existing_tasks(project_id, without_predictions=True, lacking=lacking):
                page.append(task)
                if len(page) >= 500:
                    waiting += untried(page)
                    page = []
                    if len(waiting) >= CATCH_UP:
                        break
            waiting = (waiting + untried(page))[:CATCH_UP]
            line = summary.line()
            if waiting:
                line += "; catch-up: " + self._preannotate(project_id, params, conn, project, config, state, [],
                                                          list(state.with_records(waiting)))
            return line
        finally:
            state.close()

    # -- the runner -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start this process's job runner and scheduler (once per process: after a fork too)."""
        if self.started == os.getpid():
            return
        with self.lock:
            if self.started == os.getpid():
                return
            self.started = os.getpid()
            self.running = {}
            self.connections = {}
            if not self.on_rq:
                for n in range(self.threads):
                    threading.Thread(target=self._work, name=f"dl2ls-job-{n}", daemon=True).start()
            threading.Thread(target=self._tick, name="dl2ls-scheduler", daemon=True).start()
        if self.on_rq:
            log.info("jobs go to RQ queues on %s: `dl2ls worker` runs them", self.db.path)
        else:
            log.info("job runner started: %d threads in process %d", self.threads, os.getpid())

    def _tick(self) -> None:
        """Once a second: due syncs, lease heartbeats, the in-memory view."""
        while True:
            try:  # the heartbeat first, on its own: nothing else may cost a running job its lease
                with self.lock:
                    ids = list(self.running)
                self.db.renew(self.owner, ids)
            except Exception as err:  # noqa: BLE001 - the scheduler must outlive any one failure
                log.error("renewing job leases: %s", escape(describe(err)))
            try:
                self.refresh()
                for project_id in self.db.due_syncs(lambda p: self.params(p).sync_every):
                    if self.params(project_id).dataset:
                        self.enqueue("sync", project_id, reason="schedule")
            except Exception as err:  # noqa: BLE001 - the scheduler must outlive any one failure
                log.error("scheduler: %s", escape(describe(err)))
            time.sleep(1.0)

    def _work(self) -> None:
        while True:
            try:
                job = self.db.claim(self.owner, _alive)
            except sqlite3.Error as err:
                log.error("claiming a job: %s", escape(str(err)))
                job = None
            if job is None:
                self.wake.wait(POLL)
                self.wake.clear()
                continue
            self.run_claimed(job)

    def attempt(self, job: Job) -> "Outcome":
        """Run a job and classify how it ended: one rule for both executors (this process's
        runner threads, and RQ workers)."""
        with self.lock:
            self.running[job.id] = job
        started = time.monotonic()
        line, error, final = None, None, False
        try:
            line = self.run_job(job)
        except ParamsError as err:  # the connection's settings: no retry helps until /setup changes them
            error, final = str(err), True
        except push.PushError as err:
            error = str(err)
            with self.lock:  # credentials may have been revoked: choose again next time
                self.connections.pop(job.project_id, None)
        except (DataloopError, InputError, sync.SyncBusy, sync.StateError) as err:
            error = str(err)
        except Exception as err:  # noqa: BLE001 - one job's failure is one line, and a retry
            error = describe(err)
            log.debug("%s", job.name(), exc_info=True)
        finally:
            with self.lock:
                self.running.pop(job.id, None)
        return Outcome(line, error, final, time.monotonic() - started)

    def log_outcome(self, job: Job, outcome: "Outcome", what_next: str) -> None:
        """The one log line a job leaves."""
        why = f" ({escape(job.reason)})" if job.reason else ""
        if outcome.error is None:
            log.info("%s%s: %s", job.name(), why, outcome.line)
        else:
            log.warning("%s%s: failed after %.1f s (attempt %d): %s; %s", job.name(), why, outcome.seconds,
                        job.attempts, escape(outcome.error), what_next)

    def run_claimed(self, job: Job) -> None:
        outcome = self.attempt(job)
        what_next = self.db.finish(job, self.owner, outcome.error, outcome.final)
        self.log_outcome(job, outcome, what_next)
        if outcome.error is not None and what_next == "failed":
            self.db.add_counts(job.project_id, failures=1)
        self.refresh()

    # -- what it shows --------------------------------------------------------------------------

    def health(self) -> dict:
        return {
            "dataloop": "ok" if self.dataloop_error is None else f"failing: {self.dataloop_error}",
            "jobs": self.job_counts,
            "executor": ({"rq": self.db.path, "workers": self.workers} if self.on_rq
                         else {"in-process": self.threads}),
            "projects": {str(p): {"dataset": r.params.dataset, "label_studio": r.connection,
                                  "last_sync": r.last_sync, "jobs_queued": r.jobs_queued,
                                  "items_behind": r.items_behind, "failures": r.failures,
                                  "predictions_written": r.predictions_written,
                                  **({"error": r.params_error} if r.params_error else {})}
                         for p, r in self.snapshot.items()},
        }

    def metrics(self) -> str:
        """Prometheus text exposition of the per-project figures (and the job queue)."""
        self.refresh()
        lines = []

        def family(name: str, kind: str, help_text: str, values: list[tuple[dict, float]]) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in values:
                text = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
                lines.append(f"{name}{{{text}}} {value:g}" if text else f"{name} {value:g}")

        rows = sorted(self.snapshot.values(), key=lambda r: r.project_id)
        family("dl2ls_last_sync_timestamp_seconds", "gauge", "When the project's last sync finished (unix time).",
               [({"project": r.project_id}, r.last_sync) for r in rows if r.last_sync])
        family("dl2ls_syncs_total", "counter", "Syncs run for the project.",
               [({"project": r.project_id}, r.syncs) for r in rows])
        family("dl2ls_items_behind", "gauge", "Items the last sync could not write (failing or quarantined).",
               [({"project": r.project_id}, r.items_behind) for r in rows])
        family("dl2ls_jobs_queued", "gauge", "Jobs queued or running for the project.",
               [({"project": r.project_id}, r.jobs_queued) for r in rows])
        family("dl2ls_job_failures_total", "counter", "Jobs that failed for good, and items Label Studio refused.",
               [({"project": r.project_id}, r.failures) for r in rows])
        family("dl2ls_predictions_written_total", "counter", "Predictions written (created or replaced).",
               [({"project": r.project_id}, r.predictions_written) for r in rows])
        family("dl2ls_jobs", "gauge", "Jobs in the persisted job list, by state.",
               [({"state": s}, n) for s, n in sorted(self.job_counts.items())])
        if self.on_rq:
            family("dl2ls_rq_jobs", "gauge", "Jobs in RQ's queue and registries, by queue and state (failed: "
                   "kept after their last retry).",
                   [({"queue": q, "state": s}, n) for (q, s), n in sorted(self.queue_counts.items())])
            family("dl2ls_rq_workers", "gauge", "RQ workers listening on the service's queues.",
                   [({}, self.workers)])
        return "\n".join(lines) + "\n"


def planner_options(config: lsconfig.LabelConfig, match: str = "filename") -> dict:
    """How the service plans: tasks are the project's own (matched by path, never created), and
    dl2ls's records stay in its state rather than one request per task; only `fps` is added to a
    task that lacks it when the config's frameRate reads it (the editor's clock depends on it)."""
    needs_fps = any(o.frame_rate == "$fps" for o in config.objects)
    return {"match_mode": match, "create_tasks": False, "task_writes": False,
            "complete": ("fps",) if needs_fps else ()}


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")
