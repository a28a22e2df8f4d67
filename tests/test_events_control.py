"""service_control: stopping a channel holds its jobs (no attempt spent, nothing lost),
starting it lets them go, every process sees the same state, status tells the truth."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from imsys.errors import Deferred
from imsys.events.channels import ChannelControl
from imsys.settings import Settings
from imsys.streams.job import now_ms
from tests.events_support import EMAIL, EventsStack, events_stack, otp_payload


@pytest.fixture
async def ev(settings: Settings, redis: Redis, db: asyncpg.Pool) -> AsyncIterator[EventsStack]:
    async with events_stack(settings, redis, db) as stack:
        yield stack


async def control(ev: EventsStack, action: str, service: str, **extra: Any) -> dict[str, Any]:
    """Run one service_control job; return the payload of the service_status it published."""
    before = len(await ev.events("service_status"))
    await ev.enqueue("service_control", {"action": action, "service": service, **extra})
    await ev.step()
    statuses = await ev.events("service_status")
    assert len(statuses) == before + 1
    return dict(statuses[-1]["payload"])


async def test_stopped_channel_holds_jobs_and_delivers_after_start(ev: EventsStack) -> None:
    """While whatsapp is stopped its OTPs wait at attempt 1; after start each goes once."""
    await control(ev, "stop", "whatsapp")
    await ev.enqueue("whatsapp_otp", otp_payload())
    await ev.enqueue("whatsapp_otp", otp_payload(recipient="+254700000999"))
    await ev.enqueue("email_otp", otp_payload(recipient=EMAIL))
    for _ in range(5):
        await ev.step()
        await asyncio.sleep(0.07)
    assert ev.gateway.attempts == 0
    assert len(ev.mail.messages) == 1  # e-mail is another channel: not held
    held = await ev.waiting()
    assert [(f["type"], f["attempt"]) for f in held] == [("whatsapp_otp", "1")] * 2
    assert all("channel whatsapp is stopped" in f["last_error"] for f in held)
    assert await ev.dead() == []

    await control(ev, "start", "whatsapp")
    await ev.settle(lambda: len(ev.gateway.messages()) == 2)
    await asyncio.sleep(0.1)
    await ev.step()
    assert len(ev.gateway.messages()) == 2
    assert await ev.waiting() == []
    assert await ev.dead() == []


async def test_state_holds_across_processes(
    ev: EventsStack, settings: Settings, redis: Redis, db: asyncpg.Pool
) -> None:
    """A stop handled by one process holds the jobs another process runs, until start."""
    other_redis = Redis.from_url(settings.redis.url.get_secret_value(), decode_responses=True)
    try:
        async with events_stack(settings, other_redis, db, consumer="other") as other:
            await control(ev, "stop", "email")
            await other.enqueue("email_otp", otp_payload(recipient=EMAIL))
            # Whichever process reads it, the job is held.
            await other.step()
            await asyncio.sleep(0.1)
            await ev.step()
            assert ev.mail.messages == []
            assert other.mail.messages == []
            assert (await other.channels.status("email")).state == "stopped"
            await control(ev, "start", "email")
            await other.settle(lambda: len(other.mail.messages) == 1)
    finally:
        await other_redis.aclose()


async def test_status_reports_the_truth(ev: EventsStack) -> None:
    """status answers with the state Redis holds, since when and set by whom."""
    fresh = await control(ev, "status", "sms")
    assert (fresh["service"], fresh["state"], fresh["since"], fresh["by"]) == (
        "sms",
        "running",
        None,
        None,
    )
    before = now_ms()
    stopped = await control(ev, "stop", "sms", requested_by="ops:alice")
    assert (stopped["state"], stopped["changed"], stopped["by"]) == ("stopped", True, "ops:alice")
    status = await control(ev, "status", "sms")
    assert (status["action"], status["state"], status["by"]) == ("status", "stopped", "ops:alice")
    assert before <= status["since"] <= now_ms()
    # The truth is Redis, whoever changed it: a direct change shows in the next status.
    await ev.channels.start("sms", "ops:bob")
    assert (await control(ev, "status", "sms"))["state"] == "running"
    assert await ev.redis.hget(f"{ev.engine.keys.prefix}:service:sms", "state") == "running"


async def test_repeated_command_keeps_since_and_restart_renews_it(ev: EventsStack) -> None:
    """A second stop changes nothing (since kept); restart leaves the channel running anew."""
    first = await control(ev, "stop", "whatsapp")
    await asyncio.sleep(0.01)
    again = await control(ev, "stop", "whatsapp")
    assert (again["changed"], again["since"]) == (False, first["since"])
    assert again["by"] == first["by"]
    restarted = await control(ev, "restart", "whatsapp")
    assert (restarted["action"], restarted["state"], restarted["changed"]) == (
        "restart",
        "running",
        True,
    )
    assert restarted["since"] > first["since"]
    running = await control(ev, "restart", "whatsapp")
    assert running["state"] == "running"
    assert running["since"] >= restarted["since"]


async def test_bad_control_jobs_are_dead_lettered(ev: EventsStack) -> None:
    """An unknown action or service is dead-lettered with the field named."""
    await ev.enqueue("service_control", {"action": "pause", "service": "sms"})
    await ev.enqueue("service_control", {"action": "stop", "service": "fax"})
    await ev.step()
    errors = sorted(d.fields["error"] for d in await ev.dead())
    assert len(errors) == 2
    assert "action: Input should be 'start', 'stop', 'restart' or 'status'" in errors[0]
    assert "service: Input should be 'sms', 'whatsapp' or 'email'" in errors[1]
    assert await ev.events("service_status") == []


async def test_channel_control_api_for_other_domains(ev: EventsStack) -> None:
    """ensure_running passes for a running channel and defers (briefly) for a stopped one."""
    channels = ChannelControl(ev.redis, ev.engine.keys, hold_s=1.5)
    await channels.ensure_running("sms")
    await channels.stop("sms", "test")
    with pytest.raises(Deferred, match="channel sms is stopped") as held:
        await channels.ensure_running("sms")
    assert 1.2 <= held.value.delay <= 1.8
    await channels.ensure_running("email")
    await channels.start("sms", "test")
    await channels.ensure_running("sms")
    assert [s.state for s in await channels.statuses()] == ["running"] * 3
