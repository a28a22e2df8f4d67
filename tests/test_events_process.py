"""The real service process (`python -m imsys run`, debug logging) doing OTP and channel
work end to end: fast delivery, a held channel, retries, and not one log line with the code."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from pydantic import SecretStr
from redis.asyncio import Redis

from imsys.settings import Settings
from imsys.sim.gateway import GatewaySimulator
from imsys.streams.engine import Engine
from imsys.streams.job import Registry, now_ms
from tests.conftest import ROOT, subprocess_env
from tests.events_support import CODE, EMAIL, MailRecorder, backend_events, free_port, otp_payload


class Service:
    """``python -m imsys run`` with its output in a file (a pipe could fill and block it)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.log = Path(tempfile.mkstemp(prefix="imsys-events-", suffix=".log")[1])
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "imsys", "run"],
                env=env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        return self.log.read_text()

    async def wait_for(
        self, what: str, check: Callable[[], Awaitable[bool]], timeout: float
    ) -> None:
        deadline = time.monotonic() + timeout
        while not await check():
            assert self.proc.poll() is None, f"service died: {self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"{what}: {self.output()[-3000:]}"
            await asyncio.sleep(0.01)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
async def gateway() -> AsyncIterator[GatewaySimulator]:
    sim = GatewaySimulator()
    await sim.start()
    yield sim
    await sim.stop()


@pytest.fixture
async def mail() -> AsyncIterator[tuple[MailRecorder, int]]:
    recorder = MailRecorder()
    port = free_port()
    controller = Controller(recorder, hostname="127.0.0.1", port=port)
    await asyncio.to_thread(controller.start)
    yield recorder, port
    await asyncio.to_thread(controller.stop)


async def test_service_delivers_otps_and_never_logs_the_code(
    settings: Settings,
    redis: Redis,
    isolated_database: str,
    gateway: GatewaySimulator,
    mail: tuple[MailRecorder, int],
) -> None:
    """In the real process: an OTP reaches the gateway within a second; a stopped channel
    holds its OTP until start; e-mail, a retried send, an expired code and a bad payload
    all end right; the debug log never contains the code."""
    recorder, smtp_port = mail
    settings = settings.model_copy(
        update={
            "database": settings.database.model_copy(update={"url": SecretStr(isolated_database)})
        }
    )
    env = subprocess_env(
        settings,
        IMSYS_LOG__LEVEL="debug",
        IMSYS_HTTP__ENABLED="false",
        IMSYS_ENGINE__PROMOTE_INTERVAL_S="0.05",
        IMSYS_STREAMS__EVENTS__BACKOFF_BASE="0.1",
        IMSYS_EVENTS__CHANNEL_HOLD_S="0.2",
        IMSYS_WHATSAPP__BASE_URL=f"{gateway.url}/v21.0",
        IMSYS_SMTP__PORT=str(smtp_port),
        IMSYS_SMTP__STARTTLS="false",
        IMSYS_SMTP__LOCAL_HOSTNAME="imsys.test",
        IMSYS_SYNC__RECONCILE_EVERY_S="3600",
        IMSYS_SYNC__EXPIRE_EVERY_S="3600",
        IMSYS_SYNC__FACTS_EVERY_S="3600",
    )
    producer = Engine(redis, settings, Registry(), consumer="producer").producer
    events_key = f"{settings.redis.prefix}:backend-events"
    dead_key = f"{settings.redis.prefix}:dead"

    async def enqueue(type_: str, payload: dict[str, object]) -> None:
        await producer.enqueue("events", type_, payload)

    async def status_is(state: str) -> bool:
        statuses = await backend_events(redis, events_key, "service_status")
        return bool(statuses) and statuses[-1]["payload"]["state"] == state

    async def sent(n: int) -> bool:
        return len(gateway.messages()) >= n

    service = Service(env)
    try:
        await service.wait_for("start", _contains(service, "engine_started"), 30)

        started = time.monotonic()
        await enqueue("whatsapp_otp", otp_payload())
        await service.wait_for("first OTP", lambda: sent(1), 5)
        assert time.monotonic() - started < 1.0

        await enqueue("service_control", {"action": "stop", "service": "whatsapp"})
        await service.wait_for("stop", lambda: status_is("stopped"), 5)
        await enqueue("whatsapp_otp", otp_payload(recipient="+254700000200"))
        await asyncio.sleep(0.8)
        assert len(gateway.messages()) == 1
        await enqueue("service_control", {"action": "start", "service": "whatsapp"})
        await service.wait_for("held OTP after start", lambda: sent(2), 5)

        gateway.fail_next(status=503)
        await enqueue("whatsapp_otp", otp_payload(recipient="+254700000300"))
        await service.wait_for("retried OTP", lambda: sent(3), 5)

        await enqueue("email_otp", otp_payload(recipient=EMAIL))
        await enqueue("whatsapp_otp", otp_payload(expires_at=now_ms() - 10))
        await enqueue("whatsapp_otp", otp_payload(expires_at="never"))

        async def settled() -> bool:
            return bool(recorder.messages) and await redis.xlen(dead_key) == 2

        await service.wait_for("e-mail and dead letters", settled, 10)
    finally:
        code = service.stop()
    log = service.output()
    service.log.unlink(missing_ok=True)
    assert code == 0, log[-3000:]
    assert [m.to for m in gateway.messages()] == ["+254700000123", "+254700000200", "+254700000300"]
    assert all(CODE in m.body for m in gateway.messages())
    for event in ("otp_sent", "job_deferred", "job_retry_scheduled", "otp_expired"):
        assert f'"{event}"' in log, event  # the log is at debug level: it saw everything
    assert CODE not in log
    errors = sorted(f["error"] for _, f in await redis.xrange(dead_key))
    assert errors[0].startswith("Expired: OTP expired")
    assert errors[1].startswith("InvalidJob: invalid payload for whatsapp_otp: expires_at")


def _contains(service: Service, text: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return text in service.output()

    return check
