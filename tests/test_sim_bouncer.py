"""The Bouncer API v1.1 simulator, driven over real HTTP with aiohttp."""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from imsys.sim.bouncer import BouncerSimulator, Rule, serve
from imsys.sim.bouncer_results import BUILTIN_RULES, verify

KEY = "test-key"
BATCH = "/v1.1/email/verify/batch"


class FakeClock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def sim(clock: FakeClock) -> AsyncIterator[BouncerSimulator]:
    simulator = BouncerSimulator(KEY, queue_seconds=5.0, emails_per_second=2.0, clock=clock)
    await simulator.start()
    yield simulator
    await simulator.stop()


@pytest.fixture
async def http(sim: BouncerSimulator) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=sim.url, headers={"x-api-key": KEY}) as session:
        yield session


def entries(*emails: str) -> list[dict[str, str]]:
    return [{"email": e, "name": f"id-{i}"} for i, e in enumerate(emails)]


async def create(http: aiohttp.ClientSession, *emails: str) -> dict[str, Any]:
    async with http.post(BATCH, json=entries(*emails)) as resp:
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json()
        return body


async def get(http: aiohttp.ClientSession, path: str) -> tuple[int, Any]:
    async with http.get(path) as resp:
        return resp.status, await resp.json()


# --- create -------------------------------------------------------------------------------


async def test_create_answers_queued_batch(http: aiohttp.ClientSession) -> None:
    """Creating a batch answers batchId, created, status queued, quantity, duplicates."""
    body = await create(http, "a@example.com", "b@example.com")
    assert re.fullmatch(r"[0-9a-f]{24}", body["batchId"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", body["created"])
    assert body | {"batchId": "", "created": ""} == {
        "batchId": "",
        "created": "",
        "status": "queued",
        "quantity": 2,
        "duplicates": 0,
    }


async def test_duplicates_are_dropped_and_counted(
    http: aiohttp.ClientSession, sim: BouncerSimulator
) -> None:
    """A repeated address (any case) counts in duplicates; the first name is kept."""
    body = await create(http, "a@example.com", "A@Example.com", "b@example.com")
    assert (body["quantity"], body["duplicates"]) == (2, 1)
    info = sim.batch(body["batchId"])
    assert info.emails == ("a@example.com", "b@example.com")
    assert info.names == ("id-0", "id-2")


@pytest.mark.parametrize("headers", [{}, {"x-api-key": "wrong"}])
async def test_bad_api_key_is_401(sim: BouncerSimulator, headers: dict[str, str]) -> None:
    """A missing or wrong x-api-key answers 401 in Bouncer's error shape; nothing is created."""
    async with (
        aiohttp.ClientSession(base_url=sim.url, headers=headers) as session,
        session.post(BATCH, json=entries("a@example.com")) as resp,
    ):
        assert resp.status == 401
        body = await resp.json()
    assert body["status"] == 401
    assert body["error"] == "Unauthorized"
    assert body["message"]
    assert sim.creations == 0
    assert sim.calls == {"create": 1}


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ([], "no emails"),
        ({"email": "a@example.com"}, "JSON array"),
        ([{"name": "x"}], "email"),
        ([{"email": 5}], "email"),
        ([{"email": "a@example.com", "name": 7}], "name"),
        ([{"email": f"u{i}@example.com"} for i in range(100_001)], "too many"),
    ],
    ids=["empty", "object", "no-email", "email-not-string", "name-not-string", "over-100k"],
)
async def test_bad_batch_is_400(
    http: aiohttp.ClientSession, sim: BouncerSimulator, payload: object, message: str
) -> None:
    """An empty, malformed or over-100,000 batch answers 400 and creates nothing."""
    async with http.post(BATCH, json=payload) as resp:
        assert resp.status == 400
        body = await resp.json()
    assert body["status"] == "400"
    assert message in body["message"]
    assert sim.creations == 0


async def test_body_that_is_not_json_is_400(http: aiohttp.ClientSession) -> None:
    """A body that is not JSON answers 400."""
    async with http.post(BATCH, data=b"{nope", headers={"Content-Type": "application/json"}) as r:
        assert r.status == 400
        assert "JSON" in (await r.json())["message"]


