"""The command line behaves: output files, quiet and verbose runs, one kind of media per project,
verify accounting for every annotation, and no secret or forged line in any output."""

from __future__ import annotations

import json
import logging
import os
import stat

import pytest

from conftest import box_annotation, image_item, video_item
from dl2ls.cli import main


@pytest.fixture
def item_file(tmp_path):
    path = tmp_path / "item.json"
    path.write_text(json.dumps(video_item([box_annotation(end=3)])))
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_a_convert_that_converted_nothing_keeps_the_earlier_output(item_file, tmp_path, capsys):
    out = tmp_path / "tasks.json"
    assert run(capsys, "convert", item_file, "-o", out)[0] == 0
    good = out.read_bytes()
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    code, _, err = run(capsys, "convert", broken, "-o", out)
    assert code == 2 and out.read_bytes() == good and "left as it was" in err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tasks.json.")]  # no temp file left


def test_output_files_follow_the_umask_and_links_are_written_through(item_file, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        out = tmp_path / "tasks.json"
        run(capsys, "convert", item_file, "-o", out)
        assert stat.S_IMODE(out.stat().st_mode) == 0o644
        real, link = tmp_path / "real.json", tmp_path / "link.json"
        real.write_text("[]")
        link.symlink_to(real)
        run(capsys, "convert", item_file, "-o", link)
        assert link.is_symlink() and json.loads(real.read_text())[0]["data"]["dataloop_item_id"] == "item1"
    finally:
        os.umask(old)


def test_a_fifo_output_is_written_to_not_replaced(item_file, tmp_path, capsys):
    import threading

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()))
    reader.start()
    run(capsys, "convert", item_file, "-o", fifo)
    reader.join(10)
    assert stat.S_ISFIFO(fifo.stat().st_mode) and json.loads(got[0])[0]["data"]["dataloop_item_id"] == "item1"


def test_quiet_works_after_the_command_and_drops_the_summary(item_file, tmp_path, capsys):
    code, _, err = run(capsys, "convert", item_file, "-o", tmp_path / "t.json", "-q")
    assert code == 0 and err == ""
    code, _, err = run(capsys, "convert", item_file, "-o", tmp_path / "t.json")
    assert "items: 1 converted" in err


@pytest.mark.parametrize("command", [["convert", "-o", "{tmp}/t.json"], ["label-config"],
                                     ["push", "--new-project", "x", "--dry-run"]])
def test_mixed_videos_and_images_are_refused_alike_and_kind_picks_one(command, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://127.0.0.1:9")  # a dry run talks to no server...
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "x")
    monkeypatch.setattr("dl2ls.labelstudio.push.Pusher.projects_titled", lambda self, title: [])  # ...but this
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "v.json").write_text(json.dumps(video_item([box_annotation(end=3)])))
    (folder / "i.json").write_text(json.dumps(image_item([box_annotation("b")])))
    argv = [a.format(tmp=tmp_path) for a in command]
    code, _, err = run(capsys, *argv[:1], folder, *argv[1:])
    assert code == 2 and "--kind video or --kind image" in err
    code, _, err = run(capsys, *argv[:1], folder, *argv[1:], "--kind", "video")
    assert code == 0, err


def test_verify_counts_an_annotation_that_failed_to_convert_as_a_difference(tmp_path, capsys):
    bad = box_annotation("bad", end=3)
    bad["coordinates"] = [{"x": "left"}]
    src = tmp_path / "item.json"
    src.write_text(json.dumps(video_item([box_annotation("good", end=3), bad])))
    tasks, report = tmp_path / "tasks.json", tmp_path / "report.json"
    assert run(capsys, "convert", src, "-o", tasks, "--report", report)[0] == 1
    code, out, err = run(capsys, "verify", src, tasks)
    assert code == 1 and "annotation bad (box): not converted" in err and "1 differences" in out
    code, out, _ = run(capsys, "verify", src, tasks, "--report", report)  # the report accounts for it
    assert code == 0 and "1 skipped or failed" in out


@pytest.mark.parametrize("url, message", [
    ("localhost:8080", "must start with http:// or https://"),
    ("http://user:secret-pass@localhost:8080", "must not carry user:password@"),
    ("http://[::1", "not a URL"),
])
def test_a_bad_label_studio_url_is_one_line_that_says_what_is_wrong(url, message, item_file, capsys, monkeypatch):
    monkeypatch.setenv("LABEL_STUDIO_URL", url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "x")
    code, _, err = run(capsys, "push", item_file, "--project", "1")
    assert code == 2 and message in err and "secret-pass" not in err and len(err.strip().splitlines()) == 1


def test_secrets_never_reach_the_log_at_any_verbosity(monkeypatch):
    from dl2ls.cli import redact_secrets

    monkeypatch.setenv("DATALOOP_API_KEY", "eyJsecret.token.value")
    record = logging.LogRecord("httpx", logging.DEBUG, "", 0, "GET %s with %s", (
        "http://ls:hunter22@host/api", "eyJsecret.token.value"), None)
    redact_secrets(record)
    assert record.getMessage() == "GET http://***@host/api with ***"


def test_a_file_name_cannot_forge_a_report_line(tmp_path, capsys):
    evil = tmp_path / "x\nitem-failed: forged \x1b[31mred.json"
    evil.write_text("{broken")
    code, _, err = run(capsys, "convert", evil, "-o", tmp_path / "t.json")
    assert "\x1b" not in err and not any(line.startswith("item-failed: forged") for line in err.splitlines())
    assert "\\nitem-failed: forged \\x1b[31mred.json" in err
