"""HTTP describers against a local fake server speaking Ollama /api/chat and OpenAI /v1/chat/completions.

`retries` counts re-tries: a failing request hits the server 1 + retries times.
The throughput tests use the latency test server (keep-alive, counts connections).
"""
from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
from PIL import Image

from ttdl.core.settings import DescriberSettings
from ttdl.text.describers import DescribeRequest, DescriberError, build_describer
from ttdl.text.describers import base as base_module
from ttdl.text.describers.prompt import DEFAULT_TEMPLATE
from ttdl.text.describers.testserver import LatencyServer

NAMES = ["background", "circle", "square"]
SECRET = "sk-test-SECRET-value-123"
TEMPLATE = str(Path(__file__).resolve().parents[1] / DEFAULT_TEMPLATE)
Reply = Callable[[str, dict, int], "tuple[int, Any]"]


class FakeServer:
    """Records every request; `reply(path, body, hit_number)` decides the answer."""

    def __init__(self) -> None:
        self.hits: list[tuple[str, dict[str, str], Any]] = []
        self.reply: Reply = lambda path, body, n: (200, ok(path, "The CIRCLE region is incomplete on the left."))
        self.delay = 0.0
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw
                with server.lock:
                    server.hits.append((self.path, dict(self.headers), body))
                    n = len(server.hits)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    time.sleep(server.delay)
                    status, payload = server.reply(self.path, body if isinstance(body, dict) else {}, n)
                    data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def ok(path: str, content: Any) -> dict:
    if path.endswith("/api/chat"):
        return {"model": "m", "message": {"role": "assistant", "content": content}, "done": True}
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}


@pytest.fixture
def server() -> Iterator[FakeServer]:
    s = FakeServer()
    yield s
    s.close()


def cfg(server_url: str, backend: str, **over: Any) -> DescriberSettings:
    """The describer section of a run: these values, the schema's defaults for the rest."""
    base = server_url + ("/v1" if backend == "openai" else "")
    c = {"backend": backend, "base_url": base, "model": "m", "retries": 2, "backoff_s": 0.01,
         "timeout_s": 5, "image_size": 32, "max_concurrency": 4, "prompt_template": TEMPLATE}
    c.update(over)
    return DescriberSettings.from_partial(c)


def requests_(n: int = 1) -> list[DescribeRequest]:
    gt = torch.zeros(48, 48, dtype=torch.long)
    gt[10:30, 10:30] = 1
    pr = gt.clone()
    pr[:, :20] = 0
    return [DescribeRequest(f"u{i}-1", torch.rand(3, 48, 48), gt, pr, 1, "circle", NAMES) for i in range(n)]


def png_size(b64: str) -> tuple[int, int]:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert img.format == "PNG"
    return img.size


