"""The Bouncer client against the Bouncer simulator (and a few misbehaving servers)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from pydantic import SecretStr

from imsys.errors import PermanentError, RetryableError
from imsys.provider_settings import BouncerConfig
from imsys.providers._jsonstream import JsonStreamError, _ObjectsParser, iter_json_array
from imsys.providers.bouncer import BatchStatus, BouncerClient, CreatedBatch
from imsys.providers.errors import (
    OutOfCredits,
    ProviderAuthError,
    ProviderError,
    ProviderRejected,
    ProviderUnavailable,
    RateLimited,
)
from imsys.sim.bouncer import BouncerSimulator

KEY = "bouncer-test-key-5f2c9a"


@pytest.fixture
async def sim() -> AsyncIterator[BouncerSimulator]:
    simulator = BouncerSimulator(KEY, queue_seconds=60.0)
    await simulator.start()
    yield simulator
    await simulator.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


def make_client(
    session: aiohttp.ClientSession, base_url: str, *, key: str = KEY, timeout: float = 5.0
) -> BouncerClient:
    config = BouncerConfig(
        base_url=base_url,
        api_key=SecretStr(key),
        timeout=timeout,
        connect_timeout=min(timeout, 2.0),
    )
    return BouncerClient(session, config)


@pytest.fixture
def client(session: aiohttp.ClientSession, sim: BouncerSimulator) -> BouncerClient:
    return make_client(session, sim.url)


async def serve(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> tuple[web.AppRunner, str]:
    """A one-route aiohttp server answering every path with ``handler``."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the happy path -----------------------------------------------------------------------


async def test_create_status_download_round_trip(
    client: BouncerClient, sim: BouncerSimulator
) -> None:
    """A batch is created, reports progress, and downloads the simulator's results."""
    emails = [
        ("deliverable@example.com", "7"),
        ("undeliverable@example.com", "8"),
        ("Deliverable@Example.com", "9"),
    ]
    created = await client.create_batch(emails)
    assert created == CreatedBatch(created.batch_id, quantity=2, duplicates=1, status="queued")
    assert sim.batch(created.batch_id).names == ("7", "8")

    status = await client.batch_status(created.batch_id)
    assert status == BatchStatus(created.batch_id, "queued", processed=0, quantity=2)
    assert not status.completed

    sim.complete_batch(created.batch_id)
    status = await client.batch_status(created.batch_id)
    assert (status.status, status.processed, status.completed) == ("completed", 2, True)

    records = await client.download(created.batch_id)
    assert records == [
        sim.result_for("deliverable@example.com", "7"),
        sim.result_for("undeliverable@example.com", "8"),
    ]
    assert [r["status"] for r in records] == ["deliverable", "undeliverable"]


async def test_unknown_batch_status_is_passed_on(
    client: BouncerClient, sim: BouncerSimulator
) -> None:
    """A status the API does not document comes back as-is and not completed."""
    created = await client.create_batch([("a@example.com", "1")])
    sim.set_batch_status(created.batch_id, "paused")
    status = await client.batch_status(created.batch_id)
    assert (status.status, status.completed) == ("paused", False)


async def test_finish_then_delete(client: BouncerClient, sim: BouncerSimulator) -> None:
    """Finishing ends a running batch; deleting it makes its status a 404 rejection."""
    created = await client.create_batch([("a@example.com", "1"), ("b@example.com", "2")])
    await client.finish_batch(created.batch_id)
    assert (await client.batch_status(created.batch_id)).status == "completed"
    await client.delete_batch(created.batch_id)
    assert sim.batch(created.batch_id).deleted
    with pytest.raises(ProviderRejected) as caught:
        await client.batch_status(created.batch_id)
    assert caught.value.status == 404
    assert "does not exist" in str(caught.value)


async def test_download_of_100k_records_parses(
    client: BouncerClient, sim: BouncerSimulator
) -> None:
    """A 100,000-address batch downloads completely and in order."""
    emails = [(f"user{i}@example{i % 50}.com", str(i)) for i in range(100_000)]
    created = await client.create_batch(emails)
    assert created.quantity == 100_000
    sim.complete_batch(created.batch_id)
    started = time.perf_counter()
    records = await client.download(created.batch_id)
    elapsed = time.perf_counter() - started
    assert len(records) == 100_000
    for i in (0, 1, 49_999, 99_999):
        assert records[i] == sim.result_for(*emails[i])
    assert [r["name"] for r in records[:3]] == ["0", "1", "2"]
    assert elapsed < 10, f"download took {elapsed:.1f} s"


# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind", "base"),
    [
        (429, RateLimited, RetryableError),
        (402, OutOfCredits, PermanentError),
        (500, ProviderUnavailable, RetryableError),
        (503, ProviderUnavailable, RetryableError),
        (400, ProviderRejected, PermanentError),
    ],
)
async def test_error_status_maps_to_class(
    client: BouncerClient,
    sim: BouncerSimulator,
    status: int,
    kind: type[ProviderError],
    base: type[Exception],
) -> None:
    """Each error status of the API becomes its own error class, retryable or permanent."""
    sim.fail_next(status=status, endpoint="create")
    with pytest.raises(kind) as caught:
        await client.create_batch([("a@example.com", "1")])
    assert isinstance(caught.value, base)
    assert caught.value.status == status
    assert str(caught.value).startswith(f"bouncer: HTTP {status}")
    assert sim.creations == 0


async def test_server_error_on_create_is_not_maybe_applied(
    client: BouncerClient, sim: BouncerSimulator
) -> None:
    """A 500 answer means the batch was not made: maybe_applied is False."""
    sim.server_error_next(endpoint="create")
    with pytest.raises(ProviderUnavailable) as caught:
        await client.create_batch([("a@example.com", "1")])
    assert caught.value.maybe_applied is False


async def test_rate_limit_window_gives_rate_limited(
    client: BouncerClient, sim: BouncerSimulator
) -> None:
    """Going over the per-minute creation limit raises RateLimited with the API's text."""
    sim.set_rate_limits(create_limit=1)
    await client.create_batch([("a@example.com", "1")])
    with pytest.raises(RateLimited) as caught:
        await client.create_batch([("b@example.com", "2")])
    assert caught.value.detail == "too many requests"


async def test_wrong_key_is_auth_error(
    session: aiohttp.ClientSession, sim: BouncerSimulator
) -> None:
    """A key the API refuses (401) raises ProviderAuthError, a permanent error."""
    client = make_client(session, sim.url, key="wrong-key-123")
    with pytest.raises(ProviderAuthError) as caught:
        await client.batch_status("abc")
    assert caught.value.status == 401
    assert isinstance(caught.value, PermanentError)
    assert "invalid api key" in str(caught.value)


async def test_missing_key_fails_before_any_call(
    session: aiohttp.ClientSession, sim: BouncerSimulator
) -> None:
    """With no key configured, nothing is sent and the operator is told what to set."""
    client = make_client(session, sim.url, key="")
    with pytest.raises(ProviderAuthError, match=r"bouncer\.api_key"):
        await client.create_batch([("a@example.com", "1")])
    assert sim.calls == {}


async def test_download_before_completion_is_rejected(client: BouncerClient) -> None:
    """Downloading a running batch is a rejection carrying the API's message."""
    created = await client.create_batch([("a@example.com", "1")])
    with pytest.raises(ProviderRejected, match="not completed") as caught:
        await client.download(created.batch_id)
    assert caught.value.status == 400


async def test_lost_create_response_is_maybe_applied(
    client: BouncerClient, sim: BouncerSimulator
) -> None:
    """A create whose answer is lost is ProviderUnavailable(maybe_applied); the batch exists."""
    sim.lose_create_response()
    with pytest.raises(ProviderUnavailable) as caught:
        await client.create_batch([("a@example.com", "1")])
    assert caught.value.maybe_applied is True
    assert [b.response_lost for b in sim.batches()] == [True]


