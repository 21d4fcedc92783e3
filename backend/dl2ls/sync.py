"""Keep a Label Studio project's predictions in step with a Dataloop dataset.

One run, within a scope (the dataset and the --filter; the state keeps each scope apart, so a run
over another filter never takes away what an earlier scope wrote):
1. lists the scope's items (id, updatedAt, annotationsCount; paged by the server's own
   hasNextPage) and asks for annotations updated since the scope's cursor, so an edited, added or
   deleted annotation, a new item and a deleted item are all noticed without reading every item;
2. reads the candidates' annotations (through one streamed export when they are many) and drops
   those whose content hash has not changed;
3. converts the rest (`convert_item`) and lets the one planner decide every change, as push does;
   an item missing from the listing is deleted only when Dataloop says it is gone (an item that
   merely left the filter is forgotten, not deleted), and never more than a small share of the
   project in one run without --allow-mass-delete;
4. records the state batch by batch, as each batch lands: a run killed anywhere is finished by
   the next, without duplicates, and one item Label Studio refuses (or that fails to convert) is
   quarantined with a growing backoff, reported on every run, while the rest keeps flowing.
A lock file keeps two syncs off one state.

The rule's limits: Dataloop's query API is trusted to list every item and every annotation updated
after the cursor; the cursor is the newest updatedAt Dataloop showed minus a margin for clock skew
(annotations touched in that margin are re-read and found unchanged by their hash).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import orjson

from dl2ls.convert import convert_item, settings_fingerprint
from dl2ls.live import in_order
from dl2ls.dataloop.api import DataloopClient, item_key
from dl2ls.dataloop.model import MediaDefaults, decode_item
from dl2ls.dataloop.read import Entry, ReadLimits
from dl2ls.labelstudio import config as lsconfig
from dl2ls.labelstudio import push
from dl2ls.labelstudio.tasks import ConvertOptions
from dl2ls.report import InputError, Report

log = logging.getLogger("dl2ls.sync")

SKEW = dt.timedelta(minutes=5)  # re-read annotations touched this long before the newest change seen
EXPORT_AT = 50  # more candidates than this (and a fifth of the dataset): one export, not a read per item
SUBSET_SIZE = 50_000  # dtlpy's MAX_ITEMS_PER_SUBSET: a larger export is split by item-id ranges
QUARANTINE_AFTER = 2  # failures in a row before an item waits between tries
BACKOFF_FIRST, BACKOFF_MAX = 60.0, 24 * 3600.0  # seconds; the wait grows 4x per failure


class SyncBusy(Exception):
    """Another sync holds the state's lock."""


class StateError(Exception):
    """The state file cannot be used (not SQLite, not writable)."""


@dataclass
class RunSummary:
    seen: int = 0
    candidates: int = 0
    changed: int = 0
    deleted: int = 0
    left_scope: int = 0
    failed: int = 0
    quarantined: int = 0
    deletions_refused: bool = False
    subsets: int = 0  # parts handed to jobs of their own (see Subset)
    dataloop_requests: int = 0
    seconds: float = 0.0
    stats: push.Stats = field(default_factory=push.Stats)

    def line(self) -> str:
        extra = "".join(f", {name} {value}" for name, value in (("left the scope", self.left_scope),
                                                                ("quarantined", self.quarantined),
                                                                ("subsets queued", self.subsets)) if value)
        return (f"sync: items seen {self.seen}, read {self.candidates}, changed {self.changed}, deleted "
                f"{self.deleted}, failed {self.failed}{extra}; Label Studio: {self.stats.summary()}; "
                f"{self.dataloop_requests} Dataloop requests; {self.seconds:.1f} s")


@dataclass
class Subset:
    """A part of one sync's work: the changed items of one item-id range, read with one export of
    that range (at most SUBSET_SIZE items, as dtlpy splits exports) and written by a job of its own."""

    lo: str
    hi: str
    items: list[str]

    def to_json(self) -> dict:
        return {"lo": self.lo, "hi": self.hi, "items": self.items}

    @classmethod
    def from_json(cls, doc: dict) -> "Subset":
        return cls(str(doc["lo"]), str(doc["hi"]), [str(i) for i in doc.get("items") or []])

    def filters(self) -> list[dict]:
        return [{"id": {"$gte": self.lo}}, {"id": {"$lte": self.hi}}]


def split_subsets(listed: Iterable[str], candidates: Iterable[str], size: int) -> list[Subset]:
    """Item-id ranges holding at most `size` listed items each (Dataloop sorts and compares ids as
    text, as dtlpy's ranges do), each with the candidates it holds; ranges without any are left out."""
    wanted = set(candidates)
    ids = sorted(listed)
    out = []
    for start in range(0, len(ids), max(1, size)):
        part = ids[start:start + size]
        mine = [i for i in part if i in wanted]
        if mine:
            out.append(Subset(part[0], part[-1], mine))
    return out


