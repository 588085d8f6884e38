"""The latency test server of `make bench`: latency and jitter, answers, bounds, and what it counts."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

from ttdl.text.describers.testserver import LatencyServer, ServerProcess, describer_answer


def chat(server: LatencyServer | ServerProcess, text: str = "Now the case to solve, for the class CAT.",
         **kwargs) -> requests.Response:
    body = {"model": "test", "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]}
    return requests.post(server.base_url + "/chat/completions", json=body, timeout=10, **kwargs)


def test_answers_after_the_latency_in_openai_and_ollama_format() -> None:
    with LatencyServer(latency_s=0.2) as server:
        started = time.monotonic()
        reply = chat(server)
        assert time.monotonic() - started >= 0.2
        assert reply.status_code == 200
        text = reply.json()["choices"][0]["message"]["content"]
        assert "CAT" in text and text == chat(server).json()["choices"][0]["message"]["content"]  # deterministic
        ollama = requests.post(server.url + "/api/chat", timeout=10,
                               json={"model": "m", "messages": [{"role": "user", "content": "the class DOG"}]})
        assert "DOG" in ollama.json()["message"]["content"] and ollama.json()["done"] is True
        assert requests.get(server.base_url + "/models", timeout=5).json()["data"][0]["id"] == "test"
        assert server.snapshot()["requests"] == 3


def test_jitter_is_bounded_and_seeded() -> None:
    def delays(seed: int) -> list[float]:
        with LatencyServer(latency_s=0.05, jitter_s=0.04, seed=seed) as server:
            for _ in range(6):
                chat(server)
            return server.snapshot()["delays"]

    first = delays(3)
    assert first == delays(3) and first != delays(4)
    assert all(0.01 - 1e-9 <= d <= 0.09 + 1e-9 for d in first) and len(set(first)) > 1


def test_requests_overlap_unless_slots_bound_them() -> None:
    def burst(server: LatencyServer, n: int) -> float:
        threads = [threading.Thread(target=chat, args=(server,)) for _ in range(n)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.monotonic() - started

    with LatencyServer(latency_s=0.3) as server:
        assert burst(server, 4) < 4 * 0.3
        assert server.snapshot()["max_in_flight"] == 4
    with LatencyServer(latency_s=0.1, slots=2) as server:
        assert burst(server, 4) >= 2 * 0.1
        assert server.snapshot()["max_in_flight"] == 2


def test_keep_alive_connections_are_counted() -> None:
    with LatencyServer(latency_s=0.0) as server, requests.Session() as session:
        for _ in range(5):
            session.post(server.base_url + "/chat/completions", timeout=5,
                         json={"messages": [{"role": "user", "content": "x"}]})
        assert server.snapshot()["connections"] == 1  # one kept-alive connection for five requests
        for _ in range(2):
            chat(server)  # requests.post: a new session, a new connection each
        assert server.snapshot()["connections"] == 3


def test_bounds_requests_and_body() -> None:
    with LatencyServer(latency_s=0.0, max_requests=2, max_body_bytes=2000) as server:
        assert chat(server).status_code == 200 and chat(server).status_code == 200
        assert chat(server).status_code == 503
        assert chat(server, text="x" * 5000).status_code == 413
        assert server.snapshot()["refused"] == 2 and server.snapshot()["requests"] == 2


def test_bounds_open_connections() -> None:
    with LatencyServer(latency_s=0.0, max_connections=1) as server, requests.Session() as holder:
        holder.get(server.url + "/health", timeout=5)  # holds the one allowed connection open (keep-alive)
        with pytest.raises(requests.ConnectionError):
            requests.get(server.url + "/health", timeout=5)
        assert holder.get(server.url + "/health", timeout=5).status_code == 200
        assert server.snapshot()["refused"] == 1


def test_stops_itself_after_its_lifetime() -> None:
    server = LatencyServer(latency_s=0.0, max_lifetime_s=0.3)
    assert chat(server).status_code == 200
    deadline = time.monotonic() + 5
    while not server.closed and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.closed
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", server.port), timeout=1):
        pass
    server.close()  # idempotent


def test_idle_connections_time_out() -> None:
    with LatencyServer(latency_s=0.0, idle_timeout_s=0.2) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            time.sleep(0.5)
            sock.settimeout(2)
            assert sock.recv(1) == b""  # the server closed the idle connection


def test_answer_names_the_class_of_the_query() -> None:
    body = {"messages": [{"role": "system", "content": "about SHEEP"},
                         {"role": "user", "content": [{"type": "text", "text": "for the class TV-MONITOR. First"},
                                                      {"type": "image_url", "image_url": {"url": "data:,"}}]}]}
    assert "TV-MONITOR" in describer_answer(body)
    assert describer_answer(body) == describer_answer(json.loads(json.dumps(body)))
    assert "OBJECT" in describer_answer({})


def test_server_process_serves_counts_and_stops() -> None:
    with ServerProcess(latency_s=0.05, jitter_s=0.0) as server:
        assert chat(server).status_code == 200
        seen = server.snapshot()
        assert seen["requests"] == 1 and seen["delays"] == [0.05]
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", server.port), timeout=1):
        pass


def test_server_process_stops_when_its_parent_is_gone() -> None:
    """A parent that dies without closing it (killed, crashed) leaves no server behind."""
    code = ("import os; from ttdl.text.describers.testserver import ServerProcess; "
            "s = ServerProcess(0.0); print(s.port, flush=True); os._exit(0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    port = int(out.stdout.strip())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the orphaned test server on port {port} is still listening")
