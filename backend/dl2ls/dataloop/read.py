"""Recognise and stream a SOURCE: an item file, a bare annotation list, a file holding an array of
items, an export folder (the `json/` tree, V1 `video.json` or V2 `video.mp4.json`), or an export
zip. Anything else is rejected with a precise message.

Items are yielded one at a time, so memory follows the largest item, not the export: folders and
zips hold one file per item; an array file is read through `PreadBuffer` (os.pread, never a memory
map: a file truncated under a map kills the process with SIGBUS) and split into its elements
without parsing the whole document. Zip entries are inflated in memory, in chunks with a running
count, and never extracted; entries with absolute paths or `..`, encrypted or corrupt entries and
entries that would inflate beyond the limits (`ReadLimits`) are refused and reported, each alone.
"""

from __future__ import annotations

import hashlib

import lzma
import operator
import os
import re
import stat
import zipfile
import zlib
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Iterator

import msgspec
import numpy as np

from dl2ls.dataloop.model import Item, decode_item, decode_json
from dl2ls.report import InputError

# ----------------------------------------------------------------------------- limits


@dataclass(frozen=True, slots=True)
class ReadLimits:
    """What one item may cost to read. Generous: a real item (one video's annotations) is a few
    MB; the limits are there so that a hostile or broken input fails alone instead of taking the
    machine's memory."""

    max_item_bytes: int = 512 << 20  # one item's JSON (a file, an array element, a zip entry)
    max_zip_ratio: int = 200  # a zip entry may inflate at most this many times its compressed size ...
    zip_ratio_floor: int = 16 << 20  # ... once it is larger than this (small JSON compresses very well)
    digests: bool = False  # give each entry a digest of its bytes (push asks; hashing costs ~0.5 s/GB)


