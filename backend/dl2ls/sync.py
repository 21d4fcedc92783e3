"""Keep a Label Studio project's predictions in step with a Dataloop dataset.

One run:
1. lists the dataset's items (id, updatedAt, annotationsCount: a page per 1,000 items) and asks
   for annotations updated since the last run (one query), so that an edited, added or deleted
   annotation, a new item and a deleted item are all noticed without reading every item;
2. reads the annotations of the candidates only (through one export command when they are many,
   as on the first run), and drops those whose content hash has not changed (a touched item with
   the same annotations writes nothing);
3. converts the rest against the project's labeling config and writes them with push's logic
   (new items -> tasks with predictions; changed ones -> their predictions replaced per
   model_version; versions an item no longer has -> deleted); a deleted item loses our
   predictions, and its task too unless someone annotated it;
4. only then records the new state (per item: updatedAt, annotation count, content hash, the
   versions written; and the cursor) in SQLite.
A run killed anywhere records nothing, so the next run redoes its work, and push's idempotence
makes that converge without duplicates. A lock file keeps two syncs off one state.

The rule's limits: Dataloop's query API is trusted to list every item and every annotation
updated after the cursor; the cursor is the last run's start minus a safety margin for clock skew
(annotations touched in that margin are re-read and usually found unchanged by their hash).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from dl2ls.dataloop.api import DataloopClient
from dl2ls.dataloop.model import MediaDefaults, decode_item
from dl2ls.dataloop.read import split_array
from dl2ls.labelstudio import config as lsconfig
from dl2ls.labelstudio import push
from dl2ls.labelstudio.tasks import ConvertOptions, to_task
from dl2ls.report import InputError, Report
from dl2ls.tracks import item_tracks

log = logging.getLogger("dl2ls.sync")

SKEW = dt.timedelta(minutes=5)  # re-read annotations touched this long before the last run began
EXPORT_AT = 50  # more candidates than this (and a fifth of the dataset): one export, not a read per item


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
    failed: int = 0
    dataloop_requests: int = 0
    seconds: float = 0.0
    stats: push.Stats = field(default_factory=push.Stats)

    def line(self) -> str:
        return (f"sync: items seen {self.seen}, read {self.candidates}, changed {self.changed}, deleted "
                f"{self.deleted}, failed {self.failed}; Label Studio: {self.stats.summary()}; "
                f"{self.dataloop_requests} Dataloop requests; {self.seconds:.1f} s")


class State:
    """The sync's memory, in SQLite: the cursor and, per item, what was last written."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.lock_file = open(self.path.with_name(self.path.name + ".lock"), "a+")
        except OSError as err:
            raise StateError(f"cannot open the state's lock file next to {self.path}: {err.strerror}") from None
        try:
            fcntl.flock(self.lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.lock_file.close()
            raise SyncBusy(f"another dl2ls sync is running on {self.path} (its lock file is held)") from None
        try:
            self.db = sqlite3.connect(self.path)
            self.db.executescript("""
                CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
                CREATE TABLE IF NOT EXISTS items (
                    item_id TEXT PRIMARY KEY, updated_at TEXT, annotations INTEGER, content_hash TEXT,
                    versions TEXT);
            """)
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

    def items(self) -> dict[str, tuple]:
        return {r[0]: r[1:] for r in self.db.execute(
            "SELECT item_id, updated_at, annotations, content_hash, versions FROM items")}

    def commit(self, meta: dict[str, str], rows: list[tuple], deleted: list[str]) -> None:
        with self.db:  # one transaction: all of the run, or none of it
            self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(meta.items()))
            self.db.executemany("INSERT OR REPLACE INTO items VALUES (?, ?, ?, ?, ?)", rows)
            self.db.executemany("DELETE FROM items WHERE item_id = ?", [(i,) for i in deleted])


def content_hash(item: dict, fingerprint: str) -> str:
    """What decides whether an item must be written again: its annotations, the metadata that
    shapes the task (size, clock, names), and the conversion's own settings and config."""
    md = item.get("metadata") or {}
    system = md.get("system") or {}
    shaping = {k: item.get(k) for k in ("filename", "dir", "name", "stream")}
    shaping.update({"fps": md.get("fps"), **{k: system.get(k) for k in ("fps", "width", "height", "nb_frames",
                                                                        "duration", "mimetype")}})
    doc = {"annotations": item.get("annotations"), "item": shaping, "settings": fingerprint}
    return hashlib.sha1(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)).hexdigest()


def settings_fingerprint(options: ConvertOptions, config_xml: str) -> str:
    parts = [config_xml, options.model_version, options.media_url or "", repr(options.tolerance_px),
             json.dumps(options.label_map, sort_keys=True)]
    return hashlib.sha1("\x00".join(parts).encode()).hexdigest()


