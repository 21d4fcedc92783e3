"""Shared helpers: build Dataloop items, convert them, and read back what the editor would show.

The reference for what Dataloop means on each frame is Dataloop's own SDK (`dtlpy`), never our
own track code; what Label Studio shows comes from `dl2ls.labelstudio.evaluate`, which follows the
editor's source and is tested on its own in test_evaluate.py.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import orjson
import pytest
from hypothesis import settings

from dl2ls.dataloop.model import MediaDefaults, decode_item
from dl2ls.labelstudio.evaluate import ls_rect_corners, video_rectangle_at, timeline_at
from dl2ls.labelstudio.tasks import ConvertOptions, to_task
from dl2ls.localserver import LocalLabelStudio, free_port, wait_http  # noqa: F401 (used by tests)
from dl2ls.tracks import EXACT_PX, box_corners, item_tracks

# CI runs the property tests on a fixed seed (a red CI must be reproducible); developers'
# runs explore new examples every time
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

SAMPLES = Path(__file__).parent / "data" / "dataloop"
GOLDEN = Path(__file__).parent / "golden"


# ----------------------------------------------------------------------------- building items


def pts(x1, y1, x2, y2, angle=None):
    coords = [{"x": x1, "y": y1, "z": 0}, {"x": x2, "y": y2, "z": 0}]
    return coords + [angle] if angle is not None else coords


def snap(frame, box=None, label="car", visible=True, fixed=True, **extra):
    s = {"frame": frame, "fixed": fixed, "label": label, "objectVisible": visible, "type": "box",
         "data": box if box is not None else pts(10, 10, 20, 20), "namedAttributes": {}}
    s.update(extra)
    return s


def box_annotation(ann_id="a1", coords=None, label="car", frame=0, end=None, snapshots=(), model=None,
                   type_="box", **system):
    ann = {
        "id": ann_id, "type": type_, "label": label, "attributes": [],
        "coordinates": coords if coords is not None else pts(10, 10, 20, 20),
        "creator": "t@example.com", "createdAt": "2024-01-01T00:00:00.000Z",
        "updatedBy": "t@example.com", "updatedAt": "2024-01-01T00:00:00.000Z",
        "metadata": {"system": {"frame": frame, "snapshots_": list(snapshots), **system}},
    }
    if end is not None:
        ann["metadata"]["system"]["endFrame"] = end
    if model is not None:
        ann["metadata"]["user"] = {"model": model}
        ann["metadata"]["system"]["model"] = model
    return ann


def video_item(annotations, fps=25, width=1000, height=500, nb_frames=None, item_id="item1"):
    return {
        "id": item_id, "datasetId": "ds1", "dir": "/", "filename": "/clip.mp4", "name": "clip.mp4",
        "stream": f"https://example.com/items/{item_id}/stream",
        "metadata": {"fps": fps, "system": {"mimetype": "video/mp4", "width": width, "height": height,
                                             "fps": fps, "nb_frames": nb_frames}},
        "annotations": annotations,
    }


def image_item(annotations, width=640, height=480, item_id="img1"):
    return {
        "id": item_id, "datasetId": "ds1", "dir": "/", "filename": "/pic.jpg", "name": "pic.jpg",
        "metadata": {"system": {"mimetype": "image/jpeg", "width": width, "height": height}},
        "annotations": annotations,
    }


def convert(item: dict, defaults: MediaDefaults | None = None, **options):
    """item dict -> (ItemTracks, task, report), through the same path as `dl2ls convert`."""
    data = orjson.dumps(item)
    decoded = decode_item(data, "test.json")
    tracks = item_tracks(decoded, "test.json", defaults or MediaDefaults())
    task, report = to_task(tracks, ConvertOptions(**options))
    return tracks, task, report


def results_of(task: dict, ann_id: str) -> list[dict]:
    return [r for p in task["predictions"] for r in p["result"]
            if r["id"] == ann_id or r["id"].startswith(ann_id + "_r")]


# ----------------------------------------------------------------------------- the reference


def dtlpy_frames(ann: dict, fps: float) -> dict[int, tuple]:
    """Dataloop's own reading of a video annotation: frame -> (visible, label, box, angle)."""
    import dtlpy as dl

    logging.getLogger("dtlpy").setLevel(logging.ERROR)
    a = copy.deepcopy(ann)
    for key in ("creator", "createdAt", "updatedBy", "updatedAt"):
        a.setdefault(key, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        obj = dl.Annotation.from_json(_json=a, is_video=True, fps=fps)
    out = {}
    for f in range(obj.frames.start, obj.frames.end + 1):
        fr = obj.frames[f]
        d = fr.annotation_definition
        angle = getattr(d, "angle", None) or 0
        out[f] = (bool(fr.object_visible), fr.label, (d.left, d.top, d.right, d.bottom), float(angle))
    return out


def editor_frames(task: dict, ann_id: str, frames0: np.ndarray, width: float, height: float):
    """What the editor draws for one annotation on each 0-based frame: (label, corners (4, 2)) or
    None; several regions drawn on one frame is an error."""
    frames1 = frames0 + 1
    shown: list = [None] * len(frames0)
    for r in results_of(task, ann_id):
        if r["type"] != "videorectangle":
            continue
        drawn, vals = video_rectangle_at(r["value"]["sequence"], frames1)
        corners = ls_rect_corners(vals[:, 0] * width / 100, vals[:, 1] * height / 100,
                                  vals[:, 2] * width / 100, vals[:, 3] * height / 100, vals[:, 4])
        for k in np.flatnonzero(drawn):
            assert shown[k] is None, f"two regions drawn on frame {frames1[k]}"
            shown[k] = (r["value"]["labels"][0], corners[k])
    return shown


def assert_frame_exact(ann: dict, task: dict, fps: float, width: float, height: float, extra_frames: int = 3):
    """Every frame the editor shows equals what Dataloop's SDK says, from frame 0 to past the end."""
    truth = dtlpy_frames(ann, fps)
    last = max(truth) + extra_frames
    frames0 = np.arange(0, last + 1)
    shown = editor_frames(task, ann["id"], frames0, width, height)
    worst = 0.0
    for f, got in zip(frames0.tolist(), shown):
        want = truth.get(f)
        if want is None or not want[0]:
            assert got is None, f"frame {f}: drawn in Label Studio, hidden/absent in Dataloop"
            continue
        assert got is not None, f"frame {f}: visible in Dataloop, not drawn in Label Studio"
        _, label, (left, top, right, bottom), angle = want
        assert got[0] == label, f"frame {f}: label {got[0]!r} != {label!r}"
        expected = box_corners(np.array((left + right) / 2), np.array((top + bottom) / 2), np.array(right - left),
                               np.array(bottom - top),
                               np.array(angle))
        err = float(np.abs(got[1] - expected).max())
        worst = max(worst, err)
        assert err <= EXACT_PX, f"frame {f}: box off by {err} px"
    return worst


def keyframe_count(task: dict, ann_id: str) -> int:
    return sum(len(r["value"]["sequence"]) for r in results_of(task, ann_id) if r["type"] == "videorectangle")


@pytest.fixture
def samples() -> Path:
    return SAMPLES


__all__ = ["timeline_at"]


# ----------------------------------------------------------------------------- a real Label Studio

TOKEN = "d12ad12ad12ad12ad12ad12ad12ad12ad12ad12a"


@pytest.fixture(scope="session")
def ls_media_root(tmp_path_factory):
    """Where the test Label Studio serves local media from (/data/local-files/?d=...)."""
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory, ls_media_root):
    """A real Label Studio 1.23 (the test extra installs it into this venv), started once per test
    run and stopped at the end (`dl2ls.localserver`). Yields (url, token)."""
    server = LocalLabelStudio(tmp_path_factory.mktemp("label-studio"), free_port(), TOKEN,
                              media_root=ls_media_root).start()
    try:
        yield server.url, server.token
    finally:
        server.stop()


