"""Write converted tasks and predictions into a Label Studio project through label-studio-sdk.

Two parts, kept apart:
- `Planner` (pure) decides every change to a project, for `push`, `sync` and the service alike:
  which task is which item's (identity), what a task's data may gain (never its media), which
  predictions are created, replaced, kept or deleted (stale versions, deleted items), whether a
  deletion is too large to make without being asked, and the project's `model_version`.
- `Pusher` is the only code that talks to Label Studio; `apply` carries a plan out in bulk.

Idempotent and resumable: every run first reads what the project holds; each task records, in its
`meta.dl2ls`, the content hash of every prediction dl2ls wrote on it, so a run that changes
nothing reads one paged task listing and writes nothing. A prediction is replaced by deleting its
version on the task first and writing after, so a run killed anywhere leaves a state the next run
reads and finishes, without duplicates.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import urlsplit

import orjson

from dl2ls.labelstudio.identity import Matching, PathIndex, match, media_parts
from dl2ls.report import escape

log = logging.getLogger("dl2ls.push")

BATCH_BYTES = 8 << 20  # per bulk request: well under the server's request limits
BATCH_TASKS = 1000  # per request; larger batches cost the server less per task
PREPARE_THREADS = 4  # tasks whose old predictions are deleted side by side before a bulk import
BULK_TIMEOUT = 900.0  # seconds a bulk import is waited for (see Pusher._post_bulk)
FIRST_BATCH = 100  # batches start small and double: writing starts early and overlaps conversion
RETRIES = 5  # idempotent requests (reads, deletes, updates) on connection errors, 429 and 5xx
PAGE_SIZE = 2000  # per task listing page: fewer pages cost the server less per task
META_KEY = "dl2ls"  # task.meta[META_KEY] = {"predictions": {model_version: content hash}}
OWNED_KEYS = ("fps", "dataloop_item_id", "dataloop_dataset_id", "dataloop_filename")  # task data dl2ls adds

#: A run may delete at most this share of a project's tasks, or this many, without being asked.
MASS_DELETE_SHARE, MASS_DELETE_COUNT = 0.10, 20


class PushError(Exception):
    """One line: what went wrong talking to Label Studio, and the fix."""


class Rejected(PushError):
    """Label Studio refused a write for what it holds (4xx other than auth): the items in it are
    at fault, not the connection, so the batch is split to find them."""


def prediction_hash(result: list, score: float | None) -> str:
    return hashlib.sha1(orjson.dumps({"result": result, "score": score}, option=orjson.OPT_SORT_KEYS)).hexdigest()


def item_key(data: dict) -> str | None:
    """The identity dl2ls gives a task's item: its Dataloop id, else (items of older exports have
    none) its remote path."""
    item_id = data.get("dataloop_item_id")
    if isinstance(item_id, str) and item_id:
        return item_id
    filename = data.get("dataloop_filename")
    if isinstance(filename, str) and filename:
        return "file:" + filename
    return None


# ----------------------------------------------------------------------------- planning (pure)


@dataclass
class ExistingTask:
    """What a paged task listing says of a task (no prediction bodies)."""

    id: int
    data: dict
    annotations: int = 0  # people's annotations on it
    total_predictions: int = 0
    versions: list[str] | None = None  # distinct model_versions of its predictions; None: unreadable
    meta: dict = field(default_factory=dict)

    @property
    def recorded(self) -> dict[str, str]:
        """model_version -> hash of the prediction dl2ls last wrote (from task meta)."""
        ours = self.meta.get(META_KEY) if isinstance(self.meta, dict) else None
        preds = ours.get("predictions") if isinstance(ours, dict) else None
        return {k: v for k, v in preds.items() if isinstance(v, str)} if isinstance(preds, dict) else {}

    @property
    def made_by_dl2ls(self) -> bool:
        ours = self.meta.get(META_KEY) if isinstance(self.meta, dict) else None
        return isinstance(ours, dict) and ours.get("created") is True

    @property
    def source(self) -> str | None:
        """The hash of the item's bytes and the conversion settings dl2ls last converted for it."""
        ours = self.meta.get(META_KEY) if isinstance(self.meta, dict) else None
        return ours.get("source") if isinstance(ours, dict) and isinstance(ours.get("source"), str) else None

    @property
    def consistent(self) -> bool:
        """The listing shows every prediction once per version (no duplicate to clean up)."""
        return self.versions is not None and self.total_predictions == len(self.versions)


