"""Adoption: take over a router's existing logins without cutting anyone off.

An ISP arrives with thousands of PPPoE secrets and hotspot users made by hand or by the
old system, none carrying imsys's tag. Adoption reads the router once and sorts its
untagged logins:

- ``matched``: the name is an imsys subscriber of that router (same service) that has no
  managed entry yet. Applying tags the entry in place with ``set`` (same ``.id``) and
  aligns its fields with the database in the same command; the live session is ended
  only when a changed field needs it (a new profile, a disable), and then by the
  subscriber's own sync;
- ``unknown``: on the router, not in the database. With ``import_unknown`` each one whose
  profile ``package_by_profile`` names becomes a subscriber (the router's password and
  service), created through the network service, then tagged like a match;
- ``missing``: subscribers of the router with no entry at all (their sync adds them).

Profiles are adopted the same way: an untagged ``/ppp/profile`` or
``/ip/hotspot/user/profile`` named like one of the tenant's packages' profiles is tagged
in place, its ``rate-limit`` set to the package's when that differs (it reaches each
session at its next login: nobody is kicked for it). The built-in ``default`` is never
touched.

Adoption never disables or removes anything: its only router command is ``set``. Each
adopted subscriber then gets a sync through the outbox, written after its entry is
tagged (so the sync finds its own entry, not a twin); that sync writes nothing unless a
kick is due, and it clears the ``blocked`` state a twin had put on the subscriber.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pydantic
import structlog

from imsys.deps import Deps
from imsys.network import models, service
from imsys.network.errors import Conflict, Invalid, NotFound
from imsys.routeros import RouterSession
from imsys.routeros.menus import BUILTIN_PROFILE, LOGIN_BY_SERVICE, PROFILE_BY_SERVICE
from imsys.sync import repo
from imsys.sync.context import SyncContext
from imsys.sync.desired import (
    Desired,
    marker,
    parse_marker,
    password_digest,
    plan,
    profile_marker,
    public_fields,
)
from imsys.sync.handlers import router_session
from imsys.sync.profiles import tenant_profiles
from imsys.sync.service import queue_sync

if TYPE_CHECKING:
    from imsys.db import Conn

log = structlog.get_logger("imsys.sync")

SERVICE_BY_MENU = {menu: service_ for service_, menu in LOGIN_BY_SERVICE.items()}
CAUSE = "adopt"


@dataclass(slots=True)
class Match:
    """An untagged entry that is an imsys subscriber's login: tagged in place."""

    subscriber_id: int
    menu: str
    entry_id: str
    name: str
    set: dict[str, str]  # the fields to set, the tag included
    kick: bool  # a changed field takes effect only on a new session

    def as_dict(self) -> dict[str, Any]:
        return {
            "subscriber_id": self.subscriber_id,
            "menu": self.menu,
            "id": self.entry_id,
            "name": self.name,
            "set": public_fields(self.set),
            "kick": self.kick,
        }


@dataclass(slots=True)
class ProfileMatch:
    """An untagged profile named like a package's profile: tagged in place."""

    menu: str
    entry_id: str
    name: str
    set: dict[str, str]

    def as_dict(self) -> dict[str, Any]:
        return {"menu": self.menu, "id": self.entry_id, "name": self.name, "set": self.set}


@dataclass(slots=True)
class Adoption:
    """What adopting a router does (the dry run) and, once applied, what it did."""

    router_id: int
    matched: list[Match] = field(default_factory=list)
    # Untagged logins nobody in the database has: {menu, id, name, service, profile}.
    unknown: list[dict[str, Any]] = field(default_factory=list)
    # Subscribers of the router with no entry there: {subscriber_id, username, service}.
    missing: list[dict[str, Any]] = field(default_factory=list)
    # Untagged logins named like a subscriber that already has a managed entry: left alone.
    duplicates: list[dict[str, Any]] = field(default_factory=list)
    applied: bool = False
    tagged: int = 0
    imported: list[int] = field(default_factory=list)
    # Unknown logins not imported, each with why (no package for its profile, invalid...).
    skipped: list[dict[str, Any]] = field(default_factory=list)
    profiles: list[ProfileMatch] = field(default_factory=list)
    # Each unknown login as the router printed it, by .id (for an import; never shown:
    # it holds the password).
    entries: dict[str, dict[str, str]] = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "router_id": self.router_id,
            "applied": self.applied,
            "matched": [m.as_dict() for m in self.matched],
            "unknown": self.unknown,
            "missing": self.missing,
            "duplicates": self.duplicates,
            "counts": {
                "matched": len(self.matched),
                "unknown": len(self.unknown),
                "missing": len(self.missing),
                "duplicates": len(self.duplicates),
                "profiles": len(self.profiles),
            },
            "tagged": self.tagged,
            "imported": self.imported,
            "skipped": self.skipped,
            "profiles": [p.as_dict() for p in self.profiles],
        }


