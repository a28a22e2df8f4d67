"""The RouterOS adapter, with the real librouteros client against the RouterOS simulator."""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import AsyncIterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from imsys.errors import FencedOut, PermanentError, RetryableError
from imsys.routeros import (
    AlreadyExists,
    InvalidValue,
    NoSuchItem,
    RouterAuthError,
    RouterInputError,
    RouterPool,
    RouterTarget,
    RouterTrap,
    RouterUnavailable,
    is_true,
    parse_uptime,
)
from imsys.sim.routeros import RouterOSSimulator
from imsys.sim.routeros_tls import self_signed

USER = "admin"
PASSWORD = "s3cret-pw"
ID = re.compile(r"^\*[0-9A-F]+$")


@pytest.fixture
async def sim() -> AsyncIterator[RouterOSSimulator]:
    simulator = RouterOSSimulator(username=USER, password=PASSWORD)
    simulator.add_item("/ppp/profile", name="10M", rate_limit="10M/10M")
    simulator.add_item("/ip/hotspot/user/profile", name="1h")
    await simulator.start()
    yield simulator
    await simulator.stop()


@pytest.fixture
async def pool() -> AsyncIterator[RouterPool]:
    routers = RouterPool()
    yield routers
    await routers.close()


def target_for(sim: RouterOSSimulator, **overrides: Any) -> RouterTarget:
    fields: dict[str, Any] = {
        "router_id": 7,
        "host": "127.0.0.1",
        "port": sim.port,
        "username": USER,
        "password": PASSWORD,
        "timeout": 2.0,
    }
    fields.update(overrides)
    return RouterTarget(**fields)


async def eventually(condition: Any, seconds: float = 2.0) -> None:
    """Wait until condition() holds; the client side needs a loop turn to see a close."""
    async with asyncio.timeout(seconds):
        while not condition():
            await asyncio.sleep(0.01)


# -- reading and writing ------------------------------------------------------------


async def test_print_with_where_and_proplist(sim: RouterOSSimulator, pool: RouterPool) -> None:
    """`where` selects items by equal fields (ANDed) and `proplist` limits the fields."""
    for name in ("alice", "bob", "carol"):
        sim.add_item("/ppp/secret", name=name, password="pw", profile="10M")
    async with pool.session(target_for(sim)) as ros:
        bob = await ros.print("/ppp/secret", where={"name": "bob"}, proplist=["name", "profile"])
        assert bob == [{"name": "bob", "profile": "10M"}]
        both = await ros.print("/ppp/secret", where={"profile": "10M", "name": "carol"})
        assert [row["name"] for row in both] == ["carol"]
        everything = await ros.print("/ppp/secret/")
    assert [row["name"] for row in everything] == ["alice", "bob", "carol"]
    assert all(ID.match(row[".id"]) for row in everything)


async def test_add_set_remove_round_trip(sim: RouterOSSimulator, pool: RouterPool) -> None:
    """add returns the new `.id`; set and remove by that id change the router."""
    async with pool.session(target_for(sim)) as ros:
        fields = {"name": "q-alice", "target": "10.0.0.2/32", "max-limit": "10M/10M"}
        new_id = await ros.add("/queue/simple", fields)
        assert ID.match(new_id)
        assert sim.find("/queue/simple", name="q-alice")[0]["max-limit"] == "10M/10M"
        await ros.set("/queue/simple", new_id, {"max-limit": "20M/20M", "comment": "imsys:1"})
        (row,) = await ros.print("/queue/simple", where={".id": new_id})
        assert (row["max-limit"], row["comment"]) == ("20M/20M", "imsys:1")
        await ros.remove("/queue/simple", new_id)
    assert sim.items("/queue/simple") == []
    assert sim.writes["/queue/simple"] == 3


async def test_a_refusing_guard_stops_the_write_before_a_byte_leaves(
    sim: RouterOSSimulator, pool: RouterPool
) -> None:
    """A session's guard runs in the step that sends each write: when it raises, the
    router receives nothing, the caller gets the guard's own error, reads still pass,
    and the connection stays in use."""
    refuse = True

    def guard() -> None:
        if refuse:
            raise FencedOut("claim lost")

    async with pool.session(target_for(sim)) as ros:
        ros.guard = guard
        with pytest.raises(FencedOut):
            await ros.add("/ppp/secret", {"name": "stale"})
        assert await ros.print("/ppp/secret") == []
        refuse = False
        await ros.add("/ppp/secret", {"name": "fresh"})
    assert [row["name"] for row in sim.items("/ppp/secret")] == ["fresh"]
    assert sim.writes["/ppp/secret"] == 1
    assert [r.command for r in sim.commands].count("/ppp/secret/add") == 1
    assert sim.connections == 1  # the refused write did not cost the connection


