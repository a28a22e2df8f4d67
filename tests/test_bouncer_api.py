"""The Bouncer admin API: submitting user batches, reading their progress, bad input."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pydantic
import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from imsys.bouncer import domain as bouncer_domain
from imsys.bouncer.emails import canonical, is_valid, normalise, prepare
from imsys.errors import ConfigError
from imsys.http import api_bouncer
from imsys.http.server import build_app
from imsys.provider_settings import BouncerConfig
from imsys.settings import BouncerBatchingSettings, Settings
from imsys.streams.engine import Engine
from imsys.streams.job import Registry
from tests.bouncer_support import AUTH, TOKEN, BouncerStack, bouncer_stack


@pytest.fixture
async def bs(settings: Settings, redis: Redis, db: asyncpg.Pool) -> AsyncIterator[BouncerStack]:
    async with bouncer_stack(settings, redis, db) as stack:
        yield stack


async def post(bs: BouncerStack, body: Any) -> tuple[int, dict[str, Any]]:
    resp = await bs.api.post("/api/bouncer/batches", data=orjson.dumps(body), headers=AUTH)
    assert resp.content_type == "application/json"
    return resp.status, await resp.json()


async def test_submit_answers_201_with_the_batch(bs: BouncerStack) -> None:
    """A valid user batch is stored and returned: id, check type, queued, totals."""
    status, body = await post(bs, {"check_type": "deliverable", "emails": ["a@example.com",
                                                                         "b@example.com"]})
    assert status == 201
    assert body["check_type"] == "deliverable"
    assert body["status"] == "queued"
    assert (body["total"], body["processed"], body["submitted"]) == (2, 0, 2)
    assert body["created_at"]
    rows = await bs.db.fetch(
        "SELECT email FROM user_batch_emails WHERE user_batch_id = $1 ORDER BY id", body["id"]
    )
    assert [r["email"] for r in rows] == ["a@example.com", "b@example.com"]
    pending = "SELECT count(*) FROM user_batch_emails WHERE status = 'pending'"
    assert await bs.db.fetchval(pending) == 2


async def test_submit_normalises_and_deduplicates(bs: BouncerStack) -> None:
    """Case, spaces, plus-tags and Gmail dots are one mailbox: stored once, first spelling."""
    emails = ["  Ann@Example.com ", "ann@example.com", "ann+news@example.com",
              "J.Doe@Gmail.com", "jdoe+x@gmail.com", "bob@example.com"]
    status, body = await post(bs, {"check_type": "catchall", "emails": emails})
    assert status == 201
    assert (body["total"], body["submitted"], body["duplicates"]) == (3, 6, 3)
    rows = await bs.db.fetch(
        "SELECT e.email, g.email AS canonical FROM user_batch_emails e"
        " JOIN emails_global g ON g.id = e.email_global_id WHERE e.user_batch_id = $1"
        " ORDER BY e.id",
        body["id"],
    )
    assert [(r["email"], r["canonical"]) for r in rows] == [
        ("ann@example.com", "ann@example.com"),
        ("j.doe@gmail.com", "jdoe@gmail.com"),
        ("bob@example.com", "bob@example.com"),
    ]


async def test_same_mailbox_in_two_batches_shares_one_global_row(bs: BouncerStack) -> None:
    """A second user batch naming a known mailbox reuses its emails_global row."""
    await post(bs, {"check_type": "deliverable", "emails": ["x@example.com"]})
    await post(bs, {"check_type": "catchall", "emails": ["X+1@example.com", "y@example.com"]})
    assert await bs.db.fetchval("SELECT count(*) FROM emails_global") == 2
    distinct = "SELECT count(DISTINCT email_global_id) FROM user_batch_emails"
    assert await bs.db.fetchval(distinct) == 2


async def test_concurrent_submissions_of_the_same_new_mailboxes(bs: BouncerStack) -> None:
    """Three user batches naming the same new mailboxes at once all succeed, and each
    mailbox gets one emails_global row."""
    emails = [f"n{i}@example.com" for i in range(2000)]
    ids = await asyncio.gather(*(bs.submit(emails) for _ in range(3)))
    assert len(set(ids)) == 3
    assert await bs.db.fetchval("SELECT count(*) FROM emails_global") == 2000
    for user_batch in ids:
        assert await bs.db.fetchval(
            "SELECT count(DISTINCT email_global_id) FROM user_batch_emails"
            " WHERE user_batch_id = $1", user_batch) == 2000


async def test_get_batch_shows_progress(bs: BouncerStack) -> None:
    """GET /api/bouncer/batches/{id} answers the batch's status, total and processed."""
    _, created = await post(bs, {"check_type": "deliverable", "emails": ["a@example.com"]})
    resp = await bs.api.get(f"/api/bouncer/batches/{created['id']}", headers=AUTH)
    assert resp.status == 200
    body = await resp.json()
    assert {k: body[k] for k in ("id", "check_type", "status", "total", "processed")} == {
        "id": created["id"], "check_type": "deliverable", "status": "queued", "total": 1,
        "processed": 0,
    }


