"""What a subscriber's router entry should be, and how an entry differs from it.

Pure functions: no I/O. Values are compared as the strings the router prints.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from imsys.routeros import is_true
from imsys.routeros.menus import BUILTIN_PROFILE, LOGIN_BY_SERVICE


def marker(tag: str, subscriber_id: int) -> str:
    """The comment that marks an entry as imsys's, naming its subscriber."""
    return f"{tag}:sub={subscriber_id}"


def parse_marker(tag: str, comment: str | None) -> int | None:
    """The subscriber id of a managed entry, or None for an entry imsys does not manage."""
    if not comment or not comment.startswith(f"{tag}:sub="):
        return None
    try:
        return int(comment[len(tag) + 5 :])
    except ValueError:
        return None


def profile_marker(tag: str) -> str:
    """The comment that marks a profile as imsys's: one made for a package of the tenant.

    Not per package: two packages may share a profile (and then share its rate)."""
    return f"{tag}:profile"


@dataclass(frozen=True, slots=True)
class Desired:
    """One subscriber's intent, as the database holds it."""

    subscriber_id: int
    username: str
    password: str
    service: str  # pppoe | hotspot
    profile: str
    disabled: bool  # suspended or deleted
    present: bool  # False once the subscriber is deleted
    # `password_digest` of the password last written to the router entry; None: unknown.
    written_password: str | None = None

    def menu(self) -> str:
        return LOGIN_BY_SERVICE[self.service]

    def fields(self, tag: str) -> dict[str, str]:
        out = {
            "name": self.username,
            "password": self.password,
            "profile": self.profile,
            "disabled": "yes" if self.disabled else "no",
            "comment": marker(tag, self.subscriber_id),
        }
        if self.service == "pppoe":
            out["service"] = "pppoe"
        return out


@dataclass(slots=True)
class MenuChange:
    """The commands for one menu: add an entry, set fields of one, remove some."""

    menu: str
    add: dict[str, str] | None = None
    set: dict[str, str] = field(default_factory=dict)
    set_id: str | None = None
    remove: list[str] = field(default_factory=list)  # .id

    @property
    def empty(self) -> bool:
        return self.add is None and not self.set and not self.remove

    @property
    def disables(self) -> bool:
        return bool(self.remove) or self.set.get("disabled") == "yes"


@dataclass(slots=True)
class Plan:
    """The router commands that would bring one subscriber in line, menu by menu."""

    subscriber_id: int
    changes: list[MenuChange] = field(default_factory=list)
    # To record as the subscriber's `written_password` once the plan is applied (the
    # entry then holds the desired password); None: the record stays as it is.
    password_digest: str | None = None

    def change(self, menu: str) -> MenuChange:
        """The change to ``menu``, added (empty) when the plan has none yet."""
        for c in self.changes:
            if c.menu == menu:
                return c
        c = MenuChange(menu)
        self.changes.append(c)
        return c

    @property
    def empty(self) -> bool:
        return all(c.empty for c in self.changes)

    @property
    def writes_password(self) -> bool:
        """Whether a command of the plan sends the password."""
        return any(
            "password" in c.set or (c.add is not None and "password" in c.add) for c in self.changes
        )

    @property
    def disables(self) -> bool:
        """Whether the plan cuts the subscriber off (used by the mass-disconnect guard)."""
        return any(c.disables for c in self.changes)

    def describe(self) -> list[dict[str, Any]]:
        """The plan as data for the dry run and the audit log (no passwords): the adds,
        the sets, then the removes."""
        adds = [
            {"action": "add", "menu": c.menu, "fields": public_fields(c.add)}
            for c in self.changes
            if c.add is not None
        ]
        sets = [
            {"action": "set", "menu": c.menu, "id": c.set_id, "fields": public_fields(c.set)}
            for c in self.changes
            if c.set
        ]
        removes = [
            {"action": "remove", "menu": c.menu, "id": i} for c in self.changes for i in c.remove
        ]
        out: list[dict[str, Any]] = [*adds, *sets, *removes]
        return out


def password_digest(subscriber_id: int, password: str) -> str:
    """What imsys keeps of a password it wrote to a router entry: enough to tell whether
    the desired one changed, salted by the subscriber so equal passwords differ."""
    return hashlib.sha256(f"imsys-router-password:{subscriber_id}:{password}".encode()).hexdigest()


def public_fields(fields: dict[str, str]) -> dict[str, str]:
    """``fields`` fit for the audit log and the dry run: the password masked."""
    return {k: ("***" if k == "password" else v) for k, v in fields.items()}


