"""Media that plays, read in a real browser: a task whose video comes through the backend's signed
`/media/<item id>` (streamed from the Dataloop stand-in, ranges passed through), and a task whose
video `dl2ls fetch --media` copied and `push --media-root` points at Label Studio's local files.
In each, the editor seeks and the frame on screen (its burnt-in index) is the frame asked for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dataloop_standin import DataloopStandIn
from dl2ls.cli import main
from dl2ls.demo import render_video
from service_harness import ServiceProcess
from test_browser import ARGS, CHROMIUM, READ_FRAME, READY, login, require_chromium, sample_with_gap_and_hold

SECRET = "media-secret-for-tests"


@pytest.fixture
def chromium():
    require_chromium()


@pytest.fixture
def dataloop_with_video(tmp_path, monkeypatch):
    """The stand-in holding the sample item and its rendered video (as Dataloop's stream)."""
    item = sample_with_gap_and_hold()
    source = tmp_path / "clip.json"
    source.write_text(json.dumps(item))
    video = tmp_path / "clip.webm"
    frames, _ = render_video(source, video)
    item["metadata"]["system"]["size"] = video.stat().st_size  # what Dataloop says of its binary
    standin = DataloopStandIn().start()
    standin.put_item("ds1", item)
    standin.media[item["id"]] = video.read_bytes()
    monkeypatch.setenv("DATALOOP_API_URL", standin.url)
    monkeypatch.setenv("DATALOOP_API_KEY", standin.api_key)
    yield standin, item, frames
    standin.stop()


def frames_on_screen(url: str, project_id: int, task_id: int, frames: list[int]) -> dict[int, int]:
    """Open the task in the editor and read the burnt-in index at each frame (1-based)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            login(page, url)
            page.goto(f"{url}/projects/{project_id}/data?task={task_id}")
            page.wait_for_function(READY, arg=1, timeout=90_000)
            return {frame: page.evaluate(READ_FRAME, frame)["shown"] + 1 for frame in frames}
        finally:
            browser.close()


def pushed_task(ls, report: Path) -> tuple[int, int, str]:
    project_id = json.loads(report.read_text())["push"]["project"]
    task = next(iter(ls.tasks.list(project=project_id, fields="all")))
    return project_id, task.id, task.data["video"]


def test_video_through_the_media_proxy_plays(chromium, label_studio, ls_env, dataloop_with_video, tmp_path,
                                             monkeypatch):
    standin, item, frames = dataloop_with_video
    service = ServiceProcess(standin.url, standin.api_key, label_studio[0], tmp_path / "model",
                             env={"DL2LS_MEDIA_SECRET": SECRET}).start()
    try:
        monkeypatch.setenv("DL2LS_PUBLIC_URL", service.url)
        monkeypatch.setenv("DL2LS_MEDIA_SECRET", SECRET)
        export = tmp_path / "export"
        assert main(["-q", "fetch", "--dataset", "ds1", "-o", str(export)]) == 0
        report = tmp_path / "push.json"
        assert main(["-q", "push", str(export), "--new-project", "media proxy", "--report", str(report)]) == 0
        project_id, task_id, media = pushed_task(ls_env, report)
        assert media.startswith(f"{service.url}/media/{item['id']}?sig=")
        seen = frames_on_screen(label_studio[0], project_id, task_id, [1, 40, 21, frames])
        assert seen == {f: f for f in seen}
        assert SECRET not in service.log() and standin.api_key not in service.log()
    finally:
        service.stop()


def test_video_fetched_and_served_as_local_files_plays(chromium, label_studio, ls_env, ls_media_root,
                                                       dataloop_with_video, tmp_path, monkeypatch):
    standin, item, frames = dataloop_with_video
    for key in ("DL2LS_PUBLIC_URL", "DL2LS_MEDIA_SECRET"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("LOCAL_FILES_DOCUMENT_ROOT", str(ls_media_root))
    export = ls_media_root / "fetched"
    assert main(["-q", "fetch", "--dataset", "ds1", "--media", "-o", str(export)]) == 0
    report = tmp_path / "push.json"
    assert main(["-q", "push", str(export), "--new-project", "media local", "--report", str(report),
                 "--media-root", str(export / "items"), "--create-storage"]) == 0
    project_id, task_id, media = pushed_task(ls_env, report)
    assert media.startswith("/data/local-files/?d=fetched/items/")
    seen = frames_on_screen(label_studio[0], project_id, task_id, [1, 40, 21, frames])
    assert seen == {f: f for f in seen}
