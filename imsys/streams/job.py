"""A job as the engine hands it to a handler, and the registry of handlers by type."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import pydantic
from pydantic import BaseModel

from imsys.errors import InvalidJob, UnknownJobType
from imsys.validation import describe

P = TypeVar("P", bound=BaseModel)

MASK = "***"


@dataclass(slots=True)
class Job(Generic[P]):
    """One delivery of one stream entry."""

    stream: str
    id: str
    type: str
    payload: P
    attempt: int
    job_id: str | None
    enqueued_at: int | None
    fields: dict[str, str]
    # Set by the engine; a long handler calls ``await job.progress(done, total)``.
    report: Callable[[Job[Any], int, int | None, str | None], Awaitable[None]] | None = field(
        default=None, repr=False
    )
    # Set by the engine from the job type's policy (or its stream's).
    max_attempts: int = 1
    # When the handler's time is up (time.monotonic()); the engine cancels it then.
    deadline: float = float("inf")
    # The claim's delivery count when this process took the entry: the fencing token.
    # XREADGROUP makes it 1; each claim by recovery raises it (heartbeats do not).
    delivery: int = 1
    # Set by the engine: raises FencedOut when this delivery is no longer the current one.
    fence: Callable[[Job[Any]], Awaitable[None]] | None = field(default=None, repr=False)
    # Set by the engine: the synchronous half of the fence (see ``check_claim``).
    claim_check: Callable[[Job[Any]], None] | None = field(default=None, repr=False)

    async def ensure_current(self) -> None:
        """Raise ``FencedOut`` unless this process still holds this delivery's claim.

        Call it before every side effect that must not happen twice at once (a router
        write, a status, a payment, a message), inside the database transaction that
        makes the side effect, after locking the row it changes: a process that claims
        the job afterwards then waits for that row and sees the result, and one that
        claimed it before makes this check fail.
        """
        if self.fence is not None:
            await self.fence(self)

    @property
    def last_attempt(self) -> bool:
        """True when a retryable failure now dead-letters the job instead of retrying it."""
        return self.attempt >= self.max_attempts

    def check_claim(self) -> None:
        """Raise ``FencedOut`` unless the claim is provably still this process's, without
        awaiting anything (so an adapter can call it in the very step that sends a write).

        It passes right after ``ensure_current``; it fails once this process has stalled
        since (a freeze, a SIGSTOP), whether or not another process took the job.
        """
        if self.claim_check is not None:
            self.claim_check(self)

    async def progress(self, done: int, total: int | None = None, note: str | None = None) -> None:
        """Publish how far this job has come (shown by ``GET /api/queues`` and ``queues``)."""
        if self.report is not None:
            await self.report(self, done, total, note)


Handler = Callable[[Job[Any]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class JobSpec(Generic[P]):
    """One job type, declared once next to its handler; everything else takes this.

    Registration, producers, the outbox and the SQL that enqueues jobs all name a job by
    its spec, never by a string of their own, and every payload goes through ``dump``:
    a producer either sends a valid payload or gets ``InvalidJob`` saying why.
    """

    stream: str
    name: str  # the entry's ``type`` field
    model: type[P]
    # None: the stream's ``max_attempts`` / ``job_timeout_s``.
    max_attempts: int | None = None
    timeout_s: float | None = None
    # Payload keys whose values never leave the process (masked in dead letters).
    secret_fields: tuple[str, ...] = ()

    def validate(self, payload: P | Mapping[str, Any]) -> P:
        if isinstance(payload, self.model):
            return payload
        try:
            return self.model.model_validate(payload)
        except pydantic.ValidationError as exc:
            raise InvalidJob(f"invalid payload for {self.name}: {_describe(exc)}") from None

    def dump(self, payload: P | Mapping[str, Any]) -> str:
        """The payload as the stream carries it (JSON of the fields given), validated."""
        return self.validate(payload).model_dump_json(exclude_unset=True)


@dataclass(frozen=True, slots=True)
class Registration:
    spec: JobSpec[Any]
    handler: Handler

    @property
    def model(self) -> type[BaseModel]:
        return self.spec.model

    @property
    def secret_fields(self) -> tuple[str, ...]:
        return self.spec.secret_fields


class Registry:
    """Handlers by (stream, type). Domains register; the engine dispatches."""

    def __init__(self, max_payload_bytes: int = 1_048_576) -> None:
        self._by_stream: dict[str, dict[str, Registration]] = {}
        self.max_payload_bytes = max_payload_bytes

    def add(self, spec: JobSpec[P], handler: Callable[[Job[P]], Awaitable[None]]) -> None:
        """Dispatch ``spec``'s jobs to ``handler``."""
        types = self._by_stream.setdefault(spec.stream, {})
        if spec.name in types:
            raise ValueError(f"handler for {spec.stream}/{spec.name} registered twice")
        types[spec.name] = Registration(spec, handler)

    def register(
        self,
        stream: str,
        type_: str,
        model: type[P],
        handler: Callable[[Job[P]], Awaitable[None]],
        *,
        secret_fields: Iterable[str] = (),
    ) -> None:
        """``add`` for a spec made on the spot (tests and the benchmark)."""
        self.add(JobSpec(stream, type_, model, secret_fields=tuple(secret_fields)), handler)

    def spec(self, stream: str, type_: str) -> JobSpec[Any] | None:
        reg = self.get(stream, type_)
        return None if reg is None else reg.spec

    @property
    def streams(self) -> list[str]:
        return list(self._by_stream)

    def types(self, stream: str) -> list[str]:
        return list(self._by_stream.get(stream, {}))

    def get(self, stream: str, type_: str) -> Registration | None:
        return self._by_stream.get(stream, {}).get(type_)

    def parse(
        self, stream: str, entry_id: str, fields: dict[str, str]
    ) -> tuple[Registration, Job[Any]]:
        """Turn a raw entry into a validated job, or raise a permanent error saying why."""
        type_ = fields.get("type")
        if not type_:
            raise InvalidJob("entry has no 'type' field")
        reg = self._by_stream.get(stream, {}).get(type_)
        if reg is None:
            raise UnknownJobType(f"no handler for type {type_!r} on stream {stream!r}")
        raw = fields.get("payload")
        if raw is None:
            raise InvalidJob("entry has no 'payload' field")
        if len(raw) > self.max_payload_bytes:
            raise InvalidJob(
                f"payload is {len(raw)} bytes, over the {self.max_payload_bytes} limit"
            )
        try:
            payload = reg.spec.model.model_validate_json(raw)
        except pydantic.ValidationError as exc:
            raise InvalidJob(f"invalid payload for {type_}: {_describe(exc)}") from None
        attempt = _int_field(fields, "attempt", 1)
        enqueued_at = _int_field(fields, "enqueued_at", None)
        return reg, Job(
            stream=stream,
            id=entry_id,
            type=type_,
            payload=payload,
            attempt=max(attempt, 1),
            job_id=fields.get("job_id") or None,
            enqueued_at=enqueued_at,
            fields=fields,
        )

    def masked_fields(self, stream: str, fields: dict[str, str]) -> dict[str, str]:
        """The entry's fields with secret payload values masked, for a dead letter."""
        reg = self.get(stream, fields.get("type", ""))
        if reg is None or not reg.secret_fields or "payload" not in fields:
            return fields
        return {**fields, "payload": mask_payload(fields["payload"], reg.secret_fields)}


def mask_payload(raw: str, secret_fields: Iterable[str]) -> str:
    """Replace the values of ``secret_fields`` in a JSON object; unparseable → fully masked."""
    import orjson

    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return MASK
    if not isinstance(data, dict):
        return MASK
    for key in secret_fields:
        if key in data:
            data[key] = MASK
    return orjson.dumps(data).decode()


def _int_field(fields: dict[str, str], name: str, default: int | None) -> Any:
    raw = fields.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise InvalidJob(f"field {name!r} is not an integer: {raw[:40]!r}") from None


def _describe(exc: pydantic.ValidationError) -> str:
    return describe(exc, whole="payload", limit=5)


def now_ms() -> int:
    return int(time.time() * 1000)
