"""The ML backend: Label Studio asks, dl2ls answers with the Dataloop annotations of the task.

Speaks the protocol a Label Studio 1.23 server uses (`ml/api_connector.py`): `GET /health`,
`POST /setup`, `POST /predict`, `POST /webhook`, with the maintained framework's conventions
(port 9090; BASIC_AUTH_USER / BASIC_AUTH_PASS; LOG_LEVEL, WORKERS, THREADS; gunicorn). It is
served by Flask 3 rather than the PyPI `label-studio-ml` 1.0.9, which pins Flask 1.1.2 /
Werkzeug 2.0.2, imports undeclared redis/rq and fails /predict before /setup. gunicorn runs it
with `dl2ls.web.Worker`, which gives no thread to a client until its request headers are complete.

Every worker indexes the source itself (item id and media path -> where the item lies),
re-indexes when the source changes on disk, and keeps recent conversions in a small cache keyed by
(item, file state, labeling config). Nothing is carried from /setup to /predict, so any number of
gunicorn workers answer alike.

A task finds its item by `data.dataloop_item_id`, else by the longest path suffix its media shares
with an item's `filename` (`labelstudio.identity`). Each task of a /predict gets its own answer and
no task fails the others:
- no item: an empty result (Label Studio stores it and does not ask again);
- an item that cannot be converted, two items that fit equally well, a task that is not an object:
  `[]` for that task, with one log line why (Label Studio stores nothing and asks again later).
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

import orjson
from flask import Flask, jsonify, request
from werkzeug.exceptions import ClientDisconnected, HTTPException

from dl2ls.convert import convert_item
from dl2ls.dataloop.model import MediaDefaults
from dl2ls.dataloop.read import Entry, iter_items, load_item
from dl2ls.labelstudio import config as lsconfig
from dl2ls.labelstudio.identity import Indexed, Located, Lookup, find_item, media_parts
from dl2ls.labelstudio.tasks import ConvertOptions, score_of
from dl2ls.report import InputError, describe, escape

log = logging.getLogger("dl2ls.server")

MAX_BODY = 32 << 20  # a /predict for many tasks with their data stays far below this
TOLD_FIELDS = ("id", "data", "meta", "total_predictions", "total_annotations", "cancelled_annotations")
PREDICT_SECONDS = 60.0  # a /predict stops fetching after this: Label Studio waits 100 s
RESCAN_SECONDS = 2.0  # how often a request may look at the source for changes
CACHE_ITEMS = 256
DEFAULT_VERSION = "dataloop"

Answer = dict | list  # a prediction, or [] (nothing stored: Label Studio asks again later)


# ----------------------------------------------------------------------------- the source index


def source_files(source: str) -> list[Path]:
    """The files a source reads (a folder's .json files, as `iter_items` lists them): what the
    signature watches, and what is read one by one should reading the whole source fail."""
    path = Path(source)
    if not path.is_dir():
        return [path]
    try:
        return sorted(p for p in path.rglob("*.json") if p.is_file())
    except OSError:
        return [path]  # `iter_items` says why


class SourceIndex:
    """Where each Dataloop item of the source lies, by item id and by media path."""

    def __init__(self, sources: list[str], defaults: MediaDefaults):
        self.sources = sources
        self.defaults = defaults
        self.lock = threading.Lock()
        self.checked = 0.0
        self.current = Indexed()
        self.watcher: tuple[int, threading.Thread] | None = None
        self.refresh(force=True)

    def watch(self) -> None:
        """Look at the source for changes every RESCAN_SECONDS in a thread of this process, never
        inside a request: a large source is walked and re-read beside the requests, which go on
        with the index they have. Started on the first request, so that it runs in each gunicorn
        worker (a thread started before the fork would not)."""
        if self.watcher is not None and self.watcher[0] == os.getpid():
            return
        with self.lock:
            if self.watcher is not None and self.watcher[0] == os.getpid():
                return

            def loop() -> None:
                while True:
                    time.sleep(max(RESCAN_SECONDS, 0.05))
                    self.refresh()

            thread = threading.Thread(target=loop, name="dl2ls-index", daemon=True)
            thread.start()
            self.watcher = (os.getpid(), thread)

    @property
    def signature(self) -> tuple:
        return self.current.signature

    @property
    def generation(self) -> int:
        return self.current.generation

    @property
    def count(self) -> int:
        return len(self.current.at)

    @property
    def unreadable(self) -> int:
        return len(self.current.problems)

    def _signature(self) -> tuple:
        sig = []
        for source in self.sources:
            for f in source_files(source):
                try:
                    st = f.stat()
                    sig.append((str(f), st.st_mtime_ns, st.st_size))
                except OSError:
                    sig.append((str(f), None, None))
        return tuple(sig)

    def refresh(self, force: bool = False) -> None:
        """Index again if the source changed. Never raises: a request always finds an index."""
        now = time.monotonic()
        if not force and now - self.checked < RESCAN_SECONDS:
            return
        with self.lock:
            self.checked = now
            try:
                signature = self._signature()
                if signature == self.current.signature and not force:
                    return
                fresh = self._index(signature)
                fresh.generation = self.current.generation + 1
            except Exception as err:  # noqa: BLE001 - a broken disk must not take /predict down
                log.error("indexing %s failed, still serving the previous index: %s",
                          escape(", ".join(self.sources)), escape(describe(err)))
                return
            seen = set(self.current.problems)
            for line in fresh.problems:
                if line not in seen:  # once per bad entry, not at every re-index
                    log.warning("unreadable: %s", line)
            self.current = fresh
            log.info("indexed %d items (%d unreadable) from %s", len(fresh.at), len(fresh.problems),
                     escape(", ".join(self.sources)))

    def _index(self, signature: tuple) -> Indexed:
        out = Indexed(signature)
        for source in self.sources:
            try:
                found = [self._locate(entry) for entry in iter_items(source)]
            except Exception:  # noqa: BLE001 - a reader failed beyond its own reports: each file alone
                found = []
                for path in source_files(source):
                    try:
                        found += [self._locate(entry) for entry in iter_items(path)]
                    except Exception as err:  # noqa: BLE001 - this file is lost, not the index
                        found.append(escape(f"{path}: cannot be read: {describe(err)}"))
            for one in found:
                if isinstance(one, str):
                    out.problems.append(one)
                elif one is not None:
                    out.add(one)
        return out

    @staticmethod
    def _locate(entry: Entry) -> Located | str | None:
        """An entry as the index keeps it: where it lies, a problem line, or None (nothing to serve)."""
        if entry.error is not None:
            return escape(str(entry.error))
        if entry.item is None or entry.note or entry.locator is None:
            return None
        item = entry.item
        item_id = item.id or item.id_
        item_id = item_id if isinstance(item_id, str) and item_id else None
        # the media's path: its Dataloop filename, else the path its export file stands for
        parts = media_parts(item.filename) or media_parts(getattr(entry.locator, "remote", None)) or \
            media_parts(item.name)
        return Located(entry.origin, entry.locator, item_id, parts)

    def find(self, data: dict, data_keys: list[str]) -> Lookup:
        return find_item(self.current, data, data_keys)


# ----------------------------------------------------------------------------- predictions


class Predictor:
    def __init__(self, index: SourceIndex, model_version: str):
        self.index = index
        self.model_version = model_version
        self.cache: OrderedDict[tuple, dict] = OrderedDict()
        self.lock = threading.Lock()

    def empty(self) -> dict:
        return {"result": [], "model_version": self.model_version}

    def answer(self, position: int, task, config: lsconfig.LabelConfig, config_key: str) -> Answer:
        """This task's answer, whatever the task holds: nothing in it fails the batch."""
        name = task_name(position, task)
        try:
            data = task.get("data") if isinstance(task, dict) else None
            if not isinstance(data, dict):
                log.warning("%s: %s", name, "not an object" if not isinstance(task, dict) else
                            "its `data` is not an object")
                return []
            lookup = self.index.find(data, [o.data_key for o in config.objects])
            if lookup.retry:
                log.warning("%s: no prediction: %s", name, lookup.retry)
                return []
            if lookup.found is None:
                if lookup.note:
                    log.info("%s: no item: %s", name, lookup.note)
                return self.empty()
            return self.predict(name, lookup.found, config, config_key)
        except Exception as err:  # noqa: BLE001 - the boundary of one task
            log.warning("%s: no prediction: %s", name, escape(describe(err)))
            log.debug("answering %s", name, exc_info=True)
            return []

    def predict(self, name: str, where: Located, config: lsconfig.LabelConfig, config_key: str) -> Answer:
        """One prediction: every Dataloop annotation of the item, merged into one result list
        (Label Studio takes one prediction per task from a backend)."""
        key = (where.locator, self.index.generation, config_key)  # a changed source is indexed anew
        with self.lock:
            hit = self.cache.get(key)
            if hit is not None:
                self.cache.move_to_end(key)
                return hit
        try:
            item = load_item(where.locator, where.origin)
        except InputError as err:
            log.warning("%s: no prediction: %s", name, err)
            return []
        loaded_id = item.id or item.id_
        if (loaded_id or None) != where.item_id:
            # the file changed between indexing and now: the next re-index sees it
            log.warning("%s: no prediction: %s changed since it was indexed (holds item %s, not %s)", name,
                        escape(where.origin), escape(loaded_id), escape(where.item_id))
            return []
        converted = convert_item(Entry(where.origin, item=item, locator=where.locator),
                                 ConvertOptions(config=config), self.index.defaults)
        if converted.task is None:
            problems = converted.report.problems
            reason = problems[-1].line() if problems else f"{where.origin}: not converted"
            log.warning("%s: no prediction: %s", name, escape(reason))
            return []
        results = [r for p in converted.task["predictions"] for r in p["result"]]
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


def _positive_env(name: str) -> float | None:
    text = os.environ.get(name)
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1e7:
        raise SystemExit(f"dl2ls serve: {name} must be a positive number, not {escape(text[:40])!r}")
    return value


def task_name(position: int, task) -> str:
    task_id = task.get("id") if isinstance(task, dict) else None
    if isinstance(task_id, (int, str)) and not isinstance(task_id, bool):
        return escape(f"task {task_id}"[:120])
    return f"task #{position + 1} of the request"


# ----------------------------------------------------------------------------- the app


class BadRequest(Exception):
    pass


class BodyTimeout(Exception):
    """The request body did not arrive within the worker's time (dl2ls.web)."""


def _config_from(body: dict) -> tuple[lsconfig.LabelConfig, str]:
    xml = body.get("label_config") or body.get("schema")
    if not isinstance(xml, str) or not xml.strip():
        raise BadRequest("the request carries no labeling config (`label_config` or `schema`)")
    try:
        config = lsconfig.parse(xml)
    except lsconfig.ConfigError as err:
        raise BadRequest(str(err)) from None
    except Exception as err:  # noqa: BLE001 - whatever the text holds, it is the caller's mistake
        raise BadRequest(f"the labeling config cannot be read: {describe(err)}") from None
    return config, hashlib.sha1(xml.encode("utf-8", "surrogatepass")).hexdigest()


def _tasks_of(data: dict) -> list:
    """A /predict's tasks, or BadRequest."""
    tasks = data.get("tasks")
    if not isinstance(tasks, list):
        raise BadRequest("`tasks` must be a list")
    return tasks


def _json_body():
    """The request's JSON, or BadRequest. orjson, not json: it refuses nesting past 1024 levels
    with a ValueError, where json's recursion would end in a 500."""
    try:
        raw = request.get_data(cache=False)
    except (ClientDisconnected, OSError):  # the worker's body deadline (a TimeoutError), or a client gone
        raise BodyTimeout() from None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise BadRequest(f"the body must be a JSON object; it is not JSON ({err})") from None


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


def create_app(source: str | list[str] | None = None, model_version: str | None = None,
               model_dir: str | None = None) -> Flask:
    """The app: offline from an export folder (`source`, or DL2LS_SOURCE), else the service,
    which fetches from Dataloop and keeps its state under `model_dir` (MODEL_DIR)."""
    if source is None and os.environ.get("DL2LS_SOURCE"):
        source = os.environ["DL2LS_SOURCE"]
    sources = (source if isinstance(source, list) else [source]) if source else []
    defaults = MediaDefaults(*(_positive_env(k) for k in ("DL2LS_FPS", "DL2LS_WIDTH", "DL2LS_HEIGHT")))
    version = model_version or os.environ.get("DL2LS_MODEL_VERSION") or DEFAULT_VERSION
    user, password = os.environ.get("BASIC_AUTH_USER"), os.environ.get("BASIC_AUTH_PASS")
    if bool(user) != bool(password):
        raise SystemExit("dl2ls serve: set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
    hook_secret = os.environ.get("DL2LS_DATALOOP_HOOK_SECRET") or None

    app = Flask("dl2ls")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    open_paths = {"/health", "/", "/metrics", "/dataloop/webhook"}  # the hook has its own secret

    def hook_token_ok() -> bool:
        """Label Studio's webhooks carry the service's own token instead of basic auth."""
        service = app.extensions.get("dl2ls.service")
        given = request.args.get("token") or ""
        return bool(service and request.path == "/webhook" and given
                    and hmac.compare_digest(given.encode(), service.db.hook_token.encode()))

    @app.before_request
    def check_auth():
        # /media/<item id> has its own signature: a browser's <video> cannot send basic auth
        if user and password and request.path not in open_paths and not request.path.startswith("/media/") \
                and not _authorized(user, password) and not hook_token_ok():
            response = jsonify(error="authentication required")
            response.status_code = 401
            response.headers["WWW-Authenticate"] = 'Basic realm="dl2ls"'
            return response
        return None

    def body() -> dict:
        data = _json_body()
        if not isinstance(data, dict):
            raise BadRequest("the body must be a JSON object")
        return data

    if sources:
        _offline_routes(app, sources, defaults, version, body)
        _media_route(app, _lazy_dataloop())
    else:
        from dl2ls.service import Service

        threads = _positive_env("DL2LS_JOB_THREADS")
        service = Service(model_dir or os.environ.get("MODEL_DIR") or "./dl2ls-model", defaults,
                          os.environ.get("DL2LS_DATASET") or None, version, int(threads or 2),
                          os.environ.get("DL2LS_PUBLIC_URL") or None, (user, password) if user else None,
                          redis_url=os.environ.get("REDIS_URL") or None)
        _service_routes(app, service, version, body, hook_secret)
        _media_route(app, service.dataloop)
        app.extensions["dl2ls.service"] = service
        if os.environ.get("DL2LS_NO_RUNNER") != "1":
            service.start()

    @app.errorhandler(BadRequest)
    def bad_request(err):
        return jsonify(error=str(err)), 400

    @app.errorhandler(BodyTimeout)
    def body_timeout(err):
        return jsonify(error="the request body did not arrive complete in time"), 408

    @app.errorhandler(HTTPException)
    def http_error(err):
        return jsonify(error=err.description or err.name), err.code

    @app.errorhandler(Exception)
    def unexpected(err):
        log.exception("unexpected error on %s", escape(request.path))
        return jsonify(error=f"internal error: {type(err).__name__}"), 500

    return app


def _lazy_dataloop():
    """`serve --source`: a DataloopClient made at the first /media request (DataloopError until
    credentials are set), for the media proxy only."""
    from dl2ls.dataloop.api import DataloopClient

    made: list = []
    lock = threading.Lock()

    def client():
        with lock:
            if not made:
                made.append(DataloopClient(timeout=30.0, max_wait=60.0))
            return made[0]
    return client


def _media_route(app: Flask, client_of) -> None:
    """`GET`/`HEAD /media/<item id>?sig=…`: the item's binary streamed from Dataloop (dl2ls.media),
    when DL2LS_MEDIA_SECRET is set (else 404, saying so). Basic auth does not apply; the signature
    does. `OPTIONS`: the CORS preflight (the editor asks cross-origin)."""
    from dl2ls import media

    secret = os.environ.get("DL2LS_MEDIA_SECRET") or None
    if secret and len(secret) < 16:
        raise SystemExit("dl2ls serve: DL2LS_MEDIA_SECRET must be at least 16 characters: one signed URL is "
                         "enough to guess a short one offline (e.g. openssl rand -hex 24)")

    @app.route("/media/<item_id>", methods=["GET", "HEAD", "OPTIONS"])
    def media_item(item_id):
        return media.respond(client_of, item_id, request.args.get("sig"), secret, request.headers,
                             request.environ, request.method)


def _offline_routes(app: Flask, sources: list[str], defaults: MediaDefaults, version: str, body) -> None:
    """`serve --source`: answers from an export folder on disk, indexed by every worker."""
    index = SourceIndex(sources, defaults)
    predictor = Predictor(index, version)

    @app.before_request
    def watch_source():
        index.watch()  # once per worker process: the source is watched beside the requests

    @app.get("/")
    @app.get("/health")
    def health():  # no file I/O: Label Studio gives /health one second
        return jsonify(status="UP", model_class="dl2ls", model_version=version,
                       items=index.count, unreadable=index.unreadable, index_generation=index.generation)

    @app.post("/setup")
    def setup():
        data = body()
        if data.get("schema"):
            _config_from(data)  # a config we cannot read is said now, not at the first /predict
        return jsonify(model_version=version)

    @app.post("/predict")
    def predict():
        data = body()
        tasks = _tasks_of(data)
        config, config_key = _config_from(data)
        results = [predictor.answer(i, task, config, config_key) for i, task in enumerate(tasks)]
        return jsonify(results=results, model_version=version)

    @app.post("/webhook")
    def webhook():
        try:
            data = _json_body()
        except BadRequest:
            data = None
        action = data.get("action") if isinstance(data, dict) else None
        action = action if isinstance(action, str) else None
        log.info("webhook %s", escape(action)[:200])
        return jsonify(status="ok", action=action)


def _service_routes(app: Flask, service, version: str, body, hook_secret: str | None) -> None:
    """The service: fetches from Dataloop, pre-annotates on TASKS_CREATED, syncs by itself."""
    from dl2ls import live
    from dl2ls.service import ParamsError, project_id_of

    @app.before_request
    def start_runner():
        if os.environ.get("DL2LS_NO_RUNNER") != "1":
            service.start()  # after a fork, in this worker

    @app.get("/")
    @app.get("/health")
    def health():  # no I/O: the service's view is refreshed every second by its scheduler thread
        return jsonify(status="UP", model_class="dl2ls", model_version=version, mode="service",
                       instance=service.db.instance, **service.health())

    @app.get("/metrics")
    def metrics():
        return app.response_class(service.metrics(), mimetype="text/plain; version=0.0.4")

    @app.post("/setup")
    def setup():
        data = body()
        if data.get("schema"):
            _config_from(data)
        try:
            row = service.setup(data)
        except ParamsError as err:
            raise BadRequest(str(err)) from None
        return jsonify(model_version=row.version if row is not None else version)

    @app.post("/predict")
    def predict():
        data = body()
        tasks = _tasks_of(data)
        config, _ = _config_from(data)
        project_id = project_id_of(data.get("project"))
        params = service.params(project_id)
        shown = service.snapshot[project_id].version if project_id in service.snapshot else params.shown_version()
        empty = {"result": [], "model_version": shown}
        if params.scope is None:
            log.warning("project %s: no Dataloop dataset: put {\"dataset\": \"<id>\"} in the connection's Extra "
                        "params, or set DL2LS_DATASET", project_id)
            return jsonify(results=[[] for _ in tasks], model_version=shown)
        # a task a queued pre-annotation will write on waits for it ([]: Label Studio asks again),
        # or the job would find Label Studio's copy of this answer beside its own
        pending = service.db.pending_tasks(project_id) if project_id is not None else set()
        good = [(i, t) for i, t in enumerate(tasks) if isinstance(t, dict) and isinstance(t.get("data"), dict)
                and t.get("id") not in pending]
        results: list = [[] for _ in tasks]
        try:
            client = service.dataloop()
        except Exception as err:  # noqa: BLE001 - no credentials: said, and Label Studio asks again later
            log.warning("/predict: Dataloop: %s", escape(describe(err)))
            return jsonify(results=results, model_version=shown)
        fetched = live.resolve(client, params.scope, [t["data"] for _, t in good],
                               params.data_keys(config), params.options(config), service.defaults,
                               service.cache, deadline=time.monotonic() + PREDICT_SECONDS)
        for (position, task), got in zip(good, fetched.tasks):
            name = task_name(position, task)
            if got.retry:
                log.warning("%s: no prediction: %s", name, escape(got.retry))
            elif got.item is None:
                results[position] = empty
            elif got.converted is None or got.converted.task is None:
                problems = got.converted.report.problems if got.converted else []
                log.warning("%s: no prediction: %s", name, problems[-1].line() if problems else "not converted")
            else:
                # versions the task already holds are not sent again: Label Studio would store a copy
                held = {p.get("model_version") for p in task.get("predictions") or [] if isinstance(p, dict)}
                predictions = [p for p in got.converted.task["predictions"] or [dict(empty)]
                               if p["model_version"] not in held]
                results[position] = predictions[0] if len(predictions) == 1 else predictions
        for position, task in enumerate(tasks):
            if not (isinstance(task, dict) and isinstance(task.get("data"), dict)):
                log.warning("%s: its `data` is not an object", task_name(position, task))
        answered = [tasks[i]["id"] for i, r in enumerate(results) if r != [] and isinstance(tasks[i].get("id"), int)]
        if project_id is not None:
            service.db.mark_answered(project_id, answered)
        return jsonify(results=results, model_version=shown)

    def train_project(data) -> tuple:
        project_id = project_id_of(data.get("project")) if isinstance(data, dict) else None
        if project_id is None:
            raise BadRequest("no project in the request")
        if not service.known(project_id):
            return jsonify(error=f"project {project_id} never connected this backend (no /setup)"), 404
        job = service.enqueue("sync", project_id, reason="Start Training")
        return jsonify(status="ok", job=job), 201

    @app.post("/train")
    def train():
        return train_project(body())

    @app.post("/webhook")
    def webhook():
        data = body()
        action = data.get("action") if isinstance(data.get("action"), str) else None
        if action == "START_TRAINING":
            return train_project(data)
        if action == "TASKS_CREATED":
            project_id = project_id_of(data.get("project"))
            tasks = data.get("tasks") if isinstance(data.get("tasks"), list) else []
            told = [{k: t.get(k) for k in TOLD_FIELDS} for t in tasks if isinstance(t, dict)
                    and isinstance(t.get("id"), int) and not isinstance(t.get("id"), bool)]
            ids = sorted({t["id"] for t in told})
            if project_id is None or not ids:
                raise BadRequest("TASKS_CREATED without a project id or task ids")
            if not service.known(project_id):
                log.info("webhook TASKS_CREATED for project %d, which never connected this backend: ignored", project_id)
                return jsonify(status="ignored", reason="project not connected")
            # what the tasks were when created travels with the job: most need not be read back
            job = service.enqueue("preannotate", project_id, {"task_ids": ids, "tasks": told},
                                  reason=f"{len(ids)} tasks created")
            return jsonify(status="ok", job=job), 201
        log.info("webhook %s: nothing to do", escape(action or "(no action)")[:200])
        return jsonify(status="ignored", action=action)

    @app.post("/dataloop/webhook")
    def dataloop_webhook():
        given = request.args.get("secret") or request.headers.get("X-Dl2ls-Secret") or ""
        if not hook_secret:
            return jsonify(error="Dataloop hooks are off: set DL2LS_DATALOOP_HOOK_SECRET"), 404
        if not hmac.compare_digest(given.encode(), hook_secret.encode()):
            return jsonify(error="wrong or missing secret"), 403
        try:
            data = _json_body()
        except BadRequest:
            data = None
        item_id, dataset_id, what = dataloop_resource(data)
        projects = service.projects_on_dataset(dataset_id)
        # an item named: an upsert of it (a burst of hooks is one job); anything else, a sync
        kind = "upsert" if item_id else "sync"
        for project_id in projects:
            service.enqueue(kind, project_id, {"items": [item_id]} if item_id else None, reason=f"Dataloop: {what}")
        log.info("Dataloop hook: %s -> %s of %s", what, kind,
                 ", ".join(f"project {p}" for p in projects) or "no project")
        return jsonify(status="ok", item=item_id, dataset=dataset_id, projects=projects), 202


def dataloop_resource(data) -> tuple[str | None, str | None, str]:
    """What a Dataloop trigger's webhook is about: (item id, dataset id, a name for the log).
    The outbound format is not documented: the resource object (an annotation with `itemId`, an
    item with `id` and `datasetId`) is looked for at the top and under the usual wrappers;
    whatever cannot be read means "re-read the datasets" (every connected project is synced)."""
    candidates = [data] if isinstance(data, dict) else []
    for one in list(candidates):
        for key in ("input", "resource", "data", "item", "annotation", "payload", "body"):
            inner = one.get(key)
            if isinstance(inner, dict):
                candidates.append(inner)
    for one in candidates:
        item_id = one.get("itemId") if isinstance(one.get("itemId"), str) else None
        dataset_id = one.get("datasetId") if isinstance(one.get("datasetId"), str) else None
        if item_id:
            return item_id, dataset_id, escape(f"annotation {one.get('id', '?')} of item {item_id}")[:200]
        if isinstance(one.get("id"), str) and (dataset_id or one.get("type") in ("file", "dir")):
            return one["id"], dataset_id, escape(f"item {one['id']}")[:200]
    return None, None, "an event dl2ls cannot read (every connected dataset is re-read)"


def serve(source: str | None, host: str, port: int, workers: int, threads: int) -> None:
    """Run under gunicorn, as Label Studio's ML backends do, with the worker of dl2ls.web."""
    from gunicorn.app.base import BaseApplication

    if source:
        os.environ["DL2LS_SOURCE"] = source

    class Application(BaseApplication):
        def load_config(self):
            self.cfg.set("bind", f"{host}:{port}")
            self.cfg.set("workers", workers)
            self.cfg.set("threads", threads)
            self.cfg.set("worker_class", "dl2ls.web.Worker")
            self.cfg.set("timeout", 120)
            self.cfg.set("accesslog", "-")
            # %(U)s: the path without its query, which may carry the Dataloop hook's secret
            self.cfg.set("access_log_format", '%(h)s %(l)s %(u)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(b)s "%(f)s" "%(a)s"')

        def load(self):
            return create_app(source)

    Application().run()