def match(desired: Desired, menu: str, entry: dict[str, str], tag: str) -> Match:
    """Tag ``entry`` for ``desired`` and align its fields, in one ``set``."""
    empty: dict[str, list[dict[str, str]]] = {m: [] for m in LOGIN_BY_SERVICE.values()}
    steps = plan(desired, {**empty, menu: [entry]}, tag)
    fields = dict(steps.change(menu).set)
    fields["comment"] = marker(tag, desired.subscriber_id)
    kick = "profile" in fields or fields.get("disabled") == "yes"
    return Match(
        desired.subscriber_id, menu, entry[".id"], str(entry.get("name", "")), fields, kick
    )


def decide(
    subs: list[repo.SubscriberRow], menus: dict[str, list[dict[str, str]]], tag: str
) -> Adoption:
    """Sort a router's logins against its subscribers (pure: no I/O)."""
    result = Adoption(subs[0].router_id if subs else 0)
    present = {s.id: s for s in subs if s.desired.present}
    by_name = {(s.desired.menu(), s.desired.username): s for s in present.values()}
    managed = {
        sid
        for entries in menus.values()
        for e in entries
        if (sid := parse_marker(tag, e.get("comment"))) is not None and sid in present
    }
    taken: set[int] = set()
    for menu, entries in menus.items():
        for entry in entries:
            if parse_marker(tag, entry.get("comment")) is not None:
                continue
            name = str(entry.get("name", ""))
            sub = by_name.get((menu, name))
            if sub is None:
                result.entries[entry[".id"]] = entry
                result.unknown.append(
                    {
                        "menu": menu,
                        "id": entry[".id"],
                        "name": name,
                        "service": SERVICE_BY_MENU[menu],
                        "profile": str(entry.get("profile", "default")),
                    }
                )
            elif sub.id in managed or sub.id in taken:
                result.duplicates.append(
                    {"menu": menu, "id": entry[".id"], "name": name, "subscriber_id": sub.id}
                )
            else:
                taken.add(sub.id)
                result.matched.append(match(sub.desired, menu, entry, tag))
    result.missing = [
        {"subscriber_id": s.id, "username": s.desired.username, "service": s.desired.service}
        for s in present.values()
        if s.id not in managed and s.id not in taken
    ]
    return result


def decide_profiles(
    menus: dict[str, list[dict[str, str]]], wanted: dict[str, str | None], tag: str
) -> list[ProfileMatch]:
    """The untagged profiles a package names, with what to set on each (pure)."""
    out = []
    for menu, entries in menus.items():
        for e in entries:
            name = str(e.get("name", ""))
            if name == BUILTIN_PROFILE or name not in wanted:
                continue
            if e.get("comment") == profile_marker(tag):
                continue
            fields = {"comment": profile_marker(tag)}
            rate = wanted[name]
            if rate and str(e.get("rate-limit", "")) != rate:
                fields["rate-limit"] = rate
            out.append(ProfileMatch(menu, e[".id"], name, fields))
    return out


async def build(ctx: SyncContext, router: Any) -> Adoption:
    tag = ctx.settings.sync.comment_tag
    subs = await repo.router_subscribers(ctx.db, router["id"])
    wanted = await tenant_profiles(ctx.db, router["tenant_id"])
    async with router_session(ctx, router) as ros:
        logins = {menu: await ros.print(menu) for menu in LOGIN_BY_SERVICE.values()}
        profiles = {menu: await ros.print(menu) for menu in PROFILE_BY_SERVICE.values()}
    result = decide(subs, logins, tag)
    result.router_id = router["id"]
    result.profiles = decide_profiles(profiles, wanted, tag)
    return result


async def _no_sync_yet(_conn: Conn, _subscriber_id: int, _correlation_id: str) -> None:
    """An imported subscriber's sync is queued once its entry is tagged (``_queue``): a
    sync running before that would find the untagged entry and call it a twin."""


