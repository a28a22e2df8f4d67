"""The RouterOS API simulator, driven by the real librouteros client (async API)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import librouteros
import pytest
from librouteros.exceptions import ConnectionClosed, FatalError, MultiTrapError, TrapError
from librouteros.protocol import decode_length as lib_decode_length
from librouteros.protocol import encode_length as lib_encode_length
from librouteros.protocol import encode_sentence as lib_encode_sentence
from librouteros.query import Key, Or

from imsys.sim.routeros import RouterOSSimulator, Write, serve
from imsys.sim.routeros_menus import Trap
from imsys.sim.routeros_query import index_hint
from imsys.sim.routeros_state import RouterState
from imsys.sim.routeros_wire import (
    decode_length,
    encode_length,
    encode_sentence,
    encode_sentences,
    prefix_size,
)

USER = "admin"
PASSWORD = "s3cret-pw"
ID = re.compile(r"^\*[0-9A-F]+$")
# After a dropped connection librouteros may see EOF (ConnectionClosed) or, if our
# write crossed the close, a reset: callers must treat both as "outcome unknown".
DROPPED = (ConnectionClosed, ConnectionError)


@pytest.fixture
async def sim() -> AsyncIterator[RouterOSSimulator]:
    simulator = RouterOSSimulator(username=USER, password=PASSWORD)
    simulator.add_item("/ppp/profile", name="10M", rate_limit="10M/10M")
    simulator.add_item("/ip/hotspot/user/profile", name="1h")
    await simulator.start()
    yield simulator
    await simulator.stop()


async def connect(
    sim: RouterOSSimulator, *, password: str = PASSWORD, timeout: float = 2.0, **kwargs: Any
) -> Any:
    return await librouteros.async_connect(
        "127.0.0.1", USER, password, port=sim.port, timeout=timeout, **kwargs
    )


@pytest.fixture
async def api(sim: RouterOSSimulator) -> AsyncIterator[Any]:
    client = await connect(sim)
    yield client
    with contextlib.suppress(Exception):
        await client.close()


async def call(api: Any, command: str, *words: str) -> list[dict[str, Any]]:
    return [row async for row in api.rawCmd(command, *words)]


async def rows(path: Any) -> list[dict[str, Any]]:
    return [row async for row in path]


async def read_raw(api: Any) -> list[tuple[str, tuple[str, ...]]]:
    """Sentences up to !done, as they came off the wire."""
    sentences = []
    while True:
        sentence = await api.protocol.readSentence()
        sentences.append(sentence)
        if sentence[0] == "!done":
            return sentences


# -- protocol and login -------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "size"),
    [
        (0, 1), (0x7F, 1), (0x80, 2), (0x3FFF, 2), (0x4000, 3), (0x1FFFFF, 3),
        (0x200000, 4), (0xFFFFFFF, 4), (0x10000000, 5), (0xFFFFFFFF, 5),
    ],
)  # fmt: skip
def test_length_encoding_sizes_and_round_trip(length: int, size: int) -> None:
    """Word lengths use the 1 to 5 byte encoding and agree with librouteros up to 4."""
    encoded = encode_length(length)
    assert len(encoded) == size == prefix_size(encoded[0])
    assert decode_length(encoded) == length
    if size < 5:
        assert encoded == lib_encode_length(length)
        assert lib_decode_length(encoded) == length


def test_sentences_encode_as_librouteros_encodes_them() -> None:
    """A reply's sentences written back to back are the bytes librouteros's own encoder
    makes of them, for words of every prefix size up to 3 bytes and non-ASCII text."""
    sentences = [
        ["!re", "", "=name=" + "x" * 0x79, "=comment=" + "y" * 0x80, "=n=é" * 5000],
        ["!done", "=ret=*1"],
    ]
    expected = b"".join(lib_encode_sentence(*words, encoding="utf-8") for words in sentences)
    assert encode_sentences(sentences) == expected
    assert encode_sentence(sentences[1]) == lib_encode_sentence(*sentences[1], encoding="utf-8")


async def test_login_with_right_credentials(sim: RouterOSSimulator) -> None:
    """The plain /login with name and password opens a session."""
    api = await connect(sim)
    assert await call(api, "/system/identity/print") == [{"name": "MikroTik"}]
    assert sim.connections == 1
    await api.close()


async def test_login_with_wrong_password_traps(sim: RouterOSSimulator) -> None:
    """A bad password gets RouterOS's trap text, which librouteros raises as TrapError."""
    with pytest.raises(TrapError) as caught:
        await connect(sim, password="wrong")
    assert caught.value.message == "invalid user name or password (6)"


async def test_commands_before_login_are_refused(sim: RouterOSSimulator) -> None:
    """Nothing but /login works on a connection that has not logged in."""

    async def no_login(api: Any, username: str, password: str) -> None:
        return None

    api = await connect(sim, login_method=no_login)
    with pytest.raises(TrapError, match="not logged in"):
        await call(api, "/ppp/secret/print")
    await api.close()


async def test_garbage_closes_only_that_connection(sim: RouterOSSimulator, api: Any) -> None:
    """A reserved control byte ends that connection; the router keeps serving others."""
    reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
    writer.write(b"\xf8garbage")
    assert await asyncio.wait_for(reader.read(), 2) == b""
    writer.close()
    assert await call(api, "/system/identity/print") == [{"name": "MikroTik"}]


async def test_tag_is_echoed_on_every_reply(api: Any) -> None:
    """A `.tag` comes back on each reply sentence as the bare API word `.tag=N`."""
    await api.protocol.writeSentence("/system/identity/print", ".tag=7")
    assert await read_raw(api) == [
        ("!re", ("=name=MikroTik", ".tag=7")),
        ("!done", (".tag=7",)),
    ]
    await api.protocol.writeSentence("/ppp/secret/remove", "=.id=*FFFF", ".tag=8")
    assert await read_raw(api) == [
        ("!trap", ("=message=no such item", ".tag=8")),
        ("!done", (".tag=8",)),
    ]


