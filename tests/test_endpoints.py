"""Spreading describer requests over several servers (ttdl.text.describers.endpoints)."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import pytest
import yaml

from conftest import REPO
from ttdl.core.config import load_config, resolve_run
from ttdl.core.settings import DescriberSettings
from ttdl.text.describers.endpoints import EndpointPool, config_urls, resolve_endpoints

A, B, C = "http://a:11434", "http://b:11434", "http://c:11434"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def describer(**values) -> DescriberSettings:
    """A describer section with these values and the schema's defaults."""
    return DescriberSettings.from_partial(values)


def test_config_urls_from_a_list_or_a_comma_separated_string() -> None:
    assert config_urls(describer(base_urls=[A + "/", B, A])) == [A, B]
    assert config_urls(describer(base_url=f"{A}, {B}/ {C}")) == [A, B, C]
    assert config_urls(describer(base_url=A)) == [A] and config_urls(describer()) == []
    with pytest.raises(ValueError, match="at least one base URL"):
        EndpointPool.from_config(describer(), env={})


def test_per_gpu_servers_follow_the_slot_and_shared_ignores_it() -> None:
    cfg = describer(base_urls=[A, B, C], server="per_gpu")
    assert resolve_endpoints(cfg, {"TTDL_DESCRIBER_BASE_URL": "http://gpu1:11434/"}) == ["http://gpu1:11434"]
    assert resolve_endpoints(cfg, {"TTDL_GPU_SLOT": "4"}) == [B]  # 4 mod 3
    assert resolve_endpoints(cfg, {}) == [A, B, C]  # a CPU job: spread over all
    shared = describer(base_urls=[A, B], server="shared")
    assert resolve_endpoints(shared, {"TTDL_DESCRIBER_BASE_URL": C, "TTDL_GPU_SLOT": "1"}) == [A, B]
    with pytest.raises(ValueError, match="per_gpu"):  # the schema's enum stops this first; the code checks too
        resolve_endpoints(describer(base_url=A).replace(server="per-gpu"), {})


def test_sequential_requests_go_round_robin() -> None:
    pool = EndpointPool([A, B, C])
    seen = []
    for _ in range(6):
        with pool.acquire() as url:
            seen.append(url)
    assert seen == [A, B, C, A, B, C]


def test_busy_servers_are_skipped_for_the_least_loaded() -> None:
    pool = EndpointPool([A, B, C])
    with pool.acquire() as first, pool.acquire() as second:
        assert (first, second) == (A, B)
        assert pool.in_flight() == {A: 1, B: 1, C: 0}
        with pool.acquire() as third, pool.acquire() as fourth:
            assert (third, fourth) == (C, A)
    assert pool.in_flight() == {A: 0, B: 0, C: 0}


def test_a_failing_server_cools_down_then_comes_back() -> None:
    clock = FakeClock()
    pool = EndpointPool([A, B], cooldown_s=30, clock=clock)
    with pytest.raises(ConnectionError):
        with pool.acquire() as url:
            assert url == A
            raise ConnectionError("refused")
    picks = []
    for _ in range(3):
        with pool.acquire() as url:
            picks.append(url)
    assert picks == [B, B, B]
    clock.now += 1
    pool.mark_failed(B)  # both down: the one that recovers first (A) is still used
    with pool.acquire() as url:
        assert url == A
    clock.now += 31
    with pool.acquire() as x, pool.acquire() as y:
        assert {x, y} == {A, B}


def test_route_moves_the_path_onto_the_chosen_server() -> None:
    pool = EndpointPool([A, B])
    with pool.route(f"{A}/api/chat") as first, pool.route(f"{A}/api/chat") as second:
        assert (first, second) == (f"{A}/api/chat", f"{B}/api/chat")
    with pytest.raises(ValueError, match="primary"):
        with pool.route("http://elsewhere/api/chat"):
            pass


def test_concurrent_requests_are_spread_evenly() -> None:
    pool = EndpointPool([A, B])
    lock = threading.Lock()
    current = {A: 0, B: 0}
    peak = {A: 0, B: 0}
    total = {A: 0, B: 0}

    def request(_: int) -> None:
        with pool.acquire() as url:
            with lock:
                current[url] += 1
                total[url] += 1
                peak[url] = max(peak[url], current[url])
            time.sleep(0.005)
            with lock:
                current[url] -= 1

    with ThreadPoolExecutor(8) as workers:
        list(workers.map(request, range(80)))
    assert max(peak.values()) <= 4  # 8 in flight over 2 servers: never more than half on one
    assert min(total.values()) >= 30 and sum(total.values()) == 80
    assert pool.in_flight() == {A: 0, B: 0}


def test_docker_overlay_points_the_describer_at_the_paired_ollama_service() -> None:
    """config/docker.yaml validates and names a service of docker/compose.yaml the app can reach."""
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    overlay = yaml.safe_load((REPO / "config" / "docker.yaml").read_text())
    config = load_config(REPO / "config" / "config.yaml", overlay)
    describer = resolve_run(config, next(iter(config["runs"])))["describer"]
    url = urlparse(describer["base_url"])
    assert describer["backend"] == "ollama" and url.hostname == "ollama" and url.port == 11434
    services = compose["services"]
    assert services["ollama"]["environment"]["OLLAMA_HOST"].endswith(":11434")
    app_nets = set(services["ttdl"]["networks"])
    assert app_nets & set(services["ollama"]["networks"])
    assert all(compose["networks"][n].get("internal") is True for n in app_nets)  # no way out
