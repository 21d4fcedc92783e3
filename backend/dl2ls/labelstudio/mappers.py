"""One small mapper per Label Studio result type, chosen by reading the labeling config.

`PLANS` says, for each media kind and Dataloop type, which result types can carry it, best first,
and whether that is exact or a named approximation. `convert_track` walks the plan, takes the
first result type whose control the config has, and asks that mapper for the regions.

The rules that must live in exactly one place live here: frame numbering (`ls_frame`), percent
conversion (`percent`), the rotated-rectangle corner (`ls_rect_px`) and the `enabled` rule
(`_sequence`). Pure: no I/O.
"""

from __future__ import annotations

import base64
import io
import zlib
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from dl2ls.labelstudio.config import Control, LabelConfig, ObjectTag
from dl2ls.labelstudio.evaluate import ls_rect_corners
from dl2ls.tracks import (
    EXACT_PX, Media, Run, Track, angle_tolerance_deg, bounding_boxes, held_index, interpolate, keyframes, runs,
    sample_frames,
)

DIGITS = 6  # percent decimals: 1e-6 % of an 8K frame is 1e-4 px, well inside EXACT_PX


def ls_frame(frame0: int | np.ndarray):
    """Dataloop frames are 0-based; Label Studio's are 1-based (frame f is decoded frame f-1)."""
    return frame0 + 1


def percent(px, size: float):
    return px * (100.0 / size)


def ls_rect_px(boxes: np.ndarray) -> np.ndarray:
    """Boxes (x1, y1, x2, y2, angle about the centre) -> Label Studio's rectangle parameters in
    pixels: (x, y) the corner that the rotation about the top-left corner keeps fixed, width,
    height, rotation. Label Studio turns a rectangle about (x, y); Dataloop about its centre."""
    x1, y1, x2, y2, angle = boxes.T
    if not angle.any():  # unrotated: the corner is the corner
        out = boxes.copy()
        out[:, 2:4] -= boxes[:, 0:2]
        return out
    w, h = x2 - x1, y2 - y1
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    t = np.radians(angle)
    c, s = np.cos(t), np.sin(t)
    x = cx - (w / 2) * c + (h / 2) * s
    y = cy - (w / 2) * s - (h / 2) * c
    return np.column_stack([x, y, w, h, angle])


@dataclass
class Context:
    """Everything a mapper needs besides the track."""

    config: LabelConfig
    obj: ObjectTag
    media: Media
    label_map: dict[str, str] = field(default_factory=dict)
    tolerance_px: float = 0.0  # 0: exact

    @property
    def lossy(self) -> bool:
        return self.tolerance_px > 0

    @property
    def tol_px(self) -> float:
        # exact: search keyframes at half the exactness bound, leaving room for rounding
        return self.tolerance_px if self.lossy else EXACT_PX / 2


@dataclass
class Outcome:
    results: list[dict]
    outcome: str  # exact | approximated | skipped
    reason: str | None = None
    error_px: float = 0.0
    keyframes: int = 0
    attributes: dict[str, int] = field(default_factory=dict)  # mapped | meta -> count


# ----------------------------------------------------------------------------- video mappers


def video_rectangles(track: Track, track_runs: list[Run], ctx: Context, control: Control, labels: list[str]):
    """`videorectangle`: one region per label run; within each visible range the fewest keyframes
    that reproduce every frame under the editor's linear interpolation. Only the range's samples
    (`sample_frames`) are looked at: matching them matches every frame in between."""
    boxes = ls_rect_px(bounding_boxes(track))
    turning = bool(np.any(boxes[:, 4] != boxes[0, 4]))
    diagonal = float(np.max(np.hypot(boxes[:, 2], boxes[:, 3])))
    tol = np.array([ctx.tol_px] * 4 + [angle_tolerance_deg(ctx.tol_px, diagonal / 2)])
    # lossy: the error that counts is where the corners land, as verify measures it
    row_error = (lambda want, got: _corner_errors(want, got) / ctx.tol_px) if ctx.lossy else None
    # an angle must not change by half a turn between keyframes: the editor turns the short way
    max_step = np.array([np.inf] * 4 + [180.0]) if turning else None
    scale = np.array([100.0 / ctx.media.width, 100.0 / ctx.media.height] * 2 + [1.0])
    out, worst, emitted = [], 0.0, 0
    for run, label in zip(track_runs, labels):
        sequence = []
        for a, b in run.ranges:
            frames = sample_frames(track, a, b)
            values = boxes[held_index(track, frames)]
            if turning:
                values[:, 4] = np.unwrap(values[:, 4], period=360.0)
            keys, err = keyframes(values, tol, max_step, lossy=ctx.lossy, row_error=row_error, at=frames)
            if ctx.lossy:
                err = float(_corner_errors(values, interpolate(values, keys, at=frames)).max())
            worst = max(worst, err)
            kv = values[keys] * scale  # percent of the frame size (see `percent`)
            kv[:, 4] = np.mod(kv[:, 4], 360.0)
            sequence.extend(_sequence(frames[keys], np.round(kv, DIGITS), ctx.media.fps))
        emitted += len(sequence)
        out.append(("videorectangle", run, {
            "framesCount": _frames_count(track, ctx.media),
            "duration": _duration(track, ctx.media),
            "labels": [label],
            "sequence": sequence,
        }))
    return out, worst, emitted