async def test_full_size_batch_is_accepted(http: aiohttp.ClientSession) -> None:
    """Exactly 100,000 addresses are accepted (several MB of JSON)."""
    body = await create(http, *(f"user{i}@example.com" for i in range(100_000)))
    assert body["quantity"] == 100_000


# --- progress -----------------------------------------------------------------------------


async def test_batch_moves_queued_processing_completed(
    http: aiohttp.ClientSession, clock: FakeClock
) -> None:
    """A batch waits queued, is processed at the set speed, then reports completed."""
    batch_id = (await create(http, *(f"u{i}@example.com" for i in range(10))))["batchId"]
    path = f"{BATCH}/{batch_id}"
    status, body = await get(http, path)
    assert (status, body["status"], body["processed"]) == (200, "queued", 0)
    assert "started" not in body
    clock.advance(5.0)
    _, body = await get(http, path)
    assert (body["status"], body["processed"]) == ("processing", 0)
    assert "started" in body
    clock.advance(2.0)
    _, body = await get(http, path)
    assert (body["status"], body["processed"]) == ("processing", 4)
    assert "credits" not in body
    clock.advance(3.0)
    _, body = await get(http, path)
    assert (body["status"], body["processed"], body["quantity"]) == ("completed", 10, 10)
    assert body["credits"] == 10
    assert "completed" in body


async def test_speed_can_change_at_run_time(
    http: aiohttp.ClientSession, sim: BouncerSimulator, clock: FakeClock
) -> None:
    """set_speed takes effect on batches already running."""
    batch_id = (await create(http, *(f"u{i}@example.com" for i in range(100))))["batchId"]
    clock.advance(6.0)
    assert sim.batch(batch_id).processed == 2
    sim.set_speed(emails_per_second=1000.0)
    clock.advance(1.0)
    assert sim.batch(batch_id).status == "completed"


async def test_force_complete(http: aiohttp.ClientSession, sim: BouncerSimulator) -> None:
    """complete_batch and complete_all finish batches at once, without waiting."""
    first = (await create(http, "a@example.com"))["batchId"]
    second = (await create(http, "b@example.com"))["batchId"]
    sim.complete_batch(first)
    assert (await get(http, f"{BATCH}/{first}"))[1]["status"] == "completed"
    assert (await get(http, f"{BATCH}/{second}"))[1]["status"] == "queued"
    sim.complete_all()
    assert (await get(http, f"{BATCH}/{second}"))[1]["status"] == "completed"


async def test_with_stats_counts_results(
    http: aiohttp.ClientSession, sim: BouncerSimulator
) -> None:
    """?with-stats=true adds per-status counts once the batch is completed."""
    batch_id = (await create(http, "deliverable@x.com", "bad1@x.com", "bad2@x.com"))["batchId"]
    sim.complete_batch(batch_id)
    _, body = await get(http, f"{BATCH}/{batch_id}?with-stats=true")
    assert body["stats"] == {"deliverable": 1, "risky": 0, "undeliverable": 2, "unknown": 0}


# --- results ------------------------------------------------------------------------------


async def test_download_gives_predictable_records_with_names(
    http: aiohttp.ClientSession, sim: BouncerSimulator
) -> None:
    """Results are a function of the address alone and echo each entry's name."""
    emails = [f"person{i}@example.org" for i in range(30)]
    batch_id = (await create(http, *emails))["batchId"]
    sim.complete_batch(batch_id)
    status, records = await get(http, f"{BATCH}/{batch_id}/download?download=all")
    assert status == 200
    assert records == [sim.result_for(e, f"id-{i}") for i, e in enumerate(emails)]
    # Another simulator, another run: the same answers.
    assert records == [verify(e, f"id-{i}", BUILTIN_RULES) for i, e in enumerate(emails)]
    assert {r["status"] for r in records} >= {"deliverable", "undeliverable"}
    record = records[0]
    assert set(record) == {
        "email",
        "name",
        "status",
        "reason",
        "domain",
        "account",
        "dns",
        "provider",
        "score",
        "toxic",
        "toxicity",
    }
    assert set(record["domain"]) == {"name", "acceptAll", "disposable", "free"}
    assert set(record["account"]) == {"role", "disabled", "fullMailbox"}
    assert record["domain"]["acceptAll"] in ("yes", "no")


