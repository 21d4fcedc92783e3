"""The reader recognises every kind of SOURCE and rejects the rest precisely."""

from __future__ import annotations

import json
import zipfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import SAMPLES, box_annotation, video_item
from dl2ls.dataloop import read
from dl2ls.dataloop.read import iter_items, split_array


def kinds(path):
    out = []
    for e in iter_items(path):
        out.append("item" if e.item else "note" if e.note else f"error: {e.error.reason}")
    return out


def test_item_file():
    (entry,) = iter_items(SAMPLES / "video_tracker_webm_2024.json")
    assert entry.item.id == "6653532837839ef78d330689" and len(entry.item.annotations) == 2


def test_bare_annotation_list_is_one_item_named_after_the_file():
    (entry,) = iter_items(SAMPLES / "video_annotations_2019_list.json")
    assert entry.item.id is None and entry.item.filename == "/video_annotations_2019_list"
    assert entry.item.name == "video_annotations_2019_list"
    assert len(entry.item.annotations) == 16


def test_label_tree_is_recognised_and_left_alone():
    assert kinds(SAMPLES / "labels_tree.json") == ["note"]


def test_array_of_items_streams_each_item(tmp_path):
    items = [video_item([box_annotation(end=3)], item_id=f"i{n}") for n in range(3)]
    items[1]["filename"] = 'a "quoted" [name] {with} brackets, and \\ backslash'
    path = tmp_path / "export.json"
    path.write_text(json.dumps(items, indent=2))
    entries = list(iter_items(path))
    assert [e.item.id for e in entries] == ["i0", "i1", "i2"]
    assert entries[1].item.filename == items[1]["filename"]
    assert entries[2].origin.endswith("export.json[2]")


def test_export_folder_v1_and_v2_names(tmp_path):
    (tmp_path / "json" / "a" / "b").mkdir(parents=True)
    (tmp_path / "json" / "a" / "video.json").write_text(json.dumps(video_item([], item_id="v1")))
    (tmp_path / "json" / "a" / "b" / "video.mp4.json").write_text(json.dumps(video_item([], item_id="v2")))
    (tmp_path / "json" / "notes.txt").write_text("not json")
    assert sorted(e.item.id for e in iter_items(tmp_path)) == ["v1", "v2"]


def test_zip_read_in_memory_and_hostile_entries_refused(tmp_path):
    path = tmp_path / "export.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("json/ok.json", json.dumps(video_item([], item_id="ok")))
        zf.writestr("../evil.json", json.dumps(video_item([], item_id="evil1")))
        zf.writestr("/abs/evil.json", json.dumps(video_item([], item_id="evil2")))
        zf.writestr("json/..\\..\\evil.json", json.dumps(video_item([], item_id="evil3")))
    got = kinds(path)
    assert got.count("item") == 1
    assert sum("refused" in k for k in got) == 3
    assert not (tmp_path.parent / "evil.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["export.zip"]  # nothing extracted


@pytest.mark.parametrize("content, message", [
    (b"", "empty file"),
    (b"   \n", "empty file"),
    (b'{"id": "x", "annotations": [', "not valid JSON"),
    (b"[" + json.dumps(video_item([])).encode()[:-10], "truncated"),
    (b"hello", "not JSON"),
    (b"[1, 2]", "array elements must be objects"),
    (b'[{"foo": 1}]', "neither Dataloop items nor annotations"),
    (b'{"annotations": "nope"}', "not a Dataloop item"),
    (b"[]", "empty list"),
])
def test_bad_files_get_one_precise_line(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    (entry,) = iter_items(path)
    assert entry.error is not None and message in entry.error.reason
    assert str(entry.error).startswith(str(path))
    assert "\n" not in str(entry.error)


@pytest.mark.parametrize("tail, message", [
    (b', "x"]', "array elements must be objects"),
    (b",]", "unexpected ','"),
    (b" {}]", "missing ','"),
    (b", {", "truncated"),
    (b"] []", "extra data"),
])
def test_an_array_broken_midway_keeps_the_items_before(tmp_path, tail, message):
    path = tmp_path / "export.json"
    path.write_bytes(b"[" + json.dumps(video_item([], item_id="good")).encode() + tail)
    first, second = iter_items(path)
    assert first.item.id == "good"
    assert message in second.error.reason and str(path) in str(second.error)


def test_missing_path_and_empty_folder(tmp_path):
    assert "no such file" in kinds(tmp_path / "nope.json")[0]
    assert "no .json files" in kinds(tmp_path)[0]


@pytest.mark.parametrize("text", [
    "[]",
    ' [ {"a": "]"} , {"b": [1, {"c": "\\"}"}]} ] ',
    '[{"a": "\\\\"}, {"b": "[{"}]',
    '[[1, 2], {"x": {"y": []}}]',
])
def test_split_array_finds_exactly_the_elements(text):
    data = text.encode()
    assert [json.loads(data[a:b]) for a, b in split_array(data)] == json.loads(text)


def test_split_array_rejects_garbage():
    for bad in ("[{} {}]", '[{"a": 1}', '["x"]', "[{}] extra"):
        with pytest.raises(ValueError):
            list(split_array(bad.encode()))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='ab"\\[]{},: \n\u00e9', max_size=8),
    lambda inner: (st.lists(inner, max_size=3)
                   | st.dictionaries(st.text(alphabet='k"\\]', max_size=3), inner, max_size=3)),
    max_leaves=10,
)


@given(elements=st.lists(st.dictionaries(st.text(max_size=3), json_values, max_size=3) | st.lists(json_values),
                         max_size=5),
       chunk=st.integers(1, 9), indent=st.sampled_from([None, 1]))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_split_array_across_chunk_boundaries(monkeypatch, elements, chunk, indent):
    """Strings with quotes, backslashes and brackets, cut by chunk edges anywhere."""
    monkeypatch.setattr(read, "CHUNK", chunk)
    data = json.dumps(elements, indent=indent).encode()
    assert [json.loads(data[a:b]) for a, b in split_array(data)] == elements