@dataclass
class Stats:
    tasks_created: int = 0
    predictions_created: int = 0
    predictions_replaced: int = 0
    predictions_unchanged: int = 0
    predictions_deleted: int = 0  # versions an item no longer has, and deleted items'
    tasks_deleted: int = 0
    task_data_updated: int = 0
    items_skipped: int = 0  # listed twice in the sources
    items_ambiguous: int = 0
    items_failed: int = 0  # refused by Label Studio
    items_without_task: int = 0  # no task of theirs in the project, and creating tasks is not ours to do
    deletions_refused: int = 0
    versions: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        parts = [f"tasks created {self.tasks_created}; predictions created {self.predictions_created}, "
                 f"replaced {self.predictions_replaced}, unchanged {self.predictions_unchanged}"]
        for name, label in (("predictions_deleted", "predictions deleted"), ("tasks_deleted", "tasks deleted"),
                            ("task_data_updated", "task data completed"), ("items_skipped", "items listed twice"),
                            ("items_ambiguous", "items matched to no task (ambiguous)"),
                            ("items_failed", "items refused by Label Studio"),
                            ("items_without_task", "items with no task"),
                            ("deletions_refused", "deletions refused")):
            if getattr(self, name):
                parts.append(f"{label} {getattr(self, name)}")
        return "; ".join(parts)

    def to_json(self) -> dict:
        return {**{k: v for k, v in vars(self).items() if k != "versions"}, "versions": dict(self.versions)}


@dataclass
class Change:
    """What one item needs."""

    item: str | None = None  # the item's identity (for reports and sync's state)
    new_task: bytes | None = None  # a whole task, with predictions, as JSON
    task_id: int | None = None
    write: list[dict] = field(default_factory=list)  # predictions for task_id
    replace_versions: list[str] = field(default_factory=list)  # delete these versions on task_id first
    data_update: dict | None = None  # the task's whole data, with the keys it lacked
    meta_update: dict | None = None  # the task's whole meta, with dl2ls's record
    delete_task: bool = False
    record: dict | None = None  # dl2ls's record of what the task holds, for a caller that keeps it itself
    data_late: bool = False  # data_update claims nothing (only `fps`): written after the predictions

    @property
    def writes_anything(self) -> bool:
        return bool(self.new_task or self.write or self.replace_versions or self.data_update
                    or self.meta_update or self.delete_task)

    def size(self) -> int:
        return len(self.new_task or b"") + sum(len(orjson.dumps(w)) for w in self.write) + 64


@dataclass
class DeletionCheck:
    """Deleted items' tasks a run would take away, and whether it may."""

    doomed: list[tuple[str, int]]  # (item, task id)
    total_tasks: int
    allowed: bool

    def line(self) -> str:
        names = ", ".join(f"{escape(item)} (task {task})" for item, task in self.doomed[:20])
        more = f" and {len(self.doomed) - 20} more" if len(self.doomed) > 20 else ""
        return (f"refused to delete {len(self.doomed)} of {self.total_tasks} tasks' predictions in one run "
                f"(more than {MASS_DELETE_SHARE:.0%} and {MASS_DELETE_COUNT}): {names}{more}; "
                "if Dataloop really lost them, run again with --allow-mass-delete")


def mass_deletion(doomed: list[tuple[str, int]], total_tasks: int, allow: bool) -> DeletionCheck:
    big = len(doomed) > MASS_DELETE_COUNT and len(doomed) > MASS_DELETE_SHARE * total_tasks
    return DeletionCheck(doomed, total_tasks, allowed=allow or not big)


