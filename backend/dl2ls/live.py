"""Dataloop, live: the items behind Label Studio tasks, read from Dataloop's API and converted.

What the service's `/predict` and its pre-annotation jobs share. A batch of tasks is resolved in
a few bulk requests, never one per task:
1. the items the tasks name, in one DQL query per few hundred tasks: by `dataloop_item_id`, or by
   the file name of the task's media (`name`), within the project's dataset and filter;
2. each task's item decided as `labelstudio.identity` decides it (the id, else the longest path
   suffix; two equally good items are none);
3. the annotations of the items not in the cache, in one annotations query per few hundred items;
4. each item converted by `convert_item`, kept in a cache keyed by the item's id, `updatedAt`,
   annotation count and the conversion's settings.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import orjson

from dl2ls.convert import Converted, convert_item, settings_fingerprint
from dl2ls.dataloop.api import DataloopClient, DataloopError, item_key
from dl2ls.dataloop.model import MediaDefaults, decode_item
from dl2ls.dataloop.read import Entry
from dl2ls.labelstudio.identity import Indexed, Located, find_item, media_parts
from dl2ls.labelstudio.tasks import ConvertOptions
from dl2ls.report import InputError, Report, describe

log = logging.getLogger("dl2ls.live")

CHUNK = 200  # ids or names per DQL query: a body of a few KB
FETCHERS = 4  # Dataloop requests of one batch in flight at once
CACHE_ITEMS = 512


@dataclass(frozen=True)
class Scope:
    """Where a project's items live in Dataloop."""

    dataset_id: str
    filters: tuple = ()  # DQL clauses, ANDed with the dataset

    @property
    def filter_list(self) -> list[dict]:
        return list(self.filters)


@dataclass
class TaskItem:
    """What one task of a batch resolved to."""

    item: dict | None = None  # the item's JSON (without annotations)
    converted: Converted | None = None
    retry: str | None = None  # nothing may be stored for this task now: why
    note: str | None = None  # no item, and why (stored as an empty result all the same)

    @property
    def item_id(self) -> str | None:
        return item_key(self.item) if self.item else None


@dataclass
class Fetched:
    """One batch's answer, in the order of its tasks."""

    tasks: list[TaskItem] = field(default_factory=list)
    report: Report = field(default_factory=Report)
    requests: int = 0
    cache_hits: int = 0


class ConversionCache:
    """Recent conversions, by (item id, updatedAt, annotations count, settings): an item Dataloop
    has not changed converts once."""

    def __init__(self, size: int = CACHE_ITEMS):
        self.size = size
        self.entries: OrderedDict[tuple, Converted] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: tuple) -> Converted | None:
        with self.lock:
            hit = self.entries.get(key)
            if hit is not None:
                self.entries.move_to_end(key)
            return hit

    def put(self, key: tuple, value: Converted) -> None:
        with self.lock:
            self.entries[key] = value
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)


def _basename(value) -> str | None:
    parts = media_parts(value)
    return parts[-1] if parts else None


def _chunks(values: list, size: int = CHUNK) -> list[list]:
    return [values[i:i + size] for i in range(0, len(values), size)]


