"""Odd and hostile input found in review, one row each: never a traceback, a precise reason, and
whatever is good still converts."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from conftest import assert_frame_exact, box_annotation, convert, image_item, pts, results_of, snap, video_item
from dl2ls.cli import main
from dl2ls.dataloop.model import MediaDefaults, decode_item
from dl2ls.labelstudio import config as lsconfig
from dl2ls.labelstudio.evaluate import results_by_annotation, video_rectangle_at
from dl2ls.labelstudio.tasks import ConvertOptions, to_task
from dl2ls.report import InputError
from dl2ls.tracks import item_tracks


def png(size=(64, 48), mode="RGBA", alpha=255, truncate=False) -> str:
    img = Image.new(mode, size)
    if mode == "RGBA":
        pixels = np.zeros((size[1], size[0], 4), np.uint8)
        pixels[10:20, 10:20, 3] = alpha
        img = Image.fromarray(pixels, "RGBA")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    data = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(data[: len(data) // 2] if truncate else data).decode()


def bomb() -> str:
    """A tiny PNG whose header claims 20000 x 20000 pixels."""
    return png(size=(20000, 20000), mode="1")


def garbled(chunk: bytes) -> str:
    """A good mask PNG with one byte of a chunk's data flipped (Pillow raised SyntaxError)."""
    data = bytearray(base64.b64decode(png().split(",", 1)[1]))
    at = data.index(chunk) + 4  # the chunk's first data byte
    data[at] ^= 0x40
    return "data:image/png;base64," + base64.b64encode(bytes(data)).decode()


@pytest.mark.parametrize("coords, outcome, reason, size", [
    (png(), "exact", None, (64, 48)),
    ("data:image/png;base64," + base64.b64encode(b"not a png").decode(), "failed", "not a readable PNG", (64, 48)),
    (png(truncate=True), "failed", "not a readable PNG", (64, 48)),
    (garbled(b"IDAT"), "failed", "not a readable PNG: garbled 'IDAT' chunk", (64, 48)),
    (garbled(b"IHDR"), "failed", "not a readable PNG: garbled 'IHDR' chunk", (64, 48)),
    ("data:image/png;base64,@@@", "failed", "not a readable PNG", (64, 48)),
    (png(mode="L"), "failed", "no alpha channel", (64, 48)),
    (png(size=(10, 10)), "skipped", "mask is 10x10, the image 64x48", (64, 48)),
    (bomb(), "skipped", "mask is 20000x20000, the image 64x48", (64, 48)),  # from the header, nothing decoded
    (bomb(), "failed", "over the limit of 268,435,456 (MAX_MASK_PIXELS)", (20000, 20000)),
])
def test_binary_masks(coords, outcome, reason, size):
    ann = box_annotation("m", type_="binary", coords=coords)
    _, task, report = convert(image_item([ann], width=size[0], height=size[1]))
    assert report.counts["binary"][outcome] == 1
    if reason:
        assert reason in report.problems[0].reason


def test_mask_threshold_is_dtlpys_alpha_over_127():
    from label_studio_sdk.converter.brush import decode_rle

    for alpha, inside in ((100, False), (200, True)):
        _, task, _ = convert(image_item([box_annotation("m", type_="binary", coords=png(alpha=alpha))], 64, 48))
        (r,) = task["predictions"][0]["result"]
        painted = decode_rle(r["value"]["rle"]).reshape(48, 64, 4)[:, :, 3]
        assert bool(painted[15, 15]) is inside


VIDEO = {"mimetype": "video/mp4", "width": 100, "height": 50}
DEFAULT_FPS = "no fps in the item: Dataloop's default 25 used (pass --fps to set it)"


