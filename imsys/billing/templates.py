"""Message templates: ``{variable}`` placeholders; an unknown one stays as written."""

from __future__ import annotations

import string

import pydantic

VARIABLES = ("name", "package", "period", "amount", "due_date", "expires_at", "days", "reference")


# The templates a tenant may set (each has a configured default).
NAMES = ("invoice", "reminder", "payment_ack")


class _Keep(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def render(template: str, **values: str) -> str:
    return string.Formatter().vformat(template, (), _Keep(values))


def check(template: str) -> str:
    """Refuse a template with a variable nobody fills (a typo would reach customers)."""
    names = {field for _, field, _, _ in string.Formatter().parse(template) if field}
    unknown = sorted(names - set(VARIABLES))
    if unknown:
        raise ValueError(f"unknown variable(s) {unknown}; known: {list(VARIABLES)}")
    return template


class TemplateIn(pydantic.BaseModel):
    """A tenant's template as the admin API takes it."""

    model_config = pydantic.ConfigDict(extra="forbid")

    body: str = pydantic.Field(min_length=1, max_length=1000)

    @pydantic.field_validator("body")
    @classmethod
    def _known_variables(cls, v: str) -> str:
        return check(v)


class WhatsAppTemplateIn(pydantic.BaseModel):
    """A tenant's approved WhatsApp template for one kind; params are variables, in order."""

    model_config = pydantic.ConfigDict(extra="forbid")

    name: str = pydantic.Field(min_length=1, max_length=512, pattern=r"^[a-z0-9_]+$")
    language: str = pydantic.Field(default="en", min_length=2, max_length=15)
    params: list[str] = pydantic.Field(default_factory=list, max_length=20)

    @pydantic.field_validator("params")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - set(VARIABLES))
        if unknown:
            raise ValueError(f"unknown variable(s) {unknown}; known: {list(VARIABLES)}")
        return v


# The kinds a WhatsApp template may be set for.
KINDS = ("invoice", "reminder", "payment_ack", "suspension")


class MessagingIn(pydantic.BaseModel):
    """A tenant's messaging: its account's name (None: the global one), SMS fallback."""

    model_config = pydantic.ConfigDict(extra="forbid")

    account: str | None = pydantic.Field(default=None, min_length=1, max_length=100)
    sms_fallback: bool = True
