"""HTTP describers against a hostile server, and the secret redaction layer.

The server (tests/hostile_server.py; 127.0.0.1, threaded) answers each hit by a *mode*: 5xx errors, a
5xx or 401 whose body echoes the request's Authorization header, hangs, slow
drips (of the body or of the headers), oversized bodies (announced or not),
garbage 200s (empty text, an HTML page, broken JSON, an endless answer). It is
bounded: at most MAX_HANDLERS connections are served at once (others are closed
unanswered), every mode ends within MODE_LIMIT_S or as soon as the test closes
the server, and a server nobody closes shuts itself down after LIFETIME_S.

Every test runs with a planted key (read through `api_key_env`) and the
`leaks` fixture: after the test, the key must appear in no log output (caplog
at DEBUG, and a DEBUG handler on the root logger with the redaction layer
*not* installed, so that the describer's own scrubbing is what is tested), no
exception text (chained causes included) and no stats.
"""
from __future__ import annotations

import io
import json
import logging
import secrets
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from hostile_server import HUGE, OK_ANSWER, HostileServer
from ttdl.core import redact
from ttdl.core.settings import DescriberSettings
from ttdl.text.describers import DescribeRequest, DescriberError, build_describer, transport
from ttdl.text.describers.prompt import DEFAULT_TEMPLATE

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = str(REPO / DEFAULT_TEMPLATE)
NAMES = ["background", "circle", "square"]
KEY_ENV = "TTDL_FAULT_TEST_KEY"
KEY = f"sk-TTDL-PLANTED-{secrets.token_hex(12)}"
KEY_TAIL = KEY[len("sk-TTDL-"):]  # a leak of a part of the key counts too


@pytest.fixture
def hostile() -> Iterator[list[HostileServer]]:
    """Make servers with `hostile.append(HostileServer(...))`; all are closed after the test."""
    made: list[HostileServer] = []
    yield made
    for s in made:
        s.close()


def serve(made: list[HostileServer], *modes: str) -> HostileServer:
    s = HostileServer(*modes)
    made.append(s)
    return s