class Planner:
    """Decides, per converted task, what must change in the project (no I/O)."""

    def __init__(self, existing: Iterable[ExistingTask], data_key: str, match_mode: str = "item-id",
                 warn: Callable[[str], None] | None = None, create_tasks: bool = True, task_writes: bool = True,
                 complete: Iterable[str] = ()):
        """`create_tasks=False`: an item without a task gets none (the service's projects import their
        own tasks; it only pre-annotates them). `task_writes=False`: a task's data and meta are never
        written (one request per task would cost more than the predictions' bulk write); the record
        of what dl2ls wrote travels in `Change.record` for the caller to keep; only the data keys in
        `complete` are still added where a task lacks them (`fps`, when the config's frameRate reads
        it: without it the editor plays the video at a wrong rate)."""
        self.data_key = data_key
        self.match_mode = match_mode
        self.create_tasks = create_tasks
        self.task_writes = task_writes
        self.complete = OWNED_KEYS if task_writes else tuple(complete)
        self.warn = warn or (lambda line: None)
        self.tasks: dict[int, ExistingTask] = {}
        self.by_item: dict[str, ExistingTask] = {}
        self.adoptable: PathIndex[int] = PathIndex()  # tasks of no item yet, by media path
        self.matching: Matching = Matching()
        self.ambiguous: set[str] = set()
        self.seen_items: set[str] = set()
        claims: dict[str, list[int]] = {}
        for task in sorted(existing, key=lambda t: t.id):
            self.tasks[task.id] = task
            key = item_key(task.data)
            if key:
                claims.setdefault(key, []).append(task.id)
                self.by_item.setdefault(key, task)  # the oldest task of an item is its task
            else:
                self.adoptable.add(media_parts(task.data.get(data_key)), task.id)
        for key, ids in claims.items():
            if len(ids) > 1:
                self.warn(f"tasks {ids} all belong to item {escape(key)}: only task {ids[0]} is updated; "
                          "remove the others")

    @property
    def total_tasks(self) -> int:
        return len(self.tasks)

    def match_paths(self, items: dict[str, str | None]) -> None:
        """With --match filename: pair items (identity -> remote path) with tasks that belong to no
        item yet, by longest shared path suffix; ambiguous pairs are reported and left alone."""
        if self.match_mode != "filename":
            return
        parts = {key: media_parts(path) for key, path in items.items()}
        self.matching = match({k: p for k, p in parts.items() if p and k not in self.by_item}, self.adoptable,
                              others={k: p for k, p in parts.items() if p and k in self.by_item})
        self.ambiguous = set(self.matching.ambiguous_items)
        for ambiguity in self.matching.ambiguous_items.values():
            self.warn(ambiguity.line("item", "tasks"))
        for ambiguity in self.matching.ambiguous_tasks.values():
            self.warn(ambiguity.line("task", "items"))
            self.ambiguous.update(k for k, _ in ambiguity.candidates if k not in self.by_item)

    def remember(self, pairs: dict[str, int]) -> None:
        """Item -> task pairs the caller recorded when it wrote them (the service keeps its records
        itself): how a deleted item's task is found when the task does not say whose it is."""
        for key, task_id in pairs.items():
            if task_id in self.tasks and key not in self.by_item:
                self.matching.pairs.setdefault(key, task_id)

    def _ambiguous(self, key: str) -> bool:
        return key in self.ambiguous

    def find(self, key: str) -> ExistingTask | None:
        found = self.by_item.get(key)
        if found is None and key in self.matching.pairs:
            found = self.tasks[self.matching.pairs[key]]
        return found

    def unchanged(self, key: str, source: str, stats: Stats) -> bool:
        """Whether an item need not even be converted: its task records this very source (the item's
        bytes and the conversion settings) and every prediction dl2ls wrote for it is there, once."""
        existing = self.find(key)
        if existing is None or key in self.seen_items or existing.source != source or not existing.consistent:
            return False
        recorded = existing.recorded
        if not set(recorded) <= set(existing.versions or ()):
            return False
        self.seen_items.add(key)
        stats.predictions_unchanged += len(recorded)
        stats.versions.update(recorded)
        return True

    def plan(self, task: dict, body: bytes, stats: Stats, previous_versions: Iterable[str] = (),
             source: str | None = None) -> Change | None:
        """The change one converted task needs; None when the item must not be written (listed
        twice, or matched ambiguously). `previous_versions`: versions written for this item
        before (sync's state), deleted when the item no longer has them. `source`: the hash of the
        item's bytes and settings, recorded so the next run can skip converting it."""
        key = item_key(task["data"])
        if key is None:  # the reader gives every item an identity; a task without one is a bug upstream
            raise ValueError("a converted task without dataloop_item_id or dataloop_filename")
        if key in self.seen_items:  # the same item twice in the sources (V1 and V2 names...)
            stats.items_skipped += 1
            self.warn(f"item {escape(key)} appears more than once in the sources: the first one counts")
            return None
        self.seen_items.add(key)
        if self._ambiguous(key):
            stats.items_ambiguous += 1
            return None
        hashes = {p["model_version"]: prediction_hash(p["result"], p.get("score")) for p in task["predictions"]}
        stats.versions.update(hashes)
        existing = self.find(key)
        if existing is None and not self.create_tasks:
            stats.items_without_task += 1
            return Change(item=key)
        if existing is None:
            stats.tasks_created += 1
            stats.predictions_created += len(hashes)
            return Change(item=key, new_task=_with_meta(body, {META_KEY: {**_record(hashes, source), "created": True}}))

        change = Change(item=key, task_id=existing.id)
        missing = {k: v for k, v in task["data"].items()
                   if k in self.complete and v is not None and k not in existing.data}
        if missing:  # the task's media, and anything the user put there, stay as they are
            change.data_update = {**existing.data, **missing}
            # without task writes nothing is claimed: the predictions need not wait for it
            change.data_late = not self.task_writes
            stats.task_data_updated += 1
        fps = task["data"].get("fps")
        if fps is not None and existing.data.get("fps") not in (None, fps):
            self.warn(f"task {existing.id}: its fps {existing.data.get('fps')!r} differs from item {escape(key)}'s "
                      f"{fps}: left as it is; frames may drift")
        recorded = existing.recorded
        shown = set(existing.versions or ())
        for prediction in task["predictions"]:
            version = prediction["model_version"]
            if existing.consistent and version in shown and recorded.get(version) == hashes[version]:
                stats.predictions_unchanged += 1
                continue
            if version in shown or not existing.consistent:
                change.replace_versions.append(version)
                stats.predictions_replaced += version in shown
                stats.predictions_created += version not in shown
            else:
                stats.predictions_created += 1
            change.write.append({"task": existing.id, **prediction})
        stale = (set(recorded) | set(previous_versions)) - set(hashes)
        gone = sorted(v for v in stale if v in shown or not existing.consistent)
        change.replace_versions += gone
        stats.predictions_deleted += len(gone)
        mark = {"created": True} if existing.made_by_dl2ls else {}
        change.record = {**_record(hashes, source), **mark}
        if self.task_writes and (change.write or gone or set(recorded) != set(hashes)
                                 or (source and source != existing.source)):
            change.meta_update = {**existing.meta, META_KEY: change.record}
        return change

    def plan_deleted(self, key: str, previous_versions: Iterable[str], stats: Stats) -> Change | None:
        """An item Dataloop deleted: dl2ls's predictions go; the task goes too only when dl2ls made
        it and nothing else is on it (no annotation, skipped ones included, and no prediction of
        anyone else: the count of predictions is exactly dl2ls's)."""
        existing = self.find(key)
        if existing is None:
            return None
        ours = set(existing.recorded) | set(previous_versions)
        shown = set(existing.versions or ())
        change = Change(item=key, task_id=existing.id, replace_versions=sorted(ours & shown if existing.versions
                                                                             is not None else ours))
        if (existing.made_by_dl2ls and not existing.annotations and existing.versions is not None
                and shown <= ours and existing.total_predictions == len(shown & ours)):
            change.delete_task = True
            stats.tasks_deleted += 1
        stats.predictions_deleted += len(change.replace_versions)
        return change

    def model_version(self, current: str | None, stats: Stats, live: Iterable[str] = ()) -> str | None:
        """The project's model_version decides which predictions the labeling stream shows. Set it
        to the version this run wrote most when the project has none or shows one of dl2ls's own;
        a version someone else chose is theirs to keep (and we say how to see ours). `live`: the
        titles of the project's ML backends: a project showing one of them asks that backend's
        /setup which version to show, and dl2ls's service answers with the version it writes."""
        if not stats.versions or (current and current in set(live)):
            return None
        top = stats.versions.most_common(1)[0][0]
        if current == top:
            return None
        ours = set(stats.versions) | {v for t in self.tasks.values() for v in t.recorded}
        if not current or current in ours:
            return top
        self.warn(f"the project shows predictions of model_version {current!r}; dl2ls wrote {top!r}: pick it in "
                  "the project's settings (Annotation > Live predictions) to see them in the labeling stream")
        return None