@pytest.mark.parametrize(
    ("version", "empty_words"),
    [("6.49.17", []), ("7.17.2", []), ("7.18", [("!empty", ())]), ("7.19.4", [("!empty", ())])],
)
async def test_empty_print_answers_empty_from_7_18(version: str, empty_words: list[Any]) -> None:
    """From RouterOS 7.18 an empty print is `!empty` then `!done`, before it just `!done`."""
    sim = RouterOSSimulator(username=USER, password=PASSWORD, version=version)
    await sim.start()
    try:
        api = await connect(sim)
        await api.protocol.writeSentence("/ppp/secret/print")
        assert await read_raw(api) == [*empty_words, ("!done", ())]
        # A print that finds something never answers !empty.
        await api.protocol.writeSentence("/ppp/profile/print", "?name=default")
        assert [word for word, _ in await read_raw(api)] == ["!re", "!done"]
        assert await rows(api.path("ppp", "secret")) == []
        (resource,) = await rows(api.path("system", "resource"))
        assert resource["version"] == f"{version} (stable)"
        await api.close()
    finally:
        await sim.stop()


def test_default_version_is_7_18_or_later() -> None:
    """Without --version the simulator is a RouterOS 7.18+ router (it answers !empty)."""
    sim = RouterOSSimulator()
    assert sim.empty_reply
    assert tuple(int(n) for n in sim.version.split(".")[:2]) >= (7, 18)
    with pytest.raises(ValueError, match="not a RouterOS version"):
        RouterOSSimulator(version="seven")


def test_cli_takes_a_routeros_version() -> None:
    """`sim routeros --version V` reaches the simulator's argument parsers."""
    from imsys.cli import _parser
    from imsys.sim.routeros import version_arg

    args = _parser().parse_args(["sim", "routeros", "--version", "6.49.17"])
    assert args.ros_version == "6.49.17"
    assert version_arg("7.19.4") == "7.19.4"
    with pytest.raises(argparse.ArgumentTypeError):
        version_arg("latest")


async def test_long_words_cross_the_wire(sim: RouterOSSimulator, api: Any) -> None:
    """Words needing 2 and 3 length bytes survive a round trip through librouteros."""
    secrets = api.path("ppp", "secret")
    await secrets.add(name="a", comment="x" * 300)
    await secrets.add(name="b", comment="y" * 20000)
    comments = {row["name"]: row["comment"] async for row in secrets}
    assert comments == {"a": "x" * 300, "b": "y" * 20000}


async def test_many_concurrent_connections(sim: RouterOSSimulator) -> None:
    """Many clients at once each get their own session and their writes all land."""

    async def one(n: int) -> None:
        api = await connect(sim)
        await api.path("ppp", "secret").add(name=f"user{n}", password="pw")
        await api.close()

    await asyncio.gather(*(one(n) for n in range(25)))
    assert sim.connections == 25
    assert len(sim.items("/ppp/secret")) == 25
    assert sim.writes["/ppp/secret"] == 25


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_tls_when_given_an_ssl_context(tmp_path: Path) -> None:
    """With an ssl_context the same API is served over TLS (api-ssl)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(cert))
    sim = RouterOSSimulator(username=USER, password=PASSWORD, ssl_context=server_context)
    await sim.start()
    try:
        api = await connect(sim, ssl_wrapper=client_context)
        assert await call(api, "/system/identity/print") == [{"name": "MikroTik"}]
        await api.close()
    finally:
        await sim.stop()


# -- print ----------------------------------------------------------------------------


async def test_print_with_proplist_and_query(sim: RouterOSSimulator, api: Any) -> None:
    """`.proplist` limits the fields and `?name=` selects the item, via librouteros select/where."""
    for name in ("alice", "bob", "carol"):
        sim.add_item("/ppp/secret", name=name, password="pw", profile="10M")
    query = api.path("ppp", "secret").select(Key("name"), Key("profile"))
    found = [row async for row in query.where(Key("name") == "bob")]
    assert found == [{"name": "bob", "profile": "10M"}]
    assert await call(api, "/ppp/secret/print", "?name=carol", "=.proplist=.id") == [
        {".id": sim.find("/ppp/secret", name="carol")[0][".id"]}
    ]


async def test_print_rows_have_ids_and_booleans(sim: RouterOSSimulator, api: Any) -> None:
    """Rows carry `.id` like `*1A`, and `disabled` prints as true/false (bool in librouteros)."""
    sim.add_item("/ppp/secret", name="alice", disabled=True)
    sim.add_item("/ppp/secret", name="bob")
    printed = {row["name"]: row async for row in api.path("ppp", "secret")}
    assert all(ID.match(row[".id"]) for row in printed.values())
    assert printed["alice"]["disabled"] is True
    assert printed["bob"]["disabled"] is False
    assert sim.find("/ppp/secret", name="alice")[0]["disabled"] == "true"


async def test_query_presence_absence_and_operators(sim: RouterOSSimulator, api: Any) -> None:
    """`?k`, `?-k`, `?#|`, `?#!` and yes/no against true/false select as RouterOS does."""
    sim.add_item("/ppp/secret", name="alice", comment="vip")
    sim.add_item("/ppp/secret", name="bob", disabled=True)
    sim.add_item("/ppp/secret", name="carol")

    async def names(*words: str) -> list[str]:
        return [str(row["name"]) for row in await call(api, "/ppp/secret/print", *words)]

    assert await names("?comment") == ["alice"]
    assert await names("?-comment") == ["bob", "carol"]
    assert await names("?disabled=yes") == ["bob"]
    assert await names("?name=alice", "?name=carol", "?#|") == ["alice", "carol"]
    assert await names("?name=bob", "?#!") == ["alice", "carol"]
    secrets = api.path("ppp", "secret")
    found = secrets.select(Key("name")).where(Or(Key("name") == "bob", Key("name") == "zed"))
    assert [row async for row in found] == [{"name": "bob"}]
    assert await call(api, "/ppp/secret/print", "=count-only=") == [{"ret": 3}]


# -- writes and their traps ---------------------------------------------------------


async def test_ppp_secret_add_update_remove(sim: RouterOSSimulator, api: Any) -> None:
    """add returns the new `.id`; update and remove by `.id` change the router's state."""
    secrets = api.path("ppp", "secret")
    new_id = await secrets.add(name="alice", password="pw", profile="10M", service="pppoe")
    assert ID.match(new_id)
    await secrets.update(**{".id": new_id, "password": "pw2", "disabled": True})
    (item,) = sim.items("/ppp/secret")
    assert item[".id"] == new_id
    assert (item["password"], item["disabled"], item["profile"]) == ("pw2", "true", "10M")
    await secrets.remove(new_id)
    assert sim.items("/ppp/secret") == []
    assert sim.writes["/ppp/secret"] == 3


