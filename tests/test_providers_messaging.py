"""The SMS and WhatsApp clients against the gateway simulator (and a few custom servers)."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pydantic import SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from imsys.errors import PermanentError, RetryableError
from imsys.provider_settings import SmsConfig, WhatsAppConfig
from imsys.providers.errors import (
    OutOfCredits,
    ProviderAuthError,
    ProviderError,
    ProviderRejected,
    ProviderUnavailable,
    RateLimited,
)
from imsys.providers.sms import SmsClient
from imsys.providers.whatsapp import WhatsAppClient
from imsys.sim import gateway
from imsys.sim.gateway import GatewaySimulator

TO = "+254711000001"
OTP = "493817"
BODY = f"Your imsys code is {OTP}"


@pytest.fixture
async def sim() -> AsyncIterator[GatewaySimulator]:
    simulator = GatewaySimulator()
    await simulator.start()
    yield simulator
    await simulator.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


def sms_config(style: str, url: str, **overrides: Any) -> SmsConfig:
    """An SmsConfig for one gateway dialect of the simulator at ``url``."""
    fields: dict[str, Any]
    if style == "africastalking":
        fields = {"url": f"{url}/version1/messaging"}  # the defaults are Africa's Talking
    elif style == "africastalking-json":
        fields = {"url": f"{url}/version1/messaging", "format": "json"}
    elif style == "twilio":
        sid = gateway.DEFAULT_TWILIO_SID
        fields = {
            "name": "twilio", "auth": "basic", "username": sid,
            "secret": gateway.DEFAULT_TWILIO_TOKEN, "sender": "+15005550006",
            "url": f"{url}/2010-04-01/Accounts/{sid}/Messages.json",
            "body": {"To": "{to}", "From": "{sender}", "Body": "{message}"},
            "message_id_path": "sid", "status_path": "",
        }
    else:
        fields = {
            "name": "generic", "url": f"{url}/sms", "auth": "bearer",
            "secret": gateway.DEFAULT_SMS_TOKEN, "format": "json",
            "body": {"to": "{to}", "message": "{message}"},
            "message_id_path": "id", "status_path": "",
        }
    return SmsConfig(**{**fields, "timeout": 5.0, "connect_timeout": 2.0, **overrides})


STYLES = ["africastalking", "africastalking-json", "twilio", "generic"]
API_OF = {"africastalking": "africastalking", "africastalking-json": "africastalking",
          "twilio": "twilio", "generic": "generic"}


def sms(session: aiohttp.ClientSession, style: str, url: str, **overrides: Any) -> SmsClient:
    return SmsClient(session, sms_config(style, url, **overrides))


def whatsapp(session: aiohttp.ClientSession, url: str, **overrides: Any) -> WhatsAppClient:
    fields: dict[str, Any] = {"base_url": f"{url}/v21.0", "timeout": 5.0,
                              "connect_timeout": 2.0, **overrides}
    return WhatsAppClient(session, WhatsAppConfig(**fields))


async def serve(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                ) -> tuple[web.AppRunner, str]:
    """A one-route aiohttp server answering every path with ``handler``."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


# --- configuration ------------------------------------------------------------------------


def test_defaults_are_the_simulators_demo_credentials() -> None:
    """The SMS and WhatsApp defaults carry the gateway simulator's published credentials."""
    sms_defaults, wa_defaults = SmsConfig(), WhatsAppConfig()
    assert sms_defaults.username == gateway.DEFAULT_AT_USERNAME
    assert sms_defaults.secret.get_secret_value() == gateway.DEFAULT_AT_API_KEY
    assert wa_defaults.token.get_secret_value() == gateway.DEFAULT_WHATSAPP_TOKEN
    assert f":{gateway.DEFAULT_PORT}/" in sms_defaults.url
    assert f":{gateway.DEFAULT_PORT}/" in wa_defaults.base_url
    assert "at-sim-key" not in repr(sms_defaults)


