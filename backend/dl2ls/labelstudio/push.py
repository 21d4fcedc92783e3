"""Write converted tasks and predictions into a Label Studio project through label-studio-sdk.

Idempotent and resumable by construction: every run first reads what the project holds (tasks
with their predictions, matched to Dataloop items by `data.dataloop_item_id`, or by media file
name), then
- items without a task become tasks with their predictions (bulk `import_tasks`);
- for items with a task, each model_version ends with exactly one prediction: unchanged ones are
  left alone, changed or duplicated ones are deleted and written again (bulk
  `import_predictions`); other versions and all annotations are never touched.
A run killed anywhere leaves a state the next run reads and finishes. The planning (`Planner`) is
pure; only `Pusher` speaks to the server.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable
from urllib.parse import parse_qs, unquote, urlparse

import orjson

log = logging.getLogger("dl2ls.push")

BATCH_BYTES = 8 << 20  # per bulk request: well under the server's request limits
BATCH_TASKS = 1000  # per request; larger batches cost the server less per task
FIRST_BATCH = 100  # batches start small and double: writing starts early and overlaps conversion
RETRIES = 5  # the SDK retries connection errors, 429 and 5xx with exponential backoff


class PushError(Exception):
    """One line: what went wrong talking to Label Studio, and the fix."""


def prediction_hash(result: list, score: float | None) -> str:
    return hashlib.sha1(orjson.dumps({"result": result, "score": score}, option=orjson.OPT_SORT_KEYS)).hexdigest()


def media_name(value: Any) -> str | None:
    """The file name of a task's media URL: s3://b/a/clip.mp4, /data/local-files/?d=a/clip.mp4 ..."""
    if not isinstance(value, str) or not value:
        return None
    url = urlparse(value)
    if "d" in parse_qs(url.query):
        return posixpath.basename(unquote(parse_qs(url.query)["d"][0])) or None
    return posixpath.basename(unquote(url.path)) or None


# ----------------------------------------------------------------------------- planning (pure)


@dataclass
class ExistingTask:
    id: int
    data: dict
    predictions: dict[str, list[tuple[int, str]]]  # model_version -> [(prediction id, hash)]
    annotations: int = 0  # people's annotations on it


@dataclass
class Stats:
    tasks_created: int = 0
    predictions_created: int = 0
    predictions_replaced: int = 0
    predictions_unchanged: int = 0
    duplicates_removed: int = 0
    task_data_updated: int = 0
    items_skipped: int = 0
    versions: Counter = field(default_factory=Counter)
    first_version: str | None = None  # of the first prediction written: an empty project adopts it

    def summary(self) -> str:
        return (f"tasks created {self.tasks_created}; predictions created {self.predictions_created}, "
                f"replaced {self.predictions_replaced}, unchanged {self.predictions_unchanged}"
                + (f", duplicates removed {self.duplicates_removed}" if self.duplicates_removed else "")
                + (f"; task data completed {self.task_data_updated}" if self.task_data_updated else "")
                + (f"; items skipped {self.items_skipped}" if self.items_skipped else ""))


@dataclass
class Change:
    """What one converted item needs."""

    new_task: dict | None = None  # a whole task, with predictions
    task_id: int | None = None
    write: list[dict] = field(default_factory=list)  # predictions for task_id
    delete: list[int] = field(default_factory=list)  # prediction ids
    data_update: dict | None = None  # data keys an existing task lacks (fps, Dataloop ids)


OWNED_KEYS = ("fps", "dataloop_item_id", "dataloop_dataset_id", "dataloop_filename")  # task data dl2ls keeps


