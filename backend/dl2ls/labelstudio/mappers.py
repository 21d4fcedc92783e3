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
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from dl2ls.labelstudio.config import Control, LabelConfig, ObjectTag
from dl2ls.labelstudio.evaluate import ls_rect_corners
from dl2ls.tracks import (
    EXACT_PX, Media, Run, Track, angle_tolerance_deg, bounding_boxes, held_index, interpolate, keyframes, runs,
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
    that reproduce every frame under the editor's linear interpolation."""
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
            frames = np.arange(a, b + 1)
            values = boxes[held_index(track, frames)]
            if turning:
                values[:, 4] = np.unwrap(values[:, 4], period=360.0)
            keys, err = keyframes(values, tol, max_step, lossy=ctx.lossy, row_error=row_error)
            if ctx.lossy:
                err = float(_corner_errors(values, interpolate(values, keys)).max())
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
    """`brushlabels`: Dataloop's RGBA PNG (mask = alpha > 0) as Label Studio's RLE, painted 255."""
    from PIL import Image  # decoding a data URL held in memory, not I/O
    from label_studio_sdk.converter.brush import mask2rle

    url = track.geometry[0]
    w, h = int(ctx.media.width), int(ctx.media.height)
    try:
        png = base64.b64decode(url.split(",", 1)[1], validate=False)
        with Image.open(io.BytesIO(png)) as img:
            if img.size != (w, h):  # read from the header, before any pixel is decoded
                raise _Skip(f"mask is {img.size[0]}x{img.size[1]}, the image {w}x{h}")
            if img.mode not in ("RGBA", "LA", "PA", "RGBa", "La") and "transparency" not in img.info:
                raise ValueError(f"mask PNG has no alpha channel (mode {img.mode}): Dataloop's mask is its alpha")
            alpha = np.asarray(img.convert("RGBA"))[:, :, 3]
    except (OSError, Image.DecompressionBombError) as err:
        raise ValueError(f"mask is not a readable PNG: {err}") from None
    # dtlpy's Segmentation reads a pixel as inside where alpha > 127; the editor paints 255
    mask = np.where(alpha > 127, 255, 0).astype(np.uint8)
    value = {"format": "rle", "rle": mask2rle(mask), "brushlabels": [labels[0]]}
    return [("brushlabels", track_runs[0], value)], 0.0, 0


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
        return Outcome(results, outcome, reason, error_px, emitted, attr_counts)
    tags = " or ".join(f"<{t}>" for t in missing)
    return Outcome([], "skipped", f"the labeling config has no {tags} for {ctx.obj.name!r}")


def _finish(track: Track, made: list, ctx: Context, control: Control) -> tuple[list[dict], dict[str, int]]:
    """Ids, names, score, and the attributes of each region (config controls, else meta)."""
    results: list[dict] = []
    counts = {"mapped": 0, "meta": 0}
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
        extra, meta = _attributes(track, run, ctx, rid, counts)
        if track.description:
            meta["text"] = [track.description]
        if track.type == "note":
            meta.setdefault("dataloop", {})["note"] = True
        if meta:
            result["meta"] = meta
        results.append(result)
        results.extend(extra)
    return results, counts


def _attributes(track: Track, run: Run, ctx: Context, rid: str, counts: dict[str, int]) -> tuple[list[dict], dict]:
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
    changes = _attribute_changes(track, run)
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


def _attribute_changes(track: Track, run: Run) -> list[dict]:
    """Later stored frames of the run whose attributes differ from the one before (1-based)."""
    attrs = track.attributes
    if len(attrs) == 1 or attrs.count(attrs[0]) == len(attrs):
        return []  # the common case: attributes never change
    lo, hi = run.ranges[0][0], run.ranges[-1][1]
    first, last = held_index(track, np.array([lo, hi])).tolist()
    out, prev = [], attrs[first] or None  # [] (v1) and {} (v2) both say "none"
    for i in range(first + 1, last + 1):
        if (attrs[i] or None) != prev:
            prev = attrs[i] or None
            out.append({"frame": int(ls_frame(track.frames[i])), "attributes": attrs[i]})
    return out