def test_sms_config_takes_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    """Embedded in settings, every SMS field (the body template too) can come from the env."""
    class Settings(BaseSettings):
        model_config = SettingsConfigDict(env_prefix="IMSYS_", env_nested_delimiter="__")
        sms: SmsConfig = SmsConfig()

    monkeypatch.setenv("IMSYS_SMS__AUTH", "bearer")
    monkeypatch.setenv("IMSYS_SMS__SECRET", "from-env-123")
    monkeypatch.setenv("IMSYS_SMS__FORMAT", "json")
    monkeypatch.setenv("IMSYS_SMS__BODY", '{"to": "{to}", "text": {"body": "{message}"}}')
    config = Settings().sms
    assert (config.auth, config.secret.get_secret_value()) == ("bearer", "from-env-123")
    assert config.body == {"to": "{to}", "text": {"body": "{message}"}}


@pytest.mark.parametrize(("fields", "problem"), [
    ({"body": {"to": "{to}", "text": "{mesage}"}}, "unknown placeholder"),
    ({"body": {"to": "{to}"}}, "both {to} and {message}"),
    ({"body": {"to": "{to}", "m": {"text": "{message}"}}}, "strings only"),
    ({"auth": "bearer", "secret": ""}, "needs a secret"),
    ({"url": "ftp://example.com"}, "http"),
])
def test_sms_config_rejects_mistakes(fields: dict[str, Any], problem: str) -> None:
    """Typos in the template, a form body that nests, a missing secret fail at start-up."""
    with pytest.raises(ValidationError, match=problem):
        SmsConfig(**fields)


# --- SMS ----------------------------------------------------------------------------------


@pytest.mark.parametrize("style", STYLES)
async def test_sms_send_returns_the_gateway_message_id(session: aiohttp.ClientSession,
                                                       sim: GatewaySimulator,
                                                       style: str) -> None:
    """Each gateway dialect delivers the message and the client returns its provider id."""
    message_id = await sms(session, style, sim.url).send(TO, BODY)
    [sent] = sim.messages("sms")
    assert (sent.api, sent.to, sent.body, sent.provider_id) == (API_OF[style], TO, BODY,
                                                                 message_id)


async def test_africastalking_sender_is_optional(session: aiohttp.ClientSession,
                                                 sim: GatewaySimulator) -> None:
    """An empty sender leaves the field out; a configured one is sent as ``from``."""
    await sms(session, "africastalking", sim.url).send(TO, BODY)
    await sms(session, "africastalking", sim.url, sender="ISP").send(TO, BODY)
    assert [m.sender for m in sim.messages()] == [None, "ISP"]


async def test_africastalking_invalid_number_is_permanent(session: aiohttp.ClientSession,
                                                          sim: GatewaySimulator) -> None:
    """A 201 whose recipient status is InvalidPhoneNumber raises ProviderRejected with it."""
    with pytest.raises(ProviderRejected) as caught:
        await sms(session, "africastalking", sim.url).send("12-not-a-number", BODY)
    assert caught.value.code == "InvalidPhoneNumber"
    assert "InvalidPhoneNumber" in str(caught.value)
    assert sim.messages() == []


async def test_twilio_invalid_number_carries_twilio_code(session: aiohttp.ClientSession,
                                                         sim: GatewaySimulator) -> None:
    """Twilio's 400 becomes ProviderRejected with its code and message."""
    with pytest.raises(ProviderRejected) as caught:
        await sms(session, "twilio", sim.url).send("nope", BODY)
    assert (caught.value.status, caught.value.code) == (400, "21211")
    assert "is not a valid phone number" in str(caught.value)


async def test_wrong_message_id_path_is_reported(session: aiohttp.ClientSession,
                                                 sim: GatewaySimulator) -> None:
    """A path that finds no id fails permanently and says the SMS may have gone out."""
    client = sms(session, "generic", sim.url, message_id_path="data.id")
    with pytest.raises(ProviderRejected, match="may have gone out"):
        await client.send(TO, BODY)
    assert len(sim.messages()) == 1


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("status", [500, 503])
async def test_sms_server_errors_are_retryable(session: aiohttp.ClientSession,
                                               sim: GatewaySimulator, style: str,
                                               status: int) -> None:
    """A 5xx from the gateway raises ProviderUnavailable, not applied."""
    sim.fail_next(status=status)
    with pytest.raises(ProviderUnavailable) as caught:
        await sms(session, style, sim.url).send(TO, BODY)
    assert isinstance(caught.value, RetryableError)
    assert (caught.value.status, caught.value.maybe_applied) == (status, False)


