"""Acceptance: the hostile-input table (tests/hostile.py) through `dl2ls convert`, `dl2ls push
--dry-run` and `dl2ls serve` /predict, each as a real subprocess.

For every file and every path: no traceback in any output, exit 0/1/2 (never a signal or 3+), no
hang (a subprocess timeout), the file named in stderr or in the report's problems[].file, no raw
ESC byte and no forged `item-failed:` line. `convert` also: peak RSS of the child (os.wait4) under
300 MB (os.wait4 in a launcher, see _LAUNCHER), within 20 s. `serve`: every answer a 200 with one result per task or a 4xx with a JSON
error, /health 200 after every request, the server alive to the end. Nothing is marked xfail.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import http.client
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest

import hostile
from dl2ls.localserver import free_port, wait_http

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "dl2ls.cli"]
CONVERT_TIMEOUT = 20.0  # s: a hung convert is a failure (speed is not asserted otherwise)
PUSH_TIMEOUT = 120.0
MAX_RSS_MB = 300.0
AS_LIMIT = 6 << 30  # address-space cap on every child, so a runaway cannot take the machine down
LS_ENV = {"LABEL_STUDIO_URL": "http://127.0.0.1:9", "LABEL_STUDIO_API_KEY": "x"}

ROWS = hostile.ROWS
FILE_ROWS = [r for r in ROWS if not r.zip]
ZIP_ROWS = [r for r in ROWS if r.zip]

VIDEO_CONFIG = (REPO / "label_config.xml").read_text()
IMAGE_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="rect" toName="image"><Label value="person"/></RectangleLabels>
  <PolygonLabels name="poly" toName="image"><Label value="person"/></PolygonLabels>
  <KeyPointLabels name="kp" toName="image"><Label value="person"/></KeyPointLabels>
  <EllipseLabels name="ell" toName="image"><Label value="person"/></EllipseLabels>
  <BrushLabels name="brush" toName="image"><Label value="person"/></BrushLabels>
</View>"""
CONFIGS = {"video": VIDEO_CONFIG, "image": IMAGE_CONFIG}


# ----------------------------------------------------------------------------- running a child


@dataclass
class Run:
    argv: list[str]
    code: int | None  # exit code; negative: killed by that signal
    out: bytes
    err: bytes
    maxrss_mb: float
    seconds: float
    timed_out: bool
    note: str = ""

    @property
    def text(self) -> bytes:
        return self.out + b"\n" + self.err


# The child's peak RSS comes from wait4 in a tiny launcher that forks it: wait4 straight on a child
# of this (large) test process reports at least this process's own RSS, because Linux carries the
# forking process's high-water mark through exec. The launcher also caps the address space.
_LAUNCHER = """
import os, resource, signal, sys
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[3], sys.argv[3:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as fh:
    fh.write(str(usage.ru_maxrss))
code = os.waitstatus_to_exitcode(status)
if code < 0:
    signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
os._exit(code)
"""


def run_measured(argv: list[str], timeout: float, env: dict | None = None) -> Run:
    """Run a child to the end (or kill it at `timeout`), with its own peak RSS (KB on Linux)."""
    full_env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **(env or {})}
    full_env.pop("LOG_LEVEL", None)
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe, \
            tempfile.NamedTemporaryFile(suffix=".rss") as rss:
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _LAUNCHER, rss.name, str(AS_LIMIT), *argv],
                                stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, env=full_env, cwd=REPO,
                                start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        seconds = time.monotonic() - start
        fo.seek(0)
        fe.seek(0)
        kb = Path(rss.name).read_text().strip()
        return Run(argv, proc.returncode, fo.read(), fe.read(), int(kb) / 1024 if kb else float("nan"), seconds,
                   timed_out)


# ----------------------------------------------------------------------------- what output must say


def traceback_symptom(text: str) -> str | None:
    """'Traceback: <exception line> @ file:line in function' of the last traceback in text."""
    if "Traceback" not in text:
        return None
    at = text.rfind("Traceback (most recent call last)")
    lines = text[at if at >= 0 else text.index("Traceback"):].splitlines()
    frames = [k for k, line in enumerate(lines) if line.strip().startswith('File "')]
    where, exc = "?", lines[0]
    if frames:
        m = re.match(r'\s*File "([^"]+)", line (\d+), in (\S+)', lines[frames[-1]])
        where = f"{Path(m[1]).name}:{m[2]} in {m[3]}" if m else lines[frames[-1]].strip()
        exc = next((line for line in lines[frames[-1] + 1:] if line and not line[0].isspace()), "?")
    return f"Traceback: {exc[:160]} @ {where}"