def subset_size() -> int:
    """DL2LS_SUBSET_SIZE, else dtlpy's 50,000."""
    try:
        return max(1, int(os.environ.get("DL2LS_SUBSET_SIZE") or SUBSET_SIZE))
    except ValueError:
        return SUBSET_SIZE


@dataclass
class ItemRow:
    """What the state remembers of one item."""

    item_id: str
    updated_at: str | None
    annotations: int | None
    content_hash: str | None  # None: not written yet (new, or failing)
    versions: list[str]
    scope: str
    failures: int = 0
    retry_at: float = 0.0
    last_error: str | None = None

    def as_row(self) -> tuple:
        return (self.item_id, self.updated_at, self.annotations, self.content_hash, json.dumps(self.versions),
                self.scope, self.failures, self.retry_at, self.last_error)

    def failed(self, reason: str, now: float) -> "ItemRow":
        failures = self.failures + 1
        wait = 0.0 if failures < QUARANTINE_AFTER else min(BACKOFF_MAX, BACKOFF_FIRST * 4 ** (failures - QUARANTINE_AFTER))
        return ItemRow(self.item_id, self.updated_at, self.annotations, None, self.versions, self.scope,
                       failures, now + wait, reason[:500])


_COLUMNS = ("item_id", "updated_at", "annotations", "content_hash", "versions", "scope", "failures", "retry_at",
            "last_error")