async def test_built_in_rules(http: aiohttp.ClientSession, sim: BouncerSimulator) -> None:
    """catchall.test is accept-all, bad* is undeliverable, sandbox prefixes set the status."""
    emails = [
        "anyone@catchall.test",
        "bad.actor@example.com",
        "deliverable+2@x.com",
        "risky@x.com",
        "undeliverable@x.com",
        "unknown@x.com",
        "not-an-address",
        "someone@gmail.com",
        "info@x.com",
        "temp@mailinator.com",
    ]
    batch_id = (await create(http, *emails))["batchId"]
    sim.complete_batch(batch_id)
    _, records = await get(http, f"{BATCH}/{batch_id}/download")
    by_email = {r["email"]: r for r in records}
    catchall = by_email["anyone@catchall.test"]
    assert (catchall["status"], catchall["domain"]["acceptAll"]) == ("risky", "yes")
    assert by_email["bad.actor@example.com"]["status"] == "undeliverable"
    assert by_email["bad.actor@example.com"]["domain"]["acceptAll"] == "no"
    for status in ("deliverable", "risky", "undeliverable", "unknown"):
        assert (
            by_email[f"{status}{'+2' if status == 'deliverable' else ''}@x.com"]["status"] == status
        )
    assert (by_email["not-an-address"]["status"], by_email["not-an-address"]["reason"]) == (
        "undeliverable",
        "invalid_email",
    )
    assert by_email["someone@gmail.com"]["domain"]["free"] == "yes"
    assert by_email["info@x.com"]["account"]["role"] == "yes"
    assert by_email["temp@mailinator.com"]["domain"]["disposable"] == "yes"


async def test_added_rules_win(http: aiohttp.ClientSession, sim: BouncerSimulator) -> None:
    """A rule added at run time overrides the hash and the built-in rules; clear_rules undoes."""
    sim.add_rule(Rule(domain="corp.test", status="undeliverable", reason="rejected_email"))
    sim.add_rule(Rule(email="bad.boss@corp.test", status="deliverable", reason="accepted_email"))
    sim.add_rule(Rule(domain="wild.test", accept_all=True))
    batch_id = (await create(http, "a@corp.test", "bad.boss@corp.test", "x@wild.test"))["batchId"]
    sim.complete_batch(batch_id)
    _, records = await get(http, f"{BATCH}/{batch_id}/download")
    assert [r["status"] for r in records[:2]] == ["undeliverable", "deliverable"]
    assert records[2]["domain"]["acceptAll"] == "yes"
    sim.clear_rules()
    assert sim.result_for("x@wild.test")["domain"]["acceptAll"] == "no"


async def test_download_filters_by_status(
    http: aiohttp.ClientSession, sim: BouncerSimulator
) -> None:
    """?download=<status> returns only that status; an unknown filter answers 400."""
    batch_id = (await create(http, "deliverable@x.com", "bad@x.com", "unknown@x.com"))["batchId"]
    sim.complete_batch(batch_id)
    _, records = await get(http, f"{BATCH}/{batch_id}/download?download=undeliverable")
    assert [r["email"] for r in records] == ["bad@x.com"]
    status, body = await get(http, f"{BATCH}/{batch_id}/download?download=everything")
    assert (status, body["status"]) == (400, "400")


async def test_download_before_completion_is_400(http: aiohttp.ClientSession) -> None:
    """Results of a batch that has not completed are refused."""
    batch_id = (await create(http, "a@example.com"))["batchId"]
    status, body = await get(http, f"{BATCH}/{batch_id}/download?download=all")
    assert status == 400
    assert "queued" in body["message"]


@pytest.mark.parametrize(
    ("method", "suffix"),
    [("GET", ""), ("GET", "/download"), ("DELETE", ""), ("POST", "/finish")],
)
async def test_unknown_batch_is_404(http: aiohttp.ClientSession, method: str, suffix: str) -> None:
    """Every batch endpoint answers 404 for an id it never issued."""
    async with http.request(method, f"{BATCH}/ffffffffffffffffffffffff{suffix}") as resp:
        assert resp.status == 404
        body = await resp.json()
    assert body["status"] == "404"
    assert "does not exist" in body["message"]


async def test_unknown_path_is_json_404(http: aiohttp.ClientSession) -> None:
    """A path outside the API answers a JSON 404, not HTML."""
    status, body = await get(http, "/v1.1/email/verify")
    assert (status, body["error"]) == (404, "Not Found")


