"""An OpenAI-compatible chat-completions server with a set latency, for tests and `make bench`.

It stands in for a VLM server whose answers take time: every
`POST /v1/chat/completions` (and Ollama's `POST /api/chat`, in Ollama's reply
format, for the ollama client) is answered after `latency_s` plus a uniform jitter
of ±`jitter_s` (drawn from a generator seeded with `seed`, in arrival order),
with a describer-style sentence chosen deterministically from the request (the
same query always gets the same answer; the class named in capitals in the
query is named in the answer). `GET /v1/models` and `GET /health` answer at once.

It speaks HTTP/1.1 with keep-alive, like a real server, and counts what a client
does to it: requests, TCP connections opened, the most requests in flight at
once, each request's delay. `slots` (None: unlimited) bounds how many requests
it serves at once, like a server's parallel slots; the others queue.

Bounded, so a forgotten server cannot outlive its use: it listens on 127.0.0.1
only (a free port unless one is given); it refuses connections beyond
`max_connections` open at once, bodies over `max_body_bytes` (413) and requests
beyond `max_requests` (503); an idle keep-alive connection is closed after
`idle_timeout_s`; and it shuts itself down after `max_lifetime_s`, or when closed
(it is a context manager). Its threads are daemons.

    with LatencyServer(latency_s=0.5, jitter_s=0.1) as server:
        cfg = {"backend": "openai", "base_url": server.base_url, "model": "test", ...}

`ServerProcess` runs one in a child process (what `make bench` does, so that
serving takes no time from the training process's interpreter); `GET /stats`
gives its counts there.

Command line (prints the base URL, serves until its lifetime ends or Ctrl-C):
    python -m ttdl.text.describers.testserver --latency 0.5 --jitter 0.1
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

WHERE = ["on the left", "on the right", "at the top", "at the bottom", "in the center",
         "at the top left", "at the top right", "at the bottom left", "at the bottom right"]
KINDS = [
    "The {C} region is incomplete {w}: {s} of it is missing.",
    "The predicted {C} region over-extends {w}, beyond the true boundary.",
    "A {s2} spurious {C} region was hallucinated {w}.",
    "The {C} region {w} was missed entirely.",
    "The boundary of the {C} region is coarse and ragged {w}.",
    "The prediction of the {C} region is incomplete {w}; the rest matches the ground truth.",
]
SHARES = ["a small part", "a sizeable part", "about half", "most"]
SIZES = ["small", "sizeable", "large"]
_CLASS = re.compile(r"\b[A-Z][A-Z_-]+\b")


def describer_answer(body: dict) -> str:
    """A deterministic diagnosis-style sentence for a chat-completions request body."""
    messages = body.get("messages") or [{}]
    last = messages[-1] if isinstance(messages, list) and messages else {}
    content = last.get("content", "") if isinstance(last, dict) else ""
    text = content if isinstance(content, str) else " ".join(
        p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    names = _CLASS.findall(text)
    name = names[0] if names else "OBJECT"
    digest = hashlib.blake2b(json.dumps(last, sort_keys=True).encode(), digest_size=8).digest()
    kind, where, share, size = digest[0] % len(KINDS), digest[1] % len(WHERE), digest[2] % len(SHARES), digest[3] % 3
    return KINDS[kind].format(C=name, w=WHERE[where], s=SHARES[share], s2=SIZES[size])


@dataclass
class ServerStats:
    """What clients did to the server (read under the server's lock through `LatencyServer.snapshot`)."""

    requests: int = 0  # chat completions answered (any status)
    connections: int = 0  # TCP connections accepted
    refused: int = 0  # connections refused (over max_connections) and requests refused (413, 503)
    in_flight: int = 0
    max_in_flight: int = 0
    delays: list[float] = field(default_factory=list)  # the latency each answered completion was given


class LatencyServer:
    """See the module doc. `base_url` is what a describer's `base_url` takes (it ends in /v1)."""

    def __init__(self, latency_s: float = 0.5, jitter_s: float = 0.0, *, seed: int = 0, slots: int | None = None,
                 port: int = 0, max_requests: int = 100_000, max_connections: int = 64,
                 max_body_bytes: int = 16 * 1024 * 1024, idle_timeout_s: float = 30.0,
                 max_lifetime_s: float = 1800.0, answer: Callable[[dict], str] = describer_answer,
                 model: str = "test") -> None:
        if latency_s < 0 or jitter_s < 0:
            raise ValueError(f"latency and jitter must be >= 0, got {latency_s} and {jitter_s}")
        self.latency_s, self.jitter_s = float(latency_s), float(jitter_s)
        self.max_requests, self.max_connections = int(max_requests), int(max_connections)
        self.max_body_bytes, self.answer, self.model = int(max_body_bytes), answer, model
        self.stats = ServerStats()
        self.lock = threading.Lock()
        self._rng = random.Random(seed)
        self._slots = threading.BoundedSemaphore(slots) if slots else None
        self._open = 0
        self._closed = threading.Event()
        self._closing = False
        self._httpd = _Server(("127.0.0.1", port), _handler(self, idle_timeout_s), self)
        self.port = int(self._httpd.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"latency-server-{self.port}", daemon=True)
        self._thread.start()
        self._lifetime = threading.Timer(max_lifetime_s, self.close)
        self._lifetime.daemon = True
        self._lifetime.start()

    # -- what the handler asks --
    def _delay(self) -> float:
        with self.lock:
            jitter = self._rng.uniform(-self.jitter_s, self.jitter_s) if self.jitter_s else 0.0
        return max(0.0, self.latency_s + jitter)

    def snapshot(self) -> dict[str, Any]:
        """The counts so far (a copy)."""
        with self.lock:
            s = self.stats
            return {"requests": s.requests, "connections": s.connections, "refused": s.refused,
                    "max_in_flight": s.max_in_flight, "delays": list(s.delays)}

    def reset_counts(self) -> None:
        with self.lock:
            self.stats = ServerStats(in_flight=self.stats.in_flight)

    # -- lifetime --
    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self) -> None:
        """Stop serving and close the listening socket (idempotent; also called by the lifetime timer).

        `closed` turns true only once the socket is closed.
        """
        with self.lock:
            if self._closing:
                return
            self._closing = True
        self._lifetime.cancel()
        if threading.current_thread() is not self._thread:
            self._httpd.shutdown()
        self._httpd.server_close()
        self._closed.set()

    def __enter__(self) -> "LatencyServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type, owner: LatencyServer) -> None:
        self.owner = owner
        super().__init__(address, handler)

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        owner = self.owner
        with owner.lock:
            full = owner._open >= owner.max_connections
            if full:
                owner.stats.refused += 1
            else:
                owner._open += 1
                owner.stats.connections += 1
        if full:
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.owner.lock:
                self.owner._open -= 1