class Leaks:
    """What a test produced that the key must not appear in."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self.caplog = caplog
        self.root_text = io.StringIO()
        self.handler = logging.StreamHandler(self.root_text)
        self.handler.setLevel(logging.DEBUG)
        self.handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        self.texts: list[str] = []

    def exception(self, exc: BaseException) -> str:
        """Record the whole exception (its chain and traceback included); returns its message."""
        seen: set[int] = set()
        e: BaseException | None = exc
        while e is not None and id(e) not in seen:
            seen.add(id(e))
            self.texts += [str(e), repr(e), *map(str, e.args)]
            e = e.__cause__ or e.__context__
        self.texts.append("".join(traceback.format_exception(exc)))
        return str(exc)

    def stats(self, describer: Any) -> dict:
        stats = describer.stats.as_dict()
        self.texts.append(json.dumps(stats))
        return stats

    def check(self) -> None:
        everything = [self.caplog.text, self.root_text.getvalue(), *self.texts]
        everything += [r.getMessage() for r in self.caplog.records]
        for text in everything:
            assert KEY not in text and KEY_TAIL not in text, f"planted key leaked into: {text[:500]!r}"


@pytest.fixture
def leaks(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> Iterator[Leaks]:
    monkeypatch.setenv(KEY_ENV, KEY)
    # a test that ran logging.config with disable_existing_loggers (import-linter's CLI does) must not blind this one
    monkeypatch.setattr(logging.getLogger("ttdl.text.describers.base"), "disabled", False)
    caplog.set_level(logging.DEBUG)
    watch = Leaks(caplog)
    root = logging.getLogger()
    root.addHandler(watch.handler)
    try:
        yield watch
    finally:
        root.removeHandler(watch.handler)
    watch.check()


def describer(url: str, backend: str = "openai", **over: Any):
    c = {"backend": backend, "base_url": url + ("/v1" if backend == "openai" else ""), "model": "m",
         "retries": 0, "backoff_s": 0.01, "timeout_s": 5, "image_size": 32, "max_concurrency": 2,
         "send_images": False, "prompt_template": TEMPLATE, "api_key_env": KEY_ENV}
    c.update(over)
    return build_describer(DescriberSettings.from_partial(c), NAMES)


def requests_(n: int = 1) -> list[DescribeRequest]:
    gt = torch.zeros(48, 48, dtype=torch.long)
    gt[10:30, 10:30] = 1
    pr = gt.clone()
    pr[:, :20] = 0
    return [DescribeRequest(f"u{i}-1", torch.rand(3, 48, 48), gt, pr, 1, "circle", NAMES) for i in range(n)]


def fail(d: Any, leaks: Leaks, n: int = 1) -> tuple[str, float]:
    """describe() that must raise DescriberError: (its message, seconds it took)."""
    start = time.monotonic()
    with pytest.raises(DescriberError) as info:
        d.describe(requests_(n))
    return leaks.exception(info.value), time.monotonic() - start


# ---- secrets --------------------------------------------------------------------------------
def test_5xx_echoing_the_key_is_retried_and_scrubbed_everywhere(hostile, leaks) -> None:
    s = serve(hostile, "echo_5xx")
    d = describer(s.url, retries=2)
    msg, _ = fail(d, leaks)
    assert s.hits == ["echo_5xx"] * 3 and s.auth == [f"Bearer {KEY}"] * 3  # the key was sent, then echoed
    assert "HTTP 500" in msg and "3 attempt(s)" in msg and "upstream failed" in msg
    assert "Authorization: Bearer ***" in msg
    retry_lines = [r.getMessage() for r in leaks.caplog.records
                   if r.name == "ttdl.text.describers.base" and " retry " in r.getMessage()]
    assert len(retry_lines) == 2 and all("Bearer ***" in line for line in retry_lines)
    assert leaks.stats(d) | {"latency_s": 0} == {"calls": 1, "retries": 2, "failures": 1, "malformed": 0,
                                                "latency_s": 0, "oversized": 0, "overdue": 0, "too_long": 0}
    d.close()


def test_401_echoing_the_key_fails_at_once_scrubbed(hostile, leaks) -> None:
    s = serve(hostile, "echo_401")
    d = describer(s.url, retries=3)
    msg, _ = fail(d, leaks)
    assert s.hits == ["echo_401"]
    assert "HTTP 401" in msg and "1 attempt(s)" in msg and "api_key_env" in msg
    assert msg.count("***") >= 5  # header, dict repr, key=, x-api-key, api_key=, bare value
    assert leaks.stats(d)["failures"] == 1
    d.close()


def test_a_key_with_a_newline_is_refused_without_showing_it(leaks, monkeypatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY[:10] + "\n" + KEY[10:])
    with pytest.raises(ValueError) as info:
        describer("http://127.0.0.1:9")
    assert "whitespace or control characters" in leaks.exception(info.value)
    assert KEY[:10] not in str(info.value)


def test_a_key_with_a_trailing_newline_is_sent_bare(hostile, leaks, monkeypatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY + "\n")
    s = serve(hostile, "ok")
    d = describer(s.url)
    assert d.describe(requests_()) == [OK_ANSWER]
    assert s.auth == [f"Bearer {KEY}"]
    d.close()


def test_redact_scrubs_registered_values_and_credential_forms() -> None:
    redact.register_secret("zz/registered+VALUE=42")
    try:
        text = ("Authorization: Bearer abc.def-123 | 'authorization': 'Basic dXNlcjpwdw==' | "
                "https://h/x?api_key=q1w2e3&y=2 | X-Api-Key: k-777 | {\"apiKey\": \"v-888\"} | "
                "password=hunter2 | token sk-abcdefghijklmnop | plain zz/registered+VALUE=42 | "
                "zz%2Fregistered%2BVALUE%3D42")  # the URL-encoded form of the registered value
        out = redact.redact(text)
        for secret in ["abc.def-123", "dXNlcjpwdw==", "q1w2e3", "k-777", "v-888", "hunter2",
                       "sk-abcdefghijklmnop", "registered"]:
            assert secret not in out
        assert out == ("Authorization: Bearer *** | 'authorization': 'Basic ***' | "
                       "https://h/x?api_key=***&y=2 | X-Api-Key: *** | {\"apiKey\": \"***\"} | "
                       "password=*** | token *** | plain *** | ***")
        assert redact.redact(out) == out  # idempotent
        assert redact.redact("api_key_env='TTDL_KEY' names a variable") == "api_key_env='TTDL_KEY' names a variable"
        assert redact.redact("x", extra=["x"]) == "***"
    finally:
        redact.forget_secrets()


def test_the_filter_scrubs_every_record_reaching_a_loggers_handlers() -> None:
    """`install` on a logger's handlers covers records of its children (the root logger's: of everyone)."""
    redact.register_secret(KEY)
    stream = io.StringIO()
    top = logging.getLogger("ttdl-test-redact")  # stands in for the root logger, which stays untouched
    top.propagate = False
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    top.addHandler(handler)
    try:
        redact.install(top, excepthook=False)
        redact.install(top, excepthook=False)  # idempotent
        assert sum(isinstance(f, redact.RedactingFilter) for f in handler.filters) == 1
        other = logging.getLogger("ttdl-test-redact.some.library")
        other.warning("headers %s", {"Authorization": f"Bearer {KEY}"})
        other.error("bare key %s and %r", KEY, KEY)
        try:
            raise RuntimeError(f"failed with x-api-key: {KEY}")
        except RuntimeError:
            other.exception("boom")
        out = stream.getvalue()
        # 5: the header, the two bare keys, and the exception's message twice (traceback source line and text)
        assert out.count("***") == 5 and "Traceback" in out and "RuntimeError: failed with x-api-key: ***" in out
        assert KEY not in out and KEY_TAIL not in out
    finally:
        top.removeHandler(handler)
        redact.forget_secrets()


def test_the_excepthook_scrubs_an_uncaught_traceback(tmp_path) -> None:
    code = ("import logging, sys, threading; from ttdl.core import redact\n"
            "logging.basicConfig(); redact.install(); redact.register_secret(sys.argv[1])\n"
            "def work(): raise ValueError('worker got ' + sys.argv[1])\n"
            "t = threading.Thread(target=work, name='w1'); t.start(); t.join()\n"
            "raise RuntimeError('server said ' + sys.argv[1])\n")
    proc = subprocess.run([sys.executable, "-c", code, KEY], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "Exception in thread w1:" in proc.stderr and "ValueError: worker got ***" in proc.stderr
    assert "RuntimeError: server said ***" in proc.stderr and KEY not in proc.stderr + proc.stdout


# ---- time bounds -------------------------------------------------------------------------
def test_a_dripping_body_is_cut_at_the_deadline(hostile, leaks) -> None:
    s = serve(hostile, "drip")
    # each byte comes well within timeout_s: only the deadline can end this attempt
    d = describer(s.url, timeout_s=3, request_deadline_s=1.5)
    msg, took = fail(d, leaks)
    assert 1.5 <= took < 1.5 + 1.5, took
    assert "request_deadline_s=1.5" in msg and "1 attempt(s)" in msg
    assert 1 <= s.sent[0] <= 8  # bytes dripped before the cut
    assert leaks.stats(d)["overdue"] == 1
    d.close()


def test_dripping_headers_are_cut_at_the_deadline_and_retried(hostile, leaks) -> None:
    s = serve(hostile, "drip_headers", "ok")
    d = describer(s.url, timeout_s=3, request_deadline_s=1.2, retries=1)
    start = time.monotonic()
    assert d.describe(requests_()) == [OK_ANSWER]
    took = time.monotonic() - start
    assert s.hits == ["drip_headers", "ok"]
    assert 1.2 <= took < 1.2 + 1.5, took
    stats = leaks.stats(d)
    assert (stats["overdue"], stats["retries"], stats["failures"]) == (1, 1, 0)
    d.close()


def test_direct_and_proxied_connections_are_watched() -> None:
    adapter = transport.DeadlineAdapter()
    for manager in (adapter.poolmanager, adapter.proxy_manager_for("http://127.0.0.1:9")):
        pool = manager.connection_from_url("http://127.0.0.1:9/v1")
        assert issubclass(pool.ConnectionCls, transport._WatchedConnection)
    adapter.close()


def test_a_hang_ends_at_timeout_s_and_is_retried(hostile, leaks) -> None:
    s = serve(hostile, "hang")
    d = describer(s.url, timeout_s=0.5, request_deadline_s=30, retries=1)
    msg, took = fail(d, leaks)
    assert s.hits == ["hang", "hang"] and "2 attempt(s)" in msg and "timed out" in msg
    assert 1.0 <= took < 1.0 + 2.0, took
    stats = leaks.stats(d)
    assert (stats["overdue"], stats["retries"], stats["failures"]) == (0, 1, 1)
    d.close()


def test_a_hang_longer_than_the_deadline_ends_at_the_deadline(hostile, leaks) -> None:
    s = serve(hostile, "hang")
    d = describer(s.url, timeout_s=60, request_deadline_s=1.0)
    msg, took = fail(d, leaks)
    assert 1.0 <= took < 1.0 + 1.5, took
    assert "request_deadline_s=1" in msg
    assert leaks.stats(d)["overdue"] == 1
    d.close()


# ---- size bounds -------------------------------------------------------------------------
def test_an_announced_100mb_body_is_refused_unread(hostile, leaks) -> None:
    s = serve(hostile, "huge_announced")
    d = describer(s.url, retries=1, max_response_bytes=1024 * 1024)
    msg, took = fail(d, leaks)
    assert s.hits == ["huge_announced"] * 2
    assert f"announces {HUGE} bytes, over max_response_bytes=1048576" in msg
    assert took < 10
    time.sleep(0.2)  # the server notices the hang-up
    assert all(sent < 32 * 1024 * 1024 for sent in s.sent), s.sent  # far from the 100 MB offered
    stats = leaks.stats(d)
    assert (stats["oversized"], stats["retries"], stats["failures"], stats["malformed"]) == (2, 1, 1, 0)
    d.close()


def test_an_unannounced_100mb_body_is_cut_at_the_cap_and_retried(hostile, leaks) -> None:
    s = serve(hostile, "huge_unannounced", "ok")
    d = describer(s.url, retries=1, max_response_bytes=256 * 1024)
    start = time.monotonic()
    out = d.describe(requests_())
    assert out == [OK_ANSWER]  # the retry's answer; nothing of the cut reply was parsed or returned
    assert time.monotonic() - start < 10
    assert s.hits == ["huge_unannounced", "ok"]
    time.sleep(0.2)
    assert s.sent[0] < 32 * 1024 * 1024, s.sent
    stats = leaks.stats(d)
    assert (stats["oversized"], stats["retries"], stats["failures"], stats["malformed"]) == (1, 1, 0, 0)
    assert any("max_response_bytes=262144" in r.getMessage() for r in leaks.caplog.records)
    d.close()


def test_a_gzip_bomb_is_cut_at_the_cap_after_decoding(hostile, leaks) -> None:
    s = serve(hostile, "gzip_bomb")
    d = describer(s.url, max_response_bytes=1024 * 1024)
    msg, took = fail(d, leaks)
    assert s.sent[0] < 1024 * 1024  # the wire bytes were under the cap: decoding is what counts
    assert "reply exceeds max_response_bytes=1048576" in msg and took < 10
    assert leaks.stats(d)["oversized"] == 1
    d.close()


def test_a_200_answer_echoing_the_key_is_scrubbed_before_it_is_returned(hostile, leaks) -> None:
    s = serve(hostile, "echo_200")
    d = describer(s.url, max_words=200)
    (answer,) = d.describe(requests_())
    leaks.texts.append(answer)
    # scrubbed to *** before cleaning, whose markup stripping then drops the asterisks
    assert answer == ("The CIRCLE region is fine. upstream failed. Request headers were {'Authorization': 'Bearer '}; "
                      "Authorization: Bearer ; key= ; x-api-key: ; api_key= &x=1; bare")
    d.close()


@pytest.mark.parametrize("backend", ["openai", "ollama"])
def test_an_answer_over_max_answer_chars_is_malformed(hostile, leaks, backend) -> None:
    s = serve(hostile, "long_answer")
    d = describer(s.url, backend, max_answer_chars=2000)
    assert d.describe(requests_()) == [None]
    stats = leaks.stats(d)
    assert (stats["too_long"], stats["malformed"], stats["failures"]) == (1, 1, 0)
    d.close()


# ---- garbage 200s and plain errors ---------------------------------------------------------
def test_garbage_200s_are_malformed_not_failures(hostile, leaks) -> None:
    s = serve(hostile, "empty_text", "html", "broken_json", "ok")
    d = describer(s.url, max_concurrency=1)
    assert d.describe(requests_(4)) == [None, None, None, OK_ANSWER]
    assert s.hits == ["empty_text", "html", "broken_json", "ok"]
    stats = leaks.stats(d)
    assert (stats["calls"], stats["malformed"], stats["failures"], stats["retries"]) == (4, 3, 0, 0)
    d.close()


def test_5xx_then_success_is_retried(hostile, leaks) -> None:
    s = serve(hostile, "error_5xx", "error_5xx", "ok")
    d = describer(s.url, retries=2)
    assert d.describe(requests_()) == [OK_ANSWER]
    stats = leaks.stats(d)
    assert (stats["retries"], stats["failures"]) == (2, 0)
    assert sum("HTTP 503: model overloaded" in r.getMessage() for r in leaks.caplog.records) == 2
    d.close()


def test_every_mode_in_one_run_leaks_nothing(hostile, leaks) -> None:
    """All failure modes through one describer, concurrently: the key stays out of everything."""
    modes = ["echo_5xx", "echo_401", "error_5xx", "hang", "drip", "drip_headers", "huge_announced",
             "huge_unannounced", "gzip_bomb", "echo_200", "empty_text", "html", "broken_json", "long_answer", "ok"]
    errors = 0
    for mode in modes:
        s = serve(hostile, mode)
        d = describer(s.url, retries=1, timeout_s=0.6, request_deadline_s=1.0, max_response_bytes=64 * 1024)
        try:
            leaks.texts += [str(a) for a in d.describe(requests_(2))]
        except DescriberError as exc:
            leaks.exception(exc)
            errors += 1
        leaks.stats(d)
        d.close()
    assert errors == 9  # all but the 200s with an answer (echo_200, garbage, long_answer, ok)