async def test_values_come_back_as_the_strings_sent(
    sim: RouterOSSimulator, pool: RouterPool
) -> None:
    """Values "1234", "yes" and "007" read back as those strings; booleans print as true/false."""
    async with pool.session(target_for(sim)) as ros:
        await ros.add("/ppp/secret", {"name": "alice", "password": "1234", "comment": "007"})
        await ros.add("/ppp/secret", {"name": "bob", "password": "yes", "disabled": "yes"})
        rows = {row["name"]: row for row in await ros.secrets()}
        resource = await ros.resource()
    assert rows["alice"]["password"] == "1234"
    assert rows["alice"]["comment"] == "007"
    assert rows["alice"]["limit-bytes-in"] == "0"
    assert rows["bob"]["password"] == "yes"
    assert (rows["bob"]["disabled"], rows["alice"]["disabled"]) == ("true", "false")
    assert is_true(rows["bob"]["disabled"])
    assert not is_true(rows["alice"]["disabled"])
    assert resource["cpu-load"] == "3"
    values = [value for row in [*rows.values(), resource] for value in row.values()]
    assert all(type(value) is str for value in values)


async def test_non_ascii_bytes_from_the_router_arrive_intact(
    sim: RouterOSSimulator, pool: RouterPool
) -> None:
    """A comment set outside imsys with non-ASCII bytes is read byte for byte, not trimmed."""
    sim.add_item("/ppp/secret", name="alice", comment="café")
    async with pool.session(target_for(sim)) as ros:
        (row,) = await ros.secrets()
    assert row["comment"].encode("latin-1") == "café".encode()


async def test_tag_filters_by_comment_prefix(sim: RouterOSSimulator, pool: RouterPool) -> None:
    """secrets() and hotspot_users() with a tag return only entries whose comment starts with it."""
    sim.add_item("/ppp/secret", name="ours", comment="imsys:1")
    sim.add_item("/ppp/secret", name="theirs", comment="manual")
    sim.add_item("/ppp/secret", name="bare")
    sim.add_item("/ip/hotspot/user", name="guest", comment="imsys:2")
    sim.add_item("/ip/hotspot/user", name="staff")
    async with pool.session(target_for(sim)) as ros:
        assert [row["name"] for row in await ros.secrets("imsys")] == ["ours"]
        assert len(await ros.secrets()) == 3
        assert [row["name"] for row in await ros.hotspot_users("imsys")] == ["guest"]


# -- traps ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("menu", "fields"),
    [
        ("/ppp/secret", {"name": "dup"}),
        ("/ip/hotspot/user", {"name": "dup"}),
        ("/queue/simple", {"name": "dup", "target": "10.0.0.9/32"}),
    ],
)
async def test_duplicate_add_raises_already_exists(
    sim: RouterOSSimulator, pool: RouterPool, menu: str, fields: dict[str, str]
) -> None:
    """Every menu's duplicate text ("already exists", "already have") is AlreadyExists."""
    async with pool.session(target_for(sim)) as ros:
        await ros.add(menu, fields)
        with pytest.raises(AlreadyExists) as caught:
            await ros.add(menu, fields)
        # A trap leaves the connection in step: the same session carries on.
        assert len(await ros.print(menu)) == 1
    assert isinstance(caught.value, PermanentError)
    assert "already" in caught.value.message
    assert caught.value.command == f"{menu}/add"
    assert sim.connections == 1


async def test_remove_or_set_unknown_id_raises_no_such_item(
    sim: RouterOSSimulator, pool: RouterPool
) -> None:
    """An id the router does not know gives NoSuchItem with the router's message."""
    async with pool.session(target_for(sim)) as ros:
        with pytest.raises(NoSuchItem) as caught:
            await ros.remove("/ppp/secret", "*FFFF")
        with pytest.raises(NoSuchItem):
            await ros.set("/ppp/secret", "*FFFF", {"comment": "x"})
    assert caught.value.message == "no such item"
    assert "router 7 (127.0.0.1:" in str(caught.value)


