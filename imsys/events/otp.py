"""One-time passwords: ``whatsapp_otp`` and ``email_otp`` jobs.

A code is sent at most once per job and never after its ``expires_at``: every attempt,
the first and each retry, checks the clock before it sends, and an expired code is
dead-lettered (`Expired`) instead. The code never leaves this module except towards the
provider: its job spec masks it in dead letters, no log line carries it, and an
error text that quotes it (a provider echoing the request) is scrubbed before the engine
sees it.
"""

from __future__ import annotations

import math
import re
import time
from datetime import UTC, datetime
from typing import Any, Final, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator

from imsys.backoff import REDIS_DOWN
from imsys.errors import Deferred, Expired, PermanentError, RetryableError
from imsys.events.channels import send_key
from imsys.events.context import EventsContext
from imsys.streams.job import MASK, Job, JobSpec, now_ms

log = structlog.get_logger("imsys.events")

OtpChannel = Literal["whatsapp", "email"]

_CODE: Final = re.compile(r"[0-9A-Za-z]{4,16}")
_PHONE: Final = re.compile(r"\+?[0-9]{7,15}")
_PHONE_PUNCTUATION: Final = re.compile(r"[\s().-]")
_EMAIL: Final = re.compile(r"[^@\s<>]+@[^@\s<>]+")
# How long a delivered job stays marked past its code's expiry (a redelivery after a
# crash between send and acknowledgement must find the mark).
_SENT_MARK_EXTRA_MS: Final = 3_600_000


class OtpPayload(BaseModel):
    """``{"recipient", "otp", "user_name", "expires_at": epoch ms}`` (DESIGN.md)."""

    model_config = ConfigDict(str_strip_whitespace=True)

    recipient: str = Field(min_length=1, max_length=320)
    otp: str
    user_name: str = Field(default="", max_length=200)
    expires_at: int = Field(gt=0)

    @field_validator("otp")
    @classmethod
    def _code(cls, value: str) -> str:
        # Messages never repeat the value: it is the secret.
        if value == MASK:
            raise ValueError(
                "is masked: a replayed dead letter keeps no code; have the backend issue a new OTP"
            )
        if not _CODE.fullmatch(value):
            raise ValueError("must be 4 to 16 letters or digits")
        return value

    @field_validator("user_name")
    @classmethod
    def _one_line(cls, value: str) -> str:
        # WhatsApp refuses template variables with line breaks or runs of spaces.
        return " ".join(value.split())


class WhatsAppOtp(OtpPayload):
    @field_validator("recipient")
    @classmethod
    def _phone(cls, value: str) -> str:
        number = _PHONE_PUNCTUATION.sub("", value)
        if not _PHONE.fullmatch(number):
            raise ValueError("must be a phone number in international form, e.g. +254700000001")
        return number


class EmailOtp(OtpPayload):
    @field_validator("recipient")
    @classmethod
    def _address(cls, value: str) -> str:
        if not _EMAIL.fullmatch(value):
            raise ValueError("must be an e-mail address")
        return value


class OtpNotSent(RetryableError):
    """A retryable failure whose original text quoted the code (scrubbed here)."""


class OtpRefused(PermanentError):
    """A permanent failure whose original text quoted the code (scrubbed here)."""


# secret_fields: a dead letter keeps the job for inspection and replay, never the code.
WHATSAPP_OTP = JobSpec("events", "whatsapp_otp", WhatsAppOtp, secret_fields=("otp",))
EMAIL_OTP = JobSpec("events", "email_otp", EmailOtp, secret_fields=("otp",))


async def whatsapp_otp(ctx: EventsContext, job: Job[WhatsAppOtp]) -> None:
    await deliver(ctx, job, "whatsapp")


async def email_otp(ctx: EventsContext, job: Job[EmailOtp]) -> None:
    await deliver(ctx, job, "email")


async def deliver(ctx: EventsContext, job: Job[Any], channel: OtpChannel) -> None:
    payload: OtpPayload = job.payload
    mark = ctx.keys.otp_sent(job.stream, job.id)
    if await _already_sent(ctx, mark):
        log.info("otp_already_sent", entry_id=job.id, job_id=job.job_id, channel=channel)
        return
    await _check_expiry(ctx, job, channel)
    await ctx.channels.ensure_running(channel)
    # The channel's rate is shared with bulk notifications; an OTP takes it first.
    await ctx.fair.turn(send_key(channel, None), f"otp:{job.id}", "otp",
                        ctx.send_rate_per_s.get(channel, 10.0), priority=True)
    # Last check before the code leaves: a delivery whose claim another process took
    # (it stalled) raises FencedOut here and sends nothing; the current one sends.
    await job.ensure_current()
    started = time.perf_counter()
    try:
        provider_id = await _send(ctx, channel, payload)
    except Exception as exc:
        replacement = await _failed(ctx, job, channel, exc)
        if replacement is not None:
            raise replacement from None
        raise
    # Remembered even if this delivery was fenced out during the call: the code did go
    # out, and the mark is what keeps the current delivery from sending it again.
    await _remember(ctx, mark, payload.expires_at, provider_id)
    now = now_ms()
    await ctx.events.publish(
        "otp_sent",
        {
            **_identity(job, channel),
            "provider_message_id": provider_id,
            "attempt": job.attempt,
            "sent_at": now,
            "expires_at": payload.expires_at,
            "delivered_in_ms": now - job.enqueued_at if job.enqueued_at else None,
        },
    )
    log.info(
        "otp_sent",
        channel=channel,
        to=mask_recipient(payload.recipient),
        entry_id=job.id,
        job_id=job.job_id,
        attempt=job.attempt,
        provider_message_id=provider_id,
        ms=round((time.perf_counter() - started) * 1000, 1),
    )


