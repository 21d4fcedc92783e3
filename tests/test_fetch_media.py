"""Media that plays, from the command line: `fetch --media` copies each item's binary into
items/ (resumable, atomic, names that cannot escape), `push --media-root` points tasks at Label
Studio's local files, and push and sync choose the backend's signed /media URLs when
DL2LS_PUBLIC_URL and DL2LS_MEDIA_SECRET are set, else say in one line that the editor cannot load
Dataloop's stream URL; --media-url templates for cloud buckets are checked against the project's
storages."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import SAMPLES
from dataloop_standin import DataloopStandIn
from dl2ls.cli import main
from dl2ls.dataloop import api
from dl2ls.dataloop.api import DataloopClient
from dl2ls.media import MediaProxy

TRACKER = json.loads((SAMPLES / "video_tracker_webm_2024.json").read_text())
STREAM = "/api/v1/items/<item_id>/stream"
SECRET = "media-secret-for-tests"


def media_item(i: int, folder: str = "/cam1", size: bool = True) -> dict:
    item = json.loads(json.dumps(TRACKER))
    item["id"] = f"{i:024x}"
    item["dir"] = folder
    item["name"] = f"clip{i}.webm"
    item["filename"] = f"{folder.rstrip('/')}/{item['name']}"
    item["stream"] = f"https://gate.dataloop.ai/api/v1/items/{item['id']}/stream"
    for k, ann in enumerate(item["annotations"]):
        ann["id"] = f"{i:020x}{k:04x}"
        ann["itemId"] = item["id"]
    if not size:
        del item["metadata"]["system"]["size"]
    return item


def blob(i: int, n: int = 300_000) -> bytes:
    return bytes((i * 7 + k) % 251 for k in range(256)) * (n // 256) + bytes([i % 256]) * (n % 256 + i)


def put(standin: DataloopStandIn, item: dict, data: bytes | None) -> None:
    if data is not None and "size" in item["metadata"]["system"]:
        item["metadata"]["system"]["size"] = len(data)
    standin.put_item("ds1", item)
    if data is not None:
        standin.media[item["id"]] = data


@pytest.fixture
def standin(monkeypatch):
    server = DataloopStandIn().start()
    server.export_polls = 0
    monkeypatch.setenv("DATALOOP_API_URL", server.url)
    monkeypatch.setenv("DATALOOP_API_KEY", server.api_key)
    for key in ("DATALOOP_USERNAME", "DATALOOP_PASSWORD", "DL2LS_PUBLIC_URL", "DL2LS_MEDIA_SECRET",
                "LOCAL_FILES_DOCUMENT_ROOT", "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(api, "POLL_SCHEDULE", (0.01,))
    yield server
    server.stop()


def media_requests(standin: DataloopStandIn, method: str) -> int:
    """GET /items/{id}/stream requests for media (an export's own download is one more)."""
    return standin.requests[STREAM] - (standin.requests["/api/v1/datasets/<dataset_id>/export"]
                                       if method == "export" else 0)


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(".")]


# ----------------------------------------------------------------------------- fetch --media


@pytest.mark.parametrize("method", ["export", "query"])
def test_fetch_media_mirrors_the_remote_folders_and_a_rerun_downloads_nothing(standin, tmp_path, capsys, method):
    for i in range(6):
        put(standin, media_item(i, "/cam1" if i % 2 else "/cam2/day one"), blob(i))
    out = tmp_path / "export"
    assert main(["fetch", "--dataset", "ds1", "-o", str(out), "--media", "--method", method]) == 0
    err = capsys.readouterr().err
    assert "6 downloaded" in err and "0 already complete" in err and standin.api_key not in err
    for i in range(6):
        folder = "cam1" if i % 2 else "cam2/day one"
        assert (out / "items" / folder / f"clip{i}.webm").read_bytes() == blob(i)
        assert (out / "json" / folder / f"clip{i}.webm.json").exists()
    assert not leftovers(out) and media_requests(standin, method) == 6

    before = media_requests(standin, method)
    assert main(["fetch", "--dataset", "ds1", "-o", str(out), "--media", "--method", method]) == 0
    assert "0 downloaded" in capsys.readouterr().err
    assert media_requests(standin, method) == before  # every file was complete: not one request


