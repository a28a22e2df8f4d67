"""The SMTP client against a real aiosmtpd server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from pydantic import SecretStr

from imsys.errors import PermanentError, RetryableError
from imsys.provider_settings import SmtpConfig
from imsys.providers.email import SmtpClient
from imsys.providers.errors import (
    ProviderAuthError,
    ProviderError,
    ProviderRejected,
    ProviderUnavailable,
)

USER = "mailer"
PASSWORD = "smtp-pass-8c1e"
OTP = "271828"
TEXT = f"Your imsys code is {OTP}."


@dataclass
class Recorder:
    """An aiosmtpd handler that records messages, or answers a set reply at RCPT or DATA."""

    messages: list[tuple[str, list[str], EmailMessage]] = field(default_factory=list)
    rcpt_reply: str | None = None
    data_reply: str | None = None
    drop_after_data: bool = False

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        if self.rcpt_reply is not None:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.data_reply is not None:
            return self.data_reply
        parsed = message_from_bytes(envelope.content, policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), parsed))
        if self.drop_after_data:
            server.transport.close()
        return "250 Message accepted for delivery"


def authenticate(server: Any, session: Any, envelope: Any, mechanism: str,
                 auth_data: Any) -> AuthResult:
    ok = (isinstance(auth_data, LoginPassword) and auth_data.login == USER.encode()
          and auth_data.password == PASSWORD.encode())
    # handled=False: aiosmtpd answers the failure (535) itself.
    return AuthResult(success=ok, handled=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    recorder: Recorder
    port: int


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    recorder = Recorder()
    port = free_port()
    controller = Controller(recorder, hostname="127.0.0.1", port=port,
                            authenticator=authenticate, auth_require_tls=False)
    await asyncio.to_thread(controller.start)
    yield Server(recorder, port)
    await asyncio.to_thread(controller.stop)


def client(port: int, **overrides: Any) -> SmtpClient:
    fields: dict[str, Any] = {"host": "127.0.0.1", "port": port, "starttls": False,
                              "sender": "ISP Billing <billing@isp.example>", "timeout": 5.0,
                              "local_hostname": "imsys.test", **overrides}
    return SmtpClient(SmtpConfig(**fields))


async def test_delivers_text_and_html(server: Server) -> None:
    """The message arrives with its recipient, subject, both bodies and our Message-ID."""
    message_id = await client(server.port).send("alice@example.com", "Your code", TEXT,
                                                f"<p>{TEXT}</p>")
    [(sender, recipients, message)] = server.recorder.messages
    assert (sender, recipients) == ("billing@isp.example", ["alice@example.com"])
    assert (message["Subject"], message["To"], message["Message-ID"]) == (
        "Your code", "alice@example.com", message_id)
    assert message_id.startswith("<")
    assert message_id.endswith("@isp.example>")
    plain = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert plain is not None
    assert html is not None
    assert plain.get_content().strip() == TEXT
    assert html.get_content().strip() == f"<p>{TEXT}</p>"


async def test_login_then_deliver(server: Server) -> None:
    """With a username the client logs in before sending."""
    await client(server.port, username=USER, password=SecretStr(PASSWORD)).send(
        "bob@example.com", "Hi", TEXT)
    assert [to for _, to, _ in server.recorder.messages] == [["bob@example.com"]]


async def test_wrong_password_is_auth_error(server: Server) -> None:
    """A refused login (535) is ProviderAuthError and never shows the password."""
    wrong = "not-the-password-31"
    with pytest.raises(ProviderAuthError) as caught:
        await client(server.port, username=USER, password=SecretStr(wrong)).send(
            "bob@example.com", "Hi", TEXT)
    assert caught.value.status == 535
    assert wrong not in str(caught.value)
    assert server.recorder.messages == []


@pytest.mark.parametrize("where", ["rcpt", "data"])
async def test_451_is_retryable(server: Server, where: str) -> None:
    """A 451 reply (at RCPT or after DATA) is ProviderUnavailable, a retryable error."""
    reply = "451 4.3.0 Try again later"
    setattr(server.recorder, f"{where}_reply", reply)
    with pytest.raises(ProviderUnavailable) as caught:
        await client(server.port).send("carol@example.com", "Hi", TEXT)
    assert isinstance(caught.value, RetryableError)
    assert (caught.value.status, caught.value.maybe_applied) == (451, False)
    assert "Try again later" in str(caught.value)


@pytest.mark.parametrize("where", ["rcpt", "data"])
async def test_550_is_permanent(server: Server, where: str) -> None:
    """A 550 reply (at RCPT or after DATA) is ProviderRejected, a permanent error."""
    setattr(server.recorder, f"{where}_reply", "550 5.1.1 No such mailbox")
    with pytest.raises(ProviderRejected) as caught:
        await client(server.port).send("nobody@example.com", "Hi", TEXT)
    assert isinstance(caught.value, PermanentError)
    assert caught.value.status == 550
    assert str(caught.value) == "smtp: SMTP 550: 5.1.1 No such mailbox"


async def test_connection_lost_after_data_is_maybe_applied(server: Server) -> None:
    """The server took the message and hung up before answering: retryable, maybe applied."""
    server.recorder.drop_after_data = True
    with pytest.raises(ProviderUnavailable) as caught:
        await client(server.port).send("grace@example.com", "Hi", TEXT)
    assert caught.value.maybe_applied is True
    assert len(server.recorder.messages) == 1


async def test_connection_refused_is_unavailable() -> None:
    """Nothing listening is ProviderUnavailable, and nothing can have been sent."""
    with pytest.raises(ProviderUnavailable, match="cannot connect") as caught:
        await client(free_port()).send("dave@example.com", "Hi", TEXT)
    assert caught.value.maybe_applied is False


async def test_header_injection_is_refused_before_sending(server: Server) -> None:
    """A subject or recipient with a line break is rejected without contacting the server."""
    with pytest.raises(ProviderRejected, match="invalid header"):
        await client(server.port).send("eve@example.com", "Hi\r\nBcc: all@example.com", TEXT)
    with pytest.raises(ProviderRejected, match="not an e-mail address"):
        await client(server.port).send("no address here", "Hi", TEXT)
    assert server.recorder.messages == []


async def test_body_never_in_errors(server: Server) -> None:
    """A server quoting the message back still yields an error without the text."""
    server.recorder.data_reply = f"554 5.7.1 Rejected content: {TEXT}"
    with pytest.raises(ProviderError) as caught:
        await client(server.port).send("frank@example.com", "Hi", TEXT)
    assert OTP not in str(caught.value)
    assert "Rejected content: ***" in str(caught.value)
    assert caught.value.__cause__ is None