async def test_set_and_remove_accept_a_name_for_the_id(sim: RouterOSSimulator, api: Any) -> None:
    """Like RouterOS, `=.id=` may be an item's name in config menus."""
    sim.add_item("/ppp/secret", name="alice")
    secrets = api.path("ppp", "secret")
    await secrets.update(**{".id": "alice", "comment": "moved"})
    assert sim.find("/ppp/secret", name="alice")[0]["comment"] == "moved"
    await secrets.remove("alice")
    assert sim.items("/ppp/secret") == []


async def test_hotspot_user_add_update_remove(sim: RouterOSSimulator, api: Any) -> None:
    """Hotspot users are added, changed and removed like secrets."""
    users = api.path("ip", "hotspot", "user")
    user_id = await users.add(name="guest", password="pw", profile="1h")
    await users.update(**{".id": user_id, "disabled": "yes", "comment": "paused"})
    (item,) = sim.items("/ip/hotspot/user")
    assert (item["server"], item["disabled"], item["comment"]) == ("all", "true", "paused")
    await users.remove(user_id)
    assert sim.items("/ip/hotspot/user") == []


async def test_enable_disable_and_unset(sim: RouterOSSimulator, api: Any) -> None:
    """disable/enable flip `disabled`; unset drops an optional field or restores a default."""
    secret_id = sim.add_item("/ppp/secret", name="alice", remote_address="10.9.0.5")
    await call(api, "/ppp/secret/disable", f"=.id={secret_id}")
    assert sim.items("/ppp/secret")[0]["disabled"] == "true"
    await call(api, "/ppp/secret/enable", f"=.id={secret_id}")
    await call(api, "/ppp/secret/unset", f"=.id={secret_id}", "=value-name=remote-address")
    (item,) = sim.items("/ppp/secret")
    assert item["disabled"] == "false"
    assert "remote-address" not in item
    assert sim.writes["/ppp/secret"] == 3


@pytest.mark.parametrize(
    ("path", "fields", "message"),
    [
        (("ppp", "secret"), {"name": "dup"}, "failure: secret with the same name already exists"),
        (
            ("ip", "hotspot", "user"),
            {"name": "dup"},
            "failure: already have user with this name for this server",
        ),
        (("queue", "simple"), {"name": "dup", "target": "10.0.0.9/32"},
         "failure: already have such name"),
    ],
)  # fmt: skip
async def test_duplicate_add_traps(
    sim: RouterOSSimulator, api: Any, path: tuple[str, ...], fields: dict[str, str], message: str
) -> None:
    """A second add with the same name gets the menu's own failure text and adds nothing."""
    menu = api.path(*path)
    await menu.add(**fields)
    with pytest.raises(TrapError) as caught:
        await menu.add(**fields)
    assert caught.value.message == message
    assert len(await rows(menu)) == 1


async def test_hotspot_user_names_are_unique_per_server(sim: RouterOSSimulator, api: Any) -> None:
    """The same hotspot user name may exist once per server."""
    users = api.path("ip", "hotspot", "user")
    await users.add(name="guest", server="hs1")
    await users.add(name="guest", server="hs2")
    assert len(sim.items("/ip/hotspot/user")) == 2


async def test_remove_unknown_id_traps_and_removes_nothing(
    sim: RouterOSSimulator, api: Any
) -> None:
    """An unknown id gets `no such item`; in a comma list, none of the ids is removed."""
    known = sim.add_item("/ppp/secret", name="alice")
    secrets = api.path("ppp", "secret")
    with pytest.raises(TrapError, match=r"^no such item$"):
        await secrets.remove("*FFFF")
    with pytest.raises(TrapError, match=r"^no such item$"):
        await secrets.remove(known, "*FFFF")
    assert len(sim.items("/ppp/secret")) == 1
    with pytest.raises(TrapError, match=r"^no such item$"):
        await secrets.update(**{".id": "*FFFF", "comment": "x"})


async def test_unknown_profile_traps(sim: RouterOSSimulator, api: Any) -> None:
    """A secret naming a profile that does not exist is refused on add and on set."""
    secrets = api.path("ppp", "secret")
    with pytest.raises(TrapError) as caught:
        await secrets.add(name="alice", profile="100M")
    assert caught.value.message == "input does not match any value of profile"
    assert caught.value.category == 1
    secret_id = await secrets.add(name="alice", profile="10M")
    with pytest.raises(TrapError, match="input does not match any value of profile"):
        await secrets.update(**{".id": secret_id, "profile": "100M"})
    assert sim.items("/ppp/secret")[0]["profile"] == "10M"


