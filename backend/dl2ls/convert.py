"""One item in, one Label Studio task (or a reported problem) out.

`convert_item` is the only place that turns anything going wrong while converting an item into a
line of the report: the CLI, the ML backend and sync all call it, so a hostile file fails alone,
with one line naming it, whatever path it came in by. The task is serialised here too, inside the
boundary: a task that cannot be written (a string orjson refuses) is this item's problem, not the
batch's, and the bulk writers reuse the bytes instead of serialising twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import orjson

from dl2ls import __version__
from dl2ls.dataloop.model import MediaDefaults, decode_annotation, item_id, media_of
from dl2ls.dataloop.read import DEFAULT_LIMITS, Entry, ReadLimits, count_items, iter_items, load_item
from dl2ls.labelstudio import config as lsconfig
from dl2ls.labelstudio.evaluate import Mismatch, Verdict, compare_item
from dl2ls.labelstudio.identity import TasksByItem
from dl2ls.labelstudio.mappers import family_of
from dl2ls.labelstudio.tasks import ConvertOptions, to_task
from dl2ls.media import signature
from dl2ls.report import InputError, Report, describe
from dl2ls.tracks import ItemInfo, item_tracks

log = logging.getLogger("dl2ls.convert")


@dataclass(slots=True)
class Converted:
    """What one entry of a source became."""

    origin: str
    report: Report
    task: dict | None = None  # None: the entry failed, or was deliberately not converted
    body: bytes | None = None  # the task as JSON
    info: ItemInfo | None = None
    digest: str | None = None  # of the item's bytes as read

    @property
    def kind(self) -> str | None:
        return self.info.media.kind if self.info is not None else None

    @property
    def item_id(self) -> str | None:
        return self.info.item_id if self.info is not None else None


def convert_item(entry: Entry, options: ConvertOptions, defaults: MediaDefaults,
                 kind: str | None = None) -> Converted:
    """`kind`: take only items of this media kind; another kind is left out with a line."""
    report = Report()
    out = Converted(entry.origin, report, digest=entry.digest)
    if entry.note:
        report.warn(entry.origin, entry.note)
        return out
    if entry.error is not None:
        report.item_failed(entry.error)
        return out
    try:
        tracks = item_tracks(entry.item, entry.origin, defaults)
        out.info = tracks.info
        if kind is not None and tracks.info.media.kind != kind:
            report.warn(entry.origin, f"{tracks.info.media.kind} item left out (--kind {kind})")
            return out
        task, item_report = to_task(tracks, options)
        try:
            body = orjson.dumps(task)
        except orjson.JSONEncodeError as err:  # (a TypeError) a string orjson refuses, e.g. a lone surrogate
            raise InputError(entry.origin, None, f"cannot be written as JSON ({err})") from None
    except InputError as err:
        report.item_failed(err)
        return out
    except Exception as err:  # noqa: BLE001 - the boundary: whatever it was, this item alone fails
        report.item_failed(InputError(entry.origin, None, describe(err)))
        log.debug("converting %s", entry.origin, exc_info=True)
        return out
    report.merge(item_report)
    out.task, out.body = task, body
    return out


# ----------------------------------------------------------------------------- many sources


class KindError(ValueError):
    """The sources hold videos and images, and no --kind says which (a project holds one kind)."""


def entries(sources: list[str], what: str, limits: ReadLimits | None = None) -> Iterator[Entry]:
    """Every item of every source, with a progress bar on a terminal."""
    total: int | None = 0
    for s in sources:
        n = count_items(s)
        total = None if n is None or total is None else total + n
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, unit="item", desc=what, file=sys.stderr, leave=False)
    try:
        for source in sources:
            for entry in iter_items(source, limits=limits or DEFAULT_LIMITS):
                yield entry
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()


def settings_fingerprint(options: ConvertOptions, defaults: MediaDefaults) -> str:
    """Everything besides an item that decides what it converts to: the labeling config, the
    options, the media defaults, and dl2ls's own version (a release may convert differently)."""
    proxy = options.media_proxy
    parts = [__version__, options.config.xml, options.model_version,
             options.media_url or (f"{proxy.public_url}|{signature('', proxy.secret)}" if proxy else ""),
             repr(options.tolerance_px), json.dumps(options.label_map, sort_keys=True),
             repr((defaults.fps, defaults.width, defaults.height))]
    return hashlib.sha1("\x00".join(parts).encode()).hexdigest()


