"""``python -m imsys`` as an operator runs it: a real subprocess, real Redis and PostgreSQL."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from redis.asyncio import Redis

from imsys.settings import STREAMS, Settings
from imsys.streams.engine import Engine
from imsys.streams.job import Registry
from tests.conftest import ROOT, subprocess_env

ENTRY_ID = re.compile(r"^\d+-\d+$")
OTP = '{"recipient": "+15550100", "otp": "123456", "user_name": "ann", "expires_at": 1}'


def imsys(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m imsys ARGS`` with this test's settings; never waits on a prompt."""
    return subprocess.run(
        [sys.executable, "-m", "imsys", *args],
        env=subprocess_env(settings, **env),
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def make_dead_letter(redis: Redis, settings: Settings, stream: str = "billing") -> str:
    """Process an entry of a type nobody handles: it is dead-lettered at once."""
    engine = Engine(redis, settings, Registry(), consumer="test-cli")
    await engine.prepare()
    await redis.xadd(
        engine.keys.stream(stream), {"type": "garbage", "payload": '{"x": 1}', "attempt": "1"}
    )
    assert await engine.consumers[stream].process_once(block_ms=10) == 1
    [newest] = await engine.dead_letters.list(limit=1)
    return newest.id


# --- enqueue -----------------------------------------------------------------------------


async def test_enqueue_prints_the_entry_id(redis: Redis, settings: Settings, prefix: str) -> None:
    """enqueue puts one job on the stream and prints its entry id."""
    r = imsys(settings, "enqueue", "events", "whatsapp_otp", OTP)
    assert r.returncode == 0, r.stderr
    entry_id = r.stdout.strip()
    assert ENTRY_ID.match(entry_id)
    assert await redis.xlen(f"{prefix}:events") == 1
    [(eid, fields)] = await redis.xrange(f"{prefix}:events")
    assert eid == entry_id
    assert fields["type"] == "whatsapp_otp"
    assert orjson.loads(fields["payload"])["recipient"] == "+15550100"
    assert fields["attempt"] == "1"


async def test_enqueue_with_job_id_twice_is_a_duplicate(
    redis: Redis, settings: Settings, prefix: str
) -> None:
    """A second enqueue with the same --job-id while the first waits is dropped, and says so."""
    first = imsys(settings, "enqueue", "events", "whatsapp_otp", OTP, "--job-id", "otp-ann-1")
    assert first.returncode == 0, first.stderr
    assert ENTRY_ID.match(first.stdout.strip())
    second = imsys(settings, "enqueue", "events", "whatsapp_otp", OTP, "--job-id", "otp-ann-1")
    assert second.returncode == 0, second.stderr
    assert "duplicate" in second.stdout
    assert await redis.xlen(f"{prefix}:events") == 1


async def test_enqueue_with_delay_goes_to_the_delayed_store(
    redis: Redis, settings: Settings, prefix: str
) -> None:
    """--delay keeps the job out of the stream, in the delayed store, until it is due."""
    r = imsys(settings, "enqueue", "events", "whatsapp_otp", OTP, "--delay", "60")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "delayed"
    assert await redis.zcard(f"{prefix}:delayed:events") == 1
    assert await redis.xlen(f"{prefix}:events") == 0


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("{not json", "payload is not valid JSON"),
        ("[1, 2]", "payload must be a JSON object"),
        ('"text"', "payload must be a JSON object"),
    ],
)
async def test_enqueue_rejects_a_bad_payload(
    redis: Redis, settings: Settings, prefix: str, payload: str, message: str
) -> None:
    """A payload that is not a JSON object exits 2 with a clear message and enqueues nothing."""
    r = imsys(settings, "enqueue", "events", "whatsapp_otp", payload)
    assert r.returncode == 2
    assert message in r.stderr
    assert r.stdout == ""
    assert await redis.exists(f"{prefix}:events") == 0


def test_enqueue_rejects_an_unknown_stream(settings: Settings) -> None:
    """A stream imsys does not have is a usage error (exit 2) listing the real ones."""
    r = imsys(settings, "enqueue", "mail", "x", "{}")
    assert r.returncode == 2
    assert "invalid choice: 'mail'" in r.stderr
    assert "sync" in r.stderr


# --- check and queues -------------------------------------------------------------------------


def test_check_is_healthy(settings: Settings) -> None:
    """check exits 0 and prints JSON saying Redis and PostgreSQL are ok."""
    r = imsys(settings, "check")
    assert r.returncode == 0, r.stderr
    body = orjson.loads(r.stdout)
    assert body["healthy"] is True
    assert body["redis"] == "ok"
    assert body["postgres"] == "ok"
    assert set(body["groups"]) == set(STREAMS)


def test_check_fails_when_redis_is_down(settings: Settings) -> None:
    """check exits 1 and says Redis is unavailable when nothing listens at its URL."""
    r = imsys(settings, "check", IMSYS_REDIS__URL=f"redis://127.0.0.1:{free_port()}/0")
    assert r.returncode == 1
    body = orjson.loads(r.stdout)
    assert body["healthy"] is False
    assert body["redis"].startswith("unavailable")
    assert body["postgres"] == "ok"


def test_check_fails_when_postgres_is_down(settings: Settings) -> None:
    """check exits 1 and says PostgreSQL is unavailable when nothing listens at its URL."""
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/imsys"
    r = imsys(settings, "check", IMSYS_DATABASE__URL=url)
    assert r.returncode == 1
    body = orjson.loads(r.stdout)
    assert body["healthy"] is False
    assert body["redis"] == "ok"
    assert body["postgres"].startswith("unavailable")


