"""The core's limits, one rule per test: memory and time follow what an input stores, not the
frame numbers or the pixel counts it names; a span past the video's known end is clipped, not
failed; masks are read in strips and encoded as Label Studio's SDK would, bit for bit.

Memory is checked through cheap structural facts or a tracemalloc peak (numpy reports its arrays
to tracemalloc), never through time."""

from __future__ import annotations

import base64
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import (
    assert_frame_exact, box_annotation, convert, dtlpy_frames, editor_frames, image_item, pts, results_of, snap,
    video_item,
)
from dl2ls.labelstudio import mappers
from dl2ls.labelstudio.evaluate import compare_item
from dl2ls.tracks import MAX_FRAME, held_index, keyframes, runs, sample_frames

FAR = 5_000_000


def far_item(end=FAR, nb_frames=None):
    """A ~1 KB item whose box runs to frame `end`: a hidden span, a label change, a move at the end."""
    ann = box_annotation("far", end=end, snapshots=[
        snap(10, pts(30, 30, 60, 60)), snap(20, visible=False), snap(30, pts(40, 40, 80, 80), label="truck"),
        snap(1000, pts(45, 40, 85, 80), label="truck"), snap(end - 1, pts(50, 40, 90, 80), label="truck")])
    return video_item([ann], nb_frames=nb_frames), ann


def peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ----------------------------------------------------------------------------- stored, not named


def test_memory_follows_the_stored_frames_not_the_named_frame():
    item, _ = far_item()
    convert(item)  # imports and caches out of the measurement
    near = peak_bytes(lambda: convert(far_item(end=2000)[0]))
    far = peak_bytes(lambda: convert(item))
    # a dense per-frame array over 5M frames is 40 MB per column; the whole conversion stays small
    assert far < 2_000_000 and far < 2 * near + 200_000, (near, far)
    _, task, report = convert(item)
    assert report.counts["box"]["exact"] == 1
    (car, truck) = results_of(task, "far")
    assert car["value"]["framesCount"] == FAR + 1
    assert [k["frame"] for k in truck["value"]["sequence"]][-3:] == [FAR - 1, FAR, FAR + 1]


def test_no_array_grows_with_the_named_frame():
    tracks, _, _ = convert(far_item()[0])
    (track,) = tracks.tracks
    samples = sample_frames(track, track.start, track.end)
    assert len(samples) <= 2 * len(track.frames) + 2  # the samples are the stored frames' edges
    assert [r.ranges for r in runs(track)] == [[(0, 19)], [(30, FAR)]]


@pytest.mark.parametrize("end, nb_frames, outcome", [
    (MAX_FRAME, None, "exact"),  # a day of 60 fps video, length unknown
    (MAX_FRAME + 1, None, "failed"),  # past the cap: a corrupt endFrame, not a video
    (MAX_FRAME - 1, MAX_FRAME, "exact"),  # a day of 60 fps video, length known
])
def test_a_day_of_video_converts_cheaply_and_unknown_lengths_keep_the_cap(end, nb_frames, outcome):
    item, _ = far_item(end=end, nb_frames=nb_frames)
    item["metadata"]["fps"] = item["metadata"]["system"]["fps"] = 60
    peak = peak_bytes(lambda: convert(item))
    _, _, report = convert(item)
    assert report.counts["box"][outcome] == 1
    assert peak < 2_000_000
    if outcome == "failed":
        assert "beyond the video (its length is unknown; at most 5184000 accepted)" in report.problems[0].reason


def test_verify_checks_a_day_of_video_in_bounded_memory():
    tracks, task, _ = convert(far_item(end=MAX_FRAME - 1, nb_frames=MAX_FRAME)[0])
    verdict = None

    def check():
        nonlocal verdict
        verdict = compare_item(tracks, task)

    peak = peak_bytes(check)
    assert verdict.ok() and verdict.frames == MAX_FRAME + 1, verdict.mismatches  # and one past the end
    assert peak < 40_000_000, peak  # chunks of frames; one pass over 5M frames held at once is ~1 GB


