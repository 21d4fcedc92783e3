"""The reader's rules for hostile and broken input, one test per rule: whatever the input, one line
naming the file (and the entry or annotation), never a traceback, the good items around it still
read, and memory that follows what the input stores, not what it names."""

from __future__ import annotations

import json
import os
import struct
import tracemalloc
import zipfile

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import box_annotation, video_item
from dl2ls.cli import main
from dl2ls.dataloop import read
from dl2ls.dataloop.model import decode_annotation, decode_item, decode_json
from dl2ls.dataloop.read import Locator, PreadBuffer, ReadLimits, iter_items, load_item, parse_size, split_array
from dl2ls.report import InputError

MiB = 1 << 20


def one_line(err) -> bool:
    return "\n" not in str(err)


def items_and_errors(source, **kw):
    entries = list(iter_items(source, **kw))
    return [e for e in entries if e.item is not None], [e for e in entries if e.error is not None]


def big_item(item_id: str, size: int) -> dict:
    """An item whose JSON is about `size` bytes, in one long string (cheap to decode)."""
    item = video_item([box_annotation(end=3)], item_id=item_id)
    item["description"] = "x" * size
    return item


# ----------------------------------------------------------------------------- files read with pread


def test_rule_a_file_truncated_while_read_is_one_line_for_that_file(tmp_path, monkeypatch):
    monkeypatch.setattr(read, "CHUNK", 64 << 10)  # the array is read in many chunks
    path = tmp_path / "export.json"
    path.write_text(json.dumps([big_item(f"i{n}", 300_000) for n in range(3)]))
    it = iter_items(path)
    first = next(it)
    assert first.item.id == "i0"
    with open(path, "r+b") as fh:
        fh.truncate(400_000)  # under the reader's feet: a memory map would have died of SIGBUS here
    rest = list(it)
    assert [e.item is not None for e in rest[:-1]] == [True] * (len(rest) - 1)
    err = rest[-1].error
    assert "changed while being read" in err.reason and str(path) in str(err) and one_line(err)
    with pytest.raises(InputError, match="no item there any more"):
        load_item(Locator(str(path), span=(600_000, 900_000), index=2), "x")


def test_rule_a_file_emptied_while_read_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(read, "CHUNK", 64 << 10)
    path = tmp_path / "export.json"
    path.write_text(json.dumps([big_item(f"i{n}", 200_000) for n in range(3)]))
    it = iter_items(path)
    assert next(it).item.id == "i0"
    path.write_bytes(b"")
    (last,) = [e for e in it if e.error is not None]
    assert "changed while being read" in last.error.reason


def test_rule_the_pread_buffer_reads_like_bytes(tmp_path):
    data = bytes(range(256)) * 40
    path = tmp_path / "f"
    path.write_bytes(data)
    with open(path, "rb") as fh:
        buf = PreadBuffer(fh.fileno())
        assert len(buf) == len(data)
        for key in (slice(None), slice(5, 9), slice(-10, None), slice(100, 50), slice(0, 10**9), slice(-10**9, 3)):
            assert buf[key] == data[key], key
        for i in (0, 1, 255, len(data) - 1, -1, -len(data)):
            assert buf[i] == data[i]
        with pytest.raises(IndexError):
            buf[len(data)]


json_values = st.recursive(
    st.none() | st.integers() | st.text(alphabet='ab"\\[]{},: \n\u00e9', max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(alphabet='k"\\]', max_size=3), inner,
                                                                  max_size=3),
    max_leaves=10,
)


@given(elements=st.lists(st.dictionaries(st.text(max_size=3), json_values, max_size=3), max_size=5),
       chunk=st.integers(1, 9))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_rule_split_array_over_a_file_finds_what_it_finds_in_bytes(tmp_path, monkeypatch, elements, chunk):
    """Escapes and brackets cut by chunk edges anywhere, read through pread."""
    monkeypatch.setattr(read, "CHUNK", chunk)
    data = json.dumps(elements).encode()
    path = tmp_path / "a.json"
    path.write_bytes(data)
    with open(path, "rb") as fh:
        buf = PreadBuffer(fh.fileno())
        assert [json.loads(buf[a:b]) for a, b in split_array(buf)] == elements


