"""Providers' webhooks (no admin token; each signed or tokened by its provider) and the
channel state the dashboard's banner reads.

- ``GET /webhooks/whatsapp``: Meta's subscription handshake (``hub.mode=subscribe``,
  ``hub.verify_token``) answers ``hub.challenge``; ``POST``: statuses and inbound messages,
  signed ``X-Hub-Signature-256``. On while ``whatsapp.app_secret`` and
  ``whatsapp.verify_token`` are set.
- ``POST /webhooks/africastalking?token=...``: delivery reports; on while
  ``sms.webhook_token`` is set.
- ``POST /webhooks/twilio``: status callbacks signed ``X-Twilio-Signature``; on while an
  SMS account named ``twilio`` is configured (its auth token signs).

Unsigned → 401, forged → 403, and neither writes anything. A route that is off answers
404. Receipts for ids imsys never sent are acknowledged (200) and change nothing.
"""

from __future__ import annotations

from aiohttp import web

from imsys.billing import receipts, webhooks
from imsys.deps import Deps
from imsys.events import CHANNELS, ChannelControl
from imsys.http.common import DEPS, install
from imsys.http.json import ApiError, json_response
from imsys.http.openapi import Routes
from imsys.provider_settings import SmsConfig

_MAX_BODY = 1_000_000


def _wa_secrets(deps: Deps) -> tuple[list[str], list[str]]:
    st = deps.settings
    configs = [st.whatsapp, *(a.whatsapp for a in st.messaging.accounts.values() if a.whatsapp)]
    app = [c.app_secret.get_secret_value() for c in configs if c.app_secret.get_secret_value()]
    verify = [c.verify_token.get_secret_value() for c in configs
              if c.verify_token.get_secret_value()]
    return app, verify


def _sms_configs(deps: Deps) -> list[SmsConfig]:
    st = deps.settings
    return [st.sms, *(a.sms for a in st.messaging.accounts.values() if a.sms)]


def _off(what: str) -> ApiError:
    return ApiError(404, f"webhook {what} is off: its secret is not configured")


def _refused(exc: webhooks.BadSignature) -> ApiError:
    return ApiError(exc.status, str(exc))


async def whatsapp_handshake(request: web.Request) -> web.StreamResponse:
    app_secrets, verify = _wa_secrets(request.app[DEPS])
    if not app_secrets or not verify:
        raise _off("whatsapp")
    q = request.query
    if q.get("hub.mode") != "subscribe":
        raise ApiError(400, "hub.mode must be 'subscribe'")
    try:
        webhooks.verify_token(q.get("hub.verify_token"), verify)
    except webhooks.BadSignature as exc:
        raise _refused(exc) from None
    return web.Response(text=q.get("hub.challenge", ""), content_type="text/plain")


async def whatsapp_post(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    app_secrets, verify = _wa_secrets(deps)
    if not app_secrets or not verify:
        raise _off("whatsapp")
    body = await request.content.read(_MAX_BODY + 1)
    if len(body) > _MAX_BODY:
        raise ApiError(413, "webhook body too large")
    try:
        webhooks.verify_whatsapp(body, request.headers.get("X-Hub-Signature-256"), app_secrets)
    except webhooks.BadSignature as exc:
        raise _refused(exc) from None
    try:
        got, inbound = webhooks.read_whatsapp(body)
    except (ValueError, TypeError, AttributeError) as exc:
        raise ApiError(400, f"not a WhatsApp notification: {type(exc).__name__}") from None
    counts = await receipts.take(deps.db, deps.events, got, inbound)
    return json_response({"ok": True, **counts})


async def africastalking_post(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    tokens = [t for c in _sms_configs(deps) if (t := c.webhook_token.get_secret_value())]
    if not tokens:
        raise _off("africastalking")
    try:
        webhooks.verify_token(request.query.get("token"), tokens)
    except webhooks.BadSignature as exc:
        raise _refused(exc) from None
    form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
    receipt = webhooks.read_africastalking(form)
    counts = await receipts.take(deps.db, deps.events, [receipt] if receipt else [])
    return json_response({"ok": True, **counts})


async def twilio_post(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    tokens = [c.secret.get_secret_value() for c in _sms_configs(deps) if c.name == "twilio"]
    if not tokens:
        raise _off("twilio")
    form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
    base = deps.settings.messaging.public_url.rstrip("/")
    url = f"{base}{request.rel_url}" if base else str(request.url)
    try:
        webhooks.verify_twilio(url, form, request.headers.get("X-Twilio-Signature"), tokens)
    except webhooks.BadSignature as exc:
        raise _refused(exc) from None
    receipt = webhooks.read_twilio(form)
    counts = await receipts.take(deps.db, deps.events, [receipt] if receipt else [])
    return json_response({"ok": True, **counts})


async def get_channels(request: web.Request) -> web.Response:
    """Each channel's state and the tenants it is out of credit for (the banner)."""
    deps = request.app[DEPS]
    control = ChannelControl.from_deps(deps)
    states = [(await control.status(c)).as_dict() for c in CHANNELS]
    return json_response({"channels": states})


def add_routes(app: web.Application, deps: Deps) -> None:
    install(app, deps)
    # No admin token: each provider signs its calls instead (checked by each handler),
    # and a route answers 404 until its secret is configured.
    hooks = Routes(app, "webhooks")
    hooks.get(
        "/webhooks/whatsapp", whatsapp_handshake,
        "Meta's verification handshake (hub.mode, hub.verify_token, hub.challenge)",
        auth=False,
    )
    hooks.post(
        "/webhooks/whatsapp", whatsapp_post,
        "WhatsApp statuses and inbound messages, signed by X-Hub-Signature-256",
        auth=False, body_required=False,
    )
    hooks.post(
        "/webhooks/africastalking", africastalking_post,
        "Africa's Talking delivery reports (form-encoded), with the configured token",
        auth=False, body_required=False,
    )
    hooks.post(
        "/webhooks/twilio", twilio_post,
        "Twilio status callbacks (form-encoded), signed by X-Twilio-Signature",
        auth=False, body_required=False,
    )
    Routes(app, "messaging").get(
        "/api/channels", get_channels,
        "each channel's state and the tenants it is out of credit for",
        access="admin",  # the service's channels, every tenant's credit
    )