async def test_unknown_menu_command_and_parameter_trap(api: Any) -> None:
    """Unknown menu: two traps (MultiTrapError); unknown command or field: one trap."""
    with pytest.raises(MultiTrapError) as caught:
        await call(api, "/ppp/secrets/print")
    assert [trap.message for trap in caught.value.traps] == [
        "no such command or directory (secrets)",
        "no such command prefix",
    ]
    with pytest.raises(TrapError, match=r"^no such command$"):
        await call(api, "/ppp/secret/frobnicate")
    with pytest.raises(TrapError, match=r"^no such command$"):
        await api.path("ppp", "active").add(name="x")
    with pytest.raises(TrapError, match=r"^unknown parameter$"):
        await api.path("ppp", "secret").add(name="x", colour="blue")


async def test_queue_gets_a_name_when_added_without_one(sim: RouterOSSimulator, api: Any) -> None:
    """Simple queues added without a name are called queue1, queue2, ..."""
    queues = api.path("queue", "simple")
    # librouteros sends keyword names as given: max_limit would be an unknown parameter.
    with pytest.raises(TrapError, match=r"^unknown parameter$"):
        await queues.add(target="10.0.0.2/32", max_limit="10M/10M")
    await queues.add(**{"target": "10.0.0.2/32", "max-limit": "10M/10M"})
    await queues.add(target="10.0.0.3/32")
    assert [row["name"] for row in sim.items("/queue/simple")] == ["queue1", "queue2"]
    assert sim.items("/queue/simple")[0]["max-limit"] == "10M/10M"


async def test_numeric_password_stays_a_string(sim: RouterOSSimulator, api: Any) -> None:
    """The router keeps "1234" as text; librouteros turns it into int 1234 (and "yes" into True)."""
    secrets = api.path("ppp", "secret")
    await secrets.add(name="alice", password="1234")
    await secrets.add(name="bob", password="yes")
    assert {row["name"]: row["password"] for row in sim.items("/ppp/secret")} == {
        "alice": "1234",
        "bob": "yes",
    }
    printed = {row["name"]: row["password"] async for row in secrets}
    assert printed == {"alice": 1234, "bob": True}


async def test_command_log_masks_passwords(sim: RouterOSSimulator, api: Any) -> None:
    """Commands are logged for tests, with every password value masked."""
    await api.path("ppp", "secret").add(name="alice", password="hunter2")
    await call(api, "/ppp/secret/print", "?password=hunter2")
    logged = [record.words for record in sim.commands]
    assert logged[0] == ("/login", "=name=admin", "=password=***")
    assert ("/ppp/secret/add", "=name=alice", "=password=***") in logged
    assert ("/ppp/secret/print", "?password=***") in logged
    assert "hunter2" not in repr(sim.commands)
    assert PASSWORD not in repr(sim.commands)


# -- sessions -------------------------------------------------------------------------


async def test_disabling_or_removing_a_secret_keeps_the_session(
    sim: RouterOSSimulator, api: Any
) -> None:
    """As on RouterOS, only the next login sees a disabled or removed secret."""
    secret_id = sim.add_item("/ppp/secret", name="alice", remote_address="10.9.0.5")
    sim.connect_session("alice")
    secrets = api.path("ppp", "secret")
    await secrets.update(**{".id": secret_id, "disabled": True})
    await secrets.remove(secret_id)
    (session,) = await rows(api.path("ppp", "active"))
    assert (session["name"], session["address"]) == ("alice", "10.9.0.5")
    with pytest.raises(ValueError, match="refused"):
        sim.connect_session("alice")


async def test_removing_the_active_entry_ends_the_session(sim: RouterOSSimulator, api: Any) -> None:
    """Removing /ppp/active (found by name) and /ip/hotspot/active (by user) ends them."""
    sim.add_item("/ppp/secret", name="alice")
    sim.add_item("/ip/hotspot/user", name="guest")
    sim.connect_session("alice", uptime=3725)
    sim.login_hotspot("guest")
    active = api.path("ppp", "active")
    (session,) = [row async for row in active.select(Key(".id"), Key("uptime"))]
    assert session["uptime"] == "1h2m5s"
    await active.remove(session[".id"])
    assert sim.items("/ppp/active") == []
    hotspot = api.path("ip", "hotspot", "active")
    found = [row async for row in hotspot.select(Key(".id")).where(Key("user") == "guest")]
    await hotspot.remove(*(row[".id"] for row in found))
    assert sim.items("/ip/hotspot/active") == []
    with pytest.raises(TrapError, match=r"^no such item$"):
        await active.remove(session[".id"])


async def test_session_survives_remove_when_told(sim: RouterOSSimulator, api: Any) -> None:
    """With the knob on, a kick answers !done but the session is still there."""
    sim.add_item("/ppp/secret", name="alice")
    session_id = sim.connect_session("alice")
    sim.sessions_survive_remove = True
    await api.path("ppp", "active").remove(session_id)
    assert [row[".id"] for row in sim.items("/ppp/active")] == [session_id]


async def test_redial_brings_back_only_enabled_subscribers(
    sim: RouterOSSimulator, api: Any
) -> None:
    """With redial, a kicked subscriber returns with a new id unless its secret is disabled."""
    sim.redial = True
    sim.add_item("/ppp/secret", name="alice")
    sim.add_item("/ppp/secret", name="bob", disabled=True)
    alice = sim.connect_session("alice")
    bob = sim.connect_session("bob", check=False)
    active = api.path("ppp", "active")
    await active.remove(alice, bob)
    (back,) = sim.items("/ppp/active")
    assert back["name"] == "alice"
    assert back[".id"] != alice


# -- faults ---------------------------------------------------------------------------


