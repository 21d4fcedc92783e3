"""The media proxy, `GET`/`HEAD /media/<item id>?sig=…`: the item's binary streamed from Dataloop
(the stand-in) with the service's own token, ranges and validators passed through, the signature
as the only key (basic auth does not apply), the token nowhere in an answer or a log line.

Fast: the Flask test client for the rules, a real `dl2ls serve` (gunicorn, dl2ls.web.Worker) for
what only a real connection shows: a Dataloop connection broken midway ends the browser's answer
at once, a browser that goes away midway leaves nothing behind, and streaming 200 MB keeps the
worker's memory flat. No Label Studio."""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from pathlib import Path

import pytest
import requests

from dataloop_standin import DataloopStandIn
from dl2ls import media, server, service
from dl2ls.media import MediaProxy, signature
from service_harness import ServiceProcess

SECRET = "media-secret-for-tests"
ITEM = "65a1b2c3d4e5f60718293a4b"
SIZE = 3 * 1000 * 1000 + 17  # not a multiple of the chunk
DATA = random.Random(7).randbytes(SIZE)

ENV_CLEARED = ("DL2LS_SOURCE", "DL2LS_DATASET", "BASIC_AUTH_USER", "BASIC_AUTH_PASS", "LABEL_STUDIO_URL",
               "LABEL_STUDIO_API_KEY", "DL2LS_PUBLIC_URL", "DL2LS_MEDIA_SECRET", "DATALOOP_USERNAME",
               "DATALOOP_PASSWORD")


def url_of(item_id: str = ITEM, secret: str = SECRET) -> str:
    return f"/media/{item_id}?sig={signature(item_id, secret)}"


@pytest.fixture
def standin():
    s = DataloopStandIn().start()
    s.put_item("ds1", {"id": ITEM, "name": "clip.webm", "filename": "/videos/clip.webm", "dir": "/videos",
                       "annotations": []})
    s.media[ITEM] = DATA
    yield s
    s.stop()


@pytest.fixture
def make_app(tmp_path, monkeypatch, standin):
    """A service-mode app (no runner) reading the stand-in; `make_app(secret=..., env=...)`."""
    for key in ENV_CLEARED:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("DL2LS_NO_RUNNER", "1")
    monkeypatch.setenv("DATALOOP_API_URL", standin.url)
    monkeypatch.setenv("DATALOOP_API_KEY", standin.api_key)
    monkeypatch.setattr(service.Service, "start", lambda self: None)
    made = []

    def make(secret: str | None = SECRET, env: dict | None = None, source: str | None = None):
        if secret:
            monkeypatch.setenv("DL2LS_MEDIA_SECRET", secret)
        else:
            monkeypatch.delenv("DL2LS_MEDIA_SECRET", raising=False)
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        app = server.create_app(source=source, model_dir=str(tmp_path / f"model{len(made)}"))
        made.append(app)
        return app.test_client()
    return make


def streamed(standin) -> int:
    return standin.requests["/api/v1/items/<item_id>/stream"]


# ----------------------------------------------------------------------------- the signature


def test_missing_or_wrong_signature_is_403_and_dataloop_is_not_asked(make_app, standin, caplog):
    client = make_app()
    caplog.set_level(logging.INFO)
    wrong = signature(ITEM, "another secret")
    for path in (f"/media/{ITEM}", f"/media/{ITEM}?sig=", f"/media/{ITEM}?sig={wrong}",
                 f"/media/{ITEM}?sig={signature('another-item', SECRET)}", f"/media/{ITEM}?sig={wrong[:-1]}"):
        for method in ("GET", "HEAD"):
            r = client.open(path, method=method)
            assert r.status_code == 403, (path, method)
            if method == "GET":
                assert r.json == {"error": "wrong or missing signature"}
    assert streamed(standin) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "dl2ls.media"]
    assert len(lines) == 10 and all(ITEM in line and "403" in line for line in lines)
    assert wrong not in caplog.text and wrong[:-1] not in caplog.text


def test_without_a_secret_the_proxy_is_off_and_says_how_to_turn_it_on(make_app, standin):
    r = make_app(secret=None).get(url_of())
    assert r.status_code == 404 and "DL2LS_MEDIA_SECRET" in r.json["error"]
    assert streamed(standin) == 0