class KilledAfterImport:
    """A push or sync killed right after a bulk task import landed (Ctrl-C as the answer arrives):
    `arm()` makes the next imports land and then raise KeyboardInterrupt; `disarm()` restores them;
    `sizes` records how many tasks each landed import held."""

    def __init__(self, monkeypatch):
        from dl2ls.labelstudio import push

        self.monkeypatch, self.push, self.original = monkeypatch, push, push.Pusher.import_tasks
        self.sizes: list[int] = []

    def arm(self) -> None:
        original, sizes = self.original, self.sizes

        def land_then_die(pusher, project_id, tasks):
            original(pusher, project_id, tasks)
            sizes.append(len(tasks))
            raise KeyboardInterrupt

        self.monkeypatch.setattr(self.push.Pusher, "import_tasks", land_then_die)

    def disarm(self) -> None:
        self.monkeypatch.setattr(self.push.Pusher, "import_tasks", self.original)


@pytest.fixture
def killed_after_import(monkeypatch) -> KilledAfterImport:
    return KilledAfterImport(monkeypatch)


@pytest.fixture
def ls_env(label_studio, monkeypatch):
    url, token = label_studio
    monkeypatch.setenv("LABEL_STUDIO_URL", url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", token)
    from label_studio_sdk import LabelStudio

    return LabelStudio(base_url=url, api_key=token)


# ----------------------------------------------------------------------------- a real Redis


@pytest.fixture(scope="session")
def redis_server():
    """Debian's redis-server (tests/redis_harness.py), started once per test run."""
    from redis_harness import RedisServer, require_redis

    require_redis()
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_client(redis_server):
    """A client of the session's Redis, emptied first: each test starts from nothing."""
    client = redis_server.client()
    client.flushall()
    try:
        yield client
    finally:
        client.close()

