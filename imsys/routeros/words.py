"""API words built from our arguments, checked before anything is sent; value helpers.

librouteros encodes words as strict ASCII and fails in the middle of a sentence on the
first other character. Every word of a command is therefore checked here first, so a
command is either sent whole or not at all.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Final

from imsys.routeros.errors import RouterInputError

_MENU: Final = re.compile(r"(?:/[A-Za-z0-9][A-Za-z0-9_-]*)+")
# Attribute names: `name`, `max-limit`, `.id`, `.proplist`. An `=` or `,` in a name
# would change what the router reads (`=a=b=c` is attribute a with value "b=c").
_NAME: Final = re.compile(r"\.?[A-Za-z0-9][A-Za-z0-9_.-]*")

_TRUE: Final = frozenset({"true", "yes"})
_FALSE: Final = frozenset({"false", "no"})

_UNITS: Final = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}
_UNIT_UPTIME: Final = re.compile(
    r"(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+)s)?(?:(\d+)ms)?"
)
# RouterOS 6 prints some durations as `1w2d03:04:05` or `03:04:05`.
_CLOCK_UPTIME: Final = re.compile(r"(?:(\d+)w)?(?:(\d+)d)?(\d+):(\d{2}):(\d{2})")


def check_ascii(value: str, what: str) -> str:
    """Return `value` if the API can carry it; otherwise raise RouterInputError.

    The message names `what` and the position, never the value (it may be a password).
    """
    if not isinstance(value, str):
        raise RouterInputError(f"{what} must be a string, not {type(value).__name__}")
    if not value.isascii():
        position = next(i for i, char in enumerate(value) if not char.isascii())
        raise RouterInputError(
            f"{what} has a non-ASCII character at position {position}; "
            "the RouterOS API client sends ASCII only"
        )
    return value


def menu_path(menu: str) -> str:
    """`/ppp/secret` (a trailing slash is dropped); anything else is RouterInputError."""
    check_ascii(menu, "menu")
    path = menu.rstrip("/")
    if not _MENU.fullmatch(path):
        raise RouterInputError(f"menu {menu!r} is not a RouterOS path like /ppp/secret")
    return path


def check_name(name: str, what: str = "attribute name") -> str:
    check_ascii(name, what)
    if not _NAME.fullmatch(name):
        raise RouterInputError(f"{what} {name!r} is not a RouterOS attribute name")
    return name


def attribute_words(fields: Mapping[str, str]) -> list[str]:
    """`=name=value` words for add/set."""
    return [
        f"={check_name(name)}={check_ascii(value, f'value of {name}')}"
        for name, value in fields.items()
    ]


def query_words(where: Mapping[str, str] | None) -> list[str]:
    """`?name=value` words; RouterOS ANDs the conditions of one print."""
    if not where:
        return []
    return [
        f"?{check_name(name)}={check_ascii(value, f'query value of {name}')}"
        for name, value in where.items()
    ]


def query_words_any(tests: Iterable[tuple[str, str]]) -> list[str]:
    """`?name=value` words ORed together: one `?#` word with a `|` per extra test."""
    words = [
        f"?{check_name(name)}={check_ascii(value, f'query value of {name}')}"
        for name, value in tests
    ]
    if len(words) > 1:
        words.append("?#" + "|" * (len(words) - 1))
    return words


def proplist_words(proplist: Iterable[str] | None) -> list[str]:
    if proplist is None:
        return []
    names = [check_name(name, "proplist name") for name in proplist]
    if not names:
        raise RouterInputError("proplist is empty: pass None to get every field")
    return [f"=.proplist={','.join(names)}"]


def id_list(ids: Iterable[str]) -> str:
    """Ids joined for `=.id=`; a comma inside one id would name other items."""
    checked = [check_ascii(item_id, "item id") for item_id in ids]
    for item_id in checked:
        if not item_id or "," in item_id:
            raise RouterInputError(f"item id {item_id!r} is empty or holds a comma")
    return ",".join(checked)


def is_true(value: str) -> bool:
    """RouterOS booleans: print answers `true`/`false`; `yes`/`no` are accepted as sent.

    Anything else is a ValueError rather than a guess.
    """
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"not a RouterOS boolean: {value!r}")


def parse_uptime(text: str) -> int:
    """Whole seconds in a RouterOS duration: `1w2d3h4m5s`, `5s200ms`, `1d03:04:05`.

    Milliseconds are dropped. An empty or malformed duration is a ValueError.
    """
    value = text.strip()
    match = (_CLOCK_UPTIME.fullmatch(value) or _UNIT_UPTIME.fullmatch(value)) if value else None
    if match is None:
        raise ValueError(f"not a RouterOS duration: {text!r}")
    # Both patterns start with weeks, days, hours, minutes, seconds; milliseconds are cut.
    weeks, days, hours, minutes, seconds = (int(part or 0) for part in match.groups()[:5])
    return weeks * _UNITS["w"] + days * _UNITS["d"] + hours * 3600 + minutes * 60 + seconds