class Planner:
    """Decides, per converted task, what must change in the project (no I/O)."""

    def __init__(self, existing: Iterable[ExistingTask], data_key: str, match: str = "item-id"):
        self.data_key = data_key
        self.match = match
        self.by_item: dict[str, ExistingTask] = {}
        self.by_name: dict[str, ExistingTask] = {}
        self.shared: dict[str, list[int]] = {}  # item id -> task ids, when several tasks claim one item
        self.claimed: set[int] = set()  # tasks an item of this run already took
        self.seen_items: set[str] = set()
        for task in existing:
            item_id = task.data.get("dataloop_item_id")
            if item_id:
                if item_id in self.by_item:
                    self.shared.setdefault(item_id, [self.by_item[item_id].id]).append(task.id)
                self.by_item.setdefault(item_id, task)
                continue
            # only tasks that belong to no Dataloop item yet may be found by their media's name
            name = media_name(task.data.get(data_key))
            if name:
                self.by_name.setdefault(name, task)

    def find(self, task: dict) -> ExistingTask | None:
        data = task["data"]
        found = self.by_item.get(data.get("dataloop_item_id") or "")
        if found is None and self.match == "filename":
            name = media_name(data.get("dataloop_filename")) or media_name(data.get(self.data_key)) or ""
            candidate = self.by_name.get(name)
            if candidate is not None and candidate.id not in self.claimed:
                found = candidate
        return found

    def plan(self, task: dict, stats: Stats, warn: Callable[[str], None] | None = None) -> Change | None:
        """The change one converted task needs; None for an item this run has already planned."""
        item_id = task["data"].get("dataloop_item_id")
        if item_id:
            if item_id in self.seen_items:  # the same item twice in the sources (V1 and V2 names...)
                stats.items_skipped += 1
                if warn:
                    warn(f"item {item_id} appears more than once in the sources: the first one counts")
                return None
            self.seen_items.add(item_id)
            if item_id in self.shared and warn:
                warn(f"tasks {self.shared[item_id]} all belong to item {item_id}: only task "
                     f"{self.shared[item_id][0]} is updated; remove the others")
        existing = self.find(task)
        for prediction in task["predictions"]:
            stats.versions[prediction["model_version"]] += 1
            if stats.first_version is None:
                stats.first_version = prediction["model_version"]
        if existing is None:
            stats.tasks_created += 1
            stats.predictions_created += len(task["predictions"])
            return Change(new_task=task)
        self.claimed.add(existing.id)
        change = Change(task_id=existing.id)
        ours = existing.data.get("dataloop_item_id") == item_id  # a task dl2ls made (or adopted) for it
        update = {k: v for k, v in task["data"].items()
                  if (k in OWNED_KEYS or (k == self.data_key and ours)) and existing.data.get(k) != v
                  or (k not in existing.data and k != self.data_key)}
        if update:
            change.data_update = {**existing.data, **update}
            stats.task_data_updated += 1
        for prediction in task["predictions"]:
            version = prediction["model_version"]
            have = existing.predictions.get(version, [])
            digest = prediction_hash(prediction["result"], prediction.get("score"))
            if len(have) == 1 and have[0][1] == digest:
                stats.predictions_unchanged += 1
                continue
            same = [pid for pid, h in have if h == digest]
            if same:  # a duplicate left by an interrupted run: keep one, drop the rest
                change.delete += [pid for pid, _ in have if pid != same[0]]
                stats.duplicates_removed += len(have) - 1
                continue
            change.delete += [pid for pid, _ in have]
            if have:
                stats.predictions_replaced += 1
            else:
                stats.predictions_created += 1
            change.write.append({"task": existing.id, **prediction})
        return change


# ----------------------------------------------------------------------------- the server


