"""What the gateway simulator sends back: delivery receipts and inbound messages.

Each dialect calls the receiver the way its vendor documents it:

- WhatsApp Cloud API: a ``POST`` of ``{"object": "whatsapp_business_account", "entry":
  [{"changes": [{"field": "messages", "value": {"metadata", "statuses" | "messages"}}]}]}``
  signed ``X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the raw body with the app
  secret>``; a status is ``sent``, ``delivered``, ``read`` or ``failed`` with ``errors``
  (131026 undeliverable, 131047 outside the 24-hour window).
- Africa's Talking: a form ``POST`` to the delivery-report callback URL with ``id``,
  ``status`` (``Sent``, ``Submitted``, ``Buffered``, ``Success``, ``Failed``,
  ``Rejected``), ``phoneNumber``, ``networkCode``, ``failureReason``, ``retryCount``.
  Africa's Talking signs nothing; the URL (with its token) is the only secret.
- Twilio: a form ``POST`` to the message's ``StatusCallback`` with ``MessageSid``,
  ``MessageStatus`` (``sent``, ``delivered``, ``undelivered``, ``failed``), ``ErrorCode``,
  ``AccountSid``, ``From``, ``To``, signed ``X-Twilio-Signature``: base64 HMAC-SHA1, with
  the auth token, of the full URL followed by every POST parameter, sorted by name, as
  name + value.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import random
import secrets
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import quote_plus

import aiohttp
import orjson

__all__ = ["Callbacks", "Receipts", "twilio_signature", "whatsapp_signature"]

WA_UNDELIVERABLE: Final = 131026
WA_REENGAGEMENT: Final = 131047
_WA_TITLES: Final = {
    WA_UNDELIVERABLE: "Message undeliverable",
    WA_REENGAGEMENT: "Re-engagement message",
}


def whatsapp_signature(app_secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(app_secret.encode(), body, hashlib.sha256).hexdigest()


def twilio_signature(auth_token: str, url: str, params: Mapping[str, str]) -> str:
    data = url + "".join(k + params[k] for k in sorted(params))
    digest = hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


@dataclass(slots=True)
class Receipts:
    """Where and how receipts go. Nothing is sent to a URL left None.

    ``failed_ratio`` of messages fail (WhatsApp 131026, Africa's Talking ``Failed`` /
    ``AbsentSubscriber``, Twilio ``undelivered`` 30003); ``read_ratio`` of the delivered
    WhatsApp messages are then read. ``delay`` is the seconds between one status and the
    next. ``seed`` makes the choice repeatable.
    """

    whatsapp_url: str | None = None
    app_secret: str = ""
    africastalking_url: str | None = None
    delay: float = 0.05
    failed_ratio: float = 0.0
    read_ratio: float = 0.5
    seed: int | None = None
    # Numbers whose messages always fail on that channel ("sms" or "whatsapp").
    unreachable: dict[str, set[str]] = field(
        default_factory=lambda: {"sms": set(), "whatsapp": set()}
    )
    # WhatsApp numbers whose phone is off (or out of coverage): the message is reported
    # ``sent`` and nothing more, since it never reaches the device.
    offline: set[str] = field(default_factory=set)


class Callbacks:
    """Sends receipts in the background; `idle` waits until every one was answered."""

    def __init__(self, receipts: Receipts) -> None:
        self.receipts = receipts
        self.answers: Counter[int] = Counter()
        self.sent: list[dict[str, Any]] = []
        self._random = random.Random(receipts.seed)
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def idle(self) -> None:
        """Wait until every receipt scheduled so far has been posted and answered (wrap
        it in ``asyncio.timeout`` to bound the wait)."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _fails(self, channel: str, to: str) -> bool:
        if to.lstrip("+") in {n.lstrip("+") for n in self.receipts.unreachable[channel]}:
            return True
        return self._random.random() < self.receipts.failed_ratio

    async def _post(self, url: str, data: bytes, headers: dict[str, str]) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        try:
            async with self._session.post(url, data=data, headers=headers) as resp:
                await resp.read()
                self.answers[resp.status] += 1
        except (aiohttp.ClientError, TimeoutError):
            self.answers[0] += 1

    # --- WhatsApp -------------------------------------------------------------------------

    async def post_whatsapp(self, phone_number_id: str, value: dict[str, Any]) -> None:
        r = self.receipts
        if r.whatsapp_url is None:
            return
        body = orjson.dumps({
            "object": "whatsapp_business_account",
            "entry": [{"id": "102290129340398", "changes": [{"field": "messages", "value": {
                "messaging_product": "whatsapp",
                "metadata": {"display_phone_number": "15550000000",
                             "phone_number_id": phone_number_id},
                **value,
            }}]}],
        })
        self.sent.append({"api": "whatsapp", "body": body})
        await self._post(r.whatsapp_url, body, {
            "Content-Type": "application/json",
            "X-Hub-Signature-256": whatsapp_signature(r.app_secret, body),
        })

    def whatsapp_message(self, phone_number_id: str, wamid: str, to: str,
                         *, outside_window: bool) -> None:
        if self.receipts.whatsapp_url is None:
            return
        error = WA_REENGAGEMENT if outside_window else (
            WA_UNDELIVERABLE if self._fails("whatsapp", to) else None)
        read = self._random.random() < self.receipts.read_ratio
        off = to.lstrip("+") in {n.lstrip("+") for n in self.receipts.offline}
        self._spawn(self._whatsapp_sequence(phone_number_id, wamid, to, error, read, off))

    async def _whatsapp_sequence(self, phone_number_id: str, wamid: str, to: str,
                                 error: int | None, read: bool, off: bool) -> None:
        steps = ["failed"] if error else ["sent"] if off else [
            "sent", "delivered", *(["read"] if read else [])]
        for status in steps:
            await asyncio.sleep(self.receipts.delay)
            item: dict[str, Any] = {"id": wamid, "status": status,
                                    "timestamp": str(int(time.time())),
                                    "recipient_id": to.lstrip("+")}
            if error:
                item["errors"] = [{"code": error, "title": _WA_TITLES[error],
                                   "message": _WA_TITLES[error],
                                   "error_data": {"details": _WA_TITLES[error]}}]
            await self.post_whatsapp(phone_number_id, {"statuses": [item]})

    async def inbound(self, phone_number_id: str, wa_id: str, text: str) -> str:
        """A customer's message to the business number; returns its wamid."""
        wamid = "wamid." + base64.b64encode(secrets.token_bytes(30)).decode()
        await self.post_whatsapp(phone_number_id, {
            "contacts": [{"profile": {"name": "Customer"}, "wa_id": wa_id}],
            "messages": [{"from": wa_id, "id": wamid, "timestamp": str(int(time.time())),
                          "type": "text", "text": {"body": text}}],
        })
        return wamid

    # --- SMS ------------------------------------------------------------------------------

    def africastalking_message(self, message_id: str, to: str) -> None:
        if self.receipts.africastalking_url is None:
            return
        failed = self._fails("sms", to)
        self._spawn(self._at_sequence(message_id, to, failed))

    async def _at_sequence(self, message_id: str, to: str, failed: bool) -> None:
        url = self.receipts.africastalking_url
        assert url is not None
        for status in ("Submitted", "Failed" if failed else "Success"):
            await asyncio.sleep(self.receipts.delay)
            form = {"id": message_id, "status": status, "phoneNumber": to,
                    "networkCode": "63902", "retryCount": "0"}
            if status == "Failed":
                form["failureReason"] = "AbsentSubscriber"
            data = "&".join(f"{k}={_quote(v)}" for k, v in form.items()).encode()
            self.sent.append({"api": "africastalking", "form": form})
            await self._post(url, data, {"Content-Type": "application/x-www-form-urlencoded"})

    def twilio_message(self, callback: str, auth_token: str, params: dict[str, str]) -> None:
        failed = self._fails("sms", params["To"])
        self._spawn(self._twilio_sequence(callback, auth_token, params, failed))

    async def _twilio_sequence(self, callback: str, auth_token: str,
                               base: dict[str, str], failed: bool) -> None:
        for status in ("sent", "undelivered" if failed else "delivered"):
            await asyncio.sleep(self.receipts.delay)
            form = {**base, "MessageStatus": status, "SmsStatus": status}
            if failed:
                form["ErrorCode"] = "30003"
            data = "&".join(f"{k}={_quote(v)}" for k, v in form.items()).encode()
            self.sent.append({"api": "twilio", "form": form})
            await self._post(callback, data, {
                "Content-Type": "application/x-www-form-urlencoded",
                "X-Twilio-Signature": twilio_signature(auth_token, callback, form),
            })


def _quote(value: str) -> str:
    return quote_plus(value)
