"""The neutral middle: a Dataloop annotation as a track over frames, and the keyframe rule.

A `Track` holds the frames Dataloop stored for one annotation (sorted, 0-based) and, per stored
frame, its geometry in pixels, label, visibility and attributes. What Dataloop means on any frame
is decided here, in one place (`held_index`): the nearest stored frame at or before it, exactly as
Dataloop's SDK reflects frames (`dtlpy/entities/reflect_dict.py`). An image annotation is a track
of one frame.

Nothing here is ever sized by the frame numbers an annotation names, only by the frames it
stores: a held value is constant until the next stored frame, so the per-frame signal is exactly
the piecewise-linear interpolation of its values on `sample_frames` (each stored frame, the frame
before it, and the range's ends), and runs are unions of stored frames' intervals.

`keyframes` is the other rule that lives here: the fewest samples from which linear interpolation
(at the samples' frame positions) reproduces the samples within a tolerance.

Pure: no I/O. Imports the Dataloop model, never the Label Studio side.
"""

from __future__ import annotations

import json
import math
from bisect import bisect_right
from dataclasses import dataclass, field
from itertools import chain
from operator import attrgetter
from typing import Any, Callable, NamedTuple

import numpy as np

from dl2ls.dataloop.model import (
    Annotation, Item, Media, MediaDefaults, Point, annotation_ref, decode_annotation, item_id, media_of, require_media,
)
from dl2ls.report import InputError, describe

#: What "exact" means: every frame within a thousandth of a pixel (floats, not luck).
EXACT_PX = 1e-3

#: Coordinates further than this from the frame (in frame sizes) are not a plausible annotation.
ABSURD_FACTOR = 100.0

#: Geometry kinds that have a position on the frame (`class` has none, `binary` is a raster).
SPATIAL = ("box", "note", "segment", "polyline", "point", "ellipse")


@dataclass(slots=True)
class Track:
    annotation_id: str
    type: str  # the Dataloop annotation type
    frames: np.ndarray  # (m,) int64 stored frames, sorted, unique, 0-based
    geometry: Any  # per stored frame, see `_parse_geometry`
    labels: list[str]  # per stored frame
    visible: np.ndarray  # (m,) bool per stored frame
    attributes: list[Any]  # per stored frame: a dict (v2 namedAttributes) or a list (v1)
    end: int  # last frame, inclusive
    model: str | None = None  # the Dataloop model's name, for model annotations
    model_id: str | None = None
    confidence: float | None = None
    description: str | None = None
    warnings: list[str] | None = None  # what was dropped from an annotation that still converts
    approximations: list[str] | None = None  # what of the Dataloop timeline is not carried over

    @property
    def start(self) -> int:
        return int(self.frames[0])


@dataclass(slots=True)
class Run:
    """Frames of a track that show one label, as inclusive visible ranges of 0-based frames."""

    label: str
    ranges: list[tuple[int, int]]
    first_index: int  # the stored frame in force on the run's first visible frame


# ----------------------------------------------------------------------------- from Dataloop


class OutsideVideo(InputError):
    """An annotation with no frame inside the video: skipped (with the reason), not failed."""


