"""Many jobs with ``job_id``s in a few round trips: one script call per 500 jobs.

``Producer.enqueue`` costs one round trip per job and ``Producer.enqueue_many`` has no
``job_id``. Re-publishing thousands of intents (and relaying a billing run's messages)
needs both: every job deduplicated against one still waiting or running, without a
round trip each. ``ENQUEUE_UNIQUE_MANY`` makes the same decision per job as ``ENQUEUE``
(one script call per job, pipelined, cost the relay more CPU than the jobs it relayed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from imsys.streams.job import JobSpec, now_ms
from imsys.streams.jobids import DEDUPE_STALE_MS
from imsys.streams.keys import GROUP
from imsys.streams.producer import Enqueued, Producer

# Jobs per script call: big enough to amortise the round trip and the parse, small
# enough that Redis is never busy with one call for more than a few milliseconds.
PIPELINE = 500


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def enqueue_unique_many(
    producer: Producer,
    spec: JobSpec[Any],
    jobs: Sequence[tuple[BaseModel | Mapping[str, Any], str]],
) -> list[Enqueued]:
    """Enqueue ``(payload, job_id)`` pairs of ``spec``'s job, each payload validated first
    (InvalidJob); each is dropped while one like it waits or runs.

    Returns one ``Enqueued`` per job, in order (``duplicate`` for those dropped).
    """
    texts = [(spec.dump(payload), job_id) for payload, job_id in jobs]
    return await enqueue_entries(producer, spec.stream, spec.name, texts)


async def enqueue_entries(
    producer: Producer, stream: str, type_: str, jobs: Sequence[tuple[str, str]]
) -> list[Enqueued]:
    """``enqueue_unique_many`` for payloads already validated and serialised: the outbox
    relay's rows, written through a spec (``outbox.add``) and carrying its stream and type.
    """
    keys = producer.keys
    script = producer.scripts.enqueue_unique_many
    script_keys = [keys.stream(stream), keys.delayed(stream), keys.stats(stream)]
    out: list[Enqueued] = []
    for start in range(0, len(jobs), PIPELINE):
        chunk = jobs[start : start + PIPELINE]
        args: list[Any] = [GROUP, keys.dedupe_prefix(stream), now_ms(), DEDUPE_STALE_MS, type_]
        for text, job_id in chunk:
            args += (job_id, text)
        replies = await script(keys=script_keys, args=args)
        for reply in replies:
            result = _text(reply)
            if result.startswith("dup:"):
                out.append(Enqueued(None, running=result == "dup:running"))
            else:
                out.append(Enqueued(result))
    return out