@pytest.mark.parametrize("style", STYLES)
async def test_sms_client_errors_are_permanent_with_gateway_message(
        session: aiohttp.ClientSession, sim: GatewaySimulator, style: str) -> None:
    """A 4xx raises ProviderRejected carrying the gateway's own message, in any shape."""
    sim.fail_next(status=422)
    with pytest.raises(ProviderRejected) as caught:
        await sms(session, style, sim.url).send(TO, BODY)
    assert isinstance(caught.value, PermanentError)
    assert caught.value.detail == "simulated fault"
    assert str(caught.value).startswith(f"{sms_config(style, sim.url).name}: HTTP 422")


@pytest.mark.parametrize("style", STYLES)
async def test_sms_wrong_credentials_are_auth_errors(session: aiohttp.ClientSession,
                                                     sim: GatewaySimulator,
                                                     style: str) -> None:
    """A refused credential (401) raises ProviderAuthError and never shows the secret."""
    wrong = "wrong-secret-4711"
    with pytest.raises(ProviderAuthError) as caught:
        await sms(session, style, sim.url, secret=SecretStr(wrong)).send(TO, BODY)
    assert caught.value.status == 401
    assert wrong not in str(caught.value)


async def test_rate_limit_is_retryable_with_retry_after(session: aiohttp.ClientSession) -> None:
    """A 429 raises RateLimited whose defer is the gateway's Retry-After."""
    async def limited(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": "slow down"}, status=429,
                                 headers={"Retry-After": "7"})

    runner, url = await serve(limited)
    try:
        with pytest.raises(RateLimited) as caught:
            await sms(session, "generic", url).send(TO, BODY)
    finally:
        await runner.cleanup()
    assert (caught.value.defer, caught.value.detail) == (7.0, "slow down")


async def test_stall_times_out_as_maybe_applied(session: aiohttp.ClientSession,
                                                sim: GatewaySimulator) -> None:
    """A gateway that never answers gives ProviderUnavailable after the client timeout."""
    sim.timeout_next(seconds=30, deliver=True)
    client = sms(session, "africastalking", sim.url, timeout=0.3, connect_timeout=0.2)
    started = time.perf_counter()
    with pytest.raises(ProviderUnavailable, match="timed out") as caught:
        await client.send(TO, BODY)
    assert time.perf_counter() - started < 2
    assert caught.value.maybe_applied is True
    assert len(sim.messages()) == 1


async def test_gateway_504_is_maybe_applied(session: aiohttp.ClientSession,
                                            sim: GatewaySimulator) -> None:
    """A 504 (a proxy gave up on the provider) is retryable but may have gone out."""
    sim.timeout_next(seconds=0.05)
    with pytest.raises(ProviderUnavailable) as caught:
        await sms(session, "generic", sim.url).send(TO, BODY)
    assert (caught.value.status, caught.value.maybe_applied) == (504, True)


