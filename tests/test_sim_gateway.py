"""The SMS / WhatsApp gateway simulator, driven over real HTTP with aiohttp."""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from imsys.sim.gateway import GatewaySimulator, serve

AT_KEY = "at-key"
TW_SID = "AC" + "1" * 32
TW_TOKEN = "tw-token"
SMS_TOKEN = "sms-token"
WA_TOKEN = "wa-token"
AT = "/version1/messaging"
TWILIO = f"/2010-04-01/Accounts/{TW_SID}/Messages.json"
WA = "/v1/messages"

AT_HEADERS = {"apiKey": AT_KEY, "Accept": "application/json"}
SMS_HEADERS = {"Authorization": f"Bearer {SMS_TOKEN}"}
SMS_JSON_HEADERS = {"Content-Type": "application/json", **SMS_HEADERS}
WA_HEADERS = {"Authorization": f"Bearer {WA_TOKEN}"}
TW_AUTH = {"Authorization": aiohttp.encode_basic_auth(TW_SID, TW_TOKEN)}


@pytest.fixture
async def sim() -> AsyncIterator[GatewaySimulator]:
    simulator = GatewaySimulator(
        at_username="isp",
        at_api_key=AT_KEY,
        twilio_account_sid=TW_SID,
        twilio_auth_token=TW_TOKEN,
        sms_token=SMS_TOKEN,
        whatsapp_token=WA_TOKEN,
    )
    await simulator.start()
    yield simulator
    await simulator.stop()


@pytest.fixture
async def http(sim: GatewaySimulator) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=sim.url) as session:
        yield session


async def post(http: aiohttp.ClientSession, path: str, **kwargs: Any) -> tuple[int, Any]:
    async with http.post(path, **kwargs) as resp:
        return resp.status, await resp.json()


async def send_sms(
    http: aiohttp.ClientSession, to: str = "+254700000001", message: str = "hello"
) -> tuple[int, Any]:
    return await post(http, "/sms", json={"to": to, "message": message}, headers=SMS_HEADERS)


def wa_text(to: str = "+254700000002", body: str = "hi") -> dict[str, Any]:
    return {"messaging_product": "whatsapp", "to": to, "type": "text", "text": {"body": body}}


# --- Africa's Talking ---------------------------------------------------------------------


async def test_africastalking_form_send(http: aiohttp.ClientSession, sim: GatewaySimulator) -> None:
    """A form send answers 201 SMSMessageData and records the message with its messageId."""
    form = {"username": "isp", "to": "+254711000001", "message": "Your code is 1234", "from": "ISP"}
    status, body = await post(http, AT, data=form, headers=AT_HEADERS)
    assert status == 201
    data = body["SMSMessageData"]
    assert data["Message"].startswith("Sent to 1/1")
    [recipient] = data["Recipients"]
    assert recipient | {"messageId": ""} == {
        "number": "+254711000001",
        "status": "Success",
        "statusCode": 101,
        "messageId": "",
        "cost": "KES 0.8000",
    }
    assert recipient["messageId"].startswith("ATXid_")
    [sent] = sim.messages()
    assert (sent.channel, sent.api, sent.to, sent.body, sent.sender, sent.provider_id) == (
        "sms",
        "africastalking",
        "+254711000001",
        "Your code is 1234",
        "ISP",
        recipient["messageId"],
    )


async def test_africastalking_json_many_recipients(
    http: aiohttp.ClientSession, sim: GatewaySimulator
) -> None:
    """A JSON send to several numbers records each valid one and flags the invalid one."""
    payload = {
        "username": "isp",
        "to": "+254711000001,+254711000002,not-a-number",
        "message": "Outage tonight",
    }
    status, body = await post(http, AT, json=payload, headers=AT_HEADERS)
    assert status == 201
    assert body["SMSMessageData"]["Message"].startswith("Sent to 2/3")
    codes = [r["statusCode"] for r in body["SMSMessageData"]["Recipients"]]
    assert codes == [101, 101, 403]
    assert [m.to for m in sim.messages("sms")] == ["+254711000001", "+254711000002"]


