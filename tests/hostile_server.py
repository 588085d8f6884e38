"""A hostile chat-completions server for tests (127.0.0.1, threaded), shared by the describer tests
(tests/test_describer_faults.py) and the workflow-level secret sweep (tests/test_secret_sweep.py).

It answers each hit by a *mode*: 5xx errors, a 5xx, 401 or 200 whose body echoes
the request's Authorization header, hangs, slow drips (of the body or of the
headers), oversized bodies (announced or not), a gzip bomb, garbage 200s (empty
text, an HTML page, broken JSON, an endless answer). The modes are taken hit by
hit; past the end of the list the last one repeats, or with `cycle=True` the
list starts over. It is bounded: at most MAX_HANDLERS connections are served at
once (others are closed unanswered), every mode ends within `mode_limit_s`
(MODE_LIMIT_S by default) or as soon as the server is closed, and a server
nobody closes shuts itself down after `lifetime_s` (LIFETIME_S by default).
"""
from __future__ import annotations

import functools
import gzip
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

OK_ANSWER = "The CIRCLE region is incomplete on the left."
HUGE = 100 * 1024 * 1024  # bytes a hostile server offers
MAX_HANDLERS = 8
MODE_LIMIT_S = 20.0
LIFETIME_S = 120.0
DRIP_EVERY_S = 0.5

MODES = ("ok", "error_5xx", "echo_5xx", "echo_401", "hang", "drip", "drip_headers", "huge_announced",
         "huge_unannounced", "gzip_bomb", "echo_200", "empty_text", "html", "broken_json", "long_answer")