class Pusher:
    """The only place that writes to Label Studio (through label-studio-sdk)."""

    def __init__(self, url: str, api_key: str, timeout: float = 120.0):
        from label_studio_sdk import LabelStudio  # heavy: only for the commands that talk to a server

        if not url:
            raise PushError("LABEL_STUDIO_URL is not set: export LABEL_STUDIO_URL=http://host:8080")
        if not api_key:
            raise PushError("LABEL_STUDIO_API_KEY is not set: copy your token from Label Studio's "
                            "Account & Settings page")
        self.client = LabelStudio(base_url=url.rstrip("/"), api_key=api_key, timeout=timeout)
        parsed = urlparse(url.rstrip("/"))  # for messages: never the user:password@ of a URL
        self.url = parsed._replace(netloc=parsed.hostname + (f":{parsed.port}" if parsed.port else "")).geturl() \
            if parsed.hostname else url.rstrip("/")
        self.options = {"max_retries": RETRIES}

    # -- errors -------------------------------------------------------------------------------

    def _call(self, what: str, fn: Callable, *args, **kwargs):
        from label_studio_sdk.core.api_error import ApiError
        import httpx

        try:
            return fn(*args, **kwargs, request_options=self.options)
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
        text = str(errors or detail or body)[:300].replace("\n", " ")
        return f"{what}: HTTP {status}: {text}"

    # -- reads --------------------------------------------------------------------------------

    def project(self, project_id: int):
        return self._call(f"project {project_id}", self.client.projects.get, project_id)

    def create_project(self, title: str, label_config: str) -> int:
        project = self._call("create project", self.client.projects.create, title=title, label_config=label_config)
        log.info("created project %d %r", project.id, title)
        return project.id

    def existing_tasks(self, project_id: int) -> list[ExistingTask]:
        """Every task of the project (id and data only: the full listing costs the server ~6x
        more) and, from one predictions listing, its predictions' versions and content hashes."""
        from label_studio_sdk.core.api_error import ApiError

        what = f"tasks of project {project_id}"
        try:
            tasks = {t.id: ExistingTask(t.id, dict(t.data or {}), {}, t.total_annotations or 0) for t in self._call(
                what, self.client.tasks.list, project=project_id, include="id,data,total_annotations",
                page_size=1000)}
        except ApiError as err:  # the pager fetches further pages lazily, outside _call
            raise PushError(self._explain(what, err.status_code, err.body)) from None
        for p in self._call(f"predictions of project {project_id}", self.client.predictions.list,
                            project=project_id):
            task = tasks.get(p.task)
            if task is not None:
                task.predictions.setdefault(p.model_version or "", []).append(
                    (p.id, prediction_hash(p.result or [], p.score)))
        return list(tasks.values())

    # -- writes -------------------------------------------------------------------------------

    def import_tasks(self, project_id: int, tasks: list[dict]) -> None:
        self._post_bulk("import tasks", f"api/projects/{project_id}/import", tasks,
                        lambda: self.client.projects.import_tasks(project_id, request=tasks, return_task_ids=False,
                                                                  request_options=self.options))

    def import_predictions(self, project_id: int, predictions: list[dict]) -> None:
        self._post_bulk("import predictions", f"api/projects/{project_id}/import/predictions", predictions,
                        lambda: self.client.projects.import_predictions(project_id, request=predictions,
                                                                        request_options=self.options))

    def _post_bulk(self, what: str, path: str, body: list[dict], typed: Callable) -> None:
        """The bulk endpoints, through the SDK's own HTTP client (auth, base URL, retries) with the
        body serialised once by orjson: the typed methods walk every value of a large payload
        through pydantic first, which costs more than the request itself."""
        http = getattr(getattr(self.client, "_client_wrapper", None), "httpx_client", None)
        if http is None or not hasattr(http, "request"):  # a future SDK: take the typed way
            self._call(what, lambda request_options: typed())
            return
        import httpx

        try:
            # never re-sent by the client: a resend after a lost answer would import twice. A
            # failed run is finished by the next, which reads what landed first.
            response = http.request(path, method="POST", content=orjson.dumps(body),
                                    headers={"Content-Type": "application/json"},
                                    request_options={"max_retries": 0})
        except httpx.HTTPError as err:
            raise PushError(f"{what}: cannot reach Label Studio at {self.url} ({type(err).__name__})") from None
        if response.status_code >= 300:
            try:
                detail = response.json()
            except ValueError:
                detail = response.text
            raise PushError(self._explain(what, response.status_code, detail))

    def delete_prediction(self, prediction_id: int) -> None:
        from label_studio_sdk.core.api_error import ApiError

        try:
            self.client.predictions.delete(prediction_id, request_options=self.options)
        except ApiError as err:
            if err.status_code != 404:  # already gone: what we wanted
                raise PushError(self._explain(f"delete prediction {prediction_id}", err.status_code,
                                              err.body)) from None

    def delete_task(self, task_id: int) -> None:
        self._call(f"delete task {task_id}", self.client.tasks.delete, str(task_id))

    def update_task_data(self, task_id: int, data: dict) -> None:
        self._call(f"update task {task_id}", self.client.tasks.update, str(task_id), data=data)

    def set_model_version(self, project_id: int, version: str) -> None:
        self._call("set the project's model_version", self.client.projects.update, project_id,
                   model_version=version)


def apply(pusher: Pusher, project_id: int, changes: Iterable[Change], dry_run: bool = False) -> None:
    """Carry out the changes in bulk batches. A batch's deletions go before its writes, so an
    interruption never leaves two predictions of one version unnoticed. One batch is written by a
    background thread while the next is converted: the request waits on the server, the
    conversion on this process, and the two overlap (one request at a time, in order). Batches
    start small and double, so that the server starts early and never waits for the converter."""
    from concurrent.futures import ThreadPoolExecutor

    def flush(new_tasks: list[dict], writes: list[dict], deletes: list[int], updates: list[tuple[int, dict]]):
        for task_id, data in updates:
            pusher.update_task_data(task_id, data)
        for pid in deletes:
            pusher.delete_prediction(pid)
        if writes:
            pusher.import_predictions(project_id, writes)
        if new_tasks:
            pusher.import_tasks(project_id, new_tasks)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dl2ls-push") as writer:
        in_flight = None
        new_tasks, writes, deletes, updates, used = [], [], [], [], 0

        def submit():
            nonlocal in_flight
            if in_flight is not None:
                in_flight.result()  # the previous batch landed (or its error surfaces here)
            in_flight = None if dry_run else writer.submit(flush, new_tasks, writes, deletes, updates)

        limit = min(FIRST_BATCH, BATCH_TASKS)
        for change in changes:
            if change is None:
                continue
            if change.new_task is not None:
                new_tasks.append(change.new_task)
                used += len(orjson.dumps(change.new_task))
            writes.extend(change.write)
            used += sum(len(orjson.dumps(w)) for w in change.write)
            deletes.extend(change.delete)
            if change.data_update is not None:
                updates.append((change.task_id, change.data_update))
            if used > BATCH_BYTES or len(new_tasks) + len(writes) >= limit:
                submit()
                new_tasks, writes, deletes, updates, used = [], [], [], [], 0
                limit = min(2 * limit, BATCH_TASKS)
        if new_tasks or writes or deletes or updates:
            submit()
        if in_flight is not None:
            in_flight.result()
