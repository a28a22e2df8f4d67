"""Plan: one subscriber's differences as a list of per-menu changes (pure, no I/O)."""

from __future__ import annotations

from imsys.routeros.menus import HOTSPOT_USER, PPP_SECRET
from imsys.sync.desired import Desired, MenuChange, Plan, marker, password_digest, plan

TAG = "imsys"


def desired(**kw: object) -> Desired:
    base: dict[str, object] = {
        "subscriber_id": 7,
        "username": "alice",
        "password": "pw",
        "service": "pppoe",
        "profile": "basic",
        "disabled": False,
        "present": True,
    }
    return Desired(**{**base, **kw})  # type: ignore[arg-type]


def test_service_move_removes_old_menu_and_adds_new() -> None:
    """Moving pppoe → hotspot plans a remove in one menu and an add in the other."""
    old = {".id": "*1", "name": "alice", "comment": marker(TAG, 7)}
    p = plan(desired(service="hotspot"), {PPP_SECRET: [old], HOTSPOT_USER: []}, TAG)
    assert [(c.menu, c.add is not None, c.remove) for c in p.changes if not c.empty] == [
        (PPP_SECRET, False, ["*1"]),
        (HOTSPOT_USER, True, []),
    ]
    assert [(d["action"], d["menu"]) for d in p.describe()] == [
        ("add", HOTSPOT_USER),
        ("remove", PPP_SECRET),
    ]
    assert p.disables
    assert not p.empty


def test_describe_masks_passwords_and_orders_add_set_remove() -> None:
    """describe lists adds, then sets, then removes, with every password masked."""
    p = Plan(
        1,
        [
            MenuChange("/b", remove=["*9"]),
            MenuChange("/a", set={"password": "x", "profile": "p"}, set_id="*2"),
            MenuChange("/c", add={"name": "n", "password": "y"}),
        ],
    )
    assert p.describe() == [
        {"action": "add", "menu": "/c", "fields": {"name": "n", "password": "***"}},
        {"action": "set", "menu": "/a", "id": "*2", "fields": {"password": "***", "profile": "p"}},
        {"action": "remove", "menu": "/b", "id": "*9"},
    ]


def in_line_entry() -> dict[str, str]:
    """Subscriber 7's managed secret, exactly as ``desired()`` wants it."""
    return {
        ".id": "*1",
        "name": "alice",
        "password": "pw",
        "profile": "basic",
        "disabled": "false",
        "comment": marker(TAG, 7),
    }


def test_in_line_entry_gives_an_empty_plan() -> None:
    """An entry that already matches plans nothing and disables nobody."""
    entry = in_line_entry()
    p = plan(desired(), {PPP_SECRET: [entry], HOTSPOT_USER: []}, TAG)
    assert p.empty
    assert not p.disables
    assert p.describe() == []


def test_suspension_sets_disabled_and_counts_as_disabling() -> None:
    """A suspended subscriber's entry is set disabled, which the guard counts."""
    entry = in_line_entry()
    p = plan(desired(disabled=True), {PPP_SECRET: [entry], HOTSPOT_USER: []}, TAG)
    assert p.describe() == [
        {"action": "set", "menu": PPP_SECRET, "id": "*1", "fields": {"disabled": "yes"}}
    ]
    assert p.disables


# -- passwords an API user without the `sensitive` policy cannot see ----------------------

HIDDEN = {
    ".id": "*1",
    "name": "alice",
    "profile": "basic",
    "disabled": "false",
    "comment": marker(TAG, 7),
}


def test_hidden_password_last_written_is_not_written_again() -> None:
    """No printed password and the digest of the desired one on record: nothing to do."""
    p = plan(desired(written_password=password_digest(7, "pw")), {PPP_SECRET: [HIDDEN]}, TAG)
    assert p.empty
    assert not p.writes_password
    assert p.password_digest is None


def test_hidden_password_changed_or_unknown_is_written_and_recorded() -> None:
    """A missing field is not a difference; a changed (or unrecorded) password is."""
    for written in (password_digest(7, "old"), None):
        p = plan(desired(written_password=written), {PPP_SECRET: [HIDDEN]}, TAG)
        assert p.describe() == [
            {"action": "set", "menu": PPP_SECRET, "id": "*1", "fields": {"password": "***"}}
        ]
        assert p.writes_password
        assert p.password_digest == password_digest(7, "pw")


def test_printed_password_is_compared_and_refreshes_the_record() -> None:
    """A printed password decides as before; an equal one refreshes a stale digest."""
    shown = {**HIDDEN, "password": "pw"}
    p = plan(desired(written_password=password_digest(7, "old")), {PPP_SECRET: [shown]}, TAG)
    assert p.empty
    assert p.password_digest == password_digest(7, "pw")
    hand = {**HIDDEN, "password": "changed-by-hand"}
    p = plan(desired(written_password=password_digest(7, "pw")), {PPP_SECRET: [hand]}, TAG)
    assert p.writes_password


def test_new_entry_records_the_password_and_digest_is_salted() -> None:
    """An add sends the password and records its digest; the digest hides the password
    and differs between subscribers with the same password."""
    p = plan(desired(), {PPP_SECRET: []}, TAG)
    assert p.writes_password
    assert p.password_digest == password_digest(7, "pw")
    assert "pw" not in password_digest(7, "pw")
    assert password_digest(7, "pw") != password_digest(8, "pw")
