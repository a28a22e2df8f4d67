"""Provider settings (Bouncer, SMS, WhatsApp, SMTP): part of the settings, read by the adapters.

Credentials are `SecretStr` so they never show in a repr or a log. The SMS and WhatsApp
defaults point at the gateway simulator with its published demo credentials
(``imsys.sim.gateway.DEFAULT_*``, port 8092) and SMTP at a relay on localhost, so a demo
works untouched and a production config has to name its providers explicitly. Bouncer
defaults to the real API with no key, as the design card's example config does.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

__all__ = [
    "SMS_PLACEHOLDERS",
    "BouncerConfig",
    "SmsConfig",
    "SmtpConfig",
    "WhatsAppConfig",
]

# The values a body template may use; anything else is a typo caught at start-up.
SMS_PLACEHOLDERS = frozenset({"to", "message", "sender", "username", "status_callback"})
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _http_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError("must be an http:// or https:// URL")
    return value.rstrip("/")


HttpUrlText = Annotated[str, AfterValidator(_http_url)]


class BouncerConfig(BaseModel):
    """Bouncer API v1.1 (batch e-mail verification).

    - ``base_url`` = ``https://api.usebouncer.com``; the simulator
      (``python -m imsys sim bouncer``) listens on ``http://127.0.0.1:8091`` with the key
      ``bouncer-sim-key``.
    - ``api_key`` = empty: every call fails with `ProviderAuthError` until one is set.
    - ``timeout`` = 30 s for a whole call, ``connect_timeout`` = 10 s of it for the
      connection; ``download_timeout`` = 600 s for a results download (100,000 records are
      tens of MB).
    """

    model_config = ConfigDict(extra="forbid")

    base_url: HttpUrlText = "https://api.usebouncer.com"
    api_key: SecretStr = SecretStr("")
    timeout: float = Field(default=30.0, gt=0)
    connect_timeout: float = Field(default=10.0, gt=0)
    download_timeout: float = Field(default=600.0, gt=0)


class SmsConfig(BaseModel):
    """An SMS gateway reached with one HTTP POST per message.

    The request is built from ``body``, a template whose string values may use
    ``{to}``, ``{message}``, ``{sender}`` and ``{username}``; a field whose whole value is
    one placeholder with an empty value (no ``sender`` configured) is left out. ``format``
    sends it as a form or as JSON (JSON templates may nest). ``message_id_path`` finds the
    provider's id in the JSON answer (dots between keys, numbers index lists). When
    ``status_path`` is set, the status found there must be one of ``accepted_statuses``;
    one of ``retryable_statuses`` raises `ProviderUnavailable`, any other
    `ProviderRejected` with that status.

    ``auth``: ``header`` sends ``secret`` in the header ``auth_header``; ``basic`` logs in
    as ``username`` with ``secret`` as the password; ``bearer`` sends ``secret`` as a
    bearer token; ``none`` sends nothing.

    Defaults: Africa's Talking against the gateway simulator (``url``
    ``http://127.0.0.1:8092/version1/messaging``, user ``sandbox``, key ``at-sim-key``).
    Production Africa's Talking: ``url = "https://api.africastalking.com/version1/messaging"``
    with your username and API key. Twilio::

        name = "twilio"
        url = "https://api.twilio.com/2010-04-01/Accounts/<SID>/Messages.json"
        auth = "basic"
        username = "<SID>"
        secret = "<auth token>"
        sender = "+15005550006"
        body = {To = "{to}", From = "{sender}", Body = "{message}"}
        message_id_path = "sid"
        status_path = ""

    ``timeout`` = 15 s for a whole call, ``connect_timeout`` = 5 s of it.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = "africastalking"
    url: HttpUrlText = "http://127.0.0.1:8092/version1/messaging"
    auth: Literal["header", "basic", "bearer", "none"] = "header"
    auth_header: str = "apiKey"
    username: str = "sandbox"
    secret: SecretStr = SecretStr("at-sim-key")
    sender: str = ""
    format: Literal["form", "json"] = "form"
    body: dict[str, Any] = Field(
        default_factory=lambda: {
            "username": "{username}",
            "to": "{to}",
            "message": "{message}",
            "from": "{sender}",
        }
    )
    message_id_path: str = "SMSMessageData.Recipients.0.messageId"
    status_path: str | None = "SMSMessageData.Recipients.0.status"
    accepted_statuses: list[str] = Field(default_factory=lambda: ["Success", "Sent", "Queued"])
    retryable_statuses: list[str] = Field(
        default_factory=lambda: ["InternalServerError", "GatewayError"]
    )
    # Statuses that mean the account has no credit left: the channel stops for the
    # tenant (messages held) instead of the message failing.
    out_of_credit_statuses: list[str] = Field(default_factory=lambda: ["InsufficientBalance"])
    timeout: float = Field(default=15.0, gt=0)
    connect_timeout: float = Field(default=5.0, gt=0)
    # Delivery reports. Africa's Talking signs nothing: its callback URL carries this
    # token (``/webhooks/africastalking?token=...``), and the route is off while it is
    # empty. Twilio signs with the auth token (``secret``); ``status_callback`` is the
    # ``{status_callback}`` a Twilio body passes as ``StatusCallback``.
    webhook_token: SecretStr = SecretStr("")
    status_callback: str = ""

    @field_validator("status_path")
    @classmethod
    def _empty_means_none(cls, value: str | None) -> str | None:
        # TOML has no null: an empty string is how a config switches the check off.
        return value or None

    @model_validator(mode="after")
    def _check_template(self) -> SmsConfig:
        used = _placeholders(self.body, form=self.format == "form")
        unknown = used - SMS_PLACEHOLDERS
        if unknown:
            raise ValueError(
                f"body uses unknown placeholder(s) {sorted(unknown)}; "
                f"known are {sorted(SMS_PLACEHOLDERS)}"
            )
        if not {"to", "message"} <= used:
            raise ValueError("body must use both {to} and {message}")
        if self.auth != "none" and not self.secret.get_secret_value():
            raise ValueError(f"auth {self.auth!r} needs a secret")
        if self.auth == "header" and not self.auth_header:
            raise ValueError("auth 'header' needs auth_header (the header's name)")
        if self.auth == "basic" and not self.username:
            raise ValueError("auth 'basic' needs a username")
        if not self.message_id_path:
            raise ValueError("message_id_path must not be empty")
        return self


