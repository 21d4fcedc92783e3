#!/usr/bin/env python3
"""Benchmark `dl2ls convert` on a large synthetic Dataloop export.

    .venv/bin/python bench/bench_convert.py                       # default: 40 items x 20 tracks x 300 frames
    .venv/bin/python bench/bench_convert.py --items 10 --frames 100 --no-memory
    .venv/bin/python bench/bench_convert.py --profile             # also cProfile one in-process conversion

What it does, in one run:

1. Generates (seeded, deterministic) a Dataloop export of dense tracker output into bench/data/
   (gitignored): video items 1920x1080 @ 25 fps, box tracks with a snapshot on every frame,
   mostly piecewise-linear motion (a few direction/speed changes and bounces off the frame edges,
   slowly changing size, a few noisy tracks), hidden spans (`objectVisible: false`), label
   changes, `fixed` true/false, v2 `namedAttributes: {}`. Item i is a function of (seed, i, tracks,
   frames) only, so every export size shares its first items. Files are regenerated when missing
   or when the parameters (or this generator) change.
2. Times, best of N wall-clock runs on the same files:
   a. baseline: read every file's bytes and `orjson.loads` them;
   b. `dl2ls.cli.main(["-q", "convert", EXPORT, "-o", tmp])` in process;
   c. Dataloop's SDK: `json.load` + `dtlpy.Annotation.from_json` per annotation + every frame of
      `ann.frames` (run once, on a subset scaled up, when it would be slow).
3. Peak memory of `python -m dl2ls.cli -q convert` in a child process on exports of growing item
   counts, as an export folder and as one JSON array file (the export API's output).
4. Limits: inputs whose cost must follow what they store, not what they name (children, peak
   RSS): a ~1 KB item whose box runs to frame 5,000,000 (convert and verify); one item of 300
   dense tracks (in process, against orjson); an 11000 x 11000 mask PNG of ~0.6 MB.

Peak RSS is measured with wait4() on a grandchild started by a tiny launcher process: Linux
carries the parent's RSS high-water mark into a child across fork+exec, so RUSAGE_CHILDREN seen
from this (large) benchmark process would report our own peak, not the converter's. The launcher
also samples /proc/PID/status to split the peak into anonymous memory (the heap) and file-backed
pages (memory-mapped input, shared libraries).

Never exits non-zero because a target is missed; only on a real failure (conversion error).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import json
import math
import os
import platform
import pstats
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = HERE / "data"
STAMP = DATA / ".params"  # not *.json: the converter reads every .json under an export folder
GENERATOR_VERSION = 1

WIDTH, HEIGHT, FPS = 1920, 1080, 25
LABELS = ["car", "truck", "bus", "person", "bicycle", "motorcycle", "van"]
CHANGES = {"car": "van", "van": "car", "truck": "bus", "bus": "truck", "person": "bicycle",
           "bicycle": "person", "motorcycle": "bicycle"}
TARGET_RATIO = 1.5  # the project's target: convert <= 1.5x the orjson parse of the same files

VENV_PY = ROOT / ".venv" / "bin" / "python"
CHILD_PY = str(VENV_PY) if VENV_PY.exists() else sys.executable


# ============================================================================ synthetic data


def _hex(rng: random.Random, n: int) -> str:
    return f"{rng.getrandbits(4 * n):0{n}x}"


def _iso(rng: random.Random) -> str:
    t = 1_700_000_000 + rng.randrange(30_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{rng.randrange(1000):03d}Z"


def _track_boxes(rng: random.Random, frames: int, noisy: bool):
    """Per-frame boxes (x1, y1, x2, y2) and the frames where the motion bends."""
    w0 = rng.uniform(40, 320)
    h0 = min(w0 * rng.uniform(0.5, 2.2), 700.0)
    w1, h1 = w0 * rng.uniform(0.7, 1.4), h0 * rng.uniform(0.7, 1.4)  # slow, linear size drift
    cx, cy = rng.uniform(w0, WIDTH - w0), rng.uniform(h0, HEIGHT - h0)
    speed, heading = rng.uniform(0.0, 5.0), rng.uniform(0, 2 * math.pi)
    n_changes = rng.choice([0, 1, 1, 2, 2, 3, 4])
    changes = set(rng.sample(range(10, max(11, frames - 10)), k=min(n_changes, max(0, frames - 20))))
    vx, vy = speed * math.cos(heading), speed * math.sin(heading)
    ax, ay, at = cx, cy, 0  # the anchor of the current linear segment
    bends = {0}
    boxes = []
    span = max(frames - 1, 1)
    for t in range(frames):
        w = w0 + (w1 - w0) * t / span
        h = h0 + (h1 - h0) * t / span
        if t in changes:  # a new direction and speed from here on
            ax, ay, at = ax + vx * (t - at), ay + vy * (t - at), t
            heading = math.atan2(vy, vx) + rng.uniform(-2.0, 2.0)
            speed = min(max(math.hypot(vx, vy) * rng.uniform(0.3, 2.0), rng.uniform(0.0, 0.5)), 8.0)
            vx, vy = speed * math.cos(heading), speed * math.sin(heading)
            bends.add(t)
        x, y = ax + vx * (t - at), ay + vy * (t - at)
        if not (w / 2 <= x <= WIDTH - w / 2) or not (h / 2 <= y <= HEIGHT - h / 2):  # bounce
            ax, ay, at = ax + vx * (t - 1 - at), ay + vy * (t - 1 - at), t - 1
            if not (w / 2 <= x <= WIDTH - w / 2):
                vx = -vx
            if not (h / 2 <= y <= HEIGHT - h / 2):
                vy = -vy
            x, y = ax + vx * (t - at), ay + vy * (t - at)
            x = min(max(x, w / 2), WIDTH - w / 2)
            y = min(max(y, h / 2), HEIGHT - h / 2)
            bends.add(t)
        if noisy:  # tracker jitter
            x += rng.gauss(0, 0.4)
            y += rng.gauss(0, 0.4)
        boxes.append((x - w / 2, y - h / 2, x + w / 2, y + h / 2))
    return boxes, bends


def _point(x: float, y: float) -> dict:
    return {"x": x, "y": y, "z": 0}


def make_item(seed: int, index: int, tracks: int, frames: int) -> dict:
    rng = random.Random(f"dl2ls-bench:{seed}:{index}")
    dataset_id = _hex(random.Random(f"dl2ls-bench:{seed}:dataset"), 24)
    item_id = _hex(rng, 24)
    gate = "https://gate.dataloop.ai/api/v1"
    folder = f"/videos/cam{index % 4}"
    name = f"video_{index:05d}.mp4"
    created = _iso(rng)
    annotations = []
    for k in range(tracks):
        noisy = rng.random() < 0.15
        boxes, bends = _track_boxes(rng, frames, noisy)
        label = rng.choice(LABELS)
        labels = [label] * frames
        if rng.random() < 0.12 and frames > 20:  # a label change (a few go back again)
            c = rng.randrange(frames // 3, frames * 4 // 5)
            back = rng.randrange(c + 5, frames) if rng.random() < 0.3 and c + 5 < frames else frames
            labels[c:back] = [CHANGES[label]] * (back - c)
        visible = [True] * frames
        if rng.random() < 0.25 and frames > 20:  # occluded for a while, then visible again
            a = rng.randrange(frames // 5, frames * 7 // 10)
            b = min(frames - 1, a + rng.randrange(5, 40))  # visible again from frame b
            visible[a:b] = [False] * (b - a)
            bends.update({a, b})
        snapshots = []
        for t in range(1, frames):
            x1, y1, x2, y2 = boxes[t]
            snapshots.append({
                "data": [_point(x1, y1), _point(x2, y2)],
                "fixed": t in bends or rng.random() < 0.05,
                "frame": t,
                "label": labels[t],
                "namedAttributes": {},
                "objectVisible": visible[t],
                "type": "box",
            })
        ann_id = _hex(rng, 24)
        stamp = _iso(rng)
        user = rng.choice(["annotator@example.com", "tracker@example.com"])
        x1, y1, x2, y2 = boxes[0]
        annotations.append({
            "id": ann_id,
            "datasetId": dataset_id,
            "itemId": item_id,
            "url": f"{gate}/annotations/{ann_id}",
            "item": f"{gate}/items/{item_id}",
            "dataset": f"{gate}/datasets/{dataset_id}",
            "type": "box",
            "label": labels[0],
            "attributes": [],
            "coordinates": [_point(x1, y1), _point(x2, y2)],
            "metadata": {
                "system": {
                    "attributes": {},
                    "automated": user.startswith("tracker"),
                    "coordinateVersion": "v2",
                    "endFrame": frames - 1,
                    "endTime": (frames - 1) / FPS,
                    "frame": 0,
                    "isOpen": False,
                    "isOnlyLocal": False,
                    "objectId": str(k + 1),
                    "snapshots_": snapshots,
                    "startTime": 0,
                    "system": False,
                },
                "user": {},
            },
            "creator": user,
            "createdAt": stamp,
            "updatedBy": user,
            "updatedAt": stamp,
            "hash": _hex(rng, 40),
            "source": "ui",
        })
    return {
        "id": item_id,
        "datasetId": dataset_id,
        "url": f"{gate}/items/{item_id}",
        "dataset": f"{gate}/datasets/{dataset_id}",
        "createdAt": created,
        "dir": folder,
        "filename": f"{folder}/{name}",
        "type": "file",
        "hidden": False,
        "metadata": {
            "fps": FPS,
            "startTime": 0,
            "system": {
                "duration": frames / FPS,
                "encoding": "7bit",
                "ffmpeg": {"avg_frame_rate": f"{FPS}/1", "codec_name": "h264", "codec_type": "video",
                           "height": HEIGHT, "width": WIDTH, "nb_read_frames": str(frames),
                           "pix_fmt": "yuv420p", "r_frame_rate": f"{FPS}/1", "time_base": "1/12800"},
                "fps": FPS,
                "height": HEIGHT,
                "width": WIDTH,
                "isBinary": True,
                "mimetype": "video/mp4",
                "nb_frames": frames,
                "originalname": name,
                "refs": [],
                "size": 1_000_000 + rng.randrange(50_000_000),
                "startTime": 0,
                "taskStatusLog": [],
                "thumbnailId": _hex(rng, 24),
            },
        },
        "name": name,
        "creator": "uploader@example.com",
        "updatedAt": created,
        "updatedBy": "uploader@example.com",
        "stream": f"{gate}/items/{item_id}/stream",
        "thumbnail": f"{gate}/items/{item_id}/thumbnail",
        "annotationsCount": len(annotations),
        "annotated": True,
        "annotations": annotations,
    }


def _pool_file(i: int) -> Path:
    return DATA / "pool" / f"item_{i:05d}.json"


def _export_rel(i: int) -> Path:
    # the V2 export layout: json/<remote dir>/<name>.json
    return Path("json") / "videos" / f"cam{i % 4}" / f"video_{i:05d}.mp4.json"


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def prepare_data(args, counts: list[int]) -> dict[int, Path]:
    """Make sure the pool holds max(counts) items and an export folder exists per count."""
    params = {"generator": GENERATOR_VERSION, "seed": args.seed, "tracks": args.tracks, "frames": args.frames}
    if STAMP.exists():
        try:
            old = json.loads(STAMP.read_text())
        except ValueError:
            old = None
        if old != params:
            print(f"parameters changed ({old} -> {params}): regenerating {DATA}")
            shutil.rmtree(DATA)
    DATA.mkdir(parents=True, exist_ok=True)
    STAMP.write_text(json.dumps(params))

    need = max(counts)
    missing = [i for i in range(need) if not _pool_file(i).exists()]
    if missing:
        t0 = time.perf_counter()
        for i in missing:
            item = make_item(args.seed, i, args.tracks, args.frames)
            _write_atomic(_pool_file(i), orjson.dumps(item, option=orjson.OPT_INDENT_2))
        print(f"generated {len(missing)} items ({args.tracks} tracks x {args.frames} frames) "
              f"in {time.perf_counter() - t0:.1f} s")

    exports = {}
    for n in counts:
        root = DATA / f"export_{n}"
        existing = {p.relative_to(root) for p in root.rglob("*.json")} if root.exists() else set()
        wanted = {_export_rel(i) for i in range(n)}
        if existing != wanted:
            shutil.rmtree(root, ignore_errors=True)
            for i in range(n):
                dst = root / _export_rel(i)
                dst.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(_pool_file(i), dst)  # same bytes, no extra disk
                except OSError:
                    shutil.copyfile(_pool_file(i), dst)
        exports[n] = root
    return exports


def prepare_array(n: int) -> Path:
    """The same n items as ONE JSON array file, like the export API's download."""
    path = DATA / "arrays" / f"items_{n}.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(b"[\n")
            for i in range(n):
                if i:
                    fh.write(b",\n")
                fh.write(_pool_file(i).read_bytes())
            fh.write(b"\n]\n")
        os.replace(tmp, path)
    return path


# ============================================================================ timing


def best_of(fn, repeat: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), times


def run_orjson(export: Path) -> None:
    for path in sorted(export.rglob("*.json")):
        orjson.loads(path.read_bytes())


def run_convert(export: Path, out: Path) -> str:
    from dl2ls import cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main(["-q", "convert", str(export), "-o", str(out)])
    if rc != 0:
        sys.stderr.write(err.getvalue())
        raise SystemExit(f"dl2ls convert exited with {rc}")
    return err.getvalue().strip()


def run_dtlpy(files: list[Path]) -> int:
    """What reading the export through Dataloop's SDK costs: every annotation, every frame."""
    import dtlpy as dl

    touched = 0
    for path in files:
        with open(path, "rb") as fh:
            item = json.load(fh)
        metadata = item.get("metadata") or {}
        fps = metadata.get("fps") or FPS
        for raw in item["annotations"]:
            ann = dl.Annotation.from_json(_json=raw, is_video=True, fps=fps, item_metadata=metadata)
            for frame in ann.frames.values():
                _ = frame.left  # what reading a frame's geometry costs
                touched += 1
    return touched


# ============================================================================ memory

# Runs CMD as a grandchild (fork from this small process, then exec), samples its RssAnon and
# RssFile, and writes "ru_maxrss_kb peak_anon_kb peak_file_kb exit_code" to the file in argv[1].
LAUNCHER = r"""
import os, sys, time
out, argv = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    try:
        os.execv(argv[0], argv)
    finally:
        os._exit(127)
anon = fil = 0
status = f"/proc/{pid}/status"
while True:
    wpid, st, ru = os.wait4(pid, os.WNOHANG)
    if wpid:
        break
    try:
        with open(status, "rb") as fh:
            for line in fh:
                if line.startswith(b"RssAnon:"):
                    anon = max(anon, int(line.split()[1]))
                elif line.startswith(b"RssFile:"):
                    fil = max(fil, int(line.split()[1]))
    except OSError:
        pass
    time.sleep(0.003)
with open(out, "w") as fh:
    fh.write(f"{ru.ru_maxrss} {anon} {fil} {os.waitstatus_to_exitcode(st)}")
"""


def peak_rss(cmd: list[str], tmpdir: Path) -> tuple[int, int, int, float]:
    """(peak RSS kB, sampled peak anonymous kB, sampled peak file-backed kB, seconds) of cmd."""
    result = tmpdir / "rss.txt"
    result.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, str(result), *cmd],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seconds = time.perf_counter() - t0
    try:
        maxrss, anon, fil, rc = map(int, result.read_text().split())
    except (OSError, ValueError):
        raise SystemExit(f"launcher failed: {proc.stderr.decode(errors='replace')}") from None
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} exited with {rc}:\n{proc.stderr.decode(errors='replace')}")
    return maxrss, anon, fil, seconds


