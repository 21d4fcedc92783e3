"""Recognise and stream a SOURCE: an item file, a bare annotation list, a file holding an array of
items, an export folder (the `json/` tree, V1 `video.json` or V2 `video.mp4.json`), or an export
zip. Anything else is rejected with a precise message.

Items are yielded one at a time, so memory follows the largest item, not the export: folders and
zips hold one file per item; an array file is memory-mapped and split into its elements without
parsing the whole document. Zip entries are read in memory and never extracted; entries with
absolute paths or `..` are refused and reported.
"""

from __future__ import annotations

import mmap
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

import msgspec
import numpy as np

from dl2ls.dataloop.model import Item, decode_item, decode_json
from dl2ls.report import InputError

MAX_ZIP_ENTRY = 4 << 30  # a single item over 4 GiB uncompressed is not an annotation file


@dataclass(slots=True)
class Entry:
    """One item of a source, or the reason it could not be read."""

    origin: str
    item: Item | None = None
    error: InputError | None = None
    note: str | None = None  # recognised and deliberately not converted (e.g. a label tree)
    locator: tuple = ()  # how to read this item alone again (`load_item`)


def iter_items(source: str | os.PathLike) -> Iterator[Entry]:
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.json") if p.is_file())
        if not files:
            reason = "folder holds no .json files: not a Dataloop export"
            yield Entry(str(path), error=InputError(str(path), None, reason))
        for file in files:
            yield from _iter_file(file)
    elif path.is_file() and zipfile.is_zipfile(path):
        yield from _iter_zip(path)
    elif path.is_file():
        yield from _iter_file(path)
    elif not path.exists():
        yield Entry(str(path), error=InputError(str(path), None, "no such file or folder"))
    else:
        yield Entry(str(path), error=InputError(str(path), None, "not a file or folder"))


def count_items(source: str | os.PathLike) -> int | None:
    """How many items a source will yield, when that is cheap to know (for the progress bar)."""
    path = Path(source)
    if path.is_dir():
        return sum(1 for p in path.rglob("*.json") if p.is_file())
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            return sum(1 for i in zf.infolist() if i.filename.endswith(".json") and not i.is_dir())
    return None


def _iter_file(path: Path) -> Iterator[Entry]:
    origin = str(path)
    try:
        size = path.stat().st_size
        if size == 0:
            yield Entry(origin, error=InputError(origin, None, "empty file"))
            return
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            # in an array, every item is copied out of the map before it is decoded and the
            # pages read are released (`_release`), so memory follows one item
            yield from _iter_document(buf, origin, path.name, ("file", str(path)))
    except OSError as err:
        yield Entry(origin, error=InputError(origin, None, f"cannot read: {err.strerror or err}"))


def _iter_zip(path: Path) -> Iterator[Entry]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        yield Entry(str(path), error=InputError(str(path), None, f"not a readable zip: {err}"))
        return
    with zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        if not any(i.filename.endswith(".json") for i in infos):
            yield Entry(str(path), error=InputError(str(path), None, "zip holds no .json files: not a Dataloop export"))
        for info in infos:
            origin = f"{path}:{info.filename}"
            if not _safe_member(info.filename):
                yield Entry(origin, error=InputError(origin, None, "refused: zip entry with an absolute path or '..'"))
                continue
            if not info.filename.endswith(".json"):
                continue
            if info.file_size > MAX_ZIP_ENTRY:
                yield Entry(origin, error=InputError(origin, None, f"refused: {info.file_size} bytes uncompressed"))
                continue
            try:
                data = zf.read(info)  # in memory; nothing is ever written to disk
            except (zipfile.BadZipFile, OSError, EOFError, RuntimeError) as err:  # truncated, encrypted
                yield Entry(origin, error=InputError(origin, None, f"cannot read zip entry: {err}"))
                continue
            yield from _iter_document(data, origin, PurePosixPath(info.filename).name,
                                      ("zip", str(path), info.filename))


