"""The kick check against CPEs that come back at once (the simulator's redial fault).

A kicked session is checked by its `.id`: the subscriber's fresh session (a new `.id`)
already has the new state, so the change succeeded; only the kicked session itself still
being there is `SessionSurvived`.
"""

from __future__ import annotations

from tests.sync_support import Stack


async def kicks(stack: Stack, correlation: str, menu: str) -> list[str]:
    rows = await stack.db.fetch(
        "SELECT outcome FROM audit_log WHERE correlation_id = $1 AND action = $2",
        correlation,
        f"remove {menu}",
    )
    return [r["outcome"] for r in rows]


async def test_ppp_redial_package_change_and_suspension_succeed(stack: Stack) -> None:
    """With redial on, a PPP package change kicks once and is synced (the redialled
    session has a new id); suspension then ends the session for good."""
    stack.sim.redial = True
    sid = await stack.add_subscriber("rita")
    await stack.settle()
    first = stack.sim.connect_session("rita")
    await stack.patch(sid, "test:redial:package", package_id=stack.premium)
    await stack.settle()
    assert stack.secrets()["rita"]["profile"] == "premium"
    [again] = stack.sim.find("/ppp/active", name="rita")
    assert again[".id"] != first
    assert await kicks(stack, "test:redial:package", "/ppp/active") == ["ok"]
    row = await stack.subscriber(sid)
    assert (row["sync_status"], row["sync_error"]) == ("synced", None)

    await stack.patch(sid, "test:redial:suspend", is_suspended=True)
    await stack.settle()
    assert stack.secrets()["rita"]["disabled"] == "true"
    assert stack.sim.find("/ppp/active", name="rita") == []  # a disabled secret cannot redial
    assert await kicks(stack, "test:redial:suspend", "/ppp/active") == ["ok"]
    assert (await stack.subscriber(sid))["sync_status"] == "synced"
    assert await stack.engine.dead_letters.list() == []


async def test_hotspot_relogin_package_change_and_suspension_succeed(stack: Stack) -> None:
    """With redial on, a hotspot client logs in again after the kick: the package change
    is synced with one kick; suspension then ends the session for good."""
    stack.sim.redial = True
    sid = await stack.add_subscriber("hana", service="hotspot")
    await stack.settle()
    first = stack.sim.login_hotspot("hana")
    await stack.patch(sid, "test:relogin:package", package_id=stack.premium)
    await stack.settle()
    [user] = stack.sim.find("/ip/hotspot/user", name="hana")
    assert user["profile"] == "premium"
    [again] = stack.sim.find("/ip/hotspot/active", user="hana")
    assert again[".id"] != first
    assert await kicks(stack, "test:relogin:package", "/ip/hotspot/active") == ["ok"]
    row = await stack.subscriber(sid)
    assert (row["sync_status"], row["sync_error"]) == ("synced", None)

    await stack.patch(sid, "test:relogin:suspend", is_suspended=True)
    await stack.settle()
    assert stack.sim.find("/ip/hotspot/active", user="hana") == []
    assert await kicks(stack, "test:relogin:suspend", "/ip/hotspot/active") == ["ok"]
    assert (await stack.subscriber(sid))["sync_status"] == "synced"
    assert await stack.engine.dead_letters.list() == []


async def test_the_kicked_session_itself_surviving_is_still_an_error(stack: Stack) -> None:
    """Redial does not hide a remove that did nothing: the same `.id` still active is
    SessionSurvived."""
    stack.sim.redial = True
    sid = await stack.add_subscriber("sam")
    await stack.settle()
    stack.sim.connect_session("sam")
    stack.sim.sessions_survive_remove = True
    await stack.patch(sid, package_id=stack.premium)
    await stack.relay.relay_once()
    await stack.engine.consumers["sync"].process_once(block_ms=10)
    row = await stack.subscriber(sid)
    assert row["sync_status"] == "retrying"  # an error that another attempt may clear
    assert "still active after the kick" in row["sync_error"]
