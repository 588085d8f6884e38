"""One HTTP attempt under a wall-clock deadline and a byte cap.

`timeout=` in requests bounds each socket operation, not the request: a server
that sends one byte every 0.5 s never trips a 2 s read timeout and holds the
request as long as it likes, and a 100 MB answer is read whole. Here an attempt

- runs under a `Watchdog`: a timer that, at the deadline, shuts the attempt's
  socket down, so whatever read is blocked (the status line, a header, the
  body) returns at once. The socket is handed to the watchdog by the session's
  connections themselves (`DeadlineAdapter`), because the header phase happens
  inside `Session.post`, before any response object exists;
- reads the body itself (`stream=True`, `read1`: whatever one receive brings),
  checking the deadline and the byte cap after every piece, and refuses a
  declared Content-Length over the cap without reading it.

Both failures raise `AttemptFailed`, which the describer treats like a timeout
(a failed attempt, retried), so nothing of such a reply is ever parsed or cached.
"""
from __future__ import annotations

import math
import socket
import threading
import time

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

CHUNK_BYTES = 64 * 1024

_local = threading.local()


class AttemptFailed(Exception):
    """An attempt whose reply broke a bound; `kind` is 'oversized' or 'overdue'."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class Watchdog:
    """Shuts the current attempt's socket(s) down when `seconds` have passed.

    Used as a context manager around one attempt, in the thread that makes it.
    `fired` tells afterwards whether the deadline cut the attempt: then whatever
    the cut read produced (an error, or a short body that looks complete) is void.
    """

    def __init__(self, seconds: float):
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._done = False
        self.fired = False
        self._timer: threading.Timer | None = None
        if math.isfinite(seconds):
            self._timer = threading.Timer(max(0.0, seconds), self._fire)
            self._timer.daemon = True

    def watch(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self._lock:
            if self._done:
                return
            self._socks.append(sock)
            if self.fired:
                _shutdown(sock)

    def _fire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.fired = True
            for sock in self._socks:
                _shutdown(sock)

    def __enter__(self) -> "Watchdog":
        _local.watchdog = self
        if self._timer is not None:
            self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._done = True  # from here on the socket may go back to the pool: never touch it again
            self._socks.clear()
        if self._timer is not None:
            self._timer.cancel()
        _local.watchdog = None


def _shutdown(sock: socket.socket) -> None:
    # socket.socket.shutdown also on an SSLSocket: its own shutdown() would unwrap TLS under the reader's feet
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


class _WatchedConnection:
    """Hands the socket to the thread's current Watchdog just before the response is awaited."""

    def getresponse(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        dog = getattr(_local, "watchdog", None)
        if dog is not None:
            dog.watch(getattr(self, "sock", None))
        return super().getresponse(*args, **kwargs)  # type: ignore[misc]


class _HTTPConnection(_WatchedConnection, HTTPConnection):
    pass


class _HTTPSConnection(_WatchedConnection, HTTPSConnection):
    pass


class DeadlineHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class DeadlineHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


_WATCHED_POOLS = {"http": DeadlineHTTPConnectionPool, "https": DeadlineHTTPSConnectionPool}


class DeadlineAdapter(HTTPAdapter):
    """An HTTPAdapter whose connections report their socket to the current Watchdog.

    Also through an HTTP(S) proxy; through a SOCKS proxy only the body is bounded
    (by read_capped's checks between pieces), not a server dripping its headers.
    """

    def init_poolmanager(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = dict(_WATCHED_POOLS)

    def proxy_manager_for(self, proxy, **proxy_kwargs):  # type: ignore[no-untyped-def]
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if not proxy.lower().startswith("socks"):
            manager.pool_classes_by_scheme = dict(_WATCHED_POOLS)
        return manager


def read_capped(resp: requests.Response, deadline: float, max_bytes: int, deadline_s: float) -> bytes:
    """The (decoded) body of a `stream=True` response, or AttemptFailed past `deadline` or `max_bytes`.

    `deadline` is a time.monotonic() value (`deadline_s` the setting, for the
    message). The response is not closed here.
    """
    overdue = AttemptFailed("overdue", f"no complete reply within request_deadline_s={deadline_s:g}")
    declared = resp.headers.get("Content-Length", "").strip()
    if declared.isdigit() and int(declared) > max_bytes:
        raise AttemptFailed("oversized", f"reply announces {int(declared)} bytes, over max_response_bytes={max_bytes}")
    body = bytearray()
    raw = resp.raw
    while True:
        if time.monotonic() > deadline:
            raise overdue
        piece = raw.read1(CHUNK_BYTES, decode_content=True)  # what one receive brings: the deadline is checked often
        if not piece:  # end of the body (read1 returns b"" only there)
            break
        body += piece
        if len(body) > max_bytes:
            raise AttemptFailed("oversized", f"reply exceeds max_response_bytes={max_bytes}")
    if time.monotonic() > deadline:
        raise overdue
    return bytes(body)
