"""What every describer shares: the request type, stats, answer cleaning and the HTTP machinery.

A describer turns (image, GT mask, PR mask, class) into one short diagnostic
sentence or None. None means "the answer was unusable": the caller counts it and
trains without it, which is safer than training on garbage. Transport failures
are different: they raise DescriberError, because a run whose describer is down
would silently degrade into CE-only training.
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import requests
from requests.adapters import HTTPAdapter
from torch import Tensor

from .endpoints import EndpointPool
from .prompt import DEFAULT_TEMPLATE, SupportExample, build_messages, load_template, synthetic_support

log = logging.getLogger(__name__)

MAX_WORDS = 60  # the text encoder reads 77 tokens; 60 words leave room for sub-word splits


@dataclass
class DescribeRequest:
    key: str  # "{uid}-{c}", also seeds the rules describer's wording
    image: Tensor  # [3,H,W] float in [0,1]
    gt: Tensor  # [H,W] long class ids, 255 = void
    pr: Tensor  # [H,W] long class ids
    class_index: int
    class_name: str
    class_names: list[str]


class DescriberError(RuntimeError):
    """The describer backend could not be used (unreachable, rejecting, or failing after retries)."""


@dataclass
class DescriberStats:
    """Counters for logging and benchmarks; updated from worker threads, hence the lock.

    calls: requests handled (one per DescribeRequest, whatever the outcome);
    retries: extra HTTP attempts after a transient failure; failures: requests
    that ended in DescriberError; malformed: answers rejected by clean_answer;
    latency_s: summed wall-clock seconds of all requests (concurrent ones overlap).
    """

    calls: int = 0
    retries: int = 0
    failures: int = 0
    malformed: int = 0
    latency_s: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: float) -> None:
        with self._lock:
            for name, value in deltas.items():
                setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict[str, float]:
        with self._lock:
            return {
                "calls": self.calls,
                "retries": self.retries,
                "failures": self.failures,
                "malformed": self.malformed,
                "latency_s": self.latency_s,
            }


@runtime_checkable
class Describer(Protocol):
    stats: DescriberStats

    def describe(self, requests: list[DescribeRequest]) -> list[str | None]: ...

    def close(self) -> None: ...


_FENCE = re.compile(r"```[A-Za-z]*")
_MARKUP = re.compile(r"^\s*(?:#+|[-*>]|\d+[.)])\s+|\*\*|__|\*|`", re.MULTILINE)
_LABEL = re.compile(r"^(?:answer|description|output|response)\s*:\s*", re.IGNORECASE)
_QUOTES = "\"'“”‘’«»"


def clean_answer(text: Any, max_words: int = MAX_WORDS) -> str | None:
    """Normalise a model answer to one plain line, or None when it carries no usable text.

    Models wrap answers in quotes, markdown, code fences or a one-key JSON object;
    none of that belongs in the text the encoder embeds.
    """
    if not isinstance(text, str):
        return None
    t = _FENCE.sub(" ", text).strip()
    if t.startswith("{"):
        try:
            obj = json.loads(t)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            strings = [v for v in obj.values() if isinstance(v, str)]
            t = strings[0] if strings else ""
    t = _MARKUP.sub(" ", t)
    t = " ".join(t.split())
    t = _LABEL.sub("", t)
    t = t.strip(_QUOTES + " ")
    if not re.search(r"[A-Za-z]{2,}", t):
        return None
    words = t.split()
    if len(words) > max_words:
        t = " ".join(words[:max_words]).rstrip(",;:")
    return t


def read_api_key(env_name: str | None) -> str | None:
    """Read the key from the environment so that it never sits in a config file or a log."""
    if not env_name:
        return None
    value = os.environ.get(str(env_name))
    if not value:
        raise ValueError(
            f"describer config sets api_key_env={env_name!r}, but that environment variable "
            "is not set or empty; export it before starting the run"
        )
    return value


class HttpDescriber:
    """Session, retries, concurrency, stats and cleaning for describers behind an HTTP API.

    Subclasses only say where to POST (`url`), what to send (`payload`) and where
    the answer sits in the reply (`parse`). Config (flat dict): base_url and model
    are required; api_key_env, temperature (0.1), seed (42), max_tokens (160),
    timeout_s (120), retries (3), backoff_s (2.0), max_concurrency (4),
    send_images (true), image_size (112), prompt_template, max_words (60).

    `retries` counts re-tries: a request is attempted at most 1 + retries times.
    Connection errors, timeouts, 429 and 5xx are retried after backoff_s, then
    2*backoff_s, 4*backoff_s, ... (or the server's Retry-After, up to 60 s);
    other 4xx fail at once because repeating a rejected request cannot help.
    """

    backend = "http"

    def __init__(self, cfg: dict, class_names: list[str], support: SupportExample | None = None):
        missing = [k for k in ("model",) if not cfg.get(k)]
        if not (cfg.get("base_url") or cfg.get("base_urls")):
            missing.insert(0, "base_url")
        if missing:
            raise ValueError(f"describer backend '{self.backend}' needs config key(s): {', '.join(missing)}")
        self.class_names = list(class_names)
        self._endpoints = EndpointPool.from_config(cfg)  # base_url / base_urls, server: shared | per_gpu
        self.base_url = self._endpoints.primary
        self.model = str(cfg["model"])
        self.temperature = float(cfg.get("temperature", 0.1))
        self.seed = int(cfg.get("seed", 42))
        self.max_tokens = int(cfg.get("max_tokens", 160))
        self.timeout_s = float(cfg.get("timeout_s", 120))
        self.retries = max(0, int(cfg.get("retries", 3)))
        self.backoff_s = float(cfg.get("backoff_s", 2.0))
        self.max_concurrency = max(1, int(cfg.get("max_concurrency", 4)))
        self.send_images = bool(cfg.get("send_images", True))
        self.image_size = int(cfg.get("image_size", 112))
        self.max_words = int(cfg.get("max_words", MAX_WORDS))
        self.template = load_template(cfg.get("prompt_template", DEFAULT_TEMPLATE))
        self.support = support if support is not None else synthetic_support(self.template, self.image_size)
        self._api_key = read_api_key(cfg.get("api_key_env"))
        self.stats = DescriberStats()
        self._session = requests.Session()
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=self.max_concurrency)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix=f"describer-{self.backend}")

    # --- what a backend defines -------------------------------------------------
    def url(self) -> str:
        raise NotImplementedError

    def payload(self, messages: list[dict]) -> dict:
        raise NotImplementedError

    def parse(self, body: Any) -> str | None:
        raise NotImplementedError

    # --- shared machinery -------------------------------------------------------
    def headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if self._api_key:
            h["Authorization"] = f"Bearer {self._api_key}"
        return h

    def describe(self, requests_: list[DescribeRequest]) -> list[str | None]:
        """Describe a step's requests concurrently (at most max_concurrency in flight), in order."""
        futures = [self._pool.submit(self._describe_one, r) for r in requests_]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise

    def _describe_one(self, request: DescribeRequest) -> str | None:
        messages = build_messages(self.template, request, self.support, self.image_size)
        if not self.send_images:
            messages = [{**m, "images": []} for m in messages]
        body = self._post(self.payload(messages))
        answer = clean_answer(self.parse(body) if body is not None else None, self.max_words)
        if answer is None:
            self.stats.add(malformed=1)
            log.warning("describer %s gave a malformed answer for %s", self.backend, request.key)
        return answer

    def _post(self, payload: dict) -> Any:
        """POST with retries; the parsed JSON body, or None when a 200 reply is not JSON."""
        url = self.url()
        attempts = 1 + self.retries
        last_error = "no attempt made"
        delay = 0.0
        start = time.monotonic()
        try:
            for attempt in range(attempts):
                if attempt:
                    self.stats.add(retries=1)
                    log.info("describer %s: retry %d/%d after %s", self.backend, attempt, self.retries, last_error)
                    time.sleep(delay)
                backoff = self.backoff_s * 2**attempt
                try:
                    with self._endpoints.route(url) as routed:
                        resp = self._session.post(routed, json=payload, headers=self.headers(), timeout=self.timeout_s)
                except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
                    last_error = f"{type(exc).__name__}: {exc}"
                    delay = backoff
                    continue
                if resp.status_code == 429 or resp.status_code >= 500:
                    last_error = f"HTTP {resp.status_code}: {_snippet(resp)}"
                    delay = max(backoff, _retry_after(resp))
                    continue
                if resp.status_code >= 400:
                    raise self._error(
                        url, attempt + 1, f"HTTP {resp.status_code}: {_snippet(resp)}",
                        "The server rejected the request: check the model name, the API key "
                        "variable named by api_key_env, and whether the model accepts images (send_images).",
                    )
                try:
                    return resp.json()
                except ValueError:
                    return None
            raise self._error(
                url, attempts, last_error,
                "Check that the server is running and reachable at base_url, that the model is "
                "available there, and the timeout_s / retries settings.",
            )
        finally:
            self.stats.add(calls=1, latency_s=time.monotonic() - start)

    def _error(self, url: str, attempts: int, last_error: str, hint: str) -> DescriberError:
        self.stats.add(failures=1)
        msg = (
            f"describer backend '{self.backend}' (model '{self.model}') failed at {url} after "
            f"{attempts} attempt(s): {last_error}. {hint}"
        )
        if self._api_key:
            msg = msg.replace(self._api_key, "***")
        return DescriberError(msg)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._session.close()

    def __enter__(self) -> "HttpDescriber":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _snippet(resp: requests.Response, limit: int = 300) -> str:
    """The server's own error text, shortened: it usually says exactly what is wrong."""
    try:
        body = resp.json()
        text = body.get("error", body) if isinstance(body, dict) else body
        text = text.get("message", text) if isinstance(text, dict) else text
        text = str(text)
    except ValueError:
        text = resp.text
    text = " ".join(text.split())
    return text[:limit] + ("..." if len(text) > limit else "") if text else "(empty body)"


def _retry_after(resp: requests.Response, cap_s: float = 60.0) -> float:
    try:
        return min(cap_s, max(0.0, float(resp.headers.get("Retry-After", 0))))
    except ValueError:
        return 0.0
