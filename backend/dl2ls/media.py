"""Media through the backend: signed URLs for `/media/<item id>`.

Label Studio's editor fetches a task's video from the user's browser, which has no Dataloop token;
the backend streams it from Dataloop with its own. The URL a task carries is bound to its item by
an HMAC (SHA-256) keyed with DL2LS_MEDIA_SECRET: it never holds a token, it does not expire (Label
Studio keeps task data for good), and rotating the secret revokes every URL at once. Signing is pure
(no I/O).

The proxy (`respond`, served by the app at `GET`/`HEAD /media/<item id>?sig=…`): Dataloop's
`GET /items/{id}/stream` with the service's own session and token, the browser's `Range`,
`If-Range`, `If-None-Match` and `If-Modified-Since` passed on, and Dataloop's status (200, 206, 304,
416), `Accept-Ranges`, `Content-Range`, `Content-Length`, `Content-Type` (guessed from the item's
name when Dataloop gives none), `ETag` and `Last-Modified` passed back, with
`Cache-Control: private, max-age=3600`, and CORS for any origin (the editor's video element and
its fetch() ask cross-origin; the signature is the key). The body goes through as read, at most
CHUNK bytes at a time (the first read small, so that a seek's first bytes leave at once), never
whole. A connection to Dataloop that breaks midway ends the response there (one log line, no
traceback). The Dataloop token goes only into the request to Dataloop: never into an answer or a
log line. Each stream holds one of the server's threads (THREADS) for as long as it lasts.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import mimetypes
import re
import socket
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import quote

from dl2ls.report import escape

log = logging.getLogger("dl2ls.media")

SIGNATURE_CHARS = 32  # hex: 128 bits of the HMAC


def signature(item_id: str, secret: str) -> str:
    digest = hmac.new(secret.encode(), f"dl2ls-media\x00{item_id}".encode(), hashlib.sha256).hexdigest()
    return digest[:SIGNATURE_CHARS]


def valid(item_id: str, given: str | None, secret: str | None) -> bool:
    """Whether `given` is this item's signature under `secret` (constant time)."""
    if not secret or not given or not isinstance(given, str):
        return False
    return hmac.compare_digest(given.encode(), signature(item_id, secret).encode())


@dataclass(frozen=True)
class MediaProxy:
    """Where browsers reach the backend (DL2LS_PUBLIC_URL) and the secret its URLs are signed with."""

    public_url: str
    secret: str

    def url(self, item_id: str) -> str:
        return f"{self.public_url.rstrip('/')}/media/{quote(item_id, safe='')}?sig={signature(item_id, self.secret)}"


# ----------------------------------------------------------------------------- the proxy (I/O)

CHUNK = 1 << 20  # the most bytes read from Dataloop and written to the browser at a time: memory stays flat
FIRST_CHUNK = 64 << 10  # the first read: a seek's first bytes go out at once, the reads then double up to CHUNK
CACHE_CONTROL = "private, max-age=3600"
PASSED_IN = ("Range", "If-Range", "If-None-Match", "If-Modified-Since")  # the browser's, to Dataloop
PASSED_BACK = ("Accept-Ranges", "Content-Range", "Content-Length", "Content-Encoding", "ETag", "Last-Modified")
# Label Studio's editor loads the video from its own origin, with crossOrigin="anonymous" (it draws
# the frames on a canvas) and first a fetch() of `Range: bytes=0-0` for the Content-Type: both need
# CORS. Any origin, no credentials: the signature in the URL is the key, and it names one item.
CORS = {"Access-Control-Allow-Origin": "*",
        "Access-Control-Expose-Headers": "Accept-Ranges, Content-Range, Content-Length, ETag, Last-Modified"}
PREFLIGHT = {**CORS, "Access-Control-Allow-Methods": "GET, HEAD, OPTIONS",
             "Access-Control-Allow-Headers": "Range, If-Range, If-None-Match, If-Modified-Since",
             "Access-Control-Max-Age": "86400"}