@pytest.mark.parametrize(
    ("headers", "username"),
    [({"apiKey": "wrong"}, "isp"), ({}, "isp"), ({"apiKey": AT_KEY}, "someone-else")],
    ids=["wrong-key", "no-key", "wrong-username"],
)
async def test_africastalking_bad_credentials_401(
    http: aiohttp.ClientSession, sim: GatewaySimulator, headers: dict[str, str], username: str
) -> None:
    """A wrong apiKey header or username answers 401 and sends nothing."""
    form = {"username": username, "to": "+254711000001", "message": "x"}
    status, body = await post(http, AT, data=form, headers=headers)
    assert status == 401
    assert "error" in body
    assert sim.messages() == []
    assert sim.attempts == 1


@pytest.mark.parametrize(
    "form",
    [
        {"username": "isp", "to": "+254711000001"},
        {"username": "isp", "message": "x"},
        {"username": "isp", "to": " ", "message": "x"},
    ],
    ids=["no-message", "no-to", "blank-to"],
)
async def test_africastalking_malformed_400(
    http: aiohttp.ClientSession, sim: GatewaySimulator, form: dict[str, str]
) -> None:
    """A send without recipients or text answers 400 with a JSON error."""
    status, body = await post(http, AT, data=form, headers=AT_HEADERS)
    assert status == 400
    assert "required" in body["error"]
    assert sim.messages() == []


# --- Twilio -------------------------------------------------------------------------------


async def test_twilio_send(http: aiohttp.ClientSession, sim: GatewaySimulator) -> None:
    """A Twilio form send answers 201 with a queued Message resource and records it."""
    form = {"To": "+15005550006", "From": "+15005550001", "Body": "Invoice ready"}
    status, body = await post(http, TWILIO, data=form, headers=TW_AUTH)
    assert status == 201
    assert re.fullmatch(r"SM[0-9a-f]{32}", body["sid"])
    assert (body["status"], body["to"], body["body"], body["account_sid"]) == (
        "queued",
        "+15005550006",
        "Invoice ready",
        TW_SID,
    )
    [sent] = sim.messages("sms")
    assert (sent.api, sent.provider_id, sent.sender) == ("twilio", body["sid"], "+15005550001")


@pytest.mark.parametrize(
    ("auth", "path"),
    [
        ({"Authorization": aiohttp.encode_basic_auth(TW_SID, "wrong")}, TWILIO),
        ({}, TWILIO),
        ({"Authorization": "Basic !!!"}, TWILIO),
        (TW_AUTH, "/2010-04-01/Accounts/AC" + "2" * 32 + "/Messages.json"),
    ],
    ids=["wrong-token", "no-auth", "garbled-auth", "other-account"],
)
async def test_twilio_bad_credentials_401(
    http: aiohttp.ClientSession, sim: GatewaySimulator, auth: dict[str, str], path: str
) -> None:
    """Bad basic auth, or an account other than the caller's, answers Twilio's 401."""
    form = {"To": "+15005550006", "From": "+15005550001", "Body": "x"}
    status, body = await post(http, path, data=form, headers=auth)
    assert (status, body["code"], body["status"]) == (401, 20003, 401)
    assert sim.messages() == []


@pytest.mark.parametrize(
    ("form", "code"),
    [
        ({"From": "+15005550001", "Body": "x"}, 21604),
        ({"To": "+15005550006", "From": "+15005550001"}, 21602),
        ({"To": "+15005550006", "Body": "x"}, 21603),
        ({"To": "nope", "From": "+15005550001", "Body": "x"}, 21211),
    ],
    ids=["no-to", "no-body", "no-from", "bad-to"],
)
async def test_twilio_malformed_400(
    http: aiohttp.ClientSession, form: dict[str, str], code: int
) -> None:
    """A Twilio send missing To, Body or From answers 400 with Twilio's error code."""
    status, body = await post(http, TWILIO, data=form, headers=TW_AUTH)
    assert (status, body["code"]) == (400, code)


# --- generic SMS --------------------------------------------------------------------------


async def test_generic_sms_send(http: aiohttp.ClientSession, sim: GatewaySimulator) -> None:
    """POST /sms answers an id and records the message."""
    status, body = await send_sms(http, message="Paid, thanks")
    assert status == 200
    [sent] = sim.messages()
    assert (sent.provider_id, sent.api, sent.body) == (body["id"], "generic", "Paid, thanks")


