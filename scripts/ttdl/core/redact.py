"""One redaction layer for secrets: a scrubbing function and a logging filter that applies it.

Whatever may carry a credential (a log record, an exception message, a server's
error text that echoes the request's headers) goes through `redact` before it is
written anywhere. It removes

- every secret value registered with `register_secret` (the describer registers
  its API key when it reads it from the environment), also in its URL-encoded
  form, and
- common credential forms whatever their value: `Authorization: Bearer ...`
  (or Basic/Token/Digest, or a bare value), `Bearer ...` on its own,
  `api_key=...`, `x-api-key: ...`, `access_token`, `client_secret`, `password`
  and the like, in header, query-string, YAML/JSON and repr spellings, and
  OpenAI-style `sk-...` keys.

`RedactingFilter` applies it to a log record's message, args, exception and
stack text; `install` puts one on every handler of a logger (the root logger by
default), so records of every library that reach those handlers are scrubbed,
and optionally wraps `sys.excepthook` so an uncaught exception's traceback is
scrubbed too. The replacement is always `***`, so the result says *that*
something was removed, never what.
"""
from __future__ import annotations

import logging
import re
import sys
import threading
import traceback
from types import TracebackType
from typing import Any, Iterable
from urllib.parse import quote

MASK = "***"

_lock = threading.Lock()
_secrets: set[str] = set()

# `Authorization: Bearer xyz`, `"authorization": "Basic eHl6"`, `Authorization=xyz`, `Proxy-Authorization: ...`
_AUTH_HEADER = re.compile(
    r"""(?P<name>\b(?:proxy-)?authorization["']?\s*[:=]\s*["']?)"""
    r"""(?P<scheme>(?:bearer|basic|token|digest|apikey)\s+)?"""
    r"""(?P<value>[^\s"',;}\]]+)""",
    re.IGNORECASE,
)
# `Bearer xyz` wherever it stands (e.g. a server's error text quoting the header value only)
_BEARER = re.compile(r"(?P<name>\bbearer\s+)(?P<value>[A-Za-z0-9._~+/=:-]+)", re.IGNORECASE)
# `api_key=xyz`, `x-api-key: xyz`, `"apiKey": "xyz"`, `access_token=...`, `client_secret: ...`, `password=...`
_KEY_VALUE = re.compile(
    r"""(?P<name>\b(?:x-)?(?:api[-_]?key|access[-_]?token|auth[-_]?token|refresh[-_]?token|client[-_]?secret|"""
    r"""secret[-_]?key|password|passwd)["']?\s*[:=]\s*["']?)"""
    r"""(?P<value>[^\s"'&,;}\]]+)""",
    re.IGNORECASE,
)
# OpenAI-style secret keys (sk-..., sk-proj-...) even when nobody registered them
_SK_KEY = re.compile(r"\bsk-[A-Za-z0-9_-]{8,}")


def register_secret(value: str | None) -> None:
    """Remember `value` (e.g. an API key read from the environment) so that `redact` removes it anywhere."""
    if not value:
        return
    forms = {value, value.strip(), quote(value, safe=""), quote(value.strip(), safe="")}
    with _lock:
        _secrets.update(f for f in forms if f)


def forget_secrets() -> None:
    """Drop every registered value (tests use it to start clean)."""
    with _lock:
        _secrets.clear()


def registered_count() -> int:
    with _lock:
        return len(_secrets)


def _sub_value(match: re.Match) -> str:
    value = match.group("value")
    if value == MASK or value.startswith(MASK):
        return match.group(0)
    scheme = match.groupdict().get("scheme") or ""
    return f"{match.group('name')}{scheme}{MASK}"


def redact(text: Any, extra: Iterable[str | None] = ()) -> str:
    """`text` (made a str) without registered secrets, `extra` values or credential forms."""
    s = text if isinstance(text, str) else str(text)
    with _lock:
        values = set(_secrets)
    values.update(v for v in extra if v)
    for value in sorted(values, key=len, reverse=True):  # longest first: a key containing another
        if value in s:
            s = s.replace(value, MASK)
    s = _AUTH_HEADER.sub(_sub_value, s)
    s = _BEARER.sub(_sub_value, s)
    s = _KEY_VALUE.sub(_sub_value, s)
    s = _SK_KEY.sub(MASK, s)
    return s


class RedactingFilter(logging.Filter):
    """Scrub a record in place: its message (merged with its args), exception text and stack text.

    Merging the args into the message first is what makes this complete: an
    arg's own str() may carry the secret (an exception, a dict of headers). The
    record then has no args left, so later handlers print exactly the scrubbed
    text. Applying it twice is harmless.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: keep what can be shown, scrubbed
            message = f"{record.msg!r} % {record.args!r}"
        record.msg = redact(message)
        record.args = None
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
            record.exc_info = None  # formatters print exc_text; none may re-render the raw exception
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def install(logger: logging.Logger | None = None, *, excepthook: bool = True) -> RedactingFilter:
    """Put one RedactingFilter on every handler of `logger` (default: the root logger); idempotent.

    Call it after the handlers exist (e.g. right after logging.basicConfig).
    Handler filters, unlike logger filters, see the records that propagate up
    from every child logger, urllib3's included. With `excepthook`, the
    traceback of an exception nobody caught (in the main thread: sys.excepthook;
    in another thread: threading.excepthook) is scrubbed as well.
    """
    logger = logger if logger is not None else logging.getLogger()
    shared = next((f for h in logger.handlers for f in h.filters if isinstance(f, RedactingFilter)), None)
    shared = shared or RedactingFilter()
    for handler in logger.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(shared)
    if excepthook and not getattr(sys.excepthook, "_ttdl_redacting", False):
        sys.excepthook = _redacting_excepthook(sys.excepthook)
    if excepthook and not getattr(threading.excepthook, "_ttdl_redacting", False):
        threading.excepthook = _redacting_thread_excepthook(threading.excepthook)
    return shared


def _redacting_excepthook(previous):
    def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        try:
            text = "".join(traceback.format_exception(exc_type, exc, tb))
            sys.stderr.write(redact(text))
            sys.stderr.flush()
        except Exception:
            previous(exc_type, exc, tb)

    hook._ttdl_redacting = True  # type: ignore[attr-defined]
    return hook


def _redacting_thread_excepthook(previous):
    def hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        try:
            name = args.thread.name if args.thread is not None else "?"
            text = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
            sys.stderr.write(redact(f"Exception in thread {name}:\n{text}"))
            sys.stderr.flush()
        except Exception:
            previous(args)

    hook._ttdl_redacting = True  # type: ignore[attr-defined]
    return hook
