"""The Label Studio side against Label Studio's own SDK: every prediction validates against its
config, masks survive the RLE round trip, image geometry lands where the editor draws it."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.label_interface import LabelInterface

from conftest import SAMPLES, box_annotation, convert, image_item, pts, snap, video_item
from dl2ls.cli import main
from dl2ls.dataloop.model import MediaDefaults
from dl2ls.labelstudio import config as lsconfig
from dl2ls.labelstudio.mappers import ls_rect_px

ROOT = Path(__file__).parent.parent
SAMPLE_ARGS = {
    "video_tracker_webm_2024": [],
    "video_annotations_2019_list": ["--fps", "25", "--width", "1920", "--height", "1080"],
    "image_shapes_list": ["--width", "640", "--height", "480"],
    "image_segment_binary": [],
    "image_box_point_class": [],
}


@pytest.mark.parametrize("name", SAMPLE_ARGS)
def test_predictions_validate_against_the_generated_config(name, tmp_path, capsys):
    src = SAMPLES / f"{name}.json"
    cfg, out = tmp_path / "config.xml", tmp_path / "tasks.json"
    assert main(["label-config", str(src), "-o", str(cfg)]) == 0
    assert main(["convert", str(src), "-o", str(out), "--label-config", str(cfg), *SAMPLE_ARGS[name]]) == 0
    capsys.readouterr()
    interface = LabelInterface(cfg.read_text())
    tasks = json.loads(out.read_text())
    assert tasks and all(t["predictions"] for t in tasks)
    for task in tasks:
        for prediction in task["predictions"]:
            assert interface.validate_prediction(prediction, return_errors=True) == []
            assert prediction["model_version"]


def test_root_label_config_is_a_valid_video_tracking_config():
    xml = (ROOT / "label_config.xml").read_text()
    cfg = lsconfig.parse(xml)
    assert cfg.object_for("video").frame_rate == "$fps"
    item = json.loads((SAMPLES / "video_tracker_webm_2024.json").read_text())
    _, task, report = convert(item, config=cfg)
    assert report.counts["box"]["exact"] == 2
    for prediction in task["predictions"]:
        assert LabelInterface(xml).validate_prediction(prediction, return_errors=True) == []


def test_class_on_video_without_timeline_becomes_a_whole_video_choice():
    cfg = lsconfig.parse('<View><Video name="v" value="$video"/><Choices name="c" toName="v">'
                         '<Choice value="day"/></Choices></View>')
    ann = box_annotation(type_="class", coords=[], label="day", end=10)
    _, task, report = convert(video_item([ann]), config=cfg)
    assert task["predictions"][0]["result"][0]["value"] == {"choices": ["day"]}
    assert report.counts["class"]["approximated"] == 1


def test_a_config_without_a_place_skips_with_a_reason():
    cfg = lsconfig.parse('<View><Video name="v" value="$video"/></View>')
    _, task, report = convert(video_item([box_annotation(end=3)]), config=cfg)
    assert task["predictions"] == []
    assert report.counts["box"]["skipped"] == 1
    assert "no <videorectangle> for 'v'" in report.problems[0].reason


def test_video_masks_are_skipped_with_a_reason():
    ann = box_annotation(type_="binary", coords="data:image/png;base64,AAAA", end=3)
    _, _, report = convert(video_item([ann]))
    assert report.counts["binary"]["skipped"] == 1 and "no video masks" in report.problems[0].reason


def test_binary_mask_survives_the_rle_round_trip():
    from label_studio_sdk.converter.brush import decode_rle
    from PIL import Image

    item = json.loads((SAMPLES / "image_segment_binary.json").read_text())
    _, task, _ = convert(item)
    (brush,) = [r for r in task["predictions"][0]["result"] if r["type"] == "brushlabels"]
    w, h = brush["original_width"], brush["original_height"]
    rgba = decode_rle(brush["value"]["rle"]).reshape(h, w, 4)
    ann = next(a for a in item["annotations"] if a["type"] == "binary")
    url = ann["coordinates"] if isinstance(ann["coordinates"], str) else ann["coordinates"]["data"]
    alpha = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGBA"))[:, :, 3]
    assert ((rgba[:, :, 3] > 0) == (alpha > 0)).all()
    assert set(np.unique(rgba[:, :, 3])) <= {0, 255}  # painted fully, not a faint 0/1 mask


def test_rotated_image_box_turns_about_the_corner_label_studio_uses():
    # a 100x50 box centred at (300, 200), turned 90 degrees clockwise about its centre
    x, y, w, h, rot = ls_rect_px(np.array([[250.0, 175.0, 350.0, 225.0, 90.0]]))[0]
    assert (round(x, 9), round(y, 9), w, h, rot) == (325.0, 150.0, 100.0, 50.0, 90.0)
    ann = box_annotation(coords=pts(250, 175, 350, 225, 90))
    _, task, _ = convert(image_item([ann], width=1000, height=500))
    value = task["predictions"][0]["result"][0]["value"]
    assert value == {"x": 32.5, "y": 30.0, "width": 10.0, "height": 10.0, "rotation": 90.0, "rectanglelabels": ["car"]}


def test_image_geometry_in_percent_of_the_image():
    anns = [
        box_annotation("e", type_="ellipse", coords={"center": {"x": 320, "y": 240}, "rx": 64, "ry": 48, "angle": 30}),
        box_annotation("p", type_="point", coords={"x": 64, "y": 48, "z": 0}),
        box_annotation("s", type_="segment", coords=[[{"x": 0, "y": 0}, {"x": 640, "y": 0}, {"x": 640, "y": 480}]]),
        box_annotation("c", type_="class", coords=[], label="night"),
    ]
    _, task, report = convert(image_item(anns))
    by = {r["id"]: r for r in task["predictions"][0]["result"]}
    assert by["e"]["value"] == {"x": 50.0, "y": 50.0, "radiusX": 10.0, "radiusY": 10.0, "rotation": 30.0,
                                "ellipselabels": ["car"]}
    assert (by["p"]["value"]["x"], by["p"]["value"]["y"]) == (10.0, 10.0)
    assert by["s"]["value"]["points"] == [[0.0, 0.0], [100.0, 0.0], [100.0, 100.0]]
    assert by["c"]["value"] == {"choices": ["night"]}
    assert all(r["original_width"] == 640 and r["original_height"] == 480 for r in by.values())
    assert sum(c["exact"] for c in report.counts.values()) == 4


def test_attribute_changes_over_time_are_kept_in_meta():
    ann = box_annotation(end=20, snapshots=[snap(5, namedAttributes={"occluded": True}),
                                            snap(9, namedAttributes={})])
    ann["metadata"]["system"]["attributes"] = {}
    _, task, _ = convert(video_item([ann]))
    meta = task["predictions"][0]["result"][0]["meta"]["dataloop"]
    assert meta["attribute_changes"] == [{"frame": 6, "attributes": {"occluded": True}},
                                         {"frame": 10, "attributes": {}}]


def test_bare_image_list_needs_a_size():
    anns = json.loads((SAMPLES / "image_shapes_list.json").read_text())
    with pytest.raises(Exception, match="image item has no size"):
        convert({"annotations": anns})
    convert({"annotations": anns}, MediaDefaults(width=640, height=480))