# --- delete and finish --------------------------------------------------------------------


async def test_delete_removes_batch(http: aiohttp.ClientSession, sim: BouncerSimulator) -> None:
    """DELETE answers {} and the batch is gone from the API, still visible to tests."""
    batch_id = (await create(http, "a@example.com"))["batchId"]
    async with http.delete(f"{BATCH}/{batch_id}") as resp:
        assert (resp.status, await resp.json()) == (200, {})
    assert (await get(http, f"{BATCH}/{batch_id}"))[0] == 404
    assert sim.batch(batch_id).deleted


async def test_finish_completes_early(
    http: aiohttp.ClientSession, sim: BouncerSimulator, clock: FakeClock
) -> None:
    """finish completes a running batch; unverified addresses come back unknown, credits back."""
    sim.credits = 100
    emails = [f"deliverable{i}@x.com" for i in range(10)]
    batch_id = (await create(http, *emails))["batchId"]
    assert sim.credits == 90
    clock.advance(5.0 + 2.0)
    async with http.post(f"{BATCH}/{batch_id}/finish") as resp:
        assert (resp.status, await resp.json()) == (202, {})
    _, body = await get(http, f"{BATCH}/{batch_id}")
    assert (body["status"], body["credits"]) == ("completed", 4)
    assert sim.credits == 96
    _, records = await get(http, f"{BATCH}/{batch_id}/download")
    assert [r["status"] for r in records] == ["deliverable"] * 4 + ["unknown"] * 6
    async with http.post(f"{BATCH}/{batch_id}/finish") as resp:
        assert resp.status == 400
        assert (await resp.json())["message"] == "batch has to be running to finish"


# --- rate limits --------------------------------------------------------------------------


async def test_creations_are_rate_limited(
    http: aiohttp.ClientSession, sim: BouncerSimulator, clock: FakeClock
) -> None:
    """Over the creation limit in a window answers 429; the window slides on."""
    sim.set_rate_limits(create_limit=3)
    for _ in range(3):
        await create(http, "a@example.com")
    async with http.post(BATCH, json=entries("a@example.com")) as resp:
        assert resp.status == 429
        body = await resp.json()
    assert body == {"status": 429, "error": "Too Many Requests", "message": "too many requests"}
    assert sim.creations == 3
    clock.advance(60.0)
    await create(http, "a@example.com")
    assert sim.creations == 4


async def test_default_creation_limit_is_60_per_minute(
    http: aiohttp.ClientSession, sim: BouncerSimulator
) -> None:
    """Out of the box the 61st creation in a minute is refused."""
    for _ in range(60):
        await create(http, "a@example.com")
    async with http.post(BATCH, json=entries("a@example.com")) as resp:
        assert resp.status == 429


async def test_other_endpoints_share_their_own_limit(
    http: aiohttp.ClientSession, sim: BouncerSimulator, clock: FakeClock
) -> None:
    """Status, download, delete and finish share one limit, apart from creations."""
    batch_id = (await create(http, "a@example.com"))["batchId"]
    sim.set_rate_limits(request_limit=3, window=10.0)
    assert (await get(http, f"{BATCH}/{batch_id}"))[0] == 200
    assert (await get(http, f"{BATCH}/{batch_id}/download"))[0] == 400
    async with http.post(f"{BATCH}/{batch_id}/finish") as resp:
        assert resp.status == 202
    status, body = await get(http, f"{BATCH}/{batch_id}")
    assert (status, body["status"]) == (429, 429)
    await create(http, "b@example.com")
    clock.advance(10.0)
    assert (await get(http, f"{BATCH}/{batch_id}"))[0] == 200


# --- faults -------------------------------------------------------------------------------


async def test_rate_limit_next_n(http: aiohttp.ClientSession, sim: BouncerSimulator) -> None:
    """rate_limit_next(2) refuses exactly the next two calls with 429, creating nothing."""
    sim.rate_limit_next(2)
    for _ in range(2):
        async with http.post(BATCH, json=entries("a@example.com")) as resp:
            assert resp.status == 429
            assert (await resp.json())["error"] == "Too Many Requests"
    await create(http, "a@example.com")
    assert sim.creations == 1


