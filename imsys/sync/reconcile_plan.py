"""What reconciliation would do on one router, decided from what was read: no I/O.

The I/O around it (one print per login menu, one database query) is ``reconcile``'s.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from imsys.routeros import is_true
from imsys.routeros.menus import LOGIN_BY_SERVICE
from imsys.sync.desired import Desired, Plan, parse_marker, password_digest, plan

# Commands of held changes kept on the router row (the ids are always kept in full).
HELD_SHOWN = 50

# The fields of a login entry reconciliation reads: what ``desired.plan`` compares (name,
# password, profile, disabled), the marker (comment) and the `.id` the fix addresses, and
# the name an unmanaged twin blocks. A whole entry is twice as many words, each of them
# read, parsed and thrown away for 10,000 entries. ``profile`` also tells which profiles
# logins still use (profile alignment). A router whose API user lacks the `sensitive`
# policy leaves `password` out whether asked for or not.
LOGIN_PROPLIST: Final = (".id", "name", "password", "profile", "disabled", "comment")

Entry = dict[str, str]


@dataclass(slots=True)
class Known:
    """A subscriber of the router as reconciliation needs it (``reconcile.load_known``)."""

    id: int
    desired: Desired
    sync_status: str
    kick_required: bool
    # Blocked by an unmanaged twin at its current version (``repo.mark_blocked``).
    blocked: bool


@dataclass
class RouterPlan:
    """What reconciliation would do on one router."""

    router_id: int
    managed_entries: int
    subscribers: int
    drifted: list[tuple[int, Plan]] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)
    # Subscribers with a change of their own on its way (sync_status 'pending'): their
    # job carries it out whatever reconciliation decides, so the guard does not count it.
    intended: set[int] = field(default_factory=set)
    orphans: list[tuple[str, str, str]] = field(default_factory=list)  # (menu, id, name)
    # Subscribers an unmanaged twin still blocks: left alone until they change or the
    # router is adopted (``sync.adopt``).
    blocked: list[int] = field(default_factory=list)
    guard: str | None = None

    def cuts(self) -> list[tuple[int, Plan]]:
        """The drift that would cut a subscriber off, not counting those with a change of
        their own on its way (the guard's business)."""
        return [(sid, p) for sid, p in self.drifted if p.disables and sid not in self.intended]

    def cutting(self) -> int:
        return len(self.cuts()) + len(self.orphans)

    def held(self) -> dict[str, Any]:
        """What a tripped guard holds: the disconnections only (ids in full, commands of
        the first HELD_SHOWN, enough for an operator to judge)."""
        cuts = self.cuts()
        return {
            "reason": self.guard,
            "would_disconnect": self.cutting(),
            "subscribers": max(self.subscribers, self.managed_entries),
            "subscriber_ids": [sid for sid, _ in cuts],
            "changes": [
                {"subscriber_id": sid, "commands": p.describe()} for sid, p in cuts[:HELD_SHOWN]
            ],
            "remove_unknown": [
                {"menu": m, "id": i, "name": n} for m, i, n in self.orphans[:HELD_SHOWN]
            ],
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "router_id": self.router_id,
            "subscribers": self.subscribers,
            "managed_entries": self.managed_entries,
            "changes": [
                {"subscriber_id": sid, "commands": p.describe()} for sid, p in self.drifted
            ],
            "pending_syncs": self.pending,
            "blocked": self.blocked,
            "remove_unknown": [{"menu": m, "id": i, "name": n} for m, i, n in self.orphans],
            "would_disconnect": self.cutting(),
            "guard": self.guard,
        }


def guard_verdict(
    min_count: int, *, cutting: int, total: int, share: float, overridden: bool
) -> str | None:
    """Why the guard stops this change, or None when it may go ahead."""
    if overridden or cutting <= min_count:
        return None
    if cutting > share * max(total, 1):
        return (
            f"would cut off {cutting} of {total} subscribers "
            f"(over {share:.0%}); an operator must confirm"
        )
    return None


def profiles_in_use(menus: Mapping[str, list[Entry]]) -> dict[str, set[str]]:
    """The profiles the login entries name, by login menu (what profile alignment must not
    remove), from the same reads reconciliation diffs."""
    return {menu: {e.get("profile", "") for e in entries} for menu, entries in menus.items()}


def in_line(desired: Desired, entry: Entry) -> bool:
    """Whether ``entry``, the present subscriber's only managed entry and in the menu of its
    service, is as ``desired`` wants it: exactly when ``desired.plan`` finds nothing to do
    (a test holds the two together), without building a plan for each of 10,000 entries
    in line. A password the router does not print is decided by the digest of the one last
    written, as ``plan`` decides it."""
    if entry.get("name", "") != desired.username or entry.get("profile", "") != desired.profile:
        return False
    if "password" in entry:
        if entry["password"] != desired.password:
            return False
    elif desired.written_password != password_digest(desired.subscriber_id, desired.password):
        return False
    return is_true(entry.get("disabled", "false")) == desired.disabled


def diff(
    router_id: int, tag: str, subs: Iterable[Known], menus: Mapping[str, list[Entry]]
) -> RouterPlan:
    """Diff every subscriber of the router against the login entries read, menu by menu.

    Entries without imsys's marker are never touched; a marked entry whose subscriber the
    database does not know is an orphan, to remove. The guard's verdict is the caller's.
    """
    by_id = {s.id: s for s in subs}
    found: dict[int, list[tuple[str, Entry]]] = {}
    unmanaged: set[tuple[str, str]] = set()
    result = RouterPlan(router_id, 0, sum(1 for s in by_id.values() if s.desired.present))
    for menu, entries in menus.items():
        for entry in entries:
            sid = parse_marker(tag, entry.get("comment"))
            if sid is None:
                unmanaged.add((menu, entry.get("name", "")))  # not ours: never touched
                continue
            result.managed_entries += 1
            if sid not in by_id:
                result.orphans.append((menu, entry[".id"], entry.get("name", "")))
            else:
                found.setdefault(sid, []).append((menu, entry))
    for sid, sub in by_id.items():
        want = sub.desired
        if sub.blocked and (want.menu(), want.username) in unmanaged:
            result.blocked.append(sid)  # nothing changed since its sync said so
            continue
        if sub.sync_status in ("pending", "syncing", "retrying"):
            result.intended.add(sid)
        mine = found.get(sid, [])
        if not (
            want.present
            and len(mine) == 1
            and mine[0][0] == want.menu()
            and in_line(want, mine[0][1])
        ):
            managed: dict[str, list[Entry]] = {m: [] for m in LOGIN_BY_SERVICE.values()}
            for menu, entry in mine:
                managed[menu].append(entry)
            p = plan(want, managed, tag)
            if not p.empty:
                result.drifted.append((sid, p))
                continue
        if sub.sync_status != "synced" or sub.kick_required:
            result.pending.append(sid)
    return result