def resolve(client: DataloopClient, scope: Scope, datas: list[dict], data_keys: list[str],
            options: ConvertOptions, defaults: MediaDefaults, cache: ConversionCache | None = None,
            deadline: float | None = None) -> Fetched:
    """Each task's item and its conversion. A task whose item Dataloop cannot give now (an error,
    the deadline passed) gets `retry`; Dataloop's own errors end in one line each, never raise."""
    out = Fetched(tasks=[TaskItem() for _ in datas])
    before = client.counters.requests
    ids, names = set(), set()
    for data in datas:
        wanted = data.get("dataloop_item_id")
        if isinstance(wanted, str) and wanted:
            ids.add(wanted)
        for value in [data.get(k) for k in data_keys] + [data.get("dataloop_filename")]:
            name = _basename(value)
            if name:
                names.add(name)
    try:
        items = _items(client, scope, sorted(ids), sorted(names))
    except DataloopError as err:
        line = f"Dataloop: {err}"
        for one in out.tasks:
            one.retry = line
        out.report.warn(f"dataloop:{scope.dataset_id}", line)
        return out

    index = Indexed()
    for item in items.values():
        path = media_parts(item.get("filename")) or media_parts(item.get("name"))
        key = item_key(item)
        index.add(Located(f"dataloop:{scope.dataset_id}/{key}", key, key, path))
    fingerprint = settings_fingerprint(options, defaults)
    needed: dict[str, list[int]] = {}
    for position, data in enumerate(datas):
        lookup = find_item(index, data, data_keys)
        one = out.tasks[position]
        if lookup.retry:
            one.retry = lookup.retry
            continue
        if lookup.found is None:
            one.note = lookup.note or "no item in Dataloop has its id or its media path"
            continue
        item = items[lookup.found.item_id]
        one.item = item
        cached = cache.get(_cache_key(item, fingerprint)) if cache is not None else None
        if cached is not None:
            one.converted = cached
            out.cache_hits += 1
        else:
            needed.setdefault(lookup.found.item_id, []).append(position)

    if needed:
        try:
            annotations = _annotations(client, scope, sorted(needed), deadline)
        except DataloopError as err:
            annotations = {}
            out.report.warn(f"dataloop:{scope.dataset_id}", f"Dataloop: {err}")
        for item_id, positions in needed.items():
            if item_id not in annotations:
                for p in positions:
                    out.tasks[p].retry = "its annotations could not be read from Dataloop now"
                continue
            converted = convert(items[item_id], annotations[item_id], scope, options, defaults)
            out.report.merge(converted.report)
            if cache is not None and converted.task is not None:
                cache.put(_cache_key(items[item_id], fingerprint), converted)
            for p in positions:
                out.tasks[p].converted = converted
    out.requests = client.counters.requests - before
    return out


def _cache_key(item: dict, fingerprint: str) -> tuple:
    return (item_key(item), item.get("updatedAt"), item.get("annotationsCount"), fingerprint)


def convert(item: dict, annotations: list, scope: Scope, options: ConvertOptions,
            defaults: MediaDefaults) -> Converted:
    """One Dataloop item (its JSON and its annotations) through `convert_item`."""
    origin = f"dataloop:{scope.dataset_id}/{item_key(item)}"
    try:
        entry = Entry(origin, item=decode_item(orjson.dumps({**item, "annotations": in_order(annotations)}), origin))
    except InputError as err:
        entry = Entry(origin, error=err)
    except Exception as err:  # noqa: BLE001 - whatever Dataloop sent, it is this item's problem
        entry = Entry(origin, error=InputError(origin, None, describe(err)))
    return convert_item(entry, options, defaults)


def in_order(annotations: Any) -> Any:
    """An item's annotations in id order, whichever request read them (the item's own endpoint,
    an annotations query, an export): the same item always converts, and hashes, alike."""
    if not isinstance(annotations, list):
        return annotations
    return sorted(annotations, key=lambda a: str(a.get("id") or "") if isinstance(a, dict) else "")


def _items(client: DataloopClient, scope: Scope, ids: list[str], names: list[str]) -> dict[str, dict]:
    """The dataset's items with these ids or these file names, by id."""
    clauses = [{"id": {"$in": chunk}} for chunk in _chunks(ids)] + \
              [{"name": {"$in": chunk}} for chunk in _chunks(names)]
    found: dict[str, dict] = {}

    def one(clause: dict) -> list[dict]:
        return list(client.query(scope.dataset_id, scope.filter_list + [clause]))

    with ThreadPoolExecutor(FETCHERS, thread_name_prefix="dl2ls-fetch") as pool:
        for rows in pool.map(one, clauses):
            for row in rows:
                key = item_key(row)
                if key:
                    found[key] = row
    return found


def _annotations(client: DataloopClient, scope: Scope, item_ids: list[str],
                 deadline: float | None) -> dict[str, list]:
    """The annotations of these items, by item id: one query per chunk of items (one item: its
    own endpoint). Chunks left when the deadline passes are not read."""
    if len(item_ids) == 1:
        return {item_ids[0]: client.item_annotations(item_ids[0])}
    out: dict[str, list] = {}

    def one(chunk: list[str]) -> dict[str, list]:
        if deadline is not None and time.monotonic() > deadline:
            return {}
        got: dict[str, list] = {i: [] for i in chunk}
        for annotation in client.query(scope.dataset_id, [{"itemId": {"$in": chunk}}], resource="annotations"):
            owner = annotation.get("itemId")
            if owner in got:
                got[owner].append(annotation)
        return got

    with ThreadPoolExecutor(FETCHERS, thread_name_prefix="dl2ls-fetch") as pool:
        for got in pool.map(one, _chunks(item_ids)):
            out.update(got)
    return out