async def test_payment_required_next(http: aiohttp.ClientSession, sim: BouncerSimulator) -> None:
    """payment_required_next answers 402 Payment Required once, then calls succeed."""
    sim.payment_required_next(endpoint="create")
    async with http.post(BATCH, json=entries("a@example.com")) as resp:
        assert resp.status == 402
        body = await resp.json()
    assert (body["status"], body["error"]) == ("402", "Payment Required")
    assert "credits left" in body["message"]
    await create(http, "a@example.com")


async def test_running_out_of_credits_is_402(
    http: aiohttp.ClientSession, sim: BouncerSimulator
) -> None:
    """With a credit balance set, a batch larger than the balance answers 402."""
    sim.credits = 3
    async with http.post(BATCH, json=entries("a@x.com", "b@x.com", "c@x.com", "d@x.com")) as r:
        assert r.status == 402
        assert (await r.json())["message"] == "3 credits left"
    await create(http, "a@x.com", "b@x.com", "c@x.com")
    assert sim.credits == 0
    assert sim.creations == 1


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_server_error_next(
    http: aiohttp.ClientSession, sim: BouncerSimulator, status: int
) -> None:
    """server_error_next answers the given 5xx, on the chosen endpoint only."""
    batch_id = (await create(http, "a@example.com"))["batchId"]
    sim.server_error_next(status=status, endpoint="download")
    assert (await get(http, f"{BATCH}/{batch_id}"))[0] == 200
    code, body = await get(http, f"{BATCH}/{batch_id}/download")
    assert (code, body["status"]) == (status, status)
    assert (await get(http, f"{BATCH}/{batch_id}/download"))[0] == 400


async def test_lost_create_response(http: aiohttp.ClientSession, sim: BouncerSimulator) -> None:
    """lose_create_response: the batch is created but the client sees the server disconnect."""
    sim.lose_create_response()
    with pytest.raises(aiohttp.ServerDisconnectedError):
        async with http.post(BATCH, json=entries("a@example.com", "b@example.com")):
            pass
    assert sim.creations == 1
    [lost] = sim.batches()
    assert (lost.emails, lost.names, lost.response_lost) == (
        ("a@example.com", "b@example.com"),
        ("id-0", "id-1"),
        True,
    )
    retried = await create(http, "a@example.com", "b@example.com")
    assert retried["batchId"] != lost.batch_id
    assert sim.creations == 2


async def test_stuck_batch_never_completes(
    http: aiohttp.ClientSession, sim: BouncerSimulator, clock: FakeClock
) -> None:
    """stick_next_batches: that batch stays processing half done; later ones complete."""
    sim.stick_next_batches(1)
    stuck = (await create(http, *(f"u{i}@x.com" for i in range(10))))["batchId"]
    normal = (await create(http, "a@x.com"))["batchId"]
    clock.advance(3600.0)
    _, body = await get(http, f"{BATCH}/{stuck}")
    assert (body["status"], body["processed"]) == ("processing", 5)
    assert (await get(http, f"{BATCH}/{normal}"))[1]["status"] == "completed"


async def test_stick_batch_freezes_a_running_batch(
    http: aiohttp.ClientSession, sim: BouncerSimulator, clock: FakeClock
) -> None:
    """stick_batch freezes an existing batch where it stands."""
    batch_id = (await create(http, *(f"u{i}@x.com" for i in range(10))))["batchId"]
    clock.advance(5.0 + 1.0)
    sim.stick_batch(batch_id)
    clock.advance(3600.0)
    assert (sim.batch(batch_id).status, sim.batch(batch_id).processed) == ("processing", 2)


async def test_failed_batch(
    http: aiohttp.ClientSession, sim: BouncerSimulator, clock: FakeClock
) -> None:
    """fail_next_batches: the batch turns failed part way, and its results are refused."""
    sim.fail_next_batches()
    batch_id = (await create(http, *(f"u{i}@x.com" for i in range(10))))["batchId"]
    clock.advance(5.0 + 1.0)
    assert (await get(http, f"{BATCH}/{batch_id}"))[1]["status"] == "processing"
    clock.advance(2.0)
    _, body = await get(http, f"{BATCH}/{batch_id}")
    assert (body["status"], body["processed"]) == ("failed", 5)
    assert (await get(http, f"{BATCH}/{batch_id}/download"))[0] == 400