class State:
    """The sync's memory, in SQLite: per scope its cursor and, per item, what was last written."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.lock_file = open(self.path.with_name(self.path.name + ".lock"), "a+")
        except OSError as err:
            raise StateError(f"cannot open the state's lock file next to {self.path}: {err.strerror}") from None
        try:
            fcntl.flock(self.lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.lock_file.close()
            raise SyncBusy(f"another dl2ls sync is running on {self.path} (its lock file is held)") from None
        try:
            # batches are recorded from push's writer thread as they land: one connection, one lock
            self.db = sqlite3.connect(self.path, check_same_thread=False)
            self.lock = threading.Lock()
            # a commit per landed batch (and, in the service, per write announced): WAL makes each
            # one cheap, and a killed process still loses no committed row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            # one row per scope and item: overlapping scopes (the dataset, and a filter within it)
            # keep their own records of what they wrote and of what failed
            self.db.executescript("""
                CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
                CREATE TABLE IF NOT EXISTS item_state (
                    scope TEXT NOT NULL, item_id TEXT NOT NULL, updated_at TEXT, annotations INTEGER,
                    content_hash TEXT, versions TEXT, failures INTEGER DEFAULT 0, retry_at REAL DEFAULT 0,
                    last_error TEXT, PRIMARY KEY (scope, item_id));
                CREATE TABLE IF NOT EXISTS task_record (task_id INTEGER PRIMARY KEY, item TEXT, record TEXT);
                CREATE TABLE IF NOT EXISTS task_without_item (task_id INTEGER PRIMARY KEY, tried_at REAL);
            """)
            old = self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'items'").fetchone()
            if old:  # a state written before scopes: its rows become the legacy scope ''
                with self.db:
                    self.db.execute("INSERT OR IGNORE INTO item_state (scope, item_id, updated_at, annotations, "
                                    "content_hash, versions) SELECT '', item_id, updated_at, annotations, content_hash, "
                                    "versions FROM items")
                    self.db.execute("DROP TABLE items")
            self.db.commit()
        except sqlite3.Error as err:
            fcntl.flock(self.lock_file, fcntl.LOCK_UN)
            self.lock_file.close()
            raise StateError(f"{self.path} is not a dl2ls state (SQLite said: {err})") from None

    def close(self) -> None:
        self.db.close()
        fcntl.flock(self.lock_file, fcntl.LOCK_UN)
        self.lock_file.close()

    def get(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def items(self, scope: str, only: Iterable[str] | None = None) -> dict[str, ItemRow]:
        """The items this scope wrote (rows of a state from before scopes count as every scope's,
        until the scope writes its own); `only`: of these items alone (a subset's)."""
        sql = f"SELECT {', '.join(_COLUMNS)} FROM item_state WHERE scope IN ('', ?) "
        if only is None:
            with self.lock:
                rows = self.db.execute(sql + "ORDER BY scope = ''  DESC", (scope,)).fetchall()
        else:
            rows = sorted(self._rows_in(sql + "AND item_id IN", only, scope), key=lambda r: r[5] != "")
        return {r[0]: ItemRow(r[0], r[1], r[2], r[3], json.loads(r[4] or "[]"), scope, r[6] or 0, r[7] or 0.0, r[8])
                for r in rows}

    def commit(self, rows: list[ItemRow], forget: list[tuple[str, str]] = (),
               meta: dict[str, str] | None = None) -> None:
        """Rows to keep and (scope, item id) pairs to forget, in one transaction. A scope's own row
        replaces the item's row from before scopes."""
        with self.lock, self.db:
            if meta:
                self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(meta.items()))
            gone = [(r.scope, r.item_id) for r in rows] + list(forget)
            self.db.executemany("DELETE FROM item_state WHERE item_id = ? AND scope IN ('', ?)",
                                [(item, scope) for scope, item in gone])
            self.db.executemany(f"INSERT INTO item_state ({', '.join(_COLUMNS)}) VALUES "
                                f"({', '.join('?' * len(_COLUMNS))})", [r.as_row() for r in rows])


    def with_records(self, tasks: Iterable[push.ExistingTask]) -> Iterator[push.ExistingTask]:
        """Tasks as the planner should see them when dl2ls keeps its record of what it wrote here
        rather than in the tasks' meta (the service: one request per task would cost more than the
        predictions): a task's own meta record, where it has one, still wins."""
        batch: list[push.ExistingTask] = []

        def flush() -> Iterator[push.ExistingTask]:
            marks = ",".join("?" * len(batch))
            with self.lock:  # the writer thread records batches on this connection meanwhile
                rows = dict(self.db.execute(f"SELECT task_id, record FROM task_record WHERE task_id IN ({marks})",
                                            [t.id for t in batch]).fetchall()) if batch else {}
            for task in batch:
                if task.id in rows and not task.recorded:
                    task.meta = {**task.meta, push.META_KEY: json.loads(rows[task.id])}
                yield task

        for task in tasks:
            batch.append(task)
            if len(batch) >= 500:
                yield from flush()
                batch = []
        yield from flush()

    def _rows_in(self, sql: str, values: Iterable, *params) -> list[tuple]:
        """`sql` ending in `IN`, run over `values` a few hundred at a time (SQLite's limit on
        parameters), under the lock: other threads share this connection."""
        wanted, rows = list(values), []
        for i in range(0, len(wanted), 500):
            chunk = wanted[i:i + 500]
            with self.lock:
                rows += self.db.execute(f"{sql} ({','.join('?' * len(chunk))})", [*params, *chunk]).fetchall()
        return rows

    def tasks_of(self, items: Iterable[str]) -> dict[str, int]:
        """item -> the task dl2ls recorded writing it on (see `keep_records`)."""
        return {item: task for task, item in self._rows_in("SELECT task_id, item FROM task_record WHERE item IN",
                                                          items)}

    def written_to(self, task_ids: Iterable[int]) -> set[int]:
        """Those of these tasks dl2ls wrote on, or was about to (see `intend`)."""
        return {t for (t,) in self._rows_in("SELECT task_id FROM task_record WHERE task_id IN", task_ids)}

    def intend(self, changes: Iterable[push.Change]) -> None:
        """Before writing on tasks: a mark that something may land there, so that a run killed
        before `keep_records` reads those tasks back instead of trusting what it was told of them."""
        rows = [(c.task_id, c.item, "{}") for c in changes if c.task_id is not None]
        with self.lock, self.db:
            self.db.executemany("INSERT OR IGNORE INTO task_record VALUES (?, ?, ?)", rows)

    def without_item(self, task_ids: Iterable[int], now: float | None = None) -> None:
        """Tasks no Dataloop item fits (yet): the catch-up leaves them alone for a while."""
        with self.lock, self.db:
            self.db.executemany("INSERT OR REPLACE INTO task_without_item VALUES (?, ?)",
                                [(t, now or time.time()) for t in task_ids])

    def tried_lately(self, task_ids: Iterable[int], within: float) -> set[int]:
        return {t for (t,) in self._rows_in("SELECT task_id FROM task_without_item WHERE tried_at > ? AND task_id IN",
                                            task_ids, time.time() - within)}

    def keep_records(self, changes: Iterable[push.Change]) -> None:
        """What landed on each task, for `with_records` (a deleted task's record goes)."""
        keep = [(c.task_id, c.item, json.dumps(c.record)) for c in changes
                if c.task_id is not None and c.record is not None and not c.delete_task]
        gone = [(c.task_id,) for c in changes if c.task_id is not None and c.delete_task]
        with self.lock, self.db:
            self.db.executemany("INSERT OR REPLACE INTO task_record VALUES (?, ?, ?)", keep)
            self.db.executemany("DELETE FROM task_record WHERE task_id = ?", gone)


