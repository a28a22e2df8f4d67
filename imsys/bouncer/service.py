"""User batches as the admin API takes and shows them."""

from __future__ import annotations

import asyncio
from typing import Any, Final, Literal

import asyncpg
from pydantic import BaseModel, ConfigDict, StrictStr

from imsys.bouncer import repo
from imsys.bouncer.emails import InvalidEmails, Prepared, prepare
from imsys.network.errors import Invalid, NotFound  # shared request errors: 400 and 404
from imsys.settings import BouncerBatchingSettings

# Above this many addresses, checking them runs in a thread so the event loop (consumers,
# timers, other requests) keeps turning meanwhile.
THREAD_ABOVE: Final = 20_000


class UserBatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    check_type: Literal["deliverable", "catchall"]
    emails: list[StrictStr]
    # The tenant the batch is for (a tenant's token: its own, the default); none: the
    # admin's, for no tenant in particular.
    tenant_id: int | None = None


async def submit(
    db: asyncpg.Pool, cfg: BouncerBatchingSettings, data: UserBatchIn
) -> dict[str, Any]:
    """Validate, normalise and de-duplicate the addresses, then store the user batch.

    The answer adds ``submitted`` and ``duplicates`` (addresses given more than once, in
    any spelling of the same mailbox) to the stored batch.
    """
    count = len(data.emails)
    if count == 0:
        raise Invalid("emails is empty: give at least one address")
    if count > cfg.max_user_batch:
        raise Invalid(
            f"emails has {count:,} addresses; one batch takes at most {cfg.max_user_batch:,}"
            " (split the list)"
        )
    try:
        if count > THREAD_ABOVE:
            prepared: Prepared = await asyncio.to_thread(prepare, data.emails)
        else:
            prepared = prepare(data.emails)
    except InvalidEmails as exc:
        raise Invalid(str(exc)) from None
    try:
        row = await repo.insert_user_batch(db, data.check_type, prepared, data.tenant_id)
    except asyncpg.ForeignKeyViolationError:
        raise NotFound(f"tenant {data.tenant_id}") from None
    return {**row, "submitted": prepared.submitted, "duplicates": prepared.duplicates}


async def get_user_batch(db: asyncpg.Pool, user_batch_id: int) -> dict[str, Any]:
    row = await repo.get_user_batch(db, user_batch_id)
    if row is None:
        raise NotFound(f"user batch {user_batch_id}")
    return row


async def list_user_batches(
    db: asyncpg.Pool, limit: int = 50, tenant_id: int | None = None
) -> list[dict[str, Any]]:
    """Newest first; one tenant's when given."""
    return await repo.list_user_batches(db, limit, tenant_id)
