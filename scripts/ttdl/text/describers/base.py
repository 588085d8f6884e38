"""What every describer shares: the request type, stats, answer cleaning and the HTTP machinery.

A describer turns (image, GT mask, PR mask, class) into one short diagnostic
sentence or None. None means "the answer was unusable": the caller counts it and
trains without it, which is safer than training on garbage. Transport failures
are different: they raise DescriberError, because a run whose describer is down
would silently degrade into CE-only training.
"""
from __future__ import annotations

import base64
import hashlib
import http.client
import json
import logging
import os
import re
import threading
import time
from array import array
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import requests
import torch
import urllib3

from ttdl.core.redact import RedactingFilter, redact, register_secret
from ttdl.core.settings import DescriberSettings
from ttdl.text.describers.endpoints import EndpointPool
from ttdl.text.describers.prompt import SupportExample, build_messages, load_template, synthetic_support
from ttdl.text.describers.request import DescribeRequest
from ttdl.text.describers.transport import AttemptFailed, DeadlineAdapter, Watchdog, read_capped
from ttdl.text.overlays import png_bytes_uint8, to_uint8_hwc

log = logging.getLogger(__name__)
# The describer scrubs what it logs itself; this filter is the net under it for records of this module.
log.addFilter(RedactingFilter())

MAX_WORDS = 60  # the text encoder reads 77 tokens; 60 words leave room for sub-word splits
PNG_MEMO_SIZE = 16  # encoded images remembered by content (the support views; a few recent ones)


class DescriberError(RuntimeError):
    """The describer backend could not be used (unreachable, rejecting, or failing after retries)."""


@dataclass
class DescriberStats:
    """Counters for logging and benchmarks; updated from worker threads, hence the lock.

    calls: requests handled (one per DescribeRequest, whatever the outcome);
    retries: extra HTTP attempts after a transient failure; failures: requests
    that ended in DescriberError; malformed: answers rejected by clean_answer or
    by the length cap; latency_s: summed wall-clock seconds of all requests
    (concurrent ones overlap). oversized / overdue: attempts whose reply passed
    max_response_bytes / request_deadline_s (each also a failed attempt: retried,
    never parsed); too_long: answers over max_answer_chars (also in malformed).

    Each request's own wall time (retries and backoff included) is kept as well,
    in completion order, for its percentiles: `latency_percentiles()` gives
    `latency_p50_s` and `latency_p95_s` over all requests, or over those since a
    mark taken with `latency_count()` (for example at the start of an epoch).
    """

    calls: int = 0
    retries: int = 0
    failures: int = 0
    malformed: int = 0
    latency_s: float = 0.0
    oversized: int = 0
    overdue: int = 0
    too_long: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _latencies: array = field(default_factory=lambda: array("d"), repr=False, compare=False)

    def add(self, **deltas: float) -> None:
        with self._lock:
            for name, value in deltas.items():
                setattr(self, name, getattr(self, name) + value)

    def add_request(self, latency_s: float, **deltas: float) -> None:
        """One finished request: a call, its wall time (summed and kept for percentiles) and other counts."""
        with self._lock:
            self.calls += 1
            self.latency_s += latency_s
            self._latencies.append(latency_s)
            for name, value in deltas.items():
                setattr(self, name, getattr(self, name) + value)

    def latency_count(self) -> int:
        """How many request latencies are recorded (a mark for `latency_percentiles(since=...)`)."""
        with self._lock:
            return len(self._latencies)

    def latency_percentiles(self, since: int = 0) -> dict[str, float | None]:
        """p50 and p95 of the per-request wall times (seconds) recorded from mark `since` on; None if none."""
        with self._lock:
            window = np.frombuffer(self._latencies, dtype=np.float64)[since:].copy()
        if window.size == 0:
            return {"latency_p50_s": None, "latency_p95_s": None}
        p50, p95 = np.percentile(window, [50, 95])
        return {"latency_p50_s": round(float(p50), 4), "latency_p95_s": round(float(p95), 4)}

    def as_dict(self) -> dict[str, float]:
        with self._lock:
            return {
                "calls": self.calls,
                "retries": self.retries,
                "failures": self.failures,
                "malformed": self.malformed,
                "latency_s": self.latency_s,
                "oversized": self.oversized,
                "overdue": self.overdue,
                "too_long": self.too_long,
            }


