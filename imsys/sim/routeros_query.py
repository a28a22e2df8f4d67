"""Print query words (`?name=x`, `?-name`, `?#|!`): RouterOS's small stack machine.

Each test word pushes one boolean; `?#` words pop and push with `|`, `&`, `!`, `.`
(duplicate) and a digit (push a copy of that stack slot, counted from the bottom).
An item matches when every value left on the stack is true; no query matches all.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence

from imsys.sim.routeros_menus import ARGUMENT_FAILURE, Trap, format_id, normalize_bool, parse_id

Row = Mapping[str, str]
Test = Callable[[Row], bool]
Matcher = Callable[[Row], bool]


def _number_or_text(value: str) -> tuple[int, int | str]:
    # Numbers compare as numbers and sort before text, so `?<limit=10` works on counters.
    try:
        return (0, int(value))
    except ValueError:
        return (1, value)


def _normalize(name: str, value: str, booleans: frozenset[str]) -> str:
    if name in booleans:
        try:
            return normalize_bool(name, value)
        except Trap:
            return value
    if name == ".id" and (number := parse_id(value)) is not None:
        return format_id(number)
    return value


def _test(word: str, booleans: frozenset[str]) -> Test:
    body = word[1:]
    if body.startswith("-"):
        absent = body[1:]
        return lambda row: absent not in row
    operator = "="
    if body[:1] in ("=", "<", ">"):
        operator, body = body[0], body[1:]
    name, has_value, raw = body.partition("=")
    if not has_value and operator == "=":
        return lambda row: name in row
    value = _normalize(name, raw, booleans)
    if operator == "=":
        return lambda row: name in row and row[name] == value
    wanted = _number_or_text(value)
    if operator == "<":
        return lambda row: name in row and _number_or_text(row[name]) < wanted
    return lambda row: name in row and _number_or_text(row[name]) > wanted


def _equality(word: str) -> tuple[str, str] | None:
    """`(field, raw value)` of an equality test word (`?name=x`, `?=name=x`), else None."""
    body = word[1:]
    if body.startswith("-"):
        return None
    if body[:1] == "=":
        body = body[1:]
    elif body[:1] in ("<", ">"):
        return None
    name, has_value, raw = body.partition("=")
    return (name, raw) if has_value else None


def index_hint(
    words: Sequence[str], booleans: frozenset[str], indexed: Collection[str]
) -> list[tuple[str, str]] | None:
    """`(field, value)` pairs such that every matching row holds one of them, for a
    print to look up, not scan; the whole query still decides which of those match.

    Two shapes qualify. With no `?#` operations the tests are ANDed: the first equality
    test on an indexed field (not a boolean) narrows the rows. A pure disjunction (only
    equality tests on indexed fields, joined by exactly one `|` fewer than there are
    tests, as `?name=a ?name=b ?#|`) matches rows holding any one of its pairs. None:
    the print must scan.
    """
    operations = "".join(word[2:] for word in words if word.startswith("?#"))
    tests = [word for word in words if not word.startswith("?#")]
    if not operations:
        for word in tests:
            test = _equality(word)
            if test is not None and test[0] in indexed and test[0] not in booleans:
                name, raw = test
                return [(name, _normalize(name, raw, booleans))]
        return None
    if set(operations) != {"|"} or len(operations) != len(tests) - 1:
        return None
    pairs = []
    for word in tests:
        test = _equality(word)
        if test is None or test[0] not in indexed or test[0] in booleans:
            return None
        name, raw = test
        pairs.append((name, _normalize(name, raw, booleans)))
    return pairs


def _apply(operations: str, stack: list[bool]) -> None:
    for op in operations:
        if op == "!":
            stack.append(not stack.pop())
        elif op in "|&":
            right, left = stack.pop(), stack.pop()
            stack.append(left or right if op == "|" else left and right)
        elif op == ".":
            stack.append(stack[-1])
        elif op.isdigit():
            stack.append(stack[int(op)])
        else:
            raise Trap(f"unknown query operation {op!r}", ARGUMENT_FAILURE)


def compile_query(words: Sequence[str], booleans: frozenset[str]) -> Matcher:
    """Build a matcher from the `?` words of a print, in the order they were sent."""
    steps: list[Test | str] = [
        word[2:] if word.startswith("?#") else _test(word, booleans) for word in words
    ]

    def matches(row: Row) -> bool:
        stack: list[bool] = []
        for step in steps:
            if isinstance(step, str):
                _apply(step, stack)
            else:
                stack.append(step(row))
        return all(stack)

    # A malformed stack program fails the whole print, even on an empty menu.
    try:
        matches({})
    except IndexError:
        raise Trap("query stack underflow", ARGUMENT_FAILURE) from None
    return matches