def _handler(owner: LatencyServer, idle_timeout_s: float) -> type:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: a client's connection pool is visible in `connections`
        timeout = idle_timeout_s  # an idle kept-alive connection is closed after this
        # headers and body go out in two writes: with Nagle's algorithm the body would wait for the
        # client's delayed ACK of the headers (40 ms on Linux), a latency that is not the one asked for
        disable_nagle_algorithm = True

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            if self.path.rstrip("/") in ("/v1/models", "/models"):
                self._send(200, {"object": "list", "data": [{"id": owner.model, "object": "model"}]})
            elif self.path.rstrip("/") == "/health":
                self._send(200, {"status": "ok"})
            elif self.path.rstrip("/") == "/stats":  # the counts, for a client in another process
                self._send(200, owner.snapshot())
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            if length > owner.max_body_bytes:
                with owner.lock:
                    owner.stats.refused += 1
                self.close_connection = True  # the unread body makes the connection unusable
                self._send(413, {"error": {"message": f"body over {owner.max_body_bytes} bytes"}})
                return
            raw = self.rfile.read(length)
            route = self.path.rstrip("/")
            ollama = route == "/api/chat"
            if not (ollama or route.endswith("/chat/completions")):
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            with owner.lock:
                over = owner.stats.requests >= owner.max_requests
                if over:
                    owner.stats.refused += 1
                else:
                    owner.stats.requests += 1
            if over:
                self._send(503, {"error": {"message": f"this test server answers at most {owner.max_requests}"}})
                return
            try:
                body = json.loads(raw)
            except ValueError:
                self._send(400, {"error": {"message": "body is not JSON"}})
                return
            delay = 0.0
            if owner._slots is not None:
                owner._slots.acquire()
            try:
                with owner.lock:
                    owner.stats.in_flight += 1
                    owner.stats.max_in_flight = max(owner.stats.max_in_flight, owner.stats.in_flight)
                delay = owner._delay()
                time.sleep(delay)
                text = owner.answer(body if isinstance(body, dict) else {})
            finally:
                with owner.lock:
                    owner.stats.in_flight -= 1
                    owner.stats.delays.append(delay)
                if owner._slots is not None:
                    owner._slots.release()
            message = {"role": "assistant", "content": text}
            if ollama:
                self._send(200, {"model": owner.model, "message": message, "done": True})
            else:
                self._send(200, {"id": "chatcmpl-test", "object": "chat.completion", "model": owner.model,
                                 "choices": [{"index": 0, "finish_reason": "stop", "message": message}]})

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


