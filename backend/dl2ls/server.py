"""The ML backend: Label Studio asks, dl2ls answers with the Dataloop annotations of the task.

Speaks the protocol a Label Studio 1.23 server uses (`ml/api_connector.py`): `GET /health`,
`POST /setup`, `POST /predict`, `POST /webhook`, with the maintained framework's conventions
(port 9090; BASIC_AUTH_USER / BASIC_AUTH_PASS; LOG_LEVEL, WORKERS, THREADS; gunicorn). It is
served by Flask 3 rather than the PyPI `label-studio-ml` 1.0.9, which pins Flask 1.1.2 /
Werkzeug 2.0.2, imports undeclared redis/rq and fails /predict before /setup.

Every worker indexes the source itself (item id and media file name -> where the item lies),
re-indexes when the source changes on disk, and keeps recent conversions in a small cache keyed by
(item, file state, labeling config). Nothing is carried from /setup to /predict, so any number of
gunicorn workers answer alike.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

from dl2ls.dataloop.model import MediaDefaults
from dl2ls.dataloop.read import iter_items, load_item
from dl2ls.labelstudio import config as lsconfig
from dl2ls.labelstudio.push import media_name
from dl2ls.labelstudio.tasks import ConvertOptions, score_of, to_task
from dl2ls.report import InputError
from dl2ls.tracks import item_tracks

log = logging.getLogger("dl2ls.server")

MAX_BODY = 32 << 20  # a /predict for many tasks with their data stays far below this
RESCAN_SECONDS = 2.0  # how often a request may look at the source for changes
CACHE_ITEMS = 256
DEFAULT_VERSION = "dataloop"


class SourceIndex:
    """Where each Dataloop item of the source lies, by item id and by media file name."""

    def __init__(self, sources: list[str], defaults: MediaDefaults):
        self.sources = sources
        self.defaults = defaults
        self.lock = threading.Lock()
        self.signature: tuple = ()
        self.checked = 0.0
        self.by_id: dict[str, tuple[str, tuple]] = {}
        self.by_name: dict[str, tuple[str, tuple]] = {}
        self.problems: list[str] = []
        self.count = 0
        self.refresh(force=True)

    def _signature(self) -> tuple:
        sig = []
        for source in self.sources:
            path = Path(source)
            files = [path] if not path.is_dir() else sorted(path.rglob("*.json"))
            for f in files:
                try:
                    st = f.stat()
                    sig.append((str(f), st.st_mtime_ns, st.st_size))
                except OSError:
                    sig.append((str(f), None, None))
        return tuple(sig)

    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.checked < RESCAN_SECONDS:
            return
        with self.lock:
            self.checked = now
            signature = self._signature()
            if signature == self.signature and not force:
                return
            by_id, by_name, problems, count = {}, {}, [], 0
            for source in self.sources:
                for entry in iter_items(source):
                    if entry.error is not None:
                        problems.append(str(entry.error))
                        continue
                    if entry.item is None:
                        continue
                    item = entry.item
                    count += 1
                    where = (entry.origin, entry.locator)
                    item_id = item.id or item.id_
                    if item_id:
                        by_id[item_id] = where
                    for name in (item.name, media_name(item.filename)):
                        if name:
                            by_name.setdefault(name, where)
            self.by_id, self.by_name, self.problems, self.count = by_id, by_name, problems, count
            self.signature = signature
            log.info("indexed %d items (%d unreadable) from %s", count, len(problems), ", ".join(self.sources))

    def find(self, data: dict, data_key: str) -> tuple[str, tuple] | None:
        item_id = data.get("dataloop_item_id")
        if item_id and item_id in self.by_id:
            return self.by_id[item_id]
        for value in (data.get("dataloop_filename"), data.get(data_key)):
            name = media_name(value)
            if name and name in self.by_name:
                return self.by_name[name]
        return None


class Predictor:
    def __init__(self, index: SourceIndex, model_version: str):
        self.index = index
        self.model_version = model_version
        self.cache: OrderedDict[tuple, dict] = OrderedDict()
        self.lock = threading.Lock()

    def predict(self, task: dict, config: lsconfig.LabelConfig, config_key: str) -> dict:
        """One prediction for one task: every Dataloop annotation of its item, merged into one
        result list (Label Studio takes one prediction per task from a backend)."""
        data = task.get("data") if isinstance(task, dict) else None
        if not isinstance(data, dict):
            raise BadRequest("each task needs a `data` object")
        obj = config.objects[0]
        where = self.index.find(data, obj.data_key)
        if where is None:
            return {"result": [], "model_version": self.model_version}
        origin, locator = where
        signature = self.index.signature
        key = (locator, signature, config_key)  # a changed source changes the signature
        with self.lock:
            hit = self.cache.get(key)
            if hit is not None:
                self.cache.move_to_end(key)
                return hit
        try:
            loaded = load_item(locator, origin)
            wanted = data.get("dataloop_item_id")
            if wanted and (loaded.id or loaded.id_) != wanted:
                # the source changed under the index (an array rewritten): index again, once
                self.index.refresh(force=True)
                if self.index.signature == signature:
                    raise InputError(origin, None, f"holds item {loaded.id or loaded.id_}, not {wanted}")
                return self.predict(task, config, config_key)
            item = item_tracks(loaded, origin, self.index.defaults)
            converted, _ = to_task(item, ConvertOptions(config=config))
        except InputError as err:
            # not an empty answer: Label Studio would keep it and never ask again
            raise Unavailable(f"item {data.get('dataloop_item_id') or origin}: {err.reason}") from None
        results = [r for p in converted["predictions"] for r in p["result"]]
        scores = [r["score"] for r in results if "score" in r and r.get("type") != "choices"]
        prediction = {"result": results, "model_version": self.model_version}
        score = score_of(scores)
        if score is not None:
            prediction["score"] = score
        with self.lock:
            self.cache[key] = prediction
            while len(self.cache) > CACHE_ITEMS:
                self.cache.popitem(last=False)
        return prediction


class BadRequest(Exception):
    pass


class Unavailable(Exception):
    """The item is indexed but cannot be converted now (a 503, so that Label Studio asks again)."""


def _config_from(body: dict) -> tuple[lsconfig.LabelConfig, str]:
    xml = body.get("label_config") or body.get("schema")
    if not isinstance(xml, str) or not xml.strip():
        raise BadRequest("the request carries no labeling config (`label_config` or `schema`)")
    try:
        config = lsconfig.parse(xml)
    except lsconfig.ConfigError as err:
        raise BadRequest(str(err)) from None
    return config, hashlib.sha1(xml.encode()).hexdigest()


def _authorized(user: str, password: str) -> bool:
    header = request.headers.get("Authorization", "")
    if not header.startswith("Basic "):
        return False
    try:
        given_user, _, given_pass = base64.b64decode(header[6:], validate=True).partition(b":")
    except ValueError:
        return False
    # bytes, so that any text compares in constant time
    return hmac.compare_digest(given_user, user.encode()) & hmac.compare_digest(given_pass, password.encode())


def create_app(source: str | list[str] | None = None, model_version: str | None = None) -> Flask:
    sources = source if isinstance(source, list) else [source or os.environ.get("DL2LS_SOURCE", "")]
    if not all(sources):
        raise SystemExit("dl2ls serve: no source: pass --source PATH or set DL2LS_SOURCE")
    defaults = MediaDefaults(*(float(os.environ[k]) if os.environ.get(k) else None
                               for k in ("DL2LS_FPS", "DL2LS_WIDTH", "DL2LS_HEIGHT")))
    version = model_version or os.environ.get("DL2LS_MODEL_VERSION") or DEFAULT_VERSION
    index = SourceIndex(sources, defaults)
    predictor = Predictor(index, version)
    user, password = os.environ.get("BASIC_AUTH_USER"), os.environ.get("BASIC_AUTH_PASS")
    if bool(user) != bool(password):
        raise SystemExit("dl2ls serve: set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")

    app = Flask("dl2ls")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY

    @app.before_request
    def check_auth():
        if user and password and request.path != "/health" and not _authorized(user, password):
            response = jsonify(error="authentication required")
            response.status_code = 401
            response.headers["WWW-Authenticate"] = 'Basic realm="dl2ls"'
            return response
        return None

    def body() -> dict:
        data = request.get_json(silent=True)
        if not isinstance(data, dict):
            raise BadRequest("the body must be a JSON object")
        return data

    @app.get("/")
    @app.get("/health")
    def health():  # no file I/O: Label Studio gives /health one second
        return jsonify(status="UP", model_class="dl2ls", model_version=version,
                       items=index.count)

    @app.post("/setup")
    def setup():
        data = body()
        if data.get("schema"):
            _config_from(data)  # a config we cannot read is said now, not at the first /predict
        return jsonify(model_version=version)

    @app.post("/predict")
    def predict():
        data = body()
        tasks = data.get("tasks")
        if not isinstance(tasks, list):
            raise BadRequest("`tasks` must be a list")
        config, config_key = _config_from(data)
        index.refresh()
        results = [predictor.predict(task, config, config_key) for task in tasks]
        return jsonify(results=results, model_version=version)

    @app.post("/webhook")
    def webhook():
        data = request.get_json(silent=True) or {}
        action = data.get("action") if isinstance(data, dict) else None
        log.info("webhook %s", action)
        return jsonify(status="ok", action=action)

    @app.errorhandler(BadRequest)
    def bad_request(err):
        return jsonify(error=str(err)), 400

    @app.errorhandler(Unavailable)
    def unavailable(err):
        log.warning("%s", err)
        return jsonify(error=str(err)), 503

    @app.errorhandler(HTTPException)
    def http_error(err):
        return jsonify(error=err.description or err.name), err.code

    @app.errorhandler(Exception)
    def unexpected(err):
        log.exception("unexpected error on %s", request.path)
        return jsonify(error=f"internal error: {type(err).__name__}"), 500

    return app


def serve(source: str, host: str, port: int, workers: int, threads: int) -> None:
    """Run under gunicorn, as Label Studio's ML backends do."""
    from gunicorn.app.base import BaseApplication

    os.environ["DL2LS_SOURCE"] = source

    class Application(BaseApplication):
        def load_config(self):
            self.cfg.set("bind", f"{host}:{port}")
            self.cfg.set("workers", workers)
            self.cfg.set("threads", threads)
            self.cfg.set("timeout", 120)
            self.cfg.set("accesslog", "-")

        def load(self):
            return create_app(source)

    Application().run()

