"""The status checker and ``download_results``: results stored, user batches completed or
failed, Bouncer's odd answers handled."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from imsys.bouncer.results import DownloadResults, download_results, to_columns
from imsys.settings import Settings
from imsys.sim.bouncer import Rule
from imsys.streams.job import Job
from tests.bouncer_support import BouncerStack, addresses, bouncer_stack


@pytest.fixture
async def bs(settings: Settings, redis: Redis, db: asyncpg.Pool) -> AsyncIterator[BouncerStack]:
    async with bouncer_stack(settings, redis, db, capacity=15, batch_size=10,
                             max_download_attempts=2) as stack:
        yield stack


async def sim_id(bs: BouncerStack, batch_id: int) -> str:
    return str(await bs.db.fetchval(
        "SELECT bouncer_batch_id FROM bouncer_batches WHERE id = $1", batch_id))


async def status_of(bs: BouncerStack, batch_id: int) -> str:
    return str(await bs.db.fetchval("SELECT status FROM bouncer_batches WHERE id = $1", batch_id))


async def test_completed_batch_stores_results_and_completes_user_batches(
    bs: BouncerStack,
) -> None:
    """Completed at Bouncer → download queued (job_id = batch id) → results stored as
    Bouncer gave them, e-mails done, user batches completed with processed = total."""
    ann = await bs.submit(addresses("ann", 6))
    bob = await bs.submit(addresses("bob", 4))
    [batch] = (await bs.create()).created
    bouncer_id = await sim_id(bs, batch)
    assert (await bs.check()).completed == []
    bs.sim.complete_batch(bouncer_id)
    checked = await bs.check()
    assert (checked.completed, checked.downloads_queued) == ([batch], 1)
    [(_, fields)] = await bs.deps.redis.xrange(bs.engine.keys.stream("bouncer"))
    assert (fields["type"], fields["job_id"]) == ("download_results", bouncer_id)
    assert orjson.loads(fields["payload"]) == {"bouncer_batch_id": bouncer_id}
    assert await bs.download() == 1
    assert await status_of(bs, batch) == "downloaded"
    rows = await bs.db.fetch(
        "SELECT g.email, r.status, r.reason, r.score FROM email_deliverable_results r"
        " JOIN emails_global g ON g.id = r.email_global_id")
    assert len(rows) == 10
    for r in rows:
        expected = bs.sim.result_for(r["email"])
        assert (r["status"], r["reason"], r["score"]) == (
            expected["status"], expected["reason"], expected["score"])
    for user_batch, total in ((ann, 6), (bob, 4)):
        row = await bs.user_batch(user_batch)
        assert (row["status"], row["processed"], row["total"], row["failed"]) == (
            "completed", total, total, 0)
        assert row["completed_at"] is not None
    assert (await bs.statuses()) == {"done": 10}
    # Nothing is queued again for a stored batch.
    assert (await bs.check()).downloads_queued == 0


async def test_split_user_batch_completes_when_its_last_part_is_stored(bs: BouncerStack) -> None:
    """A user batch split over two Bouncer batches shows progress after the first part and
    completes only after the second."""
    ann = await bs.submit(addresses("ann", 5))
    bob = await bs.submit(addresses("bob", 12))
    first, second = (await bs.create()).created
    bs.sim.complete_batch(await sim_id(bs, first))
    await bs.check()
    await bs.download()
    assert (await bs.user_batch(ann))["status"] == "completed"
    row = await bs.user_batch(bob)
    assert (row["status"], row["processed"]) == ("processing", 5)
    bs.sim.complete_batch(await sim_id(bs, second))
    await bs.check()
    await bs.download()
    row = await bs.user_batch(bob)
    assert (row["status"], row["processed"]) == ("completed", 12)


async def test_download_reports_progress(bs: BouncerStack) -> None:
    """The handler reports progress through job.progress, ending at done = total."""
    await bs.submit(addresses("u", 10))
    [batch] = (await bs.create()).created
    bouncer_id = await sim_id(bs, batch)
    bs.sim.complete_batch(bouncer_id)
    await bs.check()
    reports: list[tuple[int, int | None]] = []

    async def report(_job: Job[Any], done: int, total: int | None, _note: str | None) -> None:
        reports.append((done, total))

    job = Job(stream="bouncer", id="1-0", type="download_results",
              payload=DownloadResults(bouncer_batch_id=bouncer_id), attempt=1, job_id=bouncer_id,
              enqueued_at=None, fields={}, report=report)
    await download_results(bs.ctx, job)
    assert reports[-1] == (10, 10)


async def test_catchall_results_come_from_accept_all(bs: BouncerStack) -> None:
    """For a catch-all check, is_catchall is the result's domain acceptAll."""
    emails = ["x@catchall.test", "y@example.com", "z@catchall.test"]
    user_batch = await bs.submit(emails, check_type="catchall")
    [batch] = (await bs.create("catchall")).created
    bs.sim.complete_batch(await sim_id(bs, batch))
    await bs.check("catchall")
    await bs.download()
    rows = await bs.db.fetch(
        "SELECT g.email, r.is_catchall, r.domain FROM email_catchall_results r"
        " JOIN emails_global g ON g.id = r.email_global_id ORDER BY g.email")
    assert [(r["email"], r["is_catchall"], r["domain"]) for r in rows] == [
        ("x@catchall.test", True, "catchall.test"),
        ("y@example.com", False, "example.com"),
        ("z@catchall.test", True, "catchall.test"),
    ]
    assert await bs.db.fetchval("SELECT count(*) FROM email_deliverable_results") == 0
    assert (await bs.user_batch(user_batch))["status"] == "completed"


