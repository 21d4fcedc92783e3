"""What the Label Studio editor shows on each frame, and how that compares with Dataloop.

The editor's rules (Label Studio 1.23, `web/libs/editor/src/regions/`):
- `VideoRectangleRegion.getShape(frame)`: a keyframe on the frame is taken as is; before the first
  keyframe nothing is drawn; after the last the last is held; in between x, y, width and height
  are linear in the frame number and the rotation turns the short way round
  (`utils/props.ts` `interpolateProp`, `normalizeAngle` into (-180, 180]).
- `VideoRegion.isInLifespan(frame)`: the closest keyframe at or before the frame (before the
  first, the first one) decides: visible iff it is `enabled`, and a disabled keyframe is still
  visible on its own frame.
- Timeline regions cover their 1-based inclusive ranges.
This module is the reference `verify` and the tests use; it knows nothing of how the results were
made. Pure: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from dl2ls.tracks import EXACT_PX, ItemTracks, Track, bounding_boxes, box_corners, held_index


def normalize_angle(a):
    """The editor's normalizeAngle: any angle onto (-180, 180]."""
    a = np.asarray(a, dtype=float)
    r = np.mod(a + 180.0, 360.0) - 180.0
    return np.where(r == -180.0, 180.0, r)


@dataclass(slots=True)
class EditorRectangle:
    """A `videorectangle` sequence as the editor holds it: keyframes sorted by frame."""

    frames: np.ndarray  # (k,) 1-based keyframe frames
    values: np.ndarray  # (k, 5) x, y, width, height, rotation
    enabled: np.ndarray  # (k,) bool

    @classmethod
    def parse(cls, sequence: list[dict]) -> "EditorRectangle":
        kf = np.array([k["frame"] for k in sequence])
        if np.any(np.diff(kf) <= 0):
            raise ValueError("sequence is not sorted by frame (the editor scans it in order)")
        vals = np.array([[k["x"], k["y"], k["width"], k["height"], k.get("rotation", 0) or 0] for k in sequence],
                        float).reshape(-1, 5)
        enabled = np.array([bool(k.get("enabled")) for k in sequence], dtype=bool)  # the editor: missing is false
        return cls(kf, vals, enabled)

    @property
    def last_frame(self) -> int:
        return int(self.frames[-1]) if len(self.frames) else 0

    def at(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each 1-based frame: whether the region is drawn, and (x, y, width, height,
        rotation) in percent/degrees (NaN where nothing is drawn)."""
        frames = np.asarray(frames)
        n = len(frames)
        out = np.full((n, 5), np.nan)
        kf, vals, enabled = self.frames, self.values, self.enabled
        if not len(kf):
            return np.zeros(n, bool), out
        prev = np.searchsorted(kf, frames, side="right") - 1  # last keyframe at or before
        has_shape = prev >= 0
        on_key = has_shape & (kf[np.clip(prev, 0, None)] == frames)
        nxt = np.clip(prev + 1, 0, len(kf) - 1)
        between = has_shape & ~on_key & (prev + 1 < len(kf))
        held = has_shape & ~on_key & ~between

        p = np.clip(prev, 0, None)
        out[on_key] = vals[p[on_key]]
        out[held] = vals[p[held]]
        if between.any():
            i0, i1 = p[between], nxt[between]
            r = (frames[between] - kf[i0]) / (kf[i1] - kf[i0])
            start, end = vals[i0], vals[i1]
            lin = start[:, :4] + (end[:, :4] - start[:, :4]) * r[:, None]
            d_angle = normalize_angle(end[:, 4] - start[:, 4])
            rot = normalize_angle(start[:, 4] + d_angle * r)
            out[between] = np.column_stack([lin, rot])

        # lifespan: the closest keyframe at or before, else the first one
        closest = np.where(has_shape, p, 0)
        alive = enabled[closest] | (kf[closest] == frames)
        drawn = has_shape & alive
        out[~drawn] = np.nan
        return drawn, out


def video_rectangle_at(sequence: list[dict], frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each 1-based frame: whether the region is drawn, and (x, y, width, height, rotation)
    in percent/degrees (NaN where nothing is drawn)."""
    return EditorRectangle.parse(sequence).at(frames)


def ls_rect_corners(x_px, y_px, w_px, h_px, angle_deg) -> np.ndarray:
    """Corners (n, 4, 2) of Label Studio rectangles, which turn about their top-left (x, y)."""
    t = np.radians(angle_deg)
    c, s = np.cos(t), np.sin(t)
    dx = np.stack([np.zeros_like(w_px), w_px, w_px, np.zeros_like(w_px)], axis=-1)
    dy = np.stack([np.zeros_like(h_px), np.zeros_like(h_px), h_px, h_px], axis=-1)
    xs = x_px[:, None] + dx * c[:, None] - dy * s[:, None]
    ys = y_px[:, None] + dx * s[:, None] + dy * c[:, None]
    return np.stack([xs, ys], axis=-1)


def timeline_at(value: dict, frames: np.ndarray) -> np.ndarray:
    """Whether each 1-based frame lies in one of the region's inclusive ranges."""
    ranges = np.array([(rng["start"], rng["end"]) for rng in value.get("ranges", [])], float).reshape(-1, 2)
    ranges = ranges[ranges[:, 0] <= ranges[:, 1]]  # a reversed range covers nothing
    # ranges begun at or before f, less those ended before f: the ranges holding f
    begun = np.searchsorted(np.sort(ranges[:, 0]), frames, side="right")
    ended = np.searchsorted(np.sort(ranges[:, 1]), frames, side="left")
    return begun > ended


# ----------------------------------------------------------------------------- comparison


@dataclass
class Mismatch:
    annotation: str
    frame: int | None  # 1-based Label Studio frame, None for images
    what: str


@dataclass
class Verdict:
    annotations: int = 0
    frames: int = 0
    max_error_px: float = 0.0
    mismatches: list[Mismatch] = field(default_factory=list)
    unchecked: dict[str, int] = field(default_factory=dict)  # type -> count (not comparable)

    def ok(self, tolerance_px: float = 0.0) -> bool:
        return not self.mismatches and self.max_error_px <= max(tolerance_px, EXACT_PX)

    def merge(self, other: "Verdict") -> None:
        self.annotations += other.annotations
        self.frames += other.frames
        self.max_error_px = max(self.max_error_px, other.max_error_px)
        self.mismatches.extend(other.mismatches)
        for k, v in other.unchecked.items():
            self.unchecked[k] = self.unchecked.get(k, 0) + v


_REGION_SUFFIX = re.compile(r"_r\d+$")  # mappers.py: later regions of one annotation are <id>_r2, _r3...


def results_by_annotation(task: dict) -> dict[str, list[dict]]:
    """Label-carrying results grouped by the Dataloop annotation id their id starts with."""
    out: dict[str, list[dict]] = {}
    for prediction in task.get("predictions") or []:
        if not isinstance(prediction, dict):
            continue
        for result in prediction.get("result") or []:
            if not isinstance(result, dict):
                continue
            rid = str(result.get("id", ""))
            out.setdefault(_REGION_SUFFIX.sub("", rid), []).append(result)
    return out


def compare_item(item: ItemTracks, task: dict, label_map: dict[str, str] | None = None,
                 tolerance_px: float = 0.0, max_mismatches: int = 50) -> Verdict:
    """Evaluate every result of the task as the editor would and compare, frame by frame, with
    the Dataloop timeline of the annotation it came from."""
    label_map = label_map or {}
    verdict = Verdict()
    grouped = results_by_annotation(task)
    media = item.info.media
    tol = max(tolerance_px, EXACT_PX)
    for track in item.tracks:
        results = grouped.get(track.annotation_id, [])
        verdict.annotations += 1
        try:
            if media.kind == "video":
                _compare_video(track, results, media, label_map, tol, verdict)
            else:
                _compare_image(track, results, media, label_map, tol, verdict)
        except (KeyError, TypeError, AttributeError, ValueError, IndexError) as err:
            verdict.mismatches.append(Mismatch(track.annotation_id, None, f"malformed result: {err!r}"))
        if len(verdict.mismatches) > max_mismatches:
            break
    return verdict


#: Frames evaluated at once: the video's length may be millions of frames, memory stays flat.
CHUNK_FRAMES = 1 << 16
MAX_PER_KIND = 3  # differences of one kind reported per annotation


class _Findings:
    """Mismatches of one annotation, at most MAX_PER_KIND of each kind over all chunks."""

    def __init__(self, aid: str, verdict: Verdict):
        self.aid, self.verdict, self.seen = aid, verdict, {}

    def add(self, kind: str, frame: int | None, what: str) -> None:
        n = self.seen.get(kind, 0)
        if n < MAX_PER_KIND:
            self.seen[kind] = n + 1
            self.verdict.mismatches.append(Mismatch(self.aid, frame, what))


def _chunks(last: int):
    """0-based frames 0..last in chunks of CHUNK_FRAMES."""
    for lo in range(0, last + 1, CHUNK_FRAMES):
        yield np.arange(lo, min(last, lo + CHUNK_FRAMES - 1) + 1)


def _truth(track: Track, frames0: np.ndarray, labels: np.ndarray):
    inside = (frames0 >= track.start) & (frames0 <= track.end)
    idx = held_index(track, np.clip(frames0, track.start, track.end))
    visible = inside & track.visible[idx]
    return visible, labels[idx], idx


def _compare_video(track: Track, results: list[dict], media, label_map, tol, verdict: Verdict) -> None:
    last = max(track.end + 1, (media.frames_count or 0) - 1)
    verdict.frames += last + 1
    aid = track.annotation_id
    found = _Findings(aid, verdict)
    labels = np.array([label_map.get(lb, lb) for lb in track.labels], dtype=object)
    if track.type == "class":
        timelines = []
        for r in results:
            if r.get("type") == "timelinelabels":
                timelines.append((r["value"], (r["value"].get("timelinelabels") or [None])[0]))
            elif r.get("type") == "choices":
                key = "class as whole-video choice"
                verdict.unchecked[key] = verdict.unchecked.get(key, 0) + 1
                return
        ends = [int(rng["end"]) for value, _ in timelines for rng in value.get("ranges", [])]
        for frames0 in _chunks(_horizon(track, ends, last)):
            frames1 = frames0 + 1
            visible, want, _ = _truth(track, frames0, labels)
            shown = np.zeros(len(frames0), bool)
            shown_label = np.full(len(frames0), None, dtype=object)
            for value, label in timelines:
                cover = timeline_at(value, frames1)
                _overlap(shown, cover, frames1, found)
                shown |= cover
                shown_label[cover] = label
            _report_frames(frames1, visible, shown, want, shown_label, found)
        return
    rects = [r for r in results if r.get("type") == "videorectangle"]
    if not rects and track.type not in ("box", "note", "segment", "polyline", "point", "ellipse"):
        verdict.unchecked[track.type] = verdict.unchecked.get(track.type, 0) + 1
        return
    regions = []
    for r in rects:
        try:
            region = EditorRectangle.parse(r["value"].get("sequence", []))
        except (ValueError, KeyError, TypeError) as err:
            verdict.mismatches.append(Mismatch(aid, None, f"region {r.get('id')}: {err}"))
            continue
        regions.append((region, (r["value"].get("labels") or [None])[0]))
    boxes = None
    W, H = media.width, media.height
    # a region draws nothing before its first keyframe, nor after its last unless that one is
    # enabled: each chunk evaluates only the regions alive in it, on their own frames
    regions = [(region, label) for region, label in regions if len(region.frames)]
    firsts = np.array([region.frames[0] for region, _ in regions])
    lasts = np.array([region.last_frame for region, _ in regions])
    forever = np.array([bool(region.enabled[-1]) for region, _ in regions], dtype=bool)
    for frames0 in _chunks(_horizon(track, lasts.tolist(), last)):
        frames1 = frames0 + 1
        lo, hi = int(frames1[0]), int(frames1[-1])
        visible, want, idx = _truth(track, frames0, labels)
        shown = np.zeros(len(frames0), bool)
        shown_label = np.full(len(frames0), None, dtype=object)
        corners = np.full((len(frames0), 4, 2), np.nan)
        for i in np.flatnonzero((firsts <= hi) & ((lasts >= lo) | forever)).tolist():
            region, label = regions[i]
            a = max(int(np.ceil(firsts[i])), lo) - lo
            b = len(frames1) if forever[i] else min(int(lasts[i]), hi) - lo + 1
            drawn, vals = region.at(frames1[a:b])
            _overlap(shown[a:b], drawn, frames1[a:b], found)
            shown[a:b] |= drawn
            shown_label[a:b][drawn] = label
            v = vals[drawn]
            corners[a:b][drawn] = ls_rect_corners(v[:, 0] * W / 100, v[:, 1] * H / 100, v[:, 2] * W / 100,
                                                  v[:, 3] * H / 100, v[:, 4])
        _report_frames(frames1, visible, shown, want, shown_label, found)
        both = visible & shown
        if both.any():
            boxes = bounding_boxes(track) if boxes is None else boxes
            x1, y1, x2, y2, angle = boxes[idx[both]].T
            expected = box_corners((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, angle)
            err = np.abs(corners[both] - expected).max(axis=(1, 2))
            verdict.max_error_px = max(verdict.max_error_px, float(err.max()))
            for k in np.flatnonzero(err > tol)[:MAX_PER_KIND]:
                found.add("box", int(frames1[both][k]), f"box off by {err[k]:.4f} px")


def _horizon(track: Track, last_keyframes1: list[int], last: int) -> int:
    """The last 0-based frame worth evaluating: past the track's end and past every region's last
    keyframe (or range), each frame looks like the one before, up to the video's end."""
    return min(last, max([track.end + 1, *last_keyframes1]))


def _overlap(shown, drawn, frames1, found: _Findings) -> None:
    both = shown & drawn
    if both.any():
        found.add("overlap", int(frames1[np.argmax(both)]), "two regions drawn on one frame")


def _report_frames(frames1, visible, shown, labels, shown_label, found: _Findings) -> None:
    for k in np.flatnonzero(visible & ~shown)[:MAX_PER_KIND]:
        found.add("missing", int(frames1[k]), "visible in Dataloop, not drawn in Label Studio")
    for k in np.flatnonzero(~visible & shown)[:MAX_PER_KIND]:
        found.add("extra", int(frames1[k]), "drawn in Label Studio, hidden in Dataloop")
    both = visible & shown
    wrong = np.flatnonzero(both & (labels != shown_label))
    for k in wrong[:MAX_PER_KIND]:
        found.add("label", int(frames1[k]), f"label {shown_label[k]!r}, Dataloop {labels[k]!r}")


def _compare_image(track: Track, results: list[dict], media, label_map, tol, verdict: Verdict) -> None:
    aid = track.annotation_id
    label = label_map.get(track.labels[0], track.labels[0])
    main = [r for r in results if r.get("type") in (
        "rectanglelabels", "polygonlabels", "keypointlabels", "ellipselabels", "brushlabels", "choices")]
    verdict.frames += 1
    if not main:
        verdict.mismatches.append(Mismatch(aid, None, "not in Label Studio"))
        return
    r = main[0]
    kind, value = r["type"], r["value"]
    shown_label = (value.get(kind) or [None])[0]
    if shown_label != label:
        verdict.mismatches.append(Mismatch(aid, None, f"label {shown_label!r}, Dataloop {label!r}"))
    W, H = media.width, media.height
    err = None
    if kind == "rectanglelabels":
        got = ls_rect_corners(np.array([value["x"] * W / 100]), np.array([value["y"] * H / 100]),
                              np.array([value["width"] * W / 100]), np.array([value["height"] * H / 100]),
                              np.array([value.get("rotation", 0)]))[0]
        x1, y1, x2, y2, angle = bounding_boxes(track)[0]
        want = box_corners(np.array((x1 + x2) / 2), np.array((y1 + y2) / 2), np.array(x2 - x1), np.array(y2 - y1),
                           np.array(angle))
        err = float(np.abs(got - want).max())
    elif kind == "polygonlabels" and track.type == "segment":
        got = np.array(value["points"], float) * [W / 100, H / 100]
        want = track.geometry[0]
        err = float(np.abs(got - want).max()) if got.shape == want.shape else np.inf
    elif kind == "keypointlabels":
        err = float(np.abs(np.array([value["x"] * W / 100, value["y"] * H / 100]) - track.geometry[0]).max())
    elif kind == "ellipselabels":
        got = np.array([value["x"] * W / 100, value["y"] * H / 100, value["radiusX"] * W / 100,
                        value["radiusY"] * H / 100])
        err = float(np.abs(got - track.geometry[0][:4]).max())
        d_angle = abs(float(normalize_angle(value.get("rotation", 0) - track.geometry[0][4])))
        err = max(err, np.radians(d_angle) * max(track.geometry[0][2], track.geometry[0][3]))
    else:
        verdict.unchecked[kind] = verdict.unchecked.get(kind, 0) + 1
    if err is not None:
        verdict.max_error_px = max(verdict.max_error_px, err)
        if err > tol:
            verdict.mismatches.append(Mismatch(aid, None, f"{kind} off by {err:.4f} px"))
