"""A table of hostile input files for `dl2ls`, generated at test time (nothing here is committed
data). Each row is (id, what it attacks, a builder that writes the file into a folder and returns
its path). Every file is small on disk (the largest ~1 MB zip, the longest array ~8 MB); what they
claim or inflate to is not.

    python tests/hostile.py OUT_DIR     # write the whole table into OUT_DIR to look at it

Used by tests/test_hostile.py, which runs every row through `dl2ls convert`, `dl2ls push --dry-run`
and `dl2ls serve` /predict.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from conftest import box_annotation, image_item, pts, snap, video_item

LABEL = "person"  # a label of the repository's label_config.xml, so a config never skips it


@dataclass(frozen=True)
class Row:
    id: str
    attacks: str
    build: Callable[[Path], Path]  # writes the file into the folder, returns its path
    kind: str = "video"  # which labeling config a /predict for it is sent with
    one_item: bool = False  # the file holds one item, with the id `h-<row id>`
    clean_ok: bool = False  # may legitimately convert with no problem at all (nothing then names it)
    zip: bool = False

    @property
    def item_id(self) -> str | None:
        return f"h-{self.id}" if self.one_item else None

    @property
    def media(self) -> str:
        """The media name a task for this row names (data.video / data.image)."""
        return f"{self.id}.mp4" if self.kind == "video" else f"{self.id}.jpg"


# ----------------------------------------------------------------------------- small builders


def ann(ann_id="a1", label=LABEL, **kw):
    return box_annotation(ann_id, label=label, **kw)


def good_ann(ann_id="good"):
    return ann(ann_id, coords=pts(10, 10, 50, 40), end=5)


def vitem(rid: str, annotations, **kw) -> dict:
    item = video_item(annotations, item_id=f"h-{rid}", **kw)
    item.update(name=f"{rid}.mp4", filename=f"/{rid}.mp4")
    return item


def iitem(rid: str, annotations, **kw) -> dict:
    item = image_item(annotations, item_id=f"h-{rid}", **kw)
    item.update(name=f"{rid}.jpg", filename=f"/{rid}.jpg")
    return item


def dumps(obj) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()


def splice(obj, **raw: bytes) -> bytes:
    """JSON of obj with each string "@KEY@" replaced by raw bytes (what json.dumps cannot write)."""
    data = dumps(obj)
    for key, value in raw.items():
        marker = f'"@{key}@"'.encode()
        assert marker in data, key
        data = data.replace(marker, value)
    return data


def write(name: str, data: bytes | Callable[[], bytes]) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(data() if callable(data) else data)
        return path
    return build


def item_file(rid: str, make: Callable[[], bytes | dict]) -> Callable[[Path], Path]:
    def data() -> bytes:
        doc = make()
        return doc if isinstance(doc, bytes) else dumps(doc)
    return write(f"{rid}.json", data)


TRUNCATED = b'{"id": "trunc", "annotations": [{"id": "a1", "type": "box", "label": "person", "coordi'


# ----------------------------------------------------------------------------- PNG masks


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_rgba(width: int, height: int, row: Callable[[int], bytes] | None = None) -> bytes:
    """An 8-bit RGBA PNG written row by row (so an 11000 x 11000 one never exists in memory)."""
    comp = zlib.compressobj(9)
    parts = []
    zero = b"\0" + bytes(4 * width)
    for y in range(height):
        parts.append(comp.compress(row(y) if row else zero))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")


def noisy_png(width=64, height=48) -> bytes:
    import random

    rng = random.Random(7)
    return png_rgba(width, height, lambda y: b"\0" + bytes(rng.randrange(256) for _ in range(4 * width)))


def garble_idat(png: bytes, fix_crc: bool) -> bytes:
    """Flip bytes in the middle of the IDAT data; the chunk layout (lengths) stays intact."""
    at = png.index(b"IDAT")
    length = struct.unpack(">I", png[at - 4:at])[0]
    body = bytearray(png[at + 4:at + 4 + length])
    for k in range(len(body) // 3, len(body) // 3 + 24):
        body[k] ^= 0xA5
    crc = struct.pack(">I", zlib.crc32(b"IDAT" + bytes(body))) if fix_crc else png[at + 4 + length:at + 8 + length]
    return png[:at + 4] + bytes(body) + crc + png[at + 8 + length:]


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def mask_item(rid: str, png: bytes | str, size=(64, 48)) -> dict:
    coords = png if isinstance(png, str) else data_url(png)
    return iitem(rid, [ann("mask", type_="binary", coords=coords), ann("ok", coords=pts(1, 1, 9, 9))],
                 width=size[0], height=size[1])


# ----------------------------------------------------------------------------- zips


def good_entry(rid: str) -> bytes:
    return dumps(vitem(f"{rid}-good", [good_ann()]))


def zip_of(rid: str, entries: list[tuple[str, bytes]], patch: Callable[[bytes, zipfile.ZipFile], bytes] | None = None):
    def build(folder: Path) -> Path:
        path = folder / f"{rid}.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in entries:
                zf.writestr(zipfile.ZipInfo(name, (2024, 1, 1, 0, 0, 0)), data, zipfile.ZIP_DEFLATED)
        if patch:
            with zipfile.ZipFile(path) as zf:
                path.write_bytes(patch(path.read_bytes(), zf))
        return path
    return build


def zip_bomb(folder: Path) -> Path:
    """~1 MB on disk, one entry that inflates to 1 GiB (spaces inside an item object)."""
    path = folder / "zip-bomb-1gb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        zf.writestr("json/good.mp4.json", good_entry("zip-bomb-1gb"))
        with zf.open("json/bomb.mp4.json", "w") as fh:
            fh.write(b'{"id": "h-zip-bomb-1gb", ')
            chunk = b" " * (1 << 20)
            for _ in range(1024):
                fh.write(chunk)
            fh.write(b'"name": "zip-bomb-1gb.mp4", "annotations": []}')
    return path


def _central(data: bytes, zf: zipfile.ZipFile, name: str) -> int:
    """Offset of `name`'s central directory header."""
    at = data.index(b"PK\x01\x02")  # the first central header
    while True:
        n = struct.unpack("<H", data[at + 28:at + 30])[0]
        if data[at + 46:at + 46 + n].decode() == name:
            return at
        m, k = struct.unpack("<HH", data[at + 30:at + 34])
        at = data.index(b"PK\x01\x02", at + 46 + n + m + k)