async def test_unknown_profile_raises_invalid_value(
    sim: RouterOSSimulator, pool: RouterPool
) -> None:
    """A profile the router lacks is InvalidValue, category 1, and nothing is added."""
    async with pool.session(target_for(sim)) as ros:
        with pytest.raises(InvalidValue) as caught:
            await ros.add("/ppp/secret", {"name": "alice", "profile": "100M"})
    assert caught.value.message == "input does not match any value of profile"
    assert caught.value.category == 1
    assert sim.items("/ppp/secret") == []


async def test_unknown_menu_raises_plain_trap(sim: RouterOSSimulator, pool: RouterPool) -> None:
    """Two traps in one reply (unknown menu) become one RouterTrap carrying both texts."""
    async with pool.session(target_for(sim)) as ros:
        with pytest.raises(RouterTrap) as caught:
            await ros.print("/ppp/secrets")
    assert type(caught.value) is RouterTrap
    assert "no such command prefix" in caught.value.message


# -- login and connection faults -------------------------------------------------------


async def test_bad_password_raises_auth_error_and_closes(
    sim: RouterOSSimulator, pool: RouterPool
) -> None:
    """Wrong credentials are RouterAuthError (permanent); the socket does not stay open."""
    wrong = "wrong-pw-123"
    with capture_logs() as logs, pytest.raises(RouterAuthError) as caught:
        async with pool.session(target_for(sim, password=wrong)) as ros:
            await ros.print("/ppp/secret")
    assert isinstance(caught.value, PermanentError)
    assert "invalid user name or password" in str(caught.value)
    assert wrong not in str(caught.value)
    assert wrong not in repr(logs)
    assert any(entry["event"] == "router_login_failed" for entry in logs)
    await eventually(lambda: sim.open_connections == 0)
    assert pool.open_connections(7) == 0


async def test_refused_connection_raises_unavailable(
    sim: RouterOSSimulator, pool: RouterPool
) -> None:
    """A refused connect is RouterUnavailable (retryable) naming router id and address."""
    await sim.refuse_connections()
    with pytest.raises(RouterUnavailable) as caught:
        async with pool.session(target_for(sim)) as ros:
            await ros.resource()
    assert isinstance(caught.value, RetryableError)
    assert f"router 7 (127.0.0.1:{sim.port})" in str(caught.value)
    assert "refused" in str(caught.value)
    assert caught.value.maybe_applied is False
    assert PASSWORD not in str(caught.value)


async def test_stall_times_out_and_discards_the_connection(
    sim: RouterOSSimulator, pool: RouterPool
) -> None:
    """A stalled router is RouterUnavailable within the timeout; the next session reconnects."""
    target = target_for(sim, timeout=0.3)
    async with pool.session(target) as ros:
        await ros.resource()
    assert pool.open_connections(7) == 1
    sim.stall()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(RouterUnavailable) as caught:
        async with pool.session(target) as ros:
            await ros.print("/ppp/secret")
    assert loop.time() - started < 1.0
    assert caught.value.maybe_applied is False
    assert pool.open_connections(7) == 0
    sim.unstall()
    async with pool.session(target) as ros:
        assert await ros.print("/ppp/secret") == []
    assert sim.connections == 2


async def test_connect_timeout_raises_unavailable(sim: RouterOSSimulator, pool: RouterPool) -> None:
    """A router that accepts but never answers the login is RouterUnavailable in time."""
    sim.stall()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(RouterUnavailable, match="timed out") as caught:
        async with pool.session(target_for(sim, timeout=0.3)) as ros:
            await ros.resource()
    assert loop.time() - started < 1.0
    assert caught.value.maybe_applied is False
    # The stalled router notices the close only when it reads again: had we left the
    # socket open, the late login would succeed and keep it open.
    sim.unstall()
    await eventually(lambda: sim.open_connections == 0)


