"""What the admin API (and the demo) may write into the network model: validated here,
before anything reaches PostgreSQL or a router."""

from __future__ import annotations

import re
import ssl
from datetime import datetime
from decimal import Decimal
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from imsys.routeros.tls import normalize_fingerprint

ASCII_PRINTABLE = r"^[\x21-\x7e]+$"


# A subscriber's sync state: a change waits (pending), a job works on it (syncing), an
# attempt failed and another comes (retrying), done (synced), or no attempt will come
# (error: dead-lettered, a permanent failure, or blocked by an unmanaged entry).
SYNC_STATES = ("pending", "syncing", "retrying", "synced", "error")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class TenantIn(Strict):
    name: str = Field(min_length=1, max_length=200)
    time_zone: str = "UTC"
    grace_period_s: int = Field(default=0, ge=0, le=90 * 86400)
    max_disconnect_share: float = Field(default=0.2, gt=0, le=1)
    # An inactive tenant is not swept, billed or reminded; its jobs are refused.
    active: bool = True

    @field_validator("time_zone")
    @classmethod
    def _zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r}") from None
        return v


def _tls_fingerprint(v: str | None) -> str | None:
    return None if v is None else normalize_fingerprint(v)


def _tls_ca(v: str | None) -> str | None:
    if v is None:
        return None
    try:
        ssl.create_default_context(cadata=v)
    except (ssl.SSLError, ValueError):
        raise ValueError("tls_ca is not a PEM certificate") from None
    return v


class RouterIn(Strict):
    tenant_id: int
    name: str = Field(min_length=1, max_length=100)
    host: str = Field(min_length=1, max_length=255)
    port: int = Field(default=8728, ge=1, le=65535)
    username: str = Field(min_length=1, max_length=100, pattern=ASCII_PRINTABLE)
    password: str = Field(default="", max_length=200, pattern=r"^[\x20-\x7e]*$")
    use_tls: bool = False
    max_concurrency: int = Field(default=5, ge=1, le=50)
    # How to trust the router's certificate (routeros/tls.py): the usual case is its
    # SHA-256 pinned; or a CA (PEM); or, explicitly, no verification at all.
    tls_fingerprint: str | None = Field(default=None, max_length=200)
    tls_ca: str | None = Field(default=None, max_length=20000)
    tls_verify: bool = True

    _fingerprint = field_validator("tls_fingerprint")(_tls_fingerprint)
    _ca = field_validator("tls_ca")(_tls_ca)

    @model_validator(mode="after")
    def _tls(self) -> RouterIn:
        if not self.tls_verify and (self.tls_fingerprint or self.tls_ca):
            raise ValueError("tls_verify false excludes tls_fingerprint and tls_ca")
        return self


class TenantPatch(Strict):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    time_zone: str | None = None
    grace_period_s: int | None = Field(default=None, ge=0, le=90 * 86400)
    max_disconnect_share: float | None = Field(default=None, gt=0, le=1)
    active: bool | None = None

    @field_validator("time_zone")
    @classmethod
    def _zone(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                ZoneInfo(v)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"unknown time zone {v!r}") from None
        return v


class RouterPatch(Strict):
    """How imsys reaches a router; its tenant and its subscribers stay."""

    name: str | None = Field(default=None, min_length=1, max_length=100)
    host: str | None = Field(default=None, min_length=1, max_length=255)
    port: int | None = Field(default=None, ge=1, le=65535)
    username: str | None = Field(
        default=None, min_length=1, max_length=100, pattern=ASCII_PRINTABLE
    )
    password: str | None = Field(default=None, max_length=200, pattern=r"^[\x20-\x7e]*$")
    use_tls: bool | None = None
    max_concurrency: int | None = Field(default=None, ge=1, le=50)
    tls_fingerprint: str | None = Field(default=None, max_length=200)
    tls_ca: str | None = Field(default=None, max_length=20000)
    tls_verify: bool | None = None

    _fingerprint = field_validator("tls_fingerprint")(_tls_fingerprint)
    _ca = field_validator("tls_ca")(_tls_ca)


