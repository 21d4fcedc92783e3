"""Write items as a Dataloop export folder (`json/` mirroring the remote folders, V2 naming
`a/b/video.mp4.json`), so that convert, push and serve read a fetched dataset like an export."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path, PurePosixPath


def item_path(root: Path, item_dir: str | None, filename: str | None, name: str | None, item_id: str) -> Path:
    """Where an item's JSON goes under root/json, never outside it: `..`, absolute parts and
    characters file systems refuse are neutralised. Values that are not text (an answer is input
    like any other) are ignored."""
    item_dir, filename, name = (v if isinstance(v, str) else None for v in (item_dir, filename, name))
    remote = filename or (f"{item_dir or ''}/{name}" if name else None) or item_id
    parts = [p for p in PurePosixPath(remote.replace("\\", "/")).parts if p not in ("/", "", ".", "..")]
    parts = [re.sub(r'[\x00-\x1f<>:"|?*]', "_", p) for p in parts] or [item_id]
    parts[-1] = parts[-1] + ".json"
    return root.joinpath("json", *parts)


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