async def test_drop_after_write_applies_then_drops(sim: RouterOSSimulator, api: Any) -> None:
    """The write lands but the client gets a connection error, and a blind retry traps."""
    sim.drop_after_write()
    with pytest.raises(DROPPED):
        await api.path("ppp", "secret").add(name="alice", password="pw")
    assert [row["name"] for row in sim.items("/ppp/secret")] == ["alice"]
    assert sim.writes["/ppp/secret"] == 1
    again = await connect(sim)
    with pytest.raises(TrapError, match="already exists"):
        await again.path("ppp", "secret").add(name="alice", password="pw")
    await again.close()


async def test_drop_after_write_picks_the_matching_write(sim: RouterOSSimulator) -> None:
    """A predicate and n choose which write is dropped; `reset` makes it a TCP reset."""

    def bob_or_carol(write: Write) -> bool:
        return write.menu == "/ppp/secret" and write.items[0]["name"] in ("bob", "carol")

    sim.drop_after_write(2, bob_or_carol, reset=True)
    api = await connect(sim)
    secrets = api.path("ppp", "secret")
    await secrets.add(name="alice")
    await api.path("queue", "simple").add(name="q", target="10.0.0.2/32")
    await secrets.add(name="bob")
    with pytest.raises(ConnectionResetError):
        await secrets.add(name="carol")
    assert [row["name"] for row in sim.items("/ppp/secret")] == ["alice", "bob", "carol"]
    # One shot: the next write is answered normally.
    api = await connect(sim)
    await api.path("ppp", "secret").add(name="dave")
    await api.close()


async def test_stall_makes_the_client_time_out(sim: RouterOSSimulator) -> None:
    """A stalled router reads but never answers: librouteros raises TimeoutError."""
    api = await connect(sim, timeout=0.3)
    sim.stall()
    with pytest.raises(TimeoutError):
        await call(api, "/system/identity/print")
    with pytest.raises(TimeoutError):
        await connect(sim, timeout=0.3)
    sim.unstall()
    await api.close()
    fresh = await connect(sim)
    assert await call(fresh, "/system/identity/print") == [{"name": "MikroTik"}]
    await fresh.close()


async def test_stall_for_some_seconds_answers_late(sim: RouterOSSimulator, api: Any) -> None:
    """A timed stall delays the answer instead of losing it."""
    loop = asyncio.get_running_loop()
    sim.stall(0.2)
    started = loop.time()
    assert await call(api, "/system/identity/print") == [{"name": "MikroTik"}]
    assert loop.time() - started >= 0.15


async def test_late_answer_after_a_timeout_is_read_by_the_next_command(
    sim: RouterOSSimulator,
) -> None:
    """After a client timeout the late reply answers the next command: drop such connections."""
    api = await connect(sim, timeout=0.2)
    sim.stall()
    with pytest.raises(TimeoutError):
        await api.path("ppp", "secret").add(name="alice")
    sim.unstall()
    # The add was applied late, and its `!done =ret=` is what the print now reads.
    assert await call(api, "/system/identity/print") == [
        {"ret": sim.items("/ppp/secret")[0][".id"]}
    ]
    await api.close()


async def test_fatal_closes_with_a_message(sim: RouterOSSimulator, api: Any) -> None:
    """The next command gets `!fatal` with the message; librouteros raises FatalError."""
    sim.fatal("too many sessions")
    with pytest.raises(FatalError, match="too many sessions"):
        await call(api, "/system/identity/print")
    assert sim.open_connections == 0


async def test_refused_connections_until_switched_back(sim: RouterOSSimulator, api: Any) -> None:
    """Refusing closes the listener (ConnectionRefusedError); reopening uses the same port."""
    port = sim.port
    await sim.refuse_connections(True)
    with pytest.raises(ConnectionRefusedError):
        await connect(sim)
    # Connections made before keep working, as with a disabled API service.
    assert await call(api, "/system/identity/print") == [{"name": "MikroTik"}]
    await sim.refuse_connections(False)
    assert sim.port == port
    fresh = await connect(sim)
    await fresh.close()


async def test_go_down_drops_and_refuses_until_up(sim: RouterOSSimulator, api: Any) -> None:
    """Down: open connections break and new ones are refused, until come_up or the timer."""
    await sim.go_down()
    with pytest.raises(DROPPED):
        await call(api, "/system/identity/print")
    with pytest.raises(ConnectionRefusedError):
        await connect(sim)
    await sim.come_up()
    await (await connect(sim)).close()
    await sim.go_down(0.1)
    assert not sim.listening
    await asyncio.wait_for(sim.wait_up(), 2)
    fresh = await connect(sim)
    await fresh.close()


async def test_reboot_via_api_changes_ids_and_ends_sessions(
    sim: RouterOSSimulator, api: Any
) -> None:
    """/system/reboot answers nothing and drops; config stays, sessions go, ids change."""
    secrets = api.path("ppp", "secret")
    old_id = await secrets.add(name="alice", password="pw")
    sim.connect_session("alice")
    before = {row[".id"] for row in sim.items("/ppp/secret") + sim.items("/ppp/profile")}
    with pytest.raises(DROPPED):
        await call(api, "/system/reboot")
    assert sim.boots == 1
    api = await connect(sim)
    (secret,) = await rows(api.path("ppp", "secret"))
    assert secret["name"] == "alice"
    assert secret[".id"] != old_id
    assert await rows(api.path("ppp", "active")) == []
    # Built-in profiles keep their fixed ids (*0, *FFFFFFFE); everything else is new.
    assert {row[".id"] for row in sim.items("/ppp/secret")}.isdisjoint(before)
    with pytest.raises(TrapError, match=r"^no such item$"):
        await api.path("ppp", "secret").remove(old_id)
    await api.close()


async def test_reboot_with_downtime_refuses_for_a_while(sim: RouterOSSimulator) -> None:
    """During a reboot's downtime connections are refused; then the router is back."""
    await sim.reboot(downtime=0.1)
    with pytest.raises(ConnectionRefusedError):
        await connect(sim)
    await asyncio.wait_for(sim.wait_up(), 2)
    api = await connect(sim)
    await api.close()