async def _check_expiry(ctx: EventsContext, job: Job[Any], channel: OtpChannel) -> None:
    """Raise `Expired` when the code is past its deadline: too late is never sent."""
    late_ms = now_ms() - job.payload.expires_at
    if late_ms < 0:
        return
    await _publish_failed(ctx, job, channel, "expired", "expired before it could be sent")
    log.warning(
        "otp_expired",
        channel=channel,
        to=mask_recipient(job.payload.recipient),
        entry_id=job.id,
        job_id=job.job_id,
        attempt=job.attempt,
        late_s=round(late_ms / 1000, 1),
    )
    raise Expired(
        f"OTP expired at {_iso(job.payload.expires_at)}, {late_ms / 1000:.1f}s before "
        f"attempt {job.attempt}; not sent"
    )


async def _send(ctx: EventsContext, channel: OtpChannel, p: OtpPayload) -> str:
    minutes = max(1, math.ceil((p.expires_at - now_ms()) / 60_000))
    values = {"user_name": p.user_name, "otp": p.otp, "minutes": minutes}
    cfg = ctx.cfg
    if channel == "email":
        subject = cfg.email_subject.format_map(values)
        return await ctx.smtp.send(p.recipient, subject, cfg.otp_message.format_map(values))
    if cfg.whatsapp_template:
        return await ctx.whatsapp.send_template(
            p.recipient,
            cfg.whatsapp_template,
            cfg.whatsapp_language,
            [t.format_map(values) for t in cfg.whatsapp_template_params],
            copy_code=p.otp if cfg.whatsapp_copy_code else None,
        )
    return await ctx.whatsapp.send_text(p.recipient, cfg.otp_message.format_map(values))


async def _failed(
    ctx: EventsContext, job: Job[Any], channel: OtpChannel, exc: Exception
) -> Exception | None:
    """Report a failed send; return the exception to raise instead, if any."""
    otp: str = job.payload.otp
    error = _type_and_text(exc).replace(otp, MASK)
    if not isinstance(exc, PermanentError) and now_ms() >= job.payload.expires_at:
        # A retry could only find it expired: dead-letter it now, saying why.
        await _publish_failed(ctx, job, channel, "expired", error)
        return Expired(f"OTP expired after a failed attempt {job.attempt}: {error}")
    final = isinstance(exc, PermanentError) or job.last_attempt
    log.warning(
        "otp_attempt_failed",
        channel=channel,
        to=mask_recipient(job.payload.recipient),
        entry_id=job.id,
        job_id=job.job_id,
        attempt=job.attempt,
        final=final,
        error=error,
    )
    if final:
        reason = "rejected" if isinstance(exc, PermanentError) else "attempts_exhausted"
        await _publish_failed(ctx, job, channel, reason, error)
    if otp not in str(exc):
        return None
    if isinstance(exc, PermanentError):
        return OtpRefused(error)
    return OtpNotSent(error, defer=getattr(exc, "defer", None))


async def _publish_failed(
    ctx: EventsContext, job: Job[Any], channel: OtpChannel, reason: str, error: str
) -> None:
    await ctx.events.publish(
        "otp_failed",
        {
            **_identity(job, channel),
            "reason": reason,
            "error": error,
            "attempt": job.attempt,
            "expires_at": job.payload.expires_at,
        },
    )


async def _already_sent(ctx: EventsContext, mark: str) -> bool:
    try:
        return bool(await ctx.redis.exists(mark))
    except REDIS_DOWN:
        # Sending blind could repeat a delivered code; wait for Redis instead.
        raise Deferred("Redis unavailable for the OTP sent mark", delay=1.0) from None


async def _remember(ctx: EventsContext, mark: str, expires_at: int, provider_id: str) -> None:
    ttl = max(expires_at - now_ms(), 0) + _SENT_MARK_EXTRA_MS
    try:
        await ctx.redis.set(mark, provider_id, px=ttl)
    except REDIS_DOWN:
        # Sent is sent: failing the job now would only send it again.
        log.warning("otp_sent_mark_lost", mark=mark)


def _identity(job: Job[Any], channel: OtpChannel) -> dict[str, Any]:
    """What lets the backend match an event to its request; never the code."""
    return {
        "channel": channel,
        "recipient": job.payload.recipient,
        "user_name": job.payload.user_name,
        "job_id": job.job_id,
        "entry_id": job.id,
    }


def mask_recipient(recipient: str) -> str:
    """Enough of a number or address to find it in the records, not enough to misuse."""
    return re.sub(r"(?<=.{4}).(?=.{2})", "*", recipient)


def _iso(epoch_ms: int) -> str:
    try:
        return datetime.fromtimestamp(epoch_ms / 1000, UTC).isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return f"{epoch_ms} (epoch ms)"


def _type_and_text(exc: Exception) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
