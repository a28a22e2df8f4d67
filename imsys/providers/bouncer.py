"""Bouncer API v1.1 client: batch e-mail verification (create, status, download, end).

It knows the HTTP API and nothing else: no queue, no database. Every failure comes out as
a `ProviderError` (see `imsys.providers.errors`); the API key never appears in one.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Final, TypeVar
from urllib.parse import quote

import aiohttp
import orjson

from imsys.provider_settings import BouncerConfig
from imsys.providers._http import HttpProvider
from imsys.providers._jsonstream import JsonStreamError, iter_json_array
from imsys.providers.errors import ProviderAuthError, ProviderRejected

__all__ = ["MAX_BATCH_SIZE", "BatchStatus", "BouncerClient", "CreatedBatch"]

PROVIDER: Final = "bouncer"
MAX_BATCH_SIZE: Final = 100_000
_BATCH_PATH: Final = "/v1.1/email/verify/batch"

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class CreatedBatch:
    """Bouncer's answer to a batch creation."""

    batch_id: str
    quantity: int
    duplicates: int
    status: str


@dataclass(frozen=True, slots=True)
class BatchStatus:
    """Where a batch stands.

    ``status`` is passed on as Bouncer sent it: ``queued``, ``processing``, ``completed``,
    or anything else it may start sending, which the caller should treat as not finished
    and worth an alert.
    """

    batch_id: str
    status: str
    processed: int
    quantity: int

    @property
    def completed(self) -> bool:
        return self.status == "completed"


class BouncerClient:
    """Bouncer API v1.1 batch calls over the caller's `aiohttp.ClientSession`.

    The session is the caller's to open and close; one session may serve every client.
    """

    def __init__(self, session: aiohttp.ClientSession, config: BouncerConfig) -> None:
        key = config.api_key.get_secret_value()
        self._has_key = bool(key)
        self._headers = {"x-api-key": key, "Accept": "application/json"}
        self._http = HttpProvider(session, PROVIDER, timeout=config.timeout,
                                  connect_timeout=config.connect_timeout, secrets=(key,))
        # A download may take minutes, but a silent connection fails after ``timeout``.
        self._download_timeout = aiohttp.ClientTimeout(
            total=config.download_timeout,
            connect=min(config.connect_timeout, config.download_timeout),
            sock_read=config.timeout,
        )
        self._batches = config.base_url + _BATCH_PATH

    async def create_batch(self, emails: Sequence[tuple[str, str]]) -> CreatedBatch:
        """Submit ``(email, name)`` pairs (1 to 100,000); Bouncer echoes ``name`` in results.

        A `ProviderUnavailable` with ``maybe_applied`` means the batch may exist (and cost
        credits) although its id never arrived.
        """
        if not 1 <= len(emails) <= MAX_BATCH_SIZE:
            raise ProviderRejected(PROVIDER, "batch not sent",
                                   detail=f"{len(emails)} e-mails; a batch takes 1 to "
                                          f"{MAX_BATCH_SIZE}")
        self._check_key()
        body = orjson.dumps([{"email": email, "name": name} for email, name in emails])
        data = await self._http.json(
            "POST", self._batches, data=body,
            headers={**self._headers, "Content-Type": "application/json"},
        )
        batch_id = _get(data, "batchId", str)
        if not batch_id:
            raise self._http.bad_answer(200, "creation answered without a batchId",
                                        mutating=True)
        return CreatedBatch(
            batch_id=batch_id,
            quantity=_get(data, "quantity", int) or 0,
            duplicates=_get(data, "duplicates", int) or 0,
            status=_get(data, "status", str) or "queued",
        )

    async def batch_status(self, batch_id: str) -> BatchStatus:
        """The batch's status and progress."""
        self._check_key()
        data = await self._http.json("GET", self._url(batch_id), headers=self._headers)
        status = _get(data, "status", str)
        if status is None:
            raise self._http.bad_answer(200, "status answered without a status",
                                        mutating=False)
        return BatchStatus(
            batch_id=_get(data, "batchId", str) or batch_id,
            status=status,
            processed=_get(data, "processed", int) or 0,
            quantity=_get(data, "quantity", int) or 0,
        )

    async def download(self, batch_id: str) -> list[dict[str, Any]]:
        """Every result record of a completed batch (``download=all``)."""
        async with aclosing(self.iter_download(batch_id)) as records:
            return [record async for record in records]

    async def iter_download(self, batch_id: str) -> AsyncGenerator[dict[str, Any], None]:
        """The result records of a completed batch, parsed as they arrive.

        For storing results in slices without holding 100,000 of them. The whole download,
        the caller's work between records included, must fit in ``download_timeout``. Wrap
        it in `contextlib.aclosing` when the loop may stop early, so the connection is
        released at once.
        """
        self._check_key()
        url = self._url(batch_id) + "/download"
        async with self._http.open("GET", url, params={"download": "all"},
                                   headers=self._headers,
                                   client_timeout=self._download_timeout) as resp:
            count = 0
            try:
                async for record in iter_json_array(resp.content):
                    if not isinstance(record, dict):
                        raise self._http.bad_answer(
                            resp.status, f"record {count} is not an object", mutating=False
                        )
                    count += 1
                    yield record
            except JsonStreamError as exc:
                raise self._http.bad_answer(resp.status, f"download after {count} records: "
                                            f"{exc}", mutating=False) from None

    async def delete_batch(self, batch_id: str) -> None:
        """Delete the batch and its results at Bouncer."""
        self._check_key()
        await self._http.json("DELETE", self._url(batch_id), headers=self._headers)

    async def finish_batch(self, batch_id: str) -> None:
        """Stop verifying now; addresses not yet done come back ``unknown``, credits returned."""
        self._check_key()
        await self._http.json("POST", self._url(batch_id) + "/finish", headers=self._headers)

    def _url(self, batch_id: str) -> str:
        if not batch_id:
            raise ProviderRejected(PROVIDER, "request not sent", detail="empty batch id")
        # The id is only ever a path segment, whatever it contains.
        return f"{self._batches}/{quote(batch_id, safe='')}"

    def _check_key(self) -> None:
        if not self._has_key:
            raise ProviderAuthError(PROVIDER, "no API key configured",
                                    detail="set bouncer.api_key")


def _get(data: Any, key: str, kind: type[_T]) -> _T | None:
    """``data[key]`` when ``data`` is an object and the value has the expected type."""
    if not isinstance(data, dict):
        return None
    value = data.get(key)
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    return None
