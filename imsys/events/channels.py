"""Delivery channels an operator can stop and start (``service_control`` jobs).

The state lives in Redis, one hash per channel at ``<prefix>:service:<channel>`` with
``state`` (``running`` | ``stopped``), ``since`` (epoch ms) and ``by``, so every process
sees a change at once and a restarted process keeps it. A channel with no hash has never
been stopped: it is running.

Jobs that send through a channel call `ChannelControl.ensure_running` first; while the
channel is stopped it raises `Deferred`, so the job waits in the delayed store without
failing or spending an attempt, and goes out within ``hold_s`` of ``start``.

A channel also stops for one tenant when its provider says the account has no credit
(`ChannelControl.out_of_credit`): the hash ``<prefix>:service:<channel>:out_of_credit``
maps the tenant id to when and why. ``start`` of the channel clears every tenant's stop;
``start`` with a ``tenant_id`` clears that tenant's only.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal, get_args

import orjson
from redis.asyncio import Redis

from imsys.backoff import REDIS_DOWN
from imsys.errors import Deferred
from imsys.streams.fair import FairShare
from imsys.streams.keys import Keys

if TYPE_CHECKING:
    from imsys.deps import Deps

__all__ = ["CHANNELS", "Channel", "ChannelControl", "ServiceState", "State", "fair_share",
           "send_key"]

Channel = Literal["sms", "whatsapp", "email"]
State = Literal["running", "stopped"]
CHANNELS: Final[tuple[str, ...]] = get_args(Channel)

# KEYS: the channel's hash. ARGV: state, since, by.
# Writes only on a change, so "since" stays the moment the state began, however many
# times an operator repeats the same command. Returns state, since, by, changed.
_SET = """
local cur = redis.call('HMGET', KEYS[1], 'state', 'since', 'by')
if (cur[1] or 'running') == ARGV[1] then
  return {ARGV[1], cur[2] or '', cur[3] or '', 0}
end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'since', ARGV[2], 'by', ARGV[3])
return {ARGV[1], ARGV[2], ARGV[3], 1}
"""


@dataclass(frozen=True, slots=True)
class ServiceState:
    """The truth about one channel, as Redis holds it."""

    service: str
    state: State
    # Epoch ms the state began, and who set it; None for a channel never stopped.
    since: int | None
    by: str | None
    changed: bool = False
    # Tenants this channel is stopped for, out of credit: {tenant_id, since, reason}.
    out_of_credit: list[dict[str, Any]] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.state == "running"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ChannelControl:
    """Start, stop and ask about a channel; hold jobs while their channel is stopped.

    Cheap to build (no I/O): ``ChannelControl.from_deps(deps)`` wherever it is needed.
    """

    def __init__(self, redis: Redis, keys: Keys, *, hold_s: float = 1.5) -> None:
        self.redis = redis
        self.keys = keys
        self.hold_s = hold_s
        self._set = redis.register_script(_SET)

    @classmethod
    def from_deps(cls, deps: Deps) -> ChannelControl:
        return cls(deps.redis, deps.engine.keys, hold_s=deps.settings.events.channel_hold_s)

    def key(self, channel: str) -> str:
        return self.keys.channel(channel)

    def credit_key(self, channel: str) -> str:
        return f"{self.key(channel)}:out_of_credit"

    async def ensure_running(self, channel: str, tenant_id: int | None = None) -> None:
        """Return if ``channel`` may send (for ``tenant_id``); raise `Deferred` (no attempt
        spent) if it is stopped, or out of credit for that tenant."""
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hget(self.key(channel), "state")
            pipe.hexists(self.credit_key(channel), str(tenant_id or 0))
            state, no_credit = await pipe.execute()
        except REDIS_DOWN:
            # Not the job's fault: wait without spending an attempt.
            raise Deferred(f"state of channel {channel} unreadable", delay=self._hold()) from None
        if _text(state) == "stopped":
            raise Deferred(f"channel {channel} is stopped (service_control)", delay=self._hold())
        if no_credit:
            raise Deferred(
                f"channel {channel} is out of credit for tenant {tenant_id} (service_control"
                " start resumes it)",
                delay=self._hold(),
            )

    async def out_of_credit(self, channel: str, tenant_id: int | None, reason: str) -> bool:
        """Stop ``channel`` for ``tenant_id``; True when it was running for it until now."""
        value = orjson.dumps({"since": int(time.time() * 1000), "reason": reason[:300]})
        return bool(await self.redis.hsetnx(self.credit_key(channel), str(tenant_id or 0), value))

    async def credit_stops(self, channel: str) -> list[dict[str, Any]]:
        raw = await self.redis.hgetall(self.credit_key(channel))
        out = []
        for tenant, value in sorted(raw.items()):
            info = orjson.loads(value)
            tid = int(_text(tenant))
            out.append({"tenant_id": tid or None, **info})
        return out

    def _hold(self) -> float:
        # Spread so a held backlog does not come back in one lump every hold_s.
        return self.hold_s * random.uniform(0.8, 1.2)

    async def status(self, channel: str) -> ServiceState:
        raw = await self.redis.hmget(self.key(channel), ["state", "since", "by"])
        state, since, by = (_text(x) for x in raw)
        return ServiceState(
            service=channel,
            state="stopped" if state == "stopped" else "running",
            since=int(since) if since else None,
            by=by or None,
            out_of_credit=await self.credit_stops(channel),
        )

    async def statuses(self) -> list[ServiceState]:
        return [await self.status(c) for c in CHANNELS]

    async def start(self, channel: str, by: str, tenant_id: int | None = None) -> ServiceState:
        """Run ``channel`` again; with ``tenant_id``, only end that tenant's credit stop."""
        if tenant_id is not None:
            cleared = await self.redis.hdel(self.credit_key(channel), str(tenant_id))
            state = await self.status(channel)
            return ServiceState(**{**state.as_dict(), "changed": bool(cleared)})
        cleared = await self.redis.delete(self.credit_key(channel))
        state = await self._change(channel, "running", by)
        if cleared and not state.changed:
            state = ServiceState(**{**state.as_dict(), "changed": True})
        return state

    async def stop(self, channel: str, by: str) -> ServiceState:
        return await self._change(channel, "stopped", by)

    async def restart(self, channel: str, by: str) -> ServiceState:
        """Stop, then start: the channel ends up running, ``since`` now."""
        await self.stop(channel, by)
        return await self.start(channel, by)

    async def _change(self, channel: str, state: State, by: str) -> ServiceState:
        now = int(time.time() * 1000)
        raw = await self._set(keys=[self.key(channel)], args=[state, now, by])
        new_state, since, who, changed = (_text(x) for x in raw)
        return ServiceState(
            service=channel,
            state="stopped" if new_state == "stopped" else "running",
            since=int(since) if since else None,
            by=who or None,
            changed=changed == "1",
        )


def fair_share(deps: Deps) -> FairShare:
    """The channels' send rates, shared between tenants, OTPs first (one per context)."""
    # A message that gives its consumer slot up comes back through the delayed store, up
    # to a promote interval late: it leaves early enough to be back before its turn.
    hold = max(0.1, 2 * deps.settings.engine.promote_interval_s)
    return FairShare(deps.redis, deps.engine.keys, hold_s=hold)


def send_key(channel: str, account: str | None) -> str:
    """The send rate a message takes its turn at (imsys/streams/fair.py): its channel on
    its provider account (None: the global one). OTPs and billing share it."""
    return f"notify:{channel}:{account or '-'}"


def _text(value: object) -> str:
    """A reply value as text, whether or not the client decodes responses."""
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)