class HostileServer:
    """A chat-completions endpoint that misbehaves in the way `modes` says, hit by hit."""

    def __init__(self, *modes: str, cycle: bool = False, lifetime_s: float = LIFETIME_S,
                 mode_limit_s: float = MODE_LIMIT_S) -> None:
        unknown = sorted(set(modes) - set(MODES))
        if unknown:
            raise ValueError(f"unknown hostile mode(s): {unknown}")
        self.modes = list(modes) or ["ok"]
        self.cycle = cycle
        self.mode_limit_s = mode_limit_s
        self.hits: list[str] = []  # the mode each hit got
        self.auth: list[str | None] = []  # the Authorization header of each hit
        self.sent: list[int] = []  # body bytes written per hit (updated while writing)
        self.refused = 0
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_HANDLERS)
        self._handlers: list[threading.Thread] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request per connection; a body without length ends at close

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with server._lock:
                    mode = server._mode_of(len(server.hits))
                    server.hits.append(mode)
                    server.auth.append(self.headers.get("Authorization"))
                    server.sent.append(0)
                    hit = len(server.hits) - 1
                try:
                    getattr(server, f"_mode_{mode}")(self, hit)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client hung up: what a bounded client does

            def log_message(self, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def process_request(self, request, client_address):  # type: ignore[no-untyped-def]
                if not server._slots.acquire(blocking=False):
                    server.refused += 1
                    self.shutdown_request(request)
                    return
                t = threading.Thread(target=self._serve_one, args=(request, client_address), daemon=True)
                server._handlers.append(t)
                t.start()

            def _serve_one(self, request, client_address):  # type: ignore[no-untyped-def]
                try:
                    self.process_request_thread(request, client_address)
                finally:
                    server._slots.release()

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        self._reaper = threading.Timer(lifetime_s, self.close)  # stops itself if nobody does
        self._reaper.daemon = True
        self._reaper.start()
        self._closed = False

    def _mode_of(self, hit: int) -> str:
        if self.cycle:
            return self.modes[hit % len(self.modes)]
        return self.modes[min(hit, len(self.modes) - 1)]

    def __enter__(self) -> "HostileServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.stop.set()
        self._reaper.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()
        for t in list(self._handlers):
            t.join(timeout=5)
        assert not any(t.is_alive() for t in self._handlers), "a hostile handler outlived its server"

    # ---- replies --------------------------------------------------------------------------
    def _send(self, h: BaseHTTPRequestHandler, hit: int, status: int, body: bytes | str,
              ctype: str = "application/json") -> None:
        data = body.encode() if isinstance(body, str) else body
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
        self.sent[hit] = len(data)

    @staticmethod
    def _chat(h: BaseHTTPRequestHandler, content: Any) -> str:
        if h.path.endswith("/api/chat"):  # ollama
            return json.dumps({"model": "m", "message": {"role": "assistant", "content": content}, "done": True})
        return json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})

    def _mode_ok(self, h, hit):
        self._send(h, hit, 200, self._chat(h, OK_ANSWER))

    def _mode_error_5xx(self, h, hit):
        self._send(h, hit, 503, json.dumps({"error": {"message": "model overloaded, try again"}}))

    def _echo(self, h) -> str:
        auth = h.headers.get("Authorization") or ""
        bare = auth.split()[-1] if auth else ""
        return (f"upstream failed. Request headers were {{'Authorization': '{auth}'}}; "
                f"Authorization: {auth}; key={bare}; x-api-key: {bare}; api_key={bare}&x=1; bare {bare}")

    def _mode_echo_5xx(self, h, hit):
        self._send(h, hit, 500, json.dumps({"error": self._echo(h)}))

    def _mode_echo_401(self, h, hit):
        self._send(h, hit, 401, self._echo(h), ctype="text/plain")

    def _mode_hang(self, h, hit):
        self.stop.wait(self.mode_limit_s)

    def _mode_drip(self, h, hit):
        """A 200 that promises a body and sends one byte of it every DRIP_EVERY_S."""
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", "1000")  # under any cap: only time can end this
        h.end_headers()
        end = time.monotonic() + self.mode_limit_s
        while not self.stop.is_set() and time.monotonic() < end:
            h.wfile.write(b" ")
            self.sent[hit] += 1
            self.stop.wait(DRIP_EVERY_S)

    def _mode_drip_headers(self, h, hit):
        """The status line, then one byte of an endless header every DRIP_EVERY_S."""
        h.wfile.write(b"HTTP/1.0 200 OK\r\nX-Slow: ")
        end = time.monotonic() + self.mode_limit_s
        while not self.stop.is_set() and time.monotonic() < end:
            h.wfile.write(b"a")
            self.sent[hit] += 1
            self.stop.wait(DRIP_EVERY_S)

    def _huge(self, h, hit, announce: bool) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        if announce:
            h.send_header("Content-Length", str(HUGE))
        h.end_headers()
        prefix = b'{"choices": [{"message": {"role": "assistant", "content": "The CIRCLE '
        h.wfile.write(prefix)
        self.sent[hit] = len(prefix)
        chunk = b"word " * (64 * 1024 // 5)
        while self.sent[hit] + len(chunk) <= HUGE - 10 and not self.stop.is_set():
            h.wfile.write(chunk)
            self.sent[hit] += len(chunk)
        h.wfile.write(b'"}}]}')

    def _mode_huge_announced(self, h, hit):
        self._huge(h, hit, announce=True)

    def _mode_huge_unannounced(self, h, hit):
        self._huge(h, hit, announce=False)

    def _mode_gzip_bomb(self, h, hit):
        """A small gzip body (despite Accept-Encoding: identity) that inflates to HUGE bytes."""
        data = gzip_bomb()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Encoding", "gzip")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
        self.sent[hit] = len(data)

    def _mode_echo_200(self, h, hit):
        self._send(h, hit, 200, self._chat(h, f"The CIRCLE region is fine. {self._echo(h)}"))

    def _mode_empty_text(self, h, hit):
        self._send(h, hit, 200, self._chat(h, ""))

    def _mode_html(self, h, hit):
        self._send(h, hit, 200, "<!DOCTYPE html><html><body><h1>502 Bad Gateway</h1>nginx</body></html>",
                   ctype="text/html")

    def _mode_broken_json(self, h, hit):
        self._send(h, hit, 200, '{"choices": [{"message": {"content": "The CIRCLE region is')

    def _mode_long_answer(self, h, hit):
        self._send(h, hit, 200, self._chat(h, "The CIRCLE region " + "is wrong " * 600))


@functools.lru_cache(maxsize=1)
def gzip_bomb() -> bytes:
    """~100 KB of gzip that inflates to HUGE bytes: one compressed MiB of spaces, as 100 gzip members."""
    prefix = gzip.compress(b'{"choices": [{"message": {"content": "The CIRCLE ', compresslevel=9)
    return prefix + gzip.compress(b" " * (1024 * 1024), compresslevel=9) * (HUGE // (1024 * 1024))