def test_a_rerun_downloads_a_file_whose_size_is_not_the_items_and_an_empty_one_without_size(standin, tmp_path,
                                                                                              capsys):
    put(standin, media_item(1), blob(1))
    put(standin, media_item(2, size=False), blob(2))
    put(standin, media_item(3, size=False), blob(3))
    out = tmp_path / "export"
    items = out / "items" / "cam1"
    items.mkdir(parents=True)
    (items / "clip1.webm").write_bytes(blob(1)[:-1])  # one byte short of metadata.system.size
    (items / "clip2.webm").write_bytes(b"")  # no size from Dataloop: empty is incomplete
    (items / "clip3.webm").write_bytes(b"kept")  # no size from Dataloop: there and not empty is complete
    assert main(["fetch", "--dataset", "ds1", "-o", str(out), "--media", "--method", "query"]) == 0
    err = capsys.readouterr().err
    assert "2 downloaded" in err and "1 already complete" in err
    assert (items / "clip1.webm").read_bytes() == blob(1)
    assert (items / "clip2.webm").read_bytes() == blob(2)
    assert (items / "clip3.webm").read_bytes() == b"kept"
    assert media_requests(standin, "query") == 2


def test_fetch_media_killed_halfway_resumes_without_downloading_complete_files_again(standin, tmp_path, capsys,
                                                                                       monkeypatch):
    total = 12
    for i in range(total):
        put(standin, media_item(i, f"/cam{i % 3}"), blob(i, 200_000 + 1000 * i))
    out = tmp_path / "export"
    original = DataloopClient.download_media
    finished = []

    def killed_after_four(self, item_id, path, *args, **kwargs):
        if len(finished) >= 4:
            raise KeyboardInterrupt  # Ctrl-C while the next file starts
        written = original(self, item_id, path, *args, **kwargs)
        finished.append(item_id)
        return written

    monkeypatch.setattr(DataloopClient, "download_media", killed_after_four)
    assert main(["fetch", "--dataset", "ds1", "-o", str(out), "--media", "--media-workers", "3"]) == 130
    assert "interrupted" in capsys.readouterr().err
    complete = sorted(p for p in (out / "items").rglob("*.webm"))
    assert len(complete) >= 4 and len(complete) < total
    assert not leftovers(out)  # no temporary file survives the interruption
    for path in complete:  # whatever is in place is whole
        i = int(path.stem[4:])
        assert path.read_bytes() == blob(i, 200_000 + 1000 * i)

    monkeypatch.setattr(DataloopClient, "download_media", original)
    before = media_requests(standin, "export")
    assert main(["fetch", "--dataset", "ds1", "-o", str(out), "--media"]) == 0
    err = capsys.readouterr().err
    assert f"{total - len(complete)} downloaded" in err and f"{len(complete)} already complete" in err
    assert media_requests(standin, "export") - before == total - len(complete)
    for i in range(total):
        assert (out / "items" / f"cam{i % 3}" / f"clip{i}.webm").read_bytes() == blob(i, 200_000 + 1000 * i)
    assert not leftovers(out)


def test_a_killed_run_s_temporary_file_is_cleared_and_never_taken_for_the_file(standin, tmp_path, capsys):
    put(standin, media_item(1), blob(1))
    out = tmp_path / "export"
    stale = out / "items" / "cam1" / ".clip1.webm.0123456789ab.dl2ls-part"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(blob(1)[:1000])  # what a SIGKILL mid-download leaves
    other = stale.with_name(".clip1.webm.b.0123456789ab.dl2ls-part")  # item clip1.webm.b's, under way
    other.write_bytes(b"not ours")
    assert main(["fetch", "--dataset", "ds1", "-o", str(out), "--media"]) == 0
    capsys.readouterr()
    assert (out / "items" / "cam1" / "clip1.webm").read_bytes() == blob(1)
    assert leftovers(out) == [other]


def test_media_names_cannot_escape_the_items_folder(standin, tmp_path, capsys):
    hostile = {
        1: ("/", "/../../../etc/evil.webm"),
        2: ("/..", "/../..\\..\\win.webm"),
        3: ("/", "/a\x1b[31m/b\nc:d?.webm"),
    }
    for i, (folder, filename) in hostile.items():
        item = media_item(i)
        item["dir"], item["filename"], item["name"] = folder, filename, filename.rsplit("/", 1)[-1]
        put(standin, item, blob(i))
    out = tmp_path / "sandbox" / "export"
    assert main(["fetch", "--dataset", "ds1", "-o", str(out), "--media"]) == 0
    capsys.readouterr()
    files = sorted(p.relative_to(out / "items").as_posix() for p in (out / "items").rglob("*") if p.is_file())
    assert files == ["a_[31m/b_c_d_.webm", "etc/evil.webm", "win.webm"]
    assert sorted(p.name for p in (tmp_path / "sandbox").iterdir()) == ["export"]
    assert (out / "items" / "etc" / "evil.webm").read_bytes() == blob(1)


