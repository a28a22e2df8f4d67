"""HTTP plumbing shared by the provider clients: one request, every failure translated.

aiohttp's exceptions, error statuses and odd answers stop here; the clients' callers only
ever see a `ProviderError`, with credentials and message bodies redacted from it.
"""

from __future__ import annotations

import email.utils
import math
import re
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

import aiohttp
import orjson

from imsys.providers.errors import (
    OutOfCredits,
    ProviderAuthError,
    ProviderError,
    ProviderRejected,
    ProviderUnavailable,
    RateLimited,
)

__all__ = ["ErrorBody", "HttpProvider", "describe_status", "redact", "shorten"]

# An error page larger than this is not worth reading; its start says what went wrong.
_MAX_ERROR_BODY = 64 * 1024
_MAX_DETAIL = 300
_MAX_RETRY_AFTER = 3600.0
# Shorter "secrets" (a 2-digit test value) would shred every message they appear in.
_MIN_SECRET = 3
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_TAG = re.compile(r"<[^>]*>")


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every occurrence of each secret replaced by ``***``."""
    for secret in secrets:
        if len(secret) >= _MIN_SECRET:
            text = text.replace(secret, "***")
    return text


def shorten(text: str, limit: int = _MAX_DETAIL) -> str:
    """One line of at most ``limit`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True, slots=True)
class ErrorBody:
    """What an error answer said, whatever the provider's shape.

    ``detail`` and ``code`` are already redacted; ``data`` is the parsed JSON (not
    redacted: for classifying, never for messages).
    """

    detail: str | None
    code: str | None
    data: Any


# (status, body, mutating) -> the error to raise, or None for the default mapping.
Classifier = Callable[[int, ErrorBody, bool], ProviderError | None]


def _text(value: Any) -> str | None:
    return value.strip() or None if isinstance(value, str) else None


def _code(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | str):
        return None
    return str(value) or None


def parse_error_body(raw: bytes, secrets: Iterable[str]) -> ErrorBody:
    """Find the message and code in the shapes seen in the field.

    Bouncer ``{"status", "error", "message"}``, Twilio ``{"code", "message"}``, Graph
    ``{"error": {"message", "code"}}``, ``{"error": "..."}``, plain text, an HTML page.
    """
    try:
        data: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data = None
    detail: str | None = None
    code: str | None = None
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict):
            detail = _text(error.get("message"))
            code = _code(error.get("code"))
        detail = (detail or _text(data.get("message")) or _text(error)
                  or _text(data.get("detail")) or _text(data.get("error_description")))
        code = code or _code(data.get("code"))
    elif isinstance(data, str):
        detail = _text(data)
    elif data is None:
        text = raw.decode("utf-8", "replace")
        detail = _text(_TAG.sub(" ", text) if "<" in text else text)
    hidden = tuple(secrets)
    return ErrorBody(
        detail=shorten(redact(detail, hidden)) if detail else None,
        code=shorten(redact(code, hidden), 60) if code else None,
        data=data,
    )


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from a ``Retry-After`` header (delta or HTTP date), capped; None if absent."""
    value = headers.get("Retry-After", "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), _MAX_RETRY_AFTER)


def describe_status(status: int) -> str:
    """``HTTP 429 Too Many Requests``."""
    try:
        return f"HTTP {status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


def status_error(
    provider: str, status: int, body: ErrorBody, *, mutating: bool, defer: float | None
) -> ProviderError:
    """The default meaning of an HTTP error status."""
    what = describe_status(status)
    fields: dict[str, Any] = {"status": status, "detail": body.detail, "code": body.code}
    if status == 429:
        return RateLimited(provider, what, defer=defer, **fields)
    if status in (401, 403):
        return ProviderAuthError(provider, what, **fields)
    if status == 402:
        return OutOfCredits(provider, what, **fields)
    if status == 408:
        # The server gave up waiting for our request: it never started on it.
        return ProviderUnavailable(provider, what, **fields)
    if status >= 500:
        # A 504 comes from a proxy that gave up waiting on a provider that may have acted.
        return ProviderUnavailable(provider, what, maybe_applied=mutating and status == 504,
                                   **fields)
    return ProviderRejected(provider, what, **fields)


def transport_error(
    provider: str, exc: BaseException, *, mutating: bool, secrets: Iterable[str]
) -> ProviderError:
    """The meaning of an exception raised while talking to the provider."""
    applied = mutating
    if isinstance(exc, aiohttp.InvalidURL):
        what = "invalid URL"
        return ProviderRejected(provider, what, detail=shorten(redact(str(exc), secrets)))
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        what, applied = "timed out connecting", False
    elif isinstance(exc, aiohttp.ClientConnectorError):
        # Refused, unresolvable, TLS handshake: nothing was sent.
        what, applied = "cannot connect", False
    elif isinstance(exc, TimeoutError):
        what = "timed out waiting for the answer"
    elif isinstance(exc, aiohttp.ServerDisconnectedError):
        what = "connection closed before the answer"
    else:
        what = "connection failed"
    text = str(exc)
    detail = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return ProviderUnavailable(provider, what, detail=shorten(redact(detail, secrets)),
                               maybe_applied=applied)


class HttpProvider:
    """One provider's HTTP calls over the caller's session, every failure translated.

    ``secrets`` (credentials) are redacted from every error; a call may add its own (the
    message body). ``classify`` may claim an error answer before the default mapping.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        provider: str,
        *,
        timeout: float,
        connect_timeout: float,
        secrets: Iterable[str] = (),
        classify: Classifier | None = None,
    ) -> None:
        self.provider = provider
        self._session = session
        self._connect_timeout = connect_timeout
        self._timeout = self.timeout(timeout)
        self._secrets = tuple(s for s in secrets if s)
        self._classify = classify

    def add_secret(self, secret: str) -> None:
        """Redact ``secret`` from this provider's errors too."""
        if secret:
            self._secrets = (*self._secrets, secret)

    def timeout(self, total: float) -> aiohttp.ClientTimeout:
        # A separate connect limit (below the total) is what tells "never sent" apart from
        # "sent, answer lost" when time runs out.
        return aiohttp.ClientTimeout(total=total, connect=min(self._connect_timeout, total))

    @asynccontextmanager
    async def open(
        self,
        method: str,
        url: str,
        *,
        client_timeout: aiohttp.ClientTimeout | None = None,
        redact: Iterable[str] = (),
        **kwargs: Any,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """The response to a request once its status is 2xx; read it inside the block.

        Transport failures while reading inside the block are translated too.
        """
        hidden = (*self._secrets, *(s for s in redact if s))
        mutating = method.upper() not in _SAFE_METHODS
        try:
            # No redirects: aiohttp would carry custom credential headers (x-api-key,
            # apiKey) to whatever host a redirect names.
            async with self._session.request(method, url, timeout=client_timeout or self._timeout,
                                             allow_redirects=False, **kwargs) as resp:
                if not 200 <= resp.status < 300:
                    raise await self._status_error(resp, mutating, hidden)
                yield resp
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise transport_error(self.provider, exc, mutating=mutating, secrets=hidden) from exc

    async def json(self, method: str, url: str, **kwargs: Any) -> Any:
        """The parsed JSON answer (None for an empty body) of a successful request."""
        async with self.open(method, url, **kwargs) as resp:
            raw = await resp.read()
            status = resp.status
        if not raw.strip():
            return None
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise self.bad_answer(status, "the answer is not JSON",
                                  mutating=method.upper() not in _SAFE_METHODS) from None

    def bad_answer(self, status: int | None, detail: str, *, mutating: bool) -> ProviderError:
        """A 2xx answer we cannot use: a proxy's page, an API change.

        Retryable (a proxy hiccup passes); ``maybe_applied`` for a request that changes
        something, since the provider did say yes.
        """
        what = "unexpected answer" if status is None else f"unexpected answer to HTTP {status}"
        return ProviderUnavailable(self.provider, what, status=status,
                                   detail=shorten(redact(detail, self._secrets)),
                                   maybe_applied=mutating)

    async def _status_error(
        self, resp: aiohttp.ClientResponse, mutating: bool, hidden: tuple[str, ...]
    ) -> ProviderError:
        raw = bytearray()
        try:
            # read(n) returns what has arrived, which may be only the start of the body.
            while len(raw) < _MAX_ERROR_BODY:
                chunk = await resp.content.read(_MAX_ERROR_BODY - len(raw))
                if not chunk:
                    break
                raw += chunk
        except (aiohttp.ClientError, TimeoutError, OSError):
            pass  # the status is what matters; what arrived of the body is a bonus
        body = parse_error_body(bytes(raw), hidden)
        if 300 <= resp.status < 400:
            where = redact(resp.headers.get("Location", "?"), hidden)
            return ProviderRejected(self.provider, describe_status(resp.status),
                                    status=resp.status,
                                    detail=shorten(f"redirected to {where}; fix the URL"))
        if self._classify is not None:
            claimed = self._classify(resp.status, body, mutating)
            if claimed is not None:
                return claimed
        return status_error(self.provider, resp.status, body, mutating=mutating,
                            defer=retry_after(resp.headers))
