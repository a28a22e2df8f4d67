"""Per-stream figures: in-process counters and latency, and the stream's own state in Redis.

What ``/metrics`` shows follows three rules, so alerts behave on an idle process too:
every series this process can ever have is there from the first scrape (a counter at 0,
not missing until its first job, so ``rate()`` and ``absent()`` see it); counters are
named ``..._total`` and typed ``counter``, and nothing else carries that suffix; a value
that is not known (Redis cannot say a group's lag, PostgreSQL does not answer for the
routers) is left out rather than exported as 0.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from imsys.streams.keys import GROUP, Keys

# No ``<counter>_created`` gauge beside each counter: in the 0.0.4 text format it is a
# series of its own holding a timestamp, twice the series for nothing Prometheus uses.
# prometheus_client only offers this switch for the whole process.
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus_client

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# The text exposition format, version 0.0.4, as Prometheus asks for it.
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
# The all-process counters a stream's stats hash keeps (``<prefix>:stats:<stream>``).
ALL_PROCESSES: Final = (
    ("processed", "Jobs handled successfully, all processes"),
    ("retried", "Jobs scheduled for a retry, all processes"),
    ("deferred", "Jobs put off without spending an attempt, all processes"),
    ("dead", "Jobs moved to the dead-letter stream, all processes"),
    ("deduplicated", "Enqueues dropped as a repeated job_id, all processes"),
)


class LatencyHistogram:
    """Handler run time per (stream, type), exported as a Prometheus histogram.

    Plain counts, no locks: only the event loop's thread observes and collects. The
    engine observes every finished job, and prometheus_client's Histogram, which takes a
    lock per bucket and sum, cost 2.2 us each against 0.4 us here.
    """

    def __init__(self, name: str, doc: str, buckets: tuple[float, ...]) -> None:
        self.name, self.doc = name, doc
        self.bounds = buckets
        self._les = (*map(floatToGoString, buckets), "+Inf")
        # Per label pair: the count of each bucket alone (the last is +Inf), and the sum.
        self._counts: dict[tuple[str, str], list[int]] = {}
        self._sums: dict[tuple[str, str], float] = {}

    def declare(self, stream: str, type_: str) -> list[int]:
        """The pair's buckets, created at 0 if new: the series exists before its first job."""
        key = (stream, type_)
        counts = self._counts.get(key)
        if counts is None:
            counts = self._counts[key] = [0] * (len(self.bounds) + 1)
            self._sums[key] = 0.0
        return counts

    def observe(self, stream: str, type_: str, seconds: float) -> None:
        self.declare(stream, type_)[bisect_left(self.bounds, seconds)] += 1
        self._sums[(stream, type_)] += seconds

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.doc, labels=["stream", "type"])
        for key, counts in self._counts.items():
            cumulative, total = [], 0
            for le, count in zip(self._les, counts, strict=True):
                total += count
                cumulative.append((le, total))
            family.add_metric(list(key), cumulative, self._sums[key])
        yield family


@dataclass(frozen=True, slots=True)
class RouterState:
    """What ``/metrics`` says of one router; ``online`` is None until it was first reached."""

    router_id: int
    tenant_id: int
    name: str
    online: bool | None
    guard_tripped: bool
    maintenance: bool = False


@dataclass(frozen=True, slots=True)
class ChannelState:
    """A delivery channel: stopped by an operator, and for how many tenants out of credit."""

    channel: str
    stopped: bool
    out_of_credit_tenants: int


