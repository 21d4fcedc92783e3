"""Dataloop's REST API, through `requests`: the only module that speaks HTTP to Dataloop.

Shapes follow Dataloop's public API and its SDK `dtlpy` (see shared/reference/dataloop.md):
- auth: `Authorization: Bearer <jwt>`; an API key is itself a JWT (checked with GET /users/me);
  or username/password through POST {gate}/token?default, renewed 60 s before the JWT's `exp`
  with its refresh token, as dtlpy does;
- items: POST /datasets/{id}/query with a DQL body, paged by key (sorted on `id`, then
  `{"id": {"$gt": last}}`), as dtlpy pages, for as long as the server says there is more
  (`hasNextPage`); GET /items/{id}; GET /items/{id}/annotations;
- a whole dataset: POST /datasets/{id}/export -> a command, polled with GET /commands/{id}
  (backoff 2, 4, 8, 16, then 30 s), then GET /items/{outputItemId}/stream (a JSON array of items),
  streamed to a temporary file and handed out one item at a time (`export_items`);
- an item's binary: GET /items/{id}/stream, streamed in chunks to a temporary file beside its
  place, synced and renamed into place only when whole (`download_media`). The client may be
  shared by threads (fetch --media downloads a few at once).
Every call has a timeout; connection errors, 5xx and 429 are retried with exponential backoff and
jitter (honouring Retry-After) within a bounded total wait; 401/403/404 and every other failure of
the transport end in one line (`DataloopError`). Tokens never appear in logs, errors or reports.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import random
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterator
from urllib.parse import quote, urlsplit

import orjson
import requests

from dl2ls.dataloop.read import DEFAULT_LIMITS, FileChanged, PreadBuffer, ReadLimits, split_array

log = logging.getLogger("dl2ls.dataloop")

DEFAULT_URL = "https://gate.dataloop.ai/api/v1"
PAGE_SIZE = 1000
POLL_SCHEDULE = (2, 4, 8, 16, 30)  # seconds between command polls, then 30 s on
TERMINAL = {"success", "failed", "timeout", "canceled", "aborted"}
MAX_ATTEMPTS = 12  # per request, whatever the waits: a server answering "retry now" forever is a failure
MIN_DELAY = 0.05
DOWNLOAD_ATTEMPTS = 4  # an export download cut off midway is started again, this many times in all
DOWNLOAD_CHUNK = 1 << 20

# failures of the transport worth another attempt: the network, the server's end of it, a body cut off
RETRIED = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


def _parse(body: bytes) -> Any:
    """JSON, by orjson (pages of annotations are megabytes); what orjson refuses that the
    standard library reads (integers past 64 bits, NaN) by json."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)


class DataloopError(Exception):
    """One line: what Dataloop refused or what could not be reached, and the fix."""


class Stopped(Exception):
    """A download given up because the run is stopping (Ctrl-C): its temporary file is gone."""


def item_key(item: Any) -> str | None:
    """An item's (or annotation's) id: `id`, else `_id` (some answers carry only the latter);
    None when it has neither, or is not an object."""
    if isinstance(item, dict):
        for key in ("id", "_id"):
            value = item.get(key)
            if isinstance(value, str) and value:
                return value
    return None


@dataclass(slots=True)
class ExportElement:
    """One element of a downloaded export array: its raw JSON, or why it was left out."""

    index: int
    data: bytes | None = None
    error: str | None = None


def check_url(url: str) -> str:
    """The API's base URL, checked before any request: requests would fail later with a traceback
    on a URL without a scheme (e.g. `gate.dataloop.ai/api/v1`)."""
    problem = None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError as err:
        parts, problem = None, str(err)
    if parts is not None and (parts.scheme not in ("http", "https") or not parts.hostname):
        problem = "not an http(s) URL"
    if problem:
        shown = re.sub(r"^([^/]*//)?[^/@]*@", r"\1", url)  # never a user:password@
        raise DataloopError(f"DATALOOP_API_URL {shown[:100]!r}: {problem}; expected e.g. {DEFAULT_URL}")
    return url