@runtime_checkable
class Describer(Protocol):
    stats: DescriberStats

    def describe(self, requests: list[DescribeRequest]) -> list[str | None]: ...

    def submit(self, requests: list[DescribeRequest]) -> list[Future]: ...

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
    """Read the key from the environment so that it never sits in a config file or a log.

    The value is registered with ttdl.core.redact at once, so every log line,
    exception and record that goes through the redaction layer shows *** instead.
    Surrounding whitespace (a key file's newline) is dropped; a key with inner
    whitespace or control characters is refused without showing it, since
    requests would otherwise echo the whole header in its own error.
    """
    if not env_name:
        return None
    value = os.environ.get(str(env_name))
    register_secret(value)
    value = value.strip() if value else value
    if not value:
        raise ValueError(
            f"describer config sets api_key_env={env_name!r}, but that environment variable "
            "is not set or empty; export it before starting the run"
        )
    if any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError(
            f"the API key in environment variable {env_name!r} contains whitespace or control "
            "characters (value not shown); export the bare key"
        )
    return value


class HttpDescriber:
    """Session, retries, concurrency, stats and cleaning for describers behind an HTTP API.

    Subclasses only say where to POST (`url`), what to send (`payload`) and where
    the answer sits in the reply (`parse`). Settings: the run's typed
    `DescriberSettings` (defaults in the config schema); base_url (or base_urls)
    and model are required.

    `retries` counts re-tries: a request is attempted at most 1 + retries times.
    Connection errors, timeouts, 429 and 5xx are retried after backoff_s, then
    2*backoff_s, 4*backoff_s, ... (or the server's Retry-After, up to 60 s);
    other 4xx fail at once because repeating a rejected request cannot help.

    Bounds on what a server can do to a run (see transport.py): each attempt
    has a wall-clock deadline, request_deadline_s, for everything from connect
    to the last body byte (timeout_s still bounds each single socket wait); the
    body is streamed and cut past max_response_bytes. An attempt that passes
    either bound is a failed attempt like a timeout: retried, and its reply is
    never parsed, so it cannot reach the cache. An answer longer than
    max_answer_chars (raw, before cleaning) counts as malformed rather than
    being cut: the prompt asks for one sentence and max_tokens bounds the
    generation, so such a reply means the server ignored both (a loop, a dump),
    and its first words are no more trustworthy than the rest.

    Secrets: the key is registered with ttdl.core.redact when read; the retry
    log lines, the server error text and every DescriberError go through
    `redact`, and errors are raised outside any `except` block, so no chained
    exception carries an unscrubbed message.

    The retry loop is ours rather than urllib3's `Retry` on the adapter: each
    attempt is routed anew through the EndpointPool (a retry goes to another
    server, the failing one cools down), while `Retry` re-sends inside one
    host's connection pool; a server that hangs or drops the connection while
    sending the body fails after urllib3 has returned the response, where
    `Retry` no longer applies; and the stats count retries and failures.
    """

    backend = "http"

    def __init__(self, cfg: DescriberSettings, class_names: list[str], support: SupportExample | None = None,
                 template: dict | None = None):
        missing = [] if cfg.model else ["model"]
        if not (cfg.base_url or cfg.base_urls):
            missing.insert(0, "base_url")
        if missing:
            raise ValueError(f"describer backend '{self.backend}' needs config key(s): {', '.join(missing)}")
        self.class_names = list(class_names)
        self._endpoints = EndpointPool.from_config(cfg)  # base_url / base_urls, server: shared | per_gpu
        self.base_url = self._endpoints.primary
        self.model = cfg.model
        self.temperature = cfg.temperature
        self.seed = cfg.seed
        self.max_tokens = cfg.max_tokens
        self.timeout_s = cfg.timeout_s
        self.request_deadline_s = cfg.request_deadline_s
        self.max_response_bytes = cfg.max_response_bytes
        self.max_answer_chars = cfg.max_answer_chars
        self.retries = cfg.retries
        self.backoff_s = cfg.backoff_s
        self.max_concurrency = cfg.max_concurrency
        self.send_images = cfg.send_images
        self.image_size = cfg.image_size
        self.max_words = cfg.max_words
        self.template = template if template is not None else load_template(cfg.prompt_template)
        self.support = support if support is not None else synthetic_support(self.template, self.image_size)
        self._api_key = read_api_key(cfg.api_key_env)
        self.stats = DescriberStats()
        # one session per server, each with a pool of max_concurrency kept-alive connections: every
        # request in flight may go to the same server, and a connection is reused once its reply is read
        self._sessions = {base: self._new_session() for base in self._endpoints.urls}
        self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix=f"describer-{self.backend}")
        self._png_lock = threading.Lock()
        self._png_memo: OrderedDict[tuple, str] = OrderedDict()  # the support images recur in every request

    def _new_session(self) -> requests.Session:
        session = requests.Session()
        adapter = DeadlineAdapter(pool_connections=1, pool_maxsize=self.max_concurrency)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        return session

    def _session_for(self, url: str) -> requests.Session:
        """The session of the server `url` was routed to (the longest base URL it starts with)."""
        matches = [base for base in self._sessions if url == base or url.startswith(base + "/")]
        return self._sessions[max(matches, key=len)] if matches else self._sessions[self._endpoints.primary]

    # --- what a backend defines -------------------------------------------------
    def url(self) -> str:
        raise NotImplementedError

    def payload(self, messages: list[dict]) -> dict:
        raise NotImplementedError

    def parse(self, body: Any) -> str | None:
        raise NotImplementedError

    # --- shared machinery -------------------------------------------------------
    def image_base64(self, image: torch.Tensor) -> str:
        """Bare base64 PNG of a [3,H,W] view, as it is (the views are already at describer size).

        PNG is lossless and the smallest form both APIs take without re-encoding
        on their side; an image seen lately (the one-shot example's two views,
        in every request) is encoded once and then taken from a small memo.
        """
        pixels = to_uint8_hwc(image)
        key = (pixels.shape, hashlib.blake2b(pixels.tobytes(), digest_size=16).digest())
        with self._png_lock:
            if key in self._png_memo:
                self._png_memo.move_to_end(key)
                return self._png_memo[key]
        encoded = base64.b64encode(png_bytes_uint8(pixels)).decode("ascii")
        with self._png_lock:
            self._png_memo[key] = encoded
            while len(self._png_memo) > PNG_MEMO_SIZE:
                self._png_memo.popitem(last=False)
        return encoded

    def headers(self) -> dict[str, str]:
        # identity: the byte cap then counts what crosses the wire (a compressed reply is still capped decoded)
        h = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
        if self._api_key:
            h["Authorization"] = f"Bearer {self._api_key}"
        return h

    def submit(self, requests_: list[DescribeRequest]) -> list[Future]:
        """Send the requests without waiting: one future per request (its text or None), max_concurrency in flight."""
        return [self._pool.submit(self._describe_one, r) for r in requests_]

    def describe(self, requests_: list[DescribeRequest]) -> list[str | None]:
        """Describe a step's requests concurrently (at most max_concurrency in flight), in order."""
        futures = self.submit(requests_)
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
        raw = self.parse(body) if body is not None else None
        if isinstance(raw, str) and len(raw) > self.max_answer_chars:
            self.stats.add(too_long=1)
            log.warning("describer %s answered %d characters for %s, over max_answer_chars=%d: counted as malformed",
                        self.backend, len(raw), request.key, self.max_answer_chars)
            raw = None
        if isinstance(raw, str):  # a server echoing the request's headers into an answer: never into the cache
            raw = self._scrub(raw)
        answer = clean_answer(raw, self.max_words)
        if answer is None:
            self.stats.add(malformed=1)
            log.warning("describer %s gave a malformed answer for %s", self.backend, request.key)
        return answer

    def _post(self, payload: dict) -> Any:
        """POST with retries; the parsed JSON body, or None when a 200 reply is not JSON.

        The body is serialised once and every attempt sends the same bytes.
        """
        url = self.url()
        body = json.dumps(payload).encode("utf-8")
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
                fatal = None
                try:
                    status, headers, data = self._attempt(url, body)
                except AttemptFailed as exc:
                    self.stats.add(**{exc.kind: 1})
                    last_error, delay = self._scrub(exc), backoff
                    continue
                except _RETRYABLE as exc:
                    last_error, delay = self._scrub(f"{type(exc).__name__}: {exc}"), backoff
                    continue
                except requests.RequestException as exc:  # a bad URL or header: repeating cannot help
                    fatal = self._scrub(f"{type(exc).__name__}: {exc}")
                if fatal is not None:  # raised here, outside the except block: no chained original
                    raise self._error(url, attempt + 1, fatal, "The request could not be made: check base_url "
                                      "and the API key variable named by api_key_env.")
                if status == 429 or status >= 500:
                    last_error = f"HTTP {status}: {self._snippet(data)}"
                    delay = max(backoff, _retry_after(headers))
                    continue
                if status >= 400:
                    raise self._error(
                        url, attempt + 1, f"HTTP {status}: {self._snippet(data)}",
                        "The server rejected the request: check the model name, the API key "
                        "variable named by api_key_env, and whether the model accepts images (send_images).",
                    )
                try:
                    return json.loads(data)
                except ValueError:  # UnicodeDecodeError included
                    return None
            raise self._error(
                url, attempts, last_error,
                "Check that the server is running and reachable at base_url, that the model is "
                "available there, and the timeout_s / request_deadline_s / max_response_bytes / retries settings.",
            )
        finally:
            self.stats.add_request(time.monotonic() - start)

    def _attempt(self, url: str, body: bytes) -> tuple[int, Any, bytes]:
        """One HTTP attempt within request_deadline_s and max_response_bytes: (status, headers, body).

        A reply read to its end gives its connection back to the session's pool
        (kept alive for the next request); any other outcome closes it.
        """
        deadline = time.monotonic() + self.request_deadline_s
        dog = Watchdog(self.request_deadline_s)
        overdue = AttemptFailed("overdue", f"no complete reply within request_deadline_s={self.request_deadline_s:g}")
        resp, cut = None, False
        try:
            with self._endpoints.route(url) as routed, dog:
                resp = self._session_for(routed).post(
                    routed, data=body, headers=self.headers(), stream=True,
                    timeout=min(self.timeout_s, self.request_deadline_s))
                data = read_capped(resp, deadline, self.max_response_bytes, self.request_deadline_s)
                if dog.fired:  # the cut may have looked like a normal end of the body
                    raise overdue
        except AttemptFailed:
            _discard(resp)  # an unread rest is dropped with its connection, never drained
            raise
        except Exception:
            _discard(resp)
            # a read cut by the watchdog, or a socket timeout that ran past the deadline: the deadline's doing
            if not (dog.fired or time.monotonic() >= deadline):
                raise
            cut = True
        if cut or dog.fired:  # raised here, outside the except block: no chained original
            _discard(resp)  # (a watchdog that fired after the check above has shut the socket down)
            raise overdue
        # the watchdog is done with the socket: the connection may go back to the pool now
        resp.raw.release_conn()
        return resp.status_code, resp.headers, data

    def _snippet(self, data: bytes, limit: int = 300) -> str:
        """The server's own error text, scrubbed and shortened: it usually says exactly what is wrong."""
        try:
            body = json.loads(data)
            text = body.get("error", body) if isinstance(body, dict) else body
            text = text.get("message", text) if isinstance(text, dict) else text
            text = str(text)
        except ValueError:
            text = data.decode("utf-8", errors="replace")
        text = self._scrub(" ".join(text.split()))  # before the cut, so that no half of a secret survives it
        return text[:limit] + ("..." if len(text) > limit else "") if text else "(empty body)"

    def _scrub(self, text: Any) -> str:
        return redact(text, (self._api_key,))

    def _error(self, url: str, attempts: int, last_error: str, hint: str) -> DescriberError:
        self.stats.add(failures=1)
        msg = (
            f"describer backend '{self.backend}' (model '{self.model}') failed at {url} after "
            f"{attempts} attempt(s): {last_error}. {hint}"
        )
        return DescriberError(self._scrub(msg))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for session in self._sessions.values():
            session.close()

    def __enter__(self) -> "HttpDescriber":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _discard(resp: requests.Response | None) -> None:
    if resp is not None:
        resp.close()


# transport failures worth another attempt; read1 raises urllib3's own errors, which requests does not wrap there
_RETRYABLE = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
              requests.exceptions.ContentDecodingError, urllib3.exceptions.HTTPError, http.client.HTTPException)


def _retry_after(headers: Any, cap_s: float = 60.0) -> float:
    try:
        value = float(headers.get("Retry-After", 0))
    except (TypeError, ValueError):
        return 0.0
    return min(cap_s, max(0.0, value)) if value == value else 0.0  # NaN: ignored