class RedisState:
    """The same memory as `State`, in Redis, so that `dl2ls worker`s on several machines share it.

    Under `{prefix}:state:{project_id}:`: `meta` (key -> value), `items:{scope}` (item id -> its row,
    as compact JSON), `tasks` (task id -> {"item", "record"}), `task-of` (item -> "task id,task id...",
    the reverse of `tasks`, for `tasks_of`) and `without` (task id -> when it was last tried). No lock
    file: the job holds the project's lease; subset jobs of one project still write at once, so each
    call is one transaction of its own."""

    # a task's record and the reverse index change together, server-side: atomic, and the index
    # follows the item the record held before, which a MULTI could not read
    # (ARGV: op, task id, value triples in order; "put" replaces, "add" only when absent, "del" removes)
    _RECORDS = """
        local tasks, index = KEYS[1], KEYS[2]
        local function item_of(value)
            if not value then return nil end
            local item = cjson.decode(value)["item"]
            if type(item) == "string" then return item end
            return nil
        end
        local function unindex(task, item)
            if item == nil then return end
            local ids, kept = redis.call("HGET", index, item), {}
            if not ids then return end
            for id in string.gmatch(ids, "[^,]+") do
                if id ~= task then kept[#kept + 1] = id end
            end
            if #kept == 0 then
                redis.call("HDEL", index, item)
            else
                redis.call("HSET", index, item, table.concat(kept, ","))
            end
        end
        local function index_it(task, item)
            if item == nil then return end
            local ids = redis.call("HGET", index, item)
            if not ids then
                redis.call("HSET", index, item, task)
                return
            end
            for id in string.gmatch(ids, "[^,]+") do
                if id == task then return end
            end
            redis.call("HSET", index, item, ids .. "," .. task)
        end
        for i = 1, #ARGV, 3 do
            local op, task, value = ARGV[i], ARGV[i + 1], ARGV[i + 2]
            local old = redis.call("HGET", tasks, task)
            if op == "del" then
                if old then
                    unindex(task, item_of(old))
                    redis.call("HDEL", tasks, task)
                end
            elseif op == "put" or not old then
                if old then unindex(task, item_of(old)) end
                redis.call("HSET", tasks, task, value)
                index_it(task, item_of(value))
            end
        end
        return 0
    """
    BATCH = 500  # ids per HMGET, fields per HSET/HDEL and per HSCAN page's hint: no giant command or reply

    def __init__(self, redis_client, project_id: int, prefix: str = "dl2ls"):
        import redis  # Redis mode only

        self.redis = redis_client
        # for messages: never the client's URL, which may hold a password
        self.path = f"redis:{prefix}:state:{int(project_id)}"
        self.key = f"{prefix}:state:{int(project_id)}:"
        self._records = redis_client.register_script(self._RECORDS)
        try:
            redis_client.ping()
        except redis.RedisError as err:
            raise StateError(f"cannot reach the state at {self.path}: {err}") from None

    def close(self) -> None:
        """Nothing to release: the client is the caller's (its pool serves other projects)."""

    def get(self, key: str) -> str | None:
        return _text(self.redis.hget(self.key + "meta", key))

    def items(self, scope: str, only: Iterable[str] | None = None) -> dict[str, ItemRow]:
        """The items this scope wrote, paged (HSCAN): a scope may hold hundreds of thousands;
        `only`: of these items alone (a subset's)."""
        out = {}
        if only is not None:
            wanted = list(only)
            pairs = ((item, value) for i in range(0, len(wanted), self.BATCH)
                     for item, value in zip(wanted[i:i + self.BATCH],
                                            self.redis.hmget(self.key + f"items:{scope}", wanted[i:i + self.BATCH]))
                     if value is not None)
        else:
            pairs = self.redis.hscan_iter(self.key + f"items:{scope}", count=self.BATCH * 2)
        for item, value in pairs:
            item = _text(item)
            updated_at, annotations, digest, versions, failures, retry_at, last_error = orjson.loads(value)
            out[item] = ItemRow(item, updated_at, annotations, digest, versions, scope, failures or 0,
                                retry_at or 0.0, last_error)
        return out

    def commit(self, rows: list[ItemRow], forget: list[tuple[str, str]] = (),
               meta: dict[str, str] | None = None) -> None:
        """Rows to keep and (scope, item id) pairs to forget, in one transaction (MULTI/EXEC); a row
        also forgotten is kept, as in `State`."""
        gone: dict[str, list[str]] = {}
        for scope, item in forget:
            gone.setdefault(scope, []).append(item)
        kept: dict[str, dict[str, bytes]] = {}
        for r in rows:
            kept.setdefault(r.scope, {})[r.item_id] = orjson.dumps(
                [r.updated_at, r.annotations, r.content_hash, r.versions, r.failures, r.retry_at, r.last_error])
        with self.redis.pipeline(transaction=True) as pipe:
            if meta:
                pipe.hset(self.key + "meta", mapping=meta)
            for scope, items in gone.items():
                for i in range(0, len(items), self.BATCH):
                    pipe.hdel(self.key + f"items:{scope}", *items[i:i + self.BATCH])
            for scope, fields in kept.items():
                pairs = list(fields.items())
                for i in range(0, len(pairs), self.BATCH):
                    pipe.hset(self.key + f"items:{scope}", mapping=dict(pairs[i:i + self.BATCH]))
            pipe.execute()

    def with_records(self, tasks: Iterable[push.ExistingTask]) -> Iterator[push.ExistingTask]:
        """As `State.with_records`: a task's own meta record, where it has one, still wins."""
        batch: list[push.ExistingTask] = []

        def flush() -> Iterator[push.ExistingTask]:
            values = self.redis.hmget(self.key + "tasks", [t.id for t in batch]) if batch else []
            for task, value in zip(batch, values):
                if value is not None and not task.recorded:
                    task.meta = {**task.meta, push.META_KEY: orjson.loads(value)["record"]}
                yield task

        for task in tasks:
            batch.append(task)
            if len(batch) >= self.BATCH:
                yield from flush()
                batch = []
        yield from flush()

    def _values(self, name: str, fields: Iterable) -> Iterator[tuple]:
        """(field, value or None) of hash `name`, HMGET a few hundred fields at a time."""
        wanted = list(fields)
        for i in range(0, len(wanted), self.BATCH):
            chunk = wanted[i:i + self.BATCH]
            yield from zip(chunk, self.redis.hmget(self.key + name, chunk))

    def tasks_of(self, items: Iterable[str]) -> dict[str, int]:
        """item -> the task dl2ls recorded writing it on; of several, the highest id (what `State`'s
        table scan gives)."""
        found = self._values("task-of", (i for i in items if i is not None))
        return {item: max(int(t) for t in _text(ids).split(",")) for item, ids in found if ids}

    def written_to(self, task_ids: Iterable[int]) -> set[int]:
        """Those of these tasks dl2ls wrote on, or was about to (see `intend`)."""
        return {t for t, value in self._values("tasks", [int(t) for t in task_ids]) if value is not None}

    def intend(self, changes: Iterable[push.Change]) -> None:
        """As `State.intend`: an empty record where the task has none (an existing one stays)."""
        self._change_records([("add", c.task_id, {"item": c.item, "record": {}}) for c in changes
                              if c.task_id is not None])

    def without_item(self, task_ids: Iterable[int], now: float | None = None) -> None:
        """Tasks no Dataloop item fits (yet): the catch-up leaves them alone for a while."""
        tried = {int(t): now or time.time() for t in task_ids}
        if tried:
            self.redis.hset(self.key + "without", mapping=tried)

    def tried_lately(self, task_ids: Iterable[int], within: float) -> set[int]:
        since = time.time() - within
        return {t for t, at in self._values("without", [int(t) for t in task_ids]) if at is not None
                and float(at) > since}

    def keep_records(self, changes: Iterable[push.Change]) -> None:
        """What landed on each task, for `with_records` (a deleted task's record goes), and the
        reverse index with it, in one script run."""
        changes = list(changes)
        self._change_records([("put", c.task_id, {"item": c.item, "record": c.record}) for c in changes
                              if c.task_id is not None and c.record is not None and not c.delete_task]
                             + [("del", c.task_id, None) for c in changes if c.task_id is not None and c.delete_task])

    def _change_records(self, ops: list[tuple[str, int, dict | None]]) -> None:
        if not ops:
            return
        args: list = []
        for op, task_id, value in ops:
            args += [op, int(task_id), b"" if value is None else orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)]
        self._records(keys=[self.key + "tasks", self.key + "task-of"], args=args)