DEFAULT_LIMITS = ReadLimits()

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """A size in bytes from `512M`, `2G`, `1.5g`, `64KiB` or a plain byte count (binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]?)(?:i?b)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r} (e.g. 512M, 2G, or a number of bytes)")
    size = int(float(match[1]) * _UNITS[match[2].lower()])
    if size <= 0:
        raise ValueError(f"not a size: {text!r} (must be more than 0 bytes)")
    return size


def _human(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def _too_large(origin: str, size: int, limits: ReadLimits, what: str = "item") -> InputError:
    return InputError(origin, None, f"refused: the {what} is {_human(size)} ({size} bytes), over the "
                                    f"{_human(limits.max_item_bytes)} allowed per item (--max-item-size)")


# ----------------------------------------------------------------------------- reading files


class FileChanged(OSError):
    """The file is shorter than when it was opened: someone changed it while it was being read."""


class PreadBuffer:
    """A read-only, bytes-like view of an open file, read on demand with os.pread: `len()`, slices
    (-> bytes) and single-byte indexing (-> int), which is all `split_array` and the readers use.

    Unlike a memory map, a file that shrinks under it raises `FileChanged` (one line for that file)
    instead of SIGBUS, and what it has read is ordinary memory that is freed with the bytes (the
    page cache is the kernel's, not our resident memory). The last small block read is kept, so the
    elements `split_array` finds inside the chunk it just scanned cost no second system call."""

    __slots__ = ("fd", "size", "_start", "_block")

    KEEP = 1 << 16  # reads this large (split_array's chunks, large elements) are kept for the next ones

    def __init__(self, fd: int, size: int | None = None):
        self.fd = fd
        self.size = os.fstat(fd).st_size if size is None else size
        self._start, self._block = 0, b""

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(self.size)
            if step != 1:
                raise ValueError("PreadBuffer slices take no step")
            return self._read(start, stop) if stop > start else b""
        index = operator.index(key)
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError("PreadBuffer index out of range")
        return self._read(index, index + 1)[0]

    def _read(self, start: int, stop: int) -> bytes:
        first, block = self._start, self._block
        if first <= start and stop <= first + len(block):
            return block[start - first:stop - first]
        data = pread_exact(self.fd, start, stop - start)
        if len(data) >= self.KEEP:  # a scanned chunk: keep it; single bytes and gaps must not evict it
            self._start, self._block = start, data
        return data


def pread_exact(fd: int, offset: int, length: int) -> bytes:
    """`length` bytes at `offset`, or FileChanged when the file no longer holds them."""
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts, got = [data], len(data)  # a short read: the kernel caps one read at ~2 GiB, or the end moved
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            raise FileChanged(f"changed while being read: it now ends at byte {offset + got}, "
                              f"before byte {offset + length} that it held when opened")
        parts.append(more)
        got += len(more)
    return b"".join(parts)


# ----------------------------------------------------------------------------- sources


@dataclass(frozen=True, slots=True)
class Locator:
    """Where `iter_items` found an item: enough to read that item alone again (`load_item`)."""

    path: str  # the file, or the zip
    member: str | None = None  # the zip entry
    span: tuple[int, int] | None = None  # the element of an array, as byte offsets
    index: int | None = None  # the element's index
    remote: str = ""  # the Dataloop-style path the file stands for (names items without an id)


@dataclass(slots=True)
class Entry:
    """One item of a source, or the reason it could not be read."""

    origin: str
    item: Item | None = None
    error: InputError | None = None
    note: str | None = None  # recognised and deliberately not converted (e.g. a label tree)
    locator: Locator | None = None  # how to read this item alone again (`load_item`)
    digest: str | None = None  # of the item's bytes as stored: an unchanged item needs no conversion


def iter_items(source: str | os.PathLike, *, limits: ReadLimits = DEFAULT_LIMITS) -> Iterator[Entry]:
    path = Path(source)
    shown = _printable(str(path))
    if path.is_dir():
        # every *.json that is not a folder: a FIFO, a device or a dangling link is named, not skipped
        files = sorted(p for p in path.rglob("*.json") if not p.is_dir())
        if not files:
            reason = "folder holds no .json files: not a Dataloop export"
            yield Entry(shown, error=InputError(shown, None, reason))
        for file in files:
            yield from _iter_file(file, _remote_path(file.relative_to(path).as_posix()), limits)
    elif path.is_file() and _is_zip(path):
        yield from _iter_zip(path, limits)
    elif path.exists() or path.is_symlink():  # a file; a FIFO, a device or a broken link: _iter_file says which
        yield from _iter_file(path, _remote_path(path.name), limits)
    else:
        yield Entry(shown, error=InputError(shown, None, "no such file or folder"))


def count_items(source: str | os.PathLike) -> int | None:
    """How many items a source will yield, when that is cheap to know (for the progress bar)."""
    path = Path(source)
    try:
        if path.is_dir():
            return sum(1 for p in path.rglob("*.json") if not p.is_dir())
        if path.is_file() and _is_zip(path):
            with zipfile.ZipFile(path) as zf:
                return sum(1 for i in zf.infolist() if i.filename.endswith(".json") and not i.is_dir())
    except _ZIP_ERRORS:
        pass  # iter_items reports it
    return None


def _is_zip(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def _remote_path(relative: str) -> str:
    """The Dataloop path an export file stands for, from its path under the SOURCE: the export's
    `json/` folder and `.json` suffix removed (V2 `json/a/b/clip.mp4.json` -> `/a/b/clip.mp4`, V1
    `a/b/clip.json` -> `/a/b/clip`). It names items that carry no id and no filename, the same way
    on every run whatever the working folder, so that pushing a folder twice finds the same tasks."""
    parts = [p for p in re.split(r"[\\/]", relative) if p not in ("", ".")]
    if len(parts) > 1 and parts[0] == "json":
        parts = parts[1:]
    if parts and parts[-1].endswith(".json") and len(parts[-1]) > len(".json"):
        parts[-1] = parts[-1][: -len(".json")]
    return _printable("/" + "/".join(parts))


def _printable(text: str) -> str:
    """File names are bytes on Linux: undecodable ones come back as lone surrogates, which no JSON
    writer accepts. Shown as `\\udcff` escapes in messages, reports and derived names."""
    return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode("utf-8")


def _iter_file(path: Path, remote: str, limits: ReadLimits) -> Iterator[Entry]:
    origin = _printable(str(path))
    locator = Locator(str(path), remote=remote)
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer for ever
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as fh:
            mode = os.fstat(fh.fileno()).st_mode
            if not stat.S_ISREG(mode):
                what = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) \
                    else "a socket" if stat.S_ISSOCK(mode) else "not a regular file"
                yield Entry(origin, error=InputError(origin, None, f"not read: {what}, not a file"))
                return
            buf: bytes | PreadBuffer = PreadBuffer(fh.fileno())
            if len(buf) == 0:
                yield Entry(origin, error=InputError(origin, None, "empty file"))
                return
            if len(buf) <= CHUNK:
                buf = buf[:]  # a small file (the usual item file): one read
            yield from _iter_document(buf, origin, locator, limits)
    except FileChanged as err:
        yield Entry(origin, error=InputError(origin, None, str(err)))
    except OSError as err:
        yield Entry(origin, error=InputError(origin, None, f"cannot read: {err.strerror or err}"))


# what reading a zip or one of its entries raises: corrupt data (zlib, lzma, bz2 -> OSError), a
# CRC mismatch or a bad header (BadZipFile), truncation (EOFError), an unknown compression method
# (NotImplementedError), a password (RuntimeError), names that are not UTF-8 (ValueError)
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, NotImplementedError, RuntimeError,
               OSError, ValueError)
ZIP_READ = 1 << 20  # bytes inflated at a time


def _iter_zip(path: Path, limits: ReadLimits) -> Iterator[Entry]:
    shown = _printable(str(path))
    try:
        zf = zipfile.ZipFile(path)
    except _ZIP_ERRORS as err:
        yield Entry(shown, error=InputError(shown, None, f"not a readable zip: {_reason(err)}"))
        return
    with zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        if not any(i.filename.endswith(".json") for i in infos):
            yield Entry(shown, error=InputError(shown, None, "zip holds no .json files: not a Dataloop export"))
        for info in infos:
            origin = _printable(f"{path}:{info.filename}")
            if not _safe_member(info.filename):
                yield Entry(origin, error=InputError(origin, None, "refused: zip entry with an absolute path or '..'"))
                continue
            if not info.filename.endswith(".json"):
                continue
            try:
                data = _read_entry(zf, info, origin, limits)  # in memory; nothing is ever written to disk
            except InputError as err:
                yield Entry(origin, error=err)
                continue
            locator = Locator(str(path), info.filename, remote=_remote_path(info.filename))
            yield from _iter_document(data, origin, locator, limits)
            del data


def _read_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, origin: str, limits: ReadLimits) -> bytearray:
    """One zip entry's bytes, refused before inflating when its declared size is over the item
    limit or an implausible ratio of its compressed size (a zip bomb), and inflated chunk by chunk
    with a running count, so that a header lying about the size cannot take more than it declared."""
    declared, packed = info.file_size, info.compress_size
    if info.flag_bits & 0x1:
        raise InputError(origin, None, "refused: an encrypted zip entry (no password can be given)")
    if declared > limits.max_item_bytes:
        raise _too_large(origin, declared, limits, "entry (uncompressed)")
    if declared > limits.zip_ratio_floor and declared > limits.max_zip_ratio * max(packed, 1):
        raise InputError(origin, None, f"refused: the entry inflates {packed} bytes to {declared} "
                                       f"({declared // max(packed, 1)}x, more than {limits.max_zip_ratio}x): "
                                       "a zip bomb, not an export")
    data = bytearray()  # grown as it inflates: memory follows what the entry really holds
    try:
        with zf.open(info) as fh:
            while chunk := fh.read(ZIP_READ):
                if len(data) + len(chunk) > declared:
                    raise InputError(origin, None, f"refused: the entry inflates to more than the {declared} "
                                                   "bytes its header declares")
                data += chunk
    except _ZIP_ERRORS as err:
        raise InputError(origin, None, f"cannot read zip entry: {_reason(err)}") from None
    if len(data) != declared:
        raise InputError(origin, None, f"cannot read zip entry: {len(data)} bytes where its header declares "
                                       f"{declared}")
    return data


def _reason(err: BaseException) -> str:
    kind = type(err)
    name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"  # zlib.error
    text = str(err).splitlines()[0][:200] if str(err) else ""
    return f"{name}: {text}" if text else name


def load_item(locator: Locator, origin: str, *, limits: ReadLimits = DEFAULT_LIMITS) -> Item:
    """Read one item again from where `iter_items` found it (a file, a zip entry, an array
    element), under the same rules and limits."""
    if not isinstance(locator, Locator):
        raise InputError(origin, None, f"cannot read again: not a locator ({type(locator).__name__})")
    try:
        if locator.member is None:
            with open(locator.path, "rb") as fh:
                buf = PreadBuffer(fh.fileno())
                if locator.span is not None:
                    return _load_element(buf, locator, origin, limits)
                return _first_item(buf[:] if len(buf) <= CHUNK else buf, origin, locator, limits)
        with zipfile.ZipFile(locator.path) as zf:
            data = _read_entry(zf, zf.getinfo(locator.member), origin, limits)
        if locator.span is not None:
            return _load_element(data, locator, origin, limits)
        return _first_item(data, origin, locator, limits)
    except FileChanged as err:
        raise InputError(origin, None, str(err)) from None
    except (KeyError, *_ZIP_ERRORS) as err:
        raise InputError(origin, None, f"cannot read again: {_reason(err)}") from None


def _load_element(buf: Buffer, locator: Locator, origin: str, limits: ReadLimits) -> Item:
    a, b = locator.span
    if b - a > limits.max_item_bytes:
        raise _too_large(origin, b - a, limits)
    if b > len(buf):
        raise InputError(origin, None, "no item there any more (the file is shorter)")
    return _name_if_anonymous(decode_item(buf[a:b], origin), locator)


def _first_item(buf: Buffer, origin: str, locator: Locator, limits: ReadLimits) -> Item:
    for entry in _iter_document(buf, origin, locator, limits):
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


Buffer = bytes | bytearray | PreadBuffer


def _digest(limits: ReadLimits, *parts) -> str | None:
    if not limits.digests:
        return None
    h = hashlib.sha1()  # the fastest of hashlib's here (SHA extensions)
    for part in parts:
        h.update(part)
        h.update(b"\x00")
    return h.hexdigest()


def _iter_document(buf: Buffer, origin: str, locator: Locator, limits: ReadLimits) -> Iterator[Entry]:
    first = _first_char(buf)
    if first is None:
        yield Entry(origin, error=InputError(origin, None, "empty file"))
    elif first == ord("{"):
        if len(buf) > limits.max_item_bytes:
            yield Entry(origin, error=_too_large(origin, len(buf), limits))
            return
        try:
            # decoded straight from the buffer: a validated item keeps no reference to it
            data = buf if not isinstance(buf, PreadBuffer) else buf[:]
            item = decode_item(data, origin)
            yield Entry(origin, item=_name_if_anonymous(item, locator), locator=locator, digest=_digest(limits, data))
        except InputError as err:
            yield Entry(origin, error=err)
    elif first == ord("["):
        yield from _iter_array(buf, origin, locator, limits)
    else:
        yield Entry(origin, error=InputError(
            origin, None, "not JSON: expected an item ({...}), an annotation list or an item array ([...])"))


def _first_char(buf: Buffer) -> int | None:
    head = bytes(buf[: 1 << 16]).lstrip(_WS)
    if not head and len(buf) > 1 << 16:  # a long run of whitespace first: look further, a piece at a time
        head = _visible(buf, 1 << 16, len(buf))
    return head[0] if head else None


def _name_if_anonymous(item: Item, locator: Locator) -> Item:
    """An item with neither id nor filename is named after where it lies (see `_remote_path`)."""
    if item.id or item.id_ or item.filename or not locator.remote:
        return item
    remote = locator.remote if locator.index is None else f"{locator.remote}[{locator.index}]"
    item.filename = remote
    item.name = item.name or remote.rsplit("/", 1)[-1]
    return item


SNIFF = 16  # elements tried, at most, to tell an annotation list from an item array


def _iter_array(buf: Buffer, origin: str, locator: Locator, limits: ReadLimits) -> Iterator[Entry]:
    """An array is either a bare list of annotations (one item, older exports), an array of items
    (what the export API returns), or a Dataloop label tree (recognised and left alone). Items
    are decoded as the splitter finds them; an error further on leaves the earlier ones good."""
    spans = split_array(buf)
    try:
        head, seen, why = None, [], None
        for a, b in spans:  # what kind of array: the first element that reads says
            seen.append((a, b))
            if b - a <= limits.max_item_bytes:
                try:
                    head = decode_json(buf[a:b], origin)
                    break
                except InputError as err:
                    why = why or err.reason
            if len(seen) >= SNIFF:
                break
        if not seen:
            yield Entry(origin, error=InputError(origin, None, "empty list: no items or annotations"))
            return
        elements = chain(seen, spans)
        if isinstance(head, dict) and "type" in head and ("coordinates" in head or "label" in head):
            if len(buf) > limits.max_item_bytes:  # the whole list is one item
                yield Entry(origin, error=_too_large(origin, len(buf), limits, "annotation list"))
                return
            raws = [msgspec.Raw(buf[a:b]) for a, b in elements]
            remote = locator.remote or "/" + origin
            item = Item(annotations=raws, name=remote.rsplit("/", 1)[-1], filename=remote)
            yield Entry(origin, item=item, locator=locator, digest=_digest(limits, *raws))
        elif isinstance(head, dict) and ("annotations" in head or "filename" in head or "metadata" in head):
            for index, (a, b) in enumerate(elements):
                sub = f"{origin}[{index}]"
                where = Locator(locator.path, locator.member, (a, b), index, locator.remote)
                if b - a > limits.max_item_bytes:
                    yield Entry(sub, error=_too_large(sub, b - a, limits))
                    continue
                try:
                    data = buf[a:b]
                    entry = Entry(sub, item=_name_if_anonymous(decode_item(data, sub), where), locator=where,
                                  digest=_digest(limits, data))
                except InputError as err:
                    entry = Entry(sub, error=err)
                yield entry
        elif isinstance(head, dict) and isinstance(head.get("value"), dict) and "tag" in head["value"]:
            yield Entry(origin, note="a Dataloop label tree, not annotations (pass it as --ontology)")
        elif head is None and why:
            reason = f"a JSON array whose first element cannot be read: {why}"
            yield Entry(origin, error=InputError(origin, None, reason))
        elif head is None:
            yield Entry(origin, error=InputError(origin, None, "a JSON array whose first elements are all over the "
                                                               f"{_human(limits.max_item_bytes)} item limit "
                                                               "(--max-item-size)"))
        else:
            yield Entry(origin, error=InputError(
                origin, None, "a JSON array, but of neither Dataloop items nor annotations"))
    except ValueError as err:
        yield Entry(origin, error=InputError(origin, None, f"not valid JSON: {err}"))


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
    a bare value, truncation, trailing data. `data` is anything with len(), slicing and byte
    indexing: bytes, or a `PreadBuffer` over a file (then it may raise `FileChanged`)."""
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
            while pos >= 0 and (b[pos - offset] if pos >= offset else data[pos]) == _BACKSLASH:
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
                    if _visible(data, 0, where):
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
    gap = _visible(data, begin, end)
    between = elements > 0 and not closing
    if gap == (b"," if between else b""):
        return
    if not gap:
        raise ValueError(f"missing ',' at byte {end}")
    if gap == b",":
        raise ValueError(f"unexpected ',' before byte {end}")
    raise ValueError(f"unexpected {gap[:20].decode(errors='replace')!r} before byte {end}: "
                     "array elements must be objects")


def _visible(data: Buffer, begin: int, end: int) -> bytes:
    """What is not whitespace in data[begin:end], read a piece at a time (whitespace between
    elements may be huge; only its first few visible bytes matter)."""
    out = b""
    for at in range(begin, end, 1 << 20):
        out += bytes(data[at:min(end, at + (1 << 20))]).translate(None, _WS)
        if len(out) > 64:
            break
    return out