def test_a_failed_item_is_one_line_and_the_rest_goes_on(standin, tmp_path, capsys):
    put(standin, media_item(1), blob(1))
    put(standin, media_item(2), None)  # Dataloop has no binary for it: 404
    out = tmp_path / "export"
    assert main(["fetch", "--dataset", "ds1", "-o", str(out), "--media"]) == 1
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("dl2ls fetch: media of")]
    assert f"item {media_item(2)['id']}'s media: 404" in line and "1 downloaded" in err and "1 failed" in err
    assert (out / "items" / "cam1" / "clip1.webm").read_bytes() == blob(1)
    assert not (out / "items" / "cam1" / "clip2.webm").exists() and not leftovers(out)


def test_a_whole_download_whose_size_is_not_metadatas_is_kept_with_a_line(standin, tmp_path, capsys):
    item = media_item(3)
    put(standin, item, blob(3))
    item["metadata"]["system"]["size"] = len(blob(3)) + 5  # stale metadata: what comes is whole all the same
    standin.put_item("ds1", item)
    out = tmp_path / "export"
    assert main(["fetch", "--dataset", "ds1", "-o", str(out), "--media"]) == 0
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert f"{len(blob(3))} bytes where Dataloop's metadata.system.size says {len(blob(3)) + 5}: kept" in line
    assert (out / "items" / "cam1" / "clip3.webm").read_bytes() == blob(3)


