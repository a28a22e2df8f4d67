"""Packages as router profiles: each package's profile, with its rate, on its routers.

A package names a profile (``/ppp/profile`` for PPPoE, ``/ip/hotspot/user/profile`` for
hotspot) and a ``rate_limit``. Two paths put it there, both level-triggered:

- ``ensure_profile``: a ``sync_subscriber`` that writes a login's profile (a new login,
  a new package) or is about to end its session aligns that profile first. A login
  naming a missing profile is refused by the router, and the profile job of a new
  package or router may still wait in the stream behind the subscriber's job (jobs on a
  stream run concurrently, in no order), so the subscriber's own job is the one place
  that is always first; before a kick it makes the fresh session get the new rate. It
  costs one print, only on those syncs.
- ``align_profiles``: the per-router ``sync_profiles`` job (queued by a package's
  create, change or delete) and reconciliation align every package profile of the
  router's tenant in both menus, and remove tagged profiles no package wants any more
  (never one a login on the router still names, never the built-in ``default``).

Profiles imsys did not make (untagged) are used as they are and never changed.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

import structlog

from imsys.routeros import AlreadyExists, RouterSession
from imsys.routeros.menus import LOGIN_BY_SERVICE, PROFILE_BY_SERVICE
from imsys.sync.desired import MenuChange, Plan, orphan_profiles, plan_profile

if TYPE_CHECKING:
    from imsys.db import Executor
    from imsys.sync.handlers import Auditor

log = structlog.get_logger("imsys.sync")


async def apply_profile(ros: RouterSession, change: MenuChange, audit: Auditor) -> None:
    """Add or set one profile. A concurrent sync that added it first is no failure: the
    profile is there, and the next alignment sets its rate if that one lost."""
    if change.add is not None:
        try:
            await audit.run(
                f"add {change.menu}", dict(change.add), partial(ros.add, change.menu, change.add)
            )
        except AlreadyExists:
            log.info("profile_added_concurrently", menu=change.menu, name=change.add["name"])
    if change.set and change.set_id is not None:
        await audit.run(
            f"set {change.menu}",
            {"id": change.set_id, **change.set},
            partial(ros.set, change.menu, change.set_id, change.set),
        )


def names_profile(steps: Plan) -> bool:
    """Whether the plan writes a login's profile (an add, or a new package)."""
    return any(c.add is not None or "profile" in c.set for c in steps.changes)


async def ensure_profile(
    db: Executor, ros: RouterSession, subscriber_id: int, service: str, tag: str, audit: Auditor
) -> None:
    """The profile of the subscriber's package exists on the router with the package's
    rate, in the menu of the subscriber's service."""
    row = await db.fetchrow(
        """
        SELECT p.profile, coalesce(p.rate_limit, (
                   SELECT q.rate_limit FROM packages q
                   WHERE q.tenant_id = p.tenant_id AND q.profile = p.profile
                     AND q.deleted_at IS NULL AND q.rate_limit IS NOT NULL
                   ORDER BY q.id LIMIT 1)) AS rate_limit
        FROM subscribers s JOIN packages p ON p.id = s.package_id
        WHERE s.id = $1
        """,
        subscriber_id,
    )
    if row is None:
        return
    menu = PROFILE_BY_SERVICE[service]
    found = await ros.print(menu, where={"name": row["profile"]})
    change = plan_profile(menu, row["profile"], row["rate_limit"], found, tag)
    if not change.empty:
        await apply_profile(ros, change, audit)


async def tenant_profiles(db: Executor, tenant_id: int) -> dict[str, str | None]:
    """Profile name -> rate of the tenant's live packages. Packages may share a profile;
    the API refuses two different rates for one, and a package without a rate defers to
    one that has it."""
    rows = await db.fetch(
        "SELECT profile, rate_limit FROM packages WHERE tenant_id = $1 AND deleted_at IS NULL "
        "ORDER BY rate_limit NULLS LAST, id",
        tenant_id,
    )
    out: dict[str, str | None] = {}
    for r in rows:
        out.setdefault(r["profile"], r["rate_limit"])
    return out


async def align_profiles(
    ros: RouterSession,
    wanted: dict[str, str | None],
    tag: str,
    audit: Auditor,
    *,
    in_use: Mapping[str, set[str]] | None = None,
) -> dict[str, Any]:
    """Every wanted profile in both menus with its rate; tagged profiles no package wants
    and no login uses removed. Returns what it did, by action.

    ``in_use``: the profiles the logins name, by login menu, when the caller has just read
    them (reconciliation): a menu found there is not read again."""
    done: dict[str, Any] = {"added": [], "set": [], "removed": []}
    for service, menu in PROFILE_BY_SERVICE.items():
        entries = await ros.print(menu)
        by_name: dict[str, list[dict[str, str]]] = {}
        for e in entries:
            by_name.setdefault(str(e.get("name", "")), []).append(e)
        for name, rate in wanted.items():
            change = plan_profile(menu, name, rate, by_name.get(name, []), tag)
            if change.empty:
                continue
            await apply_profile(ros, change, audit)
            done["added" if change.add is not None else "set"].append(f"{menu}:{name}")
        orphans = orphan_profiles(entries, set(wanted), set(), tag)
        if not orphans:
            continue
        login_menu = LOGIN_BY_SERVICE[service]
        if in_use is not None and login_menu in in_use:
            used = in_use[login_menu]
        else:
            logins = await ros.print(login_menu, proplist=["profile"])
            used = {str(e.get("profile", "")) for e in logins}
        for item_id, name in orphan_profiles(entries, set(wanted), used, tag):
            await audit.run(
                f"remove {menu}", {"id": item_id, "name": name}, partial(ros.remove, menu, item_id)
            )
            done["removed"].append(f"{menu}:{name}")
    return done
