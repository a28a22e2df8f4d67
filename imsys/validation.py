"""pydantic's validation errors as one line a person can act on.

Shared by the admin API (a 400's message), the engine (a dead letter's reason) and the
settings (a start-up error), so a problem reads the same wherever it is found. The value
is never echoed: it may be a secret (a password, an API key).
"""

from __future__ import annotations

import pydantic


def problems(exc: pydantic.ValidationError, *, whole: str, limit: int | None = None) -> list[str]:
    """``where: what`` per error; ``whole`` names an error of the whole object. Past
    ``limit`` errors (a list of a million bad values), the rest is counted, not listed."""
    errors = exc.errors(include_url=False, include_input=False)
    shown = errors if limit is None else errors[:limit]
    found = [f"{'.'.join(str(p) for p in e['loc']) or whole}: {e['msg']}" for e in shown]
    if len(errors) > len(shown):
        found.append(f"... and {len(errors) - len(shown)} more")
    return found


def describe(exc: pydantic.ValidationError, *, whole: str, limit: int | None = None) -> str:
    """The problems as one line, ``; ``-separated."""
    return "; ".join(problems(exc, whole=whole, limit=limit))
