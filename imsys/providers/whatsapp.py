"""WhatsApp Cloud API client: text and template messages to one number.

Failures come out as `ProviderError`s that never contain the token, the text or the
template parameters (an OTP is usually one of them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, Protocol

import aiohttp
import orjson

from imsys.provider_settings import WhatsAppConfig
from imsys.providers._http import ErrorBody, HttpProvider, describe_status
from imsys.providers.errors import (
    OutOfCredits,
    ProviderAuthError,
    ProviderError,
    ProviderRejected,
    ProviderUnavailable,
    RateLimited,
)

__all__ = ["WhatsAppClient"]

PROVIDER: Final = "whatsapp"

# Graph error codes that mean something other than their HTTP status says; Meta answers
# several of them with a plain 400 (developers.facebook.com, WhatsApp error codes).
_RATE_LIMIT_CODES: Final = frozenset({"4", "80007", "130429", "131056"})
_AUTH_CODES: Final = frozenset({"0", "190"})
_PAYMENT_CODES: Final = frozenset({"131042"})
_TEMPORARY_CODES: Final = frozenset({"1", "2", "131000", "131016"})


class TokenObserver(Protocol):
    async def __call__(self, valid: bool, error: str | None) -> None: ...


class WhatsAppClient:
    """Sends WhatsApp messages from one business number over the caller's session."""

    def __init__(self, session: aiohttp.ClientSession, config: WhatsAppConfig) -> None:
        token = config.token.get_secret_value()
        self._http = HttpProvider(session, PROVIDER, timeout=config.timeout,
                                  connect_timeout=config.connect_timeout, secrets=(token,),
                                  classify=_classify)
        self._headers = {"Authorization": f"Bearer {token}", "Accept": "application/json",
                         "Content-Type": "application/json"}
        self._url = f"{config.base_url}/{config.phone_number_id}/messages"
        self.phone_number_id = config.phone_number_id
        # Told after each answer whether Meta took the token (False on its 401), so the
        # caller can report the Cloud API "connected" / "disconnected"; never raises.
        self.on_token: TokenObserver | None = None

    async def send_text(self, to: str, body: str, *, preview_url: bool = False) -> str:
        """Send a text message (inside the 24-hour service window); return its ``wamid``."""
        return await self._send(to, {
            "type": "text",
            "text": {"preview_url": preview_url, "body": body},
        }, hidden=(body,))

    async def send_template(
        self,
        to: str,
        template_name: str,
        language: str,
        params: Sequence[str] = (),
        *,
        copy_code: str | None = None,
    ) -> str:
        """Send an approved template with ``params`` as its body variables; return its ``wamid``.

        ``copy_code`` fills the button of an authentication (OTP) template, which Meta
        requires besides the body variable.
        """
        template: dict[str, Any] = {"name": template_name, "language": {"code": language}}
        components: list[dict[str, Any]] = []
        if params:
            components.append({"type": "body", "parameters": [
                {"type": "text", "text": p} for p in params
            ]})
        if copy_code is not None:
            components.append({"type": "button", "sub_type": "url", "index": "0",
                               "parameters": [{"type": "text", "text": copy_code}]})
        if components:
            template["components"] = components
        hidden = (*params, *([copy_code] if copy_code else []))
        return await self._send(to, {"type": "template", "template": template}, hidden=hidden)

    async def _send(self, to: str, message: dict[str, Any], *, hidden: Sequence[str]) -> str:
        if not to.strip():
            raise ProviderRejected(PROVIDER, "message not sent", detail="no recipient number")
        payload = {"messaging_product": "whatsapp", "recipient_type": "individual",
                   "to": to.strip(), **message}
        try:
            data = await self._http.json("POST", self._url, data=orjson.dumps(payload),
                                         headers=self._headers, redact=hidden)
        except ProviderAuthError as exc:
            if self.on_token is not None and exc.status == 401:
                await self.on_token(False, str(exc))
            raise
        except ProviderError as exc:
            # Any other answer from Graph (a 4xx about the message) still took the token.
            if self.on_token is not None and exc.status is not None and exc.status < 500:
                await self.on_token(True, None)
            raise
        if self.on_token is not None:
            await self.on_token(True, None)
        messages = data.get("messages") if isinstance(data, dict) else None
        first = messages[0] if isinstance(messages, list) and messages else None
        wamid = first.get("id") if isinstance(first, dict) else None
        if not isinstance(wamid, str) or not wamid:
            # Not retryable: the API said yes, so a retry would send the message twice.
            raise ProviderRejected(PROVIDER, "accepted without a message id",
                                   detail="no messages[0].id in the answer; the message "
                                          "may have gone out")
        return wamid


def _classify(status: int, body: ErrorBody, mutating: bool) -> ProviderError | None:
    code = body.code
    # 429 and 5xx already mean what they say; only a 4xx may hide a temporary failure.
    if code is None or status == 429 or status >= 500:
        return None
    what = describe_status(status)
    fields: dict[str, Any] = {"status": status, "detail": body.detail, "code": code}
    if code in _RATE_LIMIT_CODES:
        return RateLimited(PROVIDER, what, **fields)
    if code in _AUTH_CODES:
        return ProviderAuthError(PROVIDER, what, **fields)
    if code in _PAYMENT_CODES:
        return OutOfCredits(PROVIDER, what, **fields)
    if code in _TEMPORARY_CODES:
        return ProviderUnavailable(PROVIDER, what, maybe_applied=False, **fields)
    return None