async def test_generic_sms_bad_token_401(
    http: aiohttp.ClientSession, sim: GatewaySimulator
) -> None:
    """POST /sms with another channel's token answers 401."""
    status, body = await post(
        http, "/sms", json={"to": "+254700000001", "message": "x"}, headers=WA_HEADERS
    )
    assert (status, body) == (401, {"error": "authentication failed"})
    assert sim.messages() == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"data": b"{oops", "headers": SMS_JSON_HEADERS},
        {"json": ["+254700000001", "x"], "headers": SMS_HEADERS},
        {"json": {"to": "+254700000001"}, "headers": SMS_HEADERS},
        {"json": {"to": "+254700000001", "message": 5}, "headers": SMS_HEADERS},
        {"json": {"to": "call me", "message": "x"}, "headers": SMS_HEADERS},
    ],
    ids=["not-json", "array", "no-message", "message-not-string", "bad-number"],
)
async def test_generic_sms_malformed_400(
    http: aiohttp.ClientSession, sim: GatewaySimulator, kwargs: dict[str, Any]
) -> None:
    """POST /sms with a malformed body answers 400 with a JSON error."""
    status, body = await post(http, "/sms", **kwargs)
    assert status == 400
    assert body["error"]
    assert sim.messages() == []


# --- WhatsApp -----------------------------------------------------------------------------


async def test_whatsapp_text(http: aiohttp.ClientSession, sim: GatewaySimulator) -> None:
    """A text message answers a wamid and is recorded on the whatsapp channel."""
    status, body = await post(http, WA, json=wa_text(body="Your OTP is 991122"), headers=WA_HEADERS)
    assert status == 200
    [message] = body["messages"]
    assert message["id"].startswith("wamid.")
    assert body["contacts"] == [{"input": "+254700000002", "wa_id": "254700000002"}]
    [sent] = sim.messages("whatsapp")
    assert (sent.to, sent.body, sent.provider_id, sent.template) == (
        "+254700000002",
        "Your OTP is 991122",
        message["id"],
        None,
    )
    assert sim.messages("sms") == []


async def test_whatsapp_template(http: aiohttp.ClientSession, sim: GatewaySimulator) -> None:
    """A template message is recorded with its name and its body parameters as text."""
    payload = {
        "messaging_product": "whatsapp",
        "to": "254700000003",
        "type": "template",
        "template": {
            "name": "otp_login",
            "language": {"code": "en"},
            "components": [
                {"type": "body", "parameters": [{"type": "text", "text": "482913"}]},
                {
                    "type": "button",
                    "sub_type": "url",
                    "index": "0",
                    "parameters": [{"type": "text", "text": "482913"}],
                },
            ],
        },
    }
    status, body = await post(http, "/v19.0/1234567890/messages", json=payload, headers=WA_HEADERS)
    assert status == 200
    assert body["messages"][0]["message_status"] == "accepted"
    [sent] = sim.messages("whatsapp")
    assert (sent.template, sent.body) == ("otp_login", "482913")


async def test_whatsapp_bad_token_401(http: aiohttp.ClientSession, sim: GatewaySimulator) -> None:
    """A wrong bearer token answers 401 in the Graph API error shape."""
    status, body = await post(http, WA, json=wa_text(), headers={"Authorization": "Bearer x"})
    assert status == 401
    assert (body["error"]["code"], body["error"]["type"]) == (190, "OAuthException")
    assert sim.messages() == []


@pytest.mark.parametrize(
    "payload",
    [
        {"to": "+254700000002", "type": "text", "text": {"body": "x"}},
        {**wa_text(), "text": {}},
        {**wa_text(), "to": "someone"},
        {**wa_text(), "type": "image"},
        {
            "messaging_product": "whatsapp",
            "to": "+254700000002",
            "type": "template",
            "template": {"name": "otp"},
        },
        ["not", "an", "object"],
    ],
    ids=["no-product", "no-body", "bad-to", "unsupported-type", "template-no-language", "array"],
)
async def test_whatsapp_malformed_400(
    http: aiohttp.ClientSession, sim: GatewaySimulator, payload: object
) -> None:
    """A malformed WhatsApp message answers 400 with a Graph error (code 100)."""
    status, body = await post(http, WA, json=payload, headers=WA_HEADERS)
    assert (status, body["error"]["code"]) == (400, 100)
    assert sim.messages() == []