@pytest.mark.parametrize("metadata, expected", [
    # fps: the first field that is there decides; a nonsensical one fails the item, naming it
    ({"fps": 0, "system": {**VIDEO, "fps": 25}}, "item metadata.fps 0 is not a frame rate"),
    ({"fps": -25, "system": VIDEO}, "item metadata.fps -25 is not a frame rate"),
    ({"fps": float("nan"), "system": VIDEO}, "item metadata.fps nan is not a frame rate"),
    ({"fps": float("inf"), "system": VIDEO}, "item metadata.fps inf is not a frame rate"),
    ({"fps": True, "system": VIDEO}, "item metadata.fps True is not a frame rate"),
    ({"fps": "abc", "system": {**VIDEO, "fps": 30}}, "item metadata.fps 'abc' is not a frame rate"),
    ({"fps": "", "system": VIDEO}, "item metadata.fps '' is not a frame rate"),
    ({"fps": 1e-300, "system": VIDEO}, "item metadata.fps 1e-300 is not a frame rate"),
    ({"fps": 1e6, "system": VIDEO}, "item metadata.fps 1000000.0 is not a frame rate"),
    ({"system": {**VIDEO, "fps": 0}}, "item metadata.system.fps 0 is not a frame rate"),
    ({"system": {**VIDEO, "ffmpeg": {"avg_frame_rate": "0/0"}}}, DEFAULT_FPS),  # ffprobe's "unknown": no value
    ({"system": {**VIDEO, "ffmpeg": {"avg_frame_rate": "30/0"}}},
     "item metadata.system.ffmpeg.avg_frame_rate '30/0' is not a frame rate"),
    ({"fps": "29.97", "system": VIDEO}, 29.97),  # a numeric string is a number
    ({"fps": None, "system": {**VIDEO, "fps": 30}}, 30.0),  # null is absent
    ({"system": {**VIDEO, "ffmpeg": {"avg_frame_rate": "30000/1001"}}}, 30000 / 1001),
    ({"system": VIDEO}, DEFAULT_FPS),  # no fps at all: Dataloop's default, reported
    # size and duration
    ({"system": {"mimetype": "video/mp4", "width": 0, "height": 50, "fps": 25, "ffmpeg": {"width": 100}}}, 25.0),
    ({"fps": 25, "system": {**VIDEO, "duration": 1e308}}, "item duration 1e+308 is beyond any real media"),
])
def test_item_metadata(metadata, expected):
    item = {**video_item([box_annotation(end=3)]), "metadata": metadata}
    data = json.dumps(item).encode()  # as Python writes it: NaN and Infinity stay in the file
    if isinstance(expected, str) and expected != DEFAULT_FPS:
        with pytest.raises(InputError, match=re.escape(expected)):
            item_tracks(decode_item(data, "test.json"), "test.json", MediaDefaults())
        return
    task, report = to_task(item_tracks(decode_item(data, "test.json"), "test.json", MediaDefaults()),
                           ConvertOptions())
    assert report.counts["box"]["exact"] == 1
    warned = [p.reason for p in report.problems if p.outcome == "warning"]
    assert warned == ([DEFAULT_FPS] if expected == DEFAULT_FPS else [])
    assert task["data"]["fps"] == (25.0 if expected == DEFAULT_FPS else expected)


@pytest.mark.parametrize("system", [VIDEO, {**VIDEO, "fps": None, "ffmpeg": {"avg_frame_rate": "0/0"}}])
def test_fps_default_from_the_command_line_is_not_a_warning(system):
    item = {**video_item([box_annotation(end=3)]), "metadata": {"system": system}}
    _, task, report = convert(item, MediaDefaults(fps=30))
    assert task["data"]["fps"] == 30 and not [p for p in report.problems if p.outcome == "warning"]


def test_null_visibility_hides_like_dtlpy_and_annotations_null_is_empty():
    ann = box_annotation(end=10, snapshots=[snap(4, objectVisible=None)])
    ann["metadata"]["system"]["snapshots_"][0]["objectVisible"] = None
    _, task, _ = convert(video_item([ann], nb_frames=20))
    assert_frame_exact(ann, task, fps=25, width=1000, height=500)
    _, task, report = convert({**video_item([]), "annotations": None})
    assert task["predictions"] == [] and report.items_converted == 1


def test_duplicate_annotation_ids_become_distinct_regions():
    _, task, report = convert(video_item([box_annotation("dup", end=3), box_annotation("dup", end=5)]))
    ids = [r["id"] for r in task["predictions"][0]["result"]]
    assert len(set(ids)) == 2 and ids[0] == "dup"
    assert any("repeated" in p.reason for p in report.problems)


@pytest.mark.parametrize("attrs, mapped", [
    ({"q": 4}, {"q": {"rating": 4}}),
    ({"q": 10}, {}),  # beyond maxRating: kept in meta
    ({"color": ["red", "blue"]}, {}),  # two values for a single choice
    ({"note": ["x", "y"]}, {"note": {"text": ["x", "y"]}}),
    ({"n": 7}, {}),  # beyond max
    ({"n": 2}, {"n": {"number": 2}}),
])
def test_attributes_fit_their_control_or_stay_in_meta(attrs, mapped):
    cfg = lsconfig.parse(
        '<View><Image name="img" value="$image"/><RectangleLabels name="r" toName="img"><Label value="car"/>'
        '</RectangleLabels><Rating name="q" toName="img" perRegion="true"/>'
        '<Choices name="color" toName="img" perRegion="true"><Choice value="red"/><Choice value="blue"/></Choices>'
        '<TextArea name="note" toName="img" perRegion="true"/><Number name="n" toName="img" perRegion="true" max="5"/>'
        '</View>')
    from label_studio_sdk.label_interface import LabelInterface

    ann = box_annotation(coords=pts(1, 1, 5, 5))
    ann["metadata"]["system"]["attributes"] = attrs
    _, task, _ = convert(image_item([ann]), config=cfg)
    (prediction,) = task["predictions"]
    got = {r["from_name"]: r["value"] for r in prediction["result"] if r["type"] != "rectanglelabels"}
    assert got == mapped
    assert LabelInterface(cfg.xml).validate_prediction(prediction, return_errors=True) == []


