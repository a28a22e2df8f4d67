"""The adapter's errors: librouteros's exceptions and the router's traps, translated.

Handlers and the engine see only these. Every message names the router (id and
host:port) and the command; none carries a password or a value that was sent.
"""

from __future__ import annotations

from imsys.errors import ImsysError, PermanentError, RetryableError


class RouterError(ImsysError):
    """Any failure reported by the RouterOS adapter (a marker: catch all of them at once)."""


class RouterUnavailable(RouterError, RetryableError):
    """The router could not be reached or the connection broke: refused, timed out,
    closed, reset, `!fatal`, or the router spoke something that is not the API.

    ``maybe_applied`` is True when the connection broke after a write command had been
    sent: the router may have applied it. Read the router before deciding what to do.
    """

    def __init__(
        self,
        message: str,
        *,
        router_id: int | None = None,
        maybe_applied: bool = False,
        defer: float | None = None,
    ) -> None:
        super().__init__(message, defer=defer)
        self.router_id = router_id
        self.maybe_applied = maybe_applied


class RouterAuthError(RouterError, PermanentError):
    """The router refused the login (bad user name or password)."""

    def __init__(self, message: str, *, router_id: int | None = None) -> None:
        super().__init__(message)
        self.router_id = router_id


class RouterTLSError(RouterAuthError):
    """The router's TLS certificate is not the one trusted (pin, CA), or the router
    offers no certificate at all. Like a wrong password: the settings must change."""


class RouterInputError(RouterError, PermanentError):
    """A value we were asked to send cannot be sent (e.g. it is not ASCII); nothing was sent."""


class RouterTrap(RouterError, PermanentError):
    """The router refused a command with `!trap`. ``message`` is the router's own text."""

    def __init__(
        self,
        message: str,
        *,
        router_id: int | None = None,
        command: str | None = None,
        category: int | None = None,
        context: str = "",
    ) -> None:
        super().__init__(f"{context}: {message}" if context else message)
        self.message = message
        self.router_id = router_id
        self.command = command
        self.category = category


class AlreadyExists(RouterTrap):
    """An item with that name (key) is already there."""


class NoSuchItem(RouterTrap):
    """The `.id` (or name) names no item."""


class InvalidValue(RouterTrap):
    """A value names nothing the router knows (e.g. a profile that does not exist)."""


# Substrings of RouterOS trap texts, seen in the field (see NOTES.md), in lower case.
_TRAP_CLASSES: tuple[tuple[tuple[str, ...], type[RouterTrap]], ...] = (
    (("already exists", "already have"), AlreadyExists),
    (("no such item",), NoSuchItem),
    (("input does not match any value",), InvalidValue),
)


def trap_class(message: str) -> type[RouterTrap]:
    """The most specific RouterTrap subclass for a trap text."""
    lowered = message.lower()
    for needles, cls in _TRAP_CLASSES:
        if any(needle in lowered for needle in needles):
            return cls
    return RouterTrap