async def test_system_resource_is_one_read_only_item(sim: RouterOSSimulator, api: Any) -> None:
    """/system/resource prints one row without `.id`, uptime like 1w2d3h4m5s; no writes."""
    sim.set_resource(uptime="1w2d3h4m5s", cpu_load=42)
    (resource,) = await rows(api.path("system", "resource"))
    assert ".id" not in resource
    assert re.fullmatch(r"1w2d3h4m[56]s", resource["uptime"])
    assert resource["cpu-load"] == 42
    assert str(resource["version"]).startswith("7.")
    assert resource["board-name"] == "RB5009UG+S+"
    with pytest.raises(TrapError, match=r"^no such command$"):
        await api.path("system", "resource").add(version="8")


async def test_serve_runs_until_cancelled() -> None:
    """serve() listens on the given port with the given account until its task is cancelled."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    task = asyncio.create_task(serve("127.0.0.1", port, "ops", "pw", profiles=["10M"]))
    api = None
    for _ in range(100):
        try:
            api = await librouteros.async_connect("127.0.0.1", "ops", "pw", port=port)
            break
        except OSError:
            await asyncio.sleep(0.01)
    assert api is not None
    profiles = [row["name"] async for row in api.path("ppp", "profile")]
    assert profiles == ["default", "default-encryption", "10M"]
    await api.close()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(ConnectionRefusedError):
        await librouteros.async_connect("127.0.0.1", "ops", "pw", port=port)


# -- fidelity: field lists, value checks, built-ins, an independent client ----------


@pytest.mark.parametrize(
    ("menu", "fields"),
    [
        (("ip", "hotspot", "user"), {"name": "u1", "limit-uptime": "1h"}),
        (("ppp", "profile"), {"name": "p1", "parent-queue": "none"}),
        (("ppp", "profile"), {"name": "p2", "change-tcp-mss": "yes"}),
        (("ppp", "profile"), {"name": "p3", "use-mpls": "no"}),
        (("ip", "hotspot", "user", "profile"), {"name": "hp1", "parent-queue": "none"}),
        (("queue", "simple"), {"name": "q1", "target": "10.0.0.9/32", "queue": "default/default"}),
    ],
)
async def test_documented_fields_are_accepted(
    sim: RouterOSSimulator, api: Any, menu: tuple[str, ...], fields: dict[str, str]
) -> None:
    """Hyphenated fields of RouterOS's menus (limit-uptime, parent-queue, ...) are writable."""
    await api.path(*menu).add(**fields)
    (row,) = sim.find("/" + "/".join(menu), name=fields["name"])
    assert all(row[name] == value for name, value in fields.items())


@pytest.mark.parametrize(
    ("menu", "fields"),
    [
        (("ip", "hotspot", "user"), {"name": "u1", "uptime": "1h"}),
        (("ip", "hotspot", "user"), {"name": "u1", "limit-": "1h"}),
        (("ppp", "profile"), {"name": "p1", "queue": "none"}),
        (("ppp", "profile"), {"name": "p1", "tcp-mss": "yes"}),
        (("ppp", "profile"), {"name": "p1", "mpls": "no"}),
    ],
)
async def test_fragments_of_field_names_are_unknown(
    sim: RouterOSSimulator, api: Any, menu: tuple[str, ...], fields: dict[str, str]
) -> None:
    """Pieces of hyphenated names get RouterOS's `unknown parameter` trap and add nothing."""
    before = len(sim.items("/" + "/".join(menu)))
    with pytest.raises(TrapError, match=r"^unknown parameter$"):
        await api.path(*menu).add(**fields)
    assert len(sim.items("/" + "/".join(menu))) == before


def test_no_menu_field_is_cut_at_a_hyphen() -> None:
    """No field name of any simulated menu starts or ends with `-` (a wrapped line)."""
    from imsys.sim.routeros_menus import MENUS

    cut = [(path, name) for path, spec in MENUS.items() for name in spec.fields
           if name.startswith("-") or name.endswith("-")]  # fmt: skip
    assert cut == []


@pytest.mark.parametrize(
    "rate",
    [
        "10M/10M",
        "512k",
        "10M/20M 12M/24M 8M/16M 10/10",
        "1M/2M 2M/4M 1M/2M 8s/8s 5 512k/1M",
        "64000/64000",
    ],
)
async def test_rate_limit_in_routeros_format_is_accepted(api: Any, rate: str) -> None:
    """rate-limit takes rx[/tx] with k/M/G and the optional burst, priority and min parts."""
    await api.path("ppp", "profile").add(name="home", **{"rate-limit": rate})
    await api.path("ip", "hotspot", "user", "profile").add(name="home", **{"rate-limit": rate})


@pytest.mark.parametrize(
    ("menu", "fields", "field_name"),
    [
        (("ppp", "profile"), {"name": "x", "rate-limit": "tenmegabits"}, "rate-limit"),
        (
            ("ppp", "profile"),
            {"name": "x", "rate-limit": "10M/10M 2M/2M 1M/1M 8/8 9"},
            "rate-limit",
        ),
        (("ip", "hotspot", "user", "profile"), {"name": "x", "rate-limit": "10X/1M"}, "rate-limit"),
        (("ppp", "secret"), {"name": "x", "remote-address": "not-an-ip"}, "remote-address"),
        (("ppp", "secret"), {"name": "x", "local-address": "10.0.0.256"}, "local-address"),
        (("ip", "hotspot", "user"), {"name": "x", "address": "10.1"}, "address"),
        (("ip", "hotspot", "user"), {"name": "x", "mac-address": "00:11:22"}, "mac-address"),
        (("ppp", "secret"), {"name": "x", "disabled": "maybe"}, "disabled"),
    ],
)
async def test_bad_values_get_routeros_traps(
    sim: RouterOSSimulator,
    api: Any,
    menu: tuple[str, ...],
    fields: dict[str, str],
    field_name: str,
) -> None:
    """A value RouterOS cannot parse is refused (category 1) on add and set; nothing changes."""
    path = api.path(*menu)
    with pytest.raises(TrapError) as caught:
        await path.add(**fields)
    assert caught.value.message == f"invalid value for argument {field_name}"
    assert caught.value.category == 1
    assert sim.find("/" + "/".join(menu), name="x") == []
    item_id = await path.add(name="x")
    with pytest.raises(TrapError, match=f"^invalid value for argument {field_name}$"):
        await path.update(**{".id": item_id, field_name: fields[field_name]})
    (row,) = sim.find("/" + "/".join(menu), name="x")
    assert row.get(field_name) != fields[field_name]


