#!/usr/bin/env python3
"""Benchmark the media proxy: streaming an item through `/media/<id>` against reading it from Dataloop.

    .venv/bin/python bench/bench_media.py [--mb 200] [--runs 10]

The Dataloop stand-in (tests/dataloop_standin.py, in a child process of its own so that it does not
share this process's interpreter lock with the client) holds one item whose binary is a --mb MB
file; a real `dl2ls serve` (gunicorn, dl2ls.web.Worker, 1 worker x 4 threads, service mode) has
DL2LS_MEDIA_SECRET. With the same client code (requests, stream=True, CHUNK-byte reads):
1. throughput of GET {stand-in}/items/{id}/stream with the token (direct), and of the signed
   GET /media/{id} (proxy), --runs times each, alternating; the best of each and their ratio
   (target >= 0.8);
2. the serve worker's RSS idle, and its peak while streaming (one more stream, sampled every 10 ms,
   not timed), and its VmHWM: memory flat;
3. a seek: a 64 KiB range from the middle of the file, time to the last byte (median of 20),
   direct and through the proxy.
Prints a table; never fails on a target.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from service_harness import ServiceProcess  # noqa: E402

from dl2ls.media import CHUNK, signature  # noqa: E402

ITEM = "65a1b2c3d4e5f60718293a4b"
SECRET = "bench-media-secret"


def standin_process(path: str, conn) -> None:
    """The stand-in, in its own process: serves `path` as the item's stream until told to stop."""
    from dataloop_standin import DataloopStandIn

    standin = DataloopStandIn().start()
    standin.put_item("ds1", {"id": ITEM, "name": "clip.webm", "annotations": []})
    standin.media[ITEM] = Path(path)
    conn.send((standin.url, standin.api_key))
    while True:
        what = conn.recv()
        if what == "stop":
            break
        standin.media_rate = what  # bytes per second, or None
        conn.send("ok")
    standin.stop()


def read(url: str, headers: dict) -> tuple[int, float]:
    """Bytes read and seconds: the same client for both paths."""
    started = time.perf_counter()
    size = 0
    with requests.get(url, headers=headers, stream=True, timeout=120) as response:
        response.raise_for_status()
        for chunk in response.iter_content(CHUNK):
            size += len(chunk)
    return size, time.perf_counter() - started