def _placeholders(value: Any, *, form: bool, top: bool = True) -> set[str]:
    """The placeholders a body template uses; refuses what a form cannot carry."""
    if isinstance(value, str):
        return set(_PLACEHOLDER.findall(value))
    if form and not top:
        raise ValueError("a form body maps names to strings only")
    if isinstance(value, dict | list):
        items = value.values() if isinstance(value, dict) else value
        return set().union(*(_placeholders(item, form=form, top=False) for item in items))
    return set()  # numbers, booleans, null: sent as they are


class WhatsAppConfig(BaseModel):
    """The WhatsApp Cloud API (or anything speaking its ``/{phone_number_id}/messages``).

    Defaults: the gateway simulator, ``base_url`` ``http://127.0.0.1:8092/v21.0`` with token
    ``whatsapp-sim-token``. Production: ``base_url = "https://graph.facebook.com/v21.0"``,
    a system-user access token and the sender's phone number id. ``timeout`` = 15 s for a
    whole call, ``connect_timeout`` = 5 s of it.
    """

    model_config = ConfigDict(extra="forbid")

    base_url: HttpUrlText = "http://127.0.0.1:8092/v21.0"
    token: SecretStr = SecretStr("whatsapp-sim-token")
    phone_number_id: str = "100000000000001"
    timeout: float = Field(default=15.0, gt=0)
    connect_timeout: float = Field(default=5.0, gt=0)
    # Webhooks (/webhooks/whatsapp): the app secret signs every POST (X-Hub-Signature-256)
    # and the verify token answers Meta's GET handshake; the route is off while either is
    # empty.
    app_secret: SecretStr = SecretStr("")
    verify_token: SecretStr = SecretStr("")

    @field_validator("phone_number_id")
    @classmethod
    def _digits(cls, value: str) -> str:
        # It becomes a path segment of every call.
        if not value.isdigit():
            raise ValueError("must be the numeric phone number id")
        return value


class SmtpConfig(BaseModel):
    """An SMTP relay for e-mail (one connection per message).

    Defaults: ``127.0.0.1:25`` without login; ``starttls`` None upgrades when the server
    offers STARTTLS, True requires it, False never tries; ``use_tls`` connects with TLS
    from the start (port 465). ``username`` empty means no login. ``sender`` is the From
    address (``imsys <noreply@localhost>``) and gives the Message-ID its domain.
    ``timeout`` = 30 s per SMTP command. ``local_hostname`` is the name sent in EHLO (the
    machine's FQDN when unset, which costs a DNS lookup per connection).
    """

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=25, ge=1, le=65535)
    username: str = ""
    password: SecretStr = SecretStr("")
    starttls: bool | None = None
    use_tls: bool = False
    validate_certs: bool = True
    sender: str = "imsys <noreply@localhost>"
    timeout: float = Field(default=30.0, gt=0)
    local_hostname: str | None = None

    @model_validator(mode="after")
    def _tls_modes(self) -> SmtpConfig:
        if self.use_tls and self.starttls:
            raise ValueError("use_tls and starttls exclude each other")
        if "@" not in self.sender:
            raise ValueError("sender must contain an e-mail address")
        return self