def child_cmd() -> list[str]:
    """`python -m dl2ls.cli`, or the installed console script when that does not work."""
    probe = subprocess.run([CHILD_PY, "-m", "dl2ls.cli", "--version"], capture_output=True, text=True)
    if probe.returncode == 0 and "dl2ls" in probe.stdout:
        return [CHILD_PY, "-m", "dl2ls.cli"]
    script = Path(CHILD_PY).with_name("dl2ls")
    if script.exists():
        return [str(script)]
    raise SystemExit(f"neither `{CHILD_PY} -m dl2ls.cli` nor {script} works: {probe.stderr}")


# ============================================================================ limits

FAR_FRAME = 5_000_000


def far_item() -> dict:
    """~1 KB: one box that hides, changes label, and moves on frame 4,999,999 of a video of unknown
    length (the converter once held it as dense per-frame arrays: 1.3 GB)."""
    def box(x1, y1, x2, y2):
        return [{"x": x1, "y": y1}, {"x": x2, "y": y2}]

    def snap(frame, coords, label="car", visible=True):
        return {"frame": frame, "label": label, "objectVisible": visible, "data": coords}

    snaps = [snap(10, box(30, 30, 60, 60)), snap(20, box(30, 30, 60, 60), visible=False),
             snap(30, box(40, 40, 80, 80), "truck"), snap(1000, box(45, 40, 85, 80), "truck"),
             snap(FAR_FRAME - 1, box(50, 40, 90, 80), "truck")]
    return {"id": "far", "filename": "/far.mp4", "name": "far.mp4",
            "metadata": {"fps": FPS, "system": {"mimetype": "video/mp4", "width": WIDTH, "height": HEIGHT}},
            "annotations": [{"id": "far1", "type": "box", "label": "car", "coordinates": box(10, 10, 20, 20),
                             "metadata": {"system": {"frame": 0, "endFrame": FAR_FRAME, "snapshots_": snaps}}}]}


