"""Errors a request to change or read the network model can get (and the domains reuse).

The admin API turns each into its status in one place (`imsys.http.common`): `NotFound`
404, `Conflict` 409, `Invalid` 400.
"""

from __future__ import annotations


class NotFound(Exception):
    """The thing named does not exist (the message names it: ``subscriber 7``)."""


class Conflict(Exception):
    """The change collides with what exists (a name or a reference already taken)."""


class Invalid(Exception):
    """The request is well-formed but cannot be done (a missing reference, nothing to do)."""