def _corner_errors(want: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Per row, the largest distance in pixels (along x or y) between corresponding corners of
    Label Studio rectangles (x, y, width, height, rotation)."""
    return np.abs(ls_rect_corners(*want.T) - ls_rect_corners(*got.T)).max(axis=(1, 2))


def _sequence(frames0: np.ndarray, kv: np.ndarray, fps: float) -> list[dict]:
    """One visible range as keyframes. `enabled` is "visible until the next keyframe", not "is a
    keyframe": true on every keyframe but the range's last, which is false so that the box is
    shown on that frame and hidden after it."""
    enabled = [True] * len(frames0)
    enabled[-1] = False
    frames = ls_frame(frames0).tolist()
    times = np.round(frames0 / fps, DIGITS).tolist()  # the frame's own timestamp; Label Studio reads only `frame`
    x, y, w, h, r = kv.T.tolist()
    return [
        {"frame": f, "enabled": e, "rotation": r_, "x": x_, "y": y_, "width": w_, "height": h_, "time": t}
        for f, e, r_, x_, y_, w_, h_, t in zip(frames, enabled, r, x, y, w, h, times)
    ]


def _frames_count(track: Track, media: Media) -> int:
    return max(media.frames_count or 0, track.end + 1)


def _duration(track: Track, media: Media) -> float:
    return round(max(media.duration or 0.0, (track.end + 1) / media.fps), 6)


def timeline_labels(track: Track, track_runs: list[Run], ctx: Context, control: Control, labels: list[str]):
    """`timelinelabels`: the visible frames of each label run as 1-based inclusive ranges."""
    out = []
    for run, label in zip(track_runs, labels):
        ranges = [{"start": int(ls_frame(a)), "end": int(ls_frame(b))} for a, b in run.ranges]
        out.append(("timelinelabels", run, {"ranges": ranges, "timelinelabels": [label]}))
    return out, 0.0, 0


def choices(track: Track, track_runs: list[Run], ctx: Context, control: Control, labels: list[str]):
    """`choices`: a class on an image, or (approximated) a class over a video as a whole: one
    result per annotation, with every label it took (the first only, for a single choice)."""
    chosen = list(dict.fromkeys(labels))
    if control.attrs.get("choice", "single") not in ("multiple",):
        chosen = chosen[:1]
    return [("choices", track_runs[0], {"choices": chosen})], 0.0, 0


# ----------------------------------------------------------------------------- image mappers


def rectangle_labels(track: Track, track_runs, ctx: Context, control: Control, labels):
    x, y, w, h, rot = ls_rect_px(bounding_boxes(track))[0]
    W, H = ctx.media.width, ctx.media.height
    value = {"x": _r(percent(x, W)), "y": _r(percent(y, H)), "width": _r(percent(w, W)),
             "height": _r(percent(h, H)), "rotation": _r(rot)}
    return [("rectanglelabels", track_runs[0], {**value, "rectanglelabels": [labels[0]]})], 0.0, 0


def polygon_labels(track: Track, track_runs, ctx: Context, control: Control, labels):
    W, H = ctx.media.width, ctx.media.height
    pts = track.geometry[0]
    points = [[_r(percent(px, W)), _r(percent(py, H))] for px, py in pts.tolist()]
    if track.type == "polyline" and len(points) > 2 and points[0] == points[-1]:
        points = points[:-1]
    return [("polygonlabels", track_runs[0], {"points": points, "closed": True, "polygonlabels": [labels[0]]})], 0.0, 0


def keypoint_labels(track: Track, track_runs, ctx: Context, control: Control, labels):
    x, y = track.geometry[0]
    value = {"x": _r(percent(x, ctx.media.width)), "y": _r(percent(y, ctx.media.height)),
             "width": _r(percent(_point_size(control), ctx.media.width))}
    return [("keypointlabels", track_runs[0], {**value, "keypointlabels": [labels[0]]})], 0.0, 0


def _point_size(control: Control) -> float:
    try:
        return float(control.attrs.get("strokeWidth", 3)) / 2
    except ValueError:
        return 1.5


def ellipse_labels(track: Track, track_runs, ctx: Context, control: Control, labels):
    cx, cy, rx, ry, angle = track.geometry[0]
    W, H = ctx.media.width, ctx.media.height
    value = {"x": _r(percent(cx, W)), "y": _r(percent(cy, H)), "radiusX": _r(percent(rx, W)),
             "radiusY": _r(percent(ry, H)), "rotation": _r(angle)}
    return [("ellipselabels", track_runs[0], {**value, "ellipselabels": [labels[0]]})], 0.0, 0


def brush_labels(track: Track, track_runs, ctx: Context, control: Control, labels):
    """`brushlabels`: Dataloop's RGBA PNG (mask = alpha > 127, as dtlpy reads it) as Label Studio's
    RLE, painted 255."""
    url = track.geometry[0]
    try:
        png = base64.b64decode(url[url.index(",") + 1:], validate=False)
    except ValueError as err:
        raise ValueError(f"mask is not a readable PNG: {err}") from None
    rle = mask_rle(png, int(ctx.media.width), int(ctx.media.height))
    return [("brushlabels", track_runs[0], {"format": "rle", "rle": rle, "brushlabels": [labels[0]]})], 0.0, 0


# ----------------------------------------------------------------------------- masks
#
# A mask PNG is read in strips of rows, straight from its compressed data, and only the alpha
# channel is kept, as runs of inside/outside pixels: memory follows one strip and the runs, never
# the image (11000 x 11000 pixels would be 484 MB as RGBA, and mask2rle copies it 4 times over).
# The chunks are walked here (CRCs checked); Pillow only unfilters each strip's alpha bytes.

#: Decoding costs time for every pixel a PNG names, however few bytes it stores (deflate packs
#: 1,000 pixels in a byte): a mask over this many pixels (16384 x 16384) is refused, by name.
MAX_MASK_PIXELS = 1 << 28
#: Interlaced PNGs cannot be read in strips; Pillow decodes them whole, up to this many pixels.
MAX_WHOLE_MASK_PIXELS = 1 << 24
#: Inside/outside changes in reading order: a few bytes of RLE each, and the editor decodes them all.
MAX_MASK_RUNS = 2_000_000
STRIP_BYTES = 1 << 22  # of decoded rows at a time

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # PNG colour type -> samples per pixel
_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}


@dataclass(slots=True)
class PngMask:
    """What a mask PNG's chunks say, before any pixel is decoded."""

    png: bytes
    width: int
    height: int
    depth: int  # bits per sample
    color: int  # PNG colour type
    interlaced: bool
    idat: list[memoryview]  # the compressed image data, in order
    palette_alpha: bytes | None = None  # tRNS of a palette PNG: alpha per palette entry
    key: bytes | None = None  # tRNS of a grey or RGB PNG: the one transparent colour, raw

    @classmethod
    def read(cls, png: bytes) -> "PngMask":
        """Walk the chunks, checking each one's CRC (a garbled chunk is a bad PNG)."""
        if png[:8] != _PNG_SIGNATURE:
            raise ValueError("no PNG signature")
        view, pos, out = memoryview(png), 8, None
        idat, trns = [], None
        while pos < len(png):
            if pos + 12 > len(png):
                raise ValueError("truncated chunk")
            length, kind = int.from_bytes(view[pos:pos + 4], "big"), bytes(view[pos + 4:pos + 8])
            data = view[pos + 8:pos + 8 + length]
            if len(data) < length or pos + 12 + length > len(png):
                raise ValueError(f"truncated {kind.decode('latin-1')!r} chunk")
            if zlib.crc32(data, zlib.crc32(kind)) != int.from_bytes(view[pos + 8 + length:pos + 12 + length], "big"):
                raise ValueError(f"garbled {kind.decode('latin-1')!r} chunk (its CRC does not match)")
            pos += 12 + length
            if kind == b"IHDR":
                if length != 13:
                    raise ValueError("bad IHDR chunk")
                w, h = int.from_bytes(data[0:4], "big"), int.from_bytes(data[4:8], "big")
                depth, color, compression, filtering, interlace = bytes(data[8:13])
                if not w or not h or color not in _DEPTHS or depth not in _DEPTHS[color] or compression or \
                        filtering or interlace > 1:
                    raise ValueError("bad IHDR chunk")
                out = cls(png, w, h, depth, color, bool(interlace), idat)
            elif out is None:
                raise ValueError("no IHDR chunk first")
            elif kind == b"IDAT":
                idat.append(data)
            elif kind == b"tRNS":
                trns = bytes(data)
            elif kind == b"IEND":
                break
        if out is None or not idat:
            raise ValueError("no image data")
        if trns is not None:
            if out.color == 3:
                out.palette_alpha = trns
            elif out.color in (0, 2) and len(trns) == 2 * _CHANNELS[out.color]:
                out.key = trns
        return out

    @property
    def has_alpha(self) -> bool:
        return self.color in (4, 6) or self.palette_alpha is not None or self.key is not None

    @property
    def row_bytes(self) -> int:
        return (self.width * _CHANNELS[self.color] * self.depth + 7) // 8

    @property
    def filter_unit(self) -> int:
        """Bytes per pixel as PNG filters count them (at least 1)."""
        return max(1, _CHANNELS[self.color] * self.depth // 8)


def mask_rle(png: bytes, width: int, height: int) -> list[int]:
    """A mask PNG as Label Studio's brush RLE (what `label_studio_sdk.converter.brush.mask2rle`
    gives for the 0/255 mask, without ever holding the mask). Raises `_Skip` for a mask of
    another size, ValueError (with the reason) for anything unreadable or over a limit."""
    try:
        head = PngMask.read(png)
    except ValueError as err:
        raise ValueError(f"mask is not a readable PNG: {err}") from None
    if (head.width, head.height) != (width, height):  # from the header, before any pixel is decoded
        raise _Skip(f"mask is {head.width}x{head.height}, the image {width}x{height}")
    pixels = width * height
    if pixels > MAX_MASK_PIXELS:
        raise ValueError(f"mask of {width}x{height} = {pixels:,} pixels: over the limit of {MAX_MASK_PIXELS:,} "
                         f"(MAX_MASK_PIXELS)")
    if not head.has_alpha:
        raise ValueError("mask PNG has no alpha channel: Dataloop's mask is its alpha")
    runs = _Runs()
    try:
        for inside in _mask_strips(head):
            runs.add(inside)
    except _Refused:
        raise
    except Exception as err:  # noqa: BLE001 - zlib and Pillow on untrusted bytes: zlib.error, SyntaxError...
        raise ValueError(f"mask is not a readable PNG: {err or type(err).__name__}") from None
    return brush_rle(runs.lengths(), runs.first, pixels)


class _Refused(ValueError):
    """A readable mask over one of the limits above: the message names the limit."""


def _mask_strips(head: PngMask):
    """The mask (alpha > 127) in strips of whole rows, top to bottom, as (rows, width) bools.

    PNG filters work byte by byte, each byte against the same byte of the pixel to its left and
    of the row above: the bytes at one offset in every pixel (a lane) unfilter on their own. So
    only the lanes that decide alpha are unfiltered (for RGBA, a quarter of the image), by Pillow,
    as an 8-bit image of 1 to 4 lanes made of the row above and the strip's rows as stored."""
    from PIL import Image  # decoding PNGs held in memory, not I/O; imported when a mask comes

    if head.interlaced:  # Adam7 passes do not come in rows
        yield _whole_mask(head)
        return
    row, unit = head.row_bytes, head.filter_unit
    width = row // unit  # pixels in a lane (bytes, below 8 bits per pixel)
    lanes = _alpha_lanes(head)
    groups = [lanes[i:i + 4] for i in range(0, len(lanes), 4)]
    above = [np.zeros(width * len(g), np.uint8) for g in groups]  # the row above the first: zeros
    per_strip = max(1, STRIP_BYTES // (row + 1))
    stored = _inflated(head)
    for top in range(0, head.height, per_strip):
        rows = min(per_strip, head.height - top)
        data = np.frombuffer(stored(rows * (row + 1)), np.uint8).reshape(rows, row + 1)
        body = data[:, 1:].reshape(rows, width, unit)
        unfiltered = {}
        for g, group in enumerate(groups):
            k = len(group)
            buf = np.empty((rows + 1, 1 + width * k), np.uint8)
            buf[0, 0] = 0  # filter: none (the row above is already unfiltered)
            buf[0, 1:] = above[g]
            buf[1:, 0] = data[:, 0]
            buf[1:, 1:].reshape(rows, width, k)[:] = body[:, :, list(group)]
            mode = _LANE_MODES[k]
            strip = Image.frombytes(mode, (width, rows + 1), zlib.compress(buf, 0), "zip", mode)
            out = np.asarray(strip).reshape(rows + 1, width, k)
            above[g] = out[-1].reshape(-1).copy()
            for j, lane in enumerate(group):
                unfiltered[lane] = out[1:, :, j]
        yield _inside(head, unfiltered)


_LANE_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}  # 8-bit modes whose pixels are the bytes as stored


def _alpha_lanes(head: PngMask) -> tuple[int, ...]:
    """The byte offsets in a pixel that decide its alpha (16-bit: the high byte, as Pillow reads it)."""
    if head.color == 6:
        return (3,) if head.depth == 8 else (6,)
    if head.color == 4:
        return (1,) if head.depth == 8 else (2,)
    return tuple(range(head.filter_unit))  # palette index, or a grey/RGB sample against the tRNS key


def _inflated(head: PngMask):
    """A reader of the image's decompressed bytes, n at a time."""
    z = zlib.decompressobj()
    chunks = iter(head.idat)
    pending: bytes | memoryview = b""

    def take(n: int) -> bytes:
        nonlocal pending
        parts, have = [], 0
        while have < n:
            if not pending:
                pending = b"" if z.eof else next(chunks, b"")
                if not pending:
                    raise ValueError("image data ends early")
            part = z.decompress(pending, n - have)
            pending = z.unconsumed_tail
            parts.append(part)
            have += len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    return take


def _inside(head: PngMask, lanes: dict[int, np.ndarray]) -> np.ndarray:
    """Unfiltered lanes -> inside (rows, width), as dtlpy reads a mask through Pillow: alpha > 127,
    a palette's alpha from tRNS, transparent where a grey or RGB pixel is the tRNS key colour."""
    w, depth, color = head.width, head.depth, head.color
    if color in (4, 6):
        return lanes[_alpha_lanes(head)[0]] > 127
    if color == 3:
        alpha = np.full(256, 255, np.uint8)
        alpha[:len(head.palette_alpha[:256])] = np.frombuffer(head.palette_alpha[:256], np.uint8)
        return (alpha > 127)[_samples(lanes[0], depth, w)]
    key = np.frombuffer(head.key, ">u2").astype(np.int64)
    if depth == 16:
        samples = [lanes[2 * i].astype(np.uint16) << 8 | lanes[2 * i + 1] for i in range(len(key))]
    elif color == 0:
        samples = [_samples(lanes[0], depth, w)]
    else:
        samples = [lanes[i] for i in range(3)]
    inside = samples[0] != key[0]
    for sample, value in zip(samples[1:], key[1:]):
        inside |= sample != value
    return inside


def _samples(lane: np.ndarray, depth: int, width: int) -> np.ndarray:
    """Rows of 1, 2, 4 or 8-bit samples (grey, palette) as one integer per pixel."""
    if depth == 8:
        return lane
    shifts = np.arange(8 - depth, -1, -depth, dtype=np.uint8)
    return ((lane[:, :, None] >> shifts) & ((1 << depth) - 1)).reshape(len(lane), -1)[:, :width]


def _whole_mask(head: PngMask) -> np.ndarray:
    """Pillow decodes the whole image (interlaced): only up to a smaller limit."""
    pixels = head.width * head.height
    if pixels > MAX_WHOLE_MASK_PIXELS:
        raise _Refused(f"an interlaced mask PNG is decoded whole: {pixels:,} pixels is over "
                         f"the limit of {MAX_WHOLE_MASK_PIXELS:,} (MAX_WHOLE_MASK_PIXELS)")
    from PIL import Image

    with Image.open(io.BytesIO(head.png)) as img:
        return np.asarray(img.convert("RGBA").getchannel("A")) > 127


class _Runs:
    """Where a mask read in strips changes between outside and inside, in reading order."""

    def __init__(self):
        self.starts: list[np.ndarray] = []  # global pixel index of each run but the first
        self.count = 0
        self.offset = 0
        self.first: bool | None = None  # the first pixel
        self.last: bool | None = None  # the last pixel so far

    def add(self, inside: np.ndarray) -> None:
        flat = inside.reshape(-1)
        if not len(flat):
            return
        if self.first is None:
            self.first = self.last = bool(flat[0])
        cuts = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        if bool(flat[0]) != self.last:
            cuts = np.concatenate(([0], cuts))
        self.count += len(cuts)
        if self.count >= MAX_MASK_RUNS:
            raise _Refused(f"mask has over {MAX_MASK_RUNS:,} runs of inside/outside pixels (MAX_MASK_RUNS): "
                             "too fragmented for Label Studio's brush")
        self.starts.append(cuts + self.offset)
        self.offset += len(flat)
        self.last = bool(flat[-1])

    def lengths(self) -> np.ndarray:
        starts = np.concatenate([np.zeros(1, np.int64), *self.starts, np.array([self.offset])])
        return np.diff(starts)


def brush_rle(lengths: np.ndarray, first: bool, pixels: int) -> list[int]:
    """Label Studio's brush RLE (`label_studio_sdk.converter.brush.encode_rle`, bit for bit) of
    a 0/255 mask given as pixel run lengths in reading order, the first run inside iff `first`.

    The RLE is of the RGBA image, 4 equal values per pixel: a header (value count in 32 bits,
    word size - 1 in 5, the four run-length widths 3, 4, 8, 16 less one in 4 each), then per run
    a 1 (a repeat), the width's index in 2 bits, length - 1 in that width, the value in 8 bits.
    A run over 256 values goes in 16-bit pieces of 65536 values, then the rest; the bit string is
    padded to a whole byte with 1 to 8 zeros. Runs are encoded in blocks: memory stays flat."""
    packer = _BitPacker()
    packer.add(np.array([4 * pixels, (7 << 16) | (2 << 12) | (3 << 8) | (7 << 4) | 15]), np.array([32, 21]))
    for lo in range(0, len(lengths), _BLOCK):
        values4 = lengths[lo:lo + _BLOCK].astype(np.int64) * 4
        value = np.zeros(len(values4), np.int64)
        value[(lo + (0 if first else 1)) % 2::2] = 255  # runs alternate, the first one's value is `first`
        long = values4 > 256
        pieces = np.where(long, (values4 - 1) // 65536 + 1, 1)
        run = np.repeat(np.arange(len(values4)), pieces)
        later = np.arange(len(run)) - np.repeat(np.cumsum(pieces) - pieces, pieces)  # piece number in its run
        size = np.where(later < pieces[run] - 1, 65536, values4[run] - later * 65536)
        index = np.where(long[run], 3, np.where(size <= 8, 0, np.where(size <= 16, 1, 2)))
        width = _RLE_WIDTHS[index]
        packer.add(((((4 | index) << width) | (size - 1)) << 8) | value[run], width + 11)
    return packer.finish()


_BLOCK = 1 << 16
_RLE_WIDTHS = np.array([3, 4, 8, 16])


class _BitPacker:
    """Codes of up to 32 bits (most significant bit first) into bytes, a block at a time."""

    _COLUMNS = np.arange(32)

    def __init__(self):
        self.out: list[np.ndarray] = []
        self.carry = np.zeros(0, np.uint8)  # bits short of a whole byte

    def add(self, codes: np.ndarray, bits: np.ndarray) -> None:
        aligned = (codes.astype(np.uint64) << (32 - bits).astype(np.uint64)).astype(">u4")
        matrix = np.unpackbits(aligned.view(np.uint8).reshape(-1, 4), axis=1)
        stream = np.concatenate([self.carry, matrix[self._COLUMNS < bits[:, None]]])
        whole = len(stream) // 8 * 8
        self.out.append(np.packbits(stream[:whole]))
        self.carry = stream[whole:]

    def finish(self) -> list[int]:
        """encode_rle pads with 8 - (bits % 8) zeros: a whole zero byte when already aligned."""
        pad = np.zeros(8 - len(self.carry), np.uint8)
        self.out.append(np.packbits(np.concatenate([self.carry, pad])))
        return np.concatenate(self.out).tolist()


def _r(v: float) -> float:
    return round(float(v), DIGITS)


class _Skip(Exception):
    """A mapper found the annotation cannot be carried over; the message is the reason."""


# ----------------------------------------------------------------------------- plans

Mapper = Callable[[Track, list[Run], Context, Control, list[str]], tuple[list, float, int]]

MAPPERS: dict[str, Mapper] = {
    "videorectangle": video_rectangles,
    "timelinelabels": timeline_labels,
    "choices": choices,
    "rectanglelabels": rectangle_labels,
    "polygonlabels": polygon_labels,
    "keypointlabels": keypoint_labels,
    "ellipselabels": ellipse_labels,
    "brushlabels": brush_labels,
}

_NO_VIDEO_SHAPES = "Label Studio 1.23 has no video polygons or points"
PLANS: dict[str, dict[str, list[tuple[str, str | None]]]] = {
    "video": {
        "box": [("videorectangle", None)],
        "note": [("videorectangle", "note on video: its box; the messages go to the result's meta")],
        "segment": [("videorectangle", f"segment on video: bounding box per frame ({_NO_VIDEO_SHAPES})")],
        "polyline": [("videorectangle", f"polyline on video: bounding box per frame ({_NO_VIDEO_SHAPES})")],
        "point": [("videorectangle", f"point on video: a 1-px box per frame ({_NO_VIDEO_SHAPES})")],
        "ellipse": [("videorectangle",
                     "ellipse on video: bounding box per frame (Label Studio has no video ellipses)")],
        "class": [("timelinelabels", None),
                  ("choices", "class on video as a whole-video choice: the config has no TimelineLabels, "
                              "the frame span is lost")],
    },
    "image": {
        "box": [("rectanglelabels", None)],
        "note": [("rectanglelabels", "note: its box; the messages go to the result's meta")],
        "segment": [("polygonlabels", None),
                    ("rectanglelabels", "segment as its bounding box: the config has no PolygonLabels")],
        "polyline": [("polygonlabels", "polyline closed into a polygon: Label Studio images have no open polylines")],
        "point": [("keypointlabels", None)],
        "ellipse": [("ellipselabels", None),
                    ("rectanglelabels", "ellipse as its bounding box: the config has no EllipseLabels")],
        "class": [("choices", None)],
        "binary": [("brushlabels", None)],
    },
}

SKIP_REASONS = {
    ("video", "binary"): "Label Studio 1.23 has no video masks",
}


def family_of(kind: str, type_: str) -> str | None:
    """The generated config's family for a Dataloop type (see config.Inventory)."""
    plan = PLANS[kind].get(type_)
    if not plan:
        return None
    return {"videorectangle": "box", "timelinelabels": "class", "choices": "class", "rectanglelabels": "box",
            "polygonlabels": "segment", "keypointlabels": "point", "ellipselabels": "ellipse",
            "brushlabels": "binary"}[plan[0][0]]


# ----------------------------------------------------------------------------- one track


def convert_track(track: Track, ctx: Context) -> Outcome:
    kind = ctx.media.kind
    plan = PLANS[kind].get(track.type)
    if not plan:
        reason = (SKIP_REASONS.get((kind, track.type))
                  or f"Label Studio has no result type for Dataloop '{track.type}' on {kind}s")
        return Outcome([], "skipped", reason)
    track_runs = runs(track)
    if not track_runs:
        return Outcome([], "skipped", "hidden on every frame")

    missing = []
    for result_type, approximation in plan:
        controls = [c for c in ctx.config.controls_for(result_type, ctx.obj.name) if not c.per_region]
        if not controls:
            missing.append(result_type)
            continue
        control = controls[0]
        allowed = ctx.config.labels_for(control)
        labels = [ctx.label_map.get(r.label, r.label) for r in track_runs]
        keep = [i for i, label in enumerate(labels) if allowed is None or label in allowed]
        if not keep:
            names = ", ".join(sorted(allowed)) if allowed else "none"
            return Outcome([], "skipped", f"label {labels[0]!r} is not in the config's {control.name} labels "
                                          f"({names}); add it or map it with --label-map")
        try:
            made, error_px, emitted = MAPPERS[result_type](
                track, [track_runs[i] for i in keep], ctx, control, [labels[i] for i in keep])
        except _Skip as skip:
            return Outcome([], "skipped", str(skip))
        results, attr_counts = _finish(track, made, ctx, control)
        outcome, reason = ("approximated", approximation) if approximation else ("exact", None)
        if len(keep) < len(track_runs):
            dropped = sorted({labels[i] for i in range(len(labels)) if i not in keep})
            outcome = "approximated"
            dropped_note = f"frames labelled {', '.join(map(repr, dropped))} dropped (not in the config)"
            reason = (reason + "; " if reason else "") + dropped_note
        if ctx.lossy and error_px > EXACT_PX:
            outcome = "approximated"
            reason = (reason + "; " if reason else "") + f"simplified within --tolerance {ctx.tolerance_px:g} px"
        for note in track.approximations or ():  # e.g. a span clipped to the video's end
            outcome = "approximated"
            reason = (reason + "; " if reason else "") + note
        return Outcome(results, outcome, reason, error_px, emitted, attr_counts)
    tags = " or ".join(f"<{t}>" for t in missing)
    return Outcome([], "skipped", f"the labeling config has no {tags} for {ctx.obj.name!r}")


def _finish(track: Track, made: list, ctx: Context, control: Control) -> tuple[list[dict], dict[str, int]]:
    """Ids, names, score, and the attributes of each region (config controls, else meta)."""
    results: list[dict] = []
    counts = {"mapped": 0, "meta": 0}
    points = _attribute_change_points(track)
    for k, (result_type, run, value) in enumerate(made):
        rid = track.annotation_id if k == 0 else f"{track.annotation_id}_r{k + 1}"
        result = {"id": rid, "from_name": control.name, "to_name": ctx.obj.name, "type": result_type}
        if ctx.media.kind == "image":
            result["original_width"] = int(ctx.media.width)
            result["original_height"] = int(ctx.media.height)
            result["image_rotation"] = 0
        result["value"] = value
        if track.confidence is not None:
            result["score"] = track.confidence
        extra, meta = _attributes(track, run, ctx, rid, counts, points)
        if track.description:
            meta["text"] = [track.description]
        if track.type == "note":
            meta.setdefault("dataloop", {})["note"] = True
        if meta:
            result["meta"] = meta
        results.append(result)
        results.extend(extra)
    return results, counts


def _attributes(track: Track, run: Run, ctx: Context, rid: str, counts: dict[str, int],
                points: list[int]) -> tuple[list[dict], dict]:
    """Attributes of the run's first frame go to per-region controls of the config where one
    fits (v2: a control named like the attribute; v1: a Choices that offers the value); the
    rest, and any change of attributes over the run, go to the region's meta."""
    attrs = track.attributes[run.first_index]
    meta: dict[str, Any] = {}
    extra: list[dict] = []
    if attrs:
        leftover: Any
        per_region = [c for c in ctx.config.controls if c.per_region and c.to_name == ctx.obj.name]
        if isinstance(attrs, dict):
            leftover = {}
            for key, value in attrs.items():
                value_result = _control_value(per_region, key, value)
                if value_result:
                    control, val = value_result
                    extra.append(_attribute_result(rid, control, ctx, val))
                    counts["mapped"] += 1
                else:
                    leftover[key] = value
                    counts["meta"] += 1
        elif isinstance(attrs, list):
            leftover, chosen = [], {}
            for value in attrs:
                control = next((c for c in per_region if c.tag == "choices" and str(value) in c.labels), None)
                if control is not None:
                    chosen.setdefault(control.name, (control, []))[1].append(str(value))
                    counts["mapped"] += 1
                else:
                    leftover.append(value)
                    counts["meta"] += 1
            for control, values in chosen.values():
                extra.append(_attribute_result(rid, control, ctx, {"choices": values}))
        else:
            leftover = attrs
            counts["meta"] += 1
        if leftover:
            meta.setdefault("dataloop", {})["attributes"] = leftover
    changes = _attribute_changes(track, run, points)
    if changes:
        meta.setdefault("dataloop", {})["attribute_changes"] = changes
    return extra, meta


def _control_value(controls: list[Control], key: str, value: Any) -> tuple[Control, dict] | None:
    control = next((c for c in controls if c.name == key), None)
    if control is None:
        return None
    if control.tag == "choices":
        values = [str(v) for v in (value if isinstance(value, list) else [value])]
        if control.labels and not all(v in control.labels for v in values):
            return None
        if len(values) > 1 and control.attrs.get("choice", "single") != "multiple":
            return None  # a single-choice control cannot hold them all: keep them in meta
        return control, {"choices": values}
    if control.tag == "textarea":
        return control, {"text": [str(v) for v in (value if isinstance(value, list) else [value])]}
    number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if control.tag == "number" and number is not None and _within(number, control.attrs.get("min"),
                                                                  control.attrs.get("max")):
        return control, {"number": number}
    if control.tag == "rating" and number is not None and float(number).is_integer() and \
            _within(number, "1", control.attrs.get("maxRating", "5")):
        return control, {"rating": int(number)}
    return None


def _within(value: float, low: str | None, high: str | None) -> bool:
    try:
        return (low is None or value >= float(low)) and (high is None or value <= float(high))
    except ValueError:
        return False


def _attribute_result(rid: str, control: Control, ctx: Context, value: dict) -> dict:
    return {"id": rid, "from_name": control.name, "to_name": ctx.obj.name, "type": control.tag, "value": value}


def _attribute_change_points(track: Track) -> list[int]:
    """Stored frames (indices) whose attributes differ from the stored frame's before; once per
    track, so that regions cost what they hold ([] (v1) and {} (v2) both say "none")."""
    attrs = track.attributes
    if len(attrs) == 1 or attrs.count(attrs[0]) == len(attrs):
        return []  # the common case: attributes never change
    return [i for i in range(1, len(attrs)) if (attrs[i] or None) != (attrs[i - 1] or None)]


def _attribute_changes(track: Track, run: Run, points: list[int]) -> list[dict]:
    """Later stored frames of the run whose attributes differ from the one before (1-based)."""
    if not points:
        return []
    first, last = held_index(track, np.array([run.ranges[0][0], run.ranges[-1][1]])).tolist()
    chosen = points[bisect_right(points, first):bisect_right(points, last)]
    return [{"frame": int(ls_frame(track.frames[i])), "attributes": track.attributes[i]} for i in chosen]
