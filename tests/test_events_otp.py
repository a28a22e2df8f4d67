"""One-time passwords through the WhatsApp simulator and a real SMTP server: delivery,
expiry, retries, bad payloads, and the code kept out of logs and dead letters."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from imsys.settings import Settings
from imsys.streams.job import now_ms
from tests.events_support import CODE, EMAIL, PHONE, EventsStack, events_stack, otp_payload


@pytest.fixture
async def ev(settings: Settings, redis: Redis, db: asyncpg.Pool) -> AsyncIterator[EventsStack]:
    async with events_stack(settings, redis, db) as stack:
        yield stack


async def test_whatsapp_otp_delivered_with_name_and_code(ev: EventsStack) -> None:
    """A whatsapp_otp job sends one text message with the user's name and the code."""
    entry_id = await ev.enqueue("whatsapp_otp", otp_payload(), job_id="otp-1")
    assert await ev.step() == 1
    [message] = ev.gateway.messages("whatsapp")
    assert message.to == PHONE
    assert CODE in message.body
    assert "Ann Wanjiru" in message.body
    assert "5 minute(s)" in message.body
    [sent] = await ev.events("otp_sent")
    assert sent["payload"]["provider_message_id"] == message.provider_id
    assert sent["payload"]["recipient"] == PHONE
    assert (sent["payload"]["entry_id"], sent["payload"]["job_id"]) == (entry_id, "otp-1")
    assert sent["payload"]["attempt"] == 1
    assert CODE not in orjson.dumps(sent).decode()
    assert await ev.waiting() == []
    assert await ev.dead() == []


async def test_whatsapp_otp_goes_out_within_a_second(ev: EventsStack) -> None:
    """With the engine running for real, the message reaches the provider under a second."""
    run = asyncio.create_task(ev.engine.run())
    await ev.engine.ready.wait()
    try:
        started = time.monotonic()
        await ev.enqueue("whatsapp_otp", otp_payload())
        while not ev.gateway.messages() and time.monotonic() - started < 5:
            await asyncio.sleep(0.005)
        elapsed = time.monotonic() - started
    finally:
        ev.engine.stop()
        await run
    assert len(ev.gateway.messages()) == 1
    assert elapsed < 1.0, elapsed


async def test_whatsapp_template_carries_name_and_code(
    settings: Settings, redis: Redis, db: asyncpg.Pool
) -> None:
    """With a template configured, the code goes as a template variable (and copy code)."""
    async with events_stack(
        settings, redis, db, whatsapp_template="otp_login", whatsapp_copy_code=True
    ) as ev:
        await ev.enqueue("whatsapp_otp", otp_payload())
        await ev.step()
        [message] = ev.gateway.messages("whatsapp")
    assert message.template == "otp_login"
    assert message.body == f"Ann Wanjiru {CODE}"


async def test_email_otp_delivered_over_smtp(ev: EventsStack) -> None:
    """An email_otp job sends one e-mail with the subject, the name and the code."""
    await ev.enqueue("email_otp", otp_payload(recipient=EMAIL))
    assert await ev.step() == 1
    [(recipients, message)] = ev.mail.messages
    assert recipients == [EMAIL]
    assert message["Subject"] == "Your verification code"
    assert message["From"] == "ISP <otp@isp.example>"
    body = message.get_body(("plain",))
    assert body is not None
    assert CODE in body.get_content()
    assert "Ann Wanjiru" in body.get_content()
    [sent] = await ev.events("otp_sent")
    assert sent["payload"]["channel"] == "email"
    assert ev.gateway.attempts == 0


async def test_expired_otp_is_never_sent(ev: EventsStack) -> None:
    """An OTP past expires_at is dead-lettered as expired; the gateway sees no call."""
    await ev.enqueue("whatsapp_otp", otp_payload(expires_at=now_ms() - 1_000))
    await ev.step()
    assert ev.gateway.attempts == 0
    [letter] = await ev.dead()
    assert letter.fields["error"].startswith("Expired: OTP expired at ")
    assert "not sent" in letter.fields["error"]
    [failed] = await ev.events("otp_failed")
    assert failed["payload"]["reason"] == "expired"
    assert await ev.events("otp_sent") == []


