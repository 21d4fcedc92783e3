"""Every timeline rule, one row each: the editor's view of our output equals dtlpy's, frame by frame.

Each row is a Dataloop annotation; the check is `assert_frame_exact` (Label Studio evaluated as the
editor does vs Dataloop's SDK), plus the number of regions and of keyframes the row must take
(the fewest that reproduce it)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from conftest import (
    assert_frame_exact, box_annotation, convert, keyframe_count, pts, results_of, snap, video_item,
)


def dense(frames, fn, **kw):
    return [snap(f, fn(f), **kw) for f in frames]


def line(f):
    return pts(10 + 2 * f, 20 + f, 60 + 2 * f, 80 + f)


def turn(f):
    x = 10 + 3 * f if f <= 50 else 160 - 1 * (f - 50)
    return pts(x, 40, x + 50, 90)


def spin(f):
    return pts(400, 200, 500, 260, (2 * f) % 360)


CASES = [
    # id, annotation, regions, keyframes
    ("single frame", box_annotation(frame=7), 1, 1),
    ("static span", box_annotation(end=49), 1, 2),
    ("hold then move", box_annotation(end=30, snapshots=[snap(10, pts(50, 50, 70, 70))]), 1, 4),
    ("dense straight line", box_annotation(coords=line(0), snapshots=dense(range(1, 100), line)), 1, 2),
    ("dense with a turn", box_annotation(coords=turn(0), snapshots=dense(range(1, 100), turn)), 1, 3),
    ("stored every 5th frame", box_annotation(coords=line(0), snapshots=[snap(f, line(f), fixed=False)
                                                                         for f in range(5, 50, 5)]), 1, 19),
    ("hidden span", box_annotation(end=40, snapshots=[snap(10, visible=False), snap(20, pts(30, 30, 40, 40))]), 1, 4),
    ("hidden end", box_annotation(end=40, snapshots=[snap(30, visible=False)]), 1, 2),
    ("hidden single frame", box_annotation(end=20, snapshots=[snap(5, visible=False), snap(6)]), 1, 4),
    ("hidden from the first frame", box_annotation(end=20, snapshots=[snap(0, visible=False), snap(8)]), 1, 2),
    ("label change", box_annotation(end=30, snapshots=[snap(15, label="truck")]), 2, 4),
    ("label change and back", box_annotation(end=30, snapshots=[snap(10, label="truck"), snap(20, label="car")]), 3, 6),
    ("label change while hidden", box_annotation(end=30, snapshots=[snap(10, visible=False),
                                                                    snap(20, label="truck")]), 2, 4),
    ("unordered snapshots", box_annotation(end=40, snapshots=[snap(20, pts(30, 30, 40, 40)), snap(10, visible=False),
                                                              snap(30, pts(35, 30, 45, 40))]), 1, 6),
    ("snapshot at the first frame wins", box_annotation(coords=pts(0, 0, 5, 5), end=10,
                                                        snapshots=[snap(0, pts(100, 100, 150, 120))]), 1, 2),
    ("no endFrame ends at the last snapshot", box_annotation(snapshots=[snap(12, pts(11, 11, 21, 21))]), 1, 3),
    ("snapshot beyond endFrame extends it", box_annotation(end=5, snapshots=[snap(9, pts(11, 11, 21, 21))]), 1, 3),
    ("endFrame beyond the last snapshot", box_annotation(end=60, snapshots=[snap(9, pts(11, 11, 21, 21))]), 1, 4),
    ("starts late", box_annotation(frame=25, end=40), 1, 2),
    ("duplicate snapshot frames: the last wins", box_annotation(end=20, snapshots=[snap(10, pts(1, 1, 2, 2)),
                                                                                  snap(10, pts(5, 5, 9, 9))]), 1, 4),
    ("hidden exactly at endFrame", box_annotation(end=20, snapshots=[snap(20, visible=False)]), 1, 2),
    ("rotated box", box_annotation(coords=pts(100, 100, 200, 150, 30), end=20), 1, 2),
    ("rotation across 360", box_annotation(coords=pts(100, 100, 200, 150, 350), end=20,
                                            snapshots=[snap(10, pts(100, 100, 200, 150, 10))]), 1, 4),
    ("rotating every frame", box_annotation(coords=spin(0), snapshots=dense(range(1, 60), spin)), 1, None),
    ("negative angle", box_annotation(coords=pts(100, 100, 200, 150, -45), end=5), 1, 2),
    ("corners given right-to-left", box_annotation(coords=pts(200, 150, 100, 100), end=5), 1, 2),
]


@pytest.mark.parametrize("name, ann, regions, keys", CASES, ids=[c[0] for c in CASES])
def test_timeline_rule(name, ann, regions, keys):
    item = video_item([ann], nb_frames=120)
    _, task, report = convert(item)
    assert report.counts["box"]["exact"] == 1, report.to_json()
    got = results_of(task, ann["id"])
    assert len(got) == regions
    if keys is not None:
        assert keyframe_count(task, ann["id"]) == keys
    assert_frame_exact(ann, task, fps=25, width=1000, height=500)


def test_every_sequence_ends_disabled_and_is_sorted():
    for _, ann, _, _ in CASES:
        _, task, _ = convert(video_item([ann]))
        for r in results_of(task, ann["id"]):
            seq = r["value"]["sequence"]
            frames = [k["frame"] for k in seq]
            assert frames == sorted(set(frames))
            assert seq[-1]["enabled"] is False
            for k in seq:  # everything the SDK schema and Label Studio's export need
                assert {"frame", "enabled", "rotation", "x", "y", "width", "height", "time"} <= set(k)


def test_fractional_fps_and_fields():
    ann = box_annotation(end=299)
    _, task, _ = convert(video_item([ann], fps=29.97, nb_frames=300))
    value = results_of(task, "a1")[0]["value"]
    assert value["framesCount"] == 300
    assert value["duration"] == pytest.approx(300 / 29.97, abs=1e-5)
    assert task["data"]["fps"] == 29.97
    assert value["sequence"][-1]["time"] == pytest.approx(299 / 29.97, abs=1e-5)
    assert_frame_exact(ann, task, fps=29.97, width=1000, height=500)


def test_tracker_of_a_thousand_frames_becomes_two_keyframes():
    ann = box_annotation(coords=line(0), snapshots=dense(range(1, 1000), line))
    _, task, report = convert(video_item([ann], nb_frames=1000))
    assert keyframe_count(task, "a1") == 2
    assert report.keyframes["stored"] == 1000 and report.keyframes["emitted"] == 2


def test_tolerance_simplifies_and_reports_its_error():
    rng = random.Random(3)
    jitter = {f: (rng.uniform(-0.4, 0.4), rng.uniform(-0.4, 0.4)) for f in range(200)}

    def noisy(f):
        dx, dy = jitter[f]
        return pts(10 + f + dx, 20 + dy, 60 + f + dx, 70 + dy)

    ann = box_annotation(coords=noisy(0), snapshots=dense(range(1, 200), noisy))
    _, exact_task, exact_report = convert(video_item([ann]))
    _, lossy_task, lossy_report = convert(video_item([ann]), tolerance_px=1.0)
    assert keyframe_count(lossy_task, "a1") < keyframe_count(exact_task, "a1") / 10
    assert 0 < lossy_report.max_error_px <= 1.0
    assert lossy_report.counts["box"]["approximated"] == 1
    assert exact_report.max_error_px == 0  # only --tolerance reports an error


@pytest.mark.parametrize("type_, coords, reason", [
    ("segment", [[{"x": 10, "y": 10}, {"x": 50, "y": 20}, {"x": 30, "y": 60}]], "segment on video"),
    ("polyline", [[{"x": 10, "y": 10}, {"x": 50, "y": 20}]], "polyline on video"),
    ("point", {"x": 10, "y": 10, "z": 0}, "point on video"),
    ("ellipse", {"center": {"x": 100, "y": 100, "z": 0}, "rx": 40, "ry": 20, "angle": 90}, "ellipse on video"),
    ("note", {"box": pts(10, 10, 40, 40), "note": {"messages": []}}, "note on video"),
])
def test_other_shapes_on_video_become_boxes_with_a_named_approximation(type_, coords, reason):
    ann = box_annotation(coords=coords, type_=type_, end=10)
    tracks, task, report = convert(video_item([ann]))
    assert report.counts[type_]["approximated"] == 1
    assert reason in report.problems[0].reason
    (result,) = results_of(task, "a1")
    assert result["type"] == "videorectangle"
    if type_ == "ellipse":  # turned 90 degrees: the bounding box is 40 wide, 80 high
        first = result["value"]["sequence"][0]
        assert first["width"] == pytest.approx(40 / 1000 * 100) and first["height"] == pytest.approx(80 / 500 * 100)


def test_class_span_becomes_timeline_ranges_without_hidden_frames():
    ann = box_annotation(type_="class", coords=[], label="running", end=30,
                         snapshots=[snap(10, None, label="running", visible=False, data=[]),
                                    snap(20, None, label="walking", data=[])])
    item = video_item([ann])
    cfg = ('<View><Video name="v" value="$video" frameRate="$fps"/>'
           '<TimelineLabels name="t" toName="v"><Label value="running"/><Label value="walking"/></TimelineLabels>'
           '</View>')
    from dl2ls.labelstudio.config import parse

    _, task, report = convert(item, config=parse(cfg))
    got = {r["value"]["timelinelabels"][0]: r["value"]["ranges"] for r in results_of(task, "a1")}
    assert got == {"running": [{"start": 1, "end": 10}], "walking": [{"start": 21, "end": 31}]}
    assert report.counts["class"]["exact"] == 1


def test_a_long_video_costs_what_it_stores():
    # 100k frames held from a handful of snapshots: only the snapshots' edges are looked at
    snaps = [snap(f, pts(f % 97, 5, f % 97 + 10, 15)) for f in range(0, 100_000, 10_000)]
    ann = box_annotation(end=99_999, snapshots=snaps)
    _, task, _ = convert(video_item([ann], nb_frames=100_000))
    assert keyframe_count(task, "a1") == 20
    frames = np.array([0, 9_999, 10_000, 99_999, 100_000])
    from conftest import editor_frames

    shown = editor_frames(task, "a1", frames, 1000, 500)
    assert [s is not None for s in shown] == [True, True, True, True, False]