def test_ollama_request_body_and_answer(server: FakeServer) -> None:
    server.reply = lambda p, b, n: (200, ok(p, '  "**The CIRCLE region is   incomplete on the left.**"  '))
    d = build_describer(cfg(server.url, "ollama", temperature=0.3, seed=7, num_ctx=4096,
                            max_tokens=50, keep_alive="5m"), NAMES)
    assert d.describe(requests_()) == ["The CIRCLE region is incomplete on the left."]
    (path, headers, body), = server.hits
    assert path == "/api/chat" and "Authorization" not in headers
    assert body["model"] == "m" and body["stream"] is False and body["keep_alive"] == "5m"
    assert body["options"] == {"temperature": 0.3, "seed": 7, "num_ctx": 4096, "num_predict": 50}
    msgs = body["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert all(isinstance(m["content"], str) for m in msgs)
    images = [im for m in msgs for im in m.get("images", [])]
    assert len(images) == 4 and all(png_size(im) == (32, 32) for im in images)
    assert "CIRCLE" in msgs[-1]["content"] and len(msgs[-1]["images"]) == 2
    assert d.stats.as_dict()["calls"] == 1
    d.close()


def test_openai_request_body_auth_and_answer(server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TTDL_TEST_KEY", SECRET)
    d = build_describer(cfg(server.url, "openai", api_key_env="TTDL_TEST_KEY", max_tokens=40), NAMES)
    assert d.describe(requests_()) == ["The CIRCLE region is incomplete on the left."]
    (path, headers, body), = server.hits
    assert path == "/v1/chat/completions"
    assert headers["Authorization"] == f"Bearer {SECRET}"
    assert body["model"] == "m" and body["max_tokens"] == 40 and body["temperature"] == 0.1 and body["seed"] == 42
    query = body["messages"][-1]["content"]
    assert query[0]["type"] == "text" and "CIRCLE" in query[0]["text"]
    urls = [p["image_url"]["url"] for m in body["messages"] if isinstance(m["content"], list)
            for p in m["content"] if p["type"] == "image_url"]
    assert len(urls) == 4
    assert all(u.startswith("data:image/png;base64,") and png_size(u.split(",", 1)[1]) == (32, 32) for u in urls)
    d.close()


def test_openai_send_images_false_sends_text_only(server: FakeServer) -> None:
    d = build_describer(cfg(server.url, "openai", send_images=False), NAMES)
    d.describe(requests_())
    body = server.hits[0][2]
    assert all(isinstance(m["content"], str) for m in body["messages"])
    assert "image_url" not in json.dumps(body)
    d.close()


@pytest.mark.parametrize("backend", ["ollama", "openai"])
def test_malformed_answers_are_none_and_counted(server: FakeServer, backend: str) -> None:
    def reply(path: str, body: dict, n: int) -> tuple[int, Any]:
        return [(200, ok(path, "")), (200, {"unexpected": True}), (200, "not json"),
                (200, ok(path, "```\n```")), (200, ok(path, "The CIRCLE region was missed entirely."))][n - 1]

    server.reply = reply
    d = build_describer(cfg(server.url, backend, max_concurrency=1), NAMES)
    out = d.describe(requests_(5))
    assert out == [None, None, None, None, "The CIRCLE region was missed entirely."]
    stats = d.stats.as_dict()
    assert stats["malformed"] == 4 and stats["calls"] == 5 and stats["failures"] == 0
    d.close()


@pytest.mark.parametrize("backend", ["ollama", "openai"])
def test_transient_errors_are_retried(server: FakeServer, backend: str) -> None:
    codes = {1: 500, 2: 429}
    server.reply = lambda p, b, n: (codes[n], {"error": "busy"}) if n in codes else (200, ok(p, "Fine text."))
    d = build_describer(cfg(server.url, backend, retries=3), NAMES)
    assert d.describe(requests_()) == ["Fine text."]
    assert len(server.hits) == 3
    stats = d.stats.as_dict()
    assert stats["retries"] == 2 and stats["failures"] == 0
    d.close()


@pytest.mark.parametrize("backend", ["ollama", "openai"])
def test_persistent_failure_raises_after_retries(
    server: FakeServer, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TTDL_TEST_KEY", SECRET)
    # a misbehaving server that echoes the credentials back in its error text
    server.reply = lambda p, b, n: (503, {"error": f"overloaded (auth was {SECRET})"})
    d = build_describer(cfg(server.url, backend, retries=2, api_key_env="TTDL_TEST_KEY"), NAMES)
    with pytest.raises(DescriberError) as info:
        d.describe(requests_())
    assert len(server.hits) == 3  # 1 attempt + 2 retries
    msg = str(info.value)
    assert server.url in msg and "503" in msg and "overloaded" in msg and "3 attempt" in msg
    assert SECRET not in msg
    assert d.stats.as_dict()["failures"] == 1 and d.stats.as_dict()["retries"] == 2
    d.close()


def test_client_error_fails_at_once_with_server_message(server: FakeServer) -> None:
    server.reply = lambda p, b, n: (404, {"error": "model 'm' not found, try pulling it first"})
    d = build_describer(cfg(server.url, "ollama", retries=3), NAMES)
    with pytest.raises(DescriberError, match="model 'm' not found"):
        d.describe(requests_())
    assert len(server.hits) == 1
    d.close()


def test_unreachable_port_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.setenv("TTDL_TEST_KEY", SECRET)
    d = build_describer(cfg(f"http://127.0.0.1:{port}", "openai", retries=1, api_key_env="TTDL_TEST_KEY"), NAMES)
    with pytest.raises(DescriberError) as info:
        d.describe(requests_())
    msg = str(info.value)
    assert f"127.0.0.1:{port}" in msg and "2 attempt" in msg and "running" in msg
    assert SECRET not in msg
    d.close()


@pytest.mark.parametrize("backend", ["ollama", "openai"])
def test_requests_of_a_step_overlap(server: FakeServer, backend: str) -> None:
    server.delay = 0.3
    d = build_describer(cfg(server.url, backend, max_concurrency=4), NAMES)
    start = time.monotonic()
    out = d.describe(requests_(4))
    elapsed = time.monotonic() - start
    assert len(out) == 4 and all(out)
    assert server.max_in_flight > 1
    assert elapsed < 4 * 0.3
    d.close()


def test_concurrency_limit_is_respected(server: FakeServer) -> None:
    server.delay = 0.2
    d = build_describer(cfg(server.url, "openai", max_concurrency=2), NAMES)
    d.describe(requests_(6))
    assert server.max_in_flight == 2
    d.close()


def test_config_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TTDL_UNSET_VAR", raising=False)
    with pytest.raises(ValueError, match="TTDL_UNSET_VAR"):
        build_describer(cfg("http://127.0.0.1:1", "openai", api_key_env="TTDL_UNSET_VAR"), NAMES)
    with pytest.raises(ValueError, match="base_url"):
        build_describer(DescriberSettings.from_partial({"backend": "ollama", "model": "m"}), NAMES)


# ---- throughput: sessions, pools, images once, latency percentiles ---------------------------
@pytest.mark.parametrize("backend", ["openai", "ollama"])
def test_kept_alive_pool_sized_to_the_concurrency(backend: str) -> None:
    """Many requests over a few steps open at most max_concurrency connections: each is reused."""
    with LatencyServer(latency_s=0.05) as latency_server:
        d = build_describer(cfg(latency_server.url, backend, max_concurrency=3), NAMES)
        for _ in range(3):
            assert all(d.describe(requests_(7)))
        seen = latency_server.snapshot()
        d.close()
    assert seen["requests"] == 21
    assert seen["max_in_flight"] == 3
    assert seen["connections"] <= 3


def test_one_session_per_endpoint() -> None:
    with LatencyServer(latency_s=0.05) as a, LatencyServer(latency_s=0.05) as b:
        d = build_describer(cfg(a.url, "openai", base_url=None, base_urls=[a.base_url, b.base_url],
                                max_concurrency=4), NAMES)
        assert set(d._sessions) == {a.base_url, b.base_url}
        for _ in range(3):
            assert all(d.describe(requests_(8)))
        d.close()
        seen_a, seen_b = a.snapshot(), b.snapshot()
    assert seen_a["requests"] + seen_b["requests"] == 24 and seen_a["requests"] and seen_b["requests"]
    # requests alternate between the servers; each server's pool keeps its own connections alive
    assert seen_a["connections"] <= 4 and seen_b["connections"] <= 4


def test_images_are_png_at_describer_size_and_the_support_is_encoded_once(
    server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoded: list[tuple[int, ...]] = []
    real = base_module.png_bytes_uint8

    def counting(pixels):  # type: ignore[no-untyped-def]
        encoded.append(pixels.shape)
        return real(pixels)

    monkeypatch.setattr(base_module, "png_bytes_uint8", counting)
    d = build_describer(cfg(server.url, "openai", image_size=32, max_concurrency=1), NAMES)
    d.describe(requests_(5))
    d.close()
    assert len(encoded) == 2 + 2 * 5  # the two support views once, then each query's two views
    assert all(shape == (32, 32, 3) for shape in encoded)
    supports = set()
    for _, _, body in server.hits:
        urls = [p["image_url"]["url"] for m in body["messages"] if isinstance(m["content"], list)
                for p in m["content"] if p["type"] == "image_url"]
        assert len(urls) == 4 and len(set(urls)) == 4  # each view once per request
        assert all(png_size(u.split(",", 1)[1]) == (32, 32) for u in urls)
        supports.add(tuple(urls[:2]))
    assert len(supports) == 1  # the same support bytes in every request


def test_retries_send_the_same_body(server: FakeServer) -> None:
    server.reply = lambda p, b, n: (500, {"error": "busy"}) if n == 1 else (200, ok(p, "Fine text."))
    d = build_describer(cfg(server.url, "openai", retries=1), NAMES)
    assert d.describe(requests_()) == ["Fine text."]
    d.close()
    assert len(server.hits) == 2 and server.hits[0][2] == server.hits[1][2]
    assert server.hits[0][1]["Content-Length"] == server.hits[1][1]["Content-Length"]


def test_latency_percentiles_in_stats() -> None:
    with LatencyServer(latency_s=0.1, jitter_s=0.05, seed=1) as latency_server:
        d = build_describer(cfg(latency_server.url, "openai", max_concurrency=4), NAMES)
        assert d.stats.latency_percentiles() == {"latency_p50_s": None, "latency_p95_s": None}
        d.describe(requests_(8))
        mark = d.stats.latency_count()
        assert mark == 8
        d.describe(requests_(4))
        d.close()
        delays = latency_server.snapshot()["delays"]
    whole = d.stats.latency_percentiles()
    assert min(delays) <= whole["latency_p50_s"] <= whole["latency_p95_s"] <= max(delays) + 1.0
    assert whole["latency_p50_s"] >= 0.05
    assert d.stats.latency_percentiles(since=mark)["latency_p50_s"] is not None
    assert set(d.stats.as_dict()) >= {"calls", "latency_s"}  # the summed counters stay as they were
    rules = build_describer(DescriberSettings.from_partial({"backend": "rules"}), NAMES)
    rules.describe(requests_(3))
    assert rules.stats.latency_count() == 3 and rules.stats.latency_percentiles()["latency_p95_s"] is not None


@pytest.mark.parametrize("backend", ["rules", "openai"])
def test_submit_returns_futures_in_order(backend: str) -> None:
    with LatencyServer(latency_s=0.05) as latency_server:
        over = {} if backend == "rules" else {"base_url": latency_server.base_url, "model": "m",
                                               "prompt_template": TEMPLATE, "image_size": 32}
        d = build_describer(DescriberSettings.from_partial({"backend": backend, **over}), NAMES)
        reqs = requests_(5)
        futures = d.submit(reqs)
        texts = [f.result(timeout=10) for f in futures]
        assert texts == d.describe(reqs) and all(texts)
        d.close()
