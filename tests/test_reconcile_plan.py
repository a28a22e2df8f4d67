"""Reconciliation's diff (pure, no I/O): its shortcut for entries already in line agrees with
``desired.plan`` everywhere, and the whole diff decides what plan() decides, subscriber by
subscriber."""

from __future__ import annotations

import itertools

from imsys.routeros.menus import HOTSPOT_USER, PPP_SECRET
from imsys.sync.desired import Desired, marker, password_digest, plan
from imsys.sync.reconcile_plan import Known, diff, in_line

TAG = "imsys"
MENUS = (PPP_SECRET, HOTSPOT_USER)


def test_in_line_agrees_with_plan_on_every_combination() -> None:
    """For every mix of name, profile, password (shown, hidden, with the digest of the one
    written or another), disabled spelling and service, ``in_line`` says "nothing to do"
    exactly when plan() plans nothing for that single entry."""
    checked = agreed_empty = 0
    for service, disabled, written, name, profile, password, shown in itertools.product(
        ("pppoe", "hotspot"),
        (False, True),
        (None, "same", "other"),
        ("alice", "alicia"),
        ("basic", "premium", None),
        ("pw", "old"),
        ("true", "false", "yes", "no", None),
    ):
        want = Desired(
            7,
            "alice",
            "pw",
            service,
            "basic",
            disabled,
            True,
            None if written is None else password_digest(7, "pw" if written == "same" else "x"),
        )
        for hidden in (False, True):
            entry = {".id": "*1", "name": name, "comment": marker(TAG, 7)}
            if profile is not None:
                entry["profile"] = profile
            if not hidden:
                entry["password"] = password
            if shown is not None:
                entry["disabled"] = shown
            managed = {m: ([entry] if m == want.menu() else []) for m in MENUS}
            empty = plan(want, managed, TAG).empty
            assert in_line(want, entry) == empty, (want, entry)
            checked += 1
            agreed_empty += empty
    assert checked == 2 * 2 * 3 * 2 * 3 * 2 * 5 * 2
    assert agreed_empty > 0  # both answers were exercised


def test_diff_decides_what_plan_decides() -> None:
    """Subscribers in line, drifted, duplicated, in the wrong menu, deleted, missing, with
    a change of their own pending, blocked by an unmanaged twin; an orphan and a foreign
    entry: the diff's drift is plan()'s, subscriber by subscriber."""

    def known(sid: int, status: str = "synced", blocked: bool = False, **kw: object) -> Known:
        base: dict[str, object] = {
            "subscriber_id": sid,
            "username": f"u{sid}",
            "password": f"pw{sid}",
            "service": "pppoe",
            "profile": "basic",
            "disabled": False,
            "present": True,
        }
        want = Desired(**{**base, **kw})  # type: ignore[arg-type]
        return Known(sid, want, status, False, blocked)

    def entry(sid: int, n: int, **fields: str) -> dict[str, str]:
        base = {"name": f"u{sid}", "password": f"pw{sid}", "profile": "basic"}
        return {
            ".id": f"*{n:X}",
            **base,
            "disabled": "false",
            "comment": marker(TAG, sid),
            **fields,
        }

    subs = [
        known(1),
        known(2),
        known(3),
        known(4),
        known(5, service="hotspot"),
        known(6, present=False, disabled=True),
        known(7),
        known(8, status="pending", disabled=True),
        known(9, status="error"),
        known(10, status="error", blocked=True, username="neighbour"),
    ]
    secrets = [
        entry(1, 1),
        entry(2, 2, profile="premium"),
        entry(3, 3),
        entry(3, 4),  # a hand copy
        entry(4, 5, disabled="true"),
        entry(5, 6),  # hotspot subscriber found in the PPP menu
        entry(6, 7),  # deleted subscriber
        entry(8, 8),
        entry(9, 9),
        entry(99, 10),  # no such subscriber
        {".id": "*B", "name": "neighbour", "password": "x", "disabled": "false"},
    ]
    menus = {PPP_SECRET: secrets, HOTSPOT_USER: []}
    result = diff(1, TAG, subs, menus)

    expected = {}
    for sub in subs[:-1]:
        mine = {
            m: [e for e in es if e.get("comment") == marker(TAG, sub.id)] for m, es in menus.items()
        }
        p = plan(sub.desired, mine, TAG)
        if not p.empty:
            expected[sub.id] = p.describe()
    assert {sid: p.describe() for sid, p in result.drifted} == expected
    assert set(expected) == {2, 3, 4, 5, 6, 7, 8}
    assert result.pending == [9]
    assert result.intended == {8}
    assert result.orphans == [(PPP_SECRET, "*A", "u99")]
    assert result.managed_entries == 10
    assert result.subscribers == 9
    assert result.blocked == [10]