def load_item(locator: tuple, origin: str) -> Item:
    """Read one item again from where `iter_items` found it (a file, a zip entry, an array span)."""
    try:
        if locator[0] == "file":
            path, span = Path(locator[1]), locator[2:]
            with open(path, "rb") as fh:
                if span:
                    fh.seek(span[0])
                    return decode_item(fh.read(span[1] - span[0]), origin)
                data, name = fh.read(), path.name
        elif locator[0] == "zip":
            with zipfile.ZipFile(locator[1]) as zf:
                data = zf.read(locator[2])
            if locator[3:]:
                return decode_item(data[locator[3]:locator[4]], origin)
            name = PurePosixPath(locator[2]).name
        else:
            raise InputError(origin, None, f"unknown locator {locator[0]!r}")
    except (OSError, zipfile.BadZipFile, KeyError) as err:
        raise InputError(origin, None, f"cannot read again: {err}") from None
    for entry in _iter_document(data, origin, name, locator):
        if entry.error is not None:
            raise entry.error
        if entry.item is not None:
            return entry.item
    raise InputError(origin, None, "no item there any more")


def _safe_member(name: str) -> bool:
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return False
    return ".." not in re.split(r"[\\/]", name)


# ----------------------------------------------------------------------------- one document

_WS = b" \t\r\n"


Buffer = bytes | mmap.mmap


def _iter_document(buf: Buffer, origin: str, filename: str, locator: tuple) -> Iterator[Entry]:
    first = _first_char(buf)
    if first is None:
        yield Entry(origin, error=InputError(origin, None, "empty file"))
    elif first == ord("{"):
        try:
            # decoded straight from the buffer: a validated item keeps no reference to it
            yield Entry(origin, item=decode_item(buf, origin), locator=locator)
        except InputError as err:
            yield Entry(origin, error=err)
    elif first == ord("["):
        yield from _iter_array(buf, origin, filename, locator)
    else:
        yield Entry(origin, error=InputError(
            origin, None, "not JSON: expected an item ({...}), an annotation list or an item array ([...])"))


def _first_char(buf: Buffer) -> int | None:
    head = buf[: 1 << 16].lstrip(_WS)
    return head[0] if head else None


def _iter_array(buf: Buffer, origin: str, filename: str, locator: tuple) -> Iterator[Entry]:
    """An array is either a bare list of annotations (one item, older exports), an array of items
    (what the export API returns), or a Dataloop label tree (recognised and left alone). Items
    are decoded as the splitter finds them; an error further on leaves the earlier ones good."""
    spans = split_array(buf)
    try:
        first = next(spans, None)
        if first is None:
            yield Entry(origin, error=InputError(origin, None, "empty list: no items or annotations"))
            return
        head = _peek(buf[first[0]:first[1]], origin)
        if isinstance(head, dict) and "type" in head and ("coordinates" in head or "label" in head):
            stem = filename[:-5] if filename.endswith(".json") else filename
            raws = [msgspec.Raw(buf[a:b]) for a, b in _chain_first(first, spans)]
            yield Entry(origin, item=Item(annotations=raws, name=stem, filename=stem), locator=locator)
        elif isinstance(head, dict) and ("annotations" in head or "filename" in head or "metadata" in head):
            for index, (a, b) in enumerate(_chain_first(first, spans)):
                sub = f"{origin}[{index}]"
                try:
                    entry = Entry(sub, item=decode_item(buf[a:b], sub), locator=(*locator, a, b))
                except InputError as err:
                    entry = Entry(sub, error=err)
                _release(buf, b)
                yield entry
        elif isinstance(head, dict) and isinstance(head.get("value"), dict) and "tag" in head["value"]:
            yield Entry(origin, note="a Dataloop label tree, not annotations (pass it as --ontology)")
        else:
            yield Entry(origin, error=InputError(
                origin, None, "a JSON array, but of neither Dataloop items nor annotations"))
    except ValueError as err:
        yield Entry(origin, error=InputError(origin, None, f"not valid JSON: {err}"))


