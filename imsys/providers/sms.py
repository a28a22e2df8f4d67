"""SMS through an HTTP gateway, shaped by configuration (Africa's Talking, Twilio, others).

The gateway's URL, authentication, body and answer layout come from `SmsConfig`; this
module only renders the request and reads the answer. Failures come out as
`ProviderError`s that never contain the credential or the message text (an OTP may be
in it).
"""

from __future__ import annotations

import re
from typing import Any, Final
from urllib.parse import quote, quote_plus

import aiohttp
import orjson

from imsys.provider_settings import SmsConfig
from imsys.providers._http import HttpProvider, redact, shorten
from imsys.providers.errors import OutOfCredits, ProviderRejected, ProviderUnavailable

__all__ = ["SmsClient"]

_PLACEHOLDER: Final = re.compile(r"\{(\w+)\}")
_MISSING: Final = object()


def render(template: Any, values: dict[str, str]) -> Any:
    """``template`` with ``{name}`` placeholders filled from ``values``.

    A dict entry whose whole value is one placeholder with an empty value is left out, so
    an optional field (no sender configured) is not sent empty.
    """
    if isinstance(template, str):
        return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)
    if isinstance(template, dict):
        rendered: dict[str, Any] = {}
        for key, item in template.items():
            whole = _PLACEHOLDER.fullmatch(item) if isinstance(item, str) else None
            if whole is not None and not values.get(whole.group(1)):
                continue
            rendered[key] = render(item, values)
        return rendered
    if isinstance(template, list):
        return [render(item, values) for item in template]
    return template


def spellings(text: str) -> tuple[str, ...]:
    """``text`` as a gateway might echo it: raw, form- or URL-encoded, inside a JSON string."""
    return tuple({text, quote_plus(text), quote(text), orjson.dumps(text).decode()[1:-1]})


def dig(data: Any, path: str) -> Any:
    """The value at a dotted ``path`` ("a.b.0.c": numbers index lists); `_MISSING` if none."""
    for step in path.split("."):
        if isinstance(data, dict) and step in data:
            data = data[step]
        elif isinstance(data, list) and step.isdigit() and int(step) < len(data):
            data = data[int(step)]
        else:
            return _MISSING
    return data


class SmsClient:
    """Sends one SMS per call through the gateway `SmsConfig` describes.

    The `aiohttp.ClientSession` is the caller's to open and close.
    """

    def __init__(self, session: aiohttp.ClientSession, config: SmsConfig) -> None:
        self._config = config
        secret = config.secret.get_secret_value()
        self._http = HttpProvider(session, config.name, timeout=config.timeout,
                                  connect_timeout=config.connect_timeout, secrets=(secret,))
        self._headers: dict[str, str] = {"Accept": "application/json"}
        if config.auth == "header":
            self._headers[config.auth_header] = secret
        elif config.auth == "bearer":
            self._headers["Authorization"] = f"Bearer {secret}"
        elif config.auth == "basic":
            basic = aiohttp.encode_basic_auth(config.username, secret)
            self._headers["Authorization"] = basic
            # The base64 form is the secret too, as far as error messages go.
            self._http.add_secret(basic.partition(" ")[2])

    @property
    def provider(self) -> str:
        return self._config.name

    async def send(self, to: str, message: str) -> str:
        """Send ``message`` to the number ``to``; return the gateway's message id."""
        cfg = self._config
        if not to.strip():
            raise ProviderRejected(cfg.name, "SMS not sent", detail="no recipient number")
        values = {"to": to.strip(), "message": message, "sender": cfg.sender,
                  "username": cfg.username, "status_callback": cfg.status_callback}
        body = render(cfg.body, values)
        headers = dict(self._headers)
        request: dict[str, Any]
        if cfg.format == "json":
            headers["Content-Type"] = "application/json"
            request = {"data": orjson.dumps(body)}
        else:
            request = {"data": body}
        hidden = spellings(message)
        data = await self._http.json("POST", cfg.url, headers=headers, redact=hidden,
                                     **request)
        self._check_recipient(data, hidden)
        message_id = dig(data, cfg.message_id_path)
        if isinstance(message_id, int) and not isinstance(message_id, bool):
            message_id = str(message_id)
        if not isinstance(message_id, str) or not message_id:
            # Not retryable: the gateway said yes, so a retry would send the SMS twice.
            raise ProviderRejected(
                cfg.name, "accepted without a message id",
                detail=f"nothing at {cfg.message_id_path!r}; the SMS may have gone out; "
                       f"check message_id_path against: {self._excerpt(data, hidden)}",
            )
        return message_id

    def _check_recipient(self, data: Any, hidden: tuple[str, ...]) -> None:
        """Gateways like Africa's Talking answer 201 and put the refusal per recipient."""
        cfg = self._config
        if cfg.status_path is None:
            return
        status = dig(data, cfg.status_path)
        if status is _MISSING or status is None:
            raise ProviderRejected(
                cfg.name, "no recipient accepted",
                detail=f"nothing at {cfg.status_path!r} in: {self._excerpt(data, hidden)}",
            )
        text = str(status)
        if text in cfg.accepted_statuses:
            return
        code = shorten(redact(text, hidden), 60)
        if text in cfg.retryable_statuses:
            raise ProviderUnavailable(cfg.name, "recipient status", code=code)
        if text in cfg.out_of_credit_statuses:
            raise OutOfCredits(cfg.name, "account out of credit", code=code)
        raise ProviderRejected(cfg.name, "recipient refused", code=code)

    def _excerpt(self, data: Any, hidden: tuple[str, ...]) -> str:
        secret = self._config.secret.get_secret_value()
        return shorten(redact(orjson.dumps(data).decode(), (secret, *hidden)), 200)