def set_sizes(name: str, uncompressed: int):
    def patch(data: bytes, zf: zipfile.ZipFile) -> bytes:
        at = _central(data, zf, name)
        return data[:at + 24] + struct.pack("<I", uncompressed) + data[at + 28:]
    return patch


def set_encrypted(name: str):
    def patch(data: bytes, zf: zipfile.ZipFile) -> bytes:
        out = bytearray(data)
        info = zf.getinfo(name)
        out[info.header_offset + 6] |= 1  # local header flags
        out[_central(data, zf, name) + 8] |= 1  # central header flags
        return bytes(out)
    return patch


def corrupt_deflate(name: str):
    def patch(data: bytes, zf: zipfile.ZipFile) -> bytes:
        info = zf.getinfo(name)
        off = info.header_offset
        n, m = struct.unpack("<HH", data[off + 26:off + 30])
        start = off + 30 + n + m
        out = bytearray(data)
        for k in range(start + 2, start + min(info.compress_size - 4, 40)):
            out[k] ^= 0xFF
        return bytes(out)
    return patch


def nested_zip(folder: Path) -> Path:
    inner = folder / ".inner-tmp.zip"
    zip_of("inner", [("json/inner.mp4.json", good_entry("zip-nested"))])(folder).rename(inner)
    path = folder / "zip-nested.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(inner, "export/inner.zip")
    inner.unlink()
    return path


def truncated_zip(folder: Path) -> Path:
    path = zip_of("zip-truncated", [("json/a.mp4.json", good_entry("zip-truncated")),
                                    ("json/b.mp4.json", noisy_png(32, 32))])(folder)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def empty_zip(folder: Path) -> Path:
    path = folder / "zip-empty.zip"
    zipfile.ZipFile(path, "w").close()
    return path


# ----------------------------------------------------------------------------- hostile paths