async def test_expiry_is_checked_again_before_a_retry(ev: EventsStack) -> None:
    """A code that expires while its retry waits is dead-lettered, never sent late."""
    ev.gateway.down()
    await ev.enqueue("whatsapp_otp", otp_payload(expires_at=now_ms() + 400))
    await ev.step()
    assert len(await ev.waiting()) == 1
    ev.gateway.up()
    await asyncio.sleep(0.5)
    await ev.step()
    assert ev.gateway.messages() == []
    assert ev.gateway.attempts == 1
    [letter] = await ev.dead()
    assert "expired" in letter.fields["error"]
    assert letter.fields["attempt"] == "2"
    [failed] = await ev.events("otp_failed")
    assert failed["payload"]["reason"] == "expired"


async def test_provider_down_then_up_delivers_exactly_once(ev: EventsStack) -> None:
    """A 503 is retried with backoff; once the gateway is back the code goes out once."""
    ev.gateway.down()
    await ev.enqueue("whatsapp_otp", otp_payload())
    await ev.step()
    assert ev.gateway.messages() == []
    [waiting] = await ev.waiting()
    assert waiting["attempt"] == "2"
    assert "ProviderUnavailable" in waiting["last_error"]
    ev.gateway.up()
    await ev.settle(lambda: bool(ev.gateway.messages()))
    for _ in range(3):
        await asyncio.sleep(0.05)
        await ev.step()
    assert len(ev.gateway.messages()) == 1
    assert await ev.waiting() == []
    assert await ev.dead() == []
    [sent] = await ev.events("otp_sent")
    assert sent["payload"]["attempt"] == 2
    assert await ev.events("otp_failed") == []


async def test_three_failed_attempts_dead_letter_once(ev: EventsStack) -> None:
    """A provider that stays down gets 3 attempts, then one dead letter and one otp_failed."""
    ev.gateway.down()
    await ev.enqueue("whatsapp_otp", otp_payload())
    await ev.settle(lambda: ev.gateway.attempts >= 3)
    await asyncio.sleep(0.3)
    await ev.step()
    assert ev.gateway.attempts == 3
    [letter] = await ev.dead()
    assert letter.fields["error"].startswith("attempts exhausted (3/3): ProviderUnavailable")
    [failed] = await ev.events("otp_failed")
    assert (failed["payload"]["reason"], failed["payload"]["attempt"]) == ("attempts_exhausted", 3)


async def test_rejected_recipient_is_not_retried(ev: EventsStack) -> None:
    """A 4xx from the provider is permanent: one call, a dead letter, otp_failed rejected."""
    ev.gateway.fail_next(status=400)
    await ev.enqueue("whatsapp_otp", otp_payload())
    await ev.step()
    await asyncio.sleep(0.2)
    await ev.step()
    assert ev.gateway.attempts == 1
    [letter] = await ev.dead()
    assert letter.fields["error"].startswith("ProviderRejected")
    [failed] = await ev.events("otp_failed")
    assert failed["payload"]["reason"] == "rejected"


async def test_a_redelivered_job_is_not_sent_twice(ev: EventsStack) -> None:
    """A job delivered again after its send (process died before the ack) sends nothing."""
    entry_id = await ev.enqueue("whatsapp_otp", otp_payload())
    fields = dict((await ev.redis.xrange(ev.engine.keys.stream("events")))[0][1])
    reg, job = ev.engine.registry.parse("events", entry_id, fields)
    await reg.handler(job)
    await reg.handler(job)
    assert len(ev.gateway.messages()) == 1
    assert len(await ev.events("otp_sent")) == 1