# --- faults -------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 503, 429, 403])
async def test_fail_next_n(http: aiohttp.ClientSession, sim: GatewaySimulator, status: int) -> None:
    """fail_next(2, status) fails exactly the next two calls; all three are counted."""
    sim.fail_next(2, status=status)
    assert (await send_sms(http))[0] == status
    assert (await send_sms(http))[0] == status
    assert (await send_sms(http))[0] == 200
    assert sim.attempts == 3
    assert len(sim.messages()) == 1


async def test_fault_on_one_channel_spares_the_other(
    http: aiohttp.ClientSession, sim: GatewaySimulator
) -> None:
    """A fault aimed at whatsapp leaves SMS alone, and answers in WhatsApp's error shape."""
    sim.fail_next(status=503, channel="whatsapp")
    assert (await send_sms(http))[0] == 200
    status, body = await post(http, WA, json=wa_text(), headers=WA_HEADERS)
    assert status == 503
    assert "message" in body["error"]
    assert (await post(http, WA, json=wa_text(), headers=WA_HEADERS))[0] == 200


async def test_timeout_next_stalls_past_client_timeout(
    http: aiohttp.ClientSession, sim: GatewaySimulator
) -> None:
    """timeout_next stalls the call until the client gives up; nothing is sent."""
    sim.timeout_next()
    with pytest.raises(TimeoutError):
        async with http.post(
            "/sms",
            json={"to": "+254700000001", "message": "x"},
            headers=SMS_HEADERS,
            timeout=aiohttp.ClientTimeout(total=0.3),
        ):
            pass
    assert sim.messages() == []
    assert (await send_sms(http))[0] == 200
    assert sim.attempts == 2


async def test_timeout_next_with_delivery(
    http: aiohttp.ClientSession, sim: GatewaySimulator
) -> None:
    """timeout_next(deliver=True): the client times out, yet the message went out."""
    sim.timeout_next(deliver=True, channel="whatsapp")
    with pytest.raises(TimeoutError):
        async with http.post(
            WA,
            json=wa_text(body="otp 1"),
            headers=WA_HEADERS,
            timeout=aiohttp.ClientTimeout(total=0.3),
        ):
            pass
    assert [m.body for m in sim.messages("whatsapp")] == ["otp 1"]


async def test_short_stall_ends_in_504(http: aiohttp.ClientSession, sim: GatewaySimulator) -> None:
    """A stall shorter than the client's patience ends in 504, nothing sent."""
    sim.timeout_next(seconds=0.1)
    assert (await send_sms(http))[0] == 504
    assert sim.messages() == []


async def test_stop_cuts_stalled_calls_short() -> None:
    """stop() returns promptly even while a call is stalled for an hour."""
    sim = GatewaySimulator(sms_token=SMS_TOKEN)
    await sim.start()
    sim.timeout_next()
    async with aiohttp.ClientSession(base_url=sim.url) as http:
        pending = asyncio.create_task(send_sms(http))
        while sim.attempts == 0:
            await asyncio.sleep(0.01)
        started = time.monotonic()
        await sim.stop()
        assert time.monotonic() - started < 2.0
        with pytest.raises(aiohttp.ClientConnectionError):
            await pending


async def test_lose_response_next(http: aiohttp.ClientSession, sim: GatewaySimulator) -> None:
    """lose_response_next: the message is sent, the client sees the server disconnect."""
    sim.lose_response_next()
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await send_sms(http, message="sent but unanswered")
    assert [m.body for m in sim.messages()] == ["sent but unanswered"]
    assert (await send_sms(http))[0] == 200


