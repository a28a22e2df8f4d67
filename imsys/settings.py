"""Settings: a TOML file plus ``IMSYS_<SECTION>__<KEY>`` environment overrides.

This is the only module that reads the environment. Every setting is documented in
``config.example.toml``.
"""

from __future__ import annotations

import os
import random
import string
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from imsys.errors import ConfigError
from imsys.provider_settings import BouncerConfig, SmsConfig, SmtpConfig, WhatsAppConfig
from imsys.validation import describe

STREAMS = ("sync", "billing", "events", "bouncer")
# What the OTP texts may use (see EventsSettings).
OTP_PLACEHOLDERS = frozenset({"user_name", "otp", "minutes"})


class RedisSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    prefix: str = "imsys"
    # Sentinel: when ``sentinels`` is set, the primary is whatever the sentinels name for
    # ``sentinel_master`` (asked again on every reconnect, so a failover is followed);
    # ``url`` then only gives the database number, username, password and TLS.
    sentinels: list[str] = Field(default_factory=list)
    sentinel_master: str = ""
    sentinel_password: SecretStr = SecretStr("")

    @field_validator("sentinels")
    @classmethod
    def _host_port(cls, value: list[str]) -> list[str]:
        for item in value:
            _split_host_port(item)
        return value

    @model_validator(mode="after")
    def _sentinel_pair(self) -> RedisSettings:
        if self.sentinels and not self.sentinel_master:
            raise ValueError("redis.sentinel_master is needed when redis.sentinels is set")
        if self.sentinel_master and not self.sentinels:
            raise ValueError("redis.sentinel_master is set but redis.sentinels is empty")
        return self

    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """``sentinels`` as (host, port) pairs."""
        return [_split_host_port(item) for item in self.sentinels]


def _split_host_port(item: str) -> tuple[str, int]:
    """``host:port`` or ``[v6-address]:port``; anything else is a configuration error."""
    host, sep, port = item.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"a sentinel must be host:port, got {item!r}")
    return host, int(port)


class DatabaseSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: SecretStr = SecretStr("postgresql://postgres@127.0.0.1:5432/imsys")
    pool_min: int = 1
    # Each router's sync batches, the outbox relay and the API hold one at a time.
    pool_max: int = 30


class HttpSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8080
    token: SecretStr = SecretStr("change-me")
    # Largest request body read (bytes); past it, 413 before the body is buffered.
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
    # Largest body of POST /api/subscribers/bulk (up to 100,000 subscribers), read
    # streamed; past it, 413.
    max_bulk_bytes: int = Field(default=64 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024)


class LogSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    level: str = "info"
    format: Literal["auto", "json", "console"] = "auto"


