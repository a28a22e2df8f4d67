"""Message templates: ``{variable}`` placeholders; an unknown one stays as written."""

from __future__ import annotations

import string

VARIABLES = ("name", "package", "period", "amount", "due_date", "expires_at", "days", "reference")


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
