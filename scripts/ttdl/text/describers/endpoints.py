"""Several describer servers behind one describer: which base URL each request goes to.

One VLM server is the bottleneck of a text run, so the config may list several
(`base_urls: [...]`, or a comma-separated `base_url`). Requests are spread by
*least in flight* (ties broken round-robin): a slow server naturally gets fewer
requests than a fast one. A server whose request raised (connection refused,
timeout) is avoided for `cooldown_s`, so the describer's retries go to the
others instead of hammering a dead one; if all are cooling down, the one that
recovers first is used anyway, and the retry logic decides when to give up.

Per-GPU servers (`server: per_gpu`): each job talks only to the server of its
GPU slot, given by scripts/with_gpu_slot.py as TTDL_DESCRIBER_BASE_URL, or
picked from the list by TTDL_GPU_SLOT; a job without a slot (CPU) spreads over
the whole list.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Callable, Iterator, Mapping

from ttdl.core.settings import DescriberSettings

SERVER_MODES = ("shared", "per_gpu")
DEFAULT_COOLDOWN_S = 30.0


def config_urls(cfg: DescriberSettings) -> list[str]:
    """The configured base URLs, in order, without duplicates or trailing slashes."""
    raw = cfg.base_urls or cfg.base_url or []
    if isinstance(raw, str):
        raw = raw.replace(",", " ").split()
    urls: list[str] = []
    for url in raw:
        url = str(url).strip().rstrip("/")
        if url and url not in urls:
            urls.append(url)
    return urls


def resolve_endpoints(cfg: DescriberSettings, env: Mapping[str, str] | None = None) -> list[str]:
    """The base URLs this process may use (see module doc for `server`)."""
    env = os.environ if env is None else env
    mode = cfg.server
    if mode not in SERVER_MODES:
        raise ValueError(f"describer server {mode!r}: expected one of {', '.join(SERVER_MODES)}")
    urls = config_urls(cfg)
    if mode == "per_gpu":
        if env.get("TTDL_DESCRIBER_BASE_URL"):
            return [env["TTDL_DESCRIBER_BASE_URL"].strip().rstrip("/")]
        slot = env.get("TTDL_GPU_SLOT")
        if slot not in (None, "") and urls:
            return [urls[int(slot) % len(urls)]]
    return urls


class EndpointPool:
    """Thread-safe choice of a base URL per request: least in flight, round-robin on ties."""

    def __init__(self, urls: list[str], *, cooldown_s: float = DEFAULT_COOLDOWN_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.urls = [u.rstrip("/") for u in urls]
        if not self.urls:
            raise ValueError("a describer needs at least one base URL (describer.base_url or base_urls)")
        self.cooldown_s = float(cooldown_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._in_flight = [0] * len(self.urls)
        self._down_until = [float("-inf")] * len(self.urls)
        self._next = 0

    @classmethod
    def from_config(cls, cfg: DescriberSettings, env: Mapping[str, str] | None = None, **kwargs) -> "EndpointPool":
        return cls(resolve_endpoints(cfg, env), **kwargs)

    @property
    def primary(self) -> str:
        """The URL requests are built on before `route` moves them (and messages name)."""
        return self.urls[0]

    def in_flight(self) -> dict[str, int]:
        with self._lock:
            return dict(zip(self.urls, self._in_flight))

    def _choose(self) -> int:
        now = self._clock()
        n = len(self.urls)
        up = [i for i in range(n) if self._down_until[i] <= now]
        if not up:  # all cooling down: the first to recover
            up = [min(range(n), key=lambda i: self._down_until[i])]
        least = min(self._in_flight[i] for i in up)
        for k in range(n):
            i = (self._next + k) % n
            if i in up and self._in_flight[i] == least:
                self._next = (i + 1) % n
                return i
        raise AssertionError("unreachable")

    def mark_failed(self, base_url: str) -> None:
        """Avoid `base_url` for cooldown_s (e.g. after a 5xx reply, which raises nothing)."""
        with self._lock:
            self._down_until[self.urls.index(base_url.rstrip("/"))] = self._clock() + self.cooldown_s

    @contextlib.contextmanager
    def acquire(self) -> Iterator[str]:
        """Hold one base URL for one request; an exception in the block cools it down."""
        with self._lock:
            i = self._choose()
            self._in_flight[i] += 1
        try:
            yield self.urls[i]
        except Exception:
            with self._lock:
                self._down_until[i] = self._clock() + self.cooldown_s
            raise
        else:
            with self._lock:
                self._down_until[i] = float("-inf")  # answered: healthy again
        finally:
            with self._lock:
                self._in_flight[i] -= 1

    @contextlib.contextmanager
    def route(self, url: str) -> Iterator[str]:
        """`url` (built on `primary`) moved onto the chosen server, held for the block."""
        if not url.startswith(self.primary):
            raise ValueError(f"{url} is not built on the primary describer URL {self.primary}")
        with self.acquire() as base:
            yield base + url[len(self.primary):]