def run_once(client: DataloopClient, pusher: push.Pusher, dataset_id: str, project_id: int, state: State,
             filters: list[dict] | None = None, options: ConvertOptions | None = None,
             defaults: MediaDefaults | None = None, report: Report | None = None) -> RunSummary:
    started = time.monotonic()
    begun = dt.datetime.now(dt.timezone.utc)
    requests_before = client.counters.requests
    summary = RunSummary()
    report = report if report is not None else Report()
    options = options or ConvertOptions()
    defaults = defaults or MediaDefaults()
    if state.get("dataset") not in (None, dataset_id) or state.get("project") not in (None, str(project_id)):
        raise InputError(str(state.path), None, f"this state belongs to dataset {state.get('dataset')} and project "
                                                f"{state.get('project')}: use another --state")

    # the project's config decides the conversion: read it first (it is part of every item's hash)
    project = pusher.project(project_id)
    try:
        options.config = lsconfig.parse(project.label_config or "")
    except lsconfig.ConfigError as err:
        raise InputError(f"project {project_id}", None, f"its labeling config: {err}") from None
    fingerprint = settings_fingerprint(options, project.label_config or "")

    # 1. what Dataloop has now, and what changed since the cursor
    known = state.items()
    listing = {item["id"]: item for item in client.query(dataset_id, filters)}
    summary.seen = len(listing)
    cursor = state.get("cursor")
    touched: set[str] = set()
    newest = [item.get("updatedAt") or "" for item in listing.values()]
    if cursor:
        since = [{"updatedAt": {"$gt": cursor}}]
        for annotation in client.query(dataset_id, since, resource="annotations"):
            touched.add(annotation.get("itemId"))
            newest.append(annotation.get("updatedAt") or "")
    candidates = [
        item_id for item_id, item in listing.items()
        if item_id not in known or item_id in touched or known[item_id][2] is None  # new, touched, failed
        or known[item_id][0] != item.get("updatedAt") or known[item_id][1] != item.get("annotationsCount")
    ]
    deleted = [item_id for item_id in known if item_id not in listing]
    summary.candidates = len(candidates)

    # 2. read the candidates (many at once through the export command, as the first run does);
    #    keep those whose annotations really changed
    exported: dict[str, list] = {}
    if len(candidates) > max(EXPORT_AT, len(listing) // 5):
        data = client.export(dataset_id, filters)
        for a, b in split_array(data):
            entry = orjson.loads(data[a:b])
            exported[entry["id"]] = entry.get("annotations") or []
    changed: list[tuple[str, dict, str]] = []
    for item_id in candidates:
        item = dict(listing[item_id])
        item["annotations"] = exported[item_id] if item_id in exported else client.item_annotations(item_id)
        digest = content_hash(item, fingerprint)
        if item_id in known and known[item_id][2] == digest:
            continue
        changed.append((item_id, item, digest))
    summary.changed = len(changed)

    # 3. write them, and take deleted items' predictions away
    rows: list[tuple] = [(i, listing[i].get("updatedAt"), listing[i].get("annotationsCount"), known[i][2], known[i][3])
                         for i in candidates if i in known and i not in {c[0] for c in changed}]
    if changed or deleted:
        existing = pusher.existing_tasks(project_id)
        by_item = {t.data.get("dataloop_item_id"): t for t in existing}
        planner = push.Planner(existing, options.config.objects[0].data_key)

        def changes():
            for item_id, item, digest in changed:
                origin = f"dataloop:{dataset_id}/{item_id}"
                try:
                    tracks = item_tracks(decode_item(orjson.dumps(item), origin), origin, defaults)
                    task, item_report = to_task(tracks, options)
                except InputError as err:
                    report.item_failed(err)
                    summary.failed += 1
                    # remembered without a hash: a candidate again on every run until it converts
                    rows.append((item_id, item.get("updatedAt"), item.get("annotationsCount"), None,
                                 known[item_id][3] if item_id in known else None))
                    continue
                report.merge(item_report)
                change = planner.plan(task, summary.stats, lambda w, where=origin: report.warn(where, w))
                if change is None:
                    continue
                versions = {p["model_version"] for p in task["predictions"]}
                previous = set(json.loads(known[item_id][3])) if item_id in known and known[item_id][3] else set()
                task_now = by_item.get(item_id)
                if task_now is not None:  # versions this item no longer has
                    for version in previous - versions:
                        change.delete += [pid for pid, _ in task_now.predictions.get(version, [])]
                rows.append((item_id, item.get("updatedAt"), item.get("annotationsCount"), digest,
                             json.dumps(sorted(versions))))
                yield change
            for item_id in deleted:
                task_now = by_item.get(item_id)
                if task_now is None:
                    continue
                previous = set(json.loads(known[item_id][3] or "[]"))
                doomed = [pid for v in previous for pid, _ in task_now.predictions.get(v, [])]
                yield push.Change(task_id=task_now.id, delete=doomed)
                summary.deleted += 1

        push.apply(pusher, project_id, changes())
        for item_id in deleted:
            task_now = by_item.get(item_id)
            ours = set(json.loads(known[item_id][3] or "[]"))
            if task_now is not None and not task_now.annotations and set(task_now.predictions) <= ours:
                pusher.delete_task(task_now.id)  # nobody annotated it and nothing else is on it
        if summary.stats.versions and not project.model_version:
            # an empty project shows predictions of its model_version only: give it ours once;
            # a version someone chose is theirs to keep
            pusher.set_model_version(project_id, summary.stats.versions.most_common(1)[0][0])

    # 4. remember, only now that Label Studio has accepted everything
    # the cursor follows Dataloop's clock (the newest updatedAt it showed), not this machine's
    latest = max([t for t in newest if t] or [cursor or (begun - SKEW).strftime("%Y-%m-%dT%H:%M:%S.000Z")])
    state.commit({"dataset": dataset_id, "project": str(project_id), "cursor": _minus(latest, SKEW)}, rows, deleted)
    summary.dataloop_requests = client.counters.requests - requests_before
    summary.seconds = time.monotonic() - started
    return summary


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