def plan(desired: Desired, managed: dict[str, list[dict[str, str]]], tag: str) -> Plan:
    """Diff ``desired`` against the managed entries found for it, per menu."""
    p = Plan(desired.subscriber_id)
    want = desired.fields(tag)
    for menu, entries in managed.items():
        keep = desired.present and menu == desired.menu()
        for i, entry in enumerate(entries):
            # A second managed entry for one subscriber (a hand copy) goes too.
            if not keep or i > 0:
                p.change(menu).remove.append(entry[".id"])
    current = managed.get(desired.menu(), [])
    if not desired.present:
        return p
    login = p.change(desired.menu())
    digest = password_digest(desired.subscriber_id, desired.password)
    if not current:
        login.add = want
        p.password_digest = digest
        return p
    entry = current[0]
    login.set_id = entry[".id"]
    for key in ("name", "profile"):
        if str(entry.get(key, "")) != want[key]:
            login.set[key] = want[key]
    # An API user without the `sensitive` policy is not shown passwords: then the digest
    # of the one last written decides; a missing field never means "differs".
    if "password" in entry:
        if entry["password"] != want["password"]:
            login.set["password"] = want["password"]
    elif desired.written_password != digest:
        login.set["password"] = want["password"]
    if desired.written_password != digest and ("password" in login.set or "password" in entry):
        p.password_digest = digest
    if is_true(entry.get("disabled", "false")) != desired.disabled:
        login.set["disabled"] = want["disabled"]
    return p


def plan_profile(
    menu: str, name: str, rate_limit: str | None, found: list[dict[str, str]], tag: str
) -> MenuChange:
    """The change that makes profile ``name`` in ``menu`` carry the package's rate.

    ``found`` is the menu's entries with that name. Missing: add it, tagged. Tagged with
    another rate: set it. A profile imsys did not make (untagged, or the built-in
    ``default``) is used as it is and never changed: adoption takes it over, not a sync.
    A package without a rate leaves the profile's rate alone.
    """
    change = MenuChange(menu)
    if name == BUILTIN_PROFILE:
        return change
    if not found:
        change.add = {"name": name, "comment": profile_marker(tag)}
        if rate_limit:
            change.add["rate-limit"] = rate_limit
        return change
    entry = found[0]
    if entry.get("comment") != profile_marker(tag):
        return change
    if rate_limit and str(entry.get("rate-limit", "")) != rate_limit:
        change.set_id = entry[".id"]
        change.set["rate-limit"] = rate_limit
    return change


def orphan_profiles(
    entries: list[dict[str, str]], wanted: set[str], used: set[str], tag: str
) -> list[tuple[str, str]]:
    """(.id, name) of the tagged profiles no package wants and no login on the router uses.

    Never the built-in ``default``, never an untagged profile, never one still in use."""
    return [
        (e[".id"], e.get("name", ""))
        for e in entries
        if e.get("comment") == profile_marker(tag)
        and e.get("name") != BUILTIN_PROFILE
        and e.get("name") not in wanted
        and e.get("name") not in used
    ]


_UPTIME_PART = re.compile(r"(\d+)(ms|us|w|d|h|m|s)")
_UPTIME_CLOCK = re.compile(r"(?:(\d+)d\s*)?(\d+):(\d{2}):(\d{2})")
_UNIT_S = {"w": 604_800.0, "d": 86_400.0, "h": 3_600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}

# Two uptime readings are taken a few router calls away from the time the database stamps
# them; a boot that moved later than this is a restart, not measurement noise.
RESTART_SLACK_S = 60.0


def uptime_seconds(text: str | None) -> float | None:
    """A RouterOS uptime (``1w2d3h4m5s``, or ``1d02:03:04`` on old releases) in seconds.

    None when it is missing or not in either form: no decision is taken on a guess.
    """
    if not text:
        return None
    text = text.strip()
    if clock := _UPTIME_CLOCK.fullmatch(text):
        days, hours, minutes, seconds = (int(g or 0) for g in clock.groups())
        return days * 86_400.0 + hours * 3_600.0 + minutes * 60.0 + seconds
    parts = _UPTIME_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(int(n) * _UNIT_S[u] for n, u in parts)


def restarted(before: str | None, after: str | None, elapsed_s: float | None) -> bool:
    """Whether the router booted again between an uptime reading ``before`` and ``after``.

    ``elapsed_s`` is the time between the two readings as the database saw it (it may
    be less, never more, than the truth). Uptime going backwards is a restart; so is an
    uptime that grew by much less than the time that passed (the router came back up and
    ran a while before this reading).
    """
    old, new = uptime_seconds(before), uptime_seconds(after)
    if old is None or new is None:
        return False
    if new < old:
        return True
    return elapsed_s is not None and new + RESTART_SLACK_S < old + elapsed_s
