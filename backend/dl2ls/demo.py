"""`make demo`: see the product work in a local Label Studio in minutes, no accounts needed.

    python -m dl2ls.demo [--source ITEM.json] [--dir .demo] [--port 8080] [--backend-port 9090]

Runs the product the way a user would, with a local stand-in for Dataloop (`dl2ls.standin`; no
account needed): renders a short video that matches the bundled Dataloop sample (its size, fps and
frame count; the sample's boxes drawn where Dataloop has them; frame numbers burnt in) and puts
the sample and its video in the stand-in; starts a local Label Studio (SQLite, loopback) and the
dl2ls service (`dl2ls serve`, media proxy on); `dl2ls fetch`es the dataset and `dl2ls push`es it
into a new project, whose task plays its video through the service's signed `/media` URL (streamed
from the stand-in, as from Dataloop); connects the service to the project (Settings > Model,
extra params {"dataset": ...}) so that it keeps the project in sync; and prints the URL of the
first task and the login. Ctrl-C stops everything it started; a new run resets its folder.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dl2ls.dataloop.model import MediaDefaults
from dl2ls.dataloop.read import iter_items
from dl2ls.localserver import LocalLabelStudio, free_port, stop_process, wait_http
from dl2ls.tracks import bounding_boxes, held_index, item_tracks

SAMPLE = Path(__file__).resolve().parents[2] / "tests" / "data" / "dataloop" / "video_tracker_webm_2024.json"
BITS = 7  # the 0-based frame index, as white blocks along the top: a browser can read which frame it shows


def render_video(source: Path, out: Path) -> tuple[int, float]:
    """A VP9 WebM of the item's size, clock and length: dark frames, each visible box outlined in
    its own colour, the frame number written in, and the frame index as blocks (top left)."""
    import imageio.v2 as imageio
    from PIL import Image, ImageDraw

    entry = next(e for e in iter_items(source) if e.item is not None)
    item = item_tracks(entry.item, entry.origin, MediaDefaults())
    media = item.info.media
    w, h, fps = int(media.width), int(media.height), float(media.fps)
    frames = max(media.frames_count or 0, max(t.end for t in item.tracks) + 1)
    colours = [(230, 80, 80), (80, 200, 120), (90, 140, 255), (240, 200, 60)]
    spatial = [(t, bounding_boxes(t)) for t in item.tracks if t.type in ("box", "note", "segment", "polyline",
                                                                         "point", "ellipse")]
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = imageio.get_writer(out, fps=fps, codec="libvpx-vp9", macro_block_size=16, pixelformat="yuv420p",
                                ffmpeg_params=["-b:v", "0", "-crf", "33", "-deadline", "realtime", "-cpu-used", "8"])
    try:
        for f in range(frames):
            img = Image.new("RGB", (w, h), (38, 40, 46))
            draw = ImageDraw.Draw(img)
            for k, (track, boxes) in enumerate(spatial):
                if not track.start <= f <= track.end:
                    continue
                i = int(held_index(track, np.array([f]))[0])
                if track.visible[i]:
                    x1, y1, x2, y2, _ = boxes[i]
                    draw.rectangle([x1, y1, x2, y2], outline=colours[k % len(colours)], width=4)
            draw.text((w - 220, h - 60), f"frame {f + 1} / {frames}", fill=(255, 255, 255), font_size=28)
            pixels = np.asarray(img).copy()
            for b in range(BITS):
                if (f >> b) & 1:
                    pixels[20:80, 20 + b * 80:90 + b * 80] = 255
            writer.append_data(pixels)
    finally:
        writer.close()
    return frames, fps


@dataclass
class Demo:
    server: LocalLabelStudio
    backend: subprocess.Popen | None
    project_id: int
    task_id: int
    dataloop: object | None = None  # the stand-in

    def stop(self) -> None:
        stop_process(self.backend, 20)
        self.server.stop()
        if self.dataloop is not None:
            self.dataloop.stop()


def start(source: Path, folder: Path, port: int, backend_port: int | None, title: str = "dl2ls demo") -> Demo:
    """Everything the demo needs, started; stop() ends it all."""
    import json

    from label_studio_sdk import LabelStudio

    from dl2ls.cli import main as dl2ls
    from dl2ls.standin import DataloopStandIn

    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    item = json.loads(Path(source).read_text())  # one Dataloop item (or an array: its first)
    item = next(i for i in item if isinstance(i, dict)) if isinstance(item, list) else item
    video = folder / "video.webm"
    render_video(source, video)
    item.setdefault("metadata", {}).setdefault("system", {})["size"] = video.stat().st_size
    dataloop = DataloopStandIn().start()  # Dataloop, as far as everything below can tell
    dataloop.put_item("demo-dataset", item)
    dataloop.media[item["id"]] = video.read_bytes()
    token = secrets.token_hex(20)
    server = LocalLabelStudio(folder / "label-studio", port, token).start()
    backend = None
    try:
        backend_port = backend_port or free_port()
        public = f"http://127.0.0.1:{backend_port}"
        media_secret = secrets.token_hex(24)
        env = {"LABEL_STUDIO_URL": server.url, "LABEL_STUDIO_API_KEY": token, "DATALOOP_API_URL": dataloop.url,
               "DATALOOP_API_KEY": dataloop.api_key, "DL2LS_PUBLIC_URL": public, "DL2LS_MEDIA_SECRET": media_secret}
        os.environ.update(env)
        backend = subprocess.Popen([sys.executable, "-m", "dl2ls.cli", "-q", "serve", "--host", "127.0.0.1",
                                    "--port", str(backend_port)],
                                   env={**os.environ, "WORKERS": "1", "THREADS": "8",
                                        "MODEL_DIR": str(folder / "model")},
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http(f"{public}/health", 60, backend)
        ls = LabelStudio(base_url=server.url, api_key=token)
        export = folder / "export"
        if dl2ls(["-q", "fetch", "--dataset", "demo-dataset", "-o", str(export)]) != 0:
            raise RuntimeError("dl2ls fetch failed")
        report = folder / "push.json"
        if dl2ls(["-q", "push", str(export), "--new-project", title, "--report", str(report)]) != 0:
            raise RuntimeError("dl2ls push failed")
        project_id = json.loads(report.read_text())["push"]["project"]
        task_id = next(iter(ls.tasks.list(project=project_id, include="id"))).id
        ls.ml.create(project=project_id, url=public, title="dl2ls", is_interactive=False,
                     # the versions push wrote: the service keeps them, rather than adding its own
                     extra_params=json.dumps({"dataset": "demo-dataset", "model_version": "dataloop-{source}"}))
        return Demo(server, backend, project_id, task_id, dataloop)
    except BaseException:
        stop_process(backend, 20)
        server.stop()
        dataloop.stop()
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dl2ls.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=SAMPLE, help="a Dataloop video item (default: the sample)")
    parser.add_argument("--dir", type=Path, default=Path(".demo"), help="working folder, reset on each run")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--backend-port", type=int, default=9090)
    args = parser.parse_args(argv)
    if args.dir.exists():
        shutil.rmtree(args.dir)  # a fresh server, project and video every run
    port = args.port if _free(args.port) else free_port()
    backend_port = args.backend_port if _free(args.backend_port) else free_port()
    print("rendering the video and starting Label Studio (the first start takes about a minute) ...", flush=True)
    demo = start(args.source, args.dir, port, backend_port)
    try:
        print(f"""
Label Studio is up at {demo.server.url}   login: {demo.server.username} / {demo.server.password}
The sample's predictions, in the editor:  {demo.server.url}/projects/{demo.project_id}/data?task={demo.task_id}
The video plays through the dl2ls service's /media proxy, streamed from the Dataloop stand-in.
The service is connected (Settings > Model) and keeps the project in step with the "dataset".
Ctrl-C stops Label Studio and the backend.""", flush=True)
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop cleanly on SIGTERM too
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping ...", flush=True)
        demo.stop()
    return 0


def _free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


if __name__ == "__main__":
    sys.exit(main())
