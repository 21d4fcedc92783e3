"""The keyframe rule on its own: minimal for piecewise-linear paths, never beyond the tolerance."""

from __future__ import annotations

import numpy as np
import pytest

from dl2ls.tracks import keyframes


def replay(values: np.ndarray, keys: np.ndarray) -> np.ndarray:
    rows = np.arange(len(values))
    return np.column_stack([np.interp(rows, keys, values[keys, c]) for c in range(values.shape[1])])


@pytest.mark.parametrize("path, expected", [
    ([0, 1, 2, 3, 4], [0, 4]),                  # straight
    ([0, 1, 2, 2, 2], [0, 2, 4]),               # stops
    ([5, 5, 5, 9, 9, 9], [0, 2, 3, 5]),         # held, jumps, held: a keyframe each side of the jump
    ([0, 2, 4, 3, 2, 1], [0, 2, 5]),            # turns back
    ([1.0], [0]),
    ([1.0, 7.0], [0, 1]),
])
def test_minimal_keyframes(path, expected):
    values = np.array(path, float)[:, None]
    keys, err = keyframes(values, np.array([5e-4]))
    assert keys.tolist() == expected and err == 0.0


def test_slow_curvature_below_the_bend_threshold_is_still_caught():
    # second differences of 2e-10 px (below the bend threshold) add up over 5,000 frames
    f = np.arange(5000, dtype=float)
    values = np.column_stack([1e-10 * f * f, f])
    tol = np.array([5e-4, 5e-4])
    keys, _ = keyframes(values, tol)
    assert len(keys) > 2
    assert np.abs(replay(values, keys) - values).max() <= 5e-4


def test_lossy_mode_stays_within_tolerance_and_reports_its_error():
    rng = np.random.default_rng(7)
    values = np.column_stack([np.arange(500.0) + rng.uniform(-0.3, 0.3, 500), np.full(500, 20.0)])
    keys, err = keyframes(values, np.array([1.0, 1.0]), lossy=True)
    real = np.abs(replay(values, keys) - values).max()
    assert len(keys) < 10 and real <= 1.0 and err == pytest.approx(real)


def test_max_step_splits_half_turns():
    angle = np.linspace(0, 270, 10)[:, None]  # straight in angle, but 270 degrees at once
    keys, _ = keyframes(angle, np.array([1e-3]), max_step=np.array([180.0]))
    assert (np.diff(angle[keys, 0]) < 180).all()


def replay_at(values: np.ndarray, keys: np.ndarray, at: np.ndarray) -> np.ndarray:
    return np.column_stack([np.interp(at, at[keys], values[keys, c]) for c in range(values.shape[1])])


@pytest.mark.parametrize("at, path, expected", [
    ([0, 3, 4, 10], [0, 6, 8, 20], [0, 3]),              # straight at uneven positions
    ([0, 9, 10, 30], [5, 5, 9, 9], [0, 1, 2, 3]),        # held, one step, held: both sides of the step
    ([0, 5, 6, 100], [0, 0, 0, 0], [0, 3]),              # held throughout
    ([0, 2, 3, 50, 51, 90], [0, 0, 1, 1, 0, 0], [0, 1, 2, 3, 4, 5]),
    ([0, 10, 11, 12, 40], [0, 10, 11, 12, 40], [0, 4]),  # straight, some samples dense
])
def test_minimal_keyframes_at_frame_positions(at, path, expected):
    values = np.array(path, float)[:, None]
    keys, err = keyframes(values, np.array([5e-4]), at=np.array(at))
    assert keys.tolist() == expected and err == 0.0


def test_slow_curvature_at_uneven_positions_is_still_caught():
    at = np.unique(np.concatenate([np.arange(0, 50_000, 7), [49_999]]))
    values = np.column_stack([1e-11 * at * at, at.astype(float)])
    keys, _ = keyframes(values, np.array([5e-4, 5e-4]), at=at)
    assert len(keys) > 2
    assert np.abs(replay_at(values, keys, at) - values).max() <= 5e-4


def test_max_step_splits_half_turns_at_a_sample():
    at = np.array([0, 4, 5, 9, 10, 20])
    angle = np.array([0.0, 40, 80, 120, 160, 200])[:, None]  # straight in angle over uneven gaps
    keys, _ = keyframes(angle, np.array([1e-3]), max_step=np.array([180.0]), at=at)
    assert (np.diff(angle[keys, 0]) < 180).all() and set(keys.tolist()) <= set(range(len(at)))