def test_verify_still_sees_every_frame_of_a_long_span():
    tracks, task, _ = convert(far_item(end=300_000, nb_frames=400_000)[0])
    truck = results_of(task, "far")[1]
    assert [k["frame"] for k in truck["value"]["sequence"]] == [31, 1000, 1001, 299_999, 300_000, 300_001]
    truck["value"]["sequence"][2]["x"] += 0.01  # the start of a hold of 299,000 frames, shifted
    verdict = compare_item(tracks, task)
    assert [(m.frame, m.what) for m in verdict.mismatches] == [
        (1001, "box off by 0.1000 px"), (1002, "box off by 0.1000 px"), (1003, "box off by 0.1000 px")]


# ----------------------------------------------------------------------------- samples = every frame


def sparse_timelines(max_gap):
    @st.composite
    def build(draw):
        rotated = draw(st.booleans())
        n = draw(st.integers(0, 8))
        frames = sorted(draw(st.sets(st.integers(1, max_gap * 8), min_size=n, max_size=n)))
        coord = st.integers(0, 900).map(float)
        snaps = []
        for f in frames:
            angle = draw(st.integers(0, 359)) if rotated else None
            box = pts(draw(coord), draw(coord), draw(coord), draw(coord), angle)
            snaps.append(snap(f, box, label=draw(st.sampled_from(["car", "truck"])), visible=draw(st.booleans())))
        end = draw(st.one_of(st.none(), st.integers(0, max_gap * 9)))
        return box_annotation(coords=pts(10, 10, 50, 50, 0 if rotated else None), end=end, snapshots=snaps)
    return build()


@given(ann=sparse_timelines(max_gap=60))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_sampled_frames_are_frame_exact_against_dtlpy(ann):
    _, task, report = convert(video_item([ann], nb_frames=1000))
    assert report.counts["box"]["exact"] == 1, report.to_json()
    assert_frame_exact(ann, task, fps=25, width=1000, height=500)


@given(ann=sparse_timelines(max_gap=40))
@settings(max_examples=80, deadline=None)
def test_keyframes_on_samples_are_the_keyframes_on_every_frame(ann):
    """The minimal keyframes found on the samples equal those found on the dense per-frame signal."""
    tracks, _, _ = convert(video_item([ann]))
    (track,) = tracks.tracks
    boxes = mappers.ls_rect_px(track.geometry)
    tol = np.array([5e-4] * 5)
    for run in runs(track):
        for a, b in run.ranges:
            dense = np.arange(a, b + 1)
            values = boxes[held_index(track, dense)]
            values[:, 4] = np.unwrap(values[:, 4], period=360.0)
            want, _ = keyframes(values, tol, np.array([np.inf] * 4 + [180.0]))
            samples = sample_frames(track, a, b)
            got, _ = keyframes(values[samples - a], tol, np.array([np.inf] * 4 + [180.0]), at=samples)
            assert samples[got].tolist() == dense[want].tolist()


