"""`dl2ls serve` keeps answering under slow and idle clients (dl2ls.web's worker, under gunicorn).

Each test starts the real server as a subprocess, with the harshest thread budget (WORKERS=1,
THREADS=2). The timeouts on requests below are liveness checks, not benchmarks.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest
import requests

from conftest import box_annotation, video_item
from dl2ls.localserver import free_port, wait_http

CONFIG = ('<View><Video name="v" value="$video" frameRate="$fps"/><Labels name="l" toName="v">'
          '<Label value="car"/></Labels><VideoRectangle name="b" toName="v"/></View>')
AUTH = ("ls", "resilience-secret")
BACKEND = Path(__file__).parent.parent / "backend"


def start(tmp_path: Path, how: str, **env_extra: str):
    src = tmp_path / "export"
    src.mkdir()
    (src / "clip.mp4.json").write_text(json.dumps(video_item([box_annotation("a1", label="car", end=5)])))
    port = free_port()
    env = {**os.environ, "BASIC_AUTH_USER": AUTH[0], "BASIC_AUTH_PASS": AUTH[1], "WORKERS": "1", "THREADS": "2",
           "DL2LS_SOURCE": str(src), **env_extra}
    if how == "serve":
        cmd = [sys.executable, "-m", "dl2ls.cli", "serve", "--source", str(src), "--host", "127.0.0.1",
               "--port", str(port)]
    else:  # the container's way: gunicorn's command line on backend/_wsgi.py
        cmd = [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "1", "--threads", "2",
               "--worker-class", "dl2ls.web.Worker", "--chdir", str(BACKEND), "_wsgi:app"]
    log = open(tmp_path / f"{how}.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", 60, proc)
    except Exception:
        proc.terminate()
        raise
    return proc, log, url, port


@pytest.fixture
def server_factory(tmp_path):
    started = []

    def make(how="serve", **env):
        proc, log, url, port = start(tmp_path, how, **env)
        started.append((proc, log))
        return url, port

    yield make
    for proc, log in started:
        proc.terminate()
        proc.wait(30)
        log.close()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def read_until_closed(sock: socket.socket) -> bytes:
    """What the server sends before it closes the connection (the socket's timeout bounds it)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def read_response(sock: socket.socket) -> bytes:
    """One whole response (its Content-Length says how long), the connection left open."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += recv_some(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += recv_some(sock)
    assert len(body) == length, "one response at a time"
    return head


def recv_some(sock: socket.socket) -> bytes:
    chunk = sock.recv(65536)
    assert chunk, "the server closed the connection"
    return chunk


def read_until_closed_or_quiet(sock: socket.socket) -> bytes:
    sock.settimeout(3)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pass
    return data


def predict_body() -> dict:
    return {"tasks": [{"data": {"dataloop_item_id": "item1"}}], "label_config": CONFIG, "project": "1.1"}


@pytest.mark.parametrize("how", ["serve", "gunicorn"])
def test_slow_and_idle_clients_never_stall_health_or_predict(server_factory, how):
    url, port = server_factory(how)
    with ExitStack() as stack:
        for i in range(16):  # half a request line or half a header block, never finished
            sock = stack.enter_context(connect(port))
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Le" if i % 2 else b"GET /hea")
        for _ in range(16):  # connected, silent
            stack.enter_context(connect(port))
        assert requests.get(f"{url}/health", timeout=2).json()["status"] == "UP"
        r = requests.post(f"{url}/predict", json=predict_body(), auth=AUTH, timeout=5)
        assert r.status_code == 200 and r.json()["results"][0]["result"][0]["value"]["labels"] == ["car"]


def test_slow_clients_are_cut_off_at_the_header_and_body_timeouts(server_factory):
    url, port = server_factory(DL2LS_HEADER_TIMEOUT="1", DL2LS_BODY_TIMEOUT="2")
    with ExitStack() as stack:
        silent = stack.enter_context(connect(port))
        partial = stack.enter_context(connect(port))
        partial.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        kept = stack.enter_context(connect(port))  # one request answered, then half of the next
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(kept).startswith(b"HTTP/1.1 200")
        kept.sendall(b"GET /health HTTP/1.1\r\nHo")
        stalled = stack.enter_context(connect(port))  # headers complete, the body never is
        stalled.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Authorization: Basic bHM6cmVzaWxpZW5jZS1zZWNyZXQ=\r\nContent-Length: 1000\r\n\r\n{\"ta")
        # while one thread waits on that body, the other answers
        assert requests.get(f"{url}/health", timeout=2).status_code == 200
        assert read_until_closed(silent) == b""
        assert read_until_closed(partial).startswith(b"HTTP/1.1 408")
        assert read_until_closed(kept).startswith(b"HTTP/1.1 408")
        assert read_until_closed(stalled).startswith(b"HTTP/1.1 408")
        # both threads held by stalled bodies: cut off in time, and the service answers again
        both = [stack.enter_context(connect(port)) for _ in range(2)]
        for sock in both:
            sock.sendall(b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n"
                         b"Authorization: Basic bHM6cmVzaWxpZW5jZS1zZWNyZXQ=\r\n\r\n{")
        assert all(read_until_closed(sock) for sock in both)
        assert requests.get(f"{url}/health", timeout=2).status_code == 200
        assert requests.post(f"{url}/predict", json=predict_body(), auth=AUTH, timeout=5).status_code == 200


def test_request_headers_over_the_limit_are_answered_431(server_factory):
    url, port = server_factory()
    with connect(port) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Filler: " + b"a" * (80 << 10))
        assert read_until_closed(sock).startswith(b"HTTP/1.1 431")
    assert requests.get(f"{url}/health", timeout=2).status_code == 200


def test_kept_alive_connections_serve_several_requests_and_bodies_left_unread(server_factory):
    url, port = server_factory()
    with requests.Session() as session:
        for _ in range(3):
            assert session.get(f"{url}/health", timeout=5).status_code == 200
            # 401: the app reads no body; the worker reads it off before the next request
            assert session.post(f"{url}/predict", data=b"x" * 100_000, timeout=5).status_code == 401
            r = session.post(f"{url}/predict", json=predict_body(), auth=AUTH, timeout=5)
            assert r.status_code == 200 and r.json()["results"][0]["result"]


def test_pipelined_requests_are_all_answered(server_factory):
    url, port = server_factory()
    with connect(port) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" * 3)
        assert read_until_closed_or_quiet(sock).count(b"HTTP/1.1 200") == 3