def test_video_class_as_choice_is_one_result():
    cfg = lsconfig.parse('<View><Video name="v" value="$video"/><Choices name="c" toName="v">'
                         '<Choice value="run"/><Choice value="walk"/></Choices></View>')
    ann = box_annotation(type_="class", coords=[], label="run", end=30,
                         snapshots=[snap(10, None, label="walk", data=[]), snap(20, None, label="run", data=[])])
    _, task, _ = convert(video_item([ann]), config=cfg)
    assert [r["value"] for r in results_of(task, "a1")] == [{"choices": ["run"]}]


@pytest.mark.parametrize("argv, message", [
    (["convert", "{src}", "-o", "{tmp}"], "is a folder"),
    (["convert", "{src}", "-o", "/proc/nope/x.json"], "cannot write"),
    (["convert", "{src}", "-o", "{tmp}/o.json", "--media-url", "{{id:>{{name}}}}"], "--media-url"),
    (["convert", "{src}", "-o", "{tmp}/o.json", "--model-version", "{{source:d}}"], "--model-version"),
    (["convert", "{src}", "-o", "{tmp}/o.json", "--label-config", "{tmp}/latin1.xml"], "not UTF-8"),
    (["convert", "{src}", "-o", "{tmp}/o.json", "--fps", "inf"], "--fps"),
    (["verify", "{src}", "{tmp}/bad_tasks.json"], "no task for this item"),
])
def test_cli_usage_errors_are_one_line(argv, message, tmp_path, capsys):
    src = tmp_path / "item.json"
    src.write_text(json.dumps(video_item([box_annotation(end=3)])))
    (tmp_path / "latin1.xml").write_bytes("<View>é</View>".encode("latin-1"))
    (tmp_path / "bad_tasks.json").write_text(json.dumps([{"data": None}, {"data": {"dataloop_item_id": [1]}}]))
    code = main([a.format(src=src, tmp=tmp_path) for a in argv])
    _, err = capsys.readouterr()
    assert code == 2 and message in err and "Traceback" not in err


def test_verify_reports_malformed_results_without_a_traceback(tmp_path, capsys):
    src = tmp_path / "item.json"
    src.write_text(json.dumps(video_item([box_annotation(end=3)])))
    tasks = tmp_path / "tasks.json"
    tasks.write_text(json.dumps([{"data": {"dataloop_item_id": "item1"}, "predictions": [
        {"result": [{"id": "a1", "type": "videorectangle", "value": None}]}]}]))
    assert main(["verify", str(src), str(tasks)]) == 1
    assert "malformed result" in capsys.readouterr().err


def test_editor_reads_a_missing_enabled_as_false_and_ids_split_only_on_region_suffixes():
    seq = [{"frame": 1, "x": 0, "y": 0, "width": 1, "height": 1}, {"frame": 5, "x": 4, "y": 0, "width": 1,
                                                                     "height": 1}]
    drawn, _ = video_rectangle_at(seq, np.array([1, 2, 5, 6]))
    assert drawn.tolist() == [True, False, True, False]
    grouped = results_by_annotation({"predictions": [{"result": [{"id": "car_red"}, {"id": "car_red_r2"}]}]})
    assert list(grouped) == ["car_red"] and len(grouped["car_red"]) == 2


def test_tolerance_is_kept_at_the_corners_as_verify_measures(tmp_path, capsys):
    rng = np.random.default_rng(5)
    shapes = [pts(100 + f + rng.uniform(-2, 2), 100 + rng.uniform(-2, 2), 200 + f + rng.uniform(-2, 2),
                  160 + rng.uniform(-2, 2), float(rng.uniform(0, 4))) for f in range(200)]
    ann = box_annotation(coords=shapes[0], snapshots=[snap(f, s) for f, s in enumerate(shapes) if f])
    src, out, rep = tmp_path / "i.json", tmp_path / "t.json", tmp_path / "r.json"
    src.write_text(json.dumps(video_item([ann], width=1920, height=1080)))
    assert main(["convert", str(src), "-o", str(out), "--tolerance", "3", "--report", str(rep)]) == 0
    reported = json.loads(rep.read_text())["max_error_px"]
    assert 0 < reported <= 3
    assert main(["verify", str(src), str(out), "--tolerance", "3"]) == 0
    measured = float(capsys.readouterr().out.split("largest error ")[1].split(" px")[0])
    assert measured == pytest.approx(reported, abs=1e-4)  # the same corners, up to percent rounding


def test_labels_that_xml_cannot_hold_are_left_out_of_the_config(tmp_path, capsys):
    src = tmp_path / "i.json"
    src.write_text(json.dumps(video_item([box_annotation("a", label="ok", end=3),
                                          box_annotation("b", label="x\x01y", end=3)])))
    assert main(["label-config", str(src)]) == 0
    out, err = capsys.readouterr()
    lsconfig.parse(out)
    assert "XML cannot hold" in err
