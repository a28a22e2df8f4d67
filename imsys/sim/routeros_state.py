"""The simulated router's configuration and sessions, and the commands that change them.

Everything here is synchronous: one command runs to its end before the next starts,
which is what makes a RouterOS command atomic for its clients.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from imsys.sim.routeros_menus import (
    ARGUMENT_FAILURE,
    BUILTIN_ITEMS,
    DEFAULT_RESOURCE,
    INVALID_VALUE,
    MENUS,
    MISSING_ITEM_OR_COMMAND,
    NO_SUCH_COMMAND,
    NO_SUCH_ITEM,
    UNKNOWN_PARAMETER,
    MenuSpec,
    Trap,
    Value,
    format_id,
    format_uptime,
    menu_path,
    normalize_bool,
    parse_id,
    parse_uptime,
    to_wire,
)
from imsys.sim.routeros_query import compile_query, index_hint


@dataclass
class Item:
    number: int
    fields: dict[str, str]
    # monotonic start of a live session; its uptime is computed when printed
    since: float | None = None
    builtin: bool = False
    # Position in its menu's print order (set by RouterState; a reboot keeps it): rows
    # found through an index are printed in this order, as a scan would print them.
    order: int = 0


@dataclass(frozen=True)
class Write:
    """A write that was applied: handed to `drop_after_write` predicates."""

    menu: str
    command: str
    # Rows as printed after the write (before, for a remove); they may hold passwords.
    items: tuple[Mapping[str, str], ...] = field(repr=False)


@dataclass
class Outcome:
    rows: list[dict[str, str]] = field(default_factory=list)
    ret: str | None = None
    write: Write | None = None


class RouterState:
    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._items: dict[str, dict[int, Item]] = {
            path: {} for path, spec in MENUS.items() if not spec.single
        }
        self._next_number = {path: MENUS[path].first_id for path in self._items}
        # path -> key value (name, user) -> the items holding it, by number. Key values
        # are unique in config menus, but not in session menus (and hotspot users are
        # unique only per server), hence a small dict per value.
        self._by_key: dict[str, dict[str, dict[int, Item]]] = {path: {} for path in self._items}
        self._order = 0
        # Rows a print tested against its query: for tests that a lookup is not a scan.
        self.rows_visited = 0
        self._single: dict[str, dict[str, str]] = {
            "/system/resource": dict(DEFAULT_RESOURCE),
            "/system/identity": {"name": "MikroTik"},
        }
        self._hosts = 1
        # Optional packages installed (`wireless`, `wifi-qcom`...): which menus exist.
        self.packages: frozenset[str] = frozenset()
        self.boot_time = clock()
        self.boots = 0
        # A removed /ppp/active or /ip/hotspot/active entry stays (the remove still
        # answers !done): for testing that callers check a kick really ended a session.
        self.sessions_survive_remove = False
        # Called with the rows of active sessions an API remove just ended.
        self.after_kick: Callable[[str, list[dict[str, str]]], None] | None = None
        for path, builtins in BUILTIN_ITEMS.items():
            for number, fields in builtins:
                spec = MENUS[path]
                self._insert(
                    path,
                    Item(number, {"name": fields["name"], **spec.defaults, **fields}, builtin=True),
                )

    # -- the items of a menu and their index by key -------------------------------

    def _insert(self, path: str, item: Item) -> None:
        self._order += 1
        item.order = self._order
        self._items[path][item.number] = item
        self._index(path, item)

    def _delete(self, path: str, item: Item) -> None:
        del self._items[path][item.number]
        self._unindex(path, item)

    def _index(self, path: str, item: Item) -> None:
        key = MENUS[path].key
        if key is not None and key in item.fields:
            self._by_key[path].setdefault(item.fields[key], {})[item.number] = item

    def _unindex(self, path: str, item: Item) -> None:
        key = MENUS[path].key
        if key is None or key not in item.fields:
            return
        holders = self._by_key[path].get(item.fields[key])
        if holders is not None:
            holders.pop(item.number, None)
            if not holders:
                del self._by_key[path][item.fields[key]]

    def _with_key(self, spec: MenuSpec, value: str) -> list[Item]:
        """The items whose key is `value`, in print order."""
        holders = self._by_key[spec.path].get(value)
        if not holders:
            return []
        return sorted(holders.values(), key=lambda item: item.order)

    def _candidates(self, spec: MenuSpec, queries: list[str]) -> list[Item] | None:
        """The only items a print's query can match, when an index says so; None: scan."""
        if spec.single:
            return None
        indexed = {".id"} if spec.key is None else {".id", spec.key}
        hint = index_hint(queries, spec.booleans, indexed)
        if hint is None:
            return None
        found: dict[int, Item] = {}
        for name, value in hint:
            if name != ".id":
                found.update((item.number, item) for item in self._with_key(spec, value))
                continue
            number = parse_id(value)
            if number is None:
                return None
            item = self._items[spec.path].get(number)
            if item is not None:
                found[number] = item
        return sorted(found.values(), key=lambda item: item.order)

    # -- reading -------------------------------------------------------------------

    def has_menu(self, path: str) -> bool:
        """Whether this router has the menu: the base system's, or one of its packages'."""
        needs = MENUS[path].packages
        return not needs or not needs.isdisjoint(self.packages)

    def rows(self, menu: str) -> list[dict[str, str]]:
        spec = MENUS[menu_path(menu)]
        if spec.single:
            return [self._render_single(spec)]
        return [self._render(spec, item) for item in self._items[spec.path].values()]

    def _render(self, spec: MenuSpec, item: Item) -> dict[str, str]:
        row = {".id": format_id(item.number), **item.fields}
        if item.since is not None:
            row["uptime"] = format_uptime(self._clock() - item.since)
        return row

    def _render_single(self, spec: MenuSpec) -> dict[str, str]:
        row = dict(self._single[spec.path])
        if "uptime" in row:
            row["uptime"] = format_uptime(self._clock() - self.boot_time)
        return row

    # -- commands from the API ----------------------------------------------------

    def execute(self, path: str, verb: str, args: Mapping[str, str], queries: list[str]) -> Outcome:
        """Run `/path/verb`; raises `Trap` exactly where RouterOS answers `!trap`."""
        spec = MENUS[path]
        if verb not in spec.commands or (
            verb in ("enable", "disable") and "disabled" not in spec.fields
        ):
            raise Trap(NO_SUCH_COMMAND, MISSING_ITEM_OR_COMMAND)
        if verb in ("print", "getall"):
            return self._print(spec, args, queries)
        arguments = dict(args)
        if verb == "add":
            number = self._add(spec, arguments)
            row = self._render(spec, self._items[spec.path][number])
            return Outcome(ret=format_id(number), write=Write(spec.path, verb, (row,)))
        if spec.single:
            self._set_single(spec, arguments)
            return Outcome(write=Write(spec.path, verb, (self._render_single(spec),)))
        targets = self._resolve(spec, arguments.pop(".id", None) or arguments.pop("numbers", None))
        if verb == "remove":
            rows = self._remove(spec, targets, arguments)
        else:
            if verb == "set":
                self._set(spec, targets, arguments)
            elif verb == "unset":
                self._unset(spec, targets, arguments)
            else:
                self._check_fields(spec, arguments)
                for item in targets:
                    item.fields["disabled"] = "true" if verb == "disable" else "false"
            rows = [self._render(spec, item) for item in targets]
        return Outcome(write=Write(spec.path, verb, tuple(rows)))

    def _print(self, spec: MenuSpec, args: Mapping[str, str], queries: list[str]) -> Outcome:
        matches = compile_query(queries, spec.booleans)
        candidates = self._candidates(spec, queries)
        if candidates is None:
            rows = self.rows(spec.path)
        else:
            rows = [self._render(spec, item) for item in candidates]
        self.rows_visited += len(rows)
        # No query matches every row (`compile_query` said so already): no test per row.
        selected = [row for row in rows if matches(row)] if queries else rows
        if "count-only" in args:
            return Outcome(ret=str(len(selected)))
        proplist = args.get(".proplist")
        if proplist is not None:
            wanted = set(proplist.split(","))
            selected = [{k: v for k, v in row.items() if k in wanted} for row in selected]
        return Outcome(rows=selected)

    def _add(self, spec: MenuSpec, args: Mapping[str, str]) -> int:
        self._check_fields(spec, args)
        given = {k: v for k, v in self._clean(spec, args).items() if v is not None}
        key = spec.key
        if key is not None and not given.get(key):
            if spec.auto_name is None:
                raise _missing(key)
            given[key] = self._auto_name(spec, key)
        # RouterOS prints fields in its own order, whatever order they were sent in:
        # the key, then the menu's usual fields; update() keeps a key's first position.
        fields = {key: given[key]} if key is not None else {}
        fields.update(spec.defaults)
        fields.update(given)
        self._check_item(spec, fields, None)
        number = self._allocate(spec.path)
        self._insert(spec.path, Item(number, fields))
        return number

    def _set(self, spec: MenuSpec, targets: list[Item], args: Mapping[str, str]) -> None:
        self._check_fields(spec, args)
        values = self._clean(spec, args)
        if spec.key is not None and spec.key in values:
            if not values[spec.key]:
                raise _missing(spec.key)
            if len(targets) > 1:
                raise Trap(spec.duplicate)
        updated = [(item, _merge(item.fields, values)) for item in targets]
        # Check every target before touching any, so a failed set changes nothing.
        for item, fields in updated:
            self._check_item(spec, fields, item)
        for item, fields in updated:
            self._unindex(spec.path, item)
            item.fields = fields
            self._index(spec.path, item)

    def _unset(self, spec: MenuSpec, targets: list[Item], args: dict[str, str]) -> None:
        name = args.pop("value-name", "")
        self._check_fields(spec, args)
        if name not in spec.fields or name == spec.key:
            raise Trap(UNKNOWN_PARAMETER)
        for item in targets:
            if name in spec.defaults:
                item.fields[name] = spec.defaults[name]
            else:
                item.fields.pop(name, None)

    def _remove(
        self, spec: MenuSpec, targets: list[Item], args: Mapping[str, str]
    ) -> list[dict[str, str]]:
        self._check_fields(spec, args)
        if spec.permanent and any(item.builtin for item in targets):
            # Checked before removing any, so the other targets stay too.
            raise Trap(spec.permanent)
        rows = [self._render(spec, item) for item in targets]
        if spec.session and self.sessions_survive_remove:
            return rows
        for item in targets:
            self._delete(spec.path, item)
        if spec.session and self.after_kick is not None:
            self.after_kick(spec.path, rows)
        return rows

    def _set_single(self, spec: MenuSpec, args: Mapping[str, str]) -> None:
        self._check_fields(spec, args)
        self._single[spec.path].update({k: v for k, v in args.items() if v})

    # -- checks --------------------------------------------------------------------

    def _check_fields(self, spec: MenuSpec, args: Mapping[str, str]) -> None:
        for name in args:
            if name not in spec.fields:
                raise Trap(UNKNOWN_PARAMETER)

    def _clean(self, spec: MenuSpec, args: Mapping[str, str]) -> dict[str, str | None]:
        """Normalise values; None means "unset" (an empty value for a field with no default)."""
        values: dict[str, str | None] = {}
        for name, value in args.items():
            if name in spec.booleans:
                values[name] = normalize_bool(name, value)
            elif name in spec.choices and value not in spec.choices[name]:
                raise Trap(f"input does not match any value of {name}", ARGUMENT_FAILURE)
            elif value and name in spec.formats and not spec.formats[name](value):
                raise Trap(INVALID_VALUE.format(name=name), ARGUMENT_FAILURE)
            else:
                values[name] = value if value or name in spec.defaults else None
        return values

    def _check_item(self, spec: MenuSpec, fields: Mapping[str, str], item: Item | None) -> None:
        key = spec.key
        if key is not None and key in fields:
            for other in self._with_key(spec, fields[key]):
                if other is item:
                    continue
                scope = spec.key_scope
                if scope is None or other.fields.get(scope) == fields.get(scope):
                    raise Trap(spec.duplicate)
        for name, target in spec.references.items():
            if name in fields and self._find_key(MENUS[target], fields[name]) is None:
                raise Trap(f"input does not match any value of {name}", ARGUMENT_FAILURE)

    def _resolve(self, spec: MenuSpec, ref: str | None) -> list[Item]:
        """Items named by `.id` (comma separated; a name where RouterOS allows it)."""
        if not ref:
            raise Trap(NO_SUCH_ITEM)
        found: list[Item] = []
        for part in ref.split(","):
            number = parse_id(part)
            item: Item | None
            if number is not None:
                item = self._items[spec.path].get(number)
            else:
                item = self._find_key(spec, part) if spec.names_as_ids else None
            if item is None:
                raise Trap(NO_SUCH_ITEM)
            if item not in found:
                found.append(item)
        return found

    def _find_key(self, spec: MenuSpec, value: str) -> Item | None:
        if spec.key is None:
            return None
        found = self._with_key(spec, value)
        return found[0] if found else None

    def _allocate(self, path: str) -> int:
        number = self._next_number[path]
        self._next_number[path] = number + 1
        return number

    def _auto_name(self, spec: MenuSpec, key: str) -> str:
        taken = {item.fields.get(key) for item in self._items[spec.path].values()}
        n = 1
        while f"{spec.auto_name}{n}" in taken:
            n += 1
        return f"{spec.auto_name}{n}"

    # -- the outside world: seeding, subscribers coming and going, reboots ---------

    def add_item(self, menu: str, fields: Mapping[str, Value]) -> str:
        """Seed an item as if added through the API (same checks); returns its `.id`."""
        spec = MENUS[menu_path(menu)]
        values = {name: to_wire(value) for name, value in fields.items()}
        if spec.single:
            self._single[spec.path].update(values)
            return ""
        if spec.session:
            uptime = parse_uptime(values.pop("uptime", "0s"))
            return self.start_session(spec.path, {**values, "uptime": ""}, uptime)
        return format_id(self._add(spec, values))

    def set_resource(self, fields: Mapping[str, Value]) -> None:
        values = {name: to_wire(value) for name, value in fields.items()}
        if "uptime" in values:
            self.boot_time = self._clock() - parse_uptime(values.pop("uptime"))
        self._single["/system/resource"].update(values)

    def lookup(self, spec: MenuSpec, key_value: str) -> dict[str, str] | None:
        """The fields of the item whose key (name, user) is `key_value`, if any."""
        item = self._find_key(spec, key_value)
        return None if item is None else dict(item.fields)

    def next_host(self) -> int:
        """A fresh number for a subscriber device's made-up address and MAC."""
        self._hosts += 1
        return self._hosts

    def start_session(self, path: str, fields: Mapping[str, str], uptime: float = 0.0) -> str:
        number = self._allocate(path)
        self._insert(path, Item(number, dict(fields), self._clock() - uptime))
        return format_id(number)

    def end_sessions(self, menu: str, who: str) -> int:
        """The subscriber leaves on their own (not a kick); returns how many entries went."""
        spec = MENUS[menu_path(menu)]
        gone = self._with_key(spec, who) if spec.key is not None else []
        for item in gone:
            self._delete(spec.path, item)
        return len(gone)

    def reboot(self) -> None:
        """Sessions end; config stays; every non-built-in `.id` changes."""
        for path, items in self._items.items():
            self._by_key[path] = {}
            if MENUS[path].session:
                items.clear()
                continue
            renumbered: dict[int, Item] = {}
            for item in items.values():
                if not item.builtin:
                    # Numbers keep rising, so no new id equals any id seen before the reboot.
                    item.number = self._allocate(path)
                renumbered[item.number] = item
                self._index(path, item)
            self._items[path] = renumbered
        self.boot_time = self._clock()
        self.boots += 1


def _missing(key: str) -> Trap:
    # Not a text captured from a router; a real one refuses a nameless item too.
    return Trap(f"failure: {key} must be specified", ARGUMENT_FAILURE)


def _merge(fields: Mapping[str, str], values: Mapping[str, str | None]) -> dict[str, str]:
    merged = dict(fields)
    for name, value in values.items():
        if value is None:
            merged.pop(name, None)
        else:
            merged[name] = value
    return merged