def _chain_first(first: tuple[int, int], rest: Iterator[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    yield first
    yield from rest


def _release(buf: Buffer, upto: int) -> None:
    """Let the kernel drop the pages of a memory-mapped file already read, so that resident
    memory stays at one item however large the array file is."""
    if isinstance(buf, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        length = upto - upto % mmap.PAGESIZE
        if length > 0:
            buf.madvise(mmap.MADV_DONTNEED, 0, length)


def _peek(data: bytes, origin: str):
    try:
        return decode_json(data, origin)
    except InputError:
        return None


CHUNK = 1 << 22  # bytes scanned at a time by split_array

_SPECIAL = np.zeros(256, dtype=bool)  # the only bytes that can delimit array elements
_SPECIAL[list(b'"\\[]{}')] = True
_QUOTE, _BACKSLASH = ord('"'), ord("\\")


def split_array(data: Buffer) -> Iterator[tuple[int, int]]:
    """(start, end) byte spans of the elements of a top-level JSON array, found without parsing
    them, one chunk at a time, yielded as soon as each element closes.

    Only strings and nesting delimit elements: a quote not escaped by an odd run of backslashes
    opens or closes a string; brackets outside strings change the depth. The chunk's quotes,
    backslashes and brackets are picked out and counted with numpy; what lies between elements is
    checked to be a comma. Each element is then decoded (and validated) on its own. Raises
    ValueError, naming the byte, for what is not an array of objects or arrays: a missing comma,
    a bare value, truncation, trailing data."""
    n = len(data)
    depth, in_string = 0, False
    opened = -1  # just after the top-level '['
    gap_from = -1  # where the text between elements began (after '[' or an element)
    start = -1  # where the current element began
    elements = 0
    for offset in range(0, n, CHUNK):
        b = np.frombuffer(data[offset:offset + CHUNK], dtype=np.uint8)
        idx = np.flatnonzero(_SPECIAL[b])
        if not len(idx):
            continue
        c = b[idx]
        is_quote = c == _QUOTE
        is_bs = c == _BACKSLASH
        # a quote right after a backslash may be escaped (rare): count the run, chunks apart or not
        before = np.where(idx > 0, b[np.maximum(idx - 1, 0)], data[offset - 1] if offset else 0)
        for k in np.flatnonzero(is_quote & (before == _BACKSLASH)).tolist():
            pos, run = offset + int(idx[k]) - 1, 0
            while pos >= 0 and data[pos] == _BACKSLASH:
                run, pos = run + 1, pos - 1
            is_quote[k] = run % 2 == 0
        toggles = np.cumsum(is_quote, dtype=np.int32)
        inside = ((toggles - is_quote + in_string) & 1).astype(bool)
        bracket = ~is_quote & ~is_bs & ~inside
        bc, bpos = c[bracket], idx[bracket]
        if len(bc):
            after = depth + np.cumsum(np.where((bc == 0x5B) | (bc == 0x7B), 1, -1), dtype=np.int64)
            for k in np.flatnonzero(after <= 2).tolist():
                level, ch, where = int(after[k]), int(bc[k]), offset + int(bpos[k])
                if level == 2 and ch in (0x5B, 0x7B) and (k == 0 and depth == 1 or k > 0 and after[k - 1] == 1):
                    _check_gap(data, gap_from, where, elements)
                    start = where
                elif level == 1 and ch in (0x5D, 0x7D):
                    yield start, where + 1
                    elements += 1
                    gap_from = where + 1
                elif level == 1 and ch == 0x5B and opened < 0:
                    if bytes(data[:where]).strip(_WS):
                        raise ValueError("expected '[' at byte 0")
                    opened = gap_from = where + 1
                elif level == 0:
                    if ch != 0x5D or opened < 0:
                        raise ValueError(f"unexpected {chr(ch)!r} at byte {where}")
                    _check_gap(data, gap_from, where, elements, closing=True)
                    if bytes(data[where + 1:where + 1 + 4096]).strip(_WS):
                        raise ValueError(f"extra data after the array at byte {where + 1}")
                    return
                elif level < 0:
                    raise ValueError(f"unbalanced {chr(ch)!r} at byte {where}")
            depth = int(after[-1])
        in_string = bool((int(toggles[-1]) + in_string) & 1)
    if opened < 0:
        raise ValueError("expected '['")
    raise ValueError(f"truncated: the array is not closed (byte {n})")


def _check_gap(data: Buffer, begin: int, end: int, elements: int, closing: bool = False) -> None:
    """Between '[' and the first element nothing; between elements one comma; before ']' nothing."""
    gap = bytes(data[begin:end]).strip(_WS)
    between = elements > 0 and not closing
    if gap == (b"," if between else b""):
        return
    if not gap:
        raise ValueError(f"missing ',' at byte {end}")
    if gap == b",":
        raise ValueError(f"unexpected ',' before byte {end}")
    raise ValueError(f"unexpected {gap[:20].decode(errors='replace')!r} before byte {end}: "
                     "array elements must be objects")