_RATE = r"\d+[kMG]?"
_PAIR = rf"{_RATE}/{_RATE}"
_TIME = r"\d+[smhdw]?"
# rx/tx [rx-burst/tx-burst [rx-threshold/tx-threshold [rx-time/tx-time [priority
# [rx-min/tx-min]]]]] (../shared/NOTES.md, RouterOS section).
RATE_LIMIT = re.compile(
    rf"{_PAIR}(?: {_PAIR}(?: {_PAIR}(?: {_TIME}/{_TIME}(?: [1-8](?: {_PAIR})?)?)?)?)?"
)
RATE_LIMIT_FORMAT = (
    "rx/tx [rx-burst/tx-burst [rx-threshold/tx-threshold [rx-time/tx-time [priority "
    "[rx-min/tx-min]]]]], rates with an optional k/M/G suffix, times in seconds, "
    "priority 1-8, e.g. 10M/10M or 10M/10M 20M/20M 8M/8M 10/10 8"
)


def check_rate_limit(value: str | None) -> str | None:
    """``value`` when it is a RouterOS rate-limit (None: the package sets no rate)."""
    if value is not None and not RATE_LIMIT.fullmatch(value):
        raise ValueError(f"rate_limit {value!r} is not in RouterOS's format: {RATE_LIMIT_FORMAT}")
    return value


class PackageIn(Strict):
    tenant_id: int
    name: str = Field(min_length=1, max_length=100)
    profile: str = Field(min_length=1, max_length=100, pattern=r"^[\x20-\x7e]+$")
    rate_limit: str | None = Field(default=None, max_length=100)
    price: Decimal = Field(ge=0, max_digits=12, decimal_places=2)
    period_days: int = Field(ge=1, le=366)

    _rate = field_validator("rate_limit")(check_rate_limit)

    @model_validator(mode="after")
    def _builtin(self) -> PackageIn:
        if self.profile == "default" and self.rate_limit is not None:
            raise ValueError(
                "profile 'default' is built into every router and imsys never changes it: "
                "give the package a profile of its own to set a rate_limit"
            )
        return self


class PackagePatch(Strict):
    name: str | None = Field(default=None, min_length=1, max_length=100)
    rate_limit: str | None = Field(default=None, max_length=100)
    price: Decimal | None = Field(default=None, ge=0, max_digits=12, decimal_places=2)
    period_days: int | None = Field(default=None, ge=1, le=366)
    # End the package's live sessions so the new rate applies now, not at the next login.
    apply_now: bool = False

    _rate = field_validator("rate_limit")(check_rate_limit)


class SubscriberIn(Strict):
    tenant_id: int
    router_id: int
    package_id: int
    # RouterOS's API is ASCII-only: refuse anything else here, before it reaches a router.
    username: str = Field(min_length=1, max_length=64, pattern=ASCII_PRINTABLE)
    password: str = Field(min_length=1, max_length=64, pattern=ASCII_PRINTABLE)
    service: Literal["pppoe", "hotspot"]
    is_suspended: bool = False
    expires_at: datetime | None = None
    phone: str | None = Field(default=None, max_length=32, pattern=r"^\+?[0-9]{6,15}$")
    email: str | None = Field(default=None, max_length=254, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")

    @field_validator("expires_at")
    @classmethod
    def _aware(cls, v: datetime | None) -> datetime | None:
        if v is not None and v.tzinfo is None:
            raise ValueError("expires_at needs a time zone offset (it is an instant, e.g. ...Z)")
        return v


class SubscriberPatch(Strict):
    router_id: int | None = None
    package_id: int | None = None
    username: str | None = Field(default=None, min_length=1, max_length=64, pattern=ASCII_PRINTABLE)
    password: str | None = Field(default=None, min_length=1, max_length=64, pattern=ASCII_PRINTABLE)
    service: Literal["pppoe", "hotspot"] | None = None
    is_suspended: bool | None = None
    expires_at: datetime | None = None
    phone: str | None = Field(default=None, max_length=32, pattern=r"^\+?[0-9]{6,15}$")
    email: str | None = Field(default=None, max_length=254, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")

    _aware = field_validator("expires_at")(SubscriberIn._aware.__func__)  # type: ignore[attr-defined]