def mask_png(n: int) -> bytes:
    """An n x n RGBA PNG whose alpha holds a few discs, written row by row (never the whole image)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))

    rng = np.random.default_rng(7)
    discs = [(rng.uniform(0, n), rng.uniform(0, n), rng.uniform(n / 30, n / 8)) for _ in range(12)]
    xs = np.arange(n)
    comp, parts = zlib.compressobj(6), []
    row = np.zeros((n, 4), np.uint8)
    row[:, 0] = 200
    for y in range(n):
        row[:, 3] = 0
        for cx, cy, r in discs:
            if abs(y - cy) < r:
                half = math.sqrt(r * r - (y - cy) ** 2)
                row[max(0, int(cx - half)):max(0, int(cx + half)), 3] = 255
        parts.append(comp.compress(b"\0" + row.tobytes()))
    parts.append(comp.flush())
    header = struct.pack(">IIBBBBB", n, n, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def prepare_limits(args) -> dict[str, Path]:
    root = DATA / "limits"
    root.mkdir(parents=True, exist_ok=True)
    files = {"far": root / "far_5M.json", "tracks": root / f"tracks_300x{args.frames}_seed{args.seed}.json"}
    if not files["far"].exists():
        _write_atomic(files["far"], orjson.dumps(far_item()))
    if not files["tracks"].exists():
        _write_atomic(files["tracks"], orjson.dumps(make_item(args.seed, 0, 300, args.frames)))
    if args.mask_size:
        import base64

        files["mask"] = root / f"mask_{args.mask_size}.json"
        if not files["mask"].exists():
            t0 = time.perf_counter()
            png = mask_png(args.mask_size)
            url = "data:image/png;base64," + base64.b64encode(png).decode()
            item = {"id": "mask", "filename": "/mask.png", "name": "mask.png",
                    "metadata": {"system": {"mimetype": "image/png", "width": args.mask_size,
                                            "height": args.mask_size}},
                    "annotations": [{"id": "m1", "type": "binary", "label": "blob", "coordinates": url}]}
            _write_atomic(files["mask"], orjson.dumps(item))
            print(f"generated a {args.mask_size}x{args.mask_size} mask PNG of {mb(len(png))} MB "
                  f"in {time.perf_counter() - t0:.1f} s")
    return files


def run_limits(args, tmpdir: Path) -> None:
    files = prepare_limits(args)
    cmd = child_cmd()
    out = tmpdir / "limits.json"
    print("\nlimits (child processes: wall seconds, peak RSS incl. the interpreter; MB = 10^6 bytes)")
    print(f"{'input':<52} {'input KB':>9} {'seconds':>8} {'peak RSS MB':>12}")

    def child(label: str, argv: list[str], src: Path) -> None:
        rss, _, _, secs = peak_rss([*cmd, *argv], tmpdir)
        print(f"{label:<52} {src.stat().st_size / 1e3:>9.1f} {secs:>8.2f} {rss * 1024 / 1e6:>12.1f}")

    child(f"convert: 1 box to frame {FAR_FRAME:,}, length unknown", ["-q", "convert", str(files["far"]), "-o",
                                                                     str(out)], files["far"])
    child("verify: the same (every frame, in chunks)", ["verify", str(files["far"]), str(out)], files["far"])
    if "mask" in files:
        n = args.mask_size
        child(f"convert: {n}x{n} mask PNG", ["-q", "convert", str(files["mask"]), "-o", str(out)], files["mask"])

    src = files["tracks"]
    t_json, _ = best_of(lambda: orjson.loads(src.read_bytes()), args.repeat)
    t_conv, _ = best_of(lambda: run_convert(src, out), args.repeat)
    print(f"{'in process: 1 item x 300 dense tracks x ' + str(args.frames) + ' frames':<52} "
          f"{src.stat().st_size / 1e3:>9.1f} {t_conv:>8.3f}   ({t_conv / t_json:.2f}x its orjson parse, "
          f"{t_json:.3f} s)")


# ============================================================================ main


def mb(n_bytes: float) -> str:
    return f"{n_bytes / 1e6:.1f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=40, help="items in the timed export (default 40)")
    p.add_argument("--tracks", type=int, default=20, help="box tracks per item (default 20)")
    p.add_argument("--frames", type=int, default=300, help="frames per video, a snapshot on each (default 300)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3, help="best of N for the timings (default 3)")
    p.add_argument("--dtlpy-budget", type=float, default=25.0, metavar="S",
                   help="run dtlpy once on a subset when best-of-N over all items would take longer "
                        "than S seconds (default 25)")
    p.add_argument("--no-dtlpy", action="store_true")
    p.add_argument("--memory-sizes", default="10,40,160", metavar="N,N,..",
                   help="item counts for the peak-memory runs (default 10,40,160)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-limits", action="store_true",
                   help="skip the limit inputs (frame 5,000,000; 300 tracks; a large mask)")
    p.add_argument("--mask-size", type=int, default=11000, metavar="N",
                   help="side of the square mask PNG of the limits (default 11000; 0: none)")
    p.add_argument("--profile", action="store_true",
                   help="also cProfile one in-process conversion (top 25 by tottime)")
    args = p.parse_args()
    if min(args.items, args.tracks, args.frames, args.repeat) < 1:
        p.error("--items, --tracks, --frames and --repeat must be >= 1")
    mem_sizes = [] if args.no_memory else sorted({int(s) for s in args.memory_sizes.split(",") if s.strip()})

    started = time.perf_counter()
    try:
        import dtlpy
        dtlpy_version = dtlpy.__version__
    except ImportError:
        dtlpy, dtlpy_version = None, "not installed"
    import msgspec

    import dl2ls
    from dl2ls import cli  # noqa: F401  (import cost stays out of the timings)

    print(f"python {platform.python_version()} ({platform.python_implementation()}), numpy {np.__version__}, "
          f"orjson {orjson.__version__}, msgspec {msgspec.__version__}, dtlpy {dtlpy_version}, "
          f"dl2ls {dl2ls.__version__}")
    print(f"{platform.platform()}, {os.cpu_count()} CPUs")

    exports = prepare_data(args, [args.items, *mem_sizes])
    export = exports[args.items]
    files = sorted(export.rglob("*.json"))
    total_bytes = sum(f.stat().st_size for f in files)
    stored = args.items * args.tracks * args.frames
    print(f"data: {export.relative_to(ROOT)}: {len(files)} items x {args.tracks} box tracks x {args.frames} "
          f"frames = {stored:,} stored frames (top-level + snapshots_), {mb(total_bytes)} MB")

    gc.collect()
    gc.freeze()  # the harness's own objects (dtlpy's modules...) stay out of every collection
    tmpdir = Path(tempfile.mkdtemp(prefix="dl2ls-bench-"))
    rows = []
    # ---- a. baseline
    t_json, runs = best_of(lambda: run_orjson(export), args.repeat)
    rows.append(("orjson.loads (read + parse)", t_json, runs, ""))

    # ---- b. conversion, in process
    out = tmpdir / "tasks.json"
    summary = []
    t_conv, runs = best_of(lambda: summary.append(run_convert(export, out)), args.repeat)
    rows.append(("dl2ls convert (in-process)", t_conv, runs, ""))
    out_bytes = out.stat().st_size

    # ---- c. dtlpy
    t_dl = None
    if dtlpy is not None and not args.no_dtlpy:
        gc.collect()
        t0 = time.perf_counter()
        touched = run_dtlpy(files[:1])
        per_item = time.perf_counter() - t0
        if touched != args.tracks * args.frames:
            print(f"warning: dtlpy saw {touched} frames in one item, expected {args.tracks * args.frames}")
        if per_item * len(files) * args.repeat <= args.dtlpy_budget:
            t_dl, runs = best_of(lambda: run_dtlpy(files), args.repeat)
            note = f"best of {args.repeat}, all {len(files)} items"
        else:
            subset = max(1, min(len(files), int(args.dtlpy_budget / max(per_item, 1e-9))))
            gc.collect()
            t0 = time.perf_counter()
            touched = run_dtlpy(files[:subset])
            measured = time.perf_counter() - t0
            t_dl, runs = measured * len(files) / subset, [measured]
            note = (f"ONCE on {subset}/{len(files)} items ({measured:.2f} s, "
                    f"{touched:,} frames), scaled x{len(files) / subset:.2f}")
        rows.append(("dtlpy from_json + ann.frames", t_dl, runs, note))

    print()
    print(f"{'step':<30} {'seconds':>8} {'x orjson':>9} {'stored frames/s':>16} {'MB/s':>8}   runs")
    for name, t, runs, note in rows:
        runs_s = " ".join(f"{r:.3f}" for r in runs)
        print(f"{name:<30} {t:>8.3f} {t / t_json:>9.2f} {stored / t:>16,.0f} {total_bytes / t / 1e6:>8.1f}   "
              f"{runs_s}{'  (' + note + ')' if note else ''}")
    ratio = t_conv / t_json
    verdict = "PASS" if ratio <= TARGET_RATIO else "MISS"
    print(f"\ntarget: convert <= {TARGET_RATIO}x orjson parse: {verdict} ({ratio:.2f}x)")
    if t_dl is not None:
        print(f"dtlpy / orjson = {t_dl / t_json:.1f}x; dtlpy / convert = {t_dl / t_conv:.1f}x")
    last_line = summary[-1].splitlines()[-1] if summary and summary[-1] else ""
    print(f"convert output: {mb(out_bytes)} MB of tasks; {last_line}")

    # ---- 4. limits
    if not args.no_limits:
        run_limits(args, tmpdir)

    # ---- 3. peak memory in a child process
    if mem_sizes:
        cmd = child_cmd()
        print(f"\npeak memory of `{' '.join([Path(cmd[0]).name, *cmd[1:]])} -q convert SOURCE -o tmp` "
              f"(child process; RSS = kernel high-water mark incl. file-backed pages,")
        print(" anon/file = peaks sampled every ~3 ms from /proc/PID/status; MB = 10^6 bytes)")
        floor = peak_rss([*cmd, "--version"], tmpdir)
        print(f"{'source':<34} {'items':>6} {'input MB':>9} {'peak RSS MB':>12} {'anon MB':>8} {'file MB':>8} "
              f"{'seconds':>8}")
        print(f"{'(import only: --version)':<34} {'-':>6} {'-':>9} {floor[0] * 1024 / 1e6:>12.1f} "
              f"{floor[1] * 1024 / 1e6:>8.1f} {floor[2] * 1024 / 1e6:>8.1f} {floor[3]:>8.2f}")
        results = {}
        for kind in ("folder", "array"):
            for n in mem_sizes:
                src = exports[n] if kind == "folder" else prepare_array(n)
                size = sum(f.stat().st_size for f in src.rglob("*.json")) if kind == "folder" else src.stat().st_size
                rss, anon, fil, secs = peak_rss([*cmd, "-q", "convert", str(src), "-o", str(tmpdir / "mem.json")],
                                                tmpdir)
                results[(kind, n)] = (rss, anon)
                label = f"{src.relative_to(ROOT)}" + ("/" if kind == "folder" else "")
                print(f"{label:<34} {n:>6} {mb(size):>9} {rss * 1024 / 1e6:>12.1f} {anon * 1024 / 1e6:>8.1f} "
                      f"{fil * 1024 / 1e6:>8.1f} {secs:>8.2f}")
        lo, hi = mem_sizes[0], mem_sizes[-1]
        if hi > lo:
            for kind in ("folder", "array"):
                (rss_lo, anon_lo), (rss_hi, anon_hi) = results[(kind, lo)], results[(kind, hi)]
                growth = (rss_hi - rss_lo) * 1024 / 1e6
                print(f"{kind}: {lo} -> {hi} items ({hi / lo:.0f}x): peak RSS {growth:+.1f} MB, "
                      f"anonymous {(anon_hi - anon_lo) * 1024 / 1e6:+.1f} MB")

    # ---- profile
    if args.profile:
        gc.collect()
        prof = cProfile.Profile()
        prof.enable()
        run_convert(export, tmpdir / "tasks.json")
        prof.disable()
        print("\ncProfile of one in-process conversion (top 25 by tottime):")
        pstats.Stats(prof, stream=sys.stdout).strip_dirs().sort_stats("tottime").print_stats(25)

    shutil.rmtree(tmpdir, ignore_errors=True)
    print(f"\ntotal bench time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