def worker_pid(master: int) -> int:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == master:
                    return int(entry.name)
            except (OSError, ValueError, IndexError):
                continue
    raise SystemExit("no gunicorn worker found")


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def hwm(pid: int) -> int:
    """The process's peak RSS since it started (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--rate", type=float, default=100.0,
                        help="MB/s of the paced link in the second measure (default %(default)s; 0: skip it)")
    parser.add_argument("--paced-runs", type=int, default=2)
    args = parser.parse_args()
    size = args.mb << 20

    work = Path(tempfile.mkdtemp(prefix="dl2ls-bench-media-"))
    big = work / "clip.webm"
    with open(big, "wb") as f:  # written, not sparse: the stand-in reads real pages
        block = bytes(range(256)) * 4096
        for _ in range(size // len(block)):
            f.write(block)
        f.write(block[: size % len(block)])
    ours, theirs = multiprocessing.Pipe()
    child = multiprocessing.get_context("spawn").Process(target=standin_process, args=(str(big), theirs), daemon=True)
    child.start()
    url, key = ours.recv()
    service = ServiceProcess(url, key, "http://127.0.0.1:9", work / "model",
                             env={"DL2LS_MEDIA_SECRET": SECRET, "DL2LS_NO_RUNNER": "1", "LOG_LEVEL": "WARNING"})
    service.start()
    try:
        direct = (f"{url}/items/{ITEM}/stream", {"Authorization": f"Bearer {key}"})
        proxied = (f"{service.url}/media/{ITEM}?sig={signature(ITEM, SECRET)}", {})
        worker = worker_pid(service.proc.pid)
        read(proxied[0], {"Range": "bytes=0-9"})  # the worker's first request: imports, the client
        idle = rss(worker)
        peak, sampling = [idle], threading.Event()

        def sample():
            while not sampling.is_set():
                peak.append(rss(worker))
                time.sleep(0.01)

        rates: dict[str, list[float]] = {"direct": [], "proxy": []}
        for run in range(args.runs):
            for name, (target, headers) in (("direct", direct), ("proxy", proxied)):
                got, seconds = read(target, headers)
                if got != size:
                    raise SystemExit(f"{name}: read {got} bytes, expected {size}")
                rates[name].append(size / seconds)
        best = {name: max(r) for name, r in rates.items()}
        median = {name: statistics.median(r) for name, r in rates.items()}
        paced: dict[str, list[float]] = {"direct": [], "proxy": []}
        if args.rate > 0:
            ours.send(args.rate * 1e6)
            ours.recv()
            for run in range(args.paced_runs):
                for name, (target, headers) in (("direct", direct), ("proxy", proxied)):
                    got, seconds = read(target, headers)
                    paced[name].append(size / seconds)
            ours.send(None)
            ours.recv()
        # memory: one more stream through the proxy, sampled (not timed: the sampler shares this
        # process's interpreter with the client)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        got, _ = read(*proxied)
        sampling.set()
        sampler.join()
        high = hwm(worker)

        seeks = {}
        middle = size // 2
        for name, (target, headers) in (("direct", direct), ("proxy", proxied)):
            times = []
            for _ in range(20):
                got, seconds = read(target, {**headers, "Range": f"bytes={middle}-{middle + 65535}"})
                assert got == 65536
                times.append(seconds)
            seeks[name] = statistics.median(times)

        ratio = best["proxy"] / best["direct"]
        print(f"\n{args.mb} MB item, reads of up to {CHUNK >> 10} KiB, {args.runs} runs of each, alternating\n")
        print(f"{'':<40} {'direct':>12} {'via /media':>12} {'ratio':>8}")
        print(f"{'throughput, best (MB/s)':<40} {best['direct'] / 1e6:12.1f} {best['proxy'] / 1e6:12.1f} {ratio:8.2f}"
              f"   (target >= 0.8: {'met' if ratio >= 0.8 else 'MISSED'})")
        print(f"{'throughput, median (MB/s)':<40} {median['direct'] / 1e6:12.1f} {median['proxy'] / 1e6:12.1f} "
              f"{median['proxy'] / median['direct']:8.2f}")
        if args.rate > 0:
            pb = {name: max(r) for name, r in paced.items()}
            ratio = pb["proxy"] / pb["direct"]
            print(f"{f'throughput, Dataloop at {args.rate:g} MB/s (MB/s)':<40} {pb['direct'] / 1e6:12.1f} "
                  f"{pb['proxy'] / 1e6:12.1f} {ratio:8.2f}   (target >= 0.8: {'met' if ratio >= 0.8 else 'MISSED'})")
        print(f"{'a 64 KiB seek, median of 20 (ms)':<40} {seeks['direct'] * 1e3:12.1f} {seeks['proxy'] * 1e3:12.1f}")
        grown = max(peak) - idle
        print(f"\n{'serve worker RSS (MB)':<40} {'idle':>12} {'streaming':>12} {'growth':>8}")
        print(f"{f'peak of {len(peak)} samples, every 10 ms':<40} {idle / 2**20:12.1f} {max(peak) / 2**20:12.1f} "
              f"{grown / 2**20:8.1f}   ({'flat' if grown < 50 << 20 else 'NOT flat'}: < 50 MB for {args.mb} MB)")
        print(f"{'peak since it started (VmHWM)':<40} {'':>12} {high / 2**20:12.1f}")
    finally:
        service.stop()
        ours.send("stop")
        child.join(10)
        big.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