async def test_down_answers_503_until_up(
    http: aiohttp.ClientSession, sim: GatewaySimulator
) -> None:
    """down() makes every endpoint answer 503 until up()."""
    sim.down()
    assert sim.is_down
    assert (await send_sms(http))[0] == 503
    assert (await post(http, WA, json=wa_text(), headers=WA_HEADERS))[0] == 503
    status, body = await post(
        http, TWILIO, data={"To": "+15005550006", "Body": "x"}, headers=TW_AUTH
    )
    assert (status, body["status"]) == (503, 503)
    sim.up()
    assert (await send_sms(http))[0] == 200
    assert sim.attempts == 4
    assert len(sim.messages()) == 1


async def test_down_closing_connections(http: aiohttp.ClientSession, sim: GatewaySimulator) -> None:
    """down(close_connection=True) drops every call unanswered."""
    sim.down(close_connection=True)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await send_sms(http)
    sim.up()
    assert (await send_sms(http))[0] == 200


async def test_latency_knob(http: aiohttp.ClientSession, sim: GatewaySimulator) -> None:
    """latency delays every call by at least that much."""
    sim.latency = 0.25
    started = time.monotonic()
    assert (await send_sms(http))[0] == 200
    assert time.monotonic() - started >= 0.25
    sim.latency = 0.0
    started = time.monotonic()
    await send_sms(http)
    assert time.monotonic() - started < 0.25


async def test_clear_faults(http: aiohttp.ClientSession, sim: GatewaySimulator) -> None:
    """clear_faults drops pending faults and brings the gateway up."""
    sim.fail_next(5)
    sim.down()
    sim.clear_faults()
    assert (await send_sms(http))[0] == 200


# --- inspection and running ---------------------------------------------------------------


async def test_records_and_attempts(http: aiohttp.ClientSession, sim: GatewaySimulator) -> None:
    """messages() filters by channel in order; attempts count every call per API; clear()."""
    await send_sms(http, message="one")
    await post(http, WA, json=wa_text(body="two"), headers=WA_HEADERS)
    await post(http, WA, json={}, headers=WA_HEADERS)
    await send_sms(http, message="three")
    assert [m.body for m in sim.messages()] == ["one", "two", "three"]
    assert [m.body for m in sim.messages("sms")] == ["one", "three"]
    assert sim.attempts == 4
    assert sim.attempts_by_api == {"generic": 2, "whatsapp": 2}
    first, second = sim.messages()[:2]
    assert first.at <= second.at
    sim.clear()
    assert (sim.messages(), sim.attempts) == ([], 0)


async def test_unknown_path_is_json_404(http: aiohttp.ClientSession, sim: GatewaySimulator) -> None:
    """An unknown path answers a JSON 404 and is not counted as an attempt."""
    status, body = await post(http, "/nowhere", json={})
    assert (status, body) == (404, {"error": "Not Found"})
    assert sim.attempts == 0


async def test_serve_runs_until_cancelled() -> None:
    """serve() accepts sends with the default credentials until cancelled."""
    ready: asyncio.Queue[GatewaySimulator] = asyncio.Queue()
    task = asyncio.create_task(serve("127.0.0.1", 0, on_ready=ready.put_nowait))
    sim = await asyncio.wait_for(ready.get(), 5)
    url = sim.url
    async with aiohttp.ClientSession() as http:
        status, _ = await post(
            http,
            url + "/sms",
            json={"to": "+254700000001", "message": "x"},
            headers={"Authorization": f"Bearer {sim.sms_token}"},
        )
        assert status == 200
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(aiohttp.ClientConnectionError):
            await post(http, url + "/sms", json={})


async def test_module_runs_standalone() -> None:
    """python -m imsys.sim.gateway --port 0 listens, logs its URL and takes given tokens."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "imsys.sim.gateway",
        "--port",
        "0",
        "--sms-token",
        "cli-token",
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        line = (await asyncio.wait_for(proc.stderr.readline(), 10)).decode()
        match = re.search(r"url=(http://\S+)", line)
        assert match, line
        async with aiohttp.ClientSession() as http:
            status, body = await post(
                http,
                match[1] + "/sms",
                json={"to": "+254700000001", "message": "x"},
                headers={"Authorization": "Bearer cli-token"},
            )
            assert (status, set(body)) == (200, {"id", "status", "to"})
    finally:
        proc.terminate()
        await proc.wait()