def test_a_long_hold_costs_keyframes_only_at_its_edges():
    ann = box_annotation(end=FAR, snapshots=[snap(3, pts(20, 20, 40, 40)), snap(FAR - 2, pts(25, 20, 45, 40))])
    _, task, _ = convert(video_item([ann]))
    seq = results_of(task, "a1")[0]["value"]["sequence"]
    assert [k["frame"] for k in seq] == [1, 3, 4, FAR - 2, FAR - 1, FAR + 1]
    frames = np.array([0, 2, 3, 4, FAR // 2, FAR - 3, FAR - 2, FAR, FAR + 1])
    shown = editor_frames(task, "a1", frames, 1000, 500)
    assert [None if s is None else round(float(s[1][0, 0]), 6) for s in shown] == \
        [10.0, 10.0, 20.0, 20.0, 20.0, 20.0, 25.0, 25.0, None]


# ----------------------------------------------------------------------------- the video's known end


def frame_exact_within(ann, task, nb_frames):
    """Every frame of the video (0..nb_frames-1) as dtlpy says; nothing drawn after it."""
    truth = dtlpy_frames(ann, 25)
    frames0 = np.arange(0, nb_frames + 3)
    for f, got in zip(frames0.tolist(), editor_frames(task, ann["id"], frames0, 1000, 500)):
        want = truth.get(f) if f < nb_frames else None
        assert (got is not None) == bool(want and want[0]), f
        if got is not None:
            left, top, right, bottom = want[2]
            assert np.abs(got[1][0] - [left, top]).max() <= 1e-3 and got[0] == want[1], f


def test_a_span_past_the_known_end_is_clipped_and_reported():
    ann = box_annotation(end=150, snapshots=[snap(50, pts(30, 30, 60, 60)), snap(99, label="truck"),
                                             snap(120, pts(1, 1, 2, 2))])
    _, task, report = convert(video_item([ann], nb_frames=100))
    assert report.counts["box"]["approximated"] == 1
    assert report.problems[0].reason == \
        "span runs to frame 150, past the video's end (100 frames): clipped to frames 0-99"
    assert [r["value"]["framesCount"] for r in results_of(task, "a1")] == [100, 100]
    frame_exact_within(ann, task, 100)


def test_an_annotation_entirely_past_the_end_is_skipped_with_a_reason():
    late = box_annotation("late", frame=120, end=130)
    _, task, report = convert(video_item([late, box_annotation("ok", end=5)], nb_frames=100))
    assert report.counts["box"]["skipped"] == 1 and report.counts["box"]["exact"] == 1
    (problem,) = report.problems
    assert (problem.annotation, problem.outcome) == ("late", "skipped")
    assert problem.reason == "starts at frame 120, past the video's end (100 frames)"
    assert [r["id"] for r in task["predictions"][0]["result"]] == ["ok"]


def test_a_span_that_ends_on_the_last_frame_is_exact():
    _, _, report = convert(video_item([box_annotation(end=99)], nb_frames=100))
    assert report.counts["box"]["exact"] == 1 and not report.problems


# ----------------------------------------------------------------------------- masks


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def filter_rows(rows: np.ndarray, unit: int, kinds: list[int]) -> bytes:
    """PNG-filter byte rows (h, row bytes), each with its own filter type."""
    out, above = [], np.zeros(rows.shape[1], np.int64)
    for row, kind in zip(rows.astype(np.int64), kinds):
        left = np.concatenate([np.zeros(unit, np.int64), row[:-unit]])
        upleft = np.concatenate([np.zeros(unit, np.int64), above[:-unit]])
        predicted = [0, left, above, (left + above) // 2, paeth(left, above, upleft)][kind]
        out.append(bytes([kind]) + ((row - predicted) % 256).astype(np.uint8).tobytes())
        above = row
    return b"".join(out)


def write_png(samples: np.ndarray, color: int, depth: int, rng, palette_alpha=None, key=None,
              interlace=False) -> bytes:
    """A PNG of (h, w, channels) samples in any colour type and depth, every filter type used."""
    h, w, channels = samples.shape
    unit = max(1, channels * depth // 8)

    def rows_of(img):
        if depth == 16:
            raw = img.astype(">u2").view(np.uint8).reshape(img.shape[0], -1)
        elif depth == 8:
            raw = img.astype(np.uint8).reshape(img.shape[0], -1)
        else:
            per = 8 // depth
            flat = img.reshape(img.shape[0], -1).astype(np.uint8)
            pad = (-flat.shape[1]) % per
            flat = np.pad(flat, ((0, 0), (0, pad))).reshape(img.shape[0], -1, per)
            raw = np.zeros(flat.shape[:2], np.uint8)
            for j in range(per):
                raw |= flat[:, :, j] << (8 - depth * (j + 1))
        return filter_rows(raw, unit, rng.integers(0, 5, len(raw)).tolist())

    if interlace:
        passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
        data = b"".join(rows_of(samples[y0::dy, x0::dx]) for x0, y0, dx, dy in passes
                        if samples[y0::dy, x0::dx].size)
    else:
        data = rows_of(samples)
    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, int(interlace)))
    if color == 3:
        out += chunk(b"PLTE", bytes(i % 256 for i in range(3 * (1 << depth))))
    if palette_alpha is not None:
        out += chunk(b"tRNS", bytes(palette_alpha))
    if key is not None:
        out += chunk(b"tRNS", struct.pack(f">{len(key)}H", *key))
    idat = zlib.compress(data, 9)
    return out + chunk(b"IDAT", idat[:len(idat) // 2]) + chunk(b"IDAT", idat[len(idat) // 2:]) + chunk(b"IEND", b"")


def pillow_inside(png: bytes) -> np.ndarray:
    """The reference: the mask as Pillow reads it for dtlpy (RGBA alpha > 127)."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(png)) as img:
        return np.asarray(img.convert("RGBA"))[:, :, 3] > 127


def rle_mask(rle: list[int], w: int, h: int) -> np.ndarray:
    from label_studio_sdk.converter.brush import decode_rle

    painted = decode_rle(rle).reshape(h, w, 4)
    assert (painted == painted[:, :, :1]).all()  # all four values of a pixel alike, 0 or 255
    return painted[:, :, 3] == 255


FORMATS = {  # name: (colour type, depth, channels, tRNS)
    "RGBA 8": (6, 8, 4, None), "RGBA 16": (6, 16, 4, None), "grey+alpha 8": (4, 8, 2, None),
    "grey+alpha 16": (4, 16, 2, None), "palette 8": (3, 8, 1, "palette"), "palette 4": (3, 4, 1, "palette"),
    "palette 2": (3, 2, 1, "palette"), "palette 1": (3, 1, 1, "palette"), "grey 8 + key": (0, 8, 1, "key"),
    "grey 16 + key": (0, 16, 1, "key"), "RGB 8 + key": (2, 8, 3, "key"), "RGB 16 + key": (2, 16, 3, "key"),
}


@pytest.mark.parametrize("interlace", [False, True], ids=["rows", "interlaced"])
@pytest.mark.parametrize("name", FORMATS)
def test_mask_alpha_is_read_as_pillow_reads_it(name, interlace, monkeypatch):
    color, depth, channels, trns = FORMATS[name]
    rng = np.random.default_rng(len(name))
    w, h = 37, 29
    top = (1 << depth) - 1
    samples = rng.integers(0, top + 1, (h, w, channels))
    samples[rng.random((h, w)) < 0.5] = top  # runs worth encoding
    palette_alpha = key = None
    if trns == "palette":
        palette_alpha = rng.integers(0, 256, min(1 << depth, 200)).tolist()
    elif trns == "key":
        key = samples[3, 4].tolist()
    png = write_png(samples, color, depth, rng, palette_alpha, key, interlace)
    if name in ("grey 16 + key", "RGB 16 + key") and not interlace:
        want = ~(samples == key).all(axis=2)  # Pillow drops 16-bit keys; the PNG standard is clear
    else:
        want = pillow_inside(png)
    monkeypatch.setattr(mappers, "STRIP_BYTES", 64)  # a few rows a strip: strip edges everywhere
    got = rle_mask(mappers.mask_rle(png, w, h), w, h)
    assert (got == want).all()


def test_mask_rle_is_label_studio_sdks_bit_for_bit():
    from label_studio_sdk.converter.brush import mask2rle

    rng = np.random.default_rng(11)
    masks = [np.zeros((300, 300)), np.ones((257, 300)), np.ones((1, 1)), np.zeros((1, 1))]
    for length in (1, 2, 3, 4, 63, 64, 65, 16383, 16384, 16385, 40000):  # each run-width boundary (x4)
        m = np.zeros((1, length + 7))
        m[0, 3:3 + length] = 1
        masks.append(m)
    for _ in range(100):
        h, w = rng.integers(1, 50, 2)
        masks.append(rng.random((h, w)) < rng.random())
    for mask in masks:
        mask = (np.asarray(mask) > 0)
        collected = mappers._Runs()
        for strip in np.array_split(mask, min(3, len(mask))):  # runs cross strip edges
            collected.add(strip)
        got = mappers.brush_rle(collected.lengths(), collected.first, mask.size)
        assert got == mask2rle(mask.astype(np.uint8) * 255)


def mask_item(w, h, png, ann_id="m"):
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    return image_item([box_annotation(ann_id, type_="binary", coords=url)], width=w, height=h)


def test_mask_memory_is_one_strip_not_the_image():
    n = 4000  # 64 MB as RGBA, 16 MB as a mask, 64 MB again in mask2rle's x4 copy
    rows = np.zeros((n, 1 + 4 * n), np.uint8)
    rows[1000:3000, 1 + 4 * 1000 + 3:1 + 4 * 3000:4] = 255
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", n, n, 8, 6, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + chunk(b"IEND", b""))
    del rows
    item = mask_item(n, n, png)
    convert(mask_item(8, 8, write_png(np.zeros((8, 8, 4), int), 6, 8, np.random.default_rng(0))))  # imports
    peak = peak_bytes(lambda: convert(item))
    _, task, report = convert(item)
    assert report.counts["binary"]["exact"] == 1
    assert peak < 24_000_000, peak
    inside = rle_mask(task["predictions"][0]["result"][0]["value"]["rle"], n, n)
    assert inside.sum() == 2000 * 2000 and inside[1000, 1000] and not inside[999, 1000]


def test_a_mask_too_fragmented_for_the_brush_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(mappers, "MAX_MASK_RUNS", 100)
    samples = np.zeros((20, 20, 4), int)
    samples[:, ::2, 3] = 255
    _, _, report = convert(mask_item(20, 20, write_png(samples, 6, 8, np.random.default_rng(1))))
    assert report.counts["binary"]["failed"] == 1
    assert "mask has over 100 runs of inside/outside pixels (MAX_MASK_RUNS)" in report.problems[0].reason


def test_a_large_interlaced_mask_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(mappers, "MAX_WHOLE_MASK_PIXELS", 100)
    png = write_png(np.zeros((20, 20, 4), int), 6, 8, np.random.default_rng(2), interlace=True)
    _, _, report = convert(mask_item(20, 20, png))
    assert report.counts["binary"]["failed"] == 1
    assert "an interlaced mask PNG is decoded whole: 400 pixels is over the limit of 100" in report.problems[0].reason


@pytest.mark.parametrize("damage, reason", [
    (lambda png: png[:-20], "not a readable PNG: truncated"),
    (lambda png: png[:png.rindex(b"IDAT") - 4], "not a readable PNG: image data ends early"),  # half the data
    (lambda png: png.replace(b"IDAT", b"IDAx", 1), "not a readable PNG: garbled 'IDAx' chunk"),
    (lambda png: png[:8] + png[8 + 25:], "not a readable PNG: no IHDR chunk first"),
    (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 6, 0, 0, 0))  # filter type 7
     + chunk(b"IDAT", zlib.compress(b"\x07" + bytes(32 + 7 * 33))), "not a readable PNG: cannot decode image data"),
    (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 6, 0, 0, 0))  # not deflate
     + chunk(b"IDAT", b"\x78\x9c\xff\xff\xff\xff"), "not a readable PNG: Error -3 while decompressing data"),
])
def test_any_mask_decoding_error_fails_that_annotation_alone(damage, reason):
    png = write_png(np.zeros((8, 8, 4), int), 6, 8, np.random.default_rng(3))
    item = mask_item(8, 8, damage(png) if callable(damage) else damage)
    item["annotations"].append(box_annotation("box", coords=pts(1, 1, 4, 4)))
    _, task, report = convert(item)
    assert report.counts["binary"]["failed"] == 1 and report.counts["box"]["exact"] == 1
    assert reason in report.problems[0].reason


# ----------------------------------------------------------------------------- regions cost what they hold


def many_runs(n=300):
    """One box that changes label every 10 frames and attributes every 5: n regions."""
    snaps = [snap(f, pts(f % 90, 10, f % 90 + 20, 40), label=("car", "truck")[(f // 10) % 2],
                  namedAttributes={"n": f // 5}) for f in range(5, 10 * n, 5)]
    return box_annotation("many", end=10 * n - 1, snapshots=snaps)


def test_attributes_are_scanned_once_per_track_not_once_per_region(monkeypatch):
    calls = []
    scan = mappers._attribute_change_points
    monkeypatch.setattr(mappers, "_attribute_change_points", lambda track: calls.append(1) or scan(track))
    _, task, report = convert(video_item([many_runs()], nb_frames=5000))
    regions = results_of(task, "many")
    assert len(regions) == 300 and len(calls) == 1 and report.counts["box"]["exact"] == 1
    for region in regions:  # each region lists the changes inside it, none of the others'
        frames = [k["frame"] for k in region["value"]["sequence"]]
        changes = region["meta"]["dataloop"]["attribute_changes"]
        assert [c["frame"] for c in changes] == [frames[0] + 5]


def test_verify_evaluates_each_region_only_where_it_lives(monkeypatch):
    from dl2ls.labelstudio import evaluate

    evaluated = []
    at = evaluate.EditorRectangle.at
    monkeypatch.setattr(evaluate.EditorRectangle, "at", lambda self, frames: evaluated.append(len(frames))
                        or at(self, frames))
    tracks, task, _ = convert(video_item([many_runs()], nb_frames=3_000_000))
    verdict = compare_item(tracks, task)
    assert verdict.ok() and verdict.frames == 3_000_000
    assert len(evaluated) == 300 and sum(evaluated) == 3000  # not 300 regions x 3M frames
