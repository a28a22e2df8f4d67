"""Bulk import of subscribers (issue 14): POST /api/subscribers/bulk and
``python -m imsys import FILE.csv``, all or nothing, with each subscriber's sync."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from imsys.http import api_network
from imsys.http.server import build_app
from imsys.settings import Settings
from imsys.sync.jobs import sync_job_id
from tests.sync_support import Stack
from tests.test_cli import imsys
from tests.test_http_network_api import AUTH, TOKEN, subscriber_body

Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def api(stack: Stack) -> AsyncIterator[Client]:
    """The admin app with the network routes, served for real, with the token."""
    app = build_app(stack.engine, stack.deps.redis, stack.db, TOKEN)
    api_network.add_routes(app, stack.deps)
    async with TestClient(TestServer(app, host="127.0.0.1"), headers=AUTH) as client:
        yield client


def rows(stack: Stack, n: int, tag: str) -> list[dict[str, Any]]:
    return [subscriber_body(stack, f"{stack.prefix}-{tag}-{i}") for i in range(n)]


async def counts(stack: Stack) -> tuple[int, int]:
    """This test's tenant's subscribers, and the outbox rows syncing any of them."""
    subs = await stack.db.fetchval(
        "SELECT count(*) FROM subscribers WHERE tenant_id = $1", stack.tenant_id
    )
    ids = [
        r["id"]
        for r in await stack.db.fetch(
            "SELECT id FROM subscribers WHERE tenant_id = $1", stack.tenant_id
        )
    ]
    outbox = await stack.db.fetchval(
        "SELECT count(*) FROM outbox WHERE job_id = ANY($1::text[])",
        [sync_job_id(i) for i in ids],
    )
    return int(subs), int(outbox)


async def check_created(stack: Stack, ids: list[int], usernames: list[str]) -> None:
    """Every id is a pending subscriber of this tenant with the given username, and has
    exactly one outbox row of the sync job `subscriber_changed` queues."""
    found = await stack.db.fetch(
        "SELECT id, username, tenant_id, sync_status FROM subscribers "
        "WHERE id = ANY($1::bigint[]) ORDER BY id",
        ids,
    )
    assert [r["username"] for r in found] == usernames
    assert {(r["tenant_id"], r["sync_status"]) for r in found} == {(stack.tenant_id, "pending")}
    outbox = await stack.db.fetch(
        "SELECT job_id, type, payload::text AS payload FROM outbox WHERE job_id = ANY($1::text[])",
        [sync_job_id(i) for i in ids],
    )
    assert len(outbox) == len(ids)
    assert {r["type"] for r in outbox} == {"sync_subscriber"}
    by_job = {r["job_id"]: orjson.loads(r["payload"]) for r in outbox}
    assert all(by_job[sync_job_id(i)]["subscriber_id"] == i for i in ids)


async def test_bulk_of_1000_creates_them_with_their_outbox_rows(api: Client, stack: Stack) -> None:
    """1,000 rows as a JSON array: 201 with their ids in row order, each with its sync job."""
    body = rows(stack, 1000, "k")
    resp = await api.post("/api/subscribers/bulk", json=body)
    assert resp.status == 201, await resp.text()
    answer = await resp.json()
    assert answer["created"] == 1000
    assert len(answer["ids"]) == 1000
    assert answer["ids"] == sorted(answer["ids"])
    await check_created(stack, answer["ids"], [r["username"] for r in body])
    assert await counts(stack) == (1000, 1000)


async def test_bulk_with_three_bad_rows_writes_nothing(api: Client, stack: Stack) -> None:
    """3 bad rows among 50: 400 naming exactly those indexes, and nothing is written."""
    await stack.add_subscriber(f"{stack.prefix}-taken")
    before = await counts(stack)
    body = rows(stack, 50, "bad")
    body[3]["service"] = "dialup"  # not a service
    body[17]["package_id"] = 2**62  # no such package
    body[41]["username"] = f"{stack.prefix}-taken"  # already on the router
    resp = await api.post("/api/subscribers/bulk", json=body)
    assert resp.status == 400, await resp.text()
    answer = await resp.json()
    assert [r["index"] for r in answer["rows"]] == [3, 17, 41]
    assert answer["count"] == 3
    assert "service" in answer["rows"][0]["error"]
    assert "package" in answer["rows"][1]["error"]
    assert "already has" in answer["rows"][2]["error"]
    assert "nothing was written" in answer["error"]
    assert await counts(stack) == before


async def test_bulk_names_a_username_repeated_within_the_batch(api: Client, stack: Stack) -> None:
    """The second row with the same username on the router is named; nothing is written."""
    before = await counts(stack)
    body = rows(stack, 3, "dup")
    body[2]["username"] = body[0]["username"]
    resp = await api.post("/api/subscribers/bulk", json=body)
    assert resp.status == 400, await resp.text()
    answer = await resp.json()
    assert [r["index"] for r in answer["rows"]] == [2]
    assert "repeats row 0" in answer["rows"][0]["error"]
    assert await counts(stack) == before


async def test_bulk_as_json_lines(api: Client, stack: Stack) -> None:
    """JSON lines (application/x-ndjson) are taken as one row a line."""
    body = rows(stack, 20, "nd")
    data = b"\n".join(orjson.dumps(r) for r in body) + b"\n"
    resp = await api.post(
        "/api/subscribers/bulk", data=data, headers={"Content-Type": "application/x-ndjson"}
    )
    assert resp.status == 201, await resp.text()
    answer = await resp.json()
    assert answer["created"] == 20
    await check_created(stack, answer["ids"], [r["username"] for r in body])


async def test_bulk_body_past_its_own_limit_is_413(stack: Stack) -> None:
    """A bulk body past http.max_bulk_bytes is a JSON 413 naming that setting; one past
    the global max_body_bytes but within it is read."""
    settings = stack.deps.settings
    small = settings.model_copy(
        update={"http": settings.http.model_copy(update={"max_bulk_bytes": 200_000})}
    )
    deps = dataclasses.replace(stack.deps, settings=small)
    app = build_app(stack.engine, stack.deps.redis, stack.db, TOKEN, max_body_bytes=50_000)
    api_network.add_routes(app, deps)
    async with TestClient(TestServer(app, host="127.0.0.1"), headers=AUTH) as client:
        resp = await client.post("/api/subscribers/bulk", json=rows(stack, 3000, "big"))
        assert resp.status == 413, await resp.text()
        answer = await resp.json()
        assert "http.max_bulk_bytes" in answer["error"]
        resp = await client.post("/api/subscribers/bulk", json=rows(stack, 500, "mid"))
        assert resp.status == 201, await resp.text()
    assert (await counts(stack))[0] == 500


async def test_cli_imports_a_csv(stack: Stack, settings: Settings, tmp_path: Path) -> None:
    """import FILE.csv creates every row and prints the ids; a bad CSV exits 2 naming rows."""
    good = tmp_path / "good.csv"
    header = "tenant_id,router_id,package_id,username,password,service,phone"
    lines = [
        f"{stack.tenant_id},{stack.router_id},{stack.basic},{stack.prefix}-csv-{i},pw-{i}-x,"
        f"pppoe,{'+254700000' + str(100 + i) if i % 2 else ''}"
        for i in range(5)
    ]
    good.write_text("\n".join([header, *lines]) + "\n")
    done = imsys(settings, "import", str(good))
    assert done.returncode == 0, done.stderr
    answer = orjson.loads(done.stdout)
    assert answer["created"] == 5
    await check_created(stack, answer["ids"], [f"{stack.prefix}-csv-{i}" for i in range(5)])
    phones = await stack.db.fetch(
        "SELECT phone FROM subscribers WHERE id = ANY($1::bigint[]) ORDER BY id", answer["ids"]
    )
    assert [r["phone"] for r in phones] == [None, "+254700000101", None, "+254700000103", None]

    before = await counts(stack)
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "\n".join(
            [
                header,
                f"{stack.tenant_id},{stack.router_id},{stack.basic},{stack.prefix}-csv-new,p,pppoe,",
                f"{stack.tenant_id},{stack.router_id},{stack.basic},{stack.prefix}-csv-0,p,pppoe,",
                f"{stack.tenant_id},{stack.router_id},{stack.basic},x,p,radius,",
            ]
        )
        + "\n"
    )
    failed = imsys(settings, "import", str(bad))
    assert failed.returncode == 2, failed.stdout
    report = orjson.loads(failed.stderr[failed.stderr.index("{") :])
    assert [r["index"] for r in report["rows"]] == [1, 2]
    assert await counts(stack) == before