async def test_redirect_is_not_followed(session: aiohttp.ClientSession,
                                        sim: GatewaySimulator) -> None:
    """A redirect is refused, so the credential header never travels to another host."""
    async def moved(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(f"{sim.url}/sms")

    runner, url = await serve(moved)
    try:
        with pytest.raises(ProviderRejected, match="redirected to") as caught:
            await sms(session, "generic", url).send(TO, BODY)
    finally:
        await runner.cleanup()
    assert caught.value.status == 302
    assert sim.attempts == 0


async def test_lost_response_is_maybe_applied(session: aiohttp.ClientSession,
                                              sim: GatewaySimulator) -> None:
    """A send whose answer is lost raises ProviderUnavailable(maybe_applied) — it went out."""
    sim.lose_response_next()
    with pytest.raises(ProviderUnavailable) as caught:
        await sms(session, "twilio", sim.url).send(TO, BODY)
    assert caught.value.maybe_applied is True
    assert [m.body for m in sim.messages()] == [BODY]


async def test_connection_refused_is_not_applied(session: aiohttp.ClientSession) -> None:
    """Nobody listening: ProviderUnavailable, and the message surely did not go out."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ProviderUnavailable, match="cannot connect") as caught:
        await sms(session, "generic", f"http://127.0.0.1:{port}").send(TO, BODY)
    assert caught.value.maybe_applied is False


async def test_message_body_never_in_errors(session: aiohttp.ClientSession,
                                            sim: GatewaySimulator) -> None:
    """No error shows the message text, even from a gateway that echoes it back."""
    async def echo(request: web.Request) -> web.StreamResponse:
        raw = await request.text()
        return web.json_response({"error": f"cannot send {raw}", "code": raw}, status=400)

    runner, url = await serve(echo)
    errors: list[ProviderError] = []

    async def collect(client: SmsClient | WhatsAppClient, to: str = TO) -> None:
        send = (client.send(to, BODY) if isinstance(client, SmsClient)
                else client.send_template(to, "otp", "en", [OTP], copy_code=OTP))
        with pytest.raises(ProviderError) as caught:
            await send
        errors.append(caught.value)

    try:
        await collect(sms(session, "africastalking", url))
        for fault in (sim.fail_next, sim.lose_response_next):
            fault()
            await collect(sms(session, "africastalking", sim.url))
            fault()
            await collect(whatsapp(session, sim.url))
        await collect(sms(session, "africastalking", sim.url), to="bad")
        sim.timeout_next(seconds=30)
        await collect(sms(session, "twilio", sim.url, timeout=0.3))
        await collect(whatsapp(session, url))
    finally:
        await runner.cleanup()
    assert "message=***" in str(errors[0])
    for exc in errors:
        assert OTP not in str(exc), exc
        assert OTP not in (exc.code or "")


# --- WhatsApp -----------------------------------------------------------------------------


async def test_whatsapp_text_and_template(session: aiohttp.ClientSession,
                                          sim: GatewaySimulator) -> None:
    """Text and template messages go out and return their wamid."""
    client = whatsapp(session, sim.url)
    text_id = await client.send_text(TO, BODY)
    template_id = await client.send_template(TO, "otp_code", "en_US", [OTP, "10"],
                                             copy_code=OTP)
    text, template = sim.messages("whatsapp")
    assert (text.to, text.body, text.template, text.provider_id) == (TO, BODY, None, text_id)
    assert (template.body, template.template, template.provider_id) == (
        f"{OTP} 10", "otp_code", template_id)
    assert text_id.startswith("wamid.")


async def test_whatsapp_errors_map_by_status(session: aiohttp.ClientSession,
                                             sim: GatewaySimulator) -> None:
    """Graph errors: 400 rejected with its message, 429 rate limited, 503 retryable, 401 auth."""
    client = whatsapp(session, sim.url)
    expected: list[tuple[int, type[ProviderError]]] = [
        (400, ProviderRejected), (429, RateLimited), (503, ProviderUnavailable)]
    for status, kind in expected:
        sim.fail_next(status=status, channel="whatsapp")
        with pytest.raises(kind) as caught:
            await client.send_text(TO, BODY)
        assert caught.value.status == status
        assert caught.value.detail == "simulated fault"
    with pytest.raises(ProviderAuthError) as auth:
        await whatsapp(session, sim.url, token=SecretStr("bad-token-99")).send_text(TO, BODY)
    assert (auth.value.status, auth.value.code) == (401, "190")
    with pytest.raises(ProviderRejected, match=r"\(#100\) Invalid parameter: to"):
        await client.send_text("nope", BODY)


@pytest.mark.parametrize(("code", "kind"), [
    (131056, RateLimited), (131042, OutOfCredits), (131000, ProviderUnavailable),
    (131026, ProviderRejected),
])
async def test_whatsapp_graph_codes_override_http_400(session: aiohttp.ClientSession,
                                                      code: int,
                                                      kind: type[ProviderError]) -> None:
    """A 400 carrying a Graph rate-limit, payment or temporary code is classified by code."""
    async def graph(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": {"message": f"(#{code}) problem",
                                            "type": "OAuthException", "code": code}},
                                 status=400)

    runner, url = await serve(graph)
    try:
        with pytest.raises(kind) as caught:
            await whatsapp(session, url).send_text(TO, BODY)
    finally:
        await runner.cleanup()
    assert caught.value.code == str(code)


async def test_whatsapp_stall_times_out(session: aiohttp.ClientSession,
                                        sim: GatewaySimulator) -> None:
    """A stalled WhatsApp call raises ProviderUnavailable after the client timeout."""
    sim.timeout_next(seconds=30, channel="whatsapp")
    started = time.perf_counter()
    with pytest.raises(ProviderUnavailable, match="timed out"):
        await whatsapp(session, sim.url, timeout=0.3).send_text(TO, BODY)
    assert time.perf_counter() - started < 2
    assert sim.messages() == []
