"""Write items as a Dataloop export folder (`json/` mirroring the remote folders, V2 naming
`a/b/video.mp4.json`), so that convert, push and serve read a fetched dataset like an export; and
the items' binaries under `items/` (`a/b/video.mp4`), as Dataloop's own export lays them out."""

from __future__ import annotations

import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

PART_SUFFIX = ".dl2ls-part"  # a download under way (or cut off by a kill): never taken for the file
PART_RANDOM = 12  # hex digits between the name and the suffix: `.<name>.<12 hex>.dl2ls-part`


def safe_parts(item_dir: Any, filename: Any, name: Any, item_id: str) -> list[str]:
    """An item's remote path as folder names and a file name that cannot leave the folder they go
    under: `..`, absolute parts and characters file systems refuse are neutralised. Values that
    are not text (an answer is input like any other) are ignored."""
    item_dir, filename, name = (v if isinstance(v, str) else None for v in (item_dir, filename, name))
    remote = filename or (f"{item_dir or ''}/{name}" if name else None) or item_id
    # split by hand: PurePosixPath keeps a leading "//" as a part, which joinpath takes as absolute
    parts = [p for p in remote.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    clean = [re.sub(r'[\x00-\x1f<>:"|?*]', "_", p) for p in parts]
    return clean or [re.sub(r'[\x00-\x1f<>:"|?*/\\]', "_", item_id).replace("..", "__") or "_"]


def item_path(root: Path, item_dir: str | None, filename: str | None, name: str | None, item_id: str) -> Path:
    """Where an item's JSON goes under root/json, never outside it (see `safe_parts`)."""
    parts = safe_parts(item_dir, filename, name, item_id)
    parts[-1] = parts[-1] + ".json"
    return root.joinpath("json", *parts)


def media_path(items_root: Path, item_dir: Any, filename: Any, name: Any, item_id: str) -> Path:
    """Where an item's binary goes under `items_root` (an export's `items/` folder), never outside
    it: the same names as its JSON under json/, without the `.json`."""
    return items_root.joinpath(*safe_parts(item_dir, filename, name, item_id))


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- media


class _Sized(msgspec.Struct):
    """An item's JSON, read for `metadata` alone (everything else is skipped unread)."""

    metadata: Any = None


_sized_decoder = msgspec.json.Decoder(_Sized)


@dataclass(frozen=True, slots=True)
class MediaJob:
    """One item's binary to download: its id, where it goes, and its size when Dataloop says."""

    item_id: str
    path: Path
    size: int | None


def item_size(metadata: Any) -> int | None:
    """`metadata.system.size`, when it is a whole number of bytes."""
    system = metadata.get("system") if isinstance(metadata, dict) else None
    size = system.get("size") if isinstance(system, dict) else None
    if isinstance(size, str) and size.isdigit():
        size = int(size)
    return size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None


def size_in(raw: bytes | memoryview) -> int | None:
    """`metadata.system.size` of an item's raw JSON; None when it has none or cannot be read."""
    try:
        return item_size(_sized_decoder.decode(raw).metadata)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError):
        return None


def media_job(items_root: Path, item_id: str, item_dir: Any, filename: Any, name: Any,
              size: int | None) -> MediaJob:
    return MediaJob(item_id, media_path(items_root, item_dir, filename, name, item_id), size)


def complete(path: Path, size: int | None) -> bool:
    """Whether a file from an earlier run can stay: its size is the item's when Dataloop gives one,
    else it is there and not empty. (Downloads are renamed into place only when whole, so a file
    that is there was complete when written; the size catches one that changed since.)"""
    try:
        st = path.stat()
    except OSError:
        return False
    if not path.is_file():
        return False
    return st.st_size == size if size is not None else st.st_size > 0


def part_file(path: Path) -> tuple[int, Path]:
    """A new temporary file beside `path` for its download (open for writing, mode 0600): `.name.`,
    random hex, `.dl2ls-part`. The fixed length means `clear_parts` of one name never matches the
    temporary file of another (`a` against `a.b`'s)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(PART_RANDOM // 2)}{PART_SUFFIX}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600), tmp
        except FileExistsError:
            continue


def clear_parts(path: Path) -> None:
    """Take away the temporary files a killed run left beside `path` (its own, no other's)."""
    try:
        for stale in path.parent.glob(f".{glob_escape(path.name)}.{'[0-9a-f]' * PART_RANDOM}{PART_SUFFIX}"):
            stale.unlink(missing_ok=True)
    except OSError:
        pass


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)