async def test_good_addresses_and_booleans_are_accepted(sim: RouterOSSimulator, api: Any) -> None:
    """IPv4 addresses and yes/no/true/false pass; booleans print as true/false."""
    secrets = api.path("ppp", "secret")
    await secrets.add(name="a", **{"remote-address": "10.0.0.2", "local-address": "10.0.0.1"})
    await secrets.add(name="b", disabled="yes")
    await secrets.add(name="c", disabled="false")
    await api.path("ip", "hotspot", "user").add(
        name="h", address="10.5.50.2", **{"mac-address": "AA:BB:CC:00:11:22"}
    )
    assert {row["name"]: row["disabled"] for row in sim.items("/ppp/secret")} == {
        "a": "false",
        "b": "true",
        "c": "false",
    }
    assert sim.find("/ppp/secret", name="a")[0]["remote-address"] == "10.0.0.2"


@pytest.mark.parametrize(
    ("menu", "name"),
    [
        (("ppp", "profile"), "default"),
        (("ppp", "profile"), "default-encryption"),
        (("ip", "hotspot", "user", "profile"), "default"),
    ],
)
async def test_builtin_profiles_cannot_be_removed(
    sim: RouterOSSimulator, api: Any, menu: tuple[str, ...], name: str
) -> None:
    """The built-in profiles trap on remove, even alongside a removable one; all stay."""
    path = api.path(*menu)
    extra = await path.add(name="extra")
    (builtin,) = [row async for row in path if row["name"] == name]
    with pytest.raises(TrapError, match="cannot remove default profile"):
        await path.remove(extra, builtin[".id"])
    names = {row["name"] async for row in path}
    assert {name, "extra"} <= names
    await path.remove(extra)
    assert "extra" not in {row["name"] async for row in path}


def _routeros_api_session(port: int) -> dict[str, Any]:
    """Login, add and print through socialwifi's RouterOS-api (synchronous, tagged)."""
    import routeros_api  # type: ignore[import-untyped]

    pool = routeros_api.RouterOsApiPool(
        "127.0.0.1", username=USER, password=PASSWORD, port=port, plaintext_login=True
    )
    try:
        api = pool.get_api()
        secrets = api.get_resource("/ppp/secret")
        secrets.add(name="carol", password="pw-1", profile="10M", service="pppoe")
        printed = secrets.get(name="carol")
        profiles = api.get_resource("/ppp/profile").get()
        try:
            secrets.add(name="carol", password="pw-2")
            duplicate = ""
        except routeros_api.exceptions.RouterOsApiCommunicationError as exc:
            duplicate = exc.original_message.decode()
        return {"printed": printed, "profiles": profiles, "duplicate": duplicate}
    finally:
        pool.disconnect()


async def test_independent_client_library_logs_in_prints_and_adds(sim: RouterOSSimulator) -> None:
    """socialwifi RouterOS-api (tags every command) logs in, adds, prints, gets traps."""
    result = await asyncio.to_thread(_routeros_api_session, sim.port)
    (carol,) = result["printed"]
    assert carol["name"] == "carol"
    assert carol["profile"] == "10M"
    assert ID.match(carol["id"])
    assert {profile["name"] for profile in result["profiles"]} >= {"default", "10M"}
    assert result["duplicate"] == "failure: secret with the same name already exists"
    assert sim.find("/ppp/secret", name="carol")[0]["password"] == "pw-1"
    assert any(".tag=" in " ".join(rec.words) for rec in sim.commands)


# -- indexes: a print by .id or by name looks up instead of scanning -----------------


def _scan(state: RouterState, menu: str, *queries: str) -> list[dict[str, str]]:
    # Any `?#` operation makes the planner scan; ANDing a repeat of the last test
    # leaves the query's meaning alone.
    return state.execute(menu, "print", {}, [*queries, queries[-1], "?#&"]).rows


def _print(state: RouterState, menu: str, *queries: str) -> list[dict[str, str]]:
    looked_up = state.execute(menu, "print", {}, list(queries)).rows
    assert looked_up == _scan(state, menu, *queries)
    return looked_up


