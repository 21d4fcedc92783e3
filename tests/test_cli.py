"""`dl2ls convert | label-config | verify` end to end: golden documents for the real samples, exit
codes, the report, and bad input that never produces a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import GOLDEN, SAMPLES, box_annotation, image_item, pts, snap, video_item
from dl2ls.cli import main

UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"

GOLDEN_CASES = {
    "video_tracker_webm_2024": [],
    "video_annotations_2019_list": ["--fps", "25", "--width", "1920", "--height", "1080"],
    "image_shapes_list": ["--width", "640", "--height", "480"],
    "image_segment_binary": [],
    "image_box_point_class": [],
}


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


@pytest.mark.parametrize("name", GOLDEN_CASES)
def test_samples_match_their_golden_documents(name, tmp_path, capsys):
    out, report = tmp_path / "tasks.json", tmp_path / "report.json"
    code, _, _ = run(capsys, "convert", SAMPLES / f"{name}.json", "-o", out, "--report", report,
                     *GOLDEN_CASES[name])
    assert code == 0
    got_report = json.loads(report.read_text())
    for p in got_report["problems"]:
        p["file"] = Path(p["file"]).name  # not the machine's path
    documents = {"tasks": json.loads(out.read_text()), "report": got_report}
    for kind, doc in documents.items():
        golden = GOLDEN / f"{name}.{kind}.json"
        if UPDATE:
            golden.parent.mkdir(exist_ok=True)
            golden.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        assert doc == json.loads(golden.read_text()), f"{golden.name} changed (UPDATE_GOLDEN=1 to accept)"
    code, stdout, _ = run(capsys, "verify", SAMPLES / f"{name}.json", out, *GOLDEN_CASES[name])
    assert code == 0, stdout
    assert "0 differences" in stdout


def test_verify_catches_a_moved_keyframe(tmp_path, capsys):
    out = tmp_path / "tasks.json"
    run(capsys, "convert", SAMPLES / "video_tracker_webm_2024.json", "-o", out)
    tasks = json.loads(out.read_text())
    tasks[0]["predictions"][0]["result"][0]["value"]["sequence"][-1]["frame"] += 1  # one frame too long
    out.write_text(json.dumps(tasks))
    code, stdout, err = run(capsys, "verify", SAMPLES / "video_tracker_webm_2024.json", out)
    assert code == 1
    assert "frame 52: drawn in Label Studio, hidden in Dataloop" in err


def test_every_rule_of_bad_input_is_one_line_and_the_rest_converts(tmp_path, capsys):
    good = box_annotation("good", end=5)
    bad = {
        "nan": box_annotation("nan", coords=pts(float("nan"), 1, 2, 3)),
        "absurd": box_annotation("absurd", coords=pts(1e30, 1, 2, 3)),
        "wrongtype": box_annotation("wrongtype", coords=pts("ten", 1, 2, 3)),
        "nolabel": box_annotation("nolabel", end=5, snapshots=[{k: v for k, v in snap(3).items() if k != "label"}]),
        "negframe": box_annotation("negframe", end=5, snapshots=[snap(-2)]),
        "frametype": box_annotation("frametype", end=5, snapshots=[snap("3")]),
        "shape": box_annotation("shape", coords=[{"x": 1}]),
        "hugeframe": box_annotation("hugeframe", end=10**12),
    }
    odd_score = box_annotation("oddscore", end=5, model={"name": "m", "confidence": 7})
    unknown = box_annotation("unknown", type_="cube_3d", coords=[])
    item = video_item([good, *bad.values(), unknown, odd_score])
    src = tmp_path / "item.json"
    src.write_text(json.dumps(item, allow_nan=True))
    (tmp_path / "truncated.json").write_text(json.dumps(video_item([good], item_id="t"))[:-20])
    (tmp_path / "nofps.json").write_text(json.dumps({**video_item([good], item_id="nofps"), "metadata": {
        "fps": 0, "system": {"mimetype": "video/mp4", "width": 10, "height": 10}}}))
    out, report = tmp_path / "out" / "tasks.json", tmp_path / "report.json"
    code, _, err = run(capsys, "convert", tmp_path, "-o", out, "--report", report)
    assert code == 1
    rep = json.loads(report.read_text())
    assert rep["items"] == {"converted": 1, "failed": 2}
    assert rep["annotations"]["box"]["exact"] == 2  # good, and oddscore without its score
    assert rep["annotations"]["box"]["failed"] == len(bad)
    assert rep["annotations"]["cube_3d"]["skipped"] == 1
    lines = {p["annotation"]: p for p in rep["problems"] if p["annotation"]}
    for ann_id in bad:
        assert lines[ann_id]["file"].endswith("item.json"), ann_id
        assert ann_id in err
    assert "NaN" in lines["nan"]["reason"] and "absurd" in lines["absurd"]["reason"]
    assert "label" in lines["nolabel"]["reason"] and "negative frame" in lines["negframe"]["reason"]
    assert "truncated.json: not valid JSON" in err and "nofps.json: item metadata.fps 0 is not a frame rate" in err
    assert "beyond the video" in lines["hugeframe"]["reason"]
    assert "confidence 7 is not in 0..1" in lines["oddscore"]["reason"] and lines["oddscore"]["outcome"] == "warning"
    tasks = json.loads(out.read_text())
    results = [r for p in tasks[0]["predictions"] for r in p["result"]]
    assert sorted(r["id"] for r in results) == ["good", "oddscore"]
    assert all("score" not in r for r in results)


@pytest.mark.parametrize("argv, code", [
    (["convert", "x.json"], 2),  # no -o
    (["convert", "{samples}/video_tracker_webm_2024.json", "-o", "{tmp}/o.json", "--model-version", "{{nope}}"], 2),
    (["convert", "{samples}/video_tracker_webm_2024.json", "-o", "{tmp}/o.json",
      "--label-config", "{tmp}/none.xml"], 2),
    (["convert", "{samples}/image_boxes_fruit.json", "-o", "{tmp}/o.json"], 2),  # nothing readable
    (["convert", "{samples}/image_boxes_fruit.json", "{samples}/image_box_point_class.json", "-o", "{tmp}/o.json"], 1),
    (["convert", "{samples}/image_boxes_fruit.json", "-o", "{tmp}/o.json", "--width", "700", "--height", "400"], 0),
    (["convert", "{samples}/video_tracker_webm_2024.json", "-o", "{tmp}/o.json", "--fps", "-3"], 2),
])
def test_exit_codes(argv, code, tmp_path, capsys):
    argv = [a.format(samples=SAMPLES, tmp=tmp_path) for a in argv]
    try:
        got = main(argv)
    except SystemExit as exit_:  # argparse
        got = exit_.code
    _, err = capsys.readouterr()
    assert got == code, err
    assert "Traceback" not in err


def test_console_script_help_explains_itself():
    exe = Path(sys.executable).with_name("dl2ls")
    proc = subprocess.run([exe, "convert", "--help"], capture_output=True, text=True, check=True)
    for option in ("--label-config", "--model-version", "--media-url", "--tolerance", "--label-map", "--fps"):
        assert option in proc.stdout
    proc = subprocess.run([exe, "convert", "/nonexistent.json", "-o", "/tmp/dl2ls-x.json"], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "no such file" in proc.stderr and "Traceback" not in proc.stderr


def test_model_annotations_are_grouped_by_model_with_scores(tmp_path, capsys):
    anns = [box_annotation("m1", end=3, model={"name": "yolo", "confidence": 0.8}),
            box_annotation("m2", end=3, model={"name": "yolo", "confidence": 0.6}),
            box_annotation("h1", end=3)]
    src = tmp_path / "i.json"
    src.write_text(json.dumps(video_item(anns)))
    out = tmp_path / "t.json"
    run(capsys, "convert", src, "-o", out, "--model-version", "v1-{source}")
    (task,) = json.loads(out.read_text())
    preds = {p["model_version"]: p for p in task["predictions"]}
    assert set(preds) == {"v1-yolo", "v1-human"}
    assert preds["v1-yolo"]["score"] == pytest.approx(0.7)
    assert [r["score"] for r in preds["v1-yolo"]["result"]] == [0.8, 0.6]
    assert "score" not in preds["v1-human"] and "score" not in preds["v1-human"]["result"][0]


def test_label_config_drives_names_labels_and_label_map(tmp_path, capsys):
    cfg = tmp_path / "config.xml"
    cfg.write_text('<View><Video name="vid" value="$movie" frameRate="$fps"/>'
                   '<Labels name="lab" toName="vid"><Label value="car"/></Labels>'
                   '<VideoRectangle name="rect" toName="vid"/></View>')
    lmap = tmp_path / "map.json"
    lmap.write_text(json.dumps({"vehicle.car": "car"}))
    src = tmp_path / "i.json"
    src.write_text(json.dumps(video_item([box_annotation("a", label="vehicle.car", end=3),
                                          box_annotation("b", label="person", end=3)])))
    out, report = tmp_path / "t.json", tmp_path / "r.json"
    code, _, _ = run(capsys, "convert", src, "-o", out, "--label-config", cfg, "--label-map", lmap, "--report", report)
    assert code == 0  # a skipped label is reported, not a failure
    (task,) = json.loads(out.read_text())
    assert "movie" in task["data"]
    (result,) = task["predictions"][0]["result"]
    assert (result["from_name"], result["to_name"], result["value"]["labels"]) == ("rect", "vid", ["car"])
    rep = json.loads(report.read_text())
    assert rep["annotations"]["box"] == {"exact": 1, "approximated": 0, "skipped": 1, "failed": 0}
    assert "'person' is not in the config's rect labels (car)" in rep["problems"][0]["reason"]


def test_media_url_template(tmp_path, capsys):
    src = tmp_path / "i.json"
    src.write_text(json.dumps(video_item([])))
    out = tmp_path / "t.json"
    run(capsys, "convert", src, "-o", out, "--media-url", "s3://bucket/{dataset_id}{filename}")
    assert json.loads(out.read_text())[0]["data"]["video"] == "s3://bucket/ds1/clip.mp4"


def test_label_config_command_with_ontology_colours(tmp_path, capsys):
    out = tmp_path / "c.xml"
    code, _, _ = run(capsys, "label-config", SAMPLES / "video_annotations_2019_list.json", "-o", out,
                     "--ontology", SAMPLES / "video_labels_2019.json")
    assert code == 0
    xml = out.read_text()
    assert 'frameRate="$fps"' in xml and '<Label value="Home" background="#02268f"/>' in xml


def test_attributes_go_to_config_controls_else_to_meta(tmp_path, capsys):
    cfg = tmp_path / "config.xml"
    cfg.write_text('<View><Image name="img" value="$image"/>'
                   '<RectangleLabels name="r" toName="img"><Label value="car"/></RectangleLabels>'
                   '<Choices name="color" toName="img" perRegion="true"><Choice value="red"/></Choices>'
                   '<Choices name="flags" toName="img" perRegion="true"><Choice value="Occluded"/></Choices>'
                   '</View>')
    v2 = box_annotation("v2", type_="box", coords=pts(1, 1, 5, 5))
    v2["metadata"]["system"]["attributes"] = {"color": "red", "size": 3}
    v1 = box_annotation("v1", type_="box", coords=pts(1, 1, 5, 5))
    v1["attributes"] = ["Occluded", "Blurry"]
    src = tmp_path / "i.json"
    src.write_text(json.dumps(image_item([v2, v1])))
    out, report = tmp_path / "t.json", tmp_path / "r.json"
    run(capsys, "convert", src, "-o", out, "--label-config", cfg, "--report", report)
    results = json.loads(out.read_text())[0]["predictions"][0]["result"]
    by = {(r["id"], r["type"], r["from_name"]): r for r in results}
    assert by[("v2", "choices", "color")]["value"] == {"choices": ["red"]}
    assert by[("v2", "rectanglelabels", "r")]["meta"]["dataloop"]["attributes"] == {"size": 3}
    assert by[("v1", "choices", "flags")]["value"] == {"choices": ["Occluded"]}
    assert by[("v1", "rectanglelabels", "r")]["meta"]["dataloop"]["attributes"] == ["Blurry"]
    assert json.loads(report.read_text())["attributes"] == {"mapped": 2, "meta": 2}


def test_label_config_refuses_to_mix_videos_and_images_unless_told(tmp_path, capsys):
    sources = [SAMPLES / "video_tracker_webm_2024.json", SAMPLES / "image_segment_binary.json"]
    code, _, err = run(capsys, "label-config", *sources)
    assert code == 2 and "pass --kind video or --kind image" in err
    code, out, _ = run(capsys, "label-config", *sources, "--kind", "image")
    assert code == 0 and "<Image" in out and "<Video" not in out