def _record(hashes: dict[str, str], source: str | None) -> dict:
    return {"predictions": hashes, **({"source": source} if source else {})}


def _with_meta(body: bytes, meta: dict) -> bytes:
    """The task's JSON with a `meta` object added, without serialising the whole task again."""
    return b'{"meta":' + orjson.dumps(meta) + b"," + body[1:]


# ----------------------------------------------------------------------------- the server


def check_url(url: str) -> str:
    """LABEL_STUDIO_URL, checked: a scheme and a host, and no credentials (a token goes in
    LABEL_STUDIO_API_KEY; a user:password@ in the URL would silently replace it with basic auth)."""
    if not url:
        raise PushError("LABEL_STUDIO_URL is not set: export LABEL_STUDIO_URL=http://host:8080")
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise PushError("LABEL_STUDIO_URL is not a URL: expected e.g. http://host:8080") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        # the URL itself is not repeated: it may hold a password
        raise PushError("LABEL_STUDIO_URL must start with http:// or https:// and name a host "
                        "(e.g. http://localhost:8080)")
    if parts.username or parts.password:
        raise PushError("LABEL_STUDIO_URL must not carry user:password@: put the token in LABEL_STUDIO_API_KEY")
    return url.strip().rstrip("/")


class Pusher:
    """The only place that writes to Label Studio (through label-studio-sdk)."""

    def __init__(self, url: str, api_key: str, timeout: float = 120.0):
        from label_studio_sdk import LabelStudio  # heavy: only for the commands that talk to a server

        self.url = check_url(url)
        if not api_key:
            raise PushError("LABEL_STUDIO_API_KEY is not set: copy your token from Label Studio's "
                            "Account & Settings page")
        self.client = LabelStudio(base_url=self.url, api_key=api_key, timeout=timeout)
        self.timeout = timeout
        self.options = {"max_retries": RETRIES}
        self.requests = Counter()  # by kind, for summaries and benchmarks

    # -- errors -------------------------------------------------------------------------------

    def _call(self, what: str, fn: Callable, *args, **kwargs):
        return self._guard(what, lambda: fn(*args, **kwargs, request_options=self.options))

    def _guard(self, what: str, fn: Callable):
        from label_studio_sdk.core.api_error import ApiError
        import httpx

        try:
            return fn()
        except ApiError as err:
            raise PushError(self._explain(what, err.status_code, err.body)) from None
        except httpx.HTTPError as err:
            raise PushError(f"{what}: cannot reach Label Studio at {self.url} ({type(err).__name__}); "
                            "check LABEL_STUDIO_URL and that the server is up") from None

    def _explain(self, what: str, status: int | None, body: Any) -> str:
        if status == 401:
            return f"{what}: 401 unauthorized: LABEL_STUDIO_API_KEY is not a valid token for {self.url}"
        if status == 403:
            return f"{what}: 403 forbidden: the token's user may not do this (needs access to the project)"
        if status == 404:
            return f"{what}: 404 not found at {self.url}: no such object there, or LABEL_STUDIO_URL is wrong"
        detail = body.get("detail") if isinstance(body, dict) else None
        errors = body.get("validation_errors") if isinstance(body, dict) else None
        if isinstance(body, str) and body.lstrip()[:15].lower().startswith(("<!doctype", "<html")):
            # a server error's page (Django's): its markup says nothing; Label Studio's log does
            return f"{what}: HTTP {status}: an error page (Label Studio's log says why)"
        text = escape(str(errors or detail or body)[:300])
        return f"{what}: HTTP {status}: {text}"

    def _retrying(self, what: str, fn: Callable):
        """An idempotent request, tried again on a dropped connection (a restarting server)."""
        for attempt in range(RETRIES + 1):
            try:
                return self._guard(what, fn)
            except PushError as err:
                if "cannot reach" not in str(err) or attempt == RETRIES:
                    raise
                time.sleep(min(8.0, 0.25 * 2 ** attempt) * random.uniform(0.5, 1.5))

    # -- reads --------------------------------------------------------------------------------

    def project(self, project_id: int):
        self.requests["read"] += 1
        return self._call(f"project {project_id}", self.client.projects.get, project_id)

    def projects_titled(self, title: str) -> list:
        self.requests["read"] += 1
        return self._guard("list projects", lambda: [
            p for p in self.client.projects.list(title=title, page_size=100, request_options=self.options)
            if p.title == title])

    def create_project(self, title: str, label_config: str):
        """The new project, with the labeling config as the server keeps it (the text a later run
        reads back, so both runs fingerprint the same config)."""
        self.requests["write"] += 1
        project = self._call("create project", self.client.projects.create, title=title, label_config=label_config)
        log.info("created project %d %r", project.id, escape(title))
        return project

    def existing_tasks(self, project_id: int, task_ids: Iterable[int] | None = None,
                       without_predictions: bool = False, lacking: Iterable[str] = ()) -> Iterator[ExistingTask]:
        """Every task of the project (or those of `task_ids`; or those with no prediction at all
        or lacking one of the data keys `lacking`),
        a page at a time: id, data, meta, and what its predictions are (how many, which versions)
        without their bodies. Read through the SDK's own HTTP client and parsed by orjson: the
        typed pager spends longer building models than the server takes. The selections are the
        Data Manager's own query (`selectedItems`, `filters`), so the server does the choosing."""
        include = ("id,data,meta,total_annotations,cancelled_annotations,total_predictions,"
                   "predictions_model_versions")
        query: dict = {}
        if task_ids is not None:
            query["selectedItems"] = {"all": False, "included": sorted({int(t) for t in task_ids})}
            if not query["selectedItems"]["included"]:
                return
        if without_predictions:
            items = [{"filter": "filter:tasks:total_predictions", "operator": "equal", "type": "Number", "value": 0}]
            items += [{"filter": f"filter:tasks:data.{key}", "operator": "empty", "type": "Unknown", "value": True}
                      for key in lacking]
            query["filters"] = {"conjunction": "or", "items": items}
            query["ordering"] = ["-tasks:id"]  # newest first: those a lost webhook left behind
        extra = {"query": orjson.dumps(query).decode()} if query else {}
        page, seen = 1, 0
        while True:
            what = f"tasks of project {project_id} (page {page})"
            # fields=all: without it the listing leaves predictions_model_versions empty; include
            # still limits it to these fields. resolve_uri=false: the media as stored (s3://...),
            # not a presigned URL that would be written back and expire
            body = self._get_json(what, "api/tasks", {"project": project_id, "include": include, "fields": "all",
                                                      "resolve_uri": "false", "page_size": PAGE_SIZE, "page": page, **extra})
            tasks = body.get("tasks") if isinstance(body, dict) else None
            if not isinstance(tasks, list):
                raise PushError(f"{what}: Label Studio answered without a task list")
            for task in tasks:
                meta = task.get("meta")
                people = (task.get("total_annotations") or 0) + (task.get("cancelled_annotations") or 0)
                yield ExistingTask(int(task["id"]), dict(task.get("data") or {}), people,
                                   task.get("total_predictions") or 0, _versions(task.get("predictions_model_versions")),
                                   dict(meta) if isinstance(meta, dict) else {})
            seen += len(tasks)
            if not tasks or seen >= (body.get("total") or 0):
                return
            page += 1

    def _get_json(self, what: str, path: str, params: dict) -> Any:
        """A GET through the SDK's HTTP client (auth, base URL), retried over a dropped connection."""
        import httpx

        http = self.client._client_wrapper.httpx_client

        def get():
            self.requests["read"] += 1
            try:
                response = http.request(path, method="GET", params=params, request_options={"max_retries": RETRIES})
            except httpx.HTTPError as err:
                raise PushError(f"{what}: cannot reach Label Studio at {self.url} ({type(err).__name__}); "
                                "check LABEL_STUDIO_URL and that the server is up") from None
            if response.status_code >= 300:
                try:
                    detail = response.json()
                except ValueError:
                    detail = response.text
                raise PushError(self._explain(what, response.status_code, detail))
            try:
                return orjson.loads(response.content)
            except orjson.JSONDecodeError:
                raise PushError(f"{what}: Label Studio answered {response.status_code} without JSON") from None

        return self._retrying(what, get)

    def task_predictions(self, task_id: int) -> list[tuple[int, str]]:
        """(prediction id, model_version) of one task's predictions."""
        self.requests["read"] += 1
        found = self._retrying(f"predictions of task {task_id}",
                               lambda: self.client.predictions.list(task=task_id, request_options=self.options))
        return [(p.id, p.model_version or "") for p in found]

    # -- writes -------------------------------------------------------------------------------

    def import_tasks(self, project_id: int, tasks: list[bytes]) -> None:
        self._post_bulk("import tasks", f"api/projects/{project_id}/import", tasks)

    def import_predictions(self, project_id: int, predictions: list[bytes]) -> None:
        self._post_bulk("import predictions", f"api/projects/{project_id}/import/predictions", predictions)

    def _post_bulk(self, what: str, path: str, parts: list[bytes]) -> None:
        """The bulk endpoints, through the SDK's own HTTP client (auth, base URL) with a body
        joined from JSON already made: the typed methods walk every value of a large payload
        through pydantic first, which costs more than the request itself."""
        import httpx

        self.requests["write"] += 1
        http = self.client._client_wrapper.httpx_client
        try:
            # never re-sent by the client: a resend after a lost answer would import twice. A
            # failed run is finished by the next, which reads what landed first. Nor given up
            # early: an overloaded server (SQLite locked by other writers) goes on with a request
            # whose client has stopped waiting, and the run after it would then read the project
            # before that import lands, and import again
            response = http.request(path, method="POST", content=b"[" + b",".join(parts) + b"]",
                                    headers={"Content-Type": "application/json"},
                                    request_options={"max_retries": 0,
                                                     "timeout_in_seconds": max(BULK_TIMEOUT, self.timeout)})
        except httpx.HTTPError as err:
            raise PushError(f"{what}: cannot reach Label Studio at {self.url} ({type(err).__name__})") from None
        if response.status_code >= 300:
            try:
                detail = response.json()
            except ValueError:
                detail = response.text
            message = self._explain(what, response.status_code, detail)
            if 400 <= response.status_code < 500 and response.status_code not in (401, 403, 404, 429):
                raise Rejected(message)
            raise PushError(message)

    def delete_prediction(self, prediction_id: int) -> None:
        from label_studio_sdk.core.api_error import ApiError

        def delete():
            try:
                self.client.predictions.delete(prediction_id, request_options=self.options)
            except ApiError as err:
                if err.status_code != 404:  # already gone: what we wanted
                    raise

        self.requests["write"] += 1
        self._retrying(f"delete prediction {prediction_id}", delete)

    def delete_task(self, task_id: int) -> None:
        from label_studio_sdk.core.api_error import ApiError

        def delete():
            try:
                self.client.tasks.delete(str(task_id), request_options=self.options)
            except ApiError as err:
                if err.status_code != 404:
                    raise

        self.requests["write"] += 1
        self._retrying(f"delete task {task_id}", delete)

    def update_task(self, task_id: int, data: dict | None = None, meta: dict | None = None) -> None:
        from label_studio_sdk.core.api_error import ApiError

        fields = {k: v for k, v in (("data", data), ("meta", meta)) if v is not None}
        what = f"update task {task_id}"

        def update():
            try:
                self.client.tasks.update(str(task_id), **fields, request_options=self.options)
            except ApiError as err:  # refused for what it holds: this item's problem, not the run's
                if err.status_code is not None and 400 <= err.status_code < 500 and err.status_code not in (
                        401, 403, 404, 429):
                    raise Rejected(self._explain(what, err.status_code, err.body)) from None
                raise

        self.requests["write"] += 1
        self._retrying(what, update)

    def ml_backends(self, project_id: int) -> list[dict]:
        """The project's ML backend connections (id, url, title)."""
        found = self._get_json(f"ML backends of project {project_id}", "api/ml/", {"project": project_id})
        return [b for b in found if isinstance(b, dict)] if isinstance(found, list) else []

    def webhooks(self, project_id: int) -> list[dict]:
        found = self._get_json(f"webhooks of project {project_id}", "api/webhooks/", {"project": project_id})
        return [w for w in found if isinstance(w, dict)] if isinstance(found, list) else []

    def create_webhook(self, project_id: int, url: str, actions: list[str], headers: dict[str, str]) -> None:
        self.requests["write"] += 1
        self._call("register the webhook", self.client.webhooks.create, url=url, project=project_id,
                   send_payload=True, send_for_all_actions=False, actions=actions, headers=headers, is_active=True)

    def update_webhook(self, webhook_id: int, url: str, actions: list[str], headers: dict[str, str],
                       all_actions: bool = False) -> None:
        self.requests["write"] += 1
        self._call("update the webhook", self.client.webhooks.update, webhook_id, url=url, send_payload=True,
                   send_for_all_actions=all_actions, actions=actions, headers=headers, is_active=True)

    def import_storages(self, project_id: int, kind: str) -> list:
        """The project's import storages of one kind: "local", "s3", "gcs" or "azure" (each has
        `id`; local `path`, s3 and gcs `bucket`, azure `container`)."""
        self.requests["read"] += 1
        storages = getattr(self.client.import_storage, kind)
        return self._retrying(f"{kind} import storages of project {project_id}",
                              lambda: list(storages.list(project=project_id, request_options=self.options)))

    def create_local_storage(self, project_id: int, path: str, title: str):
        """A local files import storage at `path` (recursive, blob URLs), not synced: it only lets
        Label Studio serve /data/local-files/ under `path` to the project's users."""
        self.requests["write"] += 1
        return self._call("create the local files storage", self.client.import_storage.local.create,
                          project=project_id, path=path, title=title, recursive_scan=True, use_blob_urls=True)

    def set_model_version(self, project_id: int, version: str) -> None:
        self.requests["write"] += 1
        self._call("set the project's model_version", self.client.projects.update, project_id,
                   model_version=version)


