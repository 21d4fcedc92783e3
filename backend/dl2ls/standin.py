"""A local stand-in for Dataloop's REST API, for tests, benchmarks and `make demo`.

Dataloop is a cloud service these tests cannot reach. This Flask app follows the documented
request and response shapes exactly (shared/reference/dataloop.md, from Dataloop's OpenAPI
description and its SDK dtlpy): Bearer JWT auth and POST {gate}/token?default; GET /users/me;
GET /datasets/{id}; POST /datasets/{id}/query with a DQL body (`$and` of field equalities and
`$gt`/`$gte`/`$lte`, as dtlpy's id ranges use them), sorted on `id`, paged by `page`/`pageSize`, answering `{items, totalItemsCount,
totalPagesCount, hasNextPage}`; GET /items/{id}; GET /items/{id}/annotations (a plain array);
POST /datasets/{id}/export -> a command polled with GET /commands/{id} until `success`, whose
`spec.outputItemId` streams a JSON array of items with their annotations.

It serves whatever items a test puts in `datasets`, counts every request by route, and injects
faults on demand: 429 with Retry-After, 503, a dropped connection, an expired token; a cap on the
page size (at most `page_cap` items per page whatever `pageSize` asks, with `hasNextPage` and
`totalPagesCount` true to it), or answers without those fields; items keyed by `_id` alone; an
export download given verbatim (`export_body`: broken elements, truncation); `latency` seconds
before every answer, as a distant server has; a query `hold` picks held until `released`.

It serves media too: `media[item_id]` (bytes, or a Path) is what GET /items/{id}/stream answers
for that item, with HTTP range requests (206, Content-Range, Accept-Ranges; If-Range, ETag,
Last-Modified, 304) as a storage server does; `media_types[item_id]` overrides its Content-Type
("" leaves the header out). `break_stream_after = N` breaks the connection after N bytes of each
media body (until set back to None); `media_rate` paces media bodies at that many bytes per second,
as a network link would. Export outputs stream as before.

It also sends webhooks as a Dataloop trigger with a webhook target does (`hooks`, `add_hook`;
`edit_annotations`, `delete_item`, `put_item(..., notify=True)`): one POST per changed resource,
from a background thread. Dataloop does not document the outbound body; posting the resource
object itself (an annotation with `itemId` and `datasetId`, or an item) is our assumption.
"""

from __future__ import annotations

import base64
import copy
import json
import queue
import threading
import mimetypes
import socket
import time
import urllib.error
import urllib.request
from collections import ChainMap, Counter
from collections.abc import Mapping
from io import BytesIO
from pathlib import Path
from typing import Any, Callable

import orjson
from flask import Flask, jsonify, request
from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.wrappers import Response
from werkzeug.wsgi import FileWrapper

MEDIA_CHUNK = 256 << 10  # what the stand-in reads and writes at a time when it serves media


def make_jwt(exp: float, sub: str = "tester@example.com") -> str:
    def part(obj):
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")
    return f"{part({'alg': 'none'})}.{part({'exp': exp, 'email': sub})}.sig"