def name_variants(name: str) -> list[bytes]:
    """How an output may legitimately show a file name: raw, or with its odd characters escaped."""
    raw = os.fsencode(name)
    text = raw.decode("utf-8", "replace")
    out = {
        raw,
        name.encode("unicode_escape"),
        repr(name)[1:-1].encode("utf-8", "backslashreplace"),
        json.dumps(name)[1:-1].encode(),
        text.encode(),
        quote(raw).encode(),
        "".join(c if c.isprintable() else "?" for c in text).encode(),
        "".join(c if c.isprintable() else "\ufffd" for c in text).encode(),
        "".join(c for c in text if c.isprintable()).encode(),
        "".join(chr(b) if 32 <= b < 127 else f"\\x{b:02x}" for b in raw).encode(),
    }
    return sorted(out)


def load_report(path: Path) -> tuple[dict | None, str | None]:
    if not path.exists():
        return None, None
    try:
        doc = json.loads(path.read_bytes())
    except ValueError as err:
        return None, f"report is not valid JSON ({err})"
    return doc, None


def named(name: str, run: Run, report: dict | None) -> bool:
    variants = name_variants(name)
    files = b"\n".join(str(p.get("file")).encode("utf-8", "backslashreplace")
                       for p in (report or {}).get("problems", []) if isinstance(p, dict))
    return any(v in run.text or v in files for v in variants)


def output_symptoms(run: Run, real_prefix: str) -> list[str]:
    """What is wrong with a finished child, whatever the path."""
    found = []
    if run.timed_out:
        found.append(f"hung: killed after {run.seconds:.0f} s")
    elif run.code is None or run.code < 0:
        found.append(f"killed by signal {-(run.code or 0)} ({signal.Signals(-run.code).name if run.code else '?'})")
    elif run.code not in (0, 1, 2):
        found.append(f"exit {run.code}")
    text = run.text.decode("utf-8", "replace")
    tb = traceback_symptom(text)
    if tb:
        found.append(tb)
    if b"\x1b" in run.text:
        found.append("raw ESC byte in the output")
    forged = [line for line in run.err.decode("utf-8", "replace").split("\n")
              if line.startswith("item-failed:") and not line.startswith(f"item-failed: {real_prefix}")]
    if forged:
        found.append(f"forged line {forged[0][:80]!r}")
    return found


# ----------------------------------------------------------------------------- the table, built once