class ServerProcess:
    """A LatencyServer in a child process: its request handling then takes no time from the caller's
    interpreter (as a real server's would not). Same `url`, `base_url`, `port`, `snapshot()` and
    `close()`; the counts come over `GET /stats`.

    Bounded like the server: it stops itself after `max_lifetime_s`, or as soon as the process that
    started it is gone; `close()` terminates it (and kills it if it does not stop within 5 s).
    """

    def __init__(self, latency_s: float = 0.5, jitter_s: float = 0.0, *, seed: int = 0, slots: int | None = None,
                 max_lifetime_s: float = 1800.0, start_timeout_s: float = 60.0) -> None:
        command = [sys.executable, "-m", "ttdl.text.describers.testserver", "--latency", str(latency_s),
                   "--jitter", str(jitter_s), "--seed", str(seed), "--lifetime", str(max_lifetime_s),
                   "--parent", str(os.getpid())]
        if slots:
            command += ["--slots", str(slots)]
        self._proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        ready: list[str] = []
        reader = threading.Thread(target=lambda: ready.append(self._proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(start_timeout_s)
        line = ready[0].strip() if ready else ""
        if not line.startswith("http://127.0.0.1:"):
            self.close()
            raise RuntimeError(f"the test server process did not start within {start_timeout_s:g} s")
        self.base_url = line
        self.url = line[: -len("/v1")]
        self.port = int(self.url.rsplit(":", 1)[1])

    def snapshot(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/stats", timeout=10) as reply:  # noqa: S310 (127.0.0.1 only)
            return json.loads(reply.read())

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=0.5, help="seconds before each answer")
    parser.add_argument("--jitter", type=float, default=0.0, help="uniform ± seconds around the latency")
    parser.add_argument("--seed", type=int, default=0, help="seed of the jitter")
    parser.add_argument("--slots", type=int, default=None, help="requests served at once (default: unlimited)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--lifetime", type=float, default=1800.0, help="seconds until the server stops itself")
    parser.add_argument("--parent", type=int, default=None, help="stop as soon as this process id is gone")
    args = parser.parse_args()
    server = LatencyServer(args.latency, args.jitter, seed=args.seed, slots=args.slots, port=args.port,
                           max_lifetime_s=args.lifetime)
    print(server.base_url, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: server.close())
    try:
        while not server.closed:
            if args.parent is not None and os.getppid() != args.parent:
                break  # the process that started this one is gone: nobody will close it
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


if __name__ == "__main__":
    main()