async def test_get_unknown_batch_is_404(bs: BouncerStack) -> None:
    """An id that is no user batch (or past 64 bits) answers 404 JSON."""
    for bad in ("999999", "99999999999999999999999"):
        resp = await bs.api.get(f"/api/bouncer/batches/{bad}", headers=AUTH)
        assert resp.status == 404
        assert "not found" in (await resp.json())["error"]


async def test_list_is_newest_first_and_limited(bs: BouncerStack) -> None:
    """GET /api/bouncer/batches lists user batches newest first, at most ``limit``."""
    ids = [(await post(bs, {"check_type": "deliverable", "emails": [f"u{i}@example.com"]}))[1]["id"]
           for i in range(3)]
    resp = await bs.api.get("/api/bouncer/batches?limit=2", headers=AUTH)
    assert resp.status == 200
    assert [b["id"] for b in (await resp.json())["batches"]] == [ids[2], ids[1]]
    resp = await bs.api.get("/api/bouncer/batches", headers=AUTH)
    assert [b["id"] for b in (await resp.json())["batches"]] == ids[::-1]
    for bad in ("0", "x", "1001"):
        resp = await bs.api.get(f"/api/bouncer/batches?limit={bad}", headers=AUTH)
        assert resp.status == 400


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"check_type": "deliverable", "emails": []}, "emails is empty"),
        ({"check_type": "syntax", "emails": ["a@example.com"]},
         "check_type: Input should be 'deliverable' or 'catchall'"),
        ({"emails": ["a@example.com"]}, "check_type: Field required"),
        ({"check_type": "deliverable"}, "emails: Field required"),
        ({"check_type": "deliverable", "emails": "a@example.com"},
         "emails: Input should be a valid list"),
        ({"check_type": "deliverable", "emails": ["a@example.com", 7]},
         "emails.1: Input should be a valid string"),
        ({"check_type": "deliverable", "emails": ["a@example.com"], "x": 1},
         "x: Extra inputs are not permitted"),
        (["a@example.com"], "request body must be a JSON object"),
    ],
)
async def test_bad_input_is_400_with_a_clear_message(
    bs: BouncerStack, body: Any, message: str
) -> None:
    """Each kind of bad request answers 400 JSON saying what is wrong, and stores nothing."""
    status, answer = await post(bs, body)
    assert status == 400
    assert message in answer["error"]
    assert await bs.db.fetchval("SELECT count(*) FROM user_batches") == 0


async def test_invalid_addresses_are_named_with_their_index(bs: BouncerStack) -> None:
    """Invalid addresses make a 400 naming how many, and the first few with their index."""
    emails = ["ok@example.com", "not-an-address", "a@b", "ok2@example.com", "x@@y.com",
              "sp ace@example.com", "@example.com", "z@example..com", "fine@example.com"]
    status, answer = await post(bs, {"check_type": "deliverable", "emails": emails})
    assert status == 400
    error = answer["error"]
    assert error.startswith("6 of 9 e-mail addresses are invalid: ")
    assert "#1 'not-an-address'" in error
    assert "#2 'a@b'" in error
    assert "#6 '@example.com'" in error
    assert "(and 1 more)" in error
    assert "#7" not in error
    assert await bs.db.fetchval("SELECT count(*) FROM user_batch_emails") == 0


async def test_more_than_a_million_emails_is_400(bs: BouncerStack) -> None:
    """1,000,001 addresses are refused with the limit in the message; nothing stored.
    (The 16 MB body is past the default 1 MiB body limit, a 413; the count is checked
    on a server whose http.max_body_bytes lets it through.)"""
    body = b'{"check_type":"deliverable","emails":[' + b",".join(
        b'"u%d@x.io"' % i for i in range(1_000_001)
    ) + b"]}"
    resp = await bs.api.post("/api/bouncer/batches", data=body, headers=AUTH)
    assert resp.status == 413
    app = build_app(bs.deps.engine, bs.deps.redis, bs.db, TOKEN, max_body_bytes=32 * 1024**2)
    api_bouncer.add_routes(app, bs.deps)
    async with TestClient(TestServer(app, host="127.0.0.1")) as api:
        resp = await api.post("/api/bouncer/batches", data=body, headers=AUTH)
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert "1,000,001" in error
    assert "at most 1,000,000" in error
    assert await bs.db.fetchval("SELECT count(*) FROM user_batches") == 0


