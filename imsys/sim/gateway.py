"""Messaging gateway simulator: SMS and WhatsApp sends, recorded, with faults to inject.

It speaks four dialects so any provider client can be pointed at it:

- Africa's Talking SMS: ``POST /version1/messaging`` (form or JSON; header ``apiKey``, the
  account ``username`` in the body), answering 201 with ``SMSMessageData``;
- Twilio SMS: ``POST /2010-04-01/Accounts/{sid}/Messages.json`` (form; HTTP basic auth with
  the account SID and auth token), answering 201 with a Message resource;
- a plain JSON SMS API: ``POST /sms`` ``{"to", "message"}`` (bearer token) → ``{"id"}``;
- WhatsApp, Cloud-API-like: ``POST /v1/messages`` or ``POST /{version}/{phone_id}/messages``
  (bearer token; text and template messages) → ``{"messages": [{"id": "wamid..."}]}``.

Errors come in each dialect's own shape. A message is recorded only once it is accepted;
`GatewaySimulator.attempts` counts every call, refused and failed ones included.

Like the real services (``gateway_callbacks`` sends what comes back):

- an accepted message gets delivery receipts (`GatewaySimulator.receipts`: where to,
  delay, how many fail or are read); a Twilio message gets them at its ``StatusCallback``;
- WhatsApp free-form text reaches only a customer who wrote in the last 24 hours
  (`GatewaySimulator.inbound` opens the window): outside it the API accepts the message
  and its status comes back ``failed`` with 131047;
- once templates are registered (`add_template`), an unknown name or language answers
  132001 and a wrong number of body parameters 132000;
- a balance (`set_balance`, in messages) that runs out: Africa's Talking answers the
  recipient ``InsufficientBalance`` (405), WhatsApp 131042 (payment issue).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hmac
import logging
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal

from aiohttp import web
from aiohttp.typedefs import Handler

from imsys.sim.gateway_callbacks import Callbacks, Receipts

__all__ = [
    "DEFAULT_PORT",
    "GATEWAY_SIM",
    "Api",
    "Channel",
    "GatewaySimulator",
    "SentMessage",
    "main",
    "serve",
]

log = logging.getLogger(__name__)

DEFAULT_PORT: Final = 8092
# The simulator's own published credentials, for demos and tests; never a real secret.
DEFAULT_AT_USERNAME: Final = "sandbox"
DEFAULT_AT_API_KEY: Final = "at-sim-key"
DEFAULT_TWILIO_SID: Final = "AC" + "0" * 32
DEFAULT_TWILIO_TOKEN: Final = "twilio-sim-token"  # noqa: S105
DEFAULT_SMS_TOKEN: Final = "sms-sim-token"  # noqa: S105
DEFAULT_WHATSAPP_TOKEN: Final = "whatsapp-sim-token"  # noqa: S105
DEFAULT_PHONE_NUMBER_ID: Final = "100000000000001"
# Meta's customer service window.
WINDOW_S: Final = 24 * 3600.0

Channel = Literal["sms", "whatsapp"]
Api = Literal["africastalking", "twilio", "generic", "whatsapp"]

_CHANNEL_OF: Final[dict[str, Channel]] = {
    "africastalking": "sms",
    "twilio": "sms",
    "generic": "sms",
    "whatsapp": "whatsapp",
}
_API_OF: Final[dict[str, Api]] = {
    "africastalking": "africastalking",
    "twilio": "twilio",
    "generic": "generic",
    "whatsapp": "whatsapp",
    "whatsapp_versioned": "whatsapp",
}
_PHONE: Final = re.compile(r"\+?[0-9]{7,15}")
_TWILIO_CODES: Final = {400: 21604, 401: 20003, 404: 20404, 429: 20429}
_GRAPH_CODES: Final = {400: 100, 401: 190, 429: 130429}


@dataclass(frozen=True, slots=True)
class SentMessage:
    """One accepted message, as a test sees it."""

    channel: Channel
    api: Api
    to: str
    body: str
    provider_id: str
    sender: str | None
    template: str | None
    at: datetime


@dataclass(slots=True)
class _Fault:
    kind: Literal["status", "stall", "stall_after", "lose"]
    remaining: int
    channel: Channel | None
    status: int = 0
    seconds: float = 0.0


def _positive(n: int) -> int:
    if n < 1:
        raise ValueError("n must be at least 1")
    return n


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def _api_error(api: Api, status: int, message: str, code: int | None = None) -> web.Response:
    body: dict[str, Any]
    if api == "twilio":
        code = code or _TWILIO_CODES.get(status, 20500)
        body = {"code": code, "message": message,
                "more_info": f"https://www.twilio.com/docs/errors/{code}", "status": status}
    elif api == "whatsapp":
        body = {"error": {"message": message, "type": "OAuthException",
                          "code": code or _GRAPH_CODES.get(status, 2),
                          "fbtrace_id": secrets.token_urlsafe(9)}}
    else:
        body = {"error": message}
    return web.json_response(body, status=status)


class GatewaySimulator:
    """An SMS / WhatsApp gateway on aiohttp; faults and inspection are plain method calls.

    ``latency`` (seconds) is added to every call; set it at any time.
    """

    def __init__(
        self,
        *,
        at_username: str = DEFAULT_AT_USERNAME,
        at_api_key: str = DEFAULT_AT_API_KEY,
        twilio_account_sid: str = DEFAULT_TWILIO_SID,
        twilio_auth_token: str = DEFAULT_TWILIO_TOKEN,
        sms_token: str = DEFAULT_SMS_TOKEN,
        whatsapp_token: str = DEFAULT_WHATSAPP_TOKEN,
        latency: float = 0.0,
    ) -> None:
        secrets_given = (at_username, at_api_key, twilio_account_sid, twilio_auth_token,
                         sms_token, whatsapp_token)
        if not all(secrets_given):
            raise ValueError("an empty credential would let every request in")
        self.at_username = at_username
        self.at_api_key = at_api_key
        self.twilio_account_sid = twilio_account_sid
        self.twilio_auth_token = twilio_auth_token
        self.sms_token = sms_token
        self.whatsapp_token = whatsapp_token
        self.latency = latency
        self._messages: list[SentMessage] = []
        self._attempts: Counter[str] = Counter()
        self._faults: list[_Fault] = []
        self._down: Literal["503", "close"] | None = None
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._host = ""
        self._port = 0
        self.callbacks = Callbacks(Receipts())
        # (name, language) → number of body parameters; empty: any template is known.
        self.templates: dict[tuple[str, str], int] = {}
        # wa_id → epoch seconds of the customer's last message.
        self.windows: dict[str, float] = {}
        # api → messages left; an api not here has no limit.
        self.balance: dict[str, int] = {}

    # --- the outside world's behaviour ----------------------------------------------------

    @property
    def receipts(self) -> Receipts:
        """Where receipts go and how they turn out; change its fields at any time."""
        return self.callbacks.receipts

    def add_template(self, name: str, language: str = "en", params: int = 0) -> None:
        """An approved template with ``params`` body parameters."""
        self.templates[(name, language)] = params

    def set_balance(self, api: Api, messages: int | None) -> None:
        """``messages`` more accepted on ``api``, then the account is out of credit."""
        if messages is None:
            self.balance.pop(api, None)
        else:
            self.balance[api] = messages

    async def inbound(self, wa_id: str, text: str = "hi",
                      phone_number_id: str = DEFAULT_PHONE_NUMBER_ID) -> str:
        """The customer ``wa_id`` writes to the business: opens their 24-hour window and
        posts the message to the WhatsApp webhook. Returns its wamid."""
        self.windows[wa_id.lstrip("+")] = time.time()
        return await self.callbacks.inbound(phone_number_id, wa_id.lstrip("+"), text)

    def in_window(self, to: str) -> bool:
        opened = self.windows.get(to.lstrip("+"))
        return opened is not None and time.time() - opened < WINDOW_S

    def _spend(self, api: Api) -> bool:
        """Take one message off ``api``'s balance; False when it has run out."""
        left = self.balance.get(api)
        if left is None:
            return True
        if left <= 0:
            return False
        self.balance[api] = left - 1
        return True

    # --- server -------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        """A fresh aiohttp application serving this simulator (for embedding elsewhere)."""
        app = web.Application(middlewares=[_pipeline])
        app[GATEWAY_SIM] = self
        app.router.add_post("/version1/messaging", _africastalking, name="africastalking")
        app.router.add_post("/2010-04-01/Accounts/{sid}/Messages.json", _twilio, name="twilio")
        app.router.add_post("/sms", _generic, name="generic")
        app.router.add_post("/v1/messages", _whatsapp, name="whatsapp")
        app.router.add_post("/{version:v[0-9.]+}/{phone_id}/messages", _whatsapp,
                            name="whatsapp_versioned")
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on ``host:port`` (0 picks a free port); return the port."""
        if self._runner is not None:
            raise RuntimeError("simulator already started")
        self._stopping = asyncio.Event()
        runner = web.AppRunner(self.make_app(), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._host = host
        self._port = int(runner.addresses[0][1])
        return self._port

    async def stop(self) -> None:
        """Stop listening, cutting stalled calls short; idempotent. Records are kept."""
        runner, self._runner = self._runner, None
        self._stopping.set()
        await self.callbacks.close()
        if runner is not None:
            await runner.cleanup()

    @property
    def url(self) -> str:
        if self._runner is None:
            raise RuntimeError("simulator not started")
        return f"http://{self._host}:{self._port}"

    # --- faults -------------------------------------------------------------------------

    def fail_next(self, n: int = 1, *, status: int = 500, channel: Channel | None = None) -> None:
        """The next ``n`` authenticated calls (on ``channel``, or any) answer ``status``."""
        if not 400 <= status <= 599:
            raise ValueError("status must be a 4xx or 5xx")
        self._faults.append(_Fault("status", _positive(n), channel, status=status))

    def timeout_next(self, n: int = 1, *, seconds: float = 3600.0, deliver: bool = False,
                     channel: Channel | None = None) -> None:
        """The next ``n`` calls stall ``seconds`` (longer than any client waits).

        With ``deliver`` the message is accepted and recorded before the stall: the client
        times out on a message that did go out. Without it nothing is recorded and the call
        ends, if anyone is still waiting, with 504.
        """
        kind: Literal["stall", "stall_after"] = "stall_after" if deliver else "stall"
        self._faults.append(_Fault(kind, _positive(n), channel, seconds=seconds))

    def lose_response_next(self, n: int = 1, *, channel: Channel | None = None) -> None:
        """The next ``n`` calls are accepted and recorded, then the connection is closed."""
        self._faults.append(_Fault("lose", _positive(n), channel))

    def down(self, *, close_connection: bool = False) -> None:
        """Every call from now on answers 503, or has its connection closed unanswered."""
        self._down = "close" if close_connection else "503"

    def up(self) -> None:
        """Undo `down`."""
        self._down = None

    @property
    def is_down(self) -> bool:
        return self._down is not None

    def clear_faults(self) -> None:
        """Forget pending faults and come back up."""
        self._faults.clear()
        self._down = None

    # --- inspection ---------------------------------------------------------------------

    def messages(self, channel: Channel | None = None) -> list[SentMessage]:
        """Accepted messages, oldest first, on ``channel`` or on all."""
        return [m for m in self._messages if channel is None or m.channel == channel]

    @property
    def attempts(self) -> int:
        """Calls to any send endpoint, refused and failed ones included."""
        return self._attempts.total()

    @property
    def attempts_by_api(self) -> dict[str, int]:
        return dict(self._attempts)

    def clear(self) -> None:
        """Forget recorded messages and attempt counts."""
        self._messages.clear()
        self._attempts.clear()

    # --- internals, used by the handlers below ------------------------------------------

    def _take_fault(self, channel: Channel) -> _Fault | None:
        for fault in self._faults:
            if fault.channel in (None, channel):
                fault.remaining -= 1
                if fault.remaining == 0:
                    self._faults.remove(fault)
                return fault
        return None

    async def _stall(self, seconds: float) -> bool:
        """Wait ``seconds``; True if the simulator began stopping meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
        return self._stopping.is_set()

    def _record(self, channel: Channel, api: Api, to: str, body: str, provider_id: str,
                sender: str | None = None, template: str | None = None) -> SentMessage:
        message = SentMessage(channel, api, to, body, provider_id, sender, template,
                              datetime.now(UTC))
        self._messages.append(message)
        return message