def from_dataloop(ann: Annotation, ann_id: str, media: Media, origin: str) -> Track:
    """Build the track of one annotation; raises InputError naming the annotation when it is bad."""
    system = ann.system
    model = ann.model
    first_attrs = system.attributes if system.attributes is not None else ann.attributes
    # the top-level geometry is the first frame's (always visible); each snapshot is a stored frame
    frames = [system.frame]
    coords, labels, visible, attrs = [ann.coordinates], [ann.label], [True], [first_attrs]
    end = system.frame
    if media.kind == "video" and system.snapshots_:
        snaps = system.snapshots_
        frames += [s.frame for s in snaps]
        coords += [s.data for s in snaps]
        labels += [s.label for s in snaps]
        visible += [bool(s.objectVisible) for s in snaps]
        attrs += [s.namedAttributes if s.namedAttributes is not None else s.attributes for s in snaps]
        order = np.asarray(frames, dtype=np.int64)
        if np.any(order[1:] <= order[:-1]):
            # out of order, or a frame stored twice: as dtlpy, the later entry wins, frames sorted
            last = {f: i for i, f in enumerate(frames)}
            keep = [last[f] for f in sorted(last)]
            frames, coords, labels = [frames[i] for i in keep], [coords[i] for i in keep], [labels[i] for i in keep]
            visible, attrs = [visible[i] for i in keep], [attrs[i] for i in keep]
    approximations: list[str] = []
    if media.kind == "video":
        if frames[0] < 0:
            raise InputError(origin, ann_id, f"negative frame {frames[0]}")
        end = max(frames[-1], system.endFrame or 0)
        if media.frames_count and end >= media.frames_count:
            # the video's end is known: what lies past it is never shown, the rest converts
            last = media.frames_count - 1
            if frames[0] > last:
                raise OutsideVideo(origin, ann_id, f"starts at frame {frames[0]}, past the video's end "
                                                   f"({media.frames_count} frames)")
            keep = bisect_right(frames, last)
            frames, coords, labels = frames[:keep], coords[:keep], labels[:keep]
            visible, attrs = visible[:keep], attrs[:keep]
            approximations.append(f"span runs to frame {end}, past the video's end ({media.frames_count} "
                                  f"frames): clipped to frames {frames[0]}-{last}")
            end = last
        elif not media.frames_count and end > MAX_FRAME:
            raise InputError(origin, ann_id, f"frame {end} is beyond the video (its length is unknown; "
                                             f"at most {MAX_FRAME} accepted)")
    else:
        frames, end = [0], 0

    warnings: list[str] = []
    confidence = _confidence(model.confidence if model is not None else None, warnings)
    geometry = _parse_geometry(ann.type, coords, frames, media, origin, ann_id)
    return Track(
        annotation_id=ann_id,
        type=ann.type,
        frames=np.asarray(frames, dtype=np.int64),
        geometry=geometry,
        labels=labels,
        visible=np.asarray(visible, dtype=bool),
        attributes=attrs,
        end=int(end),
        model=_text(model.name) if model is not None else None,
        model_id=_text(model.model_id) if model is not None else None,
        confidence=confidence,
        description=_text(ann.description),
        warnings=warnings or None,
        approximations=approximations or None,
    )


#: In a video of unknown length no annotation may reach past this frame (a day of 60 fps video):
#: nothing here grows with it, but Label Studio's `framesCount` and `verify`'s frame-by-frame
#: check do, and an `endFrame` of 10**12 is a corrupt export, not a video.
MAX_FRAME = 5_184_000