def _text(value: bytes | str | None) -> str | None:
    """A reply as text, whether or not the client decodes responses itself."""
    return value.decode() if isinstance(value, bytes) else value


def scope_of(dataset_id: str, filters: list[dict] | None) -> str:
    """What a run looks at: the dataset and the filter, as one short key."""
    text = json.dumps({"dataset": dataset_id, "filter": filters or []}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def content_hash(item: dict, fingerprint: str) -> str:
    """What decides whether an item must be written again: its annotations, the metadata that
    shapes the task (size, clock, names), and the conversion's own settings and config."""
    md = item.get("metadata") or {}
    md = md if isinstance(md, dict) else {}
    system = md.get("system") or {}
    system = system if isinstance(system, dict) else {}
    shaping = {k: item.get(k) for k in ("filename", "dir", "name", "stream")}
    shaping.update({"fps": md.get("fps"), **{k: system.get(k) for k in ("fps", "width", "height", "nb_frames",
                                                                        "duration", "mimetype")}})
    doc = {"annotations": item.get("annotations"), "item": shaping, "settings": fingerprint}
    return hashlib.sha1(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)).hexdigest()


def _exported(client: DataloopClient, dataset_id: str, filters: list[dict] | None, report: Report,
              limits: ReadLimits | None) -> Iterator[dict]:
    """The export's items one at a time, streamed (memory follows one item); an element that is
    over the size limit or not readable is one line in the report, and the rest goes on."""
    for element in client.export_items(dataset_id, filters, limits=limits or ReadLimits()):
        where = f"dataloop:{dataset_id} export[{element.index}]"
        if element.data is None:
            report.warn(where, element.error or "left out")
            continue
        try:
            item = orjson.loads(element.data)
        except (orjson.JSONDecodeError, RecursionError):
            report.warn(where, "not readable JSON: left out")
            continue
        if isinstance(item, dict):
            yield item