def test_a_short_secret_is_refused(make_app):
    with pytest.raises(SystemExit, match="at least 16"):
        make_app(secret="short")


def test_a_rotated_secret_revokes_every_url(make_app):
    old = url_of(secret="the old secret, before rotation")
    assert make_app(secret="the old secret, before rotation").get(old).status_code == 200
    rotated = make_app(secret="a new secret, rotated")
    assert rotated.get(old).status_code == 403
    assert rotated.get(url_of(secret="a new secret, rotated")).data == DATA


def test_the_signed_url_is_what_media_proxy_writes_into_tasks(make_app):
    proxied = MediaProxy("http://backend.example:9090/", SECRET).url(ITEM)
    assert proxied == f"http://backend.example:9090{url_of()}"
    assert make_app().get(proxied.split(":9090", 1)[1]).status_code == 200


# ----------------------------------------------------------------------------- bytes, ranges, headers


def test_a_full_get_is_the_item_with_its_headers(make_app, standin):
    r = make_app().get(url_of())
    assert r.status_code == 200 and r.data == DATA
    assert r.headers["Content-Length"] == str(SIZE)
    assert r.headers["Content-Type"] == "video/webm"
    assert r.headers["Accept-Ranges"] == "bytes"
    assert r.headers["Cache-Control"] == "private, max-age=3600"
    assert r.headers["ETag"] and r.headers["Last-Modified"]
    assert streamed(standin) == 1


@pytest.mark.parametrize("given, first, last", [
    ("bytes=0-1", 0, 1),
    ("bytes=0-0", 0, 0),
    ("bytes=1000-2999999", 1000, 2999999),
    (f"bytes=2999990-{SIZE - 1}", 2999990, SIZE - 1),
    ("bytes=2999990-", 2999990, SIZE - 1),  # open-ended, as a video element asks
    ("bytes=-100", SIZE - 100, SIZE - 1),  # a suffix
    (f"bytes=12345-{SIZE + 500}", 12345, SIZE - 1),  # past the end: up to the end
])
def test_a_range_is_206_with_exactly_those_bytes(make_app, given, first, last):
    r = make_app().get(url_of(), headers={"Range": given})
    assert r.status_code == 206
    assert r.headers["Content-Range"] == f"bytes {first}-{last}/{SIZE}"
    assert r.headers["Content-Length"] == str(last - first + 1)
    assert r.headers["Content-Type"] == "video/webm"
    assert r.data == DATA[first:last + 1]


def test_a_range_past_the_end_is_416(make_app):
    r = make_app().get(url_of(), headers={"Range": f"bytes={SIZE}-"})
    assert r.status_code == 416 and r.headers["Content-Range"] == f"bytes */{SIZE}"


def test_head_answers_the_headers_without_the_body(make_app, standin):
    client = make_app()
    r = client.head(url_of())
    assert r.status_code == 200 and r.data == b""
    assert r.headers["Content-Length"] == str(SIZE) and r.headers["Content-Type"] == "video/webm"
    r = client.head(url_of(), headers={"Range": "bytes=10-19"})
    assert r.status_code == 206 and r.headers["Content-Range"] == f"bytes 10-19/{SIZE}" and r.data == b""


def test_validators_are_passed_through(make_app):
    client = make_app()
    etag, modified = (client.head(url_of()).headers[k] for k in ("ETag", "Last-Modified"))
    r = client.get(url_of(), headers={"If-None-Match": etag})
    assert r.status_code == 304 and r.data == b"" and r.headers["ETag"] == etag
    assert r.headers["Cache-Control"] == "private, max-age=3600"
    assert client.get(url_of(), headers={"If-Modified-Since": modified}).status_code == 304
    # If-Range: a range of the same version, else the whole (changed) file
    r = client.get(url_of(), headers={"Range": "bytes=0-9", "If-Range": etag})
    assert r.status_code == 206 and r.data == DATA[:10]
    r = client.get(url_of(), headers={"Range": "bytes=0-9", "If-Range": '"another-version"'})
    assert r.status_code == 200 and r.data == DATA