GATEWAY_SIM: Final = web.AppKey("gateway_sim", GatewaySimulator)


# --- HTTP ---------------------------------------------------------------------------------


def _close(request: web.Request) -> web.Response:
    if request.transport is not None:
        request.transport.close()
    # Never reaches the client; aiohttp just needs a response object.
    return web.Response(status=204)


def _basic_credentials(header: str) -> tuple[str, str]:
    """Login and password from HTTP basic auth; empty strings when there are none."""
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return "", ""
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except ValueError:
        return "", ""
    login, _, password = decoded.partition(":")
    return login, password


def _authenticated(sim: GatewaySimulator, api: Api, request: web.Request) -> bool:
    if api == "africastalking":
        # The username travels in the body; the handler checks it.
        return _same(request.headers.get("apiKey", ""), sim.at_api_key)
    if api == "twilio":
        login, password = _basic_credentials(request.headers.get("Authorization", ""))
        return (_same(login, sim.twilio_account_sid)
                and _same(password, sim.twilio_auth_token)
                and request.match_info["sid"] == login)
    token = sim.sms_token if api == "generic" else sim.whatsapp_token
    return _same(request.headers.get("Authorization", ""), f"Bearer {token}")


@web.middleware
async def _pipeline(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count, delay, outage, authenticate, inject faults, in that order, around the handler."""
    failure = request.match_info.http_exception
    if failure is not None:
        return _api_error("generic", failure.status, failure.reason)
    sim = request.app[GATEWAY_SIM]
    api = _API_OF.get(request.match_info.route.name or "")
    if api is None:
        return await handler(request)
    sim._attempts[api] += 1
    if sim.latency > 0 and await sim._stall(sim.latency):
        return _close(request)
    if sim._down == "close":
        return _close(request)
    if sim._down == "503":
        return _api_error(api, 503, "service unavailable")
    if not _authenticated(sim, api, request):
        return _api_error(api, 401, "authentication failed")
    fault = sim._take_fault(_CHANNEL_OF[api])
    if fault is None:
        return await handler(request)
    if fault.kind == "status":
        return _api_error(api, fault.status, "simulated fault")
    if fault.kind == "stall":
        if await sim._stall(fault.seconds):
            return _close(request)
        return _api_error(api, 504, "gateway timeout")
    response = await handler(request)
    if response.status >= 300:
        return response
    if fault.kind == "stall_after" and not await sim._stall(fault.seconds):
        return response
    return _close(request)


async def _fields(request: web.Request) -> dict[str, Any] | None:
    """The body as a dict, from JSON or a form; None when it is neither."""
    if request.content_type == "application/json":
        try:
            payload = await request.json()
        except ValueError:
            return None
        return payload if isinstance(payload, dict) else None
    form = await request.post()
    return {k: v for k, v in form.items() if isinstance(v, str)}


def _text(fields: dict[str, Any], key: str) -> str | None:
    value = fields.get(key)
    return (value.strip() or None) if isinstance(value, str) else None


async def _africastalking(request: web.Request) -> web.StreamResponse:
    sim = request.app[GATEWAY_SIM]
    fields = await _fields(request)
    if fields is None:
        return _api_error("africastalking", 400, "body must be a form or a JSON object")
    if not _same(str(fields.get("username", "")), sim.at_username):
        return _api_error("africastalking", 401, "The supplied authentication is invalid")
    raw_to = fields.get("to", "")
    numbers = raw_to.split(",") if isinstance(raw_to, str) else raw_to
    message = _text(fields, "message")
    if not isinstance(numbers, list) or not all(isinstance(n, str) for n in numbers):
        return _api_error("africastalking", 400, "to must be one or more phone numbers")
    numbers = [n.strip() for n in numbers if n.strip()]
    if not numbers or message is None:
        return _api_error("africastalking", 400, "to and message are required")
    sender = _text(fields, "from")
    recipients: list[dict[str, Any]] = []
    for number in numbers:
        if _PHONE.fullmatch(number) is None:
            recipients.append({"number": number, "status": "InvalidPhoneNumber",
                               "statusCode": 403, "messageId": "None", "cost": "0"})
            continue
        if not sim._spend("africastalking"):
            recipients.append({"number": number, "status": "InsufficientBalance",
                               "statusCode": 405, "messageId": "None", "cost": "0"})
            continue
        sent = sim._record("sms", "africastalking", number, message,
                           f"ATXid_{secrets.token_hex(16)}", sender)
        sim.callbacks.africastalking_message(sent.provider_id, number)
        recipients.append({"number": number, "status": "Success", "statusCode": 101,
                           "messageId": sent.provider_id, "cost": "KES 0.8000"})
    ok = sum(r["statusCode"] == 101 for r in recipients)
    summary = f"Sent to {ok}/{len(recipients)} Total Cost: KES {0.8 * ok:.4f}"
    return web.json_response(
        {"SMSMessageData": {"Message": summary, "Recipients": recipients}}, status=201
    )


async def _twilio(request: web.Request) -> web.StreamResponse:
    sim = request.app[GATEWAY_SIM]
    form = await request.post()
    to, body, sender = form.get("To"), form.get("Body"), form.get("From")
    service = form.get("MessagingServiceSid")
    if not isinstance(to, str) or not to.strip():
        return _api_error("twilio", 400, "A 'To' phone number is required.", 21604)
    if not isinstance(body, str) or not body:
        return _api_error("twilio", 400, "Message body is required.", 21602)
    if not isinstance(sender, str) and not isinstance(service, str):
        return _api_error("twilio", 400, "A 'From' phone number is required.", 21603)
    if _PHONE.fullmatch(to.strip()) is None:
        return _api_error("twilio", 400, f"The 'To' number {to} is not a valid phone number.",
                          21211)
    sent = sim._record("sms", "twilio", to.strip(), body, f"SM{secrets.token_hex(16)}",
                       sender if isinstance(sender, str) else None)
    account = sim.twilio_account_sid
    callback = form.get("StatusCallback")
    if isinstance(callback, str) and callback:
        sim.callbacks.twilio_message(callback, sim.twilio_auth_token, {
            "MessageSid": sent.provider_id, "SmsSid": sent.provider_id,
            "AccountSid": account, "From": sent.sender or "", "To": sent.to,
            "ApiVersion": "2010-04-01",
        })
    stamp = sent.at.strftime("%a, %d %b %Y %H:%M:%S +0000")
    uri = f"/2010-04-01/Accounts/{account}/Messages/{sent.provider_id}"
    return web.json_response({
        "sid": sent.provider_id, "account_sid": account,
        "messaging_service_sid": service if isinstance(service, str) else None,
        "to": sent.to, "from": sent.sender, "body": body, "status": "queued",
        "num_segments": str(len(body) // 161 + 1), "num_media": "0",
        "direction": "outbound-api", "api_version": "2010-04-01",
        "date_created": stamp, "date_updated": stamp, "date_sent": None,
        "price": None, "price_unit": "USD", "error_code": None, "error_message": None,
        "uri": f"{uri}.json", "subresource_uris": {"media": f"{uri}/Media.json"},
    }, status=201)


async def _generic(request: web.Request) -> web.StreamResponse:
    sim = request.app[GATEWAY_SIM]
    try:
        payload = await request.json()
    except ValueError:
        return _api_error("generic", 400, "body is not valid JSON")
    if not isinstance(payload, dict):
        return _api_error("generic", 400, "body must be a JSON object")
    to, message = _text(payload, "to"), _text(payload, "message")
    if to is None or message is None:
        return _api_error("generic", 400, "to and message are required strings")
    if _PHONE.fullmatch(to) is None:
        return _api_error("generic", 400, f"not a phone number: {to}")
    sent = sim._record("sms", "generic", to, message, f"sms-{secrets.token_hex(12)}",
                       _text(payload, "from"))
    return web.json_response({"id": sent.provider_id, "status": "queued", "to": to})


def _template_text(template: dict[str, Any]) -> str | None:
    """The body parameters of a template, joined; None when the template is malformed."""
    language = template.get("language")
    components = template.get("components", [])
    if not isinstance(language, dict) or not isinstance(language.get("code"), str):
        return None
    if not isinstance(components, list):
        return None
    texts: list[str] = []
    for component in components:
        if not isinstance(component, dict) or not isinstance(component.get("parameters", []),
                                                              list):
            return None
        if component.get("type") != "body":
            continue
        for parameter in component.get("parameters", []):
            if not isinstance(parameter, dict):
                return None
            if isinstance(parameter.get("text"), str):
                texts.append(parameter["text"])
    return " ".join(texts)


def _check_template(sim: GatewaySimulator, template: dict[str, Any]) -> web.Response | None:
    """132001 for a template not approved (name and language), 132000 for a wrong count."""
    if not sim.templates:
        return None
    key = (str(template.get("name")), str(template["language"]["code"]))
    if key not in sim.templates:
        return _api_error("whatsapp", 404, "(#132001) Template name does not exist in the "
                          "translation", 132001)
    given = sum(len(c.get("parameters", [])) for c in template.get("components", [])
                if c.get("type") == "body")
    if given != sim.templates[key]:
        return _api_error("whatsapp", 400, "(#132000) Number of parameters does not match "
                          "the expected number of params", 132000)
    return None


async def _whatsapp(request: web.Request) -> web.StreamResponse:
    sim = request.app[GATEWAY_SIM]
    try:
        payload = await request.json()
    except ValueError:
        return _api_error("whatsapp", 400, "(#100) Invalid JSON body")
    if not isinstance(payload, dict):
        return _api_error("whatsapp", 400, "(#100) The body must be a JSON object")
    if payload.get("messaging_product") != "whatsapp":
        return _api_error("whatsapp", 400, "(#100) The parameter messaging_product is required.")
    to = _text(payload, "to")
    if to is None or _PHONE.fullmatch(to) is None:
        return _api_error("whatsapp", 400, "(#100) Invalid parameter: to")
    kind = payload.get("type", "text")
    template_name: str | None = None
    if kind == "text":
        text = payload.get("text")
        body = text.get("body") if isinstance(text, dict) else None
        if not isinstance(body, str) or not body:
            return _api_error("whatsapp", 400, "(#100) The parameter text['body'] is required.")
    elif kind == "template":
        template = payload.get("template")
        name = template.get("name") if isinstance(template, dict) else None
        rendered = _template_text(template) if isinstance(template, dict) else None
        if not isinstance(name, str) or not name or rendered is None:
            return _api_error("whatsapp", 400,
                              "(#100) template needs a name, a language code and components")
        assert isinstance(template, dict)
        refused = _check_template(sim, template)
        if refused is not None:
            return refused
        body, template_name = rendered, name
    else:
        return _api_error("whatsapp", 400, f"(#100) Unsupported message type: {kind}")
    if not sim._spend("whatsapp"):
        return _api_error("whatsapp", 400, "Business eligibility payment issue", 131042)
    wamid = "wamid." + base64.b64encode(secrets.token_bytes(30)).decode()
    sim._record("whatsapp", "whatsapp", to, body, wamid, template=template_name)
    phone_id = request.match_info.get("phone_id", DEFAULT_PHONE_NUMBER_ID)
    # Free-form text outside the window is accepted, then fails (Meta: 131047).
    sim.callbacks.whatsapp_message(phone_id, wamid, to, outside_window=(
        template_name is None and not sim.in_window(to)))
    message: dict[str, str] = {"id": wamid}
    if template_name is not None:
        message["message_status"] = "accepted"
    return web.json_response({
        "messaging_product": "whatsapp",
        "contacts": [{"input": to, "wa_id": to.lstrip("+")}],
        "messages": [message],
    })


# --- standalone ---------------------------------------------------------------------------


async def serve(
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    *,
    simulator: GatewaySimulator | None = None,
    on_ready: Callable[[GatewaySimulator], None] | None = None,
) -> None:
    """Run a simulator (a default one unless given) until cancelled."""
    sim = simulator or GatewaySimulator()
    await sim.start(host, port)
    log.info("gateway_sim_listening url=%s", sim.url)
    try:
        if on_ready is not None:
            on_ready(sim)
        await asyncio.Event().wait()
    finally:
        await sim.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imsys sim gateway",
                                     description="SMS / WhatsApp gateway simulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--at-username", default=DEFAULT_AT_USERNAME)
    parser.add_argument("--at-api-key", default=DEFAULT_AT_API_KEY)
    parser.add_argument("--twilio-sid", default=DEFAULT_TWILIO_SID)
    parser.add_argument("--twilio-token", default=DEFAULT_TWILIO_TOKEN)
    parser.add_argument("--sms-token", default=DEFAULT_SMS_TOKEN)
    parser.add_argument("--whatsapp-token", default=DEFAULT_WHATSAPP_TOKEN)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to each call")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sim = GatewaySimulator(
        at_username=args.at_username, at_api_key=args.at_api_key,
        twilio_account_sid=args.twilio_sid, twilio_auth_token=args.twilio_token,
        sms_token=args.sms_token, whatsapp_token=args.whatsapp_token, latency=args.latency,
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, simulator=sim))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