def _gone(client: DataloopClient, item_id: str) -> bool:
    """Whether Dataloop itself says the item no longer exists (not merely that a listing left it out)."""
    return client.find_item(item_id) is None


def run_once(client: DataloopClient, pusher: push.Pusher, dataset_id: str, project_id: int, state: State | RedisState,
             filters: list[dict] | None = None, options: ConvertOptions | None = None,
             defaults: MediaDefaults | None = None, report: Report | None = None,
             allow_mass_delete: bool = False, limits: ReadLimits | None = None,
             planner_options: dict | None = None, live: Iterable[str] = (),
             on_subsets: Callable[[list[Subset]], None] | None = None, subset: Subset | None = None) -> RunSummary:
    """One sync. `planner_options`: the Planner's (the service matches by path, creates no task
    and keeps its records here); `live`: the project's ML backend titles (see Planner.model_version).

    Exports cover at most `subset_size()` items, split by id ranges. `on_subsets`: when the changed
    items span several ranges, they are handed over (a job each) instead of written here; this run
    still handles deletions and moves the cursor (an item a subset fails to write has no row, so
    the next run reads it again). `subset`: a run over one such part only."""
    started, now = time.monotonic(), time.time()
    requests_before = client.counters.requests
    summary = RunSummary()
    report = report if report is not None else Report()
    options = options or ConvertOptions()
    defaults = defaults or MediaDefaults()
    if state.get("project") not in (None, str(project_id)):
        raise InputError(str(state.path), None, f"this state belongs to project {state.get('project')}: "
                                                "use another --state")
    scope = scope_of(dataset_id, filters)

    # the project's config decides the conversion: read it first (it is part of every item's hash)
    project = pusher.project(project_id)
    try:
        options.config = lsconfig.parse(project.label_config or "")
    except lsconfig.ConfigError as err:
        raise InputError(f"project {project_id}", None, f"its labeling config: {err}") from None
    fingerprint = settings_fingerprint(options, defaults)

    run = _Run(client, pusher, dataset_id, project_id, state, filters, options, defaults, report, limits,
               allow_mass_delete, planner_options, list(live), project, scope, fingerprint, summary, now)
    if subset is not None:
        _run_subset(run, subset)
        summary.dataloop_requests = client.counters.requests - requests_before
        summary.seconds = time.monotonic() - started
        return summary

    # 1. what Dataloop has now, and what changed since this scope's cursor
    known = state.items(scope)
    listing: dict[str, dict] = {}
    for item in client.query(dataset_id, filters):
        key = item_key(item)
        if key is None:
            report.warn(f"dataloop:{dataset_id}", "an item in the listing has no id: left out")
            continue
        listing[key] = item
    summary.seen = len(listing)
    cursor = state.get(f"cursor:{scope}") or (state.get("cursor") if state.get("dataset") == dataset_id
                                              and not filters else None)
    touched: set[str] = set()
    newest = [item.get("updatedAt") or "" for item in listing.values()]
    if cursor:
        for annotation in client.query(dataset_id, [{"updatedAt": {"$gt": cursor}}], resource="annotations"):
            touched.add(annotation.get("itemId"))
            newest.append(annotation.get("updatedAt") or "")
    candidates: list[str] = []
    for item_id, item in listing.items():
        row = known.get(item_id)
        if row is not None and row.retry_at > now:  # quarantined: waits for its next try
            summary.quarantined += 1
            report.warn(f"dataloop:{dataset_id}/{item_id}", f"quarantined after {row.failures} failures, next try "
                        f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(row.retry_at))}: {row.last_error}")
            continue
        if (row is None or item_id in touched or row.content_hash is None
                or row.updated_at != item.get("updatedAt") or row.annotations != item.get("annotationsCount")):
            candidates.append(item_id)
    summary.candidates = len(candidates)

    # an item missing from the listing is deleted only when Dataloop says it is gone
    deleted, left = [], []
    for item_id in (i for i in known if i not in listing):
        (deleted if _gone(client, item_id) else left).append(item_id)
    summary.left_scope = len(left)
    if left:
        state.commit([], forget=[(scope, i) for i in left])  # no longer this scope's; its task stays

    # 2. read the candidates (an export per id range when they are many); keep those whose
    # annotations really changed
    exported: dict[str, list] = {}
    size = subset_size()
    if on_subsets is not None and len(candidates) > size:  # more than one job's share: a job per range
        ranges = split_subsets(listing, candidates, size)
        # until its subset writes it, an item counts as unwritten: a subset that never runs leaves
        # it to the next sync, even once the cursor below has moved past its edit
        state.commit([ItemRow(i, None, None, None, known[i].versions, scope, known[i].failures, known[i].retry_at,
                              known[i].last_error) for i in candidates if i in known])
        on_subsets(ranges)
        summary.subsets = len(ranges)
        candidates = []
    if len(candidates) > max(EXPORT_AT, len(listing) // 5):
        for part in split_subsets(listing, candidates, size):
            exported.update((key, entry.get("annotations") or [])
                            for key, entry in _exported_range(client, dataset_id, filters, part, report, limits))
    read: list[tuple[str, dict]] = []
    for item_id in candidates:
        item = dict(listing[item_id])
        item["annotations"] = in_order(exported[item_id] if item_id in exported else client.item_annotations(item_id))
        read.append((item_id, item))
    _write(run, known, listing, read, deleted)

    # 4. the cursor follows Dataloop's clock (the newest updatedAt it showed), not this machine's
    begun = dt.datetime.now(dt.timezone.utc)
    latest = max([t for t in newest if t] or [cursor or (begun - SKEW).strftime("%Y-%m-%dT%H:%M:%S.000Z")])
    state.commit([], meta={"project": str(project_id), f"cursor:{scope}": _minus(latest, SKEW),
                           f"scope:{scope}": json.dumps({"dataset": dataset_id, "filter": filters or []})})
    summary.dataloop_requests = client.counters.requests - requests_before
    summary.seconds = time.monotonic() - started
    if summary.quarantined:
        log.warning("%d items quarantined (see the lines above)", summary.quarantined)
    return summary


def _exported_range(client: DataloopClient, dataset_id: str, filters: list[dict] | None, part: Subset,
                    report: Report, limits: ReadLimits | None) -> Iterator[tuple[str, dict]]:
    """(id, item) of the export of one id range, for the range's candidates only."""
    wanted = set(part.items)
    for entry in _exported(client, dataset_id, list(filters or []) + part.filters(), report, limits):
        key = item_key(entry)
        if key in wanted:
            yield key, entry


@dataclass
class _Run:
    """What every step of one run reads."""

    client: DataloopClient
    pusher: push.Pusher
    dataset_id: str
    project_id: int
    state: State | RedisState
    filters: list[dict] | None
    options: ConvertOptions
    defaults: MediaDefaults
    report: Report
    limits: ReadLimits | None
    allow_mass_delete: bool
    planner_options: dict | None
    live: list[str]
    project: object
    scope: str
    fingerprint: str
    summary: RunSummary
    now: float


def _run_subset(run: _Run, subset: Subset) -> None:
    """One part of a split sync: its range's export, then the changes as any run writes them. No
    deletions and no cursor: the run that split the work keeps those."""
    run.summary.seen = run.summary.candidates = len(subset.items)
    wanted = set(subset.items)
    known = run.state.items(run.scope, only=wanted)
    listing: dict[str, dict] = {}
    read: list[tuple[str, dict]] = []
    for item_id, entry in _exported_range(run.client, run.dataset_id, run.filters, subset, run.report, run.limits):
        item = dict(entry)
        item["annotations"] = in_order(entry.get("annotations") or [])
        listing[item_id] = {k: v for k, v in entry.items() if k != "annotations"}
        read.append((item_id, item))
    # an item gone from the range since the split is the next full run's to judge
    _write(run, known, listing, read, [])


def _write(run: _Run, known: dict[str, ItemRow], listing: dict[str, dict], read: list[tuple[str, dict]],
           deleted: list[str]) -> None:
    """Steps 2 (what really changed) and 3 (plan and write) of a run, over the items `read` (with
    their annotations) and the `deleted` ones."""
    pusher, dataset_id, project_id, state = run.pusher, run.dataset_id, run.project_id, run.state
    options, defaults, report, summary = run.options, run.defaults, run.report, run.summary
    scope, now = run.scope, run.now
    planner_options, fingerprint, allow_mass_delete = run.planner_options, run.fingerprint, run.allow_mass_delete
    changed: list[tuple[str, dict, str]] = []
    unchanged: list[ItemRow] = []
    for item_id, item in read:
        digest = content_hash(item, fingerprint)
        row = known.get(item_id)
        if row is not None and row.content_hash == digest:
            unchanged.append(ItemRow(item_id, item.get("updatedAt"), item.get("annotationsCount"), digest,
                                     row.versions, scope))
            continue
        changed.append((item_id, item, digest))
    summary.changed = len(changed)
    state.commit(unchanged)

    # 3. plan every change with the one planner, and write batch by batch, recording as they land
    if changed or deleted:
        planner_options = planner_options or {}
        existing = pusher.existing_tasks(project_id)
        if planner_options.get("task_writes") is False:
            existing = state.with_records(existing)
        planner = push.Planner(existing, options.config.objects[0].data_key,
                               warn=lambda line: report.warn(f"project {project_id}", line), **planner_options)
        planner.match_paths({item_id: item.get("filename") for item_id, item, _ in changed})
        if not planner.task_writes:
            planner.remember(state.tasks_of(deleted))
        pending: dict[str, ItemRow] = {}

        def fail(item_id: str, reason: str) -> ItemRow:
            row = known.get(item_id) or ItemRow(item_id, None, None, None, [], scope)
            item = listing.get(item_id, {})
            row = ItemRow(item_id, item.get("updatedAt"), item.get("annotationsCount"), None, row.versions, scope,
                          row.failures, row.retry_at, row.last_error).failed(reason, now)
            summary.failed += 1
            return row

        def changes() -> Iterator[push.Change]:
            for item_id, item, digest in changed:
                origin = f"dataloop:{dataset_id}/{item_id}"
                try:
                    entry = Entry(origin, item=decode_item(orjson.dumps(item), origin))
                except InputError as err:
                    entry = Entry(origin, error=err)
                converted = convert_item(entry, options, defaults)
                report.merge(converted.report)
                previous = known[item_id].versions if item_id in known else []
                if converted.task is None:
                    reason = next((p.reason for p in converted.report.problems if p.outcome == "item-failed"),
                                  "not converted")
                    state.commit([fail(item_id, reason)])
                    continue
                change = planner.plan(converted.task, converted.body, summary.stats, previous)
                versions = sorted({p["model_version"] for p in converted.task["predictions"]})
                row = ItemRow(item_id, item.get("updatedAt"), item.get("annotationsCount"), digest, versions, scope)
                if change is None or not change.writes_anything:
                    state.commit([row] if change is not None else [fail(item_id, "matched no task unambiguously")])
                    continue
                pending[item_id] = row
                if not planner.task_writes:
                    state.intend([change])  # before it is written (see State.intend)
                yield change
            doomed = [(item_id, planner.find(item_id).id) for item_id in deleted if planner.find(item_id)]
            check = push.mass_deletion(doomed, planner.total_tasks, allow_mass_delete)
            if not check.allowed:
                summary.deletions_refused = True
                summary.stats.deletions_refused = len(doomed)
                report.warn(f"project {project_id}", check.line())
                return
            for item_id in deleted:
                change = planner.plan_deleted(item_id, known[item_id].versions, summary.stats)
                summary.deleted += 1
                if change is None or not change.writes_anything:
                    state.commit([], forget=[(scope, item_id)])
                    continue
                yield change

        def landed(result: push.BatchResult) -> None:
            rows, forget = [], []
            for change in result.landed:
                if change.item in pending:
                    rows.append(pending.pop(change.item))
                else:
                    forget.append((scope, change.item))  # a deleted item, now taken away
            for change, why in result.refused:
                pending.pop(change.item, None)
                report.item_failed(InputError(f"dataloop:{dataset_id}/{change.item}", None,
                                              f"Label Studio refused it: {why}"))
                rows.append(fail(change.item, f"Label Studio refused it: {why}"))
            state.commit(rows, forget)
            if not planner.task_writes:
                state.keep_records(result.landed)
            late.extend(c for c in result.landed if c.data_late)

        late: list[push.Change] = []
        push.apply(pusher, project_id, changes(), on_batch=landed)
        for change, why in push.complete_late(pusher, late):
            report.warn(f"dataloop:{dataset_id}/{change.item}", f"Label Studio refused its fps: {why}")
        version = planner.model_version(run.project.model_version, summary.stats, run.live)
        if version:
            pusher.set_model_version(project_id, version)


def _minus(stamp: str, delta: dt.timedelta) -> str:
    """An ISO timestamp as Dataloop writes them, moved back by delta (unparseable: unchanged)."""
    try:
        moment = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")) - delta
    except ValueError:
        return stamp
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_every(text: str) -> float:
    """'15m', '90s', '2h' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        value, unit = float(text[:-1]), text[-1]
        seconds = value * units[unit]
    except (ValueError, KeyError, IndexError):
        raise ValueError(f"--every {text!r}: use a number and s, m or h, e.g. 15m") from None
    if seconds < 10:
        raise ValueError("--every: at least 10s")
    return seconds


def schedule(job, every_seconds: float) -> None:
    """Run `job` now and then every `every_seconds`, with jitter, never two at once (APScheduler)."""
    from apscheduler.schedulers.blocking import BlockingScheduler
    from apscheduler.triggers.interval import IntervalTrigger

    scheduler = BlockingScheduler()
    scheduler.add_job(job, IntervalTrigger(seconds=every_seconds, jitter=max(1, int(every_seconds * 0.05))),
                      next_run_time=dt.datetime.now(dt.timezone.utc), max_instances=1, coalesce=True,
                      misfire_grace_time=int(every_seconds))
    log.info("syncing every %.0f s (Ctrl-C stops)", every_seconds)
    try:
        scheduler.start()
    except (KeyboardInterrupt, SystemExit):
        scheduler.shutdown(wait=False)