def test_content_type_from_the_item_name_when_dataloop_gives_none(make_app, standin, tmp_path):
    client = make_app()
    standin.media_types[ITEM] = ""
    r = client.get(url_of(), headers={"Range": "bytes=0-3"})
    assert r.headers["Content-Type"] == "video/webm" and r.data == DATA[:4]
    standin.media_types[ITEM] = "application/octet-stream"
    assert client.get(url_of(), headers={"Range": "bytes=0-3"}).headers["Content-Type"] == "video/webm"
    standin.media_types[ITEM] = "video/mp4"  # Dataloop's own, when it says one, wins
    assert client.get(url_of(), headers={"Range": "bytes=0-3"}).headers["Content-Type"] == "video/mp4"


def test_media_from_a_file_on_the_stand_in(make_app, standin, tmp_path):
    path = tmp_path / "clip.webm"
    path.write_bytes(DATA)
    standin.media[ITEM] = path
    r = make_app().get(url_of(), headers={"Range": "bytes=100-"})
    assert r.status_code == 206 and r.data == DATA[100:]


# ----------------------------------------------------------------------------- Dataloop's answers


def test_dataloop_failures_are_404_or_502_in_one_line(make_app, standin, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    client = make_app()
    missing = "65a1b2c3d4e5f60718290000"
    r = client.get(url_of(missing))
    assert r.status_code == 404 and missing in r.json["error"]
    # a transient 503 is tried again; three in a row are 502
    standin.faults = [("503",)]
    assert client.get(url_of()).data == DATA
    standin.faults = [("503",)] * 3
    r = client.get(url_of())
    assert r.status_code == 502 and "HTTP 503" in r.json["error"] and "\n" not in r.json["error"]
    standin.faults = [("drop",)] * 3
    assert client.get(url_of()).status_code == 502
    # the service's token refused: 502, never the token
    standin.valid_tokens.discard(standin.api_key)
    r = client.get(url_of())
    assert r.status_code == 502 and "credentials" in r.json["error"] and "401" in r.json["error"]
    assert standin.api_key not in r.get_data(as_text=True) + caplog.text
    assert "Traceback" not in caplog.text


def test_an_expired_login_is_renewed_once(make_app, standin, monkeypatch):
    monkeypatch.delenv("DATALOOP_API_KEY")
    monkeypatch.setenv("DATALOOP_USERNAME", standin.credentials[0])
    monkeypatch.setenv("DATALOOP_PASSWORD", standin.credentials[1])
    client = make_app()
    assert client.get(url_of(), headers={"Range": "bytes=0-9"}).data == DATA[:10]
    standin.expire_next |= set(standin.valid_tokens) - {standin.api_key}
    assert client.get(url_of(), headers={"Range": "bytes=0-9"}).data == DATA[:10]


def test_without_dataloop_credentials_it_is_503(make_app, monkeypatch):
    monkeypatch.delenv("DATALOOP_API_KEY")
    r = make_app().get(url_of())
    assert r.status_code == 503 and "DATALOOP_API_KEY" in r.json["error"]


def test_offline_mode_serves_media_too(make_app, tmp_path, monkeypatch):
    source = tmp_path / "export"
    source.mkdir()
    client = make_app(source=str(source))
    assert client.get(url_of(), headers={"Range": "bytes=5-9"}).data == DATA[5:10]
    assert client.get(f"/media/{ITEM}").status_code == 403


def test_a_broken_dataloop_connection_ends_the_body_short(make_app, standin, caplog):
    caplog.set_level(logging.INFO)
    client = make_app()
    standin.break_stream_after = 1_000_000
    r = client.get(url_of())
    assert r.status_code == 200 and r.data == DATA[:len(r.data)] and len(r.data) < SIZE
    lines = [r.getMessage() for r in caplog.records if "broke" in r.getMessage()]
    assert len(lines) == 1 and ITEM in lines[0]
    assert "Traceback" not in caplog.text
    standin.break_stream_after = None
    assert client.get(url_of()).data == DATA


# ----------------------------------------------------------------------------- basic auth, secrets


def test_basic_auth_does_not_apply_to_media_the_signature_does(make_app, standin, caplog):
    caplog.set_level(logging.DEBUG)
    client = make_app(env={"BASIC_AUTH_USER": "ls", "BASIC_AUTH_PASS": "pw"})
    assert client.post("/predict", json={}).status_code == 401
    r = client.get(url_of(), headers={"Range": "bytes=0-99"})
    assert r.status_code == 206 and r.data == DATA[:100]
    assert client.get(f"/media/{ITEM}").status_code == 403  # not 401: the signature is what counts
    # the token and the secret: in no answer, no log line
    seen = caplog.text.encode()
    for r in (client.get(url_of()), client.head(url_of()), client.get(url_of("nope"))):
        seen += str(r.headers).encode() + r.get_data()
    assert standin.api_key.encode() not in seen and SECRET.encode() not in seen


# ----------------------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """`dl2ls serve` (gunicorn, dl2ls.web.Worker) with basic auth and the proxy, on the stand-in."""
    s = DataloopStandIn().start()
    s.put_item("ds1", {"id": ITEM, "name": "clip.webm", "annotations": []})
    s.media[ITEM] = DATA
    proc = ServiceProcess(s.url, s.api_key, "http://127.0.0.1:9", tmp_path_factory.mktemp("media") / "model",
                          env={"DL2LS_MEDIA_SECRET": SECRET, "BASIC_AUTH_USER": "ls", "BASIC_AUTH_PASS": "pw",
                               "DL2LS_NO_RUNNER": "1"}).start()
    yield s, proc
    proc.stop()
    s.stop()


def worker_pids(master: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == master:
                found.append(int(entry.name))
    return found


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_real_server_ranges_and_auth(real):
    standin, proc = real
    r = requests.get(proc.url + url_of(), headers={"Range": "bytes=2000000-"}, timeout=30)
    assert r.status_code == 206 and r.content == DATA[2000000:]
    assert r.headers["Content-Range"] == f"bytes 2000000-{SIZE - 1}/{SIZE}"
    assert requests.head(proc.url + url_of(), timeout=30).headers["Content-Length"] == str(SIZE)
    assert requests.get(proc.url + url_of(), timeout=30).content == DATA
    assert requests.get(f"{proc.url}/media/{ITEM}", timeout=30).status_code == 403
    assert requests.post(f"{proc.url}/predict", json={}, timeout=30).status_code == 401
    log = proc.log()
    assert standin.api_key not in log and SECRET not in log and signature(ITEM, SECRET) not in log


def test_real_server_a_broken_dataloop_connection_ends_the_answer_at_once(real):
    standin, proc = real
    before = proc.log().count("broke after")
    standin.break_stream_after = 700_000
    try:
        started = time.monotonic()
        got = b""
        with pytest.raises(requests.exceptions.ChunkedEncodingError):  # short of its Content-Length
            with requests.get(proc.url + url_of(), stream=True, timeout=30) as r:
                assert r.status_code == 200
                for chunk in r.iter_content(65536):
                    got += chunk
        assert time.monotonic() - started < 5  # not left waiting for bytes that will never come
        assert len(got) < SIZE and got == DATA[:len(got)]
    finally:
        standin.break_stream_after = None
    time.sleep(0.3)
    log = proc.log()
    assert log.count("broke after") == before + 1 and "Traceback" not in log
    assert requests.get(proc.url + url_of(), timeout=30).content == DATA  # the next one works


def test_real_server_a_browser_that_goes_away_midway_leaves_nothing_behind(real):
    standin, proc = real
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", proc.port)) as sock:
            sock.sendall(f"GET {url_of()} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert sock.recv(1000).startswith(b"HTTP/1.1 200")
        # closed after the first bytes, as a video element that seeks elsewhere
    time.sleep(0.5)
    assert requests.get(proc.url + url_of(), headers={"Range": "bytes=0-9"}, timeout=30).content == DATA[:10]
    assert "Traceback" not in proc.log()


def test_real_server_streams_200_mb_in_flat_memory(real, tmp_path):
    standin, proc = real
    big = tmp_path / "big.webm"
    with open(big, "wb") as f:
        f.truncate(200 << 20)  # sparse: no disk, no memory in this process
    standin.media[ITEM] = big
    try:
        worker = worker_pids(proc.proc.pid)[0]
        requests.get(proc.url + url_of(), headers={"Range": "bytes=0-9"}, timeout=30)  # warm
        idle = rss(worker)
        peak, done = [idle], threading.Event()

        def sample():
            while not done.is_set():
                peak.append(rss(worker))
                time.sleep(0.02)
        threading.Thread(target=sample, daemon=True).start()
        size = 0
        with requests.get(proc.url + url_of(), stream=True, timeout=60) as r:
            for chunk in r.iter_content(1 << 20):
                size += len(chunk)
        done.set()
        assert size == 200 << 20
        assert max(peak) - idle < 50 << 20, f"worker RSS grew {(max(peak) - idle) >> 20} MB"
    finally:
        standin.media[ITEM] = DATA


# ----------------------------------------------------------------------------- relay, alone


class FakeRaw:
    def __init__(self, parts, fail: Exception | None = None):
        self.parts, self.fail, self.asked = list(parts), fail, []

    def read(self, amt, decode_content=True):
        assert decode_content is False  # the bytes as Dataloop sent them
        self.asked.append(amt)
        if self.parts:
            return self.parts.pop(0)
        if self.fail is not None:
            raise self.fail
        return b""


class FakeUpstream:
    def __init__(self, raw, length=None):
        self.raw, self.closed = raw, 0
        self.headers = {"Content-Length": str(length)} if length is not None else {}

    def close(self):
        self.closed += 1


def test_relay_reads_small_first_then_doubling_up_to_the_chunk():
    raw = FakeRaw([b"x"] * 8)
    assert b"".join(media.relay(FakeUpstream(raw), ITEM, str, lambda: None)) == b"x" * 8
    assert raw.asked[:6] == [64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20, 1 << 20]
    assert max(raw.asked) == media.CHUNK


@pytest.mark.parametrize("fail, length", [(ConnectionResetError("reset by peer"), None), (None, 10)])
def test_relay_ends_cleanly_on_a_break_or_a_short_body(fail, length, caplog):
    caplog.set_level(logging.INFO)
    cuts = []
    upstream = FakeUpstream(FakeRaw([b"abc", b"def"], fail), length)
    assert b"".join(media.relay(upstream, ITEM, lambda e: type(e).__name__, lambda: cuts.append(1))) == b"abcdef"
    assert cuts == [1] and upstream.closed >= 1
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "broke after 6 of" in lines[0]


def test_relay_closes_dataloop_when_the_browser_goes_away(caplog):
    cuts = []
    upstream = FakeUpstream(FakeRaw([b"abc", b"def", b"ghi"]))
    body = media.relay(upstream, ITEM, str, lambda: cuts.append(1))
    assert next(body) == b"abc"
    body.close()  # what the server does when the client is gone
    assert upstream.closed == 1 and cuts == [] and not caplog.records


def test_relay_passes_a_body_without_content_length(caplog):
    upstream = FakeUpstream(FakeRaw([b"a" * 10, b"b" * 5]))
    assert b"".join(media.relay(upstream, ITEM, str, lambda: None)) == b"a" * 10 + b"b" * 5
    assert not caplog.records


# ----------------------------------------------------------------------------- CORS


def test_cors_lets_the_editor_fetch_and_draw_the_video(make_app):
    """Label Studio's editor fetches `Range: bytes=0-0` for the Content-Type of a URL without an
    extension, and its video element is crossOrigin="anonymous" (frames go on a canvas): without
    these headers the video never loads (seen in the browser test)."""
    client = make_app(env={"BASIC_AUTH_USER": "ls", "BASIC_AUTH_PASS": "pw"})
    r = client.get(url_of(), headers={"Range": "bytes=0-0", "Origin": "http://ls.example:8080"})
    assert r.status_code == 206 and r.headers["Access-Control-Allow-Origin"] == "*"
    assert "Content-Range" in r.headers["Access-Control-Expose-Headers"]
    assert "Access-Control-Allow-Credentials" not in r.headers  # the signature is the key, not cookies
    assert client.get(f"/media/{ITEM}").headers["Access-Control-Allow-Origin"] == "*"  # errors readable too
    r = client.options(url_of(), headers={"Origin": "http://ls.example:8080", "Access-Control-Request-Method": "GET",
                                          "Access-Control-Request-Headers": "range"})
    assert r.status_code == 204 and r.headers["Access-Control-Allow-Origin"] == "*"
    assert "Range" in r.headers["Access-Control-Allow-Headers"] and "GET" in r.headers["Access-Control-Allow-Methods"]