def _versions(shown: Any) -> list[str] | None:
    """The listing's `predictions_model_versions`: a comma-joined text of distinct versions (cut
    at a length limit). None when it cannot be read exactly, so the caller looks closer."""
    if shown in (None, "", []):
        return []
    if isinstance(shown, list):
        return [str(v) for v in shown]
    if not isinstance(shown, str) or len(shown) >= 500:
        return None
    return [v.strip() for v in shown.split(",") if v.strip()]


# ----------------------------------------------------------------------------- carrying it out


@dataclass
class BatchResult:
    """What one batch did: the changes that landed, and those Label Studio refused (with why)."""

    landed: list[Change]
    refused: list[tuple[Change, str]]


def apply(pusher: Pusher, project_id: int, changes: Iterable[Change | None], dry_run: bool = False,
          on_batch: Callable[[BatchResult], None] | None = None, first_batch: int | None = None) -> None:
    """Carry out the changes in bulk batches, one batch written by a background thread while the
    next is converted (one request at a time, in order). Batches start small and double, so the
    server starts early and never waits for the converter. Within a batch, a task's versions are
    deleted before its predictions are written. A batch Label Studio rejects for its content is
    split until the items at fault are found: they are reported, the rest lands."""
    from concurrent.futures import ThreadPoolExecutor

    def write(batch: list[Change]) -> BatchResult:
        existing = [c for c in batch if c.new_task is None]
        updates = _write_existing(pusher, project_id, existing)
        creates = _bisect([c for c in batch if c.new_task is not None],
                          lambda b, resend: pusher.import_tasks(project_id, [c.new_task for c in b]))
        return BatchResult(updates.landed + creates.landed, updates.refused + creates.refused)

    def run(batch: list[Change]) -> None:
        result = write(batch)
        if on_batch is not None:
            on_batch(result)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dl2ls-push") as writer:
        in_flight = None
        batch: list[Change] = []
        used, limit = 0, min(first_batch or FIRST_BATCH, BATCH_TASKS)

        def submit():
            nonlocal in_flight
            if in_flight is not None:
                in_flight.result()  # the previous batch landed (or its error surfaces here)
            in_flight = None if dry_run else writer.submit(run, batch)

        for change in changes:
            if change is None or not change.writes_anything:
                continue
            batch.append(change)
            used += change.size()
            if used > BATCH_BYTES or len(batch) >= limit:
                submit()
                batch, used = [], 0
                limit = min(2 * limit, BATCH_TASKS)
        if batch:
            submit()
        if in_flight is not None:
            in_flight.result()