def jwt_expiry(token: str) -> float | None:
    """The `exp` of a JWT (no signature check: the server checks; we only plan renewals)."""
    try:
        payload = token.split(".")[1]
        data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(data["exp"])
    except (IndexError, KeyError, ValueError, TypeError):
        return None


@dataclass
class Counters:
    requests: int = 0
    retries: int = 0
    skipped: int = 0  # listed items with neither id nor _id
    by_route: dict[str, int] = field(default_factory=dict)


class DataloopClient:
    def __init__(self, base_url: str | None = None, api_key: str | None = None, username: str | None = None,
                 password: str | None = None, timeout: float = 60.0, max_wait: float = 300.0,
                 poll_schedule: tuple[float, ...] = POLL_SCHEDULE, backoff: float = 1.0):
        self.base = check_url((base_url or os.environ.get("DATALOOP_API_URL") or DEFAULT_URL).strip().rstrip("/"))
        self.gate = self.base[: -len("/api/v1")] if self.base.endswith("/api/v1") else self.base
        self._api_key = api_key if api_key is not None else os.environ.get("DATALOOP_API_KEY")
        self._username = username if username is not None else os.environ.get("DATALOOP_USERNAME")
        self._password = password if password is not None else os.environ.get("DATALOOP_PASSWORD")
        if not self._api_key and not (self._username and self._password):
            raise DataloopError("no Dataloop credentials: set DATALOOP_API_KEY (an API key), or "
                                "DATALOOP_USERNAME and DATALOOP_PASSWORD")
        self.timeout = timeout
        self.max_wait = max_wait
        self.poll_schedule = poll_schedule
        self.backoff = backoff
        self.session = requests.Session()
        # as many pooled connections as fetch --media may run downloads at once
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=32)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.counters = Counters()
        self._token: str | None = self._api_key or None
        self._refresh: str | None = None
        self._lock = threading.RLock()  # the session token and the counters, when threads share the client

    # -- auth -----------------------------------------------------------------------------------

    def _bearer(self) -> str:
        with self._lock:  # one login at a time, whichever thread finds the session expired
            return self._bearer_locked()

    def _bearer_locked(self) -> str:
        if self._api_key:
            exp = jwt_expiry(self._api_key)
            if exp is not None and exp < time.time():
                raise DataloopError("DATALOOP_API_KEY has expired: create a new API key in Dataloop")
            return self._api_key
        exp = jwt_expiry(self._token) if self._token else None
        if self._token is None or (exp is not None and exp - 60 < time.time()):
            self._login()
        return self._token

    def _login(self) -> None:
        """A JWT from the token endpoint: renewed with the refresh token when there is one."""
        body = ({"type": "refresh_token", "refresh_token": self._refresh} if self._refresh else
                {"type": "user_credentials", "username": self._username, "password": self._password})
        response = self._send("POST", f"{self.gate}/token?default", json_body=body, auth=False, route="token")
        if response.status_code in (400, 401, 403) and self._refresh:
            self._refresh = None  # the refresh token went stale: log in again
            return self._login()
        if response.status_code in (400, 401, 403):
            raise DataloopError("Dataloop refused DATALOOP_USERNAME/DATALOOP_PASSWORD (login failed)")
        self._check(response, "login")
        try:
            data = response.json()
        except (ValueError, RecursionError, requests.RequestException):
            data = None
        if not isinstance(data, dict):
            raise DataloopError("login: Dataloop's token endpoint did not answer with a JSON object")
        self._token = data.get("id_token")
        self._refresh = data.get("refresh_token", self._refresh)
        if not self._token:
            raise DataloopError("login: Dataloop's token endpoint returned no id_token")

    # -- transport ------------------------------------------------------------------------------

    def _send(self, method: str, url: str, json_body: Any = None, auth: bool = True, route: str = "",
              stream: bool = False, headers: dict[str, str] | None = None,
              budget: tuple[float, int, float] | None = None) -> requests.Response:
        """One logical request, retried on connection errors, 5xx and 429 with exponential backoff
        and jitter (Retry-After wins), until max_wait seconds of waiting are spent. `budget`:
        (max_wait, attempts, backoff) for a caller someone is waiting on (a browser)."""
        max_wait, max_attempts, backoff = budget or (self.max_wait, MAX_ATTEMPTS, self.backoff)
        waited, attempt, relogged = 0.0, 0, False
        extra = dict(headers or {})
        while True:
            headers = {**extra, "Authorization": f"Bearer {self._bearer()}"} if auth else dict(extra)
            with self._lock:
                self.counters.requests += 1
                self.counters.by_route[route] = self.counters.by_route.get(route, 0) + 1
            problem = None
            try:
                response = self.session.request(method, url, json=json_body, headers=headers, timeout=self.timeout,
                                                stream=stream)
            except RETRIED as err:
                response, problem = None, type(err).__name__
            except requests.RequestException as err:  # a bad URL, redirects without end, an undecodable body
                raise DataloopError(f"{method} {self._path(url)}: {self._describe(err)}") from None
            except (UnicodeError, ValueError) as err:  # e.g. a key with characters no HTTP header can carry
                raise DataloopError(f"{method} {self._path(url)}: cannot send the request "
                                    f"({type(err).__name__}; check DATALOOP_API_URL and the credentials)") from None
            if response is not None:
                if response.status_code == 401 and auth and not self._api_key and not relogged:
                    response.close()
                    with self._lock:
                        if self._token == headers["Authorization"][7:]:  # not renewed by another thread meanwhile
                            self._token = None  # an expired session: log in again, once
                    relogged = True
                    continue
                if response.status_code != 429 and response.status_code < 500:
                    return response
                problem = f"HTTP {response.status_code}"
                response.close()  # a streamed body left unread would hold its connection
            delay = self._delay(response, attempt, backoff)
            if waited + delay > max_wait or attempt + 1 >= max_attempts:
                raise DataloopError(f"{method} {self._path(url)}: gave up after {attempt + 1} attempts and "
                                    f"{waited:.0f} s of waiting ({problem})")
            log.debug("%s %s: %s, retrying in %.1f s", method, self._path(url), problem, delay)
            with self._lock:
                self.counters.retries += 1
            time.sleep(delay)
            waited += delay
            attempt += 1

    def _delay(self, response: requests.Response | None, attempt: int, backoff: float | None = None) -> float:
        if response is not None:
            retry_after = response.headers.get("Retry-After")
            if retry_after:
                try:
                    return max(MIN_DELAY, float(retry_after))
                except ValueError:
                    pass
        return min(60.0, (self.backoff if backoff is None else backoff) * 2 ** attempt) * random.uniform(0.5, 1.5)

    def _path(self, url: str) -> str:
        return url[len(self.gate):] if url.startswith(self.gate) else url

    def _describe(self, err: BaseException) -> str:
        """One line for a failure of the transport, with no secret in it."""
        text = str(err).splitlines()[0][:200] if str(err) else ""
        for secret in (self._api_key, self._token, self._password, self._refresh):
            if secret:
                text = text.replace(secret, "***")
        return f"{type(err).__name__}: {text}" if text else type(err).__name__

    def _check(self, response: requests.Response, what: str) -> None:
        code = response.status_code
        if code < 300:
            return
        if code == 401:
            raise DataloopError(f"{what}: 401 unauthorized: the Dataloop credentials were refused "
                                "(check DATALOOP_API_KEY, or DATALOOP_USERNAME/DATALOOP_PASSWORD)")
        if code == 403:
            raise DataloopError(f"{what}: 403 forbidden: this user may not read it (project membership?)")
        if code == 404:
            raise DataloopError(f"{what}: 404 not found at {self.base}: no such id, or DATALOOP_API_URL is wrong")
        raise DataloopError(f"{what}: HTTP {code}: {response.text[:200]!r}")

    def request(self, method: str, path: str, json_body: Any = None, what: str | None = None,
                route: str | None = None) -> Any:
        response = self._send(method, f"{self.base}{path}", json_body=json_body, route=route or path)
        self._check(response, what or f"{method} {path}")
        try:
            return _parse(response.content)
        except (ValueError, RecursionError):  # not JSON, or nested deeper than can be read
            raise DataloopError(f"{what or path}: Dataloop answered {response.status_code} with no readable "
                                f"JSON ({response.text[:80]!r})") from None
        except requests.RequestException as err:  # the body cut off or undecodable
            raise DataloopError(f"{what or path}: {self._describe(err)}") from None

    # -- resources ------------------------------------------------------------------------------

    def me(self) -> dict:
        return self.request("GET", "/users/me", what="check the credentials", route="users/me")

    def dataset(self, dataset_id: str) -> dict:
        return self.request("GET", f"/datasets/{dataset_id}", what=f"dataset {dataset_id}", route="datasets/{id}")

    def item(self, item_id: str) -> dict:
        return self.request("GET", f"/items/{item_id}", what=f"item {item_id}", route="items/{id}")

    def open_stream(self, item_id: str, headers: dict[str, str], budget: tuple[float, int, float]) -> requests.Response:
        """`GET /items/{id}/stream` with extra headers (a browser's Range and validators), the body
        not read yet: retried as every request (an expired login renewed once) within `budget`
        (max_wait, attempts, backoff). Any answer below 500 other than 429 (404, 416...) is the
        caller's to read; DataloopError (one line) when none came."""
        return self._send("GET", f"{self.base}/items/{quote(item_id, safe='')}/stream", route="items/{id}/stream",
                          stream=True, headers=headers, budget=budget)

    def find_item(self, item_id: str) -> dict | None:
        """The item, or None when Dataloop says it does not exist (404): what sync asks before it
        takes anything away, never concluding from a listing that merely left the item out."""
        response = self._send("GET", f"{self.base}/items/{item_id}", route="items/{id}")
        if response.status_code == 404:
            return None
        self._check(response, f"item {item_id}")
        try:
            return response.json()
        except (ValueError, RecursionError, requests.RequestException):
            raise DataloopError(f"item {item_id}: Dataloop answered with no readable JSON") from None

    def item_annotations(self, item_id: str) -> list[dict]:
        return self.request("GET", f"/items/{item_id}/annotations", what=f"annotations of item {item_id}",
                            route="items/{id}/annotations")

    def query(self, dataset_id: str, filters: list[dict] | None = None, resource: str = "items",
              page_size: int = PAGE_SIZE) -> Iterator[dict]:
        """Every item (or annotation) matching the DQL filters, paged by key as dtlpy pages: sorted
        on `id`, each page asking for ids after the last one seen, for as long as the server says
        there is more (`hasNextPage`, else `totalPagesCount`, else until an empty page). Never by
        the length of a page: a server may cap its pages below `pageSize`, and a listing that ends
        early would look like deletions to sync. Entries with neither `id` nor `_id` are logged,
        counted (`counters.skipped`) and left out."""
        base = [{"hidden": False}, {"type": "file"}] if resource == "items" else []
        what = f"query dataset {dataset_id}"
        last = None
        while True:
            clauses = base + list(filters or []) + ([{"id": {"$gt": last}}] if last else [])
            body = {"filter": {"$and": clauses}, "sort": {"id": "ascending"}, "page": 0, "pageSize": page_size,
                    "resource": resource}
            page = self.request("POST", f"/datasets/{dataset_id}/query", body, what=what,
                                route="datasets/{id}/query")
            found = page.get("items") if isinstance(page, dict) else None
            if found is None and isinstance(page, dict) and not page.get("hasNextPage"):
                return  # an empty listing may leave `items` out
            if not isinstance(found, list):
                raise DataloopError(f"{what}: the answer holds no list of items ({type(page).__name__})")
            newest = None
            for entry in found:
                key = item_key(entry)
                if key is None:
                    self.counters.skipped += 1
                    log.warning("%s: skipped an entry with neither id nor _id", what)
                    continue
                newest = key
                yield entry
            if not found or not self._more(page):
                return
            if newest is None:
                raise DataloopError(f"{what}: a page of {len(found)} entries without ids: cannot ask for the next")
            if newest == last:  # the same page again: the server ignored {"id": {"$gt": last}}
                raise DataloopError(f"{what}: the server sent the page ending at id {last!r} twice: "
                                    "it does not page by id")
            last = newest

    @staticmethod
    def _more(page: dict) -> bool:
        """Whether the listing goes on after this page, as the server says: key paging always asks
        for page 0 of what is left, so there is more exactly when that has more than one page."""
        more = page.get("hasNextPage")
        if isinstance(more, bool):
            return more
        pages = page.get("totalPagesCount")
        if isinstance(pages, int) and not isinstance(pages, bool):
            return pages > 1
        return True  # neither: ask again, until an empty page

    def _run_export(self, dataset_id: str, filters: list[dict] | None, max_seconds: float) -> str:
        """Start the export command and wait for it; the id of the item holding its output."""
        body = {"exportType": "json", "annotations": {"include": True, "convertSemantic": False}}
        if filters:
            body["itemsQuery"] = {"filter": {"$and": list(filters)}}
        command = self.request("POST", f"/datasets/{dataset_id}/export", body, what=f"export dataset {dataset_id}",
                               route="datasets/{id}/export")
        started = time.monotonic()
        for n in range(10**6):
            if not isinstance(command, dict):
                raise DataloopError(f"export of dataset {dataset_id}: the command is not a JSON object")
            status = command.get("status")
            if status in TERMINAL:
                break
            if time.monotonic() - started > max_seconds:
                raise DataloopError(f"export of dataset {dataset_id}: still {status!r} after {max_seconds:.0f} s")
            time.sleep(self.poll_schedule[min(n, len(self.poll_schedule) - 1)])
            command = self.request("GET", f"/commands/{command.get('id')}", what="export command",
                                   route="commands/{id}")
        if command.get("status") != "success":
            raise DataloopError(f"export of dataset {dataset_id} ended {command.get('status')!r}: "
                                f"{str(command.get('error') or '')[:200]}")
        output = (command.get("spec") or {}).get("outputItemId")
        if not output or not isinstance(output, str):
            raise DataloopError(f"export of dataset {dataset_id}: the command names no outputItemId")
        return output

    def _download(self, output: str, sink: IO[bytes]) -> int:
        """Stream the export's output item into `sink`, chunk by chunk (never the whole body in
        memory); a download cut off midway starts again from the beginning. The bytes written."""
        url, what = f"{self.base}/items/{output}/stream", "download the export"
        for attempt in range(DOWNLOAD_ATTEMPTS):
            response = self._send("GET", url, route="items/{id}/stream", stream=True)
            try:
                self._check(response, what)
                sink.seek(0)
                sink.truncate()
                size = 0
                for chunk in response.iter_content(DOWNLOAD_CHUNK):
                    sink.write(chunk)
                    size += len(chunk)
                sink.flush()
                return size
            except RETRIED as err:
                if attempt + 1 >= DOWNLOAD_ATTEMPTS:
                    raise DataloopError(f"{what}: cut off {attempt + 1} times ({type(err).__name__})") from None
                log.debug("%s: %s, starting again", what, type(err).__name__)
                self.counters.retries += 1
                time.sleep(self._delay(None, attempt))
            except requests.RequestException as err:
                raise DataloopError(f"{what}: {self._describe(err)}") from None
            except OSError as err:
                raise DataloopError(f"{what}: cannot write the temporary file: {err.strerror or err}") from None
            finally:
                response.close()
        raise AssertionError("unreachable")

    def export(self, dataset_id: str, filters: list[dict] | None = None, max_seconds: float = 6 * 3600) -> bytes:
        """The export command: a JSON array of items, each with its annotations, whole in memory.
        Prefer `export_items`, whose memory follows the largest item instead of the dataset."""
        output = self._run_export(dataset_id, filters, max_seconds)
        sink = io.BytesIO()
        self._download(output, sink)
        return sink.getvalue()

    def export_items(self, dataset_id: str, filters: list[dict] | None = None, max_seconds: float = 6 * 3600,
                     limits: ReadLimits = DEFAULT_LIMITS) -> Iterator[ExportElement]:
        """The export command, one item at a time: the download goes to a temporary file (already
        unlinked, so it is gone however the iteration ends, even on a kill), which is split without
        parsing it; each element's raw JSON is read from the file when its turn comes. An element
        over the item limit comes with its reason instead of its bytes. A download that is not a
        JSON array raises DataloopError, after the elements before the fault."""
        output = self._run_export(dataset_id, filters, max_seconds)
        fd, name = tempfile.mkstemp(prefix="dl2ls-export-")
        os.unlink(name)
        with os.fdopen(fd, "w+b") as sink:
            size = self._download(output, sink)
            buf = PreadBuffer(sink.fileno(), size)
            try:
                for index, (a, b) in enumerate(split_array(buf)):
                    if b - a > limits.max_item_bytes:
                        yield ExportElement(index, error=f"refused: {b - a} bytes, over the "
                                                         f"{limits.max_item_bytes} allowed per item (--max-item-size)")
                    else:
                        yield ExportElement(index, buf[a:b])
            except (ValueError, FileChanged) as err:
                raise DataloopError(f"export of dataset {dataset_id}: the download is not a JSON array of "
                                    f"items: {err}") from None

    def download_media(self, item_id: str, path: Path, stop: threading.Event | None = None,
                       progress: Callable[[int], None] | None = None) -> int:
        """Stream an item's binary (GET /items/{id}/stream) into `path`: chunk by chunk into a
        temporary file beside it (so a rename is atomic), synced to disk and renamed into place
        only when whole (the body ran to its Content-Length, or to the end of its chunked
        encoding); a download cut off midway starts again from the beginning. `stop`: set by
        another thread to give up (raises Stopped). `progress(n)`: bytes received (negative: a
        restart). The bytes written; DataloopError (one line) when it cannot be had; nothing is
        left behind but a complete file."""
        from dl2ls.dataloop.write import part_file

        what = f"item {item_id}'s media"
        url = f"{self.base}/items/{quote(item_id, safe='')}/stream"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = part_file(path)
        except OSError as err:
            raise DataloopError(f"{what}: cannot write {path}: {err.strerror or err}") from None
        try:
            with os.fdopen(fd, "wb") as sink:
                written = self._stream_into(url, what, sink, stop, progress)
                sink.flush()
                os.fsync(sink.fileno())
            os.chmod(tmp, 0o666 & ~_UMASK)
            os.replace(tmp, path)
            return written
        except OSError as err:
            raise DataloopError(f"{what}: cannot write {path}: {err.strerror or err}") from None
        finally:
            Path(tmp).unlink(missing_ok=True)  # gone after the rename; else never left half written

    def _stream_into(self, url: str, what: str, sink: IO[bytes], stop: threading.Event | None,
                     progress: Callable[[int], None] | None) -> int:
        for attempt in range(DOWNLOAD_ATTEMPTS):
            if stop is not None and stop.is_set():
                raise Stopped(what)
            response = self._send("GET", url, route="items/{id}/stream", stream=True)
            written = 0
            try:
                self._check(response, what)
                sink.seek(0)
                sink.truncate()
                for chunk in response.iter_content(DOWNLOAD_CHUNK):
                    if stop is not None and stop.is_set():
                        raise Stopped(what)
                    sink.write(chunk)
                    written += len(chunk)
                    if progress is not None:
                        progress(len(chunk))
                return written
            except RETRIED as err:
                if progress is not None and written:
                    progress(-written)
                if attempt + 1 >= DOWNLOAD_ATTEMPTS:
                    raise DataloopError(f"{what}: cut off {attempt + 1} times ({type(err).__name__})") from None
                log.debug("%s: %s, starting again", what, type(err).__name__)
                with self._lock:
                    self.counters.retries += 1
                time.sleep(self._delay(None, attempt))
            except requests.RequestException as err:
                raise DataloopError(f"{what}: {self._describe(err)}") from None
            finally:
                response.close()
        raise AssertionError("unreachable")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once, at import: os.umask is process-wide, and downloads run in threads