async def test_queues_json_lists_the_four_streams(redis: Redis, settings: Settings) -> None:
    """queues --json prints every stream's figures, the dead-letter count and processes."""
    await make_dead_letter(redis, settings)
    put = imsys(settings, "enqueue", "sync", "sync_subscriber", '{"subscriber_id": 1}')
    assert put.returncode == 0, put.stderr
    r = imsys(settings, "queues", "--json")
    assert r.returncode == 0, r.stderr
    body = orjson.loads(r.stdout)
    assert [s["stream"] for s in body["streams"]] == list(STREAMS)
    by_name = {s["stream"]: s for s in body["streams"]}
    assert by_name["sync"]["length"] == 1
    assert by_name["billing"]["dead"] == 1
    assert body["dead_letters"] == 1
    assert isinstance(body["processes"], list)


def test_queues_prints_a_table(settings: Settings) -> None:
    """queues without --json prints a header and one row per stream."""
    r = imsys(settings, "queues")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["stream", "length", "pending"]
    assert [line.split()[0] for line in lines[1:5]] == list(STREAMS)
    assert "dead letters: 0" in r.stdout


# --- dead letters -----------------------------------------------------------------------------


async def test_dlq_list_shows_dead_letters(redis: Redis, settings: Settings) -> None:
    """dlq list prints one JSON object per dead letter with its reason."""
    dead_id = await make_dead_letter(redis, settings)
    r = imsys(settings, "dlq", "list")
    assert r.returncode == 0, r.stderr
    [line] = r.stdout.splitlines()
    letter = orjson.loads(line)
    assert letter["id"] == dead_id
    assert letter["stream"] == "billing"
    assert letter["type"] == "garbage"
    assert letter["error"].startswith("UnknownJobType")
    assert imsys(settings, "dlq", "list", "--stream", "sync").stdout == ""


async def test_dlq_replay_puts_the_job_back(redis: Redis, settings: Settings, prefix: str) -> None:
    """dlq replay ID moves the job back onto its stream and removes the dead letter."""
    dead_id = await make_dead_letter(redis, settings)
    r = imsys(settings, "dlq", "replay", dead_id)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"replayed {dead_id} as ")
    assert await redis.xlen(f"{prefix}:billing") == 1
    [(_, fields)] = await redis.xrange(f"{prefix}:billing")
    assert fields["type"] == "garbage"
    assert await redis.xlen(f"{prefix}:dead") == 0

    again = imsys(settings, "dlq", "replay", dead_id)
    assert again.returncode == 1
    assert f"no dead letter {dead_id}" in again.stderr


def test_dlq_replay_needs_an_id_or_all(settings: Settings) -> None:
    """dlq replay with neither an id nor --all exits 2 saying what is missing."""
    r = imsys(settings, "dlq", "replay")
    assert r.returncode == 2
    assert "--all" in r.stderr


async def test_dlq_replay_all(redis: Redis, settings: Settings, prefix: str) -> None:
    """dlq replay --all --stream S replays that stream's dead letters only."""
    await make_dead_letter(redis, settings, "billing")
    await make_dead_letter(redis, settings, "events")
    r = imsys(settings, "dlq", "replay", "--all", "--stream", "events")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "replayed 1"
    assert await redis.xlen(f"{prefix}:events") == 1
    assert await redis.xlen(f"{prefix}:billing") == 0
    assert await redis.xlen(f"{prefix}:dead") == 1


async def test_dlq_purge(redis: Redis, settings: Settings, prefix: str) -> None:
    """dlq purge --yes drops every dead letter and says how many."""
    await make_dead_letter(redis, settings)
    await make_dead_letter(redis, settings)
    r = imsys(settings, "dlq", "purge", "--yes")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "purged 2"
    assert await redis.xlen(f"{prefix}:dead") == 0


# --- migrate and configuration -----------------------------------------------------------------


def test_migrate_is_idempotent(settings: Settings) -> None:
    """migrate applies the schema and can run again at once with the same result."""
    for _ in range(2):
        r = imsys(settings, "migrate")
        assert r.returncode == 0, r.stderr
        assert "schema applied" in r.stdout


def test_bad_config_path_exits_2(settings: Settings, tmp_path: Path) -> None:
    """--config naming a missing file exits 2 with a message naming the file."""
    missing = tmp_path / "missing.toml"
    r = imsys(settings, "--config", str(missing), "check")
    assert r.returncode == 2
    assert f"config file not found: {missing}" in r.stderr
    assert "Traceback" not in r.stderr


def test_invalid_config_exits_2(settings: Settings, tmp_path: Path) -> None:
    """An invalid config file (or IMSYS_CONFIG) exits 2 naming the problem."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[http]\nport = 'eighty'\n")
    r = imsys(settings, "--config", str(bad), "queues")
    assert r.returncode == 2
    assert "http.port" in r.stderr
    r = imsys(settings, "queues", IMSYS_CONFIG=str(bad))
    assert r.returncode == 2
    assert "http.port" in r.stderr


def test_run_refuses_an_open_host_with_the_example_token(settings: Settings) -> None:
    """run exits 2 before listening on 0.0.0.0 while the token is still change-me."""
    r = imsys(settings, "run", IMSYS_HTTP__HOST="0.0.0.0", IMSYS_HTTP__TOKEN="change-me")
    assert r.returncode == 2
    assert "IMSYS_HTTP__TOKEN" in r.stderr