def _bisect(batch: list[Change], send: Callable[[list[Change], bool], None], resend: bool = False) -> BatchResult:
    """Send a batch; when Label Studio rejects it for its content, send each half (told that it is
    a resend), down to the single changes at fault."""
    if not batch:
        return BatchResult([], [])
    try:
        send(batch, resend)
        return BatchResult(batch, [])
    except Rejected as err:
        if len(batch) == 1:
            return BatchResult([], [(batch[0], str(err))])
    half = len(batch) // 2
    first, second = _bisect(batch[:half], send, True), _bisect(batch[half:], send, True)
    return BatchResult(first.landed + second.landed, first.refused + second.refused)


def _write_existing(pusher: Pusher, project_id: int, batch: list[Change]) -> BatchResult:
    """Changes to existing tasks, in an order a run killed between any two requests cannot harm:
    1. the task is claimed for its item first (the dataloop_* keys it lacked), so a prediction never
       sits on a task that does not yet say whose it is;
    2. the versions to replace are deleted once, and tasks that go are deleted;
    3. the new predictions go in one bulk request (split to find the items at fault when Label
       Studio rejects it; a resent half first deletes the versions it writes, in case part of the
       rejected request landed);
    4. the task's record of what dl2ls wrote comes last, so a run killed before it replaces the
       version again next time: nothing is ever doubled.
    Data that claims nothing (`data_late`: the service's `fps`) is left to `complete_late`, after
    every batch, so that no prediction waits for one request per task."""
    refused: list[tuple[Change, str]] = []
    ready: list[Change] = []

    def prepare(change: Change) -> str | None:
        """Steps 1 and 2 for one task (its own requests in order; tasks side by side)."""
        try:
            if change.data_update is not None and not change.delete_task and not change.data_late:
                pusher.update_task(change.task_id, data=change.data_update)
            if change.delete_task:
                pusher.delete_task(change.task_id)
            elif change.replace_versions:
                _delete_versions(pusher, change.task_id, set(change.replace_versions))
        except Rejected as err:
            return str(err)
        return None

    # one request per task (Label Studio deletes predictions one by one): a few at a time, as
    # complete_late does, rather than each waiting for the last
    from concurrent.futures import ThreadPoolExecutor

    busy = [c for c in batch if c.delete_task or c.replace_versions or (c.data_update is not None and not c.data_late)]
    with ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="dl2ls-prepare") as pool:
        why = dict(zip(map(id, busy), pool.map(prepare, busy)))
    for change in batch:
        if why.get(id(change)) is not None:
            refused.append((change, why[id(change)]))
        else:
            ready.append(change)

    def send(part: list[Change], resend: bool) -> None:
        if resend:
            for change in part:
                _delete_versions(pusher, change.task_id, {w["model_version"] for w in change.write})
        writes = [orjson.dumps(w) for c in part for w in c.write]
        if writes:
            pusher.import_predictions(project_id, writes)

    imported = _bisect(ready, send)
    refused += imported.refused
    landed = []
    for change in imported.landed:
        try:
            if change.meta_update is not None and not change.delete_task:
                pusher.update_task(change.task_id, meta=change.meta_update)
        except Rejected as err:
            refused.append((change, str(err)))
            continue
        landed.append(change)
    return BatchResult(landed, refused)


def complete_late(pusher: Pusher, changes: Iterable[Change], threads: int = 4) -> list[tuple[Change, str]]:
    """The `data_late` updates of changes that landed, a few at once (Label Studio has no bulk
    update of task data); those it refuses, with why."""
    from concurrent.futures import ThreadPoolExecutor

    late = [c for c in changes if c.data_late and c.data_update is not None and not c.delete_task]

    def one(change: Change) -> tuple[Change, str] | None:
        try:
            pusher.update_task(change.task_id, data=change.data_update)
        except Rejected as err:
            return change, str(err)
        return None

    with ThreadPoolExecutor(threads, thread_name_prefix="dl2ls-data") as pool:
        return [r for r in pool.map(one, late) if r is not None]


def _delete_versions(pusher: Pusher, task_id: int, versions: set[str]) -> None:
    if not versions:
        return
    for pid, version in pusher.task_predictions(task_id):
        if version in versions:
            pusher.delete_prediction(pid)