GENERIC_TYPES = {"", "application/octet-stream", "binary/octet-stream", "application/binary"}
OPEN_ATTEMPTS = 3  # a browser is waiting: a few quick tries, not the API's minute of backoff
NAMES_KEPT = 1024

_names: OrderedDict = OrderedDict()  # (base, item id) -> item name, for a Content-Type Dataloop left out
_names_lock = threading.Lock()


class MediaError(Exception):
    """What the browser is told instead of the media: an HTTP status and one line (never a token)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def open_stream(client, item_id: str, headers: Mapping[str, str]):
    """Dataloop's `GET /items/{id}/stream` for the item through the DataloopClient (its session,
    token and retries, within a browser's patience: OPEN_ATTEMPTS tries in about a second), the
    browser's range and validator headers (`PASSED_IN`) passed on, the body not read yet. Returns
    the response when Dataloop answers below 400 or 416 (the caller closes it); else MediaError:
    404 for an item Dataloop does not have, 502 for everything else."""
    from dl2ls.dataloop.api import DataloopError

    what = f"item {escape(item_id)[:100]}"
    sent = {k: headers[k] for k in PASSED_IN if headers.get(k)}
    sent["Accept-Encoding"] = "identity"  # the bytes as stored: Content-Length and ranges count them
    try:
        response = client.open_stream(item_id, sent, budget=(2.0, OPEN_ATTEMPTS, 0.2))
    except DataloopError as err:
        raise MediaError(502, f"{what}: Dataloop: {err}") from None
    code = response.status_code
    if code < 400 or code == 416:
        return response
    response.close()
    if code == 404:
        raise MediaError(404, f"{what}: Dataloop has no such item (404)")
    if code in (401, 403):
        raise MediaError(502, f"{what}: Dataloop refused the backend's credentials (HTTP {code}): "
                              "check DATALOOP_API_KEY, or DATALOOP_USERNAME/DATALOOP_PASSWORD")
    raise MediaError(502, f"{what}: Dataloop answered HTTP {code}")


def content_type(client, item_id: str, upstream) -> str:
    """Dataloop's Content-Type; when it gives none, or only a generic one, the type the item's name
    says (the name from Content-Disposition, else GET /items/{id}, remembered)."""
    given = upstream.headers.get("Content-Type") or ""
    if given.split(";")[0].strip().lower() not in GENERIC_TYPES:
        return given
    name = _disposition_name(upstream.headers.get("Content-Disposition") or "") or _item_name(client, item_id)
    guessed = mimetypes.guess_type(name)[0] if name else None
    return guessed or given or "application/octet-stream"


def _disposition_name(header: str) -> str | None:
    found = re.search(r"filename\*?=(?:UTF-8'')?\"?([^\";]+)", header, re.IGNORECASE)
    return found.group(1) if found else None


def _item_name(client, item_id: str) -> str | None:
    key = (client.base, item_id)
    with _names_lock:
        if key in _names:
            _names.move_to_end(key)
            return _names[key]
    try:
        item = client.item(item_id)
        name = item.get("name") or item.get("filename") if isinstance(item, dict) else None
        name = name if isinstance(name, str) else None
    except Exception:  # noqa: BLE001 - only a better Content-Type was at stake
        return None
    with _names_lock:
        _names[key] = name
        while len(_names) > NAMES_KEPT:
            _names.popitem(last=False)
    return name


def relay(upstream, item_id: str, describe_error: Callable[[BaseException], str], cut: Callable[[], None]):
    """The body, as read: FIRST_CHUNK bytes, then reads that double up to CHUNK (never the whole).
    A connection to Dataloop that breaks, or a body shorter than its Content-Length, ends it there:
    one log line, and `cut()` closes the browser's connection so that it sees a short answer rather
    than waiting for the rest. The upstream response is closed however the iteration ends (the
    browser gone too: the server closes this generator)."""
    expected = upstream.headers.get("Content-Length")
    expected = int(expected) if expected and expected.isdigit() else None
    sent, broken, size = 0, None, FIRST_CHUNK
    try:
        while True:
            chunk = upstream.raw.read(size, decode_content=False)
            if not chunk:
                break
            sent += len(chunk)
            size = min(size * 2, CHUNK)
            yield chunk
        if expected is not None and sent < expected:
            broken = "the body ended early"
    except Exception as err:  # noqa: BLE001 - urllib3's and the socket's: the response ends, no traceback
        broken = describe_error(err)
    finally:
        upstream.close()
    if broken:
        total = f"{expected}" if expected is not None else "?"
        log.warning("media item %s: the connection to Dataloop broke after %d of %s bytes (%s): the response "
                    "ends there", escape(item_id)[:100], sent, total, escape(broken)[:200])
        cut()


def _why(client, err: BaseException) -> str:
    """One short line for a broken read (urllib3 repeats its message in its args), with no secret."""
    text = err.args[0] if err.args and isinstance(err.args[0], str) else str(err)
    return client._describe(Exception(text)).replace("Exception", type(err).__name__, 1)


def socket_cutter(environ: Mapping) -> Callable[[], None]:
    """Closes the sending side of the browser's connection (gunicorn's or werkzeug's socket; the
    test client has none): a response cut short by Dataloop then ends at once, and the connection
    is not kept alive with a body short of its Content-Length."""
    sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")

    def cut() -> None:
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # already gone
    return cut


def respond(client_of: Callable[[], object], item_id: str, given: str | None, secret: str | None,
            headers: Mapping[str, str], environ: Mapping, method: str = "GET"):
    """The answer to `GET`/`HEAD /media/<item id>?sig=…`: a Flask Response streaming the item from
    Dataloop, or a JSON error (404 without DL2LS_MEDIA_SECRET; 403 for a wrong or missing signature;
    404/502/503 when Dataloop has no such item, refuses, fails or has no credentials configured).
    `OPTIONS`: the CORS preflight, signature or not (it says nothing of the item)."""
    from flask import Response, jsonify

    from dl2ls.dataloop.api import DataloopError

    def error(status: int, message: str):
        answer = jsonify(error=message)
        answer.status_code = status
        answer.headers.update(CORS)
        return answer

    if not secret:
        return error(404, "the media proxy is off: set DL2LS_MEDIA_SECRET (and DL2LS_PUBLIC_URL for the URLs)")
    if method == "OPTIONS":  # a CORS preflight: says what may be asked, tells nothing of the item
        return Response(status=204, headers=PREFLIGHT)
    if not valid(item_id, given, secret):
        log.warning("media item %s: %s signature: 403", escape(item_id)[:100], "wrong" if given else "no")
        return error(403, "wrong or missing signature")
    try:
        client = client_of()
    except DataloopError as err:
        log.warning("media item %s: %s", escape(item_id)[:100], escape(str(err))[:300])
        return error(503, f"the backend cannot reach Dataloop: {err}")
    try:
        upstream = open_stream(client, item_id, headers)
    except MediaError as err:
        log.warning("media: %s", escape(str(err))[:300])
        return error(err.status, str(err))
    try:
        out = {k: upstream.headers[k] for k in PASSED_BACK if upstream.headers.get(k)}
        out["Cache-Control"] = CACHE_CONTROL
        # whatever a dataset holds (an .html, an .svg), it is media here, never a page of this origin
        out["X-Content-Type-Options"] = "nosniff"
        out["Content-Security-Policy"] = "sandbox; default-src 'none'"
        out.update(CORS)
        if upstream.status_code != 304:
            out["Content-Type"] = content_type(client, item_id, upstream)
        if method == "HEAD" or upstream.status_code == 304:
            upstream.close()
            body = ()
        else:
            body = relay(upstream, item_id, lambda err: _why(client, err), socket_cutter(environ))
    except BaseException:
        upstream.close()
        raise
    answer = Response(body, status=upstream.status_code, headers=out)
    answer.call_on_close(upstream.close)  # also when the body is never iterated (HEAD, a client gone)
    return answer
