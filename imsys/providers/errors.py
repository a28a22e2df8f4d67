"""Errors of the provider adapters (Bouncer, SMS, WhatsApp, SMTP).

Every failure of a provider call reaches the caller as one of these, so the engine can
classify it (retryable or permanent) and an operator can read it: which provider, what
happened, the status, and what the provider said. They never carry a credential or a
message body (an OTP may be in it): the adapters redact both from whatever the provider
sends back before it gets here.
"""

from __future__ import annotations

from imsys.errors import ImsysError, PermanentError, RetryableError

__all__ = [
    "OutOfCredits",
    "ProviderAuthError",
    "ProviderError",
    "ProviderRejected",
    "ProviderUnavailable",
    "RateLimited",
]


class ProviderError(ImsysError):
    """Base of the adapters' errors; catch it to handle any provider failure.

    ``provider`` names the provider ("bouncer", "africastalking", "smtp"...), ``status`` is
    the HTTP or SMTP status when there was one, ``detail`` what the provider said (redacted,
    shortened) and ``code`` its own error code when it gave one (Twilio 21211, Graph 131026,
    Africa's Talking ``InvalidPhoneNumber``...).

    The concrete classes also inherit `RetryableError` or `PermanentError`, which is what
    the engine looks at.
    """

    def __init__(
        self,
        provider: str,
        what: str,
        *,
        status: int | None = None,
        detail: str | None = None,
        code: str | None = None,
    ) -> None:
        self.provider = provider
        self.status = status
        self.detail = detail
        self.code = code
        message = f"{provider}: {what}"
        if code is not None:
            message += f" [code {code}]"
        if detail:
            message += f": {detail}"
        super().__init__(message)


class RateLimited(ProviderError, RetryableError):
    """The provider said "too many requests" (HTTP 429 or its own rate-limit code).

    ``defer`` is the provider's ``Retry-After`` in seconds when it sent one.
    """

    def __init__(
        self,
        provider: str,
        what: str,
        *,
        status: int | None = None,
        detail: str | None = None,
        code: str | None = None,
        defer: float | None = None,
    ) -> None:
        super().__init__(provider, what, status=status, detail=detail, code=code)
        self.defer = defer


class ProviderUnavailable(ProviderError, RetryableError):
    """The provider could not be reached or failed on its side (5xx, timeout, disconnect).

    ``maybe_applied`` is True when the request may have taken effect although no answer
    came back: it was sent and then the connection dropped or timed out, or a proxy
    answered 504. A retry may then repeat the effect (a second batch, a second SMS); the
    caller decides whether that is acceptable.
    """

    def __init__(
        self,
        provider: str,
        what: str,
        *,
        status: int | None = None,
        detail: str | None = None,
        code: str | None = None,
        maybe_applied: bool = False,
    ) -> None:
        super().__init__(provider, what, status=status, detail=detail, code=code)
        self.maybe_applied = maybe_applied


class OutOfCredits(ProviderError, PermanentError):
    """The account has no credit left (HTTP 402 or the provider's own code)."""


class ProviderAuthError(ProviderError, PermanentError):
    """The provider refused our credentials (HTTP 401/403, SMTP 535): fix the config."""


class ProviderRejected(ProviderError, PermanentError):
    """The provider refused this request (another 4xx, SMTP 5xx, a failed recipient).

    Also raised before any call for a request the provider would refuse anyway (an empty
    batch, a header with a line break), with ``status`` None.
    """