async def test_results_map_to_the_mailbox_without_modifiers(bs: BouncerStack) -> None:
    """Bouncer verifies the address as given; its result is stored under the mailbox,
    plus-tag (and Gmail dots) stripped."""
    bs.sim.add_rule(Rule(local_prefix="j.doe", status="undeliverable", reason="rejected_email"))
    user_batch = await bs.submit(["J.Doe+News@Gmail.com", "ann+x@example.com"])
    [batch] = (await bs.create()).created
    [sent] = bs.sim.batches()
    assert set(sent.emails) == {"j.doe+news@gmail.com", "ann+x@example.com"}
    bs.sim.complete_batch(sent.batch_id)
    await bs.check()
    await bs.download()
    rows = await bs.db.fetch(
        "SELECT g.email, r.status FROM email_deliverable_results r"
        " JOIN emails_global g ON g.id = r.email_global_id ORDER BY g.email")
    assert [(r["email"], r["status"]) for r in rows] == [
        ("ann@example.com", bs.sim.result_for("ann+x@example.com")["status"]),
        ("jdoe@gmail.com", "undeliverable"),
    ]
    assert (await bs.user_batch(user_batch))["processed"] == 2
    assert await status_of(bs, batch) == "downloaded"


async def test_failed_batch_fails_its_user_batches(bs: BouncerStack) -> None:
    """Bouncer fails a batch: it and every user batch in it are marked failed (their
    pending e-mails too); other user batches go on; an error is logged."""
    ann = await bs.submit(addresses("ann", 5))
    bob = await bs.submit(addresses("bob", 25))
    cat = await bs.submit(addresses("cat", 10))
    await bs.prefill_rate(178)
    first, second = (await bs.create()).created
    assert await bs.composition(first) == [(ann, 5), (bob, 5)]
    assert await bs.composition(second) == [(bob, 10)]
    bs.sim.fail_batch(await sim_id(bs, first))
    await bs.db.execute("TRUNCATE rate_limit_tracker")
    with capture_logs() as logs:
        checked = await bs.check()
    assert checked.failed == [first]
    [alert] = [e for e in logs if e["event"] == "bouncer_batch_failed"]
    assert (alert["log_level"], alert["user_batches"]) == ("error", [ann, bob])
    assert await status_of(bs, first) == "failed"
    assert (await bs.user_batch(ann))["status"] == "failed"
    # Bob: 5 in the failed batch and 10 still pending fail; 10 in the second batch wait.
    row = await bs.user_batch(bob)
    assert (row["status"], row["failed"], row["processed"]) == ("failed", 15, 0)
    assert (await bs.user_batch(cat))["status"] == "queued"
    # Bob's part in the second batch still gets its results; Cat goes on normally.
    await bs.run_to_end()
    assert (await bs.user_batch(cat))["status"] == "completed"
    row = await bs.user_batch(bob)
    assert (row["status"], row["processed"], row["failed"]) == ("failed", 10, 15)
    assert await status_of(bs, second) == "downloaded"
    # A failed user batch's e-mails were never sent again.
    sent = [e for b in bs.sim.batches() for e in b.emails]
    assert len(sent) == len(set(sent)) == 5 + 15 + 10


async def test_unknown_status_is_an_alert_then_a_failure(bs: BouncerStack) -> None:
    """An undocumented status is logged and waited on; past batch_timeout_s it fails."""
    user_batch = await bs.submit(addresses("u", 3))
    [batch] = (await bs.create()).created
    bs.sim.set_batch_status(await sim_id(bs, batch), "paused")
    with capture_logs() as logs:
        assert (await bs.check()).failed == []
    [warning] = [e for e in logs if e["event"] == "bouncer_status_unknown"]
    assert (warning["log_level"], warning["status"]) == ("warning", "paused")
    assert await status_of(bs, batch) == "processing"
    await bs.db.execute(
        "UPDATE bouncer_batches SET created_at = now() - interval '2 days' WHERE id = $1", batch)
    assert (await bs.check()).failed == [batch]
    assert (await bs.user_batch(user_batch))["status"] == "failed"


async def test_stuck_batch_fails_after_the_timeout(bs: BouncerStack) -> None:
    """A batch that stays processing past batch_timeout_s is failed, freeing its slot."""
    await bs.submit(addresses("u", 3))
    [batch] = (await bs.create()).created
    bs.sim.stick_batch(await sim_id(bs, batch))
    assert (await bs.check()).failed == []
    await bs.db.execute(
        "UPDATE bouncer_batches SET created_at = now() - interval '2 days' WHERE id = $1", batch)
    assert (await bs.check()).failed == [batch]