async def test_fail_batch_now(http: aiohttp.ClientSession, sim: BouncerSimulator) -> None:
    """fail_batch marks an existing batch failed at once."""
    batch_id = (await create(http, "a@x.com"))["batchId"]
    sim.fail_batch(batch_id)
    assert (await get(http, f"{BATCH}/{batch_id}"))[1]["status"] == "failed"


async def test_unknown_status(
    http: aiohttp.ClientSession, sim: BouncerSimulator, clock: FakeClock
) -> None:
    """unknown_status_next_batches and set_batch_status report a status outside the docs."""
    sim.unknown_status_next_batches(status="paused")
    paused = (await create(http, "a@x.com"))["batchId"]
    other = (await create(http, "b@x.com"))["batchId"]
    sim.set_batch_status(other, "archived")
    clock.advance(3600.0)
    assert (await get(http, f"{BATCH}/{paused}"))[1]["status"] == "paused"
    assert (await get(http, f"{BATCH}/{other}"))[1]["status"] == "archived"


async def test_clear_faults(http: aiohttp.ClientSession, sim: BouncerSimulator) -> None:
    """clear_faults drops pending faults."""
    sim.server_error_next(3)
    sim.lose_create_response()
    sim.clear_faults()
    await create(http, "a@example.com")


# --- inspection and running ---------------------------------------------------------------


async def test_calls_are_counted_per_endpoint(
    http: aiohttp.ClientSession, sim: BouncerSimulator
) -> None:
    """Every call counts against its endpoint, refused ones included."""
    batch_id = (await create(http, "a@example.com"))["batchId"]
    sim.server_error_next(endpoint="status")
    await get(http, f"{BATCH}/{batch_id}")
    await get(http, f"{BATCH}/{batch_id}")
    await get(http, f"{BATCH}/{batch_id}/download")
    async with http.post(f"{BATCH}/{batch_id}/finish"):
        pass
    async with http.delete(f"{BATCH}/{batch_id}"):
        pass
    assert sim.calls == {"create": 1, "status": 2, "download": 1, "finish": 1, "delete": 1}
    assert sim.creations == 1


async def test_restart_keeps_state(clock: FakeClock) -> None:
    """stop then start on the same port refuses calls meanwhile and keeps the batches."""
    sim = BouncerSimulator(KEY, clock=clock)
    port = await sim.start()
    async with aiohttp.ClientSession(headers={"x-api-key": KEY}) as http:
        batch_id = (await create_at(http, sim.url))["batchId"]
        await sim.stop()
        await sim.stop()
        with pytest.raises(aiohttp.ClientConnectionError):
            await get(http, f"http://127.0.0.1:{port}{BATCH}/{batch_id}")
        await sim.start(port=port)
        try:
            assert (await get(http, f"{sim.url}{BATCH}/{batch_id}"))[0] == 200
        finally:
            await sim.stop()


async def create_at(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.post(url + BATCH, json=entries("a@example.com")) as resp:
        body: dict[str, Any] = await resp.json()
        return body


async def test_serve_runs_until_cancelled() -> None:
    """serve() answers with the given key until its task is cancelled, then stops listening."""
    ready: asyncio.Queue[BouncerSimulator] = asyncio.Queue()
    task = asyncio.create_task(serve("127.0.0.1", 0, "serve-key", on_ready=ready.put_nowait))
    sim = await asyncio.wait_for(ready.get(), 5)
    url = sim.url
    async with aiohttp.ClientSession(headers={"x-api-key": "serve-key"}) as http:
        assert (await create_at(http, url))["status"] == "queued"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(aiohttp.ClientConnectionError):
            await create_at(http, url)


async def test_module_runs_standalone() -> None:
    """python -m imsys.sim.bouncer --port 0 listens and logs its URL."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "imsys.sim.bouncer",
        "--port",
        "0",
        "--api-key",
        "cli-key",
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        line = (await asyncio.wait_for(proc.stderr.readline(), 10)).decode()
        match = re.search(r"url=(http://\S+)", line)
        assert match, line
        async with aiohttp.ClientSession(headers={"x-api-key": "cli-key"}) as http:
            assert (await create_at(http, match[1]))["quantity"] == 1
    finally:
        proc.terminate()
        await proc.wait()
