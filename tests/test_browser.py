"""What the Label Studio editor draws, read in a real browser (Debian's chromium, driven by
Playwright; no browser download) and compared with Dataloop's own frames (dtlpy).

A video matching the sample is rendered (frame index burnt in as blocks), served by the test Label
Studio, and the sample — with a hidden span and a hold added — is pushed. The test logs in, opens
the task, seeks to the first frame, a held frame, an interpolated frame, the frames around the
hidden span, the last and one past the end, and reads each region's drawn Konva rectangle."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import SAMPLES, dtlpy_frames, pts
from dl2ls.cli import main
from dl2ls.demo import render_video

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

READY = """(n) => { const as = window.Htx?.annotationStore; const v = as?.selected?.names.get('video');
                    return !!(v && v.ref.current && v.length > 1 && as.predictions.length >= n); }"""
SELECT_PREDICTION = "() => { const as = window.Htx.annotationStore; as.selectPrediction(as.predictions[0].id); }"
READ_FRAME = """async (frame) => {
  const ann = window.Htx.annotationStore.selected, video = ann.names.get('video');
  const vtag = document.querySelector('video');
  video.setFrame(frame);
  for (let i = 0; i < 200; i++) {
    if (video.frame === frame && !vtag.seeking && vtag.readyState >= 2) break;
    await new Promise(r => setTimeout(r, 25));
  }
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  const VW = vtag.videoWidth, VH = vtag.videoHeight;
  const c = document.createElement('canvas'); c.width = VW; c.height = VH;
  const ctx = c.getContext('2d'); ctx.drawImage(vtag, 0, 0);
  let shown = 0;
  for (let b = 0; b < 7; b++) if (ctx.getImageData(55 + b * 80, 50, 1, 1).data[0] > 128) shown |= (1 << b);
  const stage = window.Konva.stages.find(s => ann.regions.some(g => s.findOne('#' + g.id)));
  return {shown, regions: ann.regions.map(g => {
    const r = stage && stage.findOne('#' + g.id);
    return {id: g.cleanId, label: g.labeling ? g.labeling.selectedLabels.map(l => l.value)[0] : null,
            drawn: r ? {x: r.x() * 100 / VW, y: r.y() * 100 / VH, width: r.width() * 100 / VW,
                        height: r.height() * 100 / VH} : null};
  })};
}"""


def sample_with_gap_and_hold() -> dict:
    """The tracker sample, its first box hidden on frames 20-29 and its second held on 35-45."""
    item = json.loads((SAMPLES / "video_tracker_webm_2024.json").read_text())
    first, second = item["annotations"]
    for s in first["metadata"]["system"]["snapshots_"]:
        if 20 <= s["frame"] < 30:
            s["objectVisible"] = False
    snaps = second["metadata"]["system"]["snapshots_"]
    held = next(s for s in snaps if s["frame"] == 35)["data"]
    for s in snaps:
        if 35 < s["frame"] <= 45:
            s["data"] = json.loads(json.dumps(held))
    return item


def require_chromium() -> None:
    """Skip without Debian's Chromium locally; fail in CI, where .ci/run installs it."""
    if not Path(CHROMIUM).exists():
        message = f"no Chromium at {CHROMIUM}: apt-get install chromium (.ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def login(page, url: str) -> None:
    """Log the test Label Studio's admin in."""
    page.goto(f"{url}/user/login/")
    page.fill('input[name="email"]', "admin@example.com")
    page.fill('input[name="password"]', "dl2ls-local-password")
    page.click('button[type="submit"]')
    page.wait_for_url(lambda u: "/user/login" not in u)


def test_the_editor_draws_what_dataloop_has(label_studio, ls_env, ls_media_root, tmp_path):
    require_chromium()
    from playwright.sync_api import sync_playwright

    url, _ = label_studio
    item = sample_with_gap_and_hold()
    source = tmp_path / "clip.json"
    source.write_text(json.dumps(item))
    video = ls_media_root / "videos" / "browser-check.webm"
    frames, fps = render_video(source, video)
    report = tmp_path / "push.json"
    assert main(["-q", "push", str(source), "--new-project", "browser check", "--report", str(report),
                 "--media-url", f"/data/local-files/?d=videos/{video.name}"]) == 0
    project_id = json.loads(report.read_text())["push"]["project"]
    ls_env.import_storage.local.create(project=project_id, path=str(video.parent), title="videos",
                                       use_blob_urls=True)
    task_id = next(iter(ls_env.tasks.list(project=project_id, include="id"))).id
    truth = {ann["id"]: dtlpy_frames(ann, fps) for ann in item["annotations"]}
    W, H = item["metadata"]["system"]["width"], item["metadata"]["system"]["height"]

    with sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        except Exception as err:  # a missing library, a sandbox problem: say so, don't skip
            pytest.fail(f"Chromium at {CHROMIUM} did not start: {str(err).splitlines()[0]}")
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        login(page, url)
        page.goto(f"{url}/projects/{project_id}/data?task={task_id}")
        page.wait_for_function(READY, arg=1, timeout=90_000)
        page.evaluate(SELECT_PREDICTION)
        page.wait_for_function(READY, arg=0, timeout=30_000)

        # first, interpolated, held, around the hidden span (frames 20-29 0-based), last, one past
        for frame in (1, 10, 40, 20, 21, 30, 31, 51, 52, frames):
            seen = page.evaluate(READ_FRAME, frame)
            assert seen["shown"] == frame - 1, f"the video shows frame {seen['shown'] + 1}, not {frame}"
            assert {r["id"] for r in seen["regions"]} == set(truth)
            for region in seen["regions"]:
                want = truth[region["id"]].get(frame - 1)
                visible = want is not None and want[0]
                assert (region["drawn"] is not None) == visible, f"frame {frame}, {region['id']}"
                if visible:
                    _, label, (left, top, right, bottom), _ = want
                    got = region["drawn"]
                    box = (got["x"] * W / 100, got["y"] * H / 100, (got["x"] + got["width"]) * W / 100,
                           (got["y"] + got["height"]) * H / 100)
                    assert max(abs(a - b) for a, b in zip(box, (left, top, right, bottom))) < 1.0, (frame, box)
                    assert region["label"] == label
            if frame == 40:
                ARTIFACTS.mkdir(exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "editor-frame-40.png"))
        browser.close()


__all__ = ["pts"]