class EngineMetrics:
    """Counters of this process; one per app, never a module global."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # prometheus_client adds the ``_total`` suffix.
        self.processed = Counter(
            "imsys_jobs_processed", "Jobs handled successfully", ["stream"], registry=r
        )
        self.retried = Counter(
            "imsys_jobs_retried", "Jobs scheduled for a retry", ["stream"], registry=r
        )
        self.deferred = Counter(
            "imsys_jobs_deferred",
            "Jobs put off without spending an attempt",
            ["stream"],
            registry=r,
        )
        self.dead = Counter(
            "imsys_jobs_dead", "Jobs moved to the dead-letter stream", ["stream"], registry=r
        )
        self.recovered = Counter(
            "imsys_jobs_recovered",
            "Entries claimed from a consumer that stopped answering",
            ["stream"],
            registry=r,
        )
        self.latency = LatencyHistogram(
            "imsys_handler_seconds", "Handler run time", LATENCY_BUCKETS
        )
        r.register(self.latency)
        self._gauges = {
            name: Gauge(f"imsys_stream_{name}", doc, ["stream"], registry=r)
            for name, doc in (
                ("length", "Entries in the stream"),
                ("pending", "Entries delivered and not yet acknowledged"),
                (
                    "lag",
                    "Entries not yet delivered to the group (left out while Redis cannot tell)",
                ),
                ("delayed", "Jobs waiting in the delayed-retry store"),
                ("oldest_pending_age_seconds", "Age of the oldest pending entry, 0 when none"),
            )
        }
        # Totals every process shares in Redis. Gauges, not counters: each process reports
        # the same figure, and Redis losing its data resets them.
        self._all_processes = {
            name: Gauge(f"imsys_stream_{name}_all_processes", doc, ["stream"], registry=r)
            for name, doc in ALL_PROCESSES
        }
        self.dead_letters = Gauge(
            "imsys_dead_letters", "Entries in the dead-letter stream", registry=r
        )
        self.router_info = Gauge(
            "imsys_router_info",
            "1 per router, naming it and its tenant",
            ["router_id", "tenant_id", "name"],
            registry=r,
        )
        self.router_online = Gauge(
            "imsys_router_online",
            "1 while the router answers, 0 while it is offline; left out until first reached",
            ["router_id"],
            registry=r,
        )
        self.router_guard = Gauge(
            "imsys_router_guard_tripped",
            "1 while the router's mass-disconnect guard holds disconnections for an operator",
            ["router_id"],
            registry=r,
        )
        self.router_maintenance = Gauge(
            "imsys_router_maintenance",
            "1 while the router is in maintenance: its jobs wait, reconciliation passes it by",
            ["router_id"],
            registry=r,
        )
        self.stream_paused = Gauge(
            "imsys_stream_paused",
            "1 while the stream is paused: it accepts jobs and runs none, in every process",
            ["stream"],
            registry=r,
        )
        self.channel_stopped = Gauge(
            "imsys_channel_stopped",
            "1 while an operator has stopped the delivery channel (service_control)",
            ["channel"],
            registry=r,
        )
        self.channel_out_of_credit = Gauge(
            "imsys_channel_out_of_credit_tenants",
            "Tenants the channel is stopped for because the provider reported no credit",
            ["channel"],
            registry=r,
        )

    def declare(self, types: Mapping[str, Iterable[str]]) -> None:
        """Create every series of these streams and their job types at 0 (idempotent).

        prometheus_client shows a labelled counter only once a label set was used, and the
        histogram has nothing before the first job; ``rate()`` and ``absent()`` need them.
        """
        counters = (self.processed, self.retried, self.deferred, self.dead, self.recovered)
        for stream, stream_types in types.items():
            for counter in counters:
                counter.labels(stream)
            for type_ in stream_types:
                self.latency.declare(stream, type_)

    def observe(self, stream: str, type_: str, seconds: float) -> None:
        self.latency.observe(stream, type_, seconds)

    def render(
        self,
        figures: list[StreamFigures],
        dead_letters: int,
        routers: list[RouterState] | None = None,
        channels: list[ChannelState] | None = None,
    ) -> bytes:
        """The registry as Prometheus text. ``routers`` lists every router and ``channels``
        every channel (a removed router's series goes with it); None when they could not be
        read, and then their series are left out, not kept from an earlier scrape."""
        for gauge in (
            self.router_info,
            self.router_online,
            self.router_guard,
            self.router_maintenance,
        ):
            gauge.clear()
        for router in routers or ():
            rid = str(router.router_id)
            self.router_info.labels(rid, str(router.tenant_id), router.name).set(1)
            self.router_guard.labels(rid).set(1 if router.guard_tripped else 0)
            self.router_maintenance.labels(rid).set(1 if router.maintenance else 0)
            if router.online is not None:
                self.router_online.labels(rid).set(1 if router.online else 0)
        self.channel_stopped.clear()
        self.channel_out_of_credit.clear()
        for ch in channels or ():
            self.channel_stopped.labels(ch.channel).set(1 if ch.stopped else 0)
            self.channel_out_of_credit.labels(ch.channel).set(ch.out_of_credit_tenants)
        for f in figures:
            self._render_stream(f)
        self.dead_letters.set(dead_letters)
        return generate_latest(self.registry)

    def _render_stream(self, f: StreamFigures) -> None:
        g = self._gauges
        g["length"].labels(f.stream).set(f.length)
        g["pending"].labels(f.stream).set(f.pending)
        g["delayed"].labels(f.stream).set(f.delayed)
        self.stream_paused.labels(f.stream).set(1 if f.paused else 0)
        _set_or_omit(g["lag"], f.stream, f.lag)
        # Nothing pending: no entry waits, a known 0; pending but unread: unknown.
        age = 0.0 if f.pending == 0 else f.oldest_pending_age_s
        _set_or_omit(g["oldest_pending_age_seconds"], f.stream, age)
        for name, _ in ALL_PROCESSES:
            self._all_processes[name].labels(f.stream).set(getattr(f, name))


def _set_or_omit(gauge: Gauge, stream: str, value: float | None) -> None:
    if value is not None:
        gauge.labels(stream).set(value)
    else:
        try:
            gauge.remove(stream)
        except KeyError:
            pass  # never set: nothing to take away


@dataclass(slots=True)
class StreamFigures:
    stream: str
    length: int
    pending: int
    lag: int | None
    delayed: int
    oldest_pending_age_s: float | None
    consumers: int
    processed: int
    retried: int
    deferred: int
    dead: int
    deduplicated: int
    # Paused (``streams/pause.py``): the engine fills this in, the stream cannot tell.
    paused: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def stream_figures(redis: Redis, keys: Keys, stream: str) -> StreamFigures:
    """What ``XINFO`` and ``XPENDING`` say of one stream, plus the all-process counters."""
    key = keys.stream(stream)
    pipe = redis.pipeline(transaction=False)
    pipe.xlen(key)
    pipe.zcard(keys.delayed(stream))
    pipe.hgetall(keys.stats(stream))
    length, delayed, stats = await pipe.execute()
    pending = 0
    lag: int | None = None
    consumers = 0
    oldest: float | None = None
    try:
        for g in await redis.xinfo_groups(key):
            if g["name"] == GROUP:
                pending = int(g["pending"])
                lag = None if g.get("lag") is None else int(g["lag"])
                consumers = int(g["consumers"])
        if pending:
            summary = await redis.xpending(key, GROUP)
            if summary and summary.get("min"):
                oldest = max(0.0, time.time() - int(summary["min"].split("-")[0]) / 1000)
    except ResponseError:
        pass  # no stream or no group yet: nothing pending
    return StreamFigures(
        stream=stream,
        length=int(length),
        pending=pending,
        lag=lag,
        delayed=int(delayed),
        oldest_pending_age_s=oldest,
        consumers=consumers,
        processed=int(stats.get("processed", 0)),
        retried=int(stats.get("retried", 0)),
        deferred=int(stats.get("deferred", 0)),
        dead=int(stats.get("dead", 0)),
        deduplicated=int(stats.get("deduplicated", 0)),
    )
