"""Providers' delivery webhooks: check who sent them, read them as `Receipt`s.

Pure functions, no I/O: the HTTP layer (``imsys/http/api_webhooks.py``) checks, reads
and hands the result to `ledger`. Each follows its vendor's documents:

- WhatsApp Cloud API: ``X-Hub-Signature-256: sha256=<hex>`` is the HMAC-SHA256 of the
  raw body with the app secret; ``entry[].changes[].value`` carries ``statuses`` (``id``,
  ``status``, ``timestamp``, ``errors[].code``) and ``messages`` (a customer's inbound
  message: its ``from`` opens the 24-hour window for ``metadata.phone_number_id``).
- Africa's Talking delivery reports: a form with ``id``, ``status`` and, for ``Failed``
  or ``Rejected``, ``failureReason``. Unsigned: the callback URL carries our token.
- Twilio status callbacks: a form with ``MessageSid``, ``MessageStatus``, ``ErrorCode``;
  ``X-Twilio-Signature`` is base64 HMAC-SHA1, with the auth token, of the URL Twilio
  called followed by each POST parameter, sorted by name, as name + value.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import orjson

from imsys.billing.ledger import Receipt

# Vendor status → ledger status; anything else (queued, Buffered...) changes nothing.
_WHATSAPP: Final = {"sent": "sent", "delivered": "delivered", "read": "read", "failed": "failed"}
_AT: Final = {"Sent": "sent", "Submitted": "sent", "Success": "delivered", "Failed": "failed",
              "Rejected": "failed"}
_TWILIO: Final = {"sent": "sent", "delivered": "delivered", "read": "read",
                  "undelivered": "failed", "failed": "failed"}


class BadSignature(Exception):
    """The request is not from the provider: 401 when unsigned, 403 when forged."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Inbound:
    phone_number_id: str
    wa_id: str
    at: datetime


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def verify_whatsapp(body: bytes, header: str | None, secrets: Iterable[str]) -> None:
    if not header:
        raise BadSignature(401, "X-Hub-Signature-256 missing")
    for secret in secrets:
        expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        if _same(header.strip(), expected):
            return
    raise BadSignature(403, "X-Hub-Signature-256 does not match")


def verify_twilio(url: str, form: Mapping[str, str], header: str | None,
                  tokens: Iterable[str]) -> None:
    if not header:
        raise BadSignature(401, "X-Twilio-Signature missing")
    data = (url + "".join(k + form[k] for k in sorted(form))).encode()
    for token in tokens:
        digest = hmac.new(token.encode(), data, hashlib.sha1).digest()
        if _same(header.strip(), base64.b64encode(digest).decode()):
            return
    raise BadSignature(403, "X-Twilio-Signature does not match")


def verify_token(given: str | None, tokens: Iterable[str]) -> None:
    if not given:
        raise BadSignature(401, "token missing")
    if not any(_same(given, t) for t in tokens):
        raise BadSignature(403, "token does not match")


def _when(raw: Any) -> datetime:
    try:
        return datetime.fromtimestamp(int(raw), UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return datetime.now(UTC)


def read_whatsapp(body: bytes) -> tuple[list[Receipt], list[Inbound]]:
    """Statuses and inbound messages of a WhatsApp notification.

    Raises ValueError, TypeError or AttributeError when the body is not one.
    """
    data = orjson.loads(body)
    if not isinstance(data, dict) or not isinstance(data.get("entry"), list):
        raise TypeError("not a WhatsApp Business Account notification (no entry list)")
    receipts: list[Receipt] = []
    inbound: list[Inbound] = []
    for entry in data["entry"]:
        for change in (entry.get("changes") or []) if isinstance(entry, dict) else []:
            value = change.get("value") if isinstance(change, dict) else None
            if not isinstance(value, dict):
                continue
            phone_id = str((value.get("metadata") or {}).get("phone_number_id", ""))
            for st in value.get("statuses") or []:
                status = _WHATSAPP.get(str(st.get("status")))
                if status is None or not st.get("id"):
                    continue
                errors = st.get("errors") or [{}]
                code = errors[0].get("code") if status == "failed" else None
                reason = errors[0].get("title") if status == "failed" else None
                receipts.append(Receipt(
                    "whatsapp", str(st["id"]), status,
                    None if code is None else str(code),
                    f"{code} {reason}" if code is not None else reason, _when(st.get("timestamp")),
                ))
            inbound.extend(
                Inbound(phone_id, str(msg["from"]), _when(msg.get("timestamp")))
                for msg in value.get("messages") or []
                if isinstance(msg, dict) and msg.get("from")
            )
    return receipts, inbound


def read_africastalking(form: Mapping[str, str]) -> Receipt | None:
    status = _AT.get(form.get("status", ""))
    if status is None or not form.get("id"):
        return None
    reason = form.get("failureReason") or None
    code = reason if status == "failed" else form.get("status")
    return Receipt("sms", form["id"], status, code,
                   f"{form.get('status')} {reason or ''}".strip() if status == "failed" else None,
                   datetime.now(UTC))


def read_twilio(form: Mapping[str, str]) -> Receipt | None:
    status = _TWILIO.get(form.get("MessageStatus", ""))
    sid = form.get("MessageSid") or form.get("SmsSid")
    if status is None or not sid:
        return None
    code = form.get("ErrorCode") or None
    reason = f"{form.get('MessageStatus')} {code or ''}".strip() if status == "failed" else None
    return Receipt("sms", sid, status, code if status == "failed" else form["MessageStatus"],
                   reason, datetime.now(UTC))