BAD_PAYLOADS: list[tuple[str, dict[str, Any], str]] = [
    ("whatsapp_otp", {"recipient": None}, "recipient: Field required"),
    ("whatsapp_otp", {"expires_at": "tomorrow"}, "expires_at: Input should be a valid integer"),
    ("email_otp", {"expires_at": "soon", "recipient": EMAIL}, "expires_at: Input should be"),
    ("whatsapp_otp", {"recipient": "call me"}, "recipient: Value error, must be a phone number"),
    ("email_otp", {"recipient": PHONE}, "recipient: Value error, must be an e-mail address"),
    ("whatsapp_otp", {"otp": "***"}, "otp: Value error, is masked"),
    ("whatsapp_otp", {"otp": None}, "otp: Field required"),
]


@pytest.mark.parametrize(("type_", "change", "reason"), BAD_PAYLOADS)
async def test_bad_payload_is_dead_lettered_with_a_clear_reason(
    ev: EventsStack, type_: str, change: dict[str, Any], reason: str
) -> None:
    """A payload that breaks the contract is dead-lettered at once, saying which field."""
    payload = {k: v for k, v in {**otp_payload(), **change}.items() if v is not None}
    await ev.enqueue(type_, payload)
    await ev.step()
    [letter] = await ev.dead()
    assert letter.fields["error"].startswith(f"InvalidJob: invalid payload for {type_}: ")
    assert reason in letter.fields["error"]
    assert CODE not in orjson.dumps(letter.as_dict()).decode()
    assert ev.gateway.attempts == 0
    assert ev.mail.messages == []


async def test_code_appears_in_no_log_dead_letter_or_event(ev: EventsStack) -> None:
    """Through success, retries, rejection, expiry and bad input, the code stays hidden."""
    with capture_logs() as logs:
        await ev.enqueue("whatsapp_otp", otp_payload())
        ev.gateway.fail_next(status=503)
        await ev.enqueue("whatsapp_otp", otp_payload(recipient="+254700000124"))
        await ev.enqueue("whatsapp_otp", otp_payload(expires_at=now_ms() - 5))
        await ev.enqueue("whatsapp_otp", otp_payload(expires_at="later"))
        await ev.enqueue("email_otp", otp_payload(recipient="nobody"))
        await ev.settle(lambda: len(ev.gateway.messages()) == 2)
        ev.gateway.fail_next(status=400)
        await ev.enqueue("whatsapp_otp", otp_payload(recipient="+254700000125"))
        await ev.step()
    assert {e["event"] for e in logs} >= {"job_dead_lettered", "otp_attempt_failed"}
    assert CODE not in repr(logs)
    letters = await ev.dead()
    assert len(letters) == 4
    for letter in letters:
        assert CODE not in orjson.dumps(letter.as_dict()).decode()
        assert orjson.loads(letter.fields["payload"])["otp"] == "***"
    events = await ev.events()
    # whatsapp-connected: the first answer that took the Cloud API token.
    assert {e["type"] for e in events} == {"otp_sent", "otp_failed", "whatsapp-connected"}
    assert CODE not in orjson.dumps(events).decode()
    history = await ev.redis.xrange(ev.engine.keys.history)
    assert CODE not in orjson.dumps(history).decode()


async def test_provider_error_quoting_the_code_is_scrubbed(ev: EventsStack) -> None:
    """A server that quotes the code in its refusal gets it masked before the engine,
    in the retry's last_error and in the dead letter alike."""
    ev.mail.data_reply = f"451 4.7.1 Suspicious token {CODE}, try later"
    await ev.enqueue("email_otp", otp_payload(recipient=EMAIL))
    await ev.step()
    [waiting] = await ev.waiting()
    assert waiting["last_error"].startswith("OtpNotSent: ProviderUnavailable: smtp: SMTP 451")
    assert CODE not in waiting["last_error"]
    assert "Suspicious token ***" in waiting["last_error"]
    ev.mail.data_reply = f"554 5.7.1 Refused: {CODE}"

    async def dead_lettered() -> bool:
        return bool(await ev.dead())

    await ev.settle(dead_lettered)
    [letter] = await ev.dead()
    assert letter.fields["error"] == (
        "OtpRefused: ProviderRejected: smtp: SMTP 554: 5.7.1 Refused: ***"
    )
    [failed] = await ev.events("otp_failed")
    assert failed["payload"]["reason"] == "rejected"
    assert CODE not in failed["payload"]["error"]