async def _import(
    ctx: SyncContext,
    router: Any,
    result: Adoption,
    package_by_profile: dict[str, int],
    correlation: str,
) -> None:
    """Create a subscriber for each unknown login whose profile names a package."""
    tag = ctx.settings.sync.comment_tag
    left: list[dict[str, Any]] = []
    for entry in result.unknown:
        package_id = package_by_profile.get(entry["profile"])
        if package_id is None:
            result.skipped.append({**entry, "reason": "no package for its profile"})
            left.append(entry)
            continue
        raw = result.entries[entry["id"]]
        password = raw.get("password")
        if password is None:
            # An API user without the `sensitive` policy sees no passwords.
            result.skipped.append({**entry, "reason": "the router does not show its password"})
            left.append(entry)
            continue
        try:
            data = models.SubscriberIn(
                tenant_id=router["tenant_id"],
                router_id=router["id"],
                package_id=package_id,
                username=entry["name"],
                password=password,
                service=entry["service"],
            )
            row = await service.create_subscriber(ctx.db, data, correlation, on_change=_no_sync_yet)
        except pydantic.ValidationError as exc:
            reason = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
            )
            result.skipped.append({**entry, "reason": reason})
            left.append(entry)
            continue
        except (Conflict, Invalid, NotFound) as exc:
            result.skipped.append({**entry, "reason": str(exc)})
            left.append(entry)
            continue
        sub = await repo.load_subscriber(ctx.db, int(row["id"]))
        assert sub is not None
        result.imported.append(sub.id)
        result.matched.append(match(sub.desired, entry["menu"], raw, tag))
    result.unknown = left


async def _tag(
    ctx: SyncContext,
    ros: RouterSession,
    router: Any,
    m: Match | ProfileMatch,
    correlation: str,
) -> None:
    """Set the fields of one entry, audited (intent before, outcome after)."""
    ids = await repo.audit_intent(
        ctx.db,
        correlations=[correlation],
        cause=CAUSE,
        action=f"set {m.menu}",
        tenant_id=router["tenant_id"],
        router_id=router["id"],
        subscriber_id=m.subscriber_id if isinstance(m, Match) else None,
        detail={"id": m.entry_id, **public_fields(m.set)},
    )
    try:
        await ros.set(m.menu, m.entry_id, m.set)
    except Exception as exc:
        await repo.audit_outcome(ctx.db, ids, f"failed: {exc}")
        raise
    await repo.audit_outcome(ctx.db, ids, "ok")
    if isinstance(m, Match) and "password" in m.set:
        # The entry now holds this password: on a router that hides passwords, the
        # subscriber's next sync must not write it again (no job here to fence).
        digest = password_digest(m.subscriber_id, m.set["password"])
        await repo.set_written_password(ctx.db, m.subscriber_id, digest, fence=_unfenced)


async def _unfenced() -> None:
    """Adoption runs in a request, not a job: there is no claim to lose."""


async def _queue(ctx: SyncContext, matched: list[Match], correlation: str) -> None:
    """The adopted are no longer blocked; each gets its sync (through the outbox)."""
    async with ctx.db.acquire() as conn, conn.transaction():
        await conn.execute(
            """
            UPDATE subscribers s SET blocked_version = NULL, sync_error = NULL,
                sync_status = CASE WHEN s.sync_status = 'error' THEN 'pending'
                                   ELSE s.sync_status END,
                kick_required = s.kick_required OR m.kick,
                pending_correlations = s.pending_correlations || ARRAY[$3]
            FROM unnest($1::bigint[], $2::bool[]) AS m(id, kick)
            WHERE s.id = m.id
            """,
            [m.subscriber_id for m in matched],
            [m.kick for m in matched],
            correlation,
        )
        for m in matched:
            await queue_sync(conn, m.subscriber_id, correlation, CAUSE)


async def adopt(
    deps: Deps,
    router_id: int,
    *,
    apply: bool = False,
    import_unknown: bool = False,
    package_by_profile: dict[str, int] | None = None,
    correlation: str | None = None,
) -> Adoption:
    """The adoption plan of ``router_id``; with ``apply``, carried out."""
    router = await repo.load_router(deps.db, router_id)
    if router is None:
        raise NotFound(f"router {router_id}")
    correlation = correlation or f"adopt:{router_id}"
    ctx = SyncContext.build(deps)
    try:
        result = await build(ctx, router)
        if not apply:
            return result
        if import_unknown:
            await _import(ctx, router, result, package_by_profile or {}, correlation)
        tagged: list[Match] = []
        try:
            async with router_session(ctx, router) as ros:
                # Profiles first: a login aligned to a package names its profile.
                for pm in result.profiles:
                    await _tag(ctx, ros, router, pm, correlation)
                for m in result.matched:
                    await _tag(ctx, ros, router, m, correlation)
                    tagged.append(m)
        finally:
            # Whatever was tagged gets its sync, even when a later command failed.
            await _queue(ctx, tagged, correlation)
        result.tagged = len(tagged)
        result.applied = True
    finally:
        await ctx.close()
    log.info(
        "router_adopted",
        router_id=router_id,
        tagged=result.tagged,
        imported=len(result.imported),
        unknown=len(result.unknown),
        missing=len(result.missing),
    )
    return result