async def test_batch_unknown_to_bouncer_fails(bs: BouncerStack) -> None:
    """A batch Bouncer answers 404 for (deleted there) is failed, not asked about forever."""
    user_batch = await bs.submit(addresses("u", 3))
    [batch] = (await bs.create()).created
    await bs.ctx.client.delete_batch(await sim_id(bs, batch))
    assert (await bs.check()).failed == [batch]
    assert (await bs.user_batch(user_batch))["status"] == "failed"


async def test_failed_downloads_are_queued_again_then_fail_the_batch(bs: BouncerStack) -> None:
    """A download that fails is dead-lettered (one attempt), queued again by the next
    status cycle, and after max_download_attempts the batch is failed."""
    user_batch = await bs.submit(addresses("u", 3))
    [batch] = (await bs.create()).created
    bs.sim.complete_all()
    bs.sim.server_error_next(2, endpoint="download")
    assert (await bs.check()).downloads_queued == 1
    await bs.download()
    assert await status_of(bs, batch) == "completed"
    assert await bs.engine.dead_letters.count() == 1
    assert (await bs.check()).downloads_queued == 1
    await bs.download()
    assert (await bs.check()).failed == [batch]
    assert (await bs.user_batch(user_batch))["status"] == "failed"


async def test_a_retried_download_recovers(bs: BouncerStack) -> None:
    """One failed download, then the next succeeds: everything stored once."""
    user_batch = await bs.submit(addresses("u", 3))
    await bs.create()
    bs.sim.complete_all()
    bs.sim.server_error_next(1, endpoint="download")
    await bs.check()
    await bs.download()
    await bs.check()
    await bs.download()
    row = await bs.user_batch(user_batch)
    assert (row["status"], row["processed"]) == ("completed", 3)


async def test_download_twice_changes_nothing(bs: BouncerStack) -> None:
    """Storing a batch's results a second time leaves results and counts as they were."""
    user_batch = await bs.submit(addresses("u", 10))
    [batch] = (await bs.create()).created
    bs.sim.complete_all()
    await bs.check()
    await bs.download()
    await bs.db.execute("UPDATE bouncer_batches SET status = 'completed' WHERE id = $1", batch)
    await bs.check()
    assert await bs.download() == 1
    row = await bs.user_batch(user_batch)
    assert (row["processed"], row["failed"], row["status"]) == (10, 0, "completed")
    assert await bs.db.fetchval("SELECT count(*) FROM email_deliverable_results") == 10


async def test_emails_without_result_fail_and_the_batch_still_completes(
    bs: BouncerStack,
) -> None:
    """An e-mail Bouncer returned no result for is marked failed; its user batch
    completes with it counted as failed, rather than waiting for ever."""
    user_batch = await bs.submit(addresses("u", 3))
    [batch] = (await bs.create()).created
    # Bouncer loses one address: make our batch hold one it never received.
    await bs.db.execute(
        "UPDATE user_batches SET total = total + 1 WHERE id = $1; ", user_batch)
    await bs.db.execute(
        "INSERT INTO emails_global (email) VALUES ('lost@example.com')")
    await bs.db.execute(
        "INSERT INTO user_batch_emails (user_batch_id, email_global_id, email, bouncer_batch_id,"
        " status) SELECT $1, id, email, $2, 'assigned' FROM emails_global"
        " WHERE email = 'lost@example.com'", user_batch, batch)
    bs.sim.complete_all()
    await bs.check()
    await bs.download()
    row = await bs.user_batch(user_batch)
    assert (row["status"], row["processed"], row["failed"]) == ("completed", 3, 1)
    assert "1 e-mails had no result" in await bs.db.fetchval(
        "SELECT error FROM bouncer_batches WHERE id = $1", batch)


async def test_results_for_unknown_batches_are_ignored(bs: BouncerStack) -> None:
    """A download job for a batch id we never stored does nothing and raises nothing."""
    await bs.engine.producer.enqueue("bouncer", "download_results",
                                     {"bouncer_batch_id": "never-heard-of-it"})
    assert await bs.download() == 1
    assert await bs.engine.dead_letters.count() == 0
    assert await bs.db.fetchval("SELECT count(*) FROM bouncer_batches") == 0
    assert bs.sim.calls == {}


def test_records_of_another_batch_or_without_address_are_left_out() -> None:
    """A record named for another batch, or without an e-mail, is counted, not stored."""
    cols = to_columns(
        [{"email": "A+x@Example.com", "name": "imsys:7", "status": "deliverable",
          "domain": {"name": "example.com", "acceptAll": "yes"}, "score": 91},
         {"email": "b@example.com", "name": "imsys:8"},
         {"name": "imsys:7"},
         {"email": "c@example.com", "score": True}],
        "imsys:7",
    )
    assert cols.canonical == ["a@example.com", "c@example.com"]
    assert (cols.foreign, cols.unusable) == (1, 1)
    assert cols.accept_all == [True, False]
    assert cols.score == [91, None]
    assert cols.status == ["deliverable", "unknown"]