def test_a_download_cut_off_is_started_again_then_given_up_in_one_line(standin, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(DataloopClient.__init__, "__defaults__", (None, None, None, None, 60.0, 300.0, (0.01,), 0.001))
    put(standin, media_item(1), blob(1))
    standin.break_stream_after = 100_000
    out = tmp_path / "export"
    assert main(["fetch", "--dataset", "ds1", "-o", str(out), "--media"]) == 1
    err = capsys.readouterr().err
    assert f"item {media_item(1)['id']}'s media: cut off {api.DOWNLOAD_ATTEMPTS} times" in err
    assert not (out / "items" / "cam1" / "clip1.webm").exists() and not leftovers(out)
    standin.break_stream_after = None
    assert main(["fetch", "--dataset", "ds1", "-o", str(out), "--media"]) == 0
    capsys.readouterr()
    assert (out / "items" / "cam1" / "clip1.webm").read_bytes() == blob(1)


def test_download_memory_is_flat_whatever_the_file_size(standin, tmp_path):
    """Peak memory (this process: the client and the stand-in serving it) for an 8 MB and a 64 MB
    download is the same, a few chunks: the body is never held whole."""
    import tracemalloc

    client = DataloopClient()
    item_id = media_item(1)["id"]
    put(standin, media_item(1), b"warm-up")
    client.download_media(item_id, tmp_path / "warm.webm")
    peaks = {}
    for mb in (8, 64):
        standin.media[item_id] = data = os.urandom(mb << 20)
        tracemalloc.start()
        try:
            client.download_media(item_id, tmp_path / f"{mb}.webm")
            peaks[mb] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert (tmp_path / f"{mb}.webm").stat().st_size == len(data)
    assert peaks[64] < 16 << 20 and peaks[64] < peaks[8] + (2 << 20), peaks


# ----------------------------------------------------------------------------- push --media-root


def test_push_media_root_refusals_are_one_line(standin, tmp_path, capsys, monkeypatch):
    src = tmp_path / "i.json"
    src.write_text(json.dumps(media_item(1)))
    items = tmp_path / "root" / "export" / "items"
    items.mkdir(parents=True)
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "x" * 40)

    def refused(*extra: str) -> str:
        assert main(["push", str(src), "--project", "1", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    assert "needs LOCAL_FILES_DOCUMENT_ROOT" in refused("--media-root", str(items))
    monkeypatch.setenv("LOCAL_FILES_DOCUMENT_ROOT", str(tmp_path / "elsewhere"))
    assert "is not under LOCAL_FILES_DOCUMENT_ROOT" in refused("--media-root", str(items))
    monkeypatch.setenv("LOCAL_FILES_DOCUMENT_ROOT", str(items))
    assert "is LOCAL_FILES_DOCUMENT_ROOT itself" in refused("--media-root", str(items))
    monkeypatch.setenv("LOCAL_FILES_DOCUMENT_ROOT", str(tmp_path / "root"))
    assert "no such folder" in refused("--media-root", str(tmp_path / "root" / "nothing"))
    assert "give one" in refused("--media-root", str(items), "--media-url", "s3://b/{filename}")
    assert "--create-storage goes with --media-root" in refused("--create-storage")


def test_push_media_root_points_tasks_at_local_files_and_creates_the_storage_once(standin, ls_env, ls_media_root,
                                                                                 tmp_path, capsys, monkeypatch):
    for i in range(3):
        put(standin, media_item(i, "/cam 1" if i else "/cam2"), blob(i))
    export = ls_media_root / f"fetched-{uuid.uuid4().hex[:8]}"
    assert main(["-q", "fetch", "--dataset", "ds1", "--media", "-o", str(export)]) == 0
    (export / "items" / "cam2" / "clip0.webm").unlink()  # one item's file is missing
    monkeypatch.setenv("LOCAL_FILES_DOCUMENT_ROOT", str(ls_media_root))
    capsys.readouterr()
    report = tmp_path / "push.json"
    title = f"local media {uuid.uuid4().hex[:8]}"
    args = ["push", str(export / "json"), "--new-project", title, "--report", str(report),
            "--media-root", str(export), "--create-storage"]
    assert main(args) == 0
    err = capsys.readouterr().err
    missing = [line for line in err.splitlines() if "has no file at" in line]
    assert len(missing) == 1 and media_item(0)["id"] in missing[0]
    assert "Dataloop's stream URL" not in err  # the media is not Dataloop's gateway
    project_id = json.loads(report.read_text())["push"]["project"]
    tasks = {t.data["dataloop_item_id"]: t.data["video"] for t in ls_env.tasks.list(project=project_id, fields="all")}
    rel = export.name
    assert tasks == {media_item(0)["id"]: f"/data/local-files/?d={rel}/items/cam2/clip0.webm",
                     media_item(1)["id"]: f"/data/local-files/?d={rel}/items/cam%201/clip1.webm",
                     media_item(2)["id"]: f"/data/local-files/?d={rel}/items/cam%201/clip2.webm"}
    storages = ls_env.import_storage.local.list(project=project_id)
    assert [(s.path, s.recursive_scan, s.use_blob_urls) for s in storages] == [(str(export / "items"), True, True)]
    assert ls_env.projects.get(project_id).task_number == 3  # the storage was not synced: no task twice

    # Label Studio serves the file at that URL to the project's users
    import requests

    session = requests.Session()
    base = os.environ["LABEL_STUDIO_URL"]
    session.get(f"{base}/user/login/")
    session.post(f"{base}/user/login/", data={"email": "admin@example.com", "password": "dl2ls-local-password",
                                              "csrfmiddlewaretoken": session.cookies.get("csrftoken")},
                 headers={"Referer": f"{base}/user/login/"})
    served = session.get(base + tasks[media_item(1)["id"]])
    assert served.status_code == 200 and served.content == blob(1)

    # a second run (the missing file now there) creates no second storage and changes no task's media
    (export / "items" / "cam2" / "clip0.webm").write_bytes(blob(0))
    assert main(["-q", "push", str(export / "json"), "--project", str(project_id), "--media-root",
                 str(export / "items"), "--create-storage"]) == 0
    assert "has no file" not in capsys.readouterr().err
    assert len(ls_env.import_storage.local.list(project=project_id)) == 1


def test_push_media_root_without_a_storage_says_so_in_one_line(standin, ls_env, ls_media_root, tmp_path, capsys,
                                                                monkeypatch):
    put(standin, media_item(1), blob(1))
    export = ls_media_root / f"fetched-{uuid.uuid4().hex[:8]}"
    assert main(["-q", "fetch", "--dataset", "ds1", "--media", "-o", str(export)]) == 0
    monkeypatch.setenv("LOCAL_FILES_DOCUMENT_ROOT", str(ls_media_root))
    capsys.readouterr()
    assert main(["push", str(export), "--new-project", f"no storage {uuid.uuid4().hex[:8]}", "--media-root",
                 str(export)]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(lines) == 1 and "has no local files storage" in lines[0] and "--create-storage" in lines[0]


# ----------------------------------------------------------------------------- the URL policy


def pushed_media(ls, report: Path) -> dict[str, str]:
    project_id = json.loads(report.read_text())["push"]["project"]
    return {t.data["dataloop_item_id"]: t.data["video"] for t in ls.tasks.list(project=project_id, fields="all")}


def gateway_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "Dataloop's stream URL" in line]


def test_push_with_public_url_and_secret_writes_signed_media_urls(standin, ls_env, tmp_path, capsys, monkeypatch):
    for i in range(2):
        put(standin, media_item(i), blob(i))
    export = tmp_path / "export"
    assert main(["-q", "fetch", "--dataset", "ds1", "-o", str(export)]) == 0
    monkeypatch.setenv("DL2LS_PUBLIC_URL", "https://dl2ls.example.com/")
    monkeypatch.setenv("DL2LS_MEDIA_SECRET", SECRET)
    capsys.readouterr()
    report = tmp_path / "push.json"
    assert main(["push", str(export), "--new-project", f"proxy {uuid.uuid4().hex[:8]}", "--report", str(report)]) == 0
    err = capsys.readouterr().err
    assert not gateway_lines(err) and SECRET not in err
    proxy = MediaProxy("https://dl2ls.example.com/", SECRET)
    assert pushed_media(ls_env, report) == {media_item(i)["id"]: proxy.url(media_item(i)["id"]) for i in range(2)}
    assert all(url.startswith("https://dl2ls.example.com/media/") and "?sig=" in url
               for url in pushed_media(ls_env, report).values())


def test_push_without_a_way_to_the_media_warns_in_one_line_with_the_fix(standin, ls_env, tmp_path, capsys,
                                                                          monkeypatch):
    for i in range(3):
        put(standin, media_item(i), blob(i))
    export = tmp_path / "export"
    assert main(["-q", "fetch", "--dataset", "ds1", "-o", str(export)]) == 0
    monkeypatch.setenv("DL2LS_PUBLIC_URL", "https://dl2ls.example.com")  # without the secret: no proxy
    capsys.readouterr()
    report = tmp_path / "push.json"
    assert main(["-q", "push", str(export), "--new-project", f"gateway {uuid.uuid4().hex[:8]}", "--report",
                 str(report)]) == 0
    (line,) = gateway_lines(capsys.readouterr().err)
    for fix in ("DL2LS_PUBLIC_URL and DL2LS_MEDIA_SECRET", "fetch --media", "--media-root", "--media-url",
                "DL2LS_MEDIA_SECRET is not"):
        assert fix in line
    assert pushed_media(ls_env, report) == {media_item(i)["id"]: media_item(i)["stream"] for i in range(3)}


def test_sync_follows_the_same_policy(standin, ls_env, tmp_path, capsys, monkeypatch):
    put(standin, media_item(1), blob(1))
    project = ls_env.projects.create(title=f"sync media {uuid.uuid4().hex[:8]}",
                                     label_config=(Path(__file__).parent.parent / "label_config.xml").read_text())

    def sync(state: str) -> str:
        assert main(["sync", "--dataset", "ds1", "--project", str(project.id), "--once",
                     "--state", str(tmp_path / state)]) == 0
        return capsys.readouterr().err

    assert len(gateway_lines(sync("a.sqlite"))) == 1
    (task,) = ls_env.tasks.list(project=project.id, fields="all")
    assert task.data["video"].endswith(f"/items/{media_item(1)['id']}/stream")

    put(standin, media_item(2), blob(2))
    monkeypatch.setenv("DL2LS_PUBLIC_URL", "http://127.0.0.1:9090")
    monkeypatch.setenv("DL2LS_MEDIA_SECRET", SECRET)
    assert not gateway_lines(sync("a.sqlite"))
    media = {t.data["dataloop_item_id"]: t.data["video"] for t in ls_env.tasks.list(project=project.id, fields="all")}
    assert media[media_item(2)["id"]] == MediaProxy("http://127.0.0.1:9090", SECRET).url(media_item(2)["id"])
    assert media[media_item(1)["id"]] == task.data["video"]  # an existing task's media is never changed


def test_a_public_url_that_is_not_a_url_is_one_line(standin, tmp_path, capsys, monkeypatch):
    src = tmp_path / "i.json"
    src.write_text(json.dumps(media_item(1)))
    monkeypatch.setenv("DL2LS_MEDIA_SECRET", SECRET)
    for bad, message in (("dl2ls.example.com", "http(s) URL"), ("https://u:p@dl2ls.example.com", "user:password")):
        monkeypatch.setenv("DL2LS_PUBLIC_URL", bad)
        assert main(["push", str(src), "--new-project", "x", "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert message in err and SECRET not in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- --media-url and cloud storages


def storage_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "import storage" in line]


@pytest.mark.parametrize("template, kind, field", [
    ("s3://media-bucket/videos{filename}", "s3", "bucket"),
    ("gs://media-bucket{filename}", "gcs", "bucket"),
    ("azure-blob://media-bucket/v{filename}", "azure", "container"),
])
def test_a_cloud_template_is_checked_against_the_projects_storages(standin, ls_env, tmp_path, capsys, monkeypatch,
                                                                   template, kind, field):
    from dl2ls.labelstudio import push

    put(standin, media_item(1), blob(1))
    export = tmp_path / "export"
    assert main(["-q", "fetch", "--dataset", "ds1", "-o", str(export)]) == 0
    capsys.readouterr()
    report = tmp_path / "push.json"
    # the project has no storage: one line, and the push goes on (the storage may come later)
    assert main(["-q", "push", str(export), "--new-project", f"cloud {uuid.uuid4().hex[:8]}", "--media-url", template,
                 "--report", str(report)]) == 0
    err = capsys.readouterr().err
    (line,) = storage_lines(err)
    assert template.split(":")[0] + "://" in line and "media-bucket" in line and not gateway_lines(err)
    project_id = json.loads(report.read_text())["push"]["project"]
    assert list(pushed_media(ls_env, report).values()) == [template.replace("{filename}", "/cam1/clip1.webm")]

    # with a storage of that kind and bucket (listed as the SDK gives it), nothing to say; another bucket: a line
    asked = []

    def storages(self, project, which):
        asked.append((project, which))
        return [SimpleNamespace(id=1, **{field: bucket})]

    for bucket, lines in (("media-bucket", 0), ("other-bucket", 1)):
        monkeypatch.setattr(push.Pusher, "import_storages", storages)
        assert main(["-q", "push", str(export), "--project", str(project_id), "--media-url", template]) == 0
        assert len(storage_lines(capsys.readouterr().err)) == lines
    assert asked == [(project_id, kind)] * 2  # once per run


def test_a_template_that_is_not_a_cloud_uri_is_not_checked(standin, tmp_path, capsys, monkeypatch):
    from dl2ls.labelstudio import push

    src = tmp_path / "i.json"
    src.write_text(json.dumps(media_item(1)))
    monkeypatch.setattr(push.Pusher, "import_storages", lambda *a: pytest.fail("listed storages"))
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "x" * 40)
    assert main(["push", str(src), "--new-project", "x", "--dry-run", "--media-url",
                 "https://cdn.example.com{filename}"]) == 0
    err = capsys.readouterr().err
    assert not storage_lines(err) and not gateway_lines(err)


@pytest.mark.parametrize("item_dir, filename, name, item_id", [
    (None, "//home/u/.bashrc", None, "i1"),        # a leading "//" is not an absolute part to keep
    ("//tmp", None, "x.webm", "i2"),
    (None, "/a/../../b.webm", None, "i3"),
    (None, "..", None, "../../escape"),             # nothing usable: the id, made harmless
    (None, "/", None, "..\\..\\win"),
    (None, "\\\\server\\share\\c.webm", None, "i4"),
])
def test_no_name_leaves_the_items_folder(tmp_path, item_dir, filename, name, item_id):
    from dl2ls.dataloop.write import item_path, media_path

    root = tmp_path / "export" / "items"
    for path in (media_path(root, item_dir, filename, name, item_id),
                 item_path(tmp_path / "export", item_dir, filename, name, item_id)):
        assert path.resolve().is_relative_to((tmp_path / "export").resolve()), path