def test_rule_memory_follows_one_item_of_an_array_file_not_the_file(tmp_path):
    path = tmp_path / "export.json"
    with open(path, "wb") as fh:  # 48 MB of items, 1 MB each
        fh.write(b"[")
        for n in range(48):
            fh.write((b"," if n else b"") + orjson.dumps(big_item(f"i{n}", MiB)))
        fh.write(b"]")
    tracemalloc.start()
    try:
        count = sum(1 for e in iter_items(path) if e.item is not None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 48
    assert peak < 16 * MiB, f"peak {peak / MiB:.1f} MiB for 1 MB items"


# ----------------------------------------------------------------------------- zips


def write_zip(path, entries: dict[str, bytes], compression=zipfile.ZIP_DEFLATED):
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)


def central_record(blob: bytes, name: str) -> int:
    """Offset of the central directory record of entry `name`."""
    at = blob.find(b"PK\x01\x02")
    while at >= 0:
        n = struct.unpack_from("<H", blob, at + 28)[0]
        if blob[at + 46:at + 46 + n] == name.encode():
            return at
        at = blob.find(b"PK\x01\x02", at + 4)
    raise KeyError(name)


def patch_zip(path, name: str, field_offset: int, fmt: str, value: int, local_offset: int | None = None):
    blob = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        header = zf.getinfo(name).header_offset
    struct.pack_into(fmt, blob, central_record(bytes(blob), name) + field_offset, value)
    if local_offset is not None:
        struct.pack_into(fmt, blob, header + local_offset, value)
    path.write_bytes(bytes(blob))


def three_entries(middle: bytes = b"") -> dict[str, bytes]:
    return {
        "json/a.json": json.dumps(video_item([], item_id="a")).encode(),
        "json/b.json": middle or json.dumps(big_item("b", 50_000)).encode(),
        "json/c.json": json.dumps(video_item([], item_id="c")).encode(),
    }


