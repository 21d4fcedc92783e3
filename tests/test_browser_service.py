"""The service's predictions in Label Studio's labeling stream, read in a real browser (Debian's
chromium, driven by Playwright, as test_browser.py does).

The service (`dl2ls serve` without --source, against the Dataloop stand-in) is connected to a
project as Settings > Model > Connect Model does; connecting makes the project's model_version the
backend's title ("dl2ls"). A task imported with only its media path gets its item's prediction
from the service's pre-annotation job (TASKS_CREATED webhook, written through the SDK). Opening
the stream ("Label All Tasks"), Label Studio asks the backend's /setup which version to show, the
service answers the version it writes ("dataloop"), and Label Studio shows the prediction of that
version instead of calling /predict (`tasks/models.py::get_predictions_for_prelabeling`,
`ml/models.py::predict_tasks`).

The Settings > Model page and the backend's form (its Extra params) are saved as screenshots under
test-artifacts/; with DL2LS_WRITE_DOCS=1 the form is also copied to docs/connect-model.png."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from conftest import SAMPLES
from dataloop_standin import DataloopStandIn
from dl2ls.demo import render_video
from service_harness import CONFIG, ServiceProcess, connect, wait_for
from test_browser import ARGS, ARTIFACTS, CHROMIUM, login, require_chromium

DOCS = Path(__file__).resolve().parent.parent / "docs"
PARAMS = {"dataset": "ds1"}

STREAM_READY = """() => { const as = window.Htx?.annotationStore; const v = as?.selected?.names.get('video');
                          return !!(v && v.ref.current && v.length > 1 && as.predictions.length >= 1); }"""
STREAM_SHOWS = """() => { const as = window.Htx.annotationStore;
  return as.predictions.map(p => ({pk: p.pk, version: p.createdBy,
                                   regions: p.regions.map(r => r.cleanId).sort()})); }"""


def item_for(media_path: str) -> dict:
    """The tracker sample as one item of dataset ds1 whose remote path ends like `media_path`."""
    item = json.loads((SAMPLES / "video_tracker_webm_2024.json").read_text())
    item["id"] = "6653532837839ef78d33a001"
    item["dir"], item["name"] = "/cam2", Path(media_path).name
    item["filename"] = f"/cam2/{item['name']}"
    for k, ann in enumerate(item["annotations"]):
        ann["id"], ann["itemId"] = f"6653532837839ef78d33b{k:03d}", item["id"]
    return item


def test_the_labeling_stream_shows_the_predictions_the_service_wrote(label_studio, ls_env, ls_media_root,
                                                                     tmp_path):
    require_chromium()
    from playwright.sync_api import sync_playwright

    url, _ = label_studio
    ls = ls_env
    relative = "service-stream/cam2/clip0.webm"
    item = item_for(relative)
    source = tmp_path / "item.json"
    source.write_text(json.dumps(item))
    video = ls_media_root / relative
    render_video(source, video)

    standin = DataloopStandIn().start()
    standin.put_item("ds1", item)
    service = ServiceProcess(standin.url, standin.api_key, url, tmp_path / "model")
    try:
        service.start()

        def waited(check, seconds, what):
            try:
                return wait_for(check, seconds, what=what)
            except AssertionError as err:
                raise AssertionError(f"{err}; the service's log ends:\n{service.log()[-3000:]}") from None

        project = ls.projects.create(title="dl2ls service stream", label_config=CONFIG)
        ls.import_storage.local.create(project=project.id, path=str(video.parent), title="videos",
                                       use_blob_urls=True)
        # the Extra params as Label Studio's own form stores them: the JSON text of an object
        connect(ls, project.id, service, json.dumps(PARAMS))
        assert ls.projects.get(id=project.id).model_version == "dl2ls"  # the backend's title
        waited(lambda: re.search(rf"job \d+ connect project {project.id}\b[^\n]*: webhook", service.log()), 30,
               "the service's connect job")

        ls.projects.import_tasks(id=project.id, request=[{"video": f"/data/local-files/?d={relative}"}])
        task_id = next(iter(ls.tasks.list(project=project.id, include="id"))).id
        written = waited(lambda: ls.predictions.list(task=task_id), 30, "the service's prediction")
        assert [(w.model_version, sorted(r["id"] for r in w.result)) for w in written] == \
            [("dataloop", sorted(a["id"] for a in item["annotations"]))]
        setups_before = service.log().count("POST /setup")

        ARTIFACTS.mkdir(exist_ok=True)
        with sync_playwright() as p:
            try:
                browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
            except Exception as err:  # a missing library, a sandbox problem: say so, don't skip
                pytest.fail(f"Chromium at {CHROMIUM} did not start: {str(err).splitlines()[0]}")
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            try:
                login(page, url)
                # the stream, as "Label All Tasks" opens it: the next task comes with its predictions
                with page.expect_response(lambda r: "id=next_task" in r.url, timeout=60_000) as answer:
                    page.goto(f"{url}/projects/{project.id}/data?labeling=1")
                sent = answer.value.json()
                assert sent["id"] == task_id
                assert [(q["id"], q["model_version"]) for q in sent["predictions"]] == [(written[0].id, "dataloop")]
                page.wait_for_function(STREAM_READY, timeout=60_000)  # the video loaded too
                shown = page.evaluate(STREAM_SHOWS)
                assert shown == [{"pk": str(written[0].id), "version": "dataloop",
                                  "regions": sorted(a["id"] for a in item["annotations"])}]
                page.screenshot(path=str(ARTIFACTS / "service-stream.png"))

                # Settings > Model: the connected backend, and its form with the Extra params
                page.goto(f"{url}/projects/{project.id}/settings/ml")
                page.get_by_text("dl2ls", exact=True).first.wait_for(timeout=30_000)
                page.get_by_text("Connected", exact=True).first.wait_for(timeout=30_000)
                page.screenshot(path=str(ARTIFACTS / "settings-model.png"))
                page.get_by_role("button", name="Machine learning model options").click()
                page.get_by_text("Edit", exact=True).first.click()
                extra = page.locator('textarea[name="extra_params"]')
                extra.wait_for(timeout=30_000)
                assert json.loads(extra.input_value()) == PARAMS
                menu = page.get_by_text("Send Test Request", exact=True)  # the card's menu, left open
                for _ in range(20):  # a click in the dialog closes it, once the menu listens
                    page.wait_for_timeout(250)
                    if not menu.is_visible():
                        break
                    page.get_by_text("Edit Model", exact=True).click()
                menu.wait_for(state="hidden", timeout=1_000)
                page.screenshot(path=str(ARTIFACTS / "connect-model.png"))
            except Exception:
                page.screenshot(path=str(ARTIFACTS / "service-stream-failure.png"))
                raise
            finally:
                browser.close()
        if os.environ.get("DL2LS_WRITE_DOCS") == "1":
            DOCS.mkdir(exist_ok=True)
            shutil.copyfile(ARTIFACTS / "connect-model.png", DOCS / "connect-model.png")

        # the stream asked /setup for the version to show, and never needed /predict
        log = service.log()
        assert log.count("POST /setup") > setups_before
        assert "POST /predict" not in log
        assert [q.id for q in ls.predictions.list(task=task_id)] == [written[0].id]
        assert ls.projects.get(id=project.id).model_version == "dl2ls"
    finally:
        service.stop()
        standin.stop()
