"""Bouncer API v1.1 simulator: the batch e-mail verification endpoints, with faults to inject.

Shapes follow docs.usebouncer.com (batch create, status, download, delete, finish). Where the
vendor is silent the simulator has to choose, and says so here so nobody mistakes a choice
for a fact about the real service:

- ``quantity`` counts unique addresses; repeats (compared case-insensitively) are dropped and
  counted in ``duplicates``; the first ``name`` given for an address wins.
- Downloading a batch that is not ``completed`` answers 400.
- ``finish`` works on a queued or processing batch; addresses not yet verified come back as
  ``unknown`` and their credits are returned.
- ``stats`` (``?with-stats=true``) is given only once a batch is completed.
- Error bodies carry ``status`` as a number for 401, 429 and 5xx and as a string otherwise,
  as the vendor's own examples do: a client has to accept both.
- ``failed``, a stuck batch and any other status are faults on offer; the real API documents
  only ``queued``, ``processing`` and ``completed``.

Results are a pure function of the address and the rules (see `Rule`), so tests can predict
them with `BouncerSimulator.result_for`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import logging
import secrets
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, Final, Literal

from aiohttp import web
from aiohttp.typedefs import Handler

from imsys.sim.bouncer_results import BUILTIN_RULES, RESULT_STATUSES, Rule, unverified, verify

__all__ = [
    "BOUNCER_SIM",
    "DEFAULT_API_KEY",
    "DEFAULT_PORT",
    "BatchInfo",
    "BouncerSimulator",
    "Endpoint",
    "Rule",
    "main",
    "serve",
]

log = logging.getLogger(__name__)

DEFAULT_PORT: Final = 8091
DEFAULT_API_KEY: Final = "bouncer-sim-key"
MAX_BATCH_SIZE: Final = 100_000
BATCH_PATH: Final = "/v1.1/email/verify/batch"

Endpoint = Literal["create", "status", "download", "delete", "finish"]
_ENDPOINTS: Final[dict[str, Endpoint]] = {
    "create": "create",
    "status": "status",
    "download": "download",
    "delete": "delete",
    "finish": "finish",
}
_RUNNING: Final = ("queued", "processing")


def _iso_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class BatchInfo:
    """What the simulator holds about one batch, for tests to assert on."""

    batch_id: str
    status: str
    quantity: int
    duplicates: int
    processed: int
    emails: tuple[str, ...]
    names: tuple[str | None, ...]
    deleted: bool
    response_lost: bool


@dataclass(slots=True)
class _Batch:
    batch_id: str
    entries: list[tuple[str, str | None]]
    duplicates: int
    created_at: float
    created: str
    fate: str
    cap: int
    status: str = "queued"
    processed: float = 0.0
    last_tick: float = 0.0
    started: str | None = None
    completed: str | None = None
    credits_used: int | None = None
    results: list[dict[str, Any]] | None = None
    deleted: bool = False
    response_lost: bool = False

    @property
    def quantity(self) -> int:
        return len(self.entries)


@dataclass(slots=True)
class _Fault:
    status: int
    remaining: int
    endpoint: Endpoint | None


class _Window:
    """Sliding-window limiter: at most ``limit`` accepted hits in any ``seconds``."""

    def __init__(self, limit: int, seconds: float) -> None:
        self.limit = limit
        self.seconds = seconds
        self._hits: deque[float] = deque()

    def allow(self, now: float) -> bool:
        while self._hits and self._hits[0] <= now - self.seconds:
            self._hits.popleft()
        if len(self._hits) >= self.limit:
            return False
        self._hits.append(now)
        return True


def _error(status: int, message: str) -> web.Response:
    code: int | str = status if status in (401, 429) or status >= 500 else str(status)
    body = {"status": code, "error": HTTPStatus(status).phrase, "message": message}
    return web.json_response(body, status=status)


def _positive(n: int) -> int:
    if n < 1:
        raise ValueError("n must be at least 1")
    return n


class BouncerSimulator:
    """A Bouncer API v1.1 batch service on aiohttp; every knob is a plain method call.

    ``clock`` drives batch progress and rate limits (seconds, monotonic), so a test can pass a
    fake one and step time instead of sleeping.
    """

    def __init__(
        self,
        api_key: str,
        *,
        queue_seconds: float = 1.0,
        emails_per_second: float = 100.0,
        create_limit: int = 60,
        request_limit: int = 200,
        rate_window: float = 60.0,
        max_batch_size: int = MAX_BATCH_SIZE,
        credits: int | None = None,
        default_status: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not api_key:
            raise ValueError("an empty api_key would let every request in")
        if default_status is not None and default_status not in RESULT_STATUSES:
            raise ValueError(f"default_status must be one of {RESULT_STATUSES}")
        self.api_key = api_key
        self.queue_seconds = queue_seconds
        self.emails_per_second = emails_per_second
        self.max_batch_size = max_batch_size
        self.credits = credits
        self.default_status = default_status
        self._clock = clock
        self._create_window = _Window(create_limit, rate_window)
        self._request_window = _Window(request_limit, rate_window)
        self._rules: list[Rule] = list(BUILTIN_RULES)
        self._batches: dict[str, _Batch] = {}
        self._faults: list[_Fault] = []
        self._lose_creates = 0
        self._next_fates: deque[str] = deque()
        self._calls: Counter[str] = Counter()
        self._creations = 0
        self._runner: web.AppRunner | None = None
        self._host = ""
        self._port = 0

    # --- server -------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        """A fresh aiohttp application serving this simulator (for embedding elsewhere)."""
        # 100,000 addresses are several MB of JSON; aiohttp's 1 MiB default would refuse them.
        app = web.Application(middlewares=[_pipeline], client_max_size=64 * 1024 * 1024)
        app[BOUNCER_SIM] = self
        app.router.add_post(BATCH_PATH, _create, name="create")
        app.router.add_get(BATCH_PATH + "/{batch_id}", _status, name="status", allow_head=False)
        app.router.add_get(BATCH_PATH + "/{batch_id}/download", _download, name="download",
                           allow_head=False)
        app.router.add_delete(BATCH_PATH + "/{batch_id}", _delete, name="delete")
        app.router.add_post(BATCH_PATH + "/{batch_id}/finish", _finish, name="finish")
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on ``host:port`` (0 picks a free port); return the port."""
        if self._runner is not None:
            raise RuntimeError("simulator already started")
        runner = web.AppRunner(self.make_app(), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._host = host
        self._port = int(runner.addresses[0][1])
        return self._port

    async def stop(self) -> None:
        """Stop listening; idempotent. State is kept, so ``start`` again resumes it."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    @property
    def url(self) -> str:
        if self._runner is None:
            raise RuntimeError("simulator not started")
        return f"http://{self._host}:{self._port}"

    # --- behaviour knobs ----------------------------------------------------------------

    def set_speed(self, *, queue_seconds: float | None = None,
                  emails_per_second: float | None = None) -> None:
        """Change how long batches wait in the queue and how fast they are verified."""
        if queue_seconds is not None:
            self.queue_seconds = queue_seconds
        if emails_per_second is not None:
            self.emails_per_second = emails_per_second

    def set_rate_limits(self, *, create_limit: int | None = None,
                        request_limit: int | None = None, window: float | None = None) -> None:
        """Change the per-window limits: batch creations, and calls to the other endpoints."""
        for limiter, limit in ((self._create_window, create_limit),
                               (self._request_window, request_limit)):
            if limit is not None:
                limiter.limit = limit
            if window is not None:
                limiter.seconds = window

    def add_rule(self, rule: Rule) -> None:
        """Add a result rule; it wins over the built-in ones and over earlier added ones."""
        self._rules.append(rule)

    def clear_rules(self) -> None:
        """Drop the rules added with `add_rule`; the built-in ones stay."""
        self._rules = list(BUILTIN_RULES)

    def result_for(self, email: str, name: str | None = None) -> dict[str, Any]:
        """The record a download would give for ``email`` under the current rules."""
        return verify(email, name, self._rules, self.default_status)

    # --- faults -------------------------------------------------------------------------

    def fail_next(self, n: int = 1, *, status: int, endpoint: Endpoint | None = None) -> None:
        """The next ``n`` authenticated calls (to ``endpoint``, or any) answer ``status``."""
        if not 400 <= status <= 599:
            raise ValueError("status must be a 4xx or 5xx")
        self._faults.append(_Fault(status, _positive(n), endpoint))

    def rate_limit_next(self, n: int = 1, *, endpoint: Endpoint | None = None) -> None:
        """The next ``n`` calls answer 429 Too Many Requests."""
        self.fail_next(n, status=429, endpoint=endpoint)

    def payment_required_next(self, n: int = 1, *, endpoint: Endpoint | None = None) -> None:
        """The next ``n`` calls answer 402 Payment Required (out of credits)."""
        self.fail_next(n, status=402, endpoint=endpoint)

    def server_error_next(self, n: int = 1, *, status: int = 500,
                          endpoint: Endpoint | None = None) -> None:
        """The next ``n`` calls answer a 5xx ``status``."""
        if not 500 <= status <= 599:
            raise ValueError("status must be a 5xx")
        self.fail_next(n, status=status, endpoint=endpoint)

    def lose_create_response(self, n: int = 1) -> None:
        """The next ``n`` accepted creations make the batch, then close without answering."""
        self._lose_creates += _positive(n)

    def stick_next_batches(self, n: int = 1) -> None:
        """The next ``n`` batches stop at half way and stay ``processing`` for ever."""
        self._next_fates.extend(["stuck"] * _positive(n))

    def fail_next_batches(self, n: int = 1) -> None:
        """The next ``n`` batches turn ``failed`` half way through (not a documented status)."""
        self._next_fates.extend(["failed"] * _positive(n))

    def unknown_status_next_batches(self, n: int = 1, status: str = "paused") -> None:
        """The next ``n`` batches end in ``status`` instead of ``completed``."""
        if status in (*_RUNNING, "completed"):
            raise ValueError("that status is not unknown")
        self._next_fates.extend([status] * _positive(n))

    def stick_batch(self, batch_id: str) -> None:
        """Freeze a batch where it is now; it never completes (``finish`` still ends it)."""
        batch = self._get(batch_id)
        self._advance(batch)
        batch.fate = "stuck"
        batch.cap = int(batch.processed)

    def fail_batch(self, batch_id: str) -> None:
        """Mark a batch ``failed`` now."""
        self.set_batch_status(batch_id, "failed")

    def set_batch_status(self, batch_id: str, status: str) -> None:
        """Report ``status`` for the batch from now on (``completed`` completes it)."""
        batch = self._get(batch_id)
        if status == "completed":
            self._complete(batch)
        else:
            batch.status = status

    def complete_batch(self, batch_id: str) -> None:
        """Complete a batch now, whatever its speed or fate."""
        self._complete(self._get(batch_id))

    def complete_all(self) -> None:
        """Complete every batch that has not ended yet."""
        for batch in self._batches.values():
            if batch.status in _RUNNING:
                self._complete(batch)

    def clear_faults(self) -> None:
        """Forget pending faults (batches already given a fate keep it)."""
        self._faults.clear()
        self._lose_creates = 0
        self._next_fates.clear()

    # --- inspection ---------------------------------------------------------------------

    @property
    def calls(self) -> dict[str, int]:
        """Calls per endpoint, refused ones included."""
        return dict(self._calls)

    @property
    def creations(self) -> int:
        """Batches created, those whose response was lost included."""
        return self._creations

    def batches(self) -> list[BatchInfo]:
        """Every batch ever created, deleted ones included, oldest first."""
        return [self._info(b) for b in self._batches.values()]

    def batch(self, batch_id: str) -> BatchInfo:
        return self._info(self._get(batch_id))

    # --- internals, used by the handlers below ------------------------------------------

    def _get(self, batch_id: str) -> _Batch:
        try:
            return self._batches[batch_id]
        except KeyError:
            raise KeyError(f"no batch {batch_id}") from None

    def _info(self, batch: _Batch) -> BatchInfo:
        self._advance(batch)
        return BatchInfo(
            batch_id=batch.batch_id,
            status=batch.status,
            quantity=batch.quantity,
            duplicates=batch.duplicates,
            processed=int(batch.processed),
            emails=tuple(e for e, _ in batch.entries),
            names=tuple(n for _, n in batch.entries),
            deleted=batch.deleted,
            response_lost=batch.response_lost,
        )

    def _take_fault(self, endpoint: Endpoint) -> int | None:
        for fault in self._faults:
            if fault.endpoint in (None, endpoint):
                fault.remaining -= 1
                if fault.remaining == 0:
                    self._faults.remove(fault)
                return fault.status
        return None

    def _allow(self, endpoint: Endpoint) -> bool:
        window = self._create_window if endpoint == "create" else self._request_window
        return window.allow(self._clock())

    def _create(self, kept: list[tuple[str, str | None]], duplicates: int) -> _Batch:
        now = self._clock()
        fate = self._next_fates.popleft() if self._next_fates else "completed"
        batch = _Batch(
            batch_id=secrets.token_hex(12),
            entries=kept,
            duplicates=duplicates,
            created_at=now,
            created=_iso_now(),
            fate=fate,
            cap=len(kept) // 2 if fate in ("stuck", "failed") else len(kept),
            last_tick=now,
        )
        if self.credits is not None:
            self.credits -= batch.quantity
        self._batches[batch.batch_id] = batch
        self._creations += 1
        return batch

    def _advance(self, batch: _Batch) -> None:
        now = self._clock()
        if batch.status == "queued":
            start_at = batch.created_at + self.queue_seconds
            if now < start_at:
                return
            batch.status = "processing"
            batch.started = _iso_now()
            batch.last_tick = start_at
        if batch.status != "processing":
            return
        elapsed = max(0.0, now - batch.last_tick)
        batch.processed = min(float(batch.cap),
                              batch.processed + elapsed * self.emails_per_second)
        batch.last_tick = now
        if batch.processed < batch.cap or batch.fate == "stuck":
            return
        if batch.fate == "completed":
            self._complete(batch)
        else:
            batch.status = batch.fate

    def _complete(self, batch: _Batch, *, early: bool = False) -> None:
        verified = int(batch.processed) if early else batch.quantity
        batch.results = [
            self.result_for(email, name) if i < verified else unverified(email, name)
            for i, (email, name) in enumerate(batch.entries)
        ]
        if self.credits is not None:
            self.credits += batch.quantity - verified
        batch.started = batch.started or _iso_now()
        batch.completed = _iso_now()
        batch.status = "completed"
        batch.fate = "completed"
        batch.processed = float(batch.quantity)
        batch.credits_used = verified


# --- HTTP ---------------------------------------------------------------------------------

BOUNCER_SIM: Final = web.AppKey("bouncer_sim", BouncerSimulator)


@web.middleware
async def _pipeline(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count, authenticate, inject faults, rate-limit, in that order, before any handler."""
    failure = request.match_info.http_exception
    if failure is not None:
        return _error(failure.status, failure.reason)
    sim = request.app[BOUNCER_SIM]
    endpoint = _ENDPOINTS.get(request.match_info.route.name or "")
    if endpoint is None:
        return await handler(request)
    sim._calls[endpoint] += 1
    key = request.headers.get("x-api-key", "")
    if not hmac.compare_digest(key.encode(), sim.api_key.encode()):
        return _error(401, "invalid api key" if key else "missing api key")
    fault = sim._take_fault(endpoint)
    if fault is not None:
        message = f"{sim.credits or 0} credits left" if fault == 402 else "simulated fault"
        return _error(fault, "too many requests" if fault == 429 else message)
    if not sim._allow(endpoint):
        return _error(429, "too many requests")
    return await handler(request)


def _parse_entries(payload: object, limit: int) -> list[tuple[str, str | None]] | str:
    if not isinstance(payload, list):
        return "body must be a JSON array of {email, name}"
    if not payload:
        return "no emails"
    if len(payload) > limit:
        return "too many emails"
    entries: list[tuple[str, str | None]] = []
    for item in payload:
        if not isinstance(item, dict) or not isinstance(item.get("email"), str):
            return "every entry needs an email string"
        name = item.get("name")
        if name is not None and not isinstance(name, str):
            return "name must be a string"
        entries.append((item["email"], name))
    return entries


async def _create(request: web.Request) -> web.StreamResponse:
    sim = request.app[BOUNCER_SIM]
    try:
        payload = await request.json()
    except ValueError:
        return _error(400, "body is not valid JSON")
    entries = _parse_entries(payload, sim.max_batch_size)
    if isinstance(entries, str):
        return _error(400, entries)
    unique: dict[str, tuple[str, str | None]] = {}
    for email, name in entries:
        unique.setdefault(email.strip().lower(), (email, name))
    if sim.credits is not None and sim.credits < len(unique):
        return _error(402, f"{max(sim.credits, 0)} credits left")
    batch = sim._create(list(unique.values()), len(entries) - len(unique))
    if sim._lose_creates > 0:
        sim._lose_creates -= 1
        batch.response_lost = True
        # The batch exists but the client never hears of it: the case that tempts a retry
        # into creating (and paying for) a second batch.
        if request.transport is not None:
            request.transport.close()
        return web.Response(status=204)
    return web.json_response({
        "batchId": batch.batch_id,
        "created": batch.created,
        "status": batch.status,
        "quantity": batch.quantity,
        "duplicates": batch.duplicates,
    })


def _find(request: web.Request) -> _Batch | web.Response:
    sim = request.app[BOUNCER_SIM]
    batch_id = request.match_info["batch_id"]
    batch = sim._batches.get(batch_id)
    if batch is None or batch.deleted:
        return _error(404, f"request {batch_id} does not exist")
    sim._advance(batch)
    return batch


async def _status(request: web.Request) -> web.StreamResponse:
    batch = _find(request)
    if isinstance(batch, web.Response):
        return batch
    body: dict[str, Any] = {"batchId": batch.batch_id, "created": batch.created}
    if batch.started:
        body["started"] = batch.started
    if batch.completed:
        body["completed"] = batch.completed
    body |= {
        "status": batch.status,
        "quantity": batch.quantity,
        "duplicates": batch.duplicates,
        "processed": int(batch.processed),
    }
    if batch.credits_used is not None:
        body["credits"] = batch.credits_used
    if request.query.get("with-stats") == "true" and batch.results is not None:
        counts = Counter(r["status"] for r in batch.results)
        body["stats"] = {s: counts[s] for s in RESULT_STATUSES}
    return web.json_response(body)


async def _download(request: web.Request) -> web.StreamResponse:
    which = request.query.get("download", "all")
    if which != "all" and which not in RESULT_STATUSES:
        return _error(400, f"download must be all or one of {', '.join(RESULT_STATUSES)}")
    batch = _find(request)
    if isinstance(batch, web.Response):
        return batch
    if batch.status != "completed" or batch.results is None:
        return _error(400, f"batch is {batch.status}, not completed")
    return web.json_response(
        [r for r in batch.results if which == "all" or r["status"] == which]
    )


async def _delete(request: web.Request) -> web.StreamResponse:
    batch = _find(request)
    if isinstance(batch, web.Response):
        return batch
    batch.deleted = True
    return web.json_response({})


async def _finish(request: web.Request) -> web.StreamResponse:
    batch = _find(request)
    if isinstance(batch, web.Response):
        return batch
    if batch.status not in _RUNNING:
        return _error(400, "batch has to be running to finish")
    request.app[BOUNCER_SIM]._complete(batch, early=True)
    return web.json_response({}, status=202)


# --- standalone ---------------------------------------------------------------------------


async def serve(
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    api_key: str = DEFAULT_API_KEY,
    *,
    queue_seconds: float = 1.0,
    emails_per_second: float = 100.0,
    on_ready: Callable[[BouncerSimulator], None] | None = None,
) -> None:
    """Run a simulator until cancelled."""
    sim = BouncerSimulator(api_key, queue_seconds=queue_seconds,
                           emails_per_second=emails_per_second)
    await sim.start(host, port)
    log.info("bouncer_sim_listening url=%s", sim.url)
    try:
        if on_ready is not None:
            on_ready(sim)
        await asyncio.Event().wait()
    finally:
        await sim.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imsys sim bouncer",
                                     description="Bouncer API v1.1 simulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--api-key", default=DEFAULT_API_KEY)
    parser.add_argument("--queue-seconds", type=float, default=1.0)
    parser.add_argument("--emails-per-second", type=float, default=100.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, args.api_key, queue_seconds=args.queue_seconds,
                          emails_per_second=args.emails_per_second))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