def test_index_stays_exact_in_a_large_menu() -> None:
    state = RouterState()
    menu = "/ppp/secret"
    ids = [
        state.execute(menu, "add", {"name": f"user{n}", "password": "x"}, []).ret
        for n in range(20_000)
    ]
    [row] = _print(state, menu, "?name=user12345")
    assert row[".id"] == ids[12345]
    assert _print(state, menu, f"?.id={ids[777]}")[0]["name"] == "user777"
    # A lower-case id names the same item, as in the scan.
    assert _print(state, menu, f"?.id={ids[777].lower()}")[0]["name"] == "user777"
    assert _print(state, menu, "?name=user12345", "?password=y") == []

    state.execute(menu, "set", {".id": ids[12345], "name": "renamed"}, [])
    assert _print(state, menu, "?name=user12345") == []
    assert _print(state, menu, "?name=renamed")[0][".id"] == ids[12345]
    # The old name is free again; the new one is taken.
    state.execute(menu, "add", {"name": "user12345", "password": "x"}, [])
    with pytest.raises(Trap):
        state.execute(menu, "add", {"name": "renamed", "password": "x"}, [])
    state.execute(menu, "set", {".id": "user777", "comment": "by name"}, [])

    state.execute(menu, "remove", {".id": ids[500]}, [])
    assert _print(state, menu, "?name=user500") == []
    assert _print(state, menu, f"?.id={ids[500]}") == []

    state.reboot()
    assert _print(state, menu, f"?.id={ids[777]}") == []
    [row] = _print(state, menu, "?name=user777")
    assert row["comment"] == "by name"
    assert row[".id"] not in ids
    assert _print(state, menu, f"?.id={row['.id']}") == [row]
    assert _print(state, menu, "?name=renamed")[0][".id"] != ids[12345]
    assert len(state.rows(menu)) == 20_000


def test_index_keeps_print_order_and_duplicate_keys() -> None:
    state = RouterState()
    # Built-in profiles keep ids that sort apart from their print order.
    profile = "/ppp/profile"
    state.execute(profile, "add", {"name": "p1"}, [])
    assert _print(state, profile, "?name=default-encryption")[0][".id"] == "*FFFFFFFE"
    # Hotspot users are unique per server only: both print, in the order a scan gives.
    users = "/ip/hotspot/user"
    state.execute(users, "add", {"name": "b", "server": "s2"}, [])
    state.execute(users, "add", {"name": "a", "server": "s1"}, [])
    state.execute(users, "add", {"name": "a", "server": "s2"}, [])
    state.execute(users, "set", {".id": "b", "name": "a", "server": "s3"}, [])
    printed = _print(state, users, "?name=a")
    assert [row["server"] for row in printed] == ["s3", "s1", "s2"]
    assert _print(state, users, "?server=s1", "?name=a") == printed[1:2]
    # Active sessions are looked up by user; a subscriber leaving ends all of theirs.
    active = "/ip/hotspot/active"
    state.add_item(active, {"user": "a", "address": "10.0.0.2"})
    state.add_item(active, {"user": "a", "address": "10.0.0.3"})
    state.add_item(active, {"user": "c", "address": "10.0.0.4"})
    assert len(_print(state, active, "?user=a")) == 2
    assert state.end_sessions(active, "a") == 2
    assert _print(state, active, "?user=a") == []
    assert len(_print(state, active, "?user=c")) == 1
    state.reboot()
    assert _print(state, active, "?user=c") == []


def test_print_by_name_or_id_does_not_scan() -> None:
    state = RouterState()
    menu = "/ppp/secret"
    for n in range(1_000):
        state.execute(menu, "add", {"name": f"u{n}", "password": "x", "comment": f"c{n}"}, [])
    visited = state.rows_visited
    state.execute(menu, "print", {}, ["?name=u10"])
    state.execute(menu, "print", {}, ["?.id=*5", "?comment=c4"])
    state.execute(menu, "print", {}, ["?comment=c9", "?name=u9"])
    state.execute(menu, "print", {}, ["?name=nobody"])
    assert state.rows_visited - visited == 3
    # Everything else scans, as RouterOS does.
    visited = state.rows_visited
    state.execute(menu, "print", {}, ["?comment=c10"])
    state.execute(menu, "print", {}, ["?name=u1", "?comment=c2", "?#|"])
    assert state.rows_visited - visited == 2_000
    # A pure OR of names and ids looks each up.
    visited = state.rows_visited
    rows = state.execute(menu, "print", {}, ["?name=u1", "?name=u2", "?.id=*1", "?#||"])
    assert state.rows_visited - visited <= 3
    assert {r["name"] for r in rows.rows} >= {"u1", "u2"}


def test_index_hint_plans_only_anded_equality_or_a_pure_or() -> None:
    """Only a query whose matches must hold an indexed value (an ANDed equality, or an
    OR of equalities on indexed fields) is looked up; every other query scans."""
    booleans = frozenset({"disabled"})
    indexed = {".id", "name", "disabled"}
    assert index_hint(["?name=x"], booleans, indexed) == [("name", "x")]
    assert index_hint(["?=name=a=b"], booleans, indexed) == [("name", "a=b")]
    assert index_hint(["?.id=*1a"], booleans, indexed) == [(".id", "*1A")]
    assert index_hint(["?comment=c", "?name=x"], booleans, indexed) == [("name", "x")]
    assert index_hint([], booleans, indexed) is None
    assert index_hint(["?name"], booleans, indexed) is None
    assert index_hint(["?-name"], booleans, indexed) is None
    assert index_hint(["?<name=x"], booleans, indexed) is None
    assert index_hint(["?>name=x"], booleans, indexed) is None
    assert index_hint(["?comment=c"], booleans, indexed) is None
    assert index_hint(["?disabled=yes"], booleans, indexed) is None
    assert index_hint(["?name=x", "?#!"], booleans, indexed) is None
    assert index_hint(["?name=x", "?.id=*2", "?#|"], booleans, indexed) == [
        ("name", "x"),
        (".id", "*2"),
    ]
    assert index_hint(["?name=x", "?name=y", "?#|", "?name=z", "?#|"], booleans, indexed) == [
        ("name", "x"),
        ("name", "y"),
        ("name", "z"),
    ]
    # Not a pure OR: a test on a field without an index, an AND left on the stack, NOT.
    assert index_hint(["?name=x", "?comment=c", "?#|"], booleans, indexed) is None
    assert index_hint(["?name=x", "?name=y", "?name=z", "?#|"], booleans, indexed) is None
    assert index_hint(["?name=x", "?name=y", "?#|!"], booleans, indexed) is None
