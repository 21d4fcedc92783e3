"""Cross-check against Dataloop's own SDK: the real samples, and random timelines (property-based).

For every frame, what the Label Studio editor would draw from our output must equal what
`dtlpy.Annotation.from_json(...).frames[f]` says: visibility, label, and the box within
EXACT_PX."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import SAMPLES, assert_frame_exact, box_annotation, convert, pts, snap, video_item
from dl2ls.dataloop.model import MediaDefaults


def test_tracker_sample_is_frame_exact():
    item = json.loads((SAMPLES / "video_tracker_webm_2024.json").read_text())
    _, task, report = convert(item)
    assert report.counts["box"]["exact"] == 2
    for ann in item["annotations"]:
        assert_frame_exact(ann, task, fps=25, width=1280, height=720)


def test_2019_annotation_list_is_frame_exact():
    anns = json.loads((SAMPLES / "video_annotations_2019_list.json").read_text())
    item = {"annotations": anns, "filename": "video_annotations"}
    _, task, report = convert(item, MediaDefaults(fps=25, width=1920, height=1080))
    assert report.counts["box"]["exact"] == 16
    ids = [r["id"] for p in task["predictions"] for r in p["result"]]
    assert len(set(ids)) == len(ids) == 16
    for index, ann in enumerate(anns):
        ann = dict(ann, id=f"ann{index}")
        assert_frame_exact(ann, task, fps=25, width=1920, height=1080)


# ----------------------------------------------------------------------------- random timelines

coord = st.floats(min_value=-50, max_value=1050, allow_nan=False).map(lambda v: round(v, 3))


@st.composite
def boxes(draw, rotated):
    x1, y1, x2, y2 = draw(coord), draw(coord), draw(coord), draw(coord)
    angle = draw(st.one_of(st.none(), st.floats(-720, 720).map(lambda a: round(a, 2)))) if rotated else None
    return pts(x1, y1, x2, y2, angle)


@st.composite
def timelines(draw):
    rotated = draw(st.booleans())
    start = draw(st.integers(0, 20))
    frames = draw(st.lists(st.integers(0, 80), max_size=12))  # unordered, duplicates, before start
    labels = st.sampled_from(["car", "truck", "bus"])
    snapshots = []
    shape = draw(boxes(rotated))
    for f in frames:
        if draw(st.booleans()):  # a new shape, or the previous one held on
            shape = draw(boxes(rotated))
        snapshots.append(snap(f, shape, label=draw(labels), visible=draw(st.booleans()),
                              fixed=draw(st.booleans())))
    end = draw(st.one_of(st.none(), st.integers(0, 100)))
    return box_annotation(coords=draw(boxes(rotated)), label=draw(labels), frame=start, end=end, snapshots=snapshots)


@given(ann=timelines())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_timelines_match_dtlpy(ann):
    _, task, report = convert(video_item([ann], nb_frames=120))
    assert report.counts["box"]["failed"] == 0, report.to_json()
    assert_frame_exact(ann, task, fps=25, width=1000, height=500)


@st.composite
def dense_tracks(draw):
    """Tracker output: a snapshot on every frame, piecewise-linear motion with random bends."""
    n = draw(st.integers(2, 120))
    bends = sorted(draw(st.lists(st.integers(1, n - 1), max_size=4)))
    x, y, w, h = 100.0, 100.0, 400.0, 400.0  # 120 frames at -3 px never shrink it to nothing
    v = [draw(st.integers(-3, 3)) for _ in range(4)]
    shapes = []
    for f in range(n):
        if f in bends:
            v = [draw(st.integers(-3, 3)) for _ in range(4)]
        shapes.append(pts(x, y, x + w, y + h))
        x, y, w, h = x + v[0], y + v[1], w + v[2], h + v[3]
    return box_annotation(coords=shapes[0], snapshots=[snap(f, s) for f, s in enumerate(shapes) if f]), len(bends)


@given(case=dense_tracks())
@settings(max_examples=60, deadline=None)
def test_dense_tracks_need_a_keyframe_only_where_the_motion_bends(case):
    ann, bends = case
    _, task, _ = convert(video_item([ann]))
    seq = task["predictions"][0]["result"][0]["value"]["sequence"]
    assert len(seq) <= bends + 2  # the two ends and one per bend, no more
    assert_frame_exact(ann, task, fps=25, width=1000, height=500)


def test_dtlpy_is_what_we_think_it_is():
    """Pin the SDK facts the converter relies on, so an SDK upgrade that changes them is noticed."""
    from conftest import dtlpy_frames

    ann = box_annotation(end=10, snapshots=[snap(4, pts(1, 1, 3, 3), visible=False), snap(12, pts(5, 5, 6, 6))])
    frames = dtlpy_frames(ann, 25)
    assert min(frames) == 0 and max(frames) == 12  # a snapshot past endFrame extends the span
    assert frames[3][0] and not frames[4][0] and not frames[11][0] and frames[12][0]
    assert frames[11][2] == (1, 1, 3, 3)  # held, not interpolated