def _confidence(value: Any, warnings: list[str]) -> float | None:
    """The model's confidence in 0..1; anything else is dropped (the geometry still converts)."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not 0.0 <= number <= 1.0:
        warnings.append(f"model confidence {value!r} is not in 0..1: converted without a score")
        return None
    return number


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _parse_geometry(type_: str, coords: list[Any], frames: list[int], media: Media, origin: str, ann_id: str):
    """Geometry per stored frame, in pixels of the original frame:
    box/note: (m, 5) x1, y1, x2, y2, angle (degrees clockwise about the centre, in [0, 360));
    ellipse: (m, 5) cx, cy, rx, ry, angle; point: (m, 2); segment/polyline: a list of (k, 2) arrays;
    class and unknown types: None; binary: a list of PNG data URLs."""
    try:
        geo = _geometry(type_, coords)
    except _BAD_SHAPE as err:
        frame = frames[_bad_index(type_, coords)]
        where = f" at frame {frame}" if media.kind == "video" else ""
        raise InputError(origin, ann_id, f"bad {type_} coordinates{where}: {_why(err)}") from None
    if type_ in SPATIAL:
        _check_plausible(geo, type_, frames, media, origin, ann_id)
    return geo


_BAD_SHAPE = (KeyError, IndexError, TypeError, ValueError, AttributeError)


def _geometry(type_: str, coords: list[Any]):
    if type_ == "box":
        geo = _plain_boxes(coords)
        if geo is None:
            geo = _numeric([_box_row(c) for c in coords])
    if type_ == "note":  # dtlpy's Note is an unrotated Box: an angle there is not drawn
        geo = _numeric([_box_row(c["box"])[:4] + (0.0,) for c in coords])
    if type_ in ("box", "note"):
        # corners in any order -> (left, top, right, bottom); the angle into [0, 360)
        out = np.empty_like(geo)
        np.minimum(geo[:, 0:2], geo[:, 2:4], out=out[:, 0:2])
        np.maximum(geo[:, 0:2], geo[:, 2:4], out=out[:, 2:4])
        np.mod(geo[:, 4], 360.0, out=out[:, 4])
        return out
    if type_ == "ellipse":
        geo = _numeric([(c["center"]["x"], c["center"]["y"], c["rx"], c["ry"], c.get("angle") or 0)
                        for c in coords])
        geo[:, 4] = np.mod(geo[:, 4], 360.0)
        return geo
    if type_ == "point":
        return _numeric([(c["x"], c["y"]) for c in coords])
    if type_ in ("segment", "polyline"):
        geo = []
        for c in coords:
            ring = c[0] if c and isinstance(c[0], list) else c  # dtlpy reads the first ring
            points = _numeric([_xy(p) for p in ring])
            if len(points) < 2:
                raise ValueError("fewer than 2 points")
            geo.append(points)
        return geo
    if type_ == "binary":
        geo = []
        for c in coords:
            url = c.get("data") if isinstance(c, dict) else c
            if not isinstance(url, str) or not url.startswith("data:image/png;base64,"):
                raise ValueError("mask is not a PNG data URL")
            geo.append(url)
        return geo
    return None  # class has no geometry; unknown types are skipped by the mapper with a reason


def _plain_boxes(coords: list[Any]) -> np.ndarray | None:
    """The commonest geometry of all, fast: unrotated boxes decoded as two `Point`s each."""
    try:
        flat = list(chain.from_iterable(coords))
        if len(flat) != 2 * len(coords):
            return None  # rotated (an angle follows the corners), or malformed
        xs = np.fromiter(map(_get_x, flat), float, len(flat))
        ys = np.fromiter(map(_get_y, flat), float, len(flat))
    except (AttributeError, TypeError):  # not Points (a dict from a lenient decode, a number...)
        return None
    out = np.zeros((len(coords), 5))
    out[:, 0], out[:, 1], out[:, 2], out[:, 3] = xs[0::2], ys[0::2], xs[1::2], ys[1::2]
    return out


_get_x, _get_y = attrgetter("x"), attrgetter("y")


def _box_row(c: Any) -> tuple:
    angle = c[2] if len(c) > 2 and isinstance(c[2], (int, float)) and not isinstance(c[2], bool) else 0
    return (*_xy(c[0]), *_xy(c[1]), angle)


def _xy(p: Any) -> tuple:
    return (p.x, p.y) if isinstance(p, Point) else (p["x"], p["y"])


def _numeric(rows: list[tuple]) -> np.ndarray:
    if not rows:
        raise ValueError("no points")
    arr = np.array(rows)
    if arr.dtype.kind not in "fiu" or arr.ndim != 2:
        raise ValueError("coordinates must be numbers")
    return arr.astype(np.float64, copy=False)


def _bad_index(type_: str, coords: list[Any]) -> int:
    """Which stored frame held the bad geometry (for the error message)."""
    for i, c in enumerate(coords):
        try:
            _geometry(type_, [c])
        except _BAD_SHAPE:
            return i
    return 0


def _why(err: Exception) -> str:
    if isinstance(err, KeyError):
        return f"missing {err.args[0]!r}"
    return str(err) or type(err).__name__


def _check_plausible(geo, type_: str, frames: list[int], media: Media, origin: str, ann_id: str) -> None:
    arrays = geo if isinstance(geo, list) else [geo]
    limit = ABSURD_FACTOR * max(media.width or 0, media.height or 0, 1000.0)
    for i, arr in enumerate(arrays):
        if (np.abs(arr) <= limit).all():  # the usual case in one pass (NaN fails the comparison)
            continue
        bad = ~np.isfinite(arr)
        what = "NaN or infinite"
        if not bad.any():
            bad = np.abs(arr) > limit
            what = f"absurd (beyond {limit:g} px)"
        if bad.any():
            row = int(np.argwhere(bad)[0][0]) if not isinstance(geo, list) else i
            frame = frames[row] if row < len(frames) else frames[-1]
            where = f" at frame {frame}" if media.kind == "video" else ""
            raise InputError(origin, ann_id, f"{type_} coordinate{where} is {what}")


# ----------------------------------------------------------------------------- what a frame shows


def held_index(track: Track, frames: np.ndarray) -> np.ndarray:
    """The stored frame in force on each frame: the nearest one at or before it.

    This is Dataloop's rule for frames without a snapshot ("reflected" frames): they repeat the
    nearest earlier stored frame's geometry, label, attributes and visibility; nothing is
    interpolated. Frames must lie within [track.start, track.end]."""
    return np.searchsorted(track.frames, frames, side="right") - 1


def runs(track: Track) -> list[Run]:
    """Split a track's visible frames where the label changes (Label Studio regions carry one
    label), each run as inclusive ranges of visible frames; hidden frames are left out.

    Works on the stored frames' intervals (stored frame i holds until the next one), never on
    the frames in between."""
    if track.visible.all() and track.labels.count(track.labels[0]) == len(track.labels):
        return [Run(track.labels[0], [(track.start, track.end)], 0)]  # the common case
    shown = np.flatnonzero(track.visible)
    if not len(shown):
        return []
    firsts = track.frames
    lasts = np.empty_like(firsts)
    lasts[:-1] = firsts[1:] - 1
    lasts[-1] = track.end
    codes = {label: i for i, label in enumerate(dict.fromkeys(track.labels))}
    label_code = np.fromiter((codes[track.labels[i]] for i in shown.tolist()), dtype=np.int64, count=len(shown))
    # a run ends where the label of the next visible interval differs (hidden ones in between or not)
    cuts = np.flatnonzero(np.diff(label_code)) + 1
    out = []
    for part in np.split(shown, cuts):
        a, b = firsts[part], lasts[part]
        gaps = np.flatnonzero(a[1:] != b[:-1] + 1)  # a hidden interval between two visible ones
        starts = np.concatenate([a[:1], a[gaps + 1]]).tolist()
        ends = np.concatenate([b[gaps], b[-1:]]).tolist()
        out.append(Run(label=track.labels[int(part[0])], ranges=list(zip(starts, ends)), first_index=int(part[0])))
    return out


def sample_frames(track: Track, first: int, last: int) -> np.ndarray:
    """The frames of [first, last] where the held per-frame signal can bend: the ends, each stored
    frame inside, and the frame before it (the last one held). Between two samples the signal is
    linear in the frame (constant, or one step between neighbours), so anything linear that
    matches it on the samples matches it on every frame; the samples grow with the stored frames,
    never with the span."""
    lo, hi = np.searchsorted(track.frames, [first, last], side="right").tolist()
    if hi - lo == last - first:  # a stored frame on every frame (tracker output)
        return np.arange(first, last + 1)
    inner = track.frames[lo:hi]
    out = np.empty(2 * len(inner) + 2, dtype=np.int64)
    out[0], out[-1] = first, last
    out[1:-1:2] = inner - 1
    out[2:-1:2] = inner
    keep = np.empty(len(out), dtype=bool)  # sorted already: drop repeats (stored neighbours)
    keep[0] = True
    np.not_equal(out[1:], out[:-1], out=keep[1:])
    return out[keep]


# ----------------------------------------------------------------------------- geometry helpers


def bounding_boxes(track: Track) -> np.ndarray:
    """(m, 5) boxes x1, y1, x2, y2, angle per stored frame. Exact for `box`/`note`; for the other
    spatial types the axis-aligned bounding box (the caller reports the approximation)."""
    geo = track.geometry
    if track.type in ("box", "note"):
        return geo
    if track.type == "ellipse":
        cx, cy, rx, ry, angle = geo.T
        t = np.radians(angle)
        ex = np.hypot(rx * np.cos(t), ry * np.sin(t))
        ey = np.hypot(rx * np.sin(t), ry * np.cos(t))
        return np.column_stack([cx - ex, cy - ey, cx + ex, cy + ey, np.zeros_like(cx)])
    if track.type == "point":
        # a point has no extent; a one-pixel box centred on it keeps it visible
        x, y = geo.T
        return np.column_stack([x - 0.5, y - 0.5, x + 0.5, y + 0.5, np.zeros_like(x)])
    if track.type in ("segment", "polyline"):
        return np.array([[p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max(), 0.0] for p in geo])
    raise ValueError(f"{track.type} has no bounding box")


def box_corners(cx, cy, w, h, angle_deg) -> np.ndarray:
    """Corners (..., 4, 2) of boxes centred at (cx, cy), turned clockwise on screen about their
    centre (y points down, so clockwise is the positive angle of the usual rotation matrix)."""
    t = np.radians(angle_deg)
    c, s = np.cos(t), np.sin(t)
    dx = np.stack([-w / 2, w / 2, w / 2, -w / 2], axis=-1)
    dy = np.stack([-h / 2, -h / 2, h / 2, h / 2], axis=-1)
    xs = cx[..., None] + dx * c[..., None] - dy * s[..., None]
    ys = cy[..., None] + dx * s[..., None] + dy * c[..., None]
    return np.stack([xs, ys], axis=-1)


# ----------------------------------------------------------------------------- keyframes


def keyframes(values: np.ndarray, tol: np.ndarray, max_step: np.ndarray | None = None,
              lossy: bool = False, row_error: Callable | None = None,
              at: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """The fewest rows from which piecewise-linear interpolation reproduces `values`.

    `values` is (n, k): one row per sample, one column per interpolated quantity; `at` gives the
    samples' frame positions (increasing; default 0..n-1, consecutive frames); `tol` is the
    allowed error per column; `max_step` (per column, inf where unbounded) forbids a segment whose
    end values differ by that much or more (an angle interpolated the short way round must not
    turn half a turn). Returns (row indices of the keyframes, the largest error of columns 0..3
    introduced, in the columns' unit).

    Exact data: a row must be a keyframe iff the slope changes there, which finds the minimal set
    in one vectorised pass; a verification pass then adds rows wherever small slope changes would
    otherwise add up beyond `tol`. Lossy (`lossy=True`): Douglas-Peucker refinement from the two
    ends; `row_error(values, replayed)` may measure each row's error in units of the tolerance
    (e.g. at a rectangle's corners) instead of per column."""
    n = len(values)
    if n <= 2:
        return np.arange(n), 0.0
    x = None if at is None or at[-1] - at[0] == n - 1 else at  # None: consecutive frames
    if lossy:
        keys = np.array([0, n - 1])
    else:
        if x is None:  # the slope changes are the second differences
            bends = np.abs(values[2:] - 2 * values[1:-1] + values[:-2])
        else:
            slopes = np.diff(values, axis=0) / np.diff(x)[:, None]
            bends = np.abs(slopes[1:] - slopes[:-1])
        # a slope change above BEND_FRACTION of the tolerance (far above float noise) is a bend
        bent = (bends > tol * BEND_FRACTION).any(axis=1)
        keys = np.flatnonzero(np.concatenate(([True], bent, [True])))
        # a segment strays from its chord by at most (its length / 4) x the sum of the slope
        # changes inside it, each at most BEND_FRACTION of the tolerance: below the tolerance (or,
        # for long segments, with the changes actually left) no check is needed
        most = int(np.diff(keys).max())  # samples in the longest segment
        span = most if x is None else int(np.diff(x[keys]).max())  # frames in the longest segment
        safe = span * most * BEND_FRACTION <= 4.0 or \
            span * float((np.where(bent[:, None], 0.0, bends).sum(axis=0) / tol).sum()) <= 4.0
        if safe and not (max_step is not None and _jumps(values, keys, max_step).any()):
            return keys, 0.0
    rows = np.arange(n)
    while True:
        if len(keys) == n:
            return keys, 0.0
        seg = np.minimum(np.searchsorted(keys, rows, side="right") - 1, len(keys) - 2)
        replayed = interpolate(values, keys, seg, at=x)
        err = np.abs(replayed - values)
        excess = (err / tol).max(axis=1) if row_error is None else row_error(values, replayed)
        add = []
        bad = np.flatnonzero(excess > 1.0)
        if len(bad):
            # the worst row of each offending segment becomes a keyframe
            order = np.lexsort((-excess[bad], seg[bad]))
            bad_sorted = bad[order]
            first = np.concatenate(([True], np.diff(seg[bad_sorted]) != 0))
            add.extend(bad_sorted[first].tolist())
        if max_step is not None:
            # split a half turn at its middle sample; two neighbouring samples that differ are
            # neighbouring frames (a held value does not change), with nothing between to draw
            for i in np.flatnonzero(_jumps(values, keys, max_step)):
                a, b = int(keys[i]), int(keys[i + 1])
                if b - a > 1:
                    add.append((a + b) // 2)
        if not add:
            return keys, float(err[:, :4].max())
        keys = np.union1d(keys, np.asarray(add, dtype=keys.dtype))


def interpolate(values: np.ndarray, keys: np.ndarray, seg: np.ndarray | None = None,
                at: np.ndarray | None = None) -> np.ndarray:
    """Every row as linear interpolation between the keyframe rows around it (all columns), at
    the rows' frame positions `at` (default 0..n-1)."""
    rows = np.arange(len(values))
    if len(keys) < 2:
        return values[np.zeros(len(values), dtype=int)] if len(keys) else values.copy()
    if seg is None:
        seg = np.minimum(np.searchsorted(keys, rows, side="right") - 1, len(keys) - 2)
    k0, k1 = keys[seg], keys[seg + 1]
    x = rows if at is None else at
    v0 = values[k0]
    return v0 + (values[k1] - v0) * ((x - x[k0]) / (x[k1] - x[k0]))[:, None]


BEND_FRACTION = 1e-6  # of the tolerance; floats carry ~1e-13 of a coordinate, far below


def _jumps(values: np.ndarray, keys: np.ndarray, max_step: np.ndarray) -> np.ndarray:
    """Segments whose ends differ by max_step or more in some column."""
    return (np.abs(np.diff(values[keys], axis=0)) >= max_step).any(axis=1)


def angle_tolerance_deg(tol_px: float, half_diagonal_px: float) -> float:
    """An angle error that moves a corner no more than tol_px."""
    return math.degrees(tol_px / max(half_diagonal_px, 1.0))


# ----------------------------------------------------------------------------- a whole item


@dataclass(slots=True)
class ItemInfo:
    """What the Label Studio side needs of a Dataloop item besides its tracks."""

    origin: str  # the file (or zip entry) it came from
    item_id: str | None
    dataset_id: str | None
    name: str | None
    filename: str | None
    dir: str | None
    stream: str | None
    media: Media


class Dropped(NamedTuple):
    """An annotation that did not become a track, and why."""

    type: str  # the Dataloop annotation type
    annotation: str  # its reference (id, or ann<index>)
    reason: str


@dataclass(slots=True)
class ItemTracks:
    info: ItemInfo
    tracks: list[Track]
    failures: list[Dropped]  # bad input
    stored_frames: int = 0
    skipped: list[Dropped] = field(default_factory=list)  # good input with nothing to show (e.g. past the video)


def item_tracks(item: Item, origin: str, defaults: MediaDefaults) -> ItemTracks:
    """Decode every annotation of an item and build its tracks. A bad annotation is recorded as a
    failure and the others still convert; a bad item (no size, a nonsensical fps) raises
    InputError."""
    decoded: list[tuple[int, Annotation]] = []
    failures: list[Dropped] = []
    skipped: list[Dropped] = []
    for index, raw in enumerate(item.annotations or []):
        try:
            decoded.append((index, decode_annotation(raw, origin, index)))
        except InputError as err:
            failures.append(Dropped(_type_of(raw), err.annotation or f"ann{index}", err.reason))
    media = media_of(item, [a for _, a in decoded], defaults, origin)
    require_media(media, origin)
    tracks, stored, seen = [], 0, set()
    for index, ann in decoded:
        ref = annotation_ref(ann, index)
        duplicate = ref in seen
        if duplicate:  # two annotations, one id: Label Studio would merge their regions
            ref = f"{ref}-{index}"
        seen.add(ref)
        try:
            track = from_dataloop(ann, ref, media, origin)
        except OutsideVideo as err:
            skipped.append(Dropped(ann.type, ref, err.reason))
            continue
        except InputError as err:
            failures.append(Dropped(ann.type, ref, err.reason))
            continue
        except Exception as err:  # noqa: BLE001 - unforeseen: this annotation fails alone, the item goes on
            failures.append(Dropped(ann.type, ref, describe(err)))
            continue
        if duplicate:
            track.warnings = (track.warnings or []) + [f"annotation id repeated in the item: converted as {ref}"]
        tracks.append(track)
        stored += len(track.frames)
    name = item.name or (item.filename.rsplit("/", 1)[-1] if item.filename else None)
    info = ItemInfo(origin, item_id(item), item.datasetId, name, item.filename, item.dir, item.stream, media)
    return ItemTracks(info, tracks, failures, stored, skipped)


def _type_of(raw: Any) -> str:
    if isinstance(raw, Annotation):
        return raw.type
    try:
        obj = json.loads(bytes(raw))
        return str(obj.get("type") or "unknown") if isinstance(obj, dict) else "unknown"
    except (ValueError, RecursionError):  # it failed to decode: its type is a best guess for the report
        return "unknown"
