"""The error classes handlers raise and the engine classifies.

Third-party exceptions are translated into these at the adapters, so the engine and
the handlers only ever see ours.
"""

from __future__ import annotations


class ImsysError(Exception):
    """Base of every error imsys raises on purpose."""


class RetryableError(ImsysError):
    """A failure that may pass: timeout, refused connection, 5xx, 429.

    ``defer`` (seconds) overrides the stream's backoff for this one retry.
    """

    def __init__(self, message: str, *, defer: float | None = None) -> None:
        super().__init__(message)
        self.defer = defer


class PermanentError(ImsysError):
    """A failure that retrying cannot fix: validation, 4xx, unknown type."""


class InvalidJob(PermanentError):
    """The stream entry itself is malformed (missing field, bad JSON, bad payload)."""


class UnknownJobType(PermanentError):
    """No handler is registered for the entry's ``type``."""


class Expired(PermanentError):
    """The job's own deadline has passed; doing it now would be wrong."""


class Deferred(ImsysError):
    """Run this job again later without spending an attempt.

    Raised when the job could not even start through no fault of its own: its router is
    known to be down (circuit open), its concurrency key is saturated, its channel is
    stopped.
    """

    def __init__(self, reason: str, *, delay: float) -> None:
        super().__init__(reason)
        self.delay = delay


class Unavailable(Deferred):
    """A backing service (PostgreSQL, Redis) does not answer: not the job's fault.

    The job waits and runs again without spending an attempt, however long the outage.
    """


class FencedOut(ImsysError):
    """This delivery of the job is no longer the current one.

    Another process claimed the job while this one stalled (a freeze, a long GC, a
    SIGSTOP). The stale run must stop before its next side effect; the engine settles
    nothing for it (the entry belongs to the other process now).
    """


class ConfigError(ImsysError):
    """The configuration cannot work; raised at start-up."""
