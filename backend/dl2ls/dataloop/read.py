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
            # every item is copied out of the map before it is decoded, so the map can close
            yield from _iter_document(buf, origin, path.name)
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
            yield from _iter_document(data, origin, PurePosixPath(info.filename).name)


def _safe_member(name: str) -> bool:
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return False
    return ".." not in re.split(r"[\\/]", name)


# ----------------------------------------------------------------------------- one document

_WS = b" \t\r\n"
_TOKEN = re.compile(rb'["\[\]{},]')  # all that delimits array elements


Buffer = bytes | mmap.mmap


def _iter_document(buf: Buffer, origin: str, filename: str) -> Iterator[Entry]:
    first = _first_char(buf)
    if first is None:
        yield Entry(origin, error=InputError(origin, None, "empty file"))
    elif first == ord("{"):
        try:
            yield Entry(origin, item=decode_item(buf[:], origin))
        except InputError as err:
            yield Entry(origin, error=err)
    elif first == ord("["):
        yield from _iter_array(buf, origin, filename)
    else:
        yield Entry(origin, error=InputError(
            origin, None, "not JSON: expected an item ({...}), an annotation list or an item array ([...])"))


def _first_char(buf: Buffer) -> int | None:
    head = buf[: 1 << 16].lstrip(_WS)
    return head[0] if head else None


def _iter_array(buf: Buffer, origin: str, filename: str) -> Iterator[Entry]:
    """An array is either a bare list of annotations (one item, older exports), an array of items
    (what the export API returns), or a Dataloop label tree (recognised and left alone)."""
    try:
        spans = list(split_array(buf))
    except ValueError as err:
        yield Entry(origin, error=InputError(origin, None, f"not valid JSON: {err}"))
        return
    if not spans:
        yield Entry(origin, error=InputError(origin, None, "empty list: no items or annotations"))
        return
    head = _peek(buf[spans[0][0]:spans[0][1]], origin)
    if isinstance(head, dict) and "type" in head and ("coordinates" in head or "label" in head):
        stem = filename[:-5] if filename.endswith(".json") else filename
        raws = [msgspec.Raw(bytes(buf[a:b])) for a, b in spans]
        yield Entry(origin, item=Item(annotations=raws, name=stem, filename=stem))
    elif isinstance(head, dict) and ("annotations" in head or "filename" in head or "metadata" in head):
        for index, (a, b) in enumerate(spans):
            sub = f"{origin}[{index}]"
            try:
                yield Entry(sub, item=decode_item(buf[a:b], sub))
            except InputError as err:
                yield Entry(sub, error=err)
    elif isinstance(head, dict) and isinstance(head.get("value"), dict) and "tag" in head["value"]:
        yield Entry(origin, note="a Dataloop label tree, not annotations (pass it as --ontology)")
    else:
        yield Entry(origin, error=InputError(
            origin, None, "a JSON array, but of neither Dataloop items nor annotations"))


def _peek(data: bytes, origin: str):
    try:
        return decode_json(data, origin)
    except InputError:
        return None


def split_array(data: Buffer) -> Iterator[tuple[int, int]]:
    """(start, end) byte spans of the elements of a top-level JSON array, without parsing them.

    Tracks only strings and nesting, which is all that delimits elements; each element is then
    decoded (and validated) on its own."""
    n = len(data)
    pos = 0
    while pos < n and data[pos] in _WS:
        pos += 1
    if pos >= n or data[pos] != ord("["):
        raise ValueError("expected '['")
    depth, start, expect_value = 0, None, True
    i = pos + 1
    while True:
        m = _TOKEN.search(data, i)
        if m is None:
            raise ValueError(f"truncated: the array is not closed (byte {n})")
        j = m.start()
        ch = data[j]
        if ch == 0x22:  # a string: find its closing quote, skipping escaped ones
            k = j + 1
            while True:
                k = data.find(b'"', k)
                if k < 0:
                    raise ValueError(f"truncated: unterminated string at byte {j}")
                backslashes = 0
                while data[k - 1 - backslashes] == 0x5C:
                    backslashes += 1
                if backslashes % 2 == 0:
                    break
                k += 1
            if depth == 0:
                raise ValueError(f"a bare string at byte {j}: array elements must be objects")
            i = k + 1
            continue
        if ch in b"[{":
            if depth == 0:
                if not expect_value:
                    raise ValueError(f"missing ',' at byte {j}")
                start = j
            depth += 1
        elif ch in b"]}":
            if depth == 0:
                if ch == ord("]"):
                    rest = data[j + 1:j + 1 + 4096]
                    if rest.strip(_WS):
                        raise ValueError(f"extra data after the array at byte {j + 1}")
                    return
                raise ValueError(f"unbalanced '}}' at byte {j}")
            depth -= 1
            if depth == 0:
                yield start, j + 1
                expect_value = False
        elif ch == ord(",") and depth == 0:
            expect_value = True
        i = j + 1
