"""Which task is which item's: matching Dataloop items to Label Studio tasks by media path.

A task that came from cloud storage knows its media only as a URL (`s3://bucket/cam2/clip.mp4`,
`/data/local-files/?d=cam2/clip.mp4`, `https://host/prefix/cam2/clip.mp4`); the item knows its
remote path (`/cam2/clip.mp4`). Neither knows the other's storage prefix, so the two are compared
by their path components from the end: an item and a task match on the longest path suffix they
share, and only when that suffix picks out exactly one candidate. Two equally good candidates
mean no match at all, reported with both names: an item lands on its own task or on none.

Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Any, Generic, Hashable, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

from dl2ls.report import escape

Parts = tuple[str, ...]
K = TypeVar("K", bound=Hashable)


def media_parts(value: Any) -> Parts:
    """The path components of a media URL or path, with the scheme, the bucket or host and the
    query stripped; Label Studio's local-files (`?d=`) and resolve (`?fileuri=`) URLs are read
    for the path they carry. () for anything that is not a usable path."""
    if not isinstance(value, str) or not value.strip() or len(value) > 8192:
        return ()
    try:
        url = urlsplit(value.strip())
        query = parse_qs(url.query)
    except ValueError:  # e.g. "http://[::1": not a URL we can read
        return ()
    if query.get("d"):
        path = query["d"][0]
    elif query.get("fileuri"):
        try:
            return media_parts(base64.urlsafe_b64decode(query["fileuri"][0] + "==").decode())
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return ()
    else:
        path = url.path
    return tuple(unquote(p) for p in path.replace("\\", "/").split("/") if p not in ("", "."))


def shown(parts: Parts) -> str:
    return "/" + "/".join(parts)


def common_suffix(a: Parts, b: Parts) -> int:
    n = 0
    for x, y in zip(reversed(a), reversed(b)):
        if x != y:
            break
        n += 1
    return n


@dataclass(slots=True)
class Best(Generic[K]):
    """The candidates sharing the longest path suffix with what was looked up."""

    length: int = 0  # components shared; 0: nothing shares even the file name
    keys: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.keys = list(dict.fromkeys(self.keys))

    @property
    def unique(self) -> K | None:
        return self.keys[0] if self.length and len(self.keys) == 1 else None

    @property
    def ambiguous(self) -> bool:
        return self.length > 0 and len(self.keys) > 1


class PathIndex(Generic[K]):
    """Keys by media path. A path fits another when one is wholly a suffix of the other
    (`/cam2/clip.mp4` fits `s3://b/data/cam2/clip.mp4` and `clip.mp4`, never `s3://b/cam1/clip.mp4`:
    a folder that differs is another file); among fitting candidates the longest shared suffix
    wins. Every suffix of every path is indexed, so a look-up costs a few dictionary reads."""

    def __init__(self) -> None:
        self._by_suffix: dict[Parts, list[K]] = {}  # every suffix of a path -> keys whose path ends so
        self._by_path: dict[Parts, list[K]] = {}
        self.paths: dict[K, Parts] = {}

    def add(self, parts: Parts, key: K) -> None:
        if not parts or key in self.paths:
            return
        self.paths[key] = parts
        self._by_path.setdefault(parts, []).append(key)
        for i in range(len(parts)):
            self._by_suffix.setdefault(parts[i:], []).append(key)

    def __len__(self) -> int:
        return len(self.paths)

    def best(self, parts: Parts) -> Best[K]:
        if not parts:
            return Best()
        # paths that end with the whole of this one: they share all of it
        longer = self._by_suffix.get(parts)
        if longer:
            return Best(len(parts), list(longer))
        # else the longest path that is itself a suffix of this one
        for i in range(1, len(parts)):
            shorter = self._by_path.get(parts[i:])
            if shorter:
                return Best(len(parts) - i, list(shorter))
        return Best()


@dataclass(slots=True)
class Ambiguity:
    """One path that fits several candidates equally well: none of them is taken."""

    path: Parts
    candidates: list[tuple[Hashable, Parts]]

    def line(self, what: str, others: str) -> str:
        names = " and ".join(f"{key} ({shown(parts)})" for key, parts in self.candidates[:4])
        more = f" and {len(self.candidates) - 4} more" if len(self.candidates) > 4 else ""
        return (f"{what} {shown(self.path)} fits {others} {names}{more} equally well: matched to none; "
                "give the tasks data.dataloop_item_id, or rename")


@dataclass(slots=True)
class Matching(Generic[K]):
    pairs: dict = field(default_factory=dict)  # item key -> task key
    ambiguous_items: dict = field(default_factory=dict)  # item key -> Ambiguity (tasks that fit it)
    ambiguous_tasks: dict = field(default_factory=dict)  # task key -> Ambiguity (items that fit it)


def match(items: dict[Hashable, Parts], tasks: PathIndex, others: dict[Hashable, Parts] | None = None) -> Matching:
    """Pair items with tasks: an item takes the task that shares its longest path suffix, when
    that task is the only one that long AND the item is the only one that fits the task that well
    (`others`: items that already have a task, which take part only in that second test).
    Items that fit several tasks equally, and tasks that several items fit equally, are left
    unmatched and named. An item whose best task fits another item better is simply unmatched."""
    item_index: PathIndex = PathIndex()
    for key, parts in (others or {}).items():  # items that have a task already still compete for paths
        item_index.add(parts, key)
    for key, parts in items.items():
        item_index.add(parts, key)
    out = Matching()
    for key, parts in items.items():
        best = tasks.best(parts)
        if best.ambiguous:
            out.ambiguous_items[key] = Ambiguity(parts, [(k, tasks.paths[k]) for k in best.keys])
            continue
        task = best.unique
        if task is None:
            continue
        back = item_index.best(tasks.paths[task])
        if back.unique == key:
            out.pairs[key] = task
        elif key in back.keys:  # this item and another fit the task equally well
            out.ambiguous_tasks[task] = Ambiguity(tasks.paths[task], [(k, item_index.paths[k]) for k in back.keys])
    return out


class TasksByItem:
    """The tasks of a tasks.json, found by the item they came from: its Dataloop id, else (items
    of older exports) its remote path."""

    def __init__(self, tasks: list) -> None:
        self.by_id: dict[str, dict] = {}
        self.by_file: dict[str, dict] = {}
        for task in tasks:
            data = task.get("data") if isinstance(task, dict) else None
            if not isinstance(data, dict):
                continue
            if isinstance(data.get("dataloop_item_id"), str):
                self.by_id.setdefault(data["dataloop_item_id"], task)
            if isinstance(data.get("dataloop_filename"), str):
                self.by_file.setdefault(data["dataloop_filename"], task)

    def find(self, item_id: str | None, filename: str | None) -> dict | None:
        if item_id:
            return self.by_id.get(item_id)
        return self.by_file.get(filename) if filename else None


# ----------------------------------------------------------------------------- an index of items


@dataclass(slots=True, frozen=True)
class Located:
    """Where one item of the source lies, and what it is known by."""

    origin: str
    locator: Hashable
    item_id: str | None
    path: Parts  # of its media (`filename`)

    def named(self) -> str:
        return escape(f"{self.item_id or '(no id)'} ({shown(self.path) if self.path else self.origin})")


@dataclass(slots=True)
class Indexed:
    """One indexing of the sources, swapped in whole: a request never sees half of one."""

    signature: tuple = ()
    generation: int = 0  # counts indexings: what the conversion cache is keyed by
    by_id: dict[str, list[Located]] = field(default_factory=dict)
    by_path: PathIndex = field(default_factory=PathIndex)  # locator -> media path
    at: dict[Hashable, Located] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # one escaped line per unreadable entry

    def add(self, where: Located) -> None:
        self.at[where.locator] = where
        if where.item_id:
            self.by_id.setdefault(where.item_id, []).append(where)
        self.by_path.add(where.path, where.locator)


@dataclass(slots=True)
class Lookup:
    """Which item a task is, or why none."""

    found: Located | None = None
    retry: str | None = None  # the task gets [] and a log line with this reason
    note: str | None = None  # no item, said in a log line (an empty result all the same)


def find_item(index: Indexed, data: dict, data_keys: list[str]) -> Lookup:
    """Which item of the index a task's data is: its `dataloop_item_id`, else the longest path
    suffix any of its media values shares with an item's path; two equally good ones are none."""
    wanted = data.get("dataloop_item_id")
    wanted = wanted if isinstance(wanted, str) and wanted else None
    if wanted in index.by_id:
        holders = index.by_id[wanted]
        if len(holders) > 1:
            names = " and ".join(h.named() for h in holders[:4])
            return Lookup(retry=f"item id {escape(wanted)} is held by {names}")
        return Lookup(holders[0])
    # the media path: the longest suffix any of the task's paths shares with an item's wins
    best: Best = Best()
    for value in [data.get(k) for k in data_keys] + [data.get("dataloop_filename")]:
        candidate = index.by_path.best(media_parts(value))
        if candidate.length > best.length:
            best = candidate
    if best.ambiguous:
        names = " and ".join(index.at[k].named() for k in best.keys[:4])
        return Lookup(retry=f"its media fits items {names} equally well")
    if best.unique is None:
        return Lookup()
    found = index.at[best.unique]
    if wanted and found.item_id and found.item_id != wanted:
        # same path, other id: another item (say, another dataset's copy), not this task's
        return Lookup(note=f"item id {escape(wanted)} is not in the source, and the item at its path, "
                           f"{found.named()}, is another")
    return Lookup(found)
