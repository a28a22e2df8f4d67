"""The admin API under abuse (huge bodies, retried creates, weak tokens), and Sentinel."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

from imsys.chaos.bed import Bed
from imsys.chaos.process import Service, until
from imsys.chaos.report import Row
from imsys.chaos.servers import free_port

HTTP_TARGET = "30 MB → 413 with RSS +≤ 20 MB; Idempotency-Key → first answer; weak tokens refused"
BODY_MB = 30
RSS_LIMIT_MB = 20.0
WEAK_TOKENS = (" change-me", "Change-Me", "x")


async def _huge_post(svc: Service, token: str) -> int:
    """POST a 30 MB JSON body, streaming it; the status, also when the server answers
    early and closes (0 when it never answered)."""
    size = BODY_MB * 1024 * 1024
    reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
    head = (
        f"POST /api/subscribers HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {size}\r\nConnection: close\r\n\r\n"
    ).encode()
    chunk = b"x" * (1024 * 1024)
    try:
        writer.write(head + b'{"pad": "')
        sent = 9
        while sent < size - 2:
            part = chunk[: min(len(chunk), size - 2 - sent)]
            writer.write(part)
            sent += len(part)
            await writer.drain()
        writer.write(b'"}')
        await writer.drain()
    except (ConnectionError, OSError):
        pass  # answered and closed early: read what it said
    try:
        line = await asyncio.wait_for(reader.readline(), 10)
    except (ConnectionError, OSError, TimeoutError):
        line = b""
    finally:
        writer.close()
    parts = line.split()
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def _listening(port: int) -> bool:
    """Whether anything listens on `port` (read from /proc: no packet is sent)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) > 3 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


async def _token_refused(bed: Bed, token: str) -> bool:
    """Start the service on 0.0.0.0 with `token`: True when it refuses to start. If it
    starts listening it is killed at once (no traffic is ever sent to it)."""
    port = free_port()
    svc = Service(
        bed,
        "weak",
        bed.env(
            IMSYS_HTTP__HOST="0.0.0.0",  # noqa: S104 - only to see it refuse, IMSYS_HTTP__PORT=str(port),
            IMSYS_HTTP__TOKEN=token,
        ),
    )
    bed.services.append(svc)
    await svc.start(wait=False)

    async def decided() -> bool:
        return not svc.alive or _listening(port)

    await until(decided, 15, 0.05)
    refused = not svc.alive and svc.proc is not None and svc.proc.returncode != 0
    await svc.kill()
    return refused


async def http(bed: Bed) -> Row:
    """Body limit, Idempotency-Key on a retried create, and the token policy beyond loopback."""
    row = Row("http", HTTP_TARGET)
    svc = await bed.service("a")
    await bed.network(svc)
    wrong: list[str] = []
    # Warm the server up so the baseline includes its normal working set.
    for _ in range(20):
        await bed.call(svc, "GET", "/api/queues")
    before = svc.rss_mb()
    status = await _huge_post(svc, bed.token)
    await asyncio.sleep(1.0)
    grown = svc.rss_mb() - before
    if status != 413:
        wrong.append(f"30 MB body answered {status or 'nothing'}")
    if grown > RSS_LIMIT_MB:
        wrong.append(f"RSS grew {grown:.0f} MB")
    key = {"Idempotency-Key": f"chaos-{secrets.token_hex(8)}"}
    body = bed.subscriber_body("idem00001")
    first = await bed.call(svc, "POST", "/api/subscribers", body, headers=key)
    again = await bed.call(svc, "POST", "/api/subscribers", body, headers=key)
    if first[0] != 201 or again != first:
        wrong.append(f"retried create: {first[0]} then {again[0]} {str(again[1])[:80]}")
    accepted = [t for t in WEAK_TOKENS if not await _token_refused(bed, t)]
    if accepted:
        wrong.append("accepted on 0.0.0.0: " + ", ".join(repr(t) for t in accepted))
    row.false_statuses = len(wrong)
    row.measured = (
        f"30 MB → {status or 'no answer'}, RSS {grown:+.0f} MB; retry → {again[0]}"
        f"{' (first answer)' if again == first else ''}; weak tokens accepted: {len(accepted)}/3"
    )
    row.notes.extend(wrong)
    row.ok = not wrong
    return row