class DataloopStandIn:
    def __init__(self, username: str = "tester@example.com", password: str = "pw"):
        self.datasets: dict[str, dict[str, dict]] = {}  # dataset id -> item id -> item (with annotations)
        self.api_key = make_jwt(time.time() + 3600)
        self.valid_tokens = {self.api_key}
        self.credentials = (username, password)
        self.faults: list[tuple] = []  # consumed one per request: ("429", secs) | ("503",) | ("drop",)
        self.expire_next: set[str] = set()  # tokens answered with 401 once
        self.requests: Counter = Counter()
        self.commands: dict[str, dict] = {}
        self.export_polls = 2
        self.page_cap: int | None = None  # the most items a query page holds, whatever pageSize asks
        self.omit_page_fields: set[str] = set()  # e.g. {"hasNextPage"}: left out of query answers
        self.export_body: bytes | None = None  # when set, what every export download returns, verbatim
        self.media: dict[str, bytes | Path] = {}  # item id -> its binary, for GET /items/{id}/stream
        self.media_types: dict[str, str] = {}  # item id -> its Content-Type ("": none sent)
        self.break_stream_after: int | None = None  # a media body's connection breaks after this many bytes
        self.media_rate: float | None = None  # bytes per second a media body is sent at (None: at once)
        self.latency: float = 0.0  # seconds every request waits before it is answered (a distant server)
        # a query whose body `hold(body)` picks waits until `released` is set (a test stops a job there)
        self.hold: Callable[[dict], bool] | None = None
        self.released = threading.Event()
        self.started = time.time()
        self.lock = threading.Lock()
        self.app = self._build()
        self.server = None
        # trigger-style webhooks: where they go, and what became of each (for tests to wait on)
        self.hooks: list[str] = []  # URLs, each may carry ?secret=...
        self.hook_deliveries: list[tuple[str, int]] = []  # (url, HTTP status) per POST answered
        self.hook_errors: list[str] = []  # "<url>: <why>" per POST that got no answer
        self.hook_sent: list[tuple[str, str, dict]] = []  # (resource, action, body) per POST made
        self._hook_queue: queue.Queue = queue.Queue()
        self._hook_pending = 0
        self._hook_done = threading.Condition()
        self._hook_thread: threading.Thread | None = None

    # -- data -----------------------------------------------------------------------------------

    def put_item(self, dataset_id: str, item: dict, touch: bool = True, notify: bool = False) -> None:
        """Add or replace an item (with its annotations). `notify`: post an item Created/Updated
        hook, as an item trigger would."""
        item = copy.deepcopy(item)
        item["datasetId"] = dataset_id
        if touch:
            item["updatedAt"] = self.now()
        item["annotationsCount"] = len(item.get("annotations") or [])
        existed = _key(item) in self.datasets.get(dataset_id, {})
        self.datasets.setdefault(dataset_id, {})[_key(item)] = item
        if notify:
            self._notify("Item", "Updated" if existed else "Created", _item_json(item))

    def edit_annotations(self, item_id: str, annotations: list[dict]) -> list[tuple[str, dict]]:
        """Replace an item's annotations, as an annotator saving in Dataloop does: each new or
        changed annotation gets a fresh `updatedAt`, the item too, and `annotationsCount` follows.
        Posts one hook per annotation created, updated or deleted (never blocking the caller);
        returns those (action, annotation JSON) pairs."""
        with self.lock:
            item = self._find(item_id)
            if item is None:
                raise KeyError(f"no item {item_id!r}")
            dataset_id = item["datasetId"]
            old = {a.get("id"): a for a in item.get("annotations") or [] if a.get("id")}
            now = self.now()
            kept, changes = [], []
            for n, given in enumerate(copy.deepcopy(annotations)):
                if not given.get("id"):
                    given["id"] = f"{item_id}-ann-{time.time_ns()}-{n}"
                before = old.pop(given["id"], None)
                if before is None:
                    given["updatedAt"] = now
                    changes.append(("Created", given))
                elif _content(before) != _content(given):
                    given["updatedAt"] = now
                    changes.append(("Updated", given))
                else:
                    given["updatedAt"] = before.get("updatedAt", given.get("updatedAt"))
                kept.append(given)
            changes += [("Deleted", gone) for gone in old.values()]
            item["annotations"] = kept
            item["annotationsCount"] = len(kept)
            if changes:
                item["updatedAt"] = now
        posted = []
        for action, annotation in changes:
            body = dict(copy.deepcopy(annotation), itemId=item_id, datasetId=dataset_id)
            posted.append((action, body))
            self._notify("Annotation", action, body)
        return posted

    def delete_item(self, item_id: str) -> dict:
        """Remove an item; posts its JSON (an item Deleted hook). Returns the item removed."""
        with self.lock:
            for items in self.datasets.values():
                if item_id in items:
                    gone = items.pop(item_id)
                    break
            else:
                raise KeyError(f"no item {item_id!r}")
        self._notify("Item", "Deleted", _item_json(gone))
        return gone

    # -- webhooks out ---------------------------------------------------------------------------

    def add_hook(self, url: str) -> None:
        """Post every later event to `url` (a trigger with a webhook target)."""
        self.hooks.append(url)

    def _notify(self, resource: str, action: str, body: dict) -> None:
        if not self.hooks:
            return
        with self._hook_done:
            self._hook_pending += len(self.hooks)
            if self._hook_thread is None:
                self._hook_thread = threading.Thread(target=self._send_hooks, name="standin-hooks", daemon=True)
                self._hook_thread.start()
        for url in list(self.hooks):
            self._hook_queue.put((url, resource, action, body))

    def _send_hooks(self) -> None:
        """One thread posts the hooks in the order they happened; no failure reaches the caller."""
        while True:
            url, resource, action, body = self._hook_queue.get()
            try:
                self.hook_sent.append((resource, action, body))
                data = json.dumps(body).encode()
                req = urllib.request.Request(url, data=data, method="POST",
                                             headers={"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(req, timeout=10) as answer:
                        status = answer.status
                except urllib.error.HTTPError as err:  # an answer all the same
                    status = err.code
                self.hook_deliveries.append((url, status))
            except Exception as err:  # noqa: BLE001 - a hook that cannot be delivered is only recorded
                self.hook_errors.append(f"{url}: {type(err).__name__}: {err}")
            finally:
                with self._hook_done:
                    self._hook_pending -= 1
                    self._hook_done.notify_all()

    def wait_hooks(self, timeout: float = 10.0) -> bool:
        """Wait until every hook posted so far was delivered or failed; False on timeout."""
        with self._hook_done:
            return self._hook_done.wait_for(lambda: self._hook_pending == 0, timeout)

    @staticmethod
    def now() -> str:
        t = time.time()
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"

    # -- server ---------------------------------------------------------------------------------

    def start(self) -> "DataloopStandIn":
        import logging

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
        self.server = make_server("127.0.0.1", 0, self.app, threaded=True, request_handler=_Handler)
        # a short poll: stop() returns at once rather than after half a second
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/api/v1"

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()

    def _build(self) -> Flask:
        app = Flask("dataloop-standin")
        app.json.sort_keys = False  # answers as a server sends them: no sorting pass over megabytes
        standin = self

        @app.before_request
        def faults_and_auth():
            route = request.url_rule.rule if request.url_rule else request.path
            standin.requests[route] += 1
            if standin.latency:
                time.sleep(standin.latency)
            with standin.lock:
                fault = standin.faults.pop(0) if standin.faults else None
            if fault and fault[0] == "429":
                return jsonify(message="rate limited"), 429, {"Retry-After": str(fault[1])}
            if fault and fault[0] == "503":
                return jsonify(message="unavailable"), 503
            if fault and fault[0] == "drop":
                sock = request.environ.get("werkzeug.socket")
                if sock is not None:
                    import socket as _socket

                    sock.shutdown(_socket.SHUT_RDWR)
                    sock.close()
                return "", 500
            if request.path.startswith("/token"):
                return None
            header = request.headers.get("Authorization", "")
            token = header[7:] if header.startswith("Bearer ") else None
            if token in standin.expire_next:
                standin.expire_next.discard(token)
                standin.valid_tokens.discard(token)
                return jsonify(message="jwt expired"), 401
            if token not in standin.valid_tokens:
                return jsonify(message="unauthorized"), 401
            return None

        @app.post("/token")
        def token():
            body = request.get_json(force=True)
            if body.get("type") == "user_credentials" and (body.get("username"), body.get("password")) == \
                    standin.credentials:
                pass
            elif body.get("type") == "refresh_token" and body.get("refresh_token") == "refresh-me":
                pass
            else:
                return jsonify(message="invalid credentials"), 401
            new = make_jwt(time.time() + 3600)
            standin.valid_tokens.add(new)
            return jsonify(id_token=new, refresh_token="refresh-me")

        @app.get("/api/v1/users/me")
        def me():
            return jsonify(id="tester@example.com", email="tester@example.com")

        @app.get("/api/v1/datasets/<dataset_id>")
        def dataset(dataset_id):
            if dataset_id not in standin.datasets:
                return jsonify(message="not found"), 404
            return jsonify(id=dataset_id, name=f"dataset {dataset_id}", itemsCount=len(standin.datasets[dataset_id]))

        @app.post("/api/v1/datasets/<dataset_id>/query")
        def query(dataset_id):
            if dataset_id not in standin.datasets:
                return jsonify(message="not found"), 404
            body = request.get_json(force=True)
            if standin.hold is not None and standin.hold(body) and not standin.released.wait(120):
                return jsonify(message="held too long"), 503
            resource = body.get("resource", "items")
            items = standin.datasets[dataset_id].values()
            flt = body.get("filter") or {}
            # filtered on a view, copied only when matched: a query costs what it returns, as an
            # indexed server's does, not a copy of the whole dataset
            if resource == "annotations":
                rows = [dict(a, itemId=_key(i), datasetId=dataset_id) for i in items
                        for a in (i.get("annotations") or [])
                        if _matches(ChainMap({"itemId": _key(i), "datasetId": dataset_id}, a), flt)]
            else:
                rows = [{k: v for k, v in i.items() if k != "annotations"} | {"type": "file", "hidden": False}
                        for i in items if _matches(ChainMap({"type": "file", "hidden": False}, i), flt)]
            rows.sort(key=_key)
            page, size = int(body.get("page", 0)), int(body.get("pageSize", 1000))
            if standin.page_cap:
                size = min(size, standin.page_cap)
            chunk = rows[page * size:(page + 1) * size]
            pages = (len(rows) + size - 1) // size
            answer = dict(items=chunk, totalItemsCount=len(rows), totalPagesCount=pages, hasNextPage=page + 1 < pages)
            # orjson: pages of annotations are megabytes, and the stand-in's encoder is not what is measured
            return app.response_class(orjson.dumps({k: v for k, v in answer.items()
                                                    if k not in standin.omit_page_fields}),
                                      mimetype="application/json")

        @app.get("/api/v1/items/<item_id>")
        def item(item_id):
            found = standin._find(item_id)
            if found is None:
                return jsonify(message="not found"), 404
            return jsonify({k: v for k, v in found.items() if k != "annotations"})

        @app.get("/api/v1/items/<item_id>/annotations")
        def annotations(item_id):
            found = standin._find(item_id)
            if found is None:
                return jsonify(message="not found"), 404
            return jsonify(found.get("annotations") or [])

        @app.post("/api/v1/datasets/<dataset_id>/export")
        def export(dataset_id):
            body = request.get_json(force=True)
            items = list(standin.datasets.get(dataset_id, {}).values())
            flt = ((body.get("itemsQuery") or {}).get("filter")) or {}
            items = [i for i in items if _matches(i, flt)]
            cid = f"cmd{len(standin.commands) + 1}"
            done = standin.export_polls <= 0  # an export small enough to be ready at once
            standin.commands[cid] = {"id": cid, "status": "success" if done else "created", "polls": 0,
                                     "spec": {"outputItemId": f"export-{cid}"}, "payload": items}
            return jsonify(id=cid, status=standin.commands[cid]["status"],
                           spec=standin.commands[cid]["spec"] if done else {})

        @app.get("/api/v1/commands/<cid>")
        def command(cid):
            cmd = standin.commands[cid]
            cmd["polls"] += 1
            if cmd["polls"] >= standin.export_polls:
                cmd["status"] = "success"
            else:
                cmd["status"] = "in-progress"
            return jsonify(id=cid, status=cmd["status"],
                           spec=cmd["spec"] if cmd["status"] == "success" else {})

        @app.get("/api/v1/items/<item_id>/stream")
        def stream(item_id):
            if item_id in standin.media:
                return standin._media_response(item_id)
            cmd = next((c for c in standin.commands.values() if c["spec"]["outputItemId"] == item_id), None)
            if cmd is None:
                return jsonify(message="not found"), 404
            body = standin.export_body if standin.export_body is not None else json.dumps(cmd["payload"])
            return app.response_class(body, mimetype="application/json")

        return app

    def _media_response(self, item_id: str) -> Response:
        """The item's binary as a storage server sends it: ranges, validators, 304 and 416
        (werkzeug's `make_conditional`, as `send_file(..., conditional=True)` uses), read
        MEDIA_CHUNK bytes at a time; cut off after `break_stream_after` bytes when that is set."""
        data = self.media[item_id]
        if isinstance(data, (str, Path)):
            path = Path(data)
            size, mtime = path.stat().st_size, path.stat().st_mtime
            file = open(path, "rb")  # noqa: SIM115 - closed with the response
        else:
            size, mtime, file = len(data), self.started, BytesIO(data)
        found = self._find(item_id) or {}
        kind = self.media_types.get(item_id)
        if kind is None:
            kind = ((found.get("metadata") or {}).get("system") or {}).get("mimetype") or \
                mimetypes.guess_type(found.get("name") or found.get("filename") or "")[0] or "application/octet-stream"
        response = Response(FileWrapper(file, MEDIA_CHUNK), direct_passthrough=True)
        response.content_length = size
        response.last_modified = int(mtime)
        response.set_etag(f"{item_id}-{size}-{int(mtime)}")
        response.make_conditional(request.environ, accept_ranges=True, complete_length=size)
        if kind:
            response.headers["Content-Type"] = kind
        else:
            response.headers.pop("Content-Type", None)
        if response.status_code in (200, 206):
            if self.media_rate:
                response.response = _paced(response.response, self.media_rate)
            cut = self.break_stream_after
            if cut is not None:
                response.response = _cut_after(response.response, cut, request.environ.get("werkzeug.socket"))
        return response

    def _find(self, item_id: str) -> dict | None:
        for items in self.datasets.values():
            if item_id in items:
                return items[item_id]
        return None


def _cut_after(body, limit: int, sock):
    """`body`, until `limit` bytes have gone: then the connection's sending side is shut (the
    client sees the body end short of its Content-Length, as when a storage server goes away)."""
    sent = 0
    try:
        for chunk in body:
            if sent + len(chunk) >= limit:
                yield chunk[: limit - sent]
                if sock is not None:
                    try:
                        sock.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                return
            sent += len(chunk)
            yield chunk
    finally:
        if hasattr(body, "close"):
            body.close()


class _SmallDrain:
    """The connection's reader, passed through, except that werkzeug's drain after a response
    (`rfile.read(10_000_000)` whenever the socket is readable, e.g. at the client's close) reads a
    little at a time: else each such answer allocates 10 MB in this process, which tests that
    measure their own memory with the stand-in in the same process would count."""

    def __init__(self, rfile):
        self._rfile = rfile

    def read(self, size: int | None = -1) -> bytes:
        return self._rfile.read(65536 if size == 10_000_000 else size)

    def __getattr__(self, name):
        return getattr(self._rfile, name)


class _Handler(WSGIRequestHandler):
    def setup(self) -> None:
        super().setup()
        self.rfile = _SmallDrain(self.rfile)


def _paced(body, rate: float):
    """`body`, no faster than `rate` bytes per second (a network link's speed)."""
    started, sent = time.monotonic(), 0
    try:
        for chunk in body:
            yield chunk
            sent += len(chunk)
            ahead = started + sent / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
    finally:
        if hasattr(body, "close"):
            body.close()


def _item_json(item: dict) -> dict:
    """An item as Dataloop gives it (GET /items/{id}): without its annotations."""
    return {k: v for k, v in copy.deepcopy(item).items() if k != "annotations"} | {"type": "file", "hidden": False}


def _content(annotation: dict) -> dict:
    """What an annotation says, whatever its bookkeeping: what tells a change."""
    return {k: v for k, v in annotation.items() if k not in ("updatedAt", "itemId", "datasetId")}


def _key(row: dict) -> str:
    """An item's id as the server knows it, whichever field the answer carries it in."""
    return row.get("id") or row.get("_id") or ""


def _matches(row: dict, flt: Any) -> bool:
    """The DQL subset dtlpy and dl2ls send: {"$and": [...]}, {"$or": [...]}, {field: value},
    {field: {"$gt"|"$gte"|"$lt"|"$lte"|"$in"|"$ne": value}}; dotted field names reach into objects."""
    if not flt:
        return True
    if "$and" in flt:
        return all(_matches(row, f) for f in flt["$and"])
    if "$or" in flt:
        return any(_matches(row, f) for f in flt["$or"])
    for key, want in flt.items():
        value: Any = row
        for part in key.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        if key == "id":
            value = _key(row) or None
        if isinstance(want, dict):
            for op, arg in want.items():
                if not _compare(op, value, arg):
                    return False
        elif value != want:
            return False
    return True


def _compare(op: str, value: Any, arg: Any) -> bool:
    if op == "$in":
        return value in arg
    if op == "$ne":
        return value != arg
    if value is None:
        return False
    return {"$gt": value > arg, "$gte": value >= arg, "$lt": value < arg, "$lte": value <= arg}.get(op, False)
