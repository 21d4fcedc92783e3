"""The gunicorn worker of `dl2ls serve`: gunicorn's threads, but no thread waits on a slow client.

gunicorn's gthread worker hands a connection to a thread as soon as its first byte arrives, and the
thread then blocks until the request headers are complete: eight clients that send half a header
and stop hold eight threads, and every route, /health included, stalls. This worker reads the
header block on the event loop instead, without blocking, and gives a thread only a request whose
headers are complete; the body and the response then run under a time limit:

- a connection whose header block is not complete `DL2LS_HEADER_TIMEOUT` seconds (10) after it was
  accepted, or after a kept-alive connection sent its next byte, is closed (408 if it sent some);
- a header block over `MAX_HEADER` bytes is answered 431 and closed;
- reading the body (and draining what the app left unread, before the connection is kept alive)
  must finish within `DL2LS_BODY_TIMEOUT` seconds (30) of the thread taking the request; each
  write of the response may take as long. Past that, the connection is closed.

Threads, not greenlets: the process also runs CPU-bound work in threads. With TLS (gunicorn's
--certfile) the header block cannot be read before the handshake, so gunicorn's own behaviour is
kept. `dl2ls serve` uses this worker; with gunicorn's command line name it:

    gunicorn --worker-class dl2ls.web.Worker --workers $WORKERS --threads $THREADS _wsgi:app
"""

from __future__ import annotations

import errno
import io
import logging
import os
import selectors
import time
from functools import partial

from gunicorn.http.body import ChunkedReader, LengthReader
from gunicorn.http.unreader import SocketUnreader
from gunicorn.workers.gthread import TConn, ThreadWorker

log = logging.getLogger("dl2ls.web")

HEADER_TIMEOUT = 10.0
BODY_TIMEOUT = 30.0
MAX_HEADER = 64 << 10  # Label Studio's headers are well under 1 KiB
END_OF_HEADER = b"\r\n\r\n"
ACTIVE = False  # set in a worker of this class, so that _wsgi can warn when run without it


def seconds_from_env(name: str, default: float) -> float:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < 86400:
        log.warning("%s=%r is not a number of seconds: using %s", name, value[:40], default)
        return default
    return seconds


def canned(status: str, message: str) -> bytes:
    body = ('{"error": "%s"}' % message).encode()
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


class DeadlineUnreader(SocketUnreader):
    """gunicorn's socket reader, with one deadline for all the reads of a request's body."""

    def __init__(self, sock, write_timeout: float):
        super().__init__(sock)
        self.deadline = float("inf")
        self.write_timeout = write_timeout

    def chunk(self):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request body did not arrive in time")
        self.sock.settimeout(min(left, self.write_timeout))
        try:
            return self.sock.recv(self.mxchunk)
        finally:
            self.sock.settimeout(self.write_timeout)  # the response gets its own time


class Conn(TConn):
    """A connection with the bytes of a header block that is not complete yet."""

    def __init__(self, *args):
        super().__init__(*args)
        self.pending = bytearray()


def peer(conn) -> str:
    return str(conn.client[0] if isinstance(conn.client, tuple) else conn.client)


def body_consumed(req) -> bool:
    reader = req.body.reader
    if isinstance(reader, LengthReader):
        return reader.length == 0
    if isinstance(reader, ChunkedReader):
        return reader.parser is None
    return False