def named(name: str, data: bytes = TRUNCATED) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(data)
        return path
    return build


def symlink_loop(folder: Path) -> Path:
    path = folder / "symlink-loop.json"
    os.symlink("symlink-loop.json", path)
    return path


def fifo(folder: Path) -> Path:
    path = folder / "fifo.json"
    os.mkfifo(path)
    return path


NEWLINE_NAME = "nl\nitem-failed: forged-by-newline.json"
ANSI_NAME = "\x1b[31mitem-failed: forged\x1b[0m.json"
INVALID_UTF8_NAME = os.fsdecode(b"name-\xff\xfe-invalid-utf8.json")


# ----------------------------------------------------------------------------- arrays


def array_with(rid: str, middle: bytes, n: int = 1000) -> Callable[[], bytes]:
    def make() -> bytes:
        items = []
        for i in range(n):
            it = vitem(f"{rid}-{i}", [ann(f"a{i}", end=2)])
            it["id"] = f"h-{rid}-{i}"
            items.append(dumps(it))
        items[n // 2] = middle
        return b"[\n" + b",\n".join(items) + b"\n]\n"
    return make


def deep(n: int, open_: bytes, close: bytes, inner: bytes = b"") -> bytes:
    return open_ * n + inner + close * n


# ----------------------------------------------------------------------------- the table


def _rows() -> list[Row]:
    R = []

    def row(id_, attacks, make, **kw):
        """A one-item file: make() returns the item (dict or raw bytes)."""
        R.append(Row(id_, attacks, item_file(id_, make), **kw))

    def raw(id_, attacks, data, **kw):
        R.append(Row(id_, attacks, write(f"{id_}.json", data), **kw))

    # --- deep nesting
    raw("deep-array-100k", "100k nested [] (balanced): the array splitter, any recursive JSON fallback",
        deep(100_000, b"[", b"]"))
    raw("deep-array-2k-unclosed", "a 2 KB file of 2048 '[' never closed", b"[" * 2048)
    raw("deep-object-100k", "100k nested objects {\"a\": ...}", deep(100_000, b'{"a":', b"}", b"1"))
    row("deep-coordinates", "100k nested lists inside one annotation's coordinates, beside a good annotation",
        lambda: splice(vitem("deep-coordinates", [ann("deep", coords="@DEEP@"), good_ann()]),
                       DEEP=deep(100_000, b"[", b"]")), one_item=True)
    row("deep-item-metadata", "100k nested objects in an unknown item metadata field",
        lambda: splice({**vitem("deep-item-metadata", [good_ann()]), "extra": "@DEEP@"},
                       DEEP=deep(100_000, b'{"a":', b"}", b"1")), one_item=True)

    # --- zips
    R.append(Row("zip-bomb-1gb", "a 1 MB zip whose entry inflates to 1 GiB", zip_bomb, zip=True))
    R.append(Row("zip-cd-size-small", "central directory says 16 bytes for a 20 MB entry",
                 zip_of("zip-cd-size-small", [("json/a.mp4.json", good_entry("zip-cd-size-small")),
                                              ("json/big.mp4.json", b'{"pad": "' + b" " * (20 << 20) + b'"}')],
                        set_sizes("json/big.mp4.json", 16)), zip=True))
    R.append(Row("zip-cd-size-huge", "central directory says ~4 GiB for a 200-byte entry",
                 zip_of("zip-cd-size-huge", [("json/a.mp4.json", good_entry("zip-cd-size-huge"))],
                        set_sizes("json/a.mp4.json", 0xFFFFFFF0)), zip=True))
    R.append(Row("zip-corrupt-deflate", "bytes flipped inside an entry's deflate stream",
                 zip_of("zip-corrupt-deflate", [("json/a.mp4.json", good_entry("zip-corrupt-deflate") * 20),
                                                ("json/b.mp4.json", good_entry("zip-corrupt-deflate-b"))],
                        corrupt_deflate("json/a.mp4.json")), zip=True))
    R.append(Row("zip-encrypted-flag", "an entry flagged encrypted (no password)",
                 zip_of("zip-encrypted-flag", [("json/a.mp4.json", good_entry("zip-encrypted-flag")),
                                               ("json/b.mp4.json", good_entry("zip-encrypted-flag-b"))],
                        set_encrypted("json/a.mp4.json")), zip=True))
    R.append(Row("zip-traversal", "entries with absolute paths, '..', a drive letter, beside a good one",
                 zip_of("zip-traversal", [("/etc/evil.mp4.json", good_entry("t1")),
                                          ("../evil.mp4.json", good_entry("t2")),
                                          ("json/../../evil.mp4.json", good_entry("t3")),
                                          ("C:/evil.mp4.json", good_entry("t4")),
                                          ("json/ok.mp4.json", good_entry("zip-traversal"))]), zip=True))
    R.append(Row("zip-nested", "a zip whose only entry is another zip", nested_zip, zip=True))
    R.append(Row("zip-empty", "a zip with no entries", empty_zip, zip=True))
    R.append(Row("zip-truncated", "a zip cut in half (no central directory)", truncated_zip, zip=True))
    R.append(Row("zip-entry-hostile-names", "entry names with ANSI escapes and a newline forging report lines",
                 zip_of("zip-entry-hostile-names", [("json/" + ANSI_NAME, TRUNCATED),
                                                    ("json/" + NEWLINE_NAME.replace("newline", "zip-newline"),
                                                     TRUNCATED),
                                                    ("json/ok.mp4.json", good_entry("zip-entry-hostile-names"))]),
                 zip=True))

    # --- encodings
    row("label-invalid-utf8", "bytes 0xff 0xfe inside a label",
        lambda: dumps(vitem("label-invalid-utf8", [ann(label="@"), good_ann()])).replace(
            b'"label": "@"', b'"label": "per\xff\xfeson"'))
    R.append(Row("name-invalid-utf8", "a file name that is not UTF-8 (truncated JSON inside)",
                 named(INVALID_UTF8_NAME)))
    row("utf16-bom", "an item written as UTF-16 with a BOM",
        lambda: json.dumps(vitem("utf16-bom", [good_ann()])).encode("utf-16"))
    row("label-lone-surrogate", "a label holding the escape \\udc80 (a lone surrogate)",
        lambda: vitem("label-lone-surrogate", [ann(label="per\udc80son"), good_ann()]), one_item=True)
    row("name-lone-surrogate", "item name/filename/id holding \\ud800 (lone surrogates reach the task data)",
        lambda: {**vitem("name-lone-surrogate", [good_ann()]), "name": "clip\ud800.mp4",
                 "filename": "/clip\ud800.mp4", "dir": "/\udfff"})
    row("label-raw-nul", "a raw NUL byte inside a label string",
        lambda: dumps(vitem("label-raw-nul", [ann(label="@"), good_ann()])).replace(
            b'"label": "@"', b'"label": "per\x00son"'))
    row("label-escaped-nul", "a \\u0000 escape inside a label (valid JSON)",
        lambda: vitem("label-escaped-nul", [ann(label="per\x00son"), good_ann()]), one_item=True, clean_ok=True)
    row("utf8-bom", "a UTF-8 BOM before an otherwise good item",
        lambda: b"\xef\xbb\xbf" + dumps(vitem("utf8-bom", [good_ann()])), one_item=True, clean_ok=True)

    # --- absurd numbers
    row("frame-5m-no-nbframes", "a snapshot on frame 5,000,000 in a 1 KB item without nb_frames",
        lambda: vitem("frame-5m-no-nbframes", [ann(snapshots=[snap(5_000_000, pts(20, 20, 30, 30), label=LABEL)])]),
        one_item=True, clean_ok=True)
    row("endframe-1e12", "endFrame 10**12",
        lambda: vitem("endframe-1e12", [ann(end=10**12), good_ann()]), one_item=True)
    row("fps-zero", "fps 0 everywhere", lambda: vitem("fps-zero", [good_ann()], fps=0), one_item=True)
    row("fps-abc", "fps \"abc\" everywhere", lambda: vitem("fps-abc", [good_ann()], fps="abc"), one_item=True)
    row("fps-1e308", "fps 1e308", lambda: vitem("fps-1e308", [good_ann()], fps=1e308), one_item=True)
    row("width-1e300", "width 1e300", lambda: vitem("width-1e300", [good_ann()], width=1e300), one_item=True)
    row("coords-nan-inf", "NaN, Infinity and -Infinity coordinates (and in a snapshot), beside a good one",
        lambda: vitem("coords-nan-inf", [ann("nan", coords=pts(float("nan"), 1, 5, 5)),
                                         ann("inf", coords=pts(1, 1, float("inf"), float("-inf"))),
                                         ann("snapnan", end=4, snapshots=[snap(2, pts(1, float("nan"), 3, 3),
                                                                               label=LABEL)]),
                                         good_ann()]), one_item=True)
    row("literal-1e400", "1e400 number literals (overflow to inf) in coordinates and the angle",
        lambda: splice(vitem("literal-1e400", [ann("big", coords="@C@"), good_ann()]),
                       C=b'[{"x": 1e400, "y": 1, "z": 0}, {"x": 5, "y": -1e400, "z": 0}, 1e400]'), one_item=True)
    row("frame-negative", "negative frame, endFrame and snapshot frame",
        lambda: vitem("frame-negative", [ann("neg", frame=-5, end=-1),
                                         ann("negsnap", end=5, snapshots=[snap(-10, label=LABEL)]),
                                         good_ann()]), one_item=True)
    row("int-1e30", "10**30 where ints are expected: frame, endFrame, snapshot frame, nb_frames",
        lambda: vitem("int-1e30", [ann("f", frame=10**30), ann("e", end=10**30),
                                   ann("s", snapshots=[snap(10**30, label=LABEL)]), good_ann()],
                      nb_frames=10**30), one_item=True)
    row("mask-huge-11000", "an 11000x11000 RGBA mask PNG (~0.6 MB compressed) on an image of that size",
        lambda: mask_item("mask-huge-11000", png_rgba(11000, 11000), size=(11000, 11000)),
        kind="image", one_item=True, clean_ok=True)
    row("mask-idat-garbled", "mask PNG with bytes flipped inside IDAT (bad CRC), structure kept",
        lambda: mask_item("mask-idat-garbled", garble_idat(noisy_png(), fix_crc=False)), kind="image", one_item=True)
    row("mask-idat-garbled-crc-ok", "mask PNG with bytes flipped inside IDAT and the CRC fixed (a bad zlib stream)",
        lambda: mask_item("mask-idat-garbled-crc-ok", garble_idat(noisy_png(), fix_crc=True)),
        kind="image", one_item=True)
    row("mask-truncated", "a mask PNG cut in half",
        lambda: mask_item("mask-truncated", noisy_png()[:900]), kind="image", one_item=True)
    row("mask-url-no-comma", "a binary annotation whose data URL has no comma / no payload",
        lambda: iitem("mask-url-no-comma", [ann("m1", type_="binary", coords="data:image/png;base64"),
                                            ann("m2", type_="binary", coords={"data": 5}),
                                            ann("ok", coords=pts(1, 1, 9, 9))]), kind="image", one_item=True)

    # --- wrong types at every level
    raw("item-string", "the item is a JSON string", b'"an item"')
    raw("item-number", "the item is a JSON number", b"42")
    raw("item-null", "the item is null", b"null")
    raw("item-true", "the item is true", b"true")
    row("annotations-dict", "annotations is an object",
        lambda: {**vitem("annotations-dict", []), "annotations": {"a": good_ann()}}, one_item=True)
    row("annotations-string", "annotations is a string",
        lambda: {**vitem("annotations-string", []), "annotations": "box"}, one_item=True)
    row("annotations-number", "annotations is a number",
        lambda: {**vitem("annotations-number", []), "annotations": 7}, one_item=True)
    row("annotation-list", "an annotation that is a list, beside a good one",
        lambda: vitem("annotation-list", [[good_ann("inner")], good_ann()]), one_item=True)
    row("annotation-number", "annotations that are a number, null and a string, beside a good one",
        lambda: vitem("annotation-number", [5, None, "box", good_ann()]), one_item=True)
    row("coords-box-shapes", "box coordinates of every wrong shape (and a snapshot's data), beside a good one",
        lambda: vitem("coords-box-shapes", [
            ann("dict", coords={"x": 1, "y": 2}), ann("onept", coords=pts(1, 1, 2, 2)[:1]),
            ann("nested", coords=[pts(1, 1, 2, 2)]), ann("str", coords="1,1,2,2"), ann("nums", coords=[1, 2, 3, 4]),
            ann("angle-str", coords=pts(1, 1, 2, 2) + ["45"]), ann("four", coords=pts(1, 1, 2, 2) * 2),
            ann("xstr", coords=[{"x": "1", "y": 1}, {"x": 2, "y": 2}]), ann("empty", coords=[]),
            ann("snapdata", end=5, snapshots=[snap(2, "nope", label=LABEL)]),
            ann("snapnull", end=5, snapshots=[snap(3, None, label=LABEL, data=None)]),
            good_ann()]), one_item=True)
    row("coords-point-shapes", "point coordinates of wrong shapes on an image, beside a good one",
        lambda: iitem("coords-point-shapes", [
            ann(f"p{k}", type_="point", coords=c) for k, c in enumerate(
                [[[{"x": 1, "y": 1}]], [], "x", {"x": "a", "y": 1}, {"x": 1}, 5, [1, 2], {"x": None, "y": None}])
        ] + [ann("ok", type_="point", coords={"x": 3, "y": 4, "z": 0})]), kind="image", one_item=True)
    row("coords-segment-shapes", "segment coordinates of wrong shapes on a video, beside a good one",
        lambda: vitem("coords-segment-shapes", [
            ann(f"s{k}", type_="segment", coords=c) for k, c in enumerate(
                [pts(1, 1, 5, 5), [[]], [[{"x": 1}]], "x", [[[{"x": 1, "y": 1}]]], {"x": 1}, [[1, 2, 3]], [None]])
        ] + [ann("ok", type_="segment", coords=[[{"x": 1, "y": 1}, {"x": 9, "y": 1}, {"x": 5, "y": 8}]])]),
        one_item=True)
    row("coords-ellipse-shapes", "ellipse coordinates of wrong shapes on an image, beside a good one",
        lambda: iitem("coords-ellipse-shapes", [
            ann(f"e{k}", type_="ellipse", coords=c) for k, c in enumerate(
                [pts(1, 1, 5, 5), {"center": 5, "rx": 1, "ry": 1, "angle": 0}, {"center": {"x": 1, "y": 1}},
                 {"center": {"x": 9, "y": 9}, "rx": "big", "ry": 2, "angle": 0},
                 {"center": {"x": 9, "y": 9}, "rx": -5, "ry": 2, "angle": "x"}, [], "ellipse"])
        ] + [ann("ok", type_="ellipse", coords={"center": {"x": 20, "y": 20, "z": 0}, "rx": 5, "ry": 3,
                                                "angle": 10})]), kind="image", one_item=True)
    row("metadata-list", "item metadata is a list", lambda: {**vitem("metadata-list", [good_ann()]),
                                                             "metadata": [25, "video/mp4"]}, one_item=True)
    row("system-string", "item metadata.system is a string",
        lambda: {**vitem("system-string", [good_ann()]), "metadata": {"fps": 25, "system": "video/mp4"}},
        one_item=True)
    row("ann-metadata-wrong", "an annotation's metadata a list, metadata.system a string, beside a good one",
        lambda: vitem("ann-metadata-wrong", [{**ann("mdlist"), "metadata": [1]},
                                             {**ann("sysstr"), "metadata": {"system": "frame 0"}}, good_ann()]),
        one_item=True)
    row("snapshots-dict", "snapshots_ is an object (and a string), beside a good one",
        _snapshots_dict, one_item=True)
    row("snapshot-frame-types", "snapshot frames that are a string, a float, a bool, null",
        lambda: vitem("snapshot-frame-types", [
            ann(f"f{k}", end=9, snapshots=[snap(v, label=LABEL)]) for k, v in enumerate(["5", 5.5, True, None])
        ] + [good_ann()]), one_item=True)
    row("label-types", "labels that are a number, a list, an object, null (and in a snapshot)",
        lambda: vitem("label-types", [ann("n", label=5), ann("l", label=[LABEL]), ann("d", label={"name": LABEL}),
                                      ann("z", label=None),
                                      ann("snap", end=5, snapshots=[snap(2, label=[LABEL])]), good_ann()]),
        one_item=True)
    row("id-list", "the item id and an annotation id are lists",
        lambda: {**vitem("id-list", [{**good_ann(), "id": ["a", 1]}, good_ann("good2")]), "id": ["h-id-list"]})
    row("datasetid-dict", "datasetId is an object, dir a number, stream a list",
        lambda: {**vitem("datasetid-dict", [good_ann()]), "datasetId": {"$oid": "x"}, "dir": 5, "stream": ["u"]})

    # --- hostile paths
    R.append(Row("name-newline", "a file name with a newline that forges an 'item-failed:' line", named(NEWLINE_NAME)))
    R.append(Row("name-ansi", "a file name with ANSI escapes that forges an 'item-failed:' line", named(ANSI_NAME)))
    R.append(Row("symlink-loop", "a .json that is a symlink to itself (ELOOP)", symlink_loop))
    R.append(Row("fifo", "a .json that is a FIFO (opening it would block)", fifo))

    # --- structure
    raw("truncated-json", "an item cut at 60 %", lambda: (lambda d: d[: len(d) * 6 // 10])(
        dumps(vitem("truncated-json", [good_ann(), good_ann("b")]))))
    R.append(Row("array-1000-bad-middle", "1,000 tiny items; the 500th has every field of the wrong type",
                 write("array-1000-bad-middle.json", array_with(
                     "array-1000-bad-middle", b'{"id": [], "annotations": 5, "metadata": "x", "filename": {}}'))))
    R.append(Row("array-1000-bare-value", "1,000 tiny items; the 500th is the number 42",
                 write("array-1000-bare-value.json", array_with("array-1000-bare-value", b"42"))))
    R.append(Row("array-long-string", "an item array whose middle element is an 8 MB string",
                 write("array-long-string.json", array_with("array-long-string",
                                                            b'"' + b"x" * (8 << 20) + b'"', n=3))))
    raw("trailing-garbage", "a good item followed by garbage",
        lambda: dumps(vitem("trailing-garbage", [good_ann()])) + b"\n}garbage{\x00")
    raw("array-trailing-garbage", "an item array followed by garbage",
        lambda: b"[" + dumps(vitem("array-trailing-garbage", [good_ann()])) + b"]\nxyz")
    raw("empty", "an empty file", b"")
    raw("whitespace-only", "4 KB of whitespace", b" \n\t\r" * 1024)
    return R


def _snapshots_dict() -> dict:
    a = ann("d", end=5)
    a["metadata"]["system"]["snapshots_"] = {"2": snap(2, label=LABEL)}
    b = ann("s", end=5)
    b["metadata"]["system"]["snapshots_"] = "none"
    return vitem("snapshots-dict", [a, b, good_ann()])


ROWS: list[Row] = _rows()


def good_items() -> list[tuple[str, bytes]]:
    """Three known-good video items (file name, bytes) to sit among the hostile ones."""
    out = []
    for k in range(1, 4):
        it = vitem(f"good-{k}", [good_ann(), ann("moving", end=20, snapshots=[snap(10, pts(30, 30, 60, 60),
                                                                                   label=LABEL)])])
        it["id"] = f"good-{k}"
        out.append((f"good-{k}.json", dumps(it)))
    return out


def build_all(root: Path) -> dict[str, Path]:
    """files/ (every non-zip row and the good items), zips/ (one zip per row), good/ (the good items)."""
    files, zips, good = root / "files", root / "zips", root / "good"
    for d in (files, zips, good):
        d.mkdir(parents=True, exist_ok=True)
    paths = {}
    for r in ROWS:
        paths[r.id] = r.build(zips if r.zip else files)
    for name, data in good_items():
        (files / name).write_bytes(data)
        (good / name).write_bytes(data)
    return paths


assert len({r.id for r in ROWS}) == len(ROWS) >= 45

if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "hostile-out")
    for rid, p in build_all(out).items():
        size = p.lstat().st_size
        print(f"{rid:28} {size:>10}  {p.name!r}")
    print(f"{len(ROWS)} rows")
