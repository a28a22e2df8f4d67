"""E-mail addresses: normalising, validating, and the canonical form results are stored under.

The canonical form is what ``emails_global`` holds: lower case, without a plus-tag, and for
Gmail without dots in the local part (``J.Doe+news@Gmail.com`` → ``jdoe@gmail.com``), so one
mailbox submitted in several spellings is verified and stored once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

MAX_LENGTH: Final = 254
MAX_LOCAL: Final = 64
# Gmail ignores dots in the local part; googlemail.com is the same service.
DOTLESS_DOMAINS: Final = frozenset({"gmail.com", "googlemail.com"})
# How many bad addresses an error message names.
SHOWN_INVALID: Final = 5

_ATOM = r"[a-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
# ASCII addresses only (dot-atom local part, host name with a TLD): what Bouncer verifies.
_ADDRESS = re.compile(rf"{_ATOM}(?:\.{_ATOM})*@(?:{_LABEL}\.)+[a-z](?:[a-z0-9-]{{0,61}}[a-z0-9])")


def normalise(email: str) -> str:
    """Trimmed and lower-cased: two spellings of one address compare equal."""
    return email.strip().lower()


def is_valid(address: str) -> bool:
    """``address`` (already normalised) is a plausible mailbox address."""
    if len(address) > MAX_LENGTH or address.find("@") > MAX_LOCAL:
        return False
    return _ADDRESS.fullmatch(address) is not None


def canonical(address: str) -> str:
    """The mailbox ``address`` (normalised) delivers to, modifiers stripped."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address
    base = local.split("+", 1)[0]
    if domain in DOTLESS_DOMAINS:
        base = base.replace(".", "")
    # "+tag@x" or ".@gmail.com" have no mailbox left once stripped: keep them as they are.
    return f"{base}@{domain}" if base else address


@dataclass(slots=True)
class Prepared:
    """A user batch's addresses ready to store: one per mailbox, in submitted order."""

    emails: list[str] = field(default_factory=list)
    canonicals: list[str] = field(default_factory=list)
    submitted: int = 0

    @property
    def duplicates(self) -> int:
        return self.submitted - len(self.emails)


class InvalidEmails(ValueError):
    """Some addresses are not addresses; the message names the first few by index."""

    def __init__(self, bad: Sequence[tuple[int, str]], total: int) -> None:
        shown = ", ".join(f"#{i} {text[:80]!r}" for i, text in bad[:SHOWN_INVALID])
        more = f" (and {len(bad) - SHOWN_INVALID} more)" if len(bad) > SHOWN_INVALID else ""
        super().__init__(
            f"{len(bad)} of {total} e-mail addresses are invalid: {shown}{more}"
        )
        self.bad = list(bad)


def prepare(raw: Iterable[str]) -> Prepared:
    """Normalise, validate and de-duplicate (by canonical form, first spelling kept).

    Raises `InvalidEmails` naming the bad ones (index in the submitted list, 0-based).
    """
    out = Prepared()
    seen: set[str] = set()
    bad: list[tuple[int, str]] = []
    for i, text in enumerate(raw):
        out.submitted += 1
        address = normalise(text)
        if not is_valid(address):
            bad.append((i, text))
            continue
        key = canonical(address)
        if key in seen:
            continue
        seen.add(key)
        out.emails.append(address)
        out.canonicals.append(key)
    if bad:
        raise InvalidEmails(bad, out.submitted)
    return out