def source_of(digest: str | None, fingerprint: str) -> str | None:
    """What an item converts from: its bytes and the settings."""
    return hashlib.sha1(f"{digest}\x00{fingerprint}".encode()).hexdigest()[:32] if digest else None


def entry_key(entry: Entry) -> str | None:
    """The identity an entry's item will have in Label Studio (see push.item_key)."""
    if entry.item is None:
        return None
    key = item_id(entry.item)
    return key if key else (f"file:{entry.item.filename}" if entry.item.filename else None)


@dataclass(slots=True)
class Scanned:
    """An entry seen once, without its item: enough to decide whether it must be converted, and
    to read it again if so (memory: a few strings per item, not the items)."""

    entry: Entry  # its item dropped; an error or a note kept as is
    key: str | None
    filename: str | None

    def reload(self, limits: ReadLimits | None) -> Entry:
        e = self.entry
        if e.item is not None or e.error is not None or e.note or e.locator is None:
            return e
        try:
            item = load_item(e.locator, e.origin, limits=limits or DEFAULT_LIMITS)  # digest: kept from the scan
        except InputError as err:
            return Entry(e.origin, error=err)
        return Entry(e.origin, item=item, locator=e.locator, digest=e.digest)


def scan(sources: list[str], limits: ReadLimits | None = None) -> list[Scanned]:
    """Every entry's identity, path and digest, the items themselves let go."""
    out = []
    for entry in entries(sources, "scan", with_digests(limits)):
        item = entry.item
        light = Entry(entry.origin, error=entry.error, note=entry.note, locator=entry.locator, digest=entry.digest)
        out.append(Scanned(light if item is not None and entry.locator is not None else entry, entry_key(entry),
                           (item.filename or item.name) if item is not None else None))
    return out


def with_digests(limits: ReadLimits | None) -> ReadLimits:
    return dataclasses.replace(limits or DEFAULT_LIMITS, digests=True)


def convert_sources(sources: list[str], options: ConvertOptions, defaults: MediaDefaults, report: Report,
                    kind: str | None = None, limits: ReadLimits | None = None,
                    what: str = "convert", skip: Callable[[Entry], bool] | None = None) -> Iterator[Converted]:
    """Every item of the sources through `convert_item` (see convert_entries); with `skip`, the
    entries carry the digest of their bytes that it needs."""
    read = with_digests(limits) if skip is not None else limits
    return convert_entries(entries(sources, what, read), options, defaults, report, kind, skip)


def convert_entries(source_entries: Iterable[Entry], options: ConvertOptions, defaults: MediaDefaults,
                    report: Report, kind: str | None = None,
                    skip: Callable[[Entry], bool] | None = None) -> Iterator[Converted]:
    """Every item of the sources through `convert_item`, counted into `report`; yields the items
    that became tasks. Items of another kind than `kind` are left out with a line each; without
    `kind`, a second kind of media stops the run (KindError) rather than mixing them."""
    first_kind = kind
    for entry in source_entries:
        if skip is not None and skip(entry):  # unchanged since it was last converted and written
            report.items_unchanged += 1
            continue
        converted = convert_item(entry, options, defaults, kind)
        if converted.task is not None and converted.kind != first_kind:
            if first_kind is None:
                first_kind = converted.kind
            else:
                raise KindError("the sources hold videos and images, and a Label Studio project holds one kind "
                                "of task: pass --kind video or --kind image")
        report.merge(converted.report)
        if converted.task is not None:
            yield converted


def identities(sources: list[str], limits: ReadLimits | None = None) -> dict[str, str | None]:
    """item identity -> remote path, for every item of the sources (matching by path needs to
    see every item before the first is written)."""
    found: dict[str, str | None] = {}
    for entry in entries(sources, "scan", limits):
        if entry.item is not None:
            key = entry_key(entry)
            if key:
                found.setdefault(key, entry.item.filename or entry.item.name)
    return found