@pytest.mark.parametrize("damage, message", [
    (b"\xff" * 64, "error"),  # not deflate at all: zlib.error
    (None, "CRC"),  # one byte of the deflate stream flipped: inflates to the wrong bytes
])
def test_rule_a_zip_entry_with_corrupt_data_is_one_line_and_the_others_read(tmp_path, damage, message):
    path = tmp_path / "export.zip"
    write_zip(path, three_entries())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("json/b.json")
        name_len, extra_len = struct.unpack_from("<HH", path.read_bytes(), info.header_offset + 26)
        start = info.header_offset + 30 + name_len + extra_len
    blob = bytearray(path.read_bytes())
    if damage is None:
        blob[start + info.compress_size // 2] ^= 0x01
    else:
        blob[start + 10:start + 10 + len(damage)] = damage
    path.write_bytes(bytes(blob))
    items, errors = items_and_errors(path)
    assert sorted(e.item.id for e in items) == ["a", "c"]
    (err,) = errors
    assert err.origin.endswith("export.zip:json/b.json") and "cannot read zip entry" in err.error.reason
    assert message in err.error.reason and one_line(err.error)


def test_rule_a_zip_bomb_is_refused_before_it_inflates(tmp_path):
    path = tmp_path / "bomb.zip"
    filler = b'{"id": "bomb", "name": "' + b" " * (40 * MiB) + b'"}'
    write_zip(path, three_entries(filler))
    assert path.stat().st_size < MiB
    tracemalloc.start()
    try:
        items, errors = items_and_errors(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sorted(e.item.id for e in items) == ["a", "c"]
    (err,) = errors
    assert "zip bomb" in err.error.reason and str(len(filler)) in err.error.reason and "json/b.json" in str(err.error)
    assert peak < 4 * MiB


def test_rule_a_zip_entry_over_the_item_limit_is_refused(tmp_path):
    path = tmp_path / "export.zip"
    write_zip(path, three_entries(json.dumps(big_item("b", 2 * MiB)).encode()), zipfile.ZIP_STORED)
    items, errors = items_and_errors(path, limits=ReadLimits(max_item_bytes=MiB))
    assert sorted(e.item.id for e in items) == ["a", "c"]
    (err,) = errors
    assert "over the 1.0 MiB allowed per item (--max-item-size)" in err.error.reason


def test_rule_a_zip_header_lying_about_the_size_cannot_take_more_memory(tmp_path):
    """The central directory says 1000 bytes; the deflate stream holds 40 MB."""
    path = tmp_path / "liar.zip"
    filler = b'{"id": "liar", "name": "' + b" " * (40 * MiB) + b'"}'
    write_zip(path, three_entries(filler))
    patch_zip(path, "json/b.json", 24, "<I", 1000, local_offset=22)
    tracemalloc.start()
    try:
        items, errors = items_and_errors(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sorted(e.item.id for e in items) == ["a", "c"]
    (err,) = errors
    assert "cannot read zip entry" in err.error.reason or "more than" in err.error.reason
    assert peak < 4 * MiB


@pytest.mark.parametrize("field, fmt, value, local, message", [
    (8, "<H", 0x1, 6, "encrypted"),  # general purpose flag bit 0
    (10, "<H", 99, 8, "compression"),  # a compression method zipfile does not know
])
def test_rule_encrypted_and_unsupported_zip_entries_are_one_line(tmp_path, field, fmt, value, local, message):
    path = tmp_path / "export.zip"
    write_zip(path, three_entries())
    patch_zip(path, "json/b.json", field, fmt, value, local_offset=local)
    items, errors = items_and_errors(path)
    assert sorted(e.item.id for e in items) == ["a", "c"]
    (err,) = errors
    assert message in err.error.reason and one_line(err.error)


def test_rule_load_item_follows_the_same_zip_rules(tmp_path):
    path = tmp_path / "export.zip"
    write_zip(path, three_entries(), zipfile.ZIP_STORED)
    entry = next(e for e in iter_items(path) if e.item is not None and e.item.id == "b")
    assert load_item(entry.locator, entry.origin).id == "b"
    with pytest.raises(InputError, match="--max-item-size"):
        load_item(entry.locator, entry.origin, limits=ReadLimits(max_item_bytes=1000))
    patch_zip(path, "json/b.json", 10, "<H", 99, local_offset=8)
    with pytest.raises(InputError, match="compression"):
        load_item(entry.locator, entry.origin)


def test_rule_a_zip_that_cannot_be_opened_is_one_line(tmp_path):
    path = tmp_path / "export.zip"
    write_zip(path, three_entries())
    blob = bytearray(path.read_bytes())
    at = central_record(bytes(blob), "json/a.json")
    blob[at:at + 4] = b"XXXX"  # the central directory is corrupt: ZipFile() itself fails
    path.write_bytes(bytes(blob))
    entries = list(iter_items(path))
    assert all(e.error is not None and one_line(e.error) for e in entries)
    assert read.count_items(path) is None


# ----------------------------------------------------------------------------- one item's size


def test_rule_an_item_file_over_the_limit_is_refused_naming_size_and_option(tmp_path):
    path = tmp_path / "item.json"
    path.write_text(json.dumps(big_item("big", 3000)))
    (entry,) = iter_items(path, limits=ReadLimits(max_item_bytes=2000))
    assert "--max-item-size" in entry.error.reason and f"({path.stat().st_size} bytes)" in entry.error.reason
    assert str(path) in str(entry.error)
    (entry,) = iter_items(path)  # the default is generous
    assert entry.item.id == "big"


def test_rule_array_elements_over_the_limit_fail_alone(tmp_path):
    path = tmp_path / "export.json"
    path.write_text(json.dumps([big_item("a", 10), big_item("b", 5000), big_item("c", 10)]))
    items, errors = items_and_errors(path, limits=ReadLimits(max_item_bytes=3000))
    assert [e.item.id for e in items] == ["a", "c"]
    (err,) = errors
    assert err.origin.endswith("export.json[1]") and "--max-item-size" in err.error.reason
    with pytest.raises(InputError, match="--max-item-size"):
        load_item(Locator(str(path), span=(0, 5000), index=1), "x", limits=ReadLimits(max_item_bytes=3000))


def test_rule_a_bare_annotation_list_over_the_limit_is_refused(tmp_path):
    path = tmp_path / "clip.mp4.json"
    path.write_text(json.dumps([box_annotation(f"a{n}") for n in range(50)]))
    (entry,) = iter_items(path, limits=ReadLimits(max_item_bytes=1000))
    assert "annotation list" in entry.error.reason and "--max-item-size" in entry.error.reason


@pytest.mark.parametrize("text, size", [
    ("512M", 512 << 20), ("2G", 2 << 30), ("1.5k", 1536), ("1000", 1000), ("64KiB", 64 << 10), (" 3 mb ", 3 << 20),
])
def test_rule_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "-1M", "0", "1X", "12 34"])
def test_rule_parse_size_refuses_what_is_not_a_size(text):
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


# ----------------------------------------------------------------------------- too deep


DEEP = 100_000


@pytest.mark.parametrize("content, good, message", [
    (b"[" * DEEP + b"]" * DEEP, [], "first element cannot be read: nested too deeply"),
    (b'{"a":' * DEEP + b"1" + b"}" * DEEP, [], "nested too deeply"),
    (b'{"id": "x", "annotations": [' + b"[" * DEEP + b"]" * DEEP + b"]}", [], "nested too deeply"),
    (b'[{"id": "x", "annotations": []}, ' + b'{"a":' * DEEP + b"1" + b"}" * DEEP + b', {"id": "y"}]', ["x", "y"],
     "nested too deeply"),
])
def test_rule_input_nested_too_deeply_is_one_line(tmp_path, content, good, message):
    path = tmp_path / "deep.json"
    path.write_bytes(content)
    items, errors = items_and_errors(path)
    assert [e.item.id for e in items] == good
    (err,) = errors
    assert message in err.error.reason and str(path) in str(err.error) and one_line(err.error)


def test_rule_every_decoder_turns_too_deep_into_an_input_error():
    deep_list = b"[" * DEEP + b"]" * DEEP
    deep_obj = b'{"type": "box", "label": "a", "attributes": ' + b"[" * DEEP + b"]" * DEEP + b"}"
    for call in (lambda: decode_json(deep_list, "f"), lambda: decode_item(deep_obj, "f"),
                 lambda: decode_annotation(deep_obj, "f", 3)):
        with pytest.raises(InputError, match="nested too deeply"):
            call()


def test_rule_a_deep_annotation_fails_alone_in_an_item(tmp_path):
    path = tmp_path / "clip.mp4.json"  # a bare list: annotations kept raw, decoded one by one
    deep = b'{"type": "box", "label": "a", "attributes": ' + b"[" * DEEP + b"]" * DEEP + b"}"
    path.write_bytes(b"[" + json.dumps(box_annotation("good")).encode() + b"," + deep + b"]")
    (entry,) = iter_items(path)
    good = decode_annotation(entry.item.annotations[0], entry.origin, 0)
    assert good.id == "good"
    with pytest.raises(InputError, match="nested too deeply") as err:
        decode_annotation(entry.item.annotations[1], entry.origin, 1)
    assert err.value.annotation == "ann1"


def test_rule_convert_reports_deep_files_and_converts_the_rest(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "deep.json").write_bytes(b"[" * DEEP + b"]" * DEEP)
    (src / "deeper.json").write_bytes(b'{"a":' * DEEP + b"1" + b"}" * DEEP)
    (src / "good.json").write_text(json.dumps(video_item([box_annotation(end=3)])))
    out = tmp_path / "tasks.json"
    assert main(["convert", str(src), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "deep.json" in err and "deeper.json: nested too deeply" in err
    assert len(json.loads(out.read_text())) == 1


# ----------------------------------------------------------------------------- text that is not Unicode


def item_with_label(raw_label: bytes) -> bytes:
    good = json.dumps(box_annotation("good", end=3)).encode()
    bad = json.dumps(box_annotation("bad", end=3, label="PLACEHOLDER")).encode().replace(b'"PLACEHOLDER"', raw_label)
    annotations = b'"annotations": [' + good + b", " + bad + b"]"
    return json.dumps(video_item([])).encode().replace(b'"annotations": []', annotations)


@pytest.mark.parametrize("raw_label, message", [
    (b'"car\xff"', "not UTF-8"),  # a byte that is not UTF-8
    (b'"car\\udc80"', "lone UTF-16 surrogate"),  # an escaped lone surrogate
    (b'"car\\ud800"', "lone UTF-16 surrogate"),
    (b'"car\xed\xb2\x80"', "surrogate|not UTF-8"),  # a surrogate encoded as if it were a character
])
def test_rule_a_label_that_is_not_unicode_fails_that_annotation_alone(tmp_path, capsys, raw_label, message):
    path = tmp_path / "item.json"
    path.write_bytes(item_with_label(raw_label))
    (entry,) = iter_items(path)
    anns = entry.item.annotations
    assert decode_annotation(anns[0], entry.origin, 0).id == "good"
    with pytest.raises(InputError, match=message) as err:
        decode_annotation(anns[1], entry.origin, 1)
    assert one_line(err.value)
    orjson.dumps(str(err.value))  # the line itself can be written to a report
    out, report = tmp_path / "tasks.json", tmp_path / "report.json"
    assert main(["convert", str(path), "-o", str(out), "--report", str(report)]) == 1
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr and "annotation" in stderr
    (task,) = json.loads(out.read_text())
    assert [r["id"] for p in task["predictions"] for r in p["result"]] == ["good"]
    orjson.dumps(json.loads(report.read_text()))  # the report was written and is valid


@pytest.mark.parametrize("raw_name, message", [
    (b'"clip\xff.mp4"', "not UTF-8"),
    (b'"clip\\udc80.mp4"', "surrogate"),
])
def test_rule_an_item_field_that_is_not_unicode_fails_the_item_in_one_line(tmp_path, raw_name, message):
    path = tmp_path / "export.json"
    bad = json.dumps(video_item([], item_id="bad")).encode().replace(b'"clip.mp4"', raw_name)
    path.write_bytes(b"[" + json.dumps(video_item([], item_id="a")).encode() + b"," + bad + b","
                     + json.dumps(video_item([], item_id="c")).encode() + b"]")
    items, errors = items_and_errors(path)
    assert [e.item.id for e in items] == ["a", "c"]
    (err,) = errors
    assert err.origin.endswith("[1]")
    assert message in err.error.reason and one_line(err.error)
    orjson.dumps(str(err.error))


def test_rule_a_file_name_that_is_not_utf8_is_shown_escaped_and_reported(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    name = os.fsdecode(b"bad\xff.json")
    (src / name).write_bytes(b"not json")
    (src / "good.json").write_text(json.dumps(video_item([box_annotation(end=3)])))
    out, report = tmp_path / "tasks.json", tmp_path / "report.json"
    assert main(["convert", str(src), "-o", str(out), "--report", str(report)]) == 1
    assert "Traceback" not in capsys.readouterr().err
    problems = json.loads(report.read_text())["problems"]
    assert any("bad\\udcff.json" in p["file"] for p in problems)


# ----------------------------------------------------------------------------- identity without an id


def bare_list() -> str:
    return json.dumps([box_annotation("a1", end=3)])


def test_rule_items_without_id_are_named_by_their_path_under_the_source(tmp_path, monkeypatch):
    src = tmp_path / "export"
    (src / "json" / "a" / "b").mkdir(parents=True)
    (src / "json" / "a" / "b" / "clip.mp4.json").write_text(bare_list())  # V2 naming
    (src / "json" / "a" / "clip.json").write_text(bare_list())  # V1 naming
    anon = {k: v for k, v in video_item([]).items() if k not in ("id", "filename", "name")}
    (src / "json" / "a" / "anon.mp4.json").write_text(json.dumps(anon))  # an item JSON with neither
    (src / "json" / "a" / "known.json").write_text(json.dumps(video_item([], item_id="known")))
    expected = {"/a/b/clip.mp4": "clip.mp4", "/a/clip": "clip", "/a/anon.mp4": "anon.mp4"}

    def names(source):
        return {e.item.filename: e.item.name for e in iter_items(source) if e.item.id is None}

    assert names(src) == expected
    assert names(src / "json") == expected  # the export root or its json/ folder: the same names
    monkeypatch.chdir(tmp_path)
    assert names("export") == expected  # wherever it runs from
    known = next(e for e in iter_items(src) if e.item.id == "known")
    assert known.item.filename == "/clip.mp4"  # an item's own names are kept
    for entry in iter_items(src):
        assert load_item(entry.locator, entry.origin).filename == entry.item.filename


def test_rule_a_single_file_or_zip_entry_without_id_is_named_after_itself(tmp_path):
    (tmp_path / "clip.mp4.json").write_text(bare_list())
    (entry,) = iter_items(tmp_path / "clip.mp4.json")
    assert (entry.item.filename, entry.item.name) == ("/clip.mp4", "clip.mp4")
    write_zip(tmp_path / "export.zip", {"json/a/b/clip.mp4.json": bare_list().encode()})
    (entry,) = iter_items(tmp_path / "export.zip")
    assert entry.item.filename == "/a/b/clip.mp4"
    assert load_item(entry.locator, entry.origin).filename == "/a/b/clip.mp4"
    anon = {k: v for k, v in video_item([]).items() if k not in ("id", "filename")}
    (tmp_path / "items.json").write_text(json.dumps([video_item([], item_id="x"), anon]))
    first, second = iter_items(tmp_path / "items.json")
    assert first.item.filename == "/clip.mp4" and second.item.filename == "/items[1]"
    assert load_item(second.locator, second.origin).filename == "/items[1]"


def test_rule_pushing_the_same_folder_twice_gives_the_same_task_identity(tmp_path, capsys):
    src = tmp_path / "export"
    (src / "json" / "cam").mkdir(parents=True)
    (src / "json" / "cam" / "clip.mp4.json").write_text(bare_list())
    tasks = []
    for n in range(2):
        out = tmp_path / f"tasks{n}.json"
        assert main(["convert", str(src), "-o", str(out), "--fps", "25", "--width", "100", "--height", "100"]) == 0
        tasks.append(json.loads(out.read_text())[0]["data"])
    assert tasks[0] == tasks[1] and tasks[0]["dataloop_filename"] == "/cam/clip.mp4"


def test_rule_a_fifo_or_a_symlink_loop_in_a_folder_is_named_not_skipped_nor_waited_on(tmp_path):
    os.mkfifo(tmp_path / "fifo.json")  # opening it the ordinary way would wait for a writer for ever
    os.symlink("loop.json", tmp_path / "loop.json")
    os.symlink("nowhere.json", tmp_path / "dangling.json")
    (tmp_path / "good.json").write_text(json.dumps(video_item([])))
    items, errors = items_and_errors(tmp_path)
    assert [e.item.id for e in items] == ["item1"]
    reasons = {os.path.basename(e.origin): e.error.reason for e in errors}
    assert reasons["fifo.json"] == "not read: a FIFO, not a file"
    assert "symbolic links" in reasons["loop.json"] and "No such file" in reasons["dangling.json"]
    for name in ("fifo.json", "loop.json"):
        (entry,) = iter_items(tmp_path / name)
        assert entry.error is not None and one_line(entry.error)