async def test_not_json_and_no_token(bs: BouncerStack) -> None:
    """A body that is not JSON is 400; a call without the bearer token is 401."""
    resp = await bs.api.post("/api/bouncer/batches", data=b"{nope", headers=AUTH)
    assert resp.status == 400
    assert "not valid JSON" in (await resp.json())["error"]
    resp = await bs.api.post("/api/bouncer/batches", data=b"{}")
    assert resp.status == 401


def test_address_rules() -> None:
    """Validation accepts ordinary addresses and refuses malformed ones; canonical strips
    plus-tags everywhere and dots only for Gmail."""
    good = ["a@b.co", "first.last@sub.example.org", "o'brien+x@example.ie", "u@xn--p1ai.xn--p1ai"]
    bad = ["a@b", "a@b.c", ".a@b.com", "a.@b.com", "a..b@c.com", "a@-b.com", "a b@c.com",
           "ä@b.com", "a@b_c.com", "x" * 65 + "@b.com", "a@" + "b" * 250 + ".com", ""]
    assert all(is_valid(normalise(e)) for e in good)
    assert not any(is_valid(normalise(e)) for e in bad)
    assert canonical("j.doe+news@gmail.com") == "jdoe@gmail.com"
    assert canonical("j.doe+news@googlemail.com") == "jdoe@googlemail.com"
    assert canonical("j.doe+news@example.com") == "j.doe@example.com"
    assert canonical("+only@example.com") == "+only@example.com"
    prepared = prepare(["B@x.io", "b+1@x.io", "c@x.io"])
    assert (prepared.emails, prepared.canonicals, prepared.duplicates) == (
        ["b@x.io", "c@x.io"], ["b@x.io", "c@x.io"], 1)


async def test_whole_stack_finishes_a_batch_on_its_timers(
    settings: Settings, redis: Redis, db: asyncpg.Pool, prefix: str
) -> None:
    """The running engine's timers create, check and download on their own: a batch
    submitted through the API reads completed a moment later."""
    async with bouncer_stack(settings, redis, db, create_every_s=0.1, status_every_s=0.2,
                             batch_size=7) as bs:
        bs.sim.set_speed(queue_seconds=0.05, emails_per_second=100_000)
        engine = Engine(redis, bs.deps.settings, Registry(), consumer=f"{prefix}-run",
                        streams=("bouncer",))
        deps = dataclasses.replace(bs.deps, engine=engine)
        bouncer_domain.register(deps)
        assert sorted(t.name for t in engine.timers) == [
            "bouncer_create_catchall", "bouncer_create_deliverable",
            "bouncer_status_catchall", "bouncer_status_deliverable"]
        run = asyncio.create_task(engine.run())
        try:
            _, body = await post(bs, {"check_type": "deliverable",
                                      "emails": [f"u{i}@example.com" for i in range(20)]})
            deadline = time.monotonic() + 15
            while True:
                resp = await bs.api.get(f"/api/bouncer/batches/{body['id']}", headers=AUTH)
                progress = await resp.json()
                if progress["status"] == "completed" or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            assert (progress["status"], progress["processed"]) == ("completed", 20)
            assert [b.quantity for b in bs.sim.batches()] == [7, 7, 6]
        finally:
            engine.stop()
            await run


async def test_no_api_key_means_no_timers(bs: BouncerStack, prefix: str) -> None:
    """Without a Bouncer API key only the download handler is registered: no timer would
    get anything but refusals."""
    settings = bs.deps.settings.model_copy(update={"bouncer": BouncerConfig()})
    engine = Engine(bs.deps.redis, settings, Registry(), consumer=f"{prefix}-nokey")
    bouncer_domain.register(dataclasses.replace(bs.deps, settings=settings, engine=engine))
    assert engine.timers == []
    assert engine.registry.types("bouncer") == ["download_results"]


async def test_creating_timeout_must_exceed_the_call_timeout(bs: BouncerStack,
                                                             prefix: str) -> None:
    """A creating_timeout_s within bouncer.timeout is refused at start-up: an intent could
    be given up while its call is still in flight."""
    settings = bs.deps.settings.model_copy(
        update={"bouncer_batching": BouncerBatchingSettings(creating_timeout_s=5.0)})
    engine = Engine(bs.deps.redis, settings, Registry(), consumer=f"{prefix}-cfg")
    with pytest.raises(ConfigError, match=r"creating_timeout_s must exceed bouncer\.timeout"):
        bouncer_domain.register(dataclasses.replace(bs.deps, settings=settings, engine=engine))


def test_rate_limit_stop_may_not_exceed_the_limit() -> None:
    """A creation stop above the provider's limit is a configuration error."""
    with pytest.raises(pydantic.ValidationError, match="rate_limit_stop must not exceed"):
        BouncerBatchingSettings(rate_limit_per_min=200, rate_limit_stop=201)
    assert BouncerBatchingSettings().rate_limit_stop == 180
