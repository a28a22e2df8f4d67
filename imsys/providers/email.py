"""E-mail over SMTP (aiosmtplib), one connection per message.

SMTP replies are classified the way SMTP means them: 4xx is temporary (retry), 5xx is
final. Errors never contain the password or the message text.
"""

from __future__ import annotations

from email.message import EmailMessage
from email.utils import formatdate, make_msgid, parseaddr
from typing import Final

import aiosmtplib

from imsys.provider_settings import SmtpConfig
from imsys.providers._http import redact, shorten
from imsys.providers.errors import (
    ProviderAuthError,
    ProviderError,
    ProviderRejected,
    ProviderUnavailable,
)

__all__ = ["SmtpClient"]

PROVIDER: Final = "smtp"
# 530 "authentication required", 534/535 "credentials invalid", 538 "encryption required
# for this mechanism": all fixed in the config, not by retrying.
_AUTH_CODES: Final = frozenset({530, 534, 535, 538})


class SmtpClient:
    """Sends e-mail through the relay `SmtpConfig` names."""

    def __init__(self, config: SmtpConfig) -> None:
        self._config = config
        domain = parseaddr(config.sender)[1].rpartition("@")[2]
        self._msgid_domain = domain or "localhost"

    async def send(
        self, to: str, subject: str, body_text: str, body_html: str | None = None
    ) -> str:
        """Send one message to ``to``; return its Message-ID header (``<...@domain>``)."""
        message = self._build(to, subject, body_text, body_html)
        message_id = str(message["Message-ID"])
        cfg = self._config
        password = cfg.password.get_secret_value()
        hidden = tuple(s for s in (password, body_text, body_html or "") if s)
        smtp = aiosmtplib.SMTP(
            hostname=cfg.host, port=cfg.port, timeout=cfg.timeout, use_tls=cfg.use_tls,
            start_tls=cfg.starttls, validate_certs=cfg.validate_certs,
            local_hostname=cfg.local_hostname,
            username=cfg.username or None, password=password if cfg.username else None,
        )
        sending = False
        try:
            await smtp.connect()
            try:
                sending = True
                await smtp.send_message(message)
            finally:
                await _quit(smtp)
        except (aiosmtplib.SMTPResponseException, aiosmtplib.SMTPRecipientsRefused) as exc:
            # Not chained: the server's reply may quote the message, and a logged traceback
            # would print the cause unredacted. Its code and text are in ours.
            raise _translate(exc, sending=sending, hidden=hidden) from None
        except aiosmtplib.SMTPException as exc:
            raise _translate(exc, sending=sending, hidden=hidden) from exc
        except OSError as exc:
            raise ProviderUnavailable(PROVIDER, "connection failed",
                                      detail=_detail(exc, hidden), maybe_applied=sending) from exc
        return message_id

    def _build(self, to: str, subject: str, body_text: str, body_html: str | None) -> EmailMessage:
        message = EmailMessage()
        try:
            message["From"] = self._config.sender
            message["To"] = to
            message["Subject"] = subject
        except ValueError as exc:
            # The email package refuses line breaks in headers: header injection.
            raise ProviderRejected(PROVIDER, "message not sent",
                                   detail=f"invalid header: {shorten(str(exc), 120)}") from None
        if "@" not in parseaddr(to)[1]:
            raise ProviderRejected(PROVIDER, "message not sent",
                                   detail="the recipient is not an e-mail address")
        message["Date"] = formatdate(localtime=False)
        message["Message-ID"] = make_msgid(domain=self._msgid_domain)
        message.set_content(body_text)
        if body_html is not None:
            message.add_alternative(body_html, subtype="html")
        return message


async def _quit(smtp: aiosmtplib.SMTP) -> None:
    """Say QUIT; once the message is handed over (or refused), how the session ends is moot."""
    try:
        if smtp.is_connected:
            await smtp.quit()
    except (aiosmtplib.SMTPException, OSError):
        pass
    finally:
        smtp.close()


def _detail(exc: BaseException, hidden: tuple[str, ...]) -> str:
    text = str(exc)
    return shorten(redact(f"{type(exc).__name__}: {text}" if text else type(exc).__name__,
                          hidden))


def _translate(exc: aiosmtplib.SMTPException, *, sending: bool,
               hidden: tuple[str, ...]) -> ProviderError:
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        # One recipient per message, so one refusal; its code says temporary or final.
        refusals = exc.recipients
        if refusals:
            exc = refusals[0]
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        code = exc.code
        what = f"SMTP {code}"
        detail = shorten(redact(exc.message, hidden)) or None
        if code in _AUTH_CODES:
            return ProviderAuthError(PROVIDER, what, status=code, detail=detail)
        if 400 <= code < 500:
            return ProviderUnavailable(PROVIDER, what, status=code, detail=detail)
        if code >= 500:
            return ProviderRejected(PROVIDER, what, status=code, detail=detail)
        return ProviderUnavailable(PROVIDER, f"{what} unexpected", status=code, detail=detail)
    if isinstance(exc, aiosmtplib.SMTPNotSupported):
        # The server lacks what the config asks for (STARTTLS, AUTH): retrying won't help.
        return ProviderRejected(PROVIDER, "not supported by the server",
                                detail=_detail(exc, hidden))
    if isinstance(exc, aiosmtplib.SMTPConnectError | aiosmtplib.SMTPConnectTimeoutError):
        return ProviderUnavailable(PROVIDER, "cannot connect", detail=_detail(exc, hidden))
    if isinstance(exc, aiosmtplib.SMTPTimeoutError):
        return ProviderUnavailable(PROVIDER, "timed out", detail=_detail(exc, hidden),
                                   maybe_applied=sending)
    # Disconnected mid-session, or anything else aiosmtplib raises.
    return ProviderUnavailable(PROVIDER, "connection failed", detail=_detail(exc, hidden),
                               maybe_applied=sending)