async def test_stalled_server_times_out(session: aiohttp.ClientSession) -> None:
    """A server that never answers gives ProviderUnavailable after the client's timeout."""

    async def stall(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(30)
        return web.json_response({})

    runner, url = await serve(stall)
    try:
        client = make_client(session, url, timeout=0.3)
        started = time.perf_counter()
        with pytest.raises(ProviderUnavailable) as status_error:
            await client.batch_status("abc")
        assert time.perf_counter() - started < 2
        with pytest.raises(ProviderUnavailable) as create_error:
            await client.create_batch([("a@example.com", "1")])
    finally:
        await runner.cleanup()
    assert "timed out" in str(status_error.value)
    assert status_error.value.maybe_applied is False
    assert create_error.value.maybe_applied is True


async def test_connection_refused_is_unavailable_not_applied(
    session: aiohttp.ClientSession,
) -> None:
    """Nobody listening: ProviderUnavailable, and the create surely did not happen."""
    client = make_client(session, f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ProviderUnavailable, match="cannot connect") as caught:
        await client.create_batch([("a@example.com", "1")])
    assert caught.value.maybe_applied is False


async def test_garbage_download_is_an_unexpected_answer(session: aiohttp.ClientSession) -> None:
    """A download that is not a JSON array of objects is reported, not half-returned."""

    async def garbage(request: web.Request) -> web.StreamResponse:
        return web.Response(text='[{"email": "a@example.com"}, {"email": ', status=200)

    runner, url = await serve(garbage)
    try:
        with pytest.raises(ProviderUnavailable, match="after 1 records") as caught:
            await make_client(session, url).download("abc")
    finally:
        await runner.cleanup()
    assert caught.value.maybe_applied is False


async def test_api_key_never_in_errors(
    session: aiohttp.ClientSession, sim: BouncerSimulator
) -> None:
    """Even a server echoing the x-api-key header back gets the key redacted from errors."""

    async def echo(request: web.Request) -> web.StreamResponse:
        key = request.headers.get("x-api-key", "")
        return web.json_response(
            {"status": "400", "error": "Bad Request", "message": f"key {key} is not allowed"},
            status=400,
        )

    runner, url = await serve(echo)
    errors: list[ProviderError] = []

    async def collect(base: str) -> None:
        with pytest.raises(ProviderError) as caught:
            await make_client(session, base).create_batch([("a@example.com", "1")])
        errors.append(caught.value)

    try:
        await collect(url)
        sim.payment_required_next()
        await collect(sim.url)
        sim.lose_create_response()
        await collect(sim.url)
    finally:
        await runner.cleanup()
    assert len(errors) == 3
    assert "key *** is not allowed" in str(errors[0])
    for exc in errors:
        assert KEY not in str(exc)
        assert KEY not in repr(exc.args)
        assert KEY not in (exc.detail or "")


# --- the streaming parser -----------------------------------------------------------------


class Pieces:
    """A byte stream that hands out fixed pieces, like a slow network."""

    def __init__(self, data: bytes, size: int) -> None:
        self._pieces = [data[i : i + size] for i in range(0, len(data), size)]

    async def read(self, n: int = -1) -> bytes:
        return self._pieces.pop(0) if self._pieces else b""


async def parse(data: bytes, size: int) -> list[object]:
    return [item async for item in iter_json_array(Pieces(data, size), chunk_size=size)]


TRICKY_RECORDS: list[list[object]] = [
    # Objects only: the orjson fast path, with cuts that must not be taken.
    [{"email": "ü@例え.jp", "name": "a}, {b", "domain": {"acceptAll": "no"}},
     {"list": [{"x": 1}, {"y": [{"z": "}, {"}]}], "score": 12345},
     {"email": "b@x.io", "n": None, "ok": True, "big": 2**70}],
    # Not only objects: the scanner takes over part way, or from the start.
    [{"email": "a@x.io", "score": 1.5e3}, [], 678, "x", {"tags": ["a", {"b": []}]}],
    [678, "x}, {y", [], {"a": [1, 2.5]}, True, None, -0.5e-3, {"b": 1}, {"c": 2}, 12345],
]


@pytest.mark.parametrize("records", TRICKY_RECORDS)
@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 10_000])
async def test_stream_parser_handles_any_split(records: list[object], size: int) -> None:
    """Elements split anywhere (inside strings, numbers, UTF-8 sequences) parse whole."""
    for separator in (",", ",\n ", " , "):
        data = (" \n[ " + separator.join(json.dumps(r, ensure_ascii=False) for r in records)
                + " ]\n").encode()
        assert await parse(data, size) == records
    assert await parse(b"[]", size) == []
    assert await parse(b" [ ] ", size) == []


def test_stream_parser_keeps_plain_objects_on_the_fast_path() -> None:
    """An array of plain objects is parsed by orjson chunk by chunk, never the slow scanner."""
    records = [{"email": f"user{i}@example.com", "domain": {"free": "no"}, "score": i}
               for i in range(2000)]
    data = json.dumps(records).encode()
    parser = _ObjectsParser()
    parsed: list[object] = []
    for start in range(0, len(data), 4096):
        before = len(parsed)
        parsed += parser.feed(data[start:start + 4096], final=False)
        assert len(parsed) > before or start == 0
    parsed += parser.feed(b"", final=True)
    assert parsed == records
    assert parser._slow is None


@pytest.mark.parametrize("body", [
    b"", b"{}", b"[1,", b"[1 2]", b"[1]x", b'["\xff"]', b"[{]", b'[{"a": 1},]', b'[{"a": 1}',
    b'[{"a": 1}, {"b": 2}] [', b'[{"a": 1} {"b": 2}]', b'[{"a": \xff}]',
])
async def test_stream_parser_rejects_malformed_bodies(body: bytes) -> None:
    """Anything but one well-formed array raises JsonStreamError."""
    with pytest.raises(JsonStreamError):
        await parse(body, 2)
