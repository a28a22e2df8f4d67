"""resend_notification: a failed message goes out again once; nothing else is touched."""

from __future__ import annotations

from imsys.billing.resend import RESEND_NOTIFICATION
from tests.test_billing import BillingStack, billing, customers, run_bills

__all__ = ["billing"]  # the fixture, shared with test_billing


async def _invoice(b: BillingStack) -> dict[str, object]:
    row = await b.stack.db.fetchrow(
        "SELECT id, status, attempts, error FROM notifications WHERE template = 'invoice'"
        " AND tenant_id = $1",
        b.stack.tenant_id,
    )
    assert row is not None
    return dict(row)


async def test_failed_message_is_sent_again_once(billing: BillingStack) -> None:
    """A message the gateway refused is queued again and sent once, however often resent."""
    await customers(billing, 1)
    await billing.settle()
    billing.gateway.fail_next(1, status=400, channel="sms")
    await run_bills(billing)
    note = await _invoice(billing)
    assert note["status"] == "failed"
    assert not billing.gateway.messages("sms")
    producer = billing.stack.engine.producer
    for _ in range(2):  # the second finds it sent and leaves it alone
        await producer.send(RESEND_NOTIFICATION, {"notification_id": note["id"]})
        await billing.settle()
    again = await _invoice(billing)
    assert again["status"] == "sent"
    assert again["error"] is None
    assert again["attempts"] == 2  # the refused try stays on the record
    assert len(billing.gateway.messages("sms")) == 1


async def test_resend_of_a_sent_message_sends_nothing(billing: BillingStack) -> None:
    """Only a failed message is re-queued: a sent one is not sent a second time."""
    await customers(billing, 1)
    await billing.settle()
    await run_bills(billing)
    note = await _invoice(billing)
    assert note["status"] == "sent"
    await billing.stack.engine.producer.send(RESEND_NOTIFICATION, {"notification_id": note["id"]})
    await billing.settle()
    assert len(billing.gateway.messages("sms")) == 1
    assert (await _invoice(billing))["attempts"] == 1


async def test_resend_of_an_unknown_message_is_dead_lettered(billing: BillingStack) -> None:
    """A notification id that names no message is a permanent error, with the reason."""
    await billing.stack.engine.producer.send(RESEND_NOTIFICATION, {"notification_id": 999_999})
    await billing.settle()
    [letter] = await billing.stack.engine.dead_letters.list(stream="billing")
    assert "notification 999999 does not exist" in letter.fields["error"]