class Worker(ThreadWorker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout = seconds_from_env("DL2LS_HEADER_TIMEOUT", HEADER_TIMEOUT)
        self.body_timeout = seconds_from_env("DL2LS_BODY_TIMEOUT", BODY_TIMEOUT)
        # connections reading a header block -> deadline; insertion order is deadline order
        # (deadlines are now + one constant), so the reaper stops at the first one still in time.
        # Only the event loop's thread touches it.
        self.waiting: dict[Conn, float] = {}

    def init_process(self):
        global ACTIVE
        ACTIVE = True
        super().init_process()

    def accept(self, server, listener):
        try:
            sock, client = listener.accept()
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        conn = Conn(self.cfg, sock, client, server)
        self.nr_conns += 1
        if not self.cfg.is_ssl:
            self.waiting[conn] = time.monotonic() + self.header_timeout
        with self._lock:
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_client_socket_readable, conn))

    def on_client_socket_readable(self, conn, client):
        if self.cfg.is_ssl:
            return super().on_client_socket_readable(conn, client)
        with self._lock:
            self.poller.unregister(client)
            if conn not in self.waiting:  # a kept-alive connection starts its next request
                try:
                    self._keep.remove(conn)
                except ValueError:  # closed by murder_keepalived meanwhile
                    return
                unreader = conn.parser.unreader
                conn.pending[:] = unreader.buf.getvalue()  # bytes of it read with the last request
                unreader.buf = io.BytesIO()
                self.waiting[conn] = time.monotonic() + self.header_timeout
        closed = self.read_available(conn)
        if closed:
            self.drop(conn)
        elif END_OF_HEADER in conn.pending:
            del self.waiting[conn]
            self.hand_off(conn)
        elif len(conn.pending) > MAX_HEADER:
            self.drop(conn, canned("431 Request Header Fields Too Large", "request headers too large"))
        else:
            with self._lock:
                self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_client_socket_readable, conn))

    def read_available(self, conn) -> bool:
        """Read what has arrived without blocking; True when the client has gone."""
        while len(conn.pending) <= MAX_HEADER:
            try:
                data = conn.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:
                return True
            if not data:
                return True
            conn.pending += data
            if END_OF_HEADER in conn.pending[-len(data) - 3:]:
                break
        return False

    def hand_off(self, conn):
        conn.init()
        if not isinstance(conn.parser.unreader, DeadlineUnreader):
            conn.parser.unreader = DeadlineUnreader(conn.sock, self.body_timeout)
        conn.parser.unreader.unread(bytes(conn.pending))
        conn.pending.clear()
        fs = self.tpool.submit(self.handle, conn)
        self._wrap_future(fs, conn)

    def drop(self, conn, answer: bytes = b""):
        self.waiting.pop(conn, None)
        with self._lock:
            try:
                self.poller.unregister(conn.sock)
            except (KeyError, ValueError, OSError):
                pass  # not registered
        if answer:
            try:
                conn.sock.send(answer)  # best effort: the socket does not block
            except OSError:
                pass
        self.nr_conns -= 1
        conn.close()

    def murder_keepalived(self):
        super().murder_keepalived()
        now = time.monotonic()
        late = []
        for conn, deadline in self.waiting.items():
            if deadline > now:
                break
            late.append(conn)
        for conn in late:
            # an idle connection is routine (browsers open them ahead); half a header is not
            log.log(logging.INFO if conn.pending else logging.DEBUG,
                    "closing a connection from %s: no complete request headers in %g s", peer(conn),
                    self.header_timeout)
            self.drop(conn, canned("408 Request Timeout", "request headers not complete in time")
                      if conn.pending else b"")

    def handle(self, conn):
        if not isinstance(conn.parser.unreader, DeadlineUnreader):
            return super().handle(conn)
        while True:
            conn.parser.unreader.deadline = time.monotonic() + self.body_timeout  # from now, not from queueing
            conn.sock.settimeout(self.body_timeout)
            keepalive, conn = super().handle(conn)
            # a client that had its answer before we read off the rest of its body may have sent
            # its next request already: it lies in the parser's buffer, and the socket will not
            # wake the event loop for it, so it is served here (its headers are complete)
            if not keepalive or END_OF_HEADER not in conn.parser.unreader.buf.getvalue():
                return keepalive, conn

    def handle_request(self, req, conn):
        try:
            keepalive = super().handle_request(req, conn)
            if keepalive and not body_consumed(req):
                # the next header block starts after this body: read it off, within the deadline
                while req.body.read(65536):
                    pass
            return keepalive
        except TimeoutError:
            log.info("closing a connection from %s: request body or response not done in %g s",
                     peer(conn), self.body_timeout)
            raise StopIteration from None  # gunicorn's handle() then closes the connection quietly
