"""Bouncer verification results for the simulator: a pure function of the address and rules.

Tests predict results by calling `verify` (or `BouncerSimulator.result_for`) with the same
rules, so nothing here may depend on time, order or chance.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

RESULT_STATUSES: Final = ("deliverable", "risky", "undeliverable", "unknown")


@dataclass(frozen=True, slots=True)
class Rule:
    """A decision for the addresses it matches; a field left ``None`` keeps earlier decisions.

    The match fields (``email``, ``domain``, ``local``, ``local_prefix``) are all required to
    match; a rule without any matches every address. Comparison is case-insensitive.
    """

    email: str | None = None
    domain: str | None = None
    local: str | None = None
    local_prefix: str | None = None
    status: str | None = None
    reason: str | None = None
    accept_all: bool | None = None
    disposable: bool | None = None
    free: bool | None = None
    role: bool | None = None
    disabled: bool | None = None
    full_mailbox: bool | None = None

    def matches(self, email: str, local: str, domain: str) -> bool:
        return (
            (self.email is None or self.email.lower() == email)
            and (self.domain is None or self.domain.lower() == domain)
            and (self.local is None or self.local.lower() == local)
            and (self.local_prefix is None or local.startswith(self.local_prefix.lower()))
        )


_DECISIONS: Final = (
    "status", "reason", "accept_all", "disposable", "free", "role", "disabled", "full_mailbox"
)
_FREE_DOMAINS: Final = ("gmail.com", "yahoo.com", "outlook.com", "hotmail.com", "icloud.com")
_DISPOSABLE_DOMAINS: Final = ("mailinator.com", "10minutemail.com", "disposable.test")
_ROLE_LOCALS: Final = ("admin", "info", "support", "sales", "billing", "noc", "postmaster")

# Built in, in this order; rules added with `add_rule` come after and so win. The status
# prefixes copy the vendor's sandbox (deliverable@sandbox.usebouncer.com and friends).
BUILTIN_RULES: Final[tuple[Rule, ...]] = (
    *(Rule(domain=d, free=True) for d in _FREE_DOMAINS),
    *(Rule(local=r, role=True) for r in _ROLE_LOCALS),
    *(Rule(domain=d, disposable=True, status="risky", reason="low_quality")
      for d in _DISPOSABLE_DOMAINS),
    Rule(domain="catchall.test", accept_all=True, status="risky", reason="low_deliverability"),
    Rule(local_prefix="deliverable", status="deliverable", reason="accepted_email"),
    Rule(local_prefix="risky", status="risky", reason="low_quality"),
    Rule(local_prefix="undeliverable", status="undeliverable", reason="rejected_email"),
    Rule(local_prefix="unknown", status="unknown", reason="unavailable_smtp"),
    Rule(local_prefix="bad", status="undeliverable", reason="rejected_email"),
)
_DEFAULT_REASON: Final = {
    "deliverable": "accepted_email",
    "risky": "low_quality",
    "undeliverable": "rejected_email",
    "unknown": "timeout",
}
_PROVIDERS: Final = {"gmail.com": "google.com", "outlook.com": "outlook.com",
                     "hotmail.com": "outlook.com"}


@dataclass(slots=True)
class _Decision:
    status: str
    reason: str
    accept_all: bool = False
    disposable: bool = False
    free: bool = False
    role: bool = False
    disabled: bool = False
    full_mailbox: bool = False


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def verify(email: str, name: str | None, rules: Sequence[Rule],
           default_status: str | None = None) -> dict[str, Any]:
    """The result record Bouncer would give for ``email`` under ``rules``."""
    key = email.strip().lower()
    local, at, domain = key.rpartition("@")
    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    valid = bool(at and local and "." in domain.strip("."))
    if not valid:
        decision = _Decision("undeliverable", "invalid_email")
    else:
        if default_status is not None:
            status = default_status
        else:
            # A fixed spread, roughly what a real list looks like.
            bucket = digest % 100
            status = ("deliverable" if bucket < 70 else "risky" if bucket < 80
                      else "undeliverable" if bucket < 92 else "unknown")
        decision = _Decision(status, _DEFAULT_REASON[status])
        for rule in rules:
            if rule.matches(key, local, domain):
                for field_name in _DECISIONS:
                    value = getattr(rule, field_name)
                    if value is not None:
                        setattr(decision, field_name, value)
    score = {"deliverable": 80 + digest % 21, "risky": 40 + digest % 31,
             "unknown": digest % 31}.get(decision.status, 0)
    record: dict[str, Any] = {"email": email}
    if name is not None:
        record["name"] = name
    record |= {
        "status": decision.status,
        "reason": decision.reason,
        "domain": {
            "name": domain,
            "acceptAll": _yes_no(decision.accept_all),
            "disposable": _yes_no(decision.disposable),
            "free": _yes_no(decision.free),
        },
        "account": {
            "role": _yes_no(decision.role),
            "disabled": _yes_no(decision.disabled),
            "fullMailbox": _yes_no(decision.full_mailbox),
        },
        "dns": {"type": "MX", "record": f"mx1.{domain}."} if valid else {},
        "provider": _PROVIDERS.get(domain, domain),
        "score": score,
        "toxic": "unknown",
        "toxicity": 0,
    }
    return record


def unverified(email: str, name: str | None) -> dict[str, Any]:
    """The record for an address left unverified when a batch was finished early."""
    record = verify(email, name, ())
    record.update(status="unknown", reason="unknown", score=0)
    return record