async def test_cancelled_command_discards_the_connection(
    sim: RouterOSSimulator, pool: RouterPool
) -> None:
    """A command cancelled mid-flight leaves no connection behind to read its late reply."""
    target = target_for(sim)
    async with pool.session(target) as ros:
        await ros.resource()
    sim.stall()

    async def stuck() -> None:
        async with pool.session(target) as ros:
            await ros.print("/ppp/secret")

    task = asyncio.create_task(stuck())
    await eventually(lambda: len(sim.commands) == 3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pool.open_connections(7) == 0
    sim.unstall()
    async with pool.session(target) as ros:
        assert await ros.print("/ppp/secret") == []
    assert sim.connections == 2


async def test_stalled_write_may_have_been_applied(
    sim: RouterOSSimulator, pool: RouterPool
) -> None:
    """A write that timed out is maybe_applied, and indeed lands once the router wakes."""
    target = target_for(sim, timeout=0.3)
    async with pool.session(target) as ros:
        await ros.resource()
        sim.stall()
        with pytest.raises(RouterUnavailable) as caught:
            await ros.add("/ppp/secret", {"name": "alice"})
        sim.unstall()
        # Same session, fresh connection: the late `!done` of the add is not read here.
        await eventually(lambda: len(sim.items("/ppp/secret")) == 1)
        assert [row["name"] for row in await ros.secrets()] == ["alice"]
    assert caught.value.maybe_applied is True
    assert sim.connections == 2


async def test_drop_after_write_is_maybe_applied(sim: RouterOSSimulator, pool: RouterPool) -> None:
    """The router applies the write and drops the reply: maybe_applied, and the write is there."""
    sim.drop_after_write()
    with capture_logs() as logs, pytest.raises(RouterUnavailable) as caught:
        async with pool.session(target_for(sim)) as ros:
            await ros.add("/ppp/secret", {"name": "alice", "password": "hunter2"})
    assert caught.value.maybe_applied is True
    assert [row["name"] for row in sim.items("/ppp/secret")] == ["alice"]
    assert pool.open_connections(7) == 0
    assert "hunter2" not in repr(logs)
    assert PASSWORD not in repr(logs)
    (failed,) = [entry for entry in logs if entry["event"] == "router_command_failed"]
    assert (failed["router_id"], failed["command"]) == (7, "/ppp/secret/add")
    async with pool.session(target_for(sim)) as ros:
        with pytest.raises(AlreadyExists):
            await ros.add("/ppp/secret", {"name": "alice", "password": "hunter2"})


async def test_reset_after_print_is_not_maybe_applied(
    sim: RouterOSSimulator, pool: RouterPool
) -> None:
    """A connection reset during a read is RouterUnavailable with maybe_applied False."""
    async with pool.session(target_for(sim)) as ros:
        await ros.resource()
        await sim.go_down()
        with pytest.raises(RouterUnavailable) as caught:
            await ros.resource()
    assert caught.value.maybe_applied is False


async def test_fatal_raises_unavailable(sim: RouterOSSimulator, pool: RouterPool) -> None:
    """`!fatal` is RouterUnavailable with the router's reason; the next session reconnects."""
    sim.fatal("too many sessions")
    with pytest.raises(RouterUnavailable, match="too many sessions"):
        async with pool.session(target_for(sim)) as ros:
            await ros.resource()
    assert pool.open_connections(7) == 0
    async with pool.session(target_for(sim)) as ros:
        assert (await ros.resource())["board-name"] == "RB5009UG+S+"


async def test_idle_connection_killed_by_the_router_is_not_reused(
    sim: RouterOSSimulator, pool: RouterPool
) -> None:
    """An idle connection that got `!fatal` unasked is replaced before any command is sent."""
    async with pool.session(target_for(sim)) as ros:
        await ros.resource()
    sim.fatal("session terminated", now=True)
    await eventually(lambda: sim.open_connections == 0)
    async with pool.session(target_for(sim)) as ros:
        await ros.add("/ppp/secret", {"name": "alice"})
    assert sim.connections == 2


async def test_non_ascii_value_is_refused_before_sending(
    sim: RouterOSSimulator, pool: RouterPool
) -> None:
    """A non-ASCII value is RouterInputError; the router never sees the command."""
    async with pool.session(target_for(sim)) as ros:
        with pytest.raises(RouterInputError) as caught:
            await ros.add("/ppp/secret", {"name": "alice", "comment": "café"})
        with pytest.raises(RouterInputError):
            await ros.print("/ppp/secret", where={"name": "zoë"})
        # Nothing half-sent: the connection is still in step.
        assert await ros.secrets() == []
    assert "comment" in str(caught.value)
    assert "café" not in str(caught.value)
    assert isinstance(caught.value, PermanentError)
    assert sim.writes["/ppp/secret"] == 0
    assert [record.command for record in sim.commands] == ["/login", "/ppp/secret/print"]
    assert sim.connections == 1


async def test_non_ascii_credentials_are_refused_before_connecting(
    sim: RouterOSSimulator, pool: RouterPool
) -> None:
    """A non-ASCII user name or password is RouterInputError without a connection attempt."""
    for overrides in ({"password": "pässword"}, {"username": "ädmin"}):
        with pytest.raises(RouterInputError) as caught:
            async with pool.session(target_for(sim, **overrides)) as ros:
                await ros.resource()
        assert "pässword" not in str(caught.value)
    assert sim.connections == 0


# -- sessions ----------------------------------------------------------------------------


async def test_kick_ppp_ends_only_that_session(sim: RouterOSSimulator, pool: RouterPool) -> None:
    """kick_ppp removes the subscriber's /ppp/active entries and returns their `.id`s."""
    sim.add_item("/ppp/secret", name="alice")
    sim.add_item("/ppp/secret", name="bob")
    session = sim.connect_session("alice")
    sim.connect_session("bob")
    async with pool.session(target_for(sim)) as ros:
        assert [row["name"] for row in await ros.active_ppp("alice")] == ["alice"]
        assert await ros.kick_ppp("alice") == [session]
        assert await ros.active_ppp("alice") == []
        assert [row["name"] for row in await ros.active_ppp()] == ["bob"]


async def test_kick_without_a_session_is_zero(sim: RouterOSSimulator, pool: RouterPool) -> None:
    """Kicking a subscriber who is not online removes nothing and raises nothing."""
    sim.add_item("/ip/hotspot/user", name="guest")
    async with pool.session(target_for(sim)) as ros:
        assert await ros.kick_ppp("nobody") == []
        assert await ros.kick_hotspot("guest") == []
        with pytest.raises(RouterInputError):
            await ros.kick_ppp("")


async def test_kick_hotspot_ends_the_session(sim: RouterOSSimulator, pool: RouterPool) -> None:
    """kick_hotspot removes /ip/hotspot/active entries found by user, returning their ids."""
    sim.add_item("/ip/hotspot/user", name="guest")
    session = sim.login_hotspot("guest")
    async with pool.session(target_for(sim)) as ros:
        assert [row["user"] for row in await ros.active_hotspot("guest")] == ["guest"]
        assert await ros.kick_hotspot("guest") == [session]
        assert await ros.active_hotspot() == []
    assert sim.items("/ip/hotspot/active") == []


# -- the pool -------------------------------------------------------------------------


async def test_pool_caps_connections_per_router(sim: RouterOSSimulator, pool: RouterPool) -> None:
    """20 concurrent sessions share at most max_concurrency connections and all succeed."""
    target = target_for(sim, max_concurrency=5)
    running = peak = 0

    async def one(n: int) -> None:
        nonlocal running, peak
        async with pool.session(target) as ros:
            running += 1
            peak = max(peak, running)
            await ros.add("/ppp/secret", {"name": f"user{n}"})
            await asyncio.sleep(0.01)
            running -= 1

    await asyncio.gather(*(one(n) for n in range(20)))
    assert peak == 5
    assert sim.connections == 5
    assert pool.open_connections(7) == 5
    assert len(sim.items("/ppp/secret")) == 20


async def test_connections_are_reused(sim: RouterOSSimulator, pool: RouterPool) -> None:
    """50 sessions one after another use one connection."""
    for _ in range(50):
        async with pool.session(target_for(sim)) as ros:
            await ros.resource()
    assert sim.connections == 1
    assert pool.open_connections(7) == 1


async def test_one_session_serialises_concurrent_commands(
    sim: RouterOSSimulator, pool: RouterPool
) -> None:
    """Tasks sharing one session get their own replies (one command on the wire at a time)."""
    for n in range(5):
        sim.add_item("/ppp/secret", name=f"user{n}")
    async with pool.session(target_for(sim)) as ros:
        results = await asyncio.gather(
            *(ros.print("/ppp/secret", where={"name": f"user{n}"}) for n in range(5))
        )
    assert [rows[0]["name"] for rows in results] == [f"user{n}" for n in range(5)]
    assert sim.connections == 1


async def test_close_closes_every_connection(sim: RouterOSSimulator) -> None:
    """pool.close() closes idle connections; later sessions are refused."""
    pool = RouterPool()
    async with pool.session(target_for(sim)) as ros:
        await ros.resource()
    assert sim.open_connections == 1
    await pool.close()
    await pool.close()
    await eventually(lambda: sim.open_connections == 0)
    with pytest.raises(RuntimeError, match="closed"):
        async with pool.session(target_for(sim)):
            pass


async def test_changed_password_replaces_pooled_connections(
    sim: RouterOSSimulator, pool: RouterPool
) -> None:
    """A target with new credentials does not reuse connections made with the old ones."""
    async with pool.session(target_for(sim)) as ros:
        await ros.resource()
    with pytest.raises(RouterAuthError):
        async with pool.session(target_for(sim, password="rotated")) as ros:
            await ros.resource()
    await eventually(lambda: sim.open_connections == 0)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_tls_target_connects_by_pin_and_plain_targets_stay_plain() -> None:
    """use_tls with the certificate's pinned SHA-256 speaks api-ssl; plain targets stay plain."""
    certificate = self_signed("127.0.0.1")
    sim = RouterOSSimulator(username=USER, password=PASSWORD, ssl_context=certificate.context)
    await sim.start()
    pool = RouterPool()
    try:
        pinned = target_for(sim, use_tls=True, tls_fingerprint=certificate.fingerprint)
        async with pool.session(pinned) as ros:
            assert (await ros.resource())["board-name"] == "RB5009UG+S+"
        with pytest.raises(RouterUnavailable):
            async with pool.session(target_for(sim, router_id=8, timeout=0.5)) as ros:
                await ros.resource()
    finally:
        await pool.close()
        await sim.stop()


def test_password_stays_out_of_repr() -> None:
    """RouterTarget's repr shows the router, never the password."""
    target = RouterTarget(7, "10.0.0.1", 8728, "admin", "top-secret")
    assert "top-secret" not in repr(target)
    assert "10.0.0.1" in repr(target)
    assert target.label == "router 7 (10.0.0.1:8728)"


# -- the router ---------------------------------------------------------------------


async def test_reboot_succeeds_and_ids_change(sim: RouterOSSimulator, pool: RouterPool) -> None:
    """reboot() returns when the router drops the connection; ids change; sessions reconnect."""
    async with pool.session(target_for(sim)) as ros:
        old_id = await ros.add("/ppp/secret", {"name": "alice"})
        await ros.reboot()
        assert sim.boots == 1
        assert pool.open_connections(7) == 0
        # The same session connects again for its next command.
        (secret,) = await ros.secrets()
    assert secret["name"] == "alice"
    assert secret[".id"] != old_id
    async with pool.session(target_for(sim)) as ros:
        with pytest.raises(NoSuchItem):
            await ros.remove("/ppp/secret", old_id)
    assert sim.connections == 2


async def test_resource_fields(sim: RouterOSSimulator, pool: RouterPool) -> None:
    """resource() gives version, uptime, cpu-load and board-name as the router prints them."""
    sim.set_resource(uptime="1w2d3h4m5s", cpu_load=42)
    async with pool.session(target_for(sim)) as ros:
        resource = await ros.resource()
    assert resource["version"] == f"{sim.version} (stable)"
    assert resource["cpu-load"] == "42"
    assert resource["board-name"] == "RB5009UG+S+"
    assert parse_uptime(resource["uptime"]) in (788645, 788646)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1w2d3h4m5s", 788645),
        ("0s", 0),
        ("59s", 59),
        ("1h2m5s", 3725),
        ("3d", 259200),
        ("4m", 240),
        ("5s200ms", 5),
        ("300ms", 0),
        ("1d03:04:05", 97445),
        ("00:01:00", 60),
    ],
)
def test_parse_uptime(text: str, seconds: int) -> None:
    """RouterOS durations parse to whole seconds."""
    assert parse_uptime(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "5x", "1h 2m", "-1s"])
def test_parse_uptime_rejects_garbage(text: str) -> None:
    """A string that is not a RouterOS duration is a ValueError, not zero."""
    with pytest.raises(ValueError, match="duration"):
        parse_uptime(text)


def test_is_true() -> None:
    """true/yes are True, false/no are False, anything else is a ValueError."""
    assert is_true("true")
    assert is_true("yes")
    assert not is_true("false")
    assert not is_true("no")
    with pytest.raises(ValueError, match="boolean"):
        is_true("maybe")