def scan_config(sources: list[str], ontology_colors: dict[str, str], kind: str | None,
                label_map: dict[str, str] | None = None,
                limits: ReadLimits | None = None) -> tuple[str, Report]:
    """The labeling config for what the sources hold: labels per geometry, of one media kind.
    Raises KindError for mixed sources without `kind`, ValueError when nothing is found."""
    inventories = {"video": lsconfig.Inventory(), "image": lsconfig.Inventory()}
    report = Report()
    label_map = label_map or {}
    for entry in entries(sources, "scan", limits):
        if entry.error is not None:
            report.item_failed(entry.error)
        if entry.item is None:
            continue
        try:
            anns = []
            for index, raw in enumerate(entry.item.annotations or []):
                try:
                    anns.append(decode_annotation(raw, entry.origin, index))
                except InputError:
                    continue
            item_kind = media_of(entry.item, anns, MediaDefaults(), entry.origin).kind
        except InputError as err:
            report.item_failed(err)
            continue
        except Exception as err:  # noqa: BLE001 - as convert_item: this item alone fails
            report.item_failed(InputError(entry.origin, None, describe(err)))
            continue
        inv = inventories[item_kind]
        for ann in anns:
            family = family_of(item_kind, ann.type)
            if family is None:
                continue
            for label in {ann.label, *(s.label for s in ann.system.snapshots_)}:
                label = label_map.get(label, label)
                if lsconfig.xml_safe(label):
                    inv.add(item_kind, family, label)
                else:
                    report.warn(entry.origin, f"label {label!r} has characters XML cannot hold: left out", ann.id)
    found = [k for k, inv in inventories.items() if not inv.empty]
    if kind is None and len(found) > 1:
        raise KindError("the sources hold videos and images, and a Label Studio project holds one kind of task: "
                        "pass --kind video or --kind image")
    kind = kind or (found[0] if found else None)
    if kind is None or inventories[kind].empty:
        raise ValueError("no annotations found in the sources" + (f" on {kind}s" if kind else ""))
    return lsconfig.generate(inventories[kind], ontology_colors), report


# ----------------------------------------------------------------------------- verify


@dataclass
class Verification:
    """What `verify` found: the editor-vs-Dataloop verdict, and what could not be compared."""

    verdict: Verdict
    lines: list[str]  # one per difference or problem, for the user
    unreadable: int = 0
    without_task: int = 0
    accepted: int = 0  # skipped or failed annotations the conversion's report accounts for


def verify_sources(source: str, tasks: list, label_map: dict[str, str], tolerance: float, defaults: MediaDefaults,
                   reported: set[tuple[str, str]] | None = None, limits: ReadLimits | None = None) -> Verification:
    """Every Dataloop annotation of the source is accounted for: compared frame by frame with what
    the editor draws from its task, or named in the conversion's report as skipped or failed (with
    a reason); one that failed to convert, or has no region, is a difference."""
    reported = reported or set()
    index = TasksByItem(tasks)
    out = Verification(Verdict(), [])
    for entry in entries([source], "verify", limits):
        if entry.note:
            continue
        if entry.error is not None:
            out.lines.append(f"error: {entry.error}")
            out.unreadable += 1
            continue
        try:
            item = item_tracks(entry.item, entry.origin, defaults)
        except InputError as err:
            out.lines.append(f"error: {err}")
            out.unreadable += 1
            continue
        except Exception as err:  # noqa: BLE001 - as convert_item: this item alone fails
            out.lines.append(f"error: {InputError(entry.origin, None, describe(err))}")
            out.unreadable += 1
            continue
        info = item.info
        task = index.find(info.item_id, info.filename)
        if task is None:
            out.lines.append(f"{info.origin}: no task for this item")
            out.without_task += 1
            continue
        for type_, ref, reason in item.skipped:  # nothing to show (past the video's end), as the report says
            key = f"{type_} skipped: {reason}"
            out.verdict.unchecked[key] = out.verdict.unchecked.get(key, 0) + 1
        for type_, ref, reason in item.failures:
            if (info.origin, ref) in reported:
                out.accepted += 1
                continue
            out.lines.append(f"{info.origin}: annotation {ref} ({type_}): not converted: {reason}")
            out.verdict.annotations += 1
            out.verdict.mismatches.append(Mismatch(ref, None, f"not converted: {reason}"))
        kept = [t for t in item.tracks if (info.origin, t.annotation_id) not in reported]
        out.accepted += len(item.tracks) - len(kept)
        item.tracks = kept
        v = compare_item(item, task, label_map, tolerance)
        for m in v.mismatches[:20]:
            frame = f" frame {m.frame}" if m.frame is not None else ""
            out.lines.append(f"{info.origin}: annotation {m.annotation}{frame}: {m.what}")
        out.verdict.merge(v)
    return out
