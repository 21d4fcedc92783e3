"""The editor-semantics evaluator on its own: each row is a behaviour of Label Studio 1.23's editor
(`regions/VideoRectangleRegion.js` getShape, `regions/VideoRegion.js` isInLifespan,
`utils/props.ts` interpolateProp), with the answer the editor's code gives."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dl2ls.labelstudio.evaluate import (
    ls_rect_corners, normalize_angle, timeline_at, video_rectangle_at,
)


def kf(frame, x=0.0, enabled=True, rotation=0.0, y=0.0, width=10.0, height=10.0):
    return {"frame": frame, "x": x, "y": y, "width": width, "height": height, "rotation": rotation, "enabled": enabled}


NaN = math.nan

# sequence, frame, expected x (NaN: not drawn)
CASES = [
    ("before the first keyframe nothing is drawn", [kf(5, 1.0)], 4, NaN),
    ("on a keyframe it is taken as is", [kf(5, 1.0), kf(10, 2.0)], 5, 1.0),
    ("between keyframes x is linear in the frame", [kf(0, 0.0), kf(10, 10.0)], 3, 3.0),
    ("after the last enabled keyframe it is held to the end", [kf(1, 7.0)], 10_000, 7.0),
    ("a disabled keyframe is visible on its own frame", [kf(1, 1.0), kf(5, 5.0, enabled=False)], 5, 5.0),
    ("and hidden after it", [kf(1, 1.0), kf(5, 5.0, enabled=False)], 6, NaN),
    ("until the next keyframe", [kf(1, 1.0, enabled=False), kf(9, 9.0)], 9, 9.0),
    ("a gap is hidden even though getShape interpolates", [kf(1, 1.0, enabled=False), kf(9, 9.0)], 4, NaN),
    ("a disabled first keyframe alone shows one frame", [kf(3, 3.0, enabled=False)], 3, 3.0),
    ("…and nothing after", [kf(3, 3.0, enabled=False)], 4, NaN),
]


@pytest.mark.parametrize("name, seq, frame, x", CASES, ids=[c[0] for c in CASES])
def test_editor_rule(name, seq, frame, x):
    drawn, vals = video_rectangle_at(seq, np.array([frame]))
    if math.isnan(x):
        assert not drawn[0]
    else:
        assert drawn[0] and vals[0, 0] == pytest.approx(x)


def test_rotation_turns_the_short_way_round():
    # the example in the editor's own JSDoc of interpolateProp
    _, vals = video_rectangle_at([kf(0, rotation=-170), kf(20, rotation=170)], np.array([5]))
    assert vals[0, 4] == pytest.approx(-175)
    _, vals = video_rectangle_at([kf(0, rotation=350), kf(10, rotation=10)], np.array([5]))
    assert normalize_angle(vals[0, 4]) == pytest.approx(0)


@pytest.mark.parametrize("angle, expected", [(0, 0), (180, 180), (-180, 180), (190, -170), (360, 0), (-350, 10),
                                             (540, 180)])
def test_normalize_angle_lands_in_minus_180_to_180(angle, expected):
    assert normalize_angle(angle) == pytest.approx(expected)


def test_unsorted_sequences_are_refused():
    with pytest.raises(ValueError, match="not sorted"):
        video_rectangle_at([kf(5), kf(2)], np.array([1]))


def test_timeline_ranges_are_inclusive():
    covered = timeline_at({"ranges": [{"start": 2, "end": 4}]}, np.arange(1, 7))
    assert covered.tolist() == [False, True, True, True, False, False]


def test_rectangles_turn_about_their_top_left_corner():
    corners = ls_rect_corners(np.array([10.0]), np.array([20.0]), np.array([4.0]), np.array([2.0]), np.array([90.0]))
    # clockwise on screen (y down): the width now points down, the height to the left
    assert corners[0].round(9).tolist() == [[10, 20], [10, 24], [8, 24], [8, 20]]


@pytest.mark.parametrize("ranges, covered", [
    ([(2, 4), (3, 6)], [False, True, True, True, True, True, False]),  # overlapping
    ([(5, 5), (1, 1)], [True, False, False, False, True, False, False]),  # unsorted, single frames
    ([(6, 2), (4, 4)], [False, False, False, True, False, False, False]),  # a reversed range covers nothing
    ([], [False] * 7),
])
def test_timeline_ranges_cover_their_frames_whatever_their_order(ranges, covered):
    value = {"ranges": [{"start": a, "end": b} for a, b in ranges]}
    assert timeline_at(value, np.arange(1, 8)).tolist() == covered


def test_a_region_is_evaluated_the_same_on_any_slice_of_frames():
    seq = [kf(3, 1.0), kf(9, 7.0, enabled=False), kf(12, 2.0)]
    frames = np.arange(1, 20)
    drawn, vals = video_rectangle_at(seq, frames)
    for lo, hi in ((0, 5), (5, 11), (11, 19)):  # verify evaluates chunks of frames
        d, v = video_rectangle_at(seq, frames[lo:hi])
        assert (d == drawn[lo:hi]).all() and np.array_equal(v, vals[lo:hi], equal_nan=True)
