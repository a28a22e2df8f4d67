"""Sync payloads whose ids no database row can have are dead-lettered at once."""

from __future__ import annotations

import pytest

from tests.sync_support import Stack


@pytest.mark.parametrize(
    ("type_", "field", "value"),
    [
        ("sync_subscriber", "subscriber_id", 2**64),
        ("sync_subscriber", "subscriber_id", 2**63),
        ("sync_subscriber", "subscriber_id", 0),
        ("sync_router", "router_id", 2**64),
        ("reboot_router", "router_id", -1),
        ("expire_tenant", "tenant_id", 2**70),
    ],
)
async def test_id_out_of_range_is_dead_lettered_at_once(
    stack: Stack, type_: str, field: str, value: int
) -> None:
    """An id outside 1..2**63-1 (a bigint) is InvalidJob: dead-lettered on the first
    attempt with the field named, never retried."""
    key = stack.engine.keys.stream("sync")
    # Written by hand: no JSON library here would encode an int past 64 bits.
    entry_id = await stack.deps.redis.xadd(
        key, {"type": type_, "payload": f'{{"{field}": {value}}}'}
    )
    await stack.engine.consumers["sync"].process_once(block_ms=10)
    letters = await stack.engine.dead_letters.list()
    [letter] = [d for d in letters if d.fields["original_id"] == entry_id]
    assert letter.fields["error"].startswith(f"InvalidJob: invalid payload for {type_}: {field}")
    assert letter.fields.get("attempt", "1") == "1"
    delayed = await stack.deps.redis.zrange(stack.engine.keys.delayed("sync"), 0, -1)
    assert not any(str(value) in member for member in delayed)
    assert (
        await stack.deps.redis.xpending_range(key, "imsys", min=entry_id, max=entry_id, count=1)
        == []
    )
