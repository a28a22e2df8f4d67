"""``python -m imsys bench sync`` at a tiny scale: the real service, simulated routers in
a child process, every figure reported, and nothing left behind."""

from __future__ import annotations

import re
import subprocess
import sys

import asyncpg
import orjson
from redis.asyncio import Redis

from imsys.bench_sync import FIELDS, command_figures
from imsys.cli import _parser
from imsys.settings import Settings
from tests.conftest import ROOT, subprocess_env

ROUTERS, SUBSCRIBERS, API_CREATES = 1, 200, 50


def test_bench_sync_is_a_sub_form_that_leaves_the_engine_bench_alone() -> None:
    """`bench --jobs N` still parses as the engine bench; `bench sync` takes its options."""
    engine = _parser().parse_args(["bench", "--jobs", "5", "--concurrency", "3"])
    assert (engine.command, engine.bench_workload, engine.jobs) == ("bench", None, 5)
    sync = _parser().parse_args(["bench", "sync", "--routers", "2", "--subscribers", "9"])
    assert (sync.bench_workload, sync.routers, sync.subscribers) == ("sync", 2, 9)
    assert (sync.clients, sync.api_creates, sync.drift, sync.keep) == (16, 2000, 0.01, False)


def test_command_figures_count_sentences_by_verb_without_logins() -> None:
    """Only the routers asked for count; /login is left out; getall is a print."""
    before = [{"/ppp/secret/print": 2, "/login": 1}, {"/ppp/secret/add": 5}]
    after = [
        {
            "/ppp/secret/print": 5,
            "/ppp/secret/add": 4,
            "/ppp/secret/set": 1,
            "/ppp/secret/remove": 1,
            "/ppp/profile/getall": 1,
            "/cancel": 1,
            "/login": 9,
        },
        {"/ppp/secret/add": 50},
    ]
    total, kinds = command_figures(before, after, range(1))
    assert kinds == {"print": 4, "add": 4, "set": 1, "remove": 1, "other": 1}
    assert total == 11


async def test_bench_sync_reports_every_figure_and_cleans_up(
    settings: Settings, redis: Redis, database_url: str
) -> None:
    """1 router x 200 from empty: every subscriber synced, router commands counted, the
    drift healed by the reconciliation, an API change made while the router's whole
    reconciliation waits reaches the router, every field in the one JSON line on stdout;
    its database and Redis keys are gone afterwards."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "imsys",
            "bench",
            "sync",
            "--routers",
            str(ROUTERS),
            "--subscribers",
            str(SUBSCRIBERS),
            "--api-creates",
            str(API_CREATES),
            "--timeout",
            "300",
        ],
        env=subprocess_env(settings),
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [line] = done.stdout.strip().splitlines()
    result = orjson.loads(line)
    assert "timed_out" not in result
    missing = [f for f in FIELDS if result.get(f) is None]
    assert not missing, f"fields without a figure: {missing}"
    assert (result["routers"], result["subscribers"]) == (ROUTERS, SUBSCRIBERS)
    # synced_s is only set once every one is synced in the database and on its router.
    assert result["synced_s"] > 0
    assert result["synced_per_s"] > 0
    kinds = result["commands_by_kind"]
    # From empty, each subscriber needs its entry added at least once.
    assert kinds["add"] >= ROUTERS * SUBSCRIBERS
    assert result["commands_per_subscriber"] >= 1
    # The drift was 2 entries (one removed, one altered): healing needs at least an add
    # and another write.
    healing = result["reconcile_commands_by_kind"]
    assert healing["add"] >= 1
    assert healing["add"] + healing["set"] + healing["remove"] + healing.get("other", 0) >= 2
    assert result["reconcile_e2e_s"] > 0
    assert result["reconcile_job_s"] > 0
    assert result["peak_rss_mb"] > 0
    # Priority phase: every entry but the changed one drifted, and the change landed (the
    # phase only reports a time once the router holds the new password) with between none
    # and all of the reconciliation's jobs still waiting.
    assert result["priority_bulk_total"] == SUBSCRIBERS - 1
    assert result["priority_change_s"] > 0
    assert 0 <= result["priority_bulk_waiting"] <= result["priority_bulk_total"]
    assert result["priority_relayed_s"] <= result["priority_change_s"]
    assert result["priority_bulk_s"] > 0

    match = re.search(r"database (\S+), key prefix (\S+),", done.stderr)
    assert match is not None, done.stderr[-2000:]
    db_name, key_prefix = match.groups()
    conn = await asyncpg.connect(database_url.rsplit("/", 1)[0] + "/postgres")
    try:
        assert not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", db_name)
    finally:
        await conn.close()
    assert [k async for k in redis.scan_iter(match=f"{key_prefix}:*")] == []
