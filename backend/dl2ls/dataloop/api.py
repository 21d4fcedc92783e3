"""Dataloop's REST API, through `requests`: the only module that speaks HTTP to Dataloop.

Shapes follow Dataloop's public API and its SDK `dtlpy` (see shared/reference/dataloop.md):
- auth: `Authorization: Bearer <jwt>`; an API key is itself a JWT (checked with GET /users/me);
  or username/password through POST {gate}/token?default, renewed 60 s before the JWT's `exp`
  with its refresh token, as dtlpy does;
- items: POST /datasets/{id}/query with a DQL body, paged by key (sorted on `id`, then
  `{"id": {"$gt": last}}`), as dtlpy pages; GET /items/{id}; GET /items/{id}/annotations;
- a whole dataset: POST /datasets/{id}/export -> a command, polled with GET /commands/{id}
  (backoff 2, 4, 8, 16, then 30 s), then GET /items/{outputItemId}/stream (a JSON array of items).
Every call has a timeout; connection errors, 5xx and 429 are retried with exponential backoff and
jitter (honouring Retry-After) within a bounded total wait; 401/403/404 end in one line. Tokens
never appear in logs, errors or reports.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import requests

log = logging.getLogger("dl2ls.dataloop")

DEFAULT_URL = "https://gate.dataloop.ai/api/v1"
PAGE_SIZE = 1000
POLL_SCHEDULE = (2, 4, 8, 16, 30)  # seconds between command polls, then 30 s on
TERMINAL = {"success", "failed", "timeout", "canceled", "aborted"}
MAX_ATTEMPTS = 12  # per request, whatever the waits: a server answering "retry now" forever is a failure
MIN_DELAY = 0.05


class DataloopError(Exception):
    """One line: what Dataloop refused or what could not be reached, and the fix."""


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
    by_route: dict[str, int] = field(default_factory=dict)


class DataloopClient:
    def __init__(self, base_url: str | None = None, api_key: str | None = None, username: str | None = None,
                 password: str | None = None, timeout: float = 60.0, max_wait: float = 300.0,
                 poll_schedule: tuple[float, ...] = POLL_SCHEDULE, backoff: float = 1.0):
        self.base = (base_url or os.environ.get("DATALOOP_API_URL") or DEFAULT_URL).rstrip("/")
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
        self.counters = Counters()
        self._token: str | None = self._api_key or None
        self._refresh: str | None = None

    # -- auth -----------------------------------------------------------------------------------

    def _bearer(self) -> str:
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
        data = response.json()
        self._token = data.get("id_token")
        self._refresh = data.get("refresh_token", self._refresh)
        if not self._token:
            raise DataloopError("login: Dataloop's token endpoint returned no id_token")

    # -- transport ------------------------------------------------------------------------------

    def _send(self, method: str, url: str, json_body: Any = None, auth: bool = True, route: str = "",
              stream: bool = False) -> requests.Response:
        """One logical request, retried on connection errors, 5xx and 429 with exponential backoff
        and jitter (Retry-After wins), until max_wait seconds of waiting are spent."""
        waited, attempt, relogged = 0.0, 0, False
        while True:
            headers = {"Authorization": f"Bearer {self._bearer()}"} if auth else {}
            self.counters.requests += 1
            self.counters.by_route[route] = self.counters.by_route.get(route, 0) + 1
            problem = None
            try:
                response = self.session.request(method, url, json=json_body, headers=headers, timeout=self.timeout,
                                                stream=stream)
            except (requests.ConnectionError, requests.Timeout) as err:
                response, problem = None, type(err).__name__
            if response is not None:
                if response.status_code == 401 and auth and not self._api_key and not relogged:
                    self._token = None  # an expired session: log in again, once
                    relogged = True
                    continue
                if response.status_code != 429 and response.status_code < 500:
                    return response
                problem = f"HTTP {response.status_code}"
            delay = self._delay(response, attempt)
            if waited + delay > self.max_wait or attempt + 1 >= MAX_ATTEMPTS:
                raise DataloopError(f"{method} {self._path(url)}: gave up after {attempt + 1} attempts and "
                                    f"{waited:.0f} s of waiting ({problem})")
            log.debug("%s %s: %s, retrying in %.1f s", method, self._path(url), problem, delay)
            self.counters.retries += 1
            time.sleep(delay)
            waited += delay
            attempt += 1

    def _delay(self, response: requests.Response | None, attempt: int) -> float:
        if response is not None:
            retry_after = response.headers.get("Retry-After")
            if retry_after:
                try:
                    return max(MIN_DELAY, float(retry_after))
                except ValueError:
                    pass
        return min(60.0, self.backoff * 2 ** attempt) * random.uniform(0.5, 1.5)

    def _path(self, url: str) -> str:
        return url[len(self.gate):] if url.startswith(self.gate) else url

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
            return response.json()
        except ValueError:
            raise DataloopError(f"{what or path}: Dataloop answered {response.status_code} with no JSON "
                                f"({response.text[:80]!r})") from None

    # -- resources ------------------------------------------------------------------------------

    def me(self) -> dict:
        return self.request("GET", "/users/me", what="check the credentials", route="users/me")

    def dataset(self, dataset_id: str) -> dict:
        return self.request("GET", f"/datasets/{dataset_id}", what=f"dataset {dataset_id}", route="datasets/{id}")

    def item(self, item_id: str) -> dict:
        return self.request("GET", f"/items/{item_id}", what=f"item {item_id}", route="items/{id}")

    def item_annotations(self, item_id: str) -> list[dict]:
        return self.request("GET", f"/items/{item_id}/annotations", what=f"annotations of item {item_id}",
                            route="items/{id}/annotations")

    def query(self, dataset_id: str, filters: list[dict] | None = None, resource: str = "items",
              page_size: int = PAGE_SIZE) -> Iterator[dict]:
        """Every item (or annotation) matching the DQL filters, paged by key as dtlpy pages: sorted
        on `id`, each page asking for ids after the last one seen."""
        base = [{"hidden": False}, {"type": "file"}] if resource == "items" else []
        last = None
        while True:
            clauses = base + list(filters or []) + ([{"id": {"$gt": last}}] if last else [])
            body = {"filter": {"$and": clauses}, "sort": {"id": "ascending"}, "page": 0, "pageSize": page_size,
                    "resource": resource}
            page = self.request("POST", f"/datasets/{dataset_id}/query", body, what=f"query dataset {dataset_id}",
                                route="datasets/{id}/query")
            found = page.get("items") or []
            yield from found
            if not found or len(found) < page_size or not page.get("hasNextPage", True):
                return
            last = found[-1]["id"]

    def export(self, dataset_id: str, filters: list[dict] | None = None, max_seconds: float = 6 * 3600) -> bytes:
        """The export command: a JSON array of items, each with its annotations."""
        body = {"exportType": "json", "annotations": {"include": True, "convertSemantic": False}}
        if filters:
            body["itemsQuery"] = {"filter": {"$and": list(filters)}}
        command = self.request("POST", f"/datasets/{dataset_id}/export", body, what=f"export dataset {dataset_id}",
                               route="datasets/{id}/export")
        started = time.monotonic()
        for n in range(10**6):
            status = command.get("status")
            if status in TERMINAL:
                break
            if time.monotonic() - started > max_seconds:
                raise DataloopError(f"export of dataset {dataset_id}: still {status!r} after {max_seconds:.0f} s")
            time.sleep(self.poll_schedule[min(n, len(self.poll_schedule) - 1)])
            command = self.request("GET", f"/commands/{command['id']}", what="export command",
                                   route="commands/{id}")
        if command.get("status") != "success":
            raise DataloopError(f"export of dataset {dataset_id} ended {command.get('status')!r}: "
                                f"{str(command.get('error') or '')[:200]}")
        output = (command.get("spec") or {}).get("outputItemId")
        if not output:
            raise DataloopError(f"export of dataset {dataset_id}: the command names no outputItemId")
        response = self._send("GET", f"{self.base}/items/{output}/stream", route="items/{id}/stream")
        self._check(response, "download the export")
        return response.content