class StreamPolicy(BaseModel):
    """How one stream is consumed and how its failures are retried."""

    model_config = ConfigDict(extra="forbid")

    concurrency: int = Field(default=20, ge=1, le=10_000)
    # Entries read ahead of free slots (None: half the concurrency, enough to cover the
    # jobs that finish together while a read is in flight). They start the moment a slot
    # frees; at shutdown, unstarted ones go straight back to the stream.
    prefetch: int | None = Field(default=None, ge=0, le=10_000)
    max_attempts: int = Field(default=3, ge=1)
    # Explicit schedule in seconds; the last step repeats. Empty: exponential from
    # ``backoff_base`` by ``backoff_factor``, capped at ``backoff_max``.
    backoff: list[float] = Field(default_factory=list)
    backoff_base: float = Field(default=1.0, gt=0)
    backoff_factor: float = Field(default=2.0, ge=1)
    backoff_max: float = Field(default=900.0, gt=0)
    jitter: float = Field(default=0.2, ge=0, le=1)
    # A handler still running after this long is cancelled; the attempt counts and the
    # job is retried or dead-lettered with reason timeout (a job type may set its own).
    # Checked at every heartbeat, so a timeout fires up to ``engine.heartbeat_s`` late.
    job_timeout_s: float = Field(default=300.0, gt=0)

    @property
    def read_ahead(self) -> int:
        return (self.concurrency + 1) // 2 if self.prefetch is None else self.prefetch

    def retry_delay(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt + 1``, after attempt ``attempt`` failed."""
        if self.backoff:
            base = self.backoff[min(attempt, len(self.backoff)) - 1]
        else:
            base = min(self.backoff_base * self.backoff_factor ** (attempt - 1), self.backoff_max)
        # Symmetric jitter spreads a burst of failures (a router outage) over time.
        return max(0.0, base * (1 + self.jitter * (2 * random.random() - 1)))


def _default_streams() -> dict[str, StreamPolicy]:
    return {
        # Many in flight: sync_subscriber jobs wait in their router's batch (SyncSettings
        # .batch_size), so this bounds the batches, not the routers' connections.
        "sync": StreamPolicy(
            concurrency=5000, max_attempts=10, backoff=[10, 60, 300, 900], job_timeout_s=300
        ),
        "billing": StreamPolicy(concurrency=20, max_attempts=3, job_timeout_s=900),
        "events": StreamPolicy(concurrency=20, max_attempts=3, job_timeout_s=120),
        "bouncer": StreamPolicy(concurrency=4, max_attempts=1, job_timeout_s=900),
    }


class EngineSettings(BaseModel):
    """The Redis Streams engine: recovery, retention, shutdown."""

    model_config = ConfigDict(extra="forbid")

    read_block_ms: int = Field(default=1000, ge=10)
    # Reads in flight per stream: a second reader refills slots while the first waits
    # for its reply, which keeps short jobs from idling between round trips.
    readers_per_stream: int = Field(default=2, ge=1, le=8)
    # A pending entry idle this long belongs to a dead process and is claimed.
    claim_idle_s: float = Field(default=60.0, gt=0)
    # Running jobs refresh their claim this often (must be well under claim_idle_s).
    heartbeat_s: float = Field(default=15.0, gt=0)
    recover_interval_s: float = Field(default=15.0, gt=0)
    # More deliveries than this (the process kept dying on it) → dead letter.
    max_deliveries: int = Field(default=5, ge=1)
    dead_letter_days: float = Field(default=7.0, gt=0)
    history_max: int = Field(default=1000, ge=0)
    history_hours: float = Field(default=24.0, gt=0)
    grace_period_s: float = Field(default=30.0, ge=0)
    promote_interval_s: float = Field(default=0.5, gt=0)
    # How long a per-key slot (e.g. one of a router's 5) outlives a holder that died
    # (holders refresh it every heartbeat_s, so keep it a few heartbeats long).
    limit_lease_s: float = Field(default=45.0, gt=0)
    # How long a job waits for a per-key slot before it is deferred.
    limit_wait_s: float = Field(default=5.0, ge=0)


class SyncSettings(BaseModel):
    """Router sync: reconciliation, expiry sweep, router facts, circuit breaker, guard."""

    model_config = ConfigDict(extra="forbid")
    # Most sync_subscriber jobs of one router taken together over one connection
    # (imsys/sync/batch.py): one read per menu and the writes sent back to back.
    batch_size: int = Field(default=500, ge=1, le=10_000)
    # Timer-driven sync work (a reconciliation's or a sweep's jobs) waits in the outbox
    # while the sync stream holds this many entries, so that a change made through the
    # API or by a payment is never queued behind thousands of them.
    bulk_backlog: int = Field(default=2000, ge=1)

    # Entries imsys manages carry the comment "<tag>:sub=<subscriber id>"; others are
    # never touched.
    comment_tag: str = Field(default="imsys", pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    reconcile_every_s: float = Field(default=900.0, gt=0)
    expire_every_s: float = Field(default=60.0, gt=0)
    facts_every_s: float = Field(default=60.0, gt=0)
    router_timeout_s: float = Field(default=10.0, gt=0)
    # A router that stopped answering is left alone for the next pause of this schedule
    # after each failed probe (the seed's 10 s, 1 min, 5 min; the last step repeats while
    # the outage lasts), each capped by ``circuit_max_s``; its jobs wait without
    # spending attempts.
    circuit_schedule_s: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: [10.0, 60.0, 300.0], min_length=1
    )
    circuit_max_s: float = Field(default=300.0, gt=0)
    # The mass-disconnect guard trips only above this many subscribers at once (a router
    # of 3 subscribers losing 1 is not a mass disconnect).
    guard_min_count: int = Field(default=5, ge=0)
    outbox_poll_s: float = Field(default=1.0, gt=0)


def _default_templates() -> dict[str, str]:
    return {
        "invoice": "Hi {name}, your {package} bill for {period} is {amount}, due {due_date}.",
        "reminder": "Hi {name}, your {package} service expires on {expires_at} "
        "(in {days} day(s)). Pay to stay connected.",
        "payment_ack": "Thank you {name}: payment {reference} of {amount} received. "
        "Service active until {expires_at}.",
    }


class BillingSettings(BaseModel):
    """Bills, reminders, payments and the notifications they send."""

    model_config = ConfigDict(extra="forbid")

    # How often the bills timer looks for tenants whose new period has opened.
    bills_every_s: float = Field(default=3600.0, gt=0)
    # How often the reminder timer looks for subscribers nearing expiry.
    reminders_every_s: float = Field(default=300.0, gt=0)
    # Reminders go this many days before expiry, one per lead time.
    lead_times_days: list[int] = Field(default_factory=lambda: [3, 1])
    # Messages per second per channel, across every process.
    send_rate_per_s: dict[str, float] = Field(
        default_factory=lambda: {"sms": 10.0, "whatsapp": 10.0, "email": 10.0}
    )
    # Default message templates (a tenant may set its own through the API). Variables:
    # {name} {package} {period} {amount} {due_date} {expires_at} {days} {reference}.
    templates: dict[str, str] = Field(default_factory=_default_templates)
    # Channel for a subscriber with a phone number ("sms" or "whatsapp"); e-mail otherwise.
    phone_channel: Literal["sms", "whatsapp"] = "sms"


class WhatsAppTemplate(BaseModel):
    """An approved WhatsApp template: name, language, and its body parameters in order,
    each a billing template variable ({name}, {amount}...) without the braces."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=512)
    language: str = Field(default="en", min_length=2, max_length=15)
    params: list[str] = Field(default_factory=list)


def _default_wa_templates() -> dict[str, WhatsAppTemplate]:
    return {
        "invoice": WhatsAppTemplate(
            name="invoice_notice", params=["name", "package", "period", "amount", "due_date"]
        ),
        "reminder": WhatsAppTemplate(
            name="renewal_reminder", params=["name", "package", "expires_at", "days"]
        ),
        "payment_ack": WhatsAppTemplate(
            name="payment_received", params=["name", "reference", "amount", "expires_at"]
        ),
        "suspension": WhatsAppTemplate(name="service_suspended", params=["name", "package"]),
    }


class MessagingAccount(BaseModel):
    """A tenant's own provider account; a channel it leaves out uses the global one."""

    model_config = ConfigDict(extra="forbid")

    sms: SmsConfig | None = None
    whatsapp: WhatsAppConfig | None = None
    smtp: SmtpConfig | None = None


class MessagingSettings(BaseModel):
    """Delivery receipts, WhatsApp templates and windows, SMS fallback, tenant accounts."""

    model_config = ConfigDict(extra="forbid")

    # Templates for business-initiated WhatsApp messages per notification kind (a
    # tenant may set its own); outside the customer's 24-hour window only these go.
    whatsapp_templates: dict[str, WhatsAppTemplate] = Field(
        default_factory=_default_wa_templates
    )
    # A WhatsApp message neither delivered nor read this long after it was sent goes
    # again by SMS (once); per kind, "*" for the rest.
    fallback_after_s: dict[str, float] = Field(default_factory=lambda: {"*": 1800.0})
    # How often the fallback timer looks for overdue WhatsApp messages.
    fallback_every_s: float = Field(default=60.0, gt=0)
    # The base URL providers call imsys's webhooks at (Twilio signs the full URL it
    # called); empty: the URL of the request as it arrived.
    public_url: str = ""
    # Tenants' own accounts by name (tenant_messaging.account names one of them).
    accounts: dict[str, MessagingAccount] = Field(default_factory=dict)

    def fallback_after(self, kind: str) -> float:
        return self.fallback_after_s.get(kind, self.fallback_after_s.get("*", 1800.0))


class EventsSettings(BaseModel):
    """Backend events and the events stream's own jobs."""

    model_config = ConfigDict(extra="forbid")

    # Entries on <prefix>:backend-events older than this are trimmed.
    backend_events_hours: float = Field(default=24.0, gt=0)
    # The one-time password text (WhatsApp text message, e-mail body) and e-mail subject;
    # placeholders {user_name} {otp} {minutes} (left until the code expires).
    otp_message: str = (
        "Hi {user_name}, your verification code is {otp}. It expires in {minutes} minute(s)."
    )
    email_subject: str = "Your verification code"
    # An approved WhatsApp template to send instead of a text message ("" = text), its
    # language and its body variables in order (same placeholders as otp_message).
    whatsapp_template: str = ""
    whatsapp_language: str = "en"
    whatsapp_template_params: list[str] = Field(default_factory=lambda: ["{user_name}", "{otp}"])
    # Also put the code in the copy-code button (Meta's authentication templates need it).
    whatsapp_copy_code: bool = False
    # While a channel is stopped (service_control), its jobs come back this often.
    channel_hold_s: float = Field(default=1.5, gt=0, le=60)

    @model_validator(mode="after")
    def _otp_templates(self) -> EventsSettings:
        # A typo in a placeholder would fail every OTP at send time: catch it at start-up.
        texts = {
            "otp_message": self.otp_message,
            "email_subject": self.email_subject,
            **{
                f"whatsapp_template_params.{i}": p
                for i, p in enumerate(self.whatsapp_template_params)
            },
        }
        used: dict[str, set[str]] = {}
        for key, text in texts.items():
            try:
                used[key] = {n for _, n, _, _ in string.Formatter().parse(text) if n is not None}
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
            if unknown := used[key] - OTP_PLACEHOLDERS:
                raise ValueError(f"{key}: unknown placeholder(s) {sorted(unknown)}")
        if "otp" not in used["otp_message"]:
            raise ValueError("otp_message must contain {otp}")
        in_params = any("otp" in v for k, v in used.items() if k.startswith("whatsapp_"))
        if self.whatsapp_template and not (self.whatsapp_copy_code or in_params):
            raise ValueError("whatsapp_template_params must pass {otp} (or set whatsapp_copy_code)")
        return self


class DemoSettings(BaseModel):
    """Demo mode (``make run``): simulators in-process and a demo tenant that syncs to them."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    # Simulated routers, and subscribers spread over them.
    routers: int = Field(default=2, ge=1, le=10)
    subscribers: int = Field(default=200, ge=0, le=5000)
    # Demo subscribers are created at this pace (per second; 0: all at once).
    create_per_s: float = Field(default=25.0, ge=0)
    # This many subscribers expire a few minutes after start (the sweep suspends them).
    expiring: int = Field(default=5, ge=0)
    # A random subscriber changes package or suspension this often (seconds; 0: never).
    churn_every_s: float = Field(default=3.0, ge=0)
    # Router facts are read this often in demo mode, so an outage shows within seconds.
    facts_every_s: float = Field(default=5.0, gt=0)
    # Longest pause for a router that stays down, in demo mode (heals quickly after).
    circuit_max_s: float = Field(default=10.0, gt=0)


class RecoverySettings(BaseModel):
    """Re-publication of intents from PostgreSQL (imsys/intents.py): Redis is a cache of work."""

    model_config = ConfigDict(extra="forbid")

    # Re-publish when a stream's consumer group had to be created (Redis came back empty)
    # and run the periodic sweep. Off only for tests that share one database.
    enabled: bool = True
    # How often the sweep looks for intents with no job waiting (once per period across
    # every process).
    sweep_every_s: float = Field(default=60.0, gt=0)
    # The sweep leaves intents younger than this to the outbox relay and running jobs.
    intent_age_s: float = Field(default=300.0, ge=0)
    # An intent the sweep had to re-publish (its job was lost or dead-lettered) is not
    # re-published again by the sweep for this long: a job that keeps failing is not
    # retried every sweep.
    republish_cooldown_s: float = Field(default=3600.0, ge=0)


class BouncerBatchingSettings(BaseModel):
    """Bouncer greedy batching (imsys/bouncer): batch size, capacity, cadence, rate limit."""

    model_config = ConfigDict(extra="forbid")

    # Bouncer batches outstanding (creating or processing) at once, per check type.
    capacity: int = Field(default=15, ge=1, le=1000)
    # E-mails per Bouncer batch (Bouncer takes at most 100,000).
    batch_size: int = Field(default=10_000, ge=1, le=100_000)
    create_every_s: float = Field(default=5.0, gt=0)
    status_every_s: float = Field(default=30.0, gt=0)
    # Bouncer's limit on calls per minute, across every process: status checks and
    # downloads may use all of it; batch creation stops at rate_limit_stop, which keeps
    # room for the calls that finish work.
    rate_limit_per_min: int = Field(default=200, ge=1)
    rate_limit_stop: int = Field(default=180, ge=1)
    # Bouncer's separate limit on batch creations per minute.
    create_limit_per_min: int = Field(default=60, ge=1)
    # A create still 'creating' after this long was cut short (process died, answer
    # lost): its e-mails go back to pending. Must exceed bouncer.timeout.
    creating_timeout_s: float = Field(default=300.0, gt=0)
    # A Bouncer batch not completed after this long is marked failed (with an alert).
    batch_timeout_s: float = Field(default=86_400.0, gt=0)
    # Downloads of a completed batch tried this many times before it is marked failed.
    max_download_attempts: int = Field(default=5, ge=1)
    # Most e-mails one user batch may hold.
    max_user_batch: int = Field(default=1_000_000, ge=1)

    @model_validator(mode="after")
    def _stop_below_limit(self) -> BouncerBatchingSettings:
        if self.rate_limit_stop > self.rate_limit_per_min:
            raise ValueError("rate_limit_stop must not exceed rate_limit_per_min")
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="IMSYS_",
        env_nested_delimiter="__",
        extra="forbid",
    )

    redis: RedisSettings = RedisSettings()
    database: DatabaseSettings = DatabaseSettings()
    http: HttpSettings = HttpSettings()
    log: LogSettings = LogSettings()
    engine: EngineSettings = EngineSettings()
    sync: SyncSettings = SyncSettings()
    events: EventsSettings = EventsSettings()
    billing: BillingSettings = BillingSettings()
    messaging: MessagingSettings = MessagingSettings()
    bouncer: BouncerConfig = BouncerConfig()
    bouncer_batching: BouncerBatchingSettings = BouncerBatchingSettings()
    sms: SmsConfig = SmsConfig()
    whatsapp: WhatsAppConfig = WhatsAppConfig()
    smtp: SmtpConfig = SmtpConfig()
    demo: DemoSettings = DemoSettings()
    recovery: RecoverySettings = RecoverySettings()
    streams: dict[str, StreamPolicy] = Field(default_factory=_default_streams)

    @field_validator("streams", mode="before")
    @classmethod
    def _merge_stream_defaults(cls, value: Any) -> Any:
        """A config that sets one stream's key keeps the defaults of the others."""
        if not isinstance(value, dict):
            return value
        unknown = set(value) - set(STREAMS)
        if unknown:
            raise ValueError(f"unknown stream(s) {sorted(unknown)}; streams are {STREAMS}")
        merged: dict[str, Any] = {}
        for name, default in _default_streams().items():
            given = value.get(name, {})
            if isinstance(given, StreamPolicy):
                given = given.model_dump(exclude_unset=True)
            # Anything but a table is left for pydantic to reject with a clear message.
            merged[name] = {**default.model_dump(), **given} if isinstance(given, dict) else given
        return merged

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file arrives as init kwargs; the environment overrides it.
        return (env_settings, init_settings)


def config_path_from_env() -> str | None:
    return os.environ.get("IMSYS_CONFIG") or None


def load_settings(path: str | Path | None = None) -> Settings:
    """Read ``path`` (or ``$IMSYS_CONFIG``), then the environment on top."""
    path = path or config_path_from_env()
    data: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration: {describe(exc, whole='settings')}") from None
    except ValueError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None
