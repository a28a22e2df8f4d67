"""A batch's one read per menu: its subscribers' entries by kept `.id` and by name, ORed
with the query stack; by comment (a scan) only where the ids are unknown or stale."""

from __future__ import annotations

import structlog

from imsys.routeros import RouterSession
from imsys.routeros.menus import LOGIN_BY_SERVICE
from imsys.sync.batch_item import Item
from imsys.sync.desired import marker, parse_marker, plan

log = structlog.get_logger("imsys.sync")

# The fields a plan compares, and what finds an entry; nothing else is read.
PROPLIST = [".id", "name", "comment", "profile", "password", "disabled"]


async def find_entries(ros: RouterSession, items: list[Item], tag: str) -> None:
    """Every managed entry of the batch's subscribers, and the rows holding the names
    they need: by id and name (looked up), by comment only where the ids are unknown or
    stale."""
    by_id = {i.sub.id: i for i in items}
    unknown = [i for i in items if i.entries is None]
    looked: dict[str, list[dict[str, str]]] = {}
    for menu in LOGIN_BY_SERVICE.values():
        tests: list[tuple[str, str]] = []
        for i in items:
            if i.entries is not None and menu in i.entries:
                tests.append((".id", i.entries[menu]))
            if i.sub.desired.present and i.sub.desired.menu() == menu:
                tests.append(("name", i.sub.desired.username))
        looked[menu] = await ros.print_any(menu, tests, proplist=PROPLIST) if tests else []
    for menu, rows in looked.items():
        _assign(rows, menu, by_id, tag)
    stale = [
        i
        for i in items
        if i.entries is not None
        and any(
            all(row[".id"] != item_id for row in i.managed.get(menu, []))
            for menu, item_id in i.entries.items()
        )
    ]
    if stale:
        log.info("router_entry_ids_stale", router_id=items[0].sub.router_id, count=len(stale))
    rescan = [*unknown, *stale]
    if rescan:
        await _rescan(ros, rescan, tag)
    for i in items:
        i.entries = i.learnt()


async def _rescan(ros: RouterSession, rescan: list[Item], tag: str) -> None:
    """Find these subscribers' entries by comment: one (scanning) print per menu."""
    for i in rescan:
        i.managed = {m: [] for m in LOGIN_BY_SERVICE.values()}
    again = {i.sub.id: i for i in rescan}
    tests = [("comment", marker(tag, i.sub.id)) for i in rescan]
    for menu in LOGIN_BY_SERVICE.values():
        rows = await ros.print_any(menu, tests, proplist=PROPLIST)
        _assign(rows, menu, again, tag)


def _assign(
    rows: list[dict[str, str]], menu: str, items: dict[int, Item], tag: str
) -> None:
    """Give each managed row to its subscriber; a row holding the name a subscriber
    needs in that menu, managed for another or by no one, is that subscriber's twin."""
    wanting: dict[str, Item] = {
        i.sub.desired.username: i
        for i in items.values()
        if i.sub.desired.present and i.sub.desired.menu() == menu
    }
    for row in rows:
        sid = parse_marker(tag, row.get("comment"))
        item = items.get(sid) if sid is not None else None
        if item is not None and all(r[".id"] != row[".id"] for r in item.managed[menu]):
            item.managed[menu].append(row)
        other = wanting.get(row.get("name", ""))
        if other is not None and sid != other.sub.id and other.twin is None:
            other.twin = {"menu": menu, "id": row[".id"], "name": row.get("name", "")}


def plan_items(items: list[Item], tag: str) -> None:
    """Each subscriber's plan; a twin only blocks a subscriber whose plan adds an entry
    with its name (an existing managed entry is set, not added)."""
    for i in items:
        i.steps = plan(i.sub.desired, i.managed, tag)
        if i.twin is not None and not any(c.add is not None for c in i.steps.changes):
            i.twin = None