@pytest.fixture(scope="session")
def table(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    paths = hostile.build_all(root)
    return root, paths


def _selected(session, name: str) -> list[str]:
    return [item.callspec.id for item in session.items
            if getattr(item, "originalname", None) == name and hasattr(item, "callspec")]


def _convert_job(row, path: Path, out: Path) -> tuple[Run, Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    tasks, report = out / "tasks.json", out / "report.json"
    run = run_measured([*CLI, "convert", str(path), "-o", str(tasks), "--report", str(report)], CONVERT_TIMEOUT)
    return run, tasks, report


def _push_job(sources: list[Path], out: Path, extra: list[str], kind: bool) -> tuple[Run, Path]:
    out.mkdir(parents=True, exist_ok=True)
    report = out / "report.json"
    base = [*CLI, "push", *map(str, sources), "--new-project", "hostile", "--dry-run", "--report", str(report), *extra]
    note = ""
    if kind:
        run = run_measured([*base, "--kind", "video"], PUSH_TIMEOUT, LS_ENV)
        if b"unrecognized arguments: --kind" in run.err or b"no such option: --kind" in run.err:
            note = "push does not accept --kind yet: ran without it"
            run = run_measured(base, PUSH_TIMEOUT, LS_ENV)
    else:
        run = run_measured(base, PUSH_TIMEOUT, LS_ENV)
    run.note = note
    return run, report


# the folder (every non-zip file and 3 good items) with a generated config and with the repository's
# config; then the good items and every zip in one run (each zip alone is covered by convert)
PUSH_RUNS = ["folder-generated-config", "folder-label-config", "zips"]


@pytest.fixture(scope="session")
def jobs(request, table):
    """Every selected convert and push run in the background, in test order: converts two at a
    time; push runs (which mostly wait) in a pool of their own, started first."""
    root, paths = table
    rows = {r.id: r for r in ROWS}
    futures: dict[str, Future] = {}
    converts, pushes = ThreadPoolExecutor(max_workers=2), ThreadPoolExecutor(max_workers=len(PUSH_RUNS))
    for which in _selected(request.session, "test_push"):
        out = root / "push" / which
        if which == "folder-generated-config":
            futures[f"push:{which}"] = pushes.submit(_push_job, [root / "files"], out, [], True)
        elif which == "folder-label-config":
            futures[f"push:{which}"] = pushes.submit(_push_job, [root / "files"], out,
                                                     ["--label-config", str(REPO / "label_config.xml")], False)
        else:
            futures[f"push:{which}"] = pushes.submit(_push_job, [root / "good", *(paths[r.id] for r in ZIP_ROWS)],
                                                     out, [], True)
    for rid in _selected(request.session, "test_convert"):
        futures[f"convert:{rid}"] = converts.submit(_convert_job, rows[rid], paths[rid], root / "out" / rid)
    yield futures
    for pool in (converts, pushes):
        pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- (a) convert, one file each


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_convert(row, table, jobs):
    root, paths = table
    run, tasks, report_path = jobs[f"convert:{row.id}"].result()
    symptoms = output_symptoms(run, str(root))
    if run.maxrss_mb > MAX_RSS_MB:
        symptoms.append(f"peak RSS {run.maxrss_mb:.0f} MB (limit {MAX_RSS_MB:.0f})")
    report, bad = load_report(report_path)
    if bad:
        symptoms.append(bad)
    if run.code in (0, 1) and not run.timed_out:
        if report is None:
            symptoms.append(f"exit {run.code} but no --report written")
        try:
            if not isinstance(json.loads(tasks.read_bytes()), list):
                symptoms.append("tasks.json is not a JSON array")
        except (OSError, ValueError) as err:
            symptoms.append(f"tasks.json unreadable: {str(err)[:80]}")
    clean = run.code == 0 and report is not None and not report.get("problems")
    if not (row.clean_ok and clean) and not named(paths[row.id].name, run, report):
        symptoms.append(f"file not named in stderr or report (exit {run.code})")
    assert not symptoms, f"{row.id} [{row.attacks}]: " + "; ".join(symptoms)


# ----------------------------------------------------------------------------- (b) push --dry-run


@pytest.mark.parametrize("which", PUSH_RUNS)
def test_push(which, table, jobs):
    root, paths = table
    run, report_path = jobs[f"push:{which}"].result()
    if run.note:
        import warnings

        warnings.warn(f"push {which}: {run.note}")
    symptoms = output_symptoms(run, str(root))
    report, bad = load_report(report_path)
    if bad:
        symptoms.append(bad)
    m = re.search(rb"items: (\d+) converted", run.err)
    if not m or int(m[1]) < 3:
        last = run.err.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
        symptoms.append(f"expected 'items: >=3 converted' (the good items); exit {run.code}: {last[0][:160]!r}")
    rows = FILE_ROWS if which.startswith("folder") else ZIP_ROWS
    missing = [r.id for r in rows if not r.clean_ok and not named(paths[r.id].name, run, report)]
    if missing:
        symptoms.append(f"{len(missing)} files not named: {', '.join(missing[:12])}")
    assert not symptoms, f"push {which}{' (' + run.note + ')' if run.note else ''}: " + "; ".join(symptoms)


# ----------------------------------------------------------------------------- (c) serve /predict


class Server:
    def __init__(self, source: Path, log_dir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"serve-{self.port}.log"
        self.log = open(self.log_path, "wb")
        env = {**os.environ, "WORKERS": "1", "THREADS": "4"}
        env.pop("BASIC_AUTH_USER", None)
        env.pop("BASIC_AUTH_PASS", None)
        self.proc = subprocess.Popen([*CLI, "serve", "--source", str(source), "--host", "127.0.0.1",
                                      "--port", str(self.port)], stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, cwd=REPO, start_new_session=True)
        try:
            resource.prlimit(self.proc.pid, resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))
        except (OSError, ValueError):
            pass

    def start(self, seconds: float = 60) -> "Server":
        try:
            wait_http(self.url + "/health", seconds, self.proc)
        except RuntimeError as err:
            self.stop()
            pytest.fail(f"serve did not come up: {err}; log: {self.log_text()[-600:]!r}")
        return self

    def log_text(self) -> str:
        return self.log_path.read_bytes().decode("utf-8", "replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def call(method: str, url: str, body: bytes | None = None, content_type: str = "application/json",
         timeout: float = 60) -> tuple[int | None, bytes]:
    """One request; the body goes in 64 KB pieces and, if the server stops reading (a 413 for a
    large body), its answer is still read."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.putrequest(method, parts.path or "/")
        conn.putheader("Content-Type", content_type)
        conn.putheader("Content-Length", str(len(body or b"")))
        conn.endheaders()
        try:
            for k in range(0, len(body or b""), 1 << 16):
                conn.send(body[k:k + (1 << 16)])
        except OSError:
            pass  # the server answered early and closed: read what it said
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException) as err:  # refused, reset, timed out: gone or hung
        return None, repr(err).encode()
    finally:
        conn.close()


def answer_symptoms(status: int | None, body: bytes, n_tasks: int | None) -> list[str]:
    found = []
    text = body.decode("utf-8", "replace")
    if "Traceback" in text:
        found.append("Traceback in the response body")
    if status is None:
        return found + [f"no answer: {text[:120]}"]
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if status == 200:
        results = doc.get("results") if isinstance(doc, dict) else None
        if n_tasks is not None and (not isinstance(results, list) or len(results) != n_tasks):
            found.append(f"200 without {n_tasks} results: {text[:120]}")
    elif 400 <= status < 500:
        if not (isinstance(doc, dict) and "error" in doc):
            found.append(f"{status} without a JSON error: {text[:120]}")
    else:
        err = doc.get("error") if isinstance(doc, dict) else text
        found.append(f"HTTP {status}: {str(err)[:140]}")
    return found


def health_symptoms(server: Server) -> list[str]:
    if not server.alive():
        return [f"server died (exit {server.proc.returncode})"]
    status, body = call("GET", server.url + "/health", timeout=10)
    return [] if status == 200 else [f"/health answered {status}: {body[:80]!r}"]


@pytest.fixture(scope="module")
def folder_server(table):
    root, _ = table
    server = Server(root / "files", root / "logs").start()
    yield server
    server.stop()


def task_for(row) -> dict:
    return {"dataloop_item_id": row.item_id} if row.item_id else {row.kind: row.media}


def predict_body(tasks: list[dict], kind: str = "video") -> bytes:
    return json.dumps({"tasks": [{"id": k + 1, "data": d} for k, d in enumerate(tasks)],
                       "label_config": CONFIGS[kind]}).encode()


@pytest.mark.parametrize("row", FILE_ROWS, ids=[r.id for r in FILE_ROWS])
def test_serve_file(row, folder_server):
    status, body = call("POST", folder_server.url + "/predict", predict_body([task_for(row)], row.kind))
    symptoms = answer_symptoms(status, body, 1) + health_symptoms(folder_server)
    assert not symptoms, f"{row.id} [{row.attacks}]: " + "; ".join(symptoms)


@pytest.fixture(scope="module")
def zip_servers(table):
    """One server per zip (serve takes one source; a folder's index reads only .json files), all
    started at once."""
    root, paths = table
    servers = {r.id: Server(paths[r.id], root / "logs") for r in ZIP_ROWS}
    yield servers
    for server in servers.values():
        server.stop()


@pytest.mark.parametrize("row", ZIP_ROWS, ids=[r.id for r in ZIP_ROWS])
def test_serve_zip(row, zip_servers):
    server = zip_servers[row.id].start()
    tasks = [{"video": f"{row.id}-good.mp4"}, {"video": f"{row.id}.mp4"}]
    status, body = call("POST", server.url + "/predict", predict_body(tasks))
    symptoms = answer_symptoms(status, body, 2) + health_symptoms(server)
    tb = traceback_symptom(server.log_text())
    if tb:
        symptoms.append(f"server log: {tb}")
    assert not symptoms, f"{row.id} [{row.attacks}]: " + "; ".join(symptoms)


def _deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


BILLION_LAUGHS = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
                  + "".join(f'<!ENTITY lol{k} "{("&lol" + str(k - 1) + ";") * 10 if k > 1 else "&lol;" * 10}">'
                            for k in range(1, 10))
                  + ']><View><Video name="video" value="$video"/><Labels name="l" toName="video">'
                    '<Label value="&lol9;"/></Labels><VideoRectangle name="box" toName="video"/></View>')


def _body(tasks, config=VIDEO_CONFIG) -> bytes:
    return json.dumps({"tasks": tasks, "label_config": config}).encode()


# (id, route, body bytes, content type, how many results a 200 must hold)
HOSTILE_BODIES = [
    ("item-id-list", "/predict", _body([{"data": {"dataloop_item_id": ["good-1"]}}]), None, 1),
    ("item-id-dict", "/predict", _body([{"data": {"dataloop_item_id": {"$ne": None}}}]), None, 1),
    ("item-id-number", "/predict", _body([{"data": {"dataloop_item_id": 12345}}]), None, 1),
    ("media-url-bad-ipv6", "/predict", _body([{"data": {"video": "http://[::1"}}]), None, 1),
    ("filename-bad-ipv6", "/predict", _body([{"data": {"dataloop_filename": "http://[::1/a.mp4"}}]), None, 1),
    ("media-url-list", "/predict", _body([{"data": {"video": ["good-1.mp4"]}}]), None, 1),
    ("deep-json-100k", "/predict", b'{"label_config": ' + json.dumps(VIDEO_CONFIG).encode() + b', "tasks": '
     + _deep(100_000) + b"}", None, None),
    ("body-array", "/predict", b"[" + _body([{"data": {"dataloop_item_id": "good-1"}}]) + b"]", None, None),
    ("tasks-odd-elements", "/predict", _body([None, 5, "x", {"data": None}]), None, None),
    ("tasks-object", "/predict", _body({"data": {"dataloop_item_id": "good-1"}}), None, None),
    ("config-billion-laughs", "/predict", _body([{"data": {"dataloop_item_id": "good-1"}}], BILLION_LAUGHS),
     None, 1),
    ("config-not-xml", "/predict", _body([{"data": {"dataloop_item_id": "good-1"}}], "<View><Video"), None, 1),
    ("config-no-object", "/predict", _body([{"data": {"dataloop_item_id": "good-1"}}], "<View/>"), None, 1),
    ("config-deep-xml", "/predict", _body([{"data": {"dataloop_item_id": "good-1"}}],
                                          "<View>" * 50_000 + '<Video name="v" value="$video"/>'
                                          + "</View>" * 50_000), None, 1),
    ("config-number", "/predict", json.dumps({"tasks": [], "label_config": 5}).encode(), None, 0),
    ("body-invalid-utf8", "/predict", b'{"tasks": [], "label_config": "\xff\xfe"}', None, 0),
    ("body-not-json", "/predict", b"tasks=1&label_config=x", "application/x-www-form-urlencoded", 0),
    ("body-33mb", "/predict", b'{"tasks": [], "pad": "' + b" " * (33 << 20) + b'"}', None, 0),
    ("many-tasks", "/predict", _body([{"data": {"dataloop_item_id": "good-1"}}] * 2000), None, 2000),
    ("setup-deep-json", "/setup", b'{"schema": ' + _deep(100_000) + b"}", None, None),
    ("setup-schema-list", "/setup", json.dumps({"schema": ["<View/>"]}).encode(), None, None),
    ("webhook-deep-json", "/webhook", _deep(100_000), None, None),
    ("webhook-array", "/webhook", b"[1, 2]", None, None),
]


@pytest.mark.parametrize("case", HOSTILE_BODIES, ids=[c[0] for c in HOSTILE_BODIES])
def test_serve_hostile_body(case, folder_server):
    _, route, body, ctype, n = case
    status, answer = call("POST", folder_server.url + route, body, ctype or "application/json")
    symptoms = answer_symptoms(status, answer, n if route == "/predict" else None)
    symptoms += health_symptoms(folder_server)
    assert not symptoms, f"{case[0]}: " + "; ".join(symptoms)


def test_serve_still_answers_the_good_items(folder_server):
    """Not vacuous: the index among the hostile files still finds and converts the good items."""
    body = predict_body([{"dataloop_item_id": f"good-{k}"} for k in range(1, 4)] + [{"video": "good-1.mp4"}])
    status, answer = call("POST", folder_server.url + "/predict", body)
    symptoms = answer_symptoms(status, answer, 4)
    if status == 200:
        empty = [k for k, r in enumerate(json.loads(answer)["results"]) if not r.get("result")]
        if empty:
            symptoms.append(f"no regions for good tasks {empty}")
    assert not symptoms, "; ".join(symptoms)


def test_serve_survived_without_a_traceback(folder_server):
    symptoms = health_symptoms(folder_server)
    tb = traceback_symptom(folder_server.log_text())
    if tb:
        n = folder_server.log_text().count("Traceback (most recent call last)")
        symptoms.append(f"server log holds {n} tracebacks; last: {tb}")
    assert not symptoms, "; ".join(symptoms)
