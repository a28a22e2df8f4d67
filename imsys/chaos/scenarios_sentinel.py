"""Redis Sentinel: a primary, a replica and three sentinels on loopback; the primary is
killed under load and imsys must follow the failover without losing work."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import orjson
from redis.asyncio import Redis

from imsys.chaos.bed import Bed
from imsys.chaos.process import must, until
from imsys.chaos.report import Row
from imsys.chaos.servers import ChaosSetupError, free_port

SENTINEL_TARGET = "primary killed under load: resumes ≤ 15 s, 0 lost"
MASTER = "chaosmaster"
RESUME_S = 15.0


def sentinel_supported() -> str | None:
    """None when imsys has Sentinel settings, else why the scenario cannot run."""
    from imsys.settings import RedisSettings

    if "sentinels" not in RedisSettings.model_fields:
        return "imsys has no Redis Sentinel settings yet"
    if shutil.which("redis-server") is None:
        return "redis-server is not installed"
    return None


class Nodes:
    """The Redis processes of this scenario (registered with the bed's reaper)."""

    def __init__(self, bed: Bed, root: Path) -> None:
        self.bed, self.root = bed, root
        self.procs: dict[str, asyncio.subprocess.Process] = {}

    async def spawn(self, name: str, *args: str) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ChaosSetupError("redis-server is not installed")
        proc = await asyncio.create_subprocess_exec(
            binary,
            *args,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        self.bed.reaper.add(proc.pid)
        self.procs[name] = proc

    async def node(self, name: str, port: int, *extra: str) -> None:
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        await self.spawn(
            name, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(folder), *extra,
        )  # fmt: skip

    async def sentinel(self, name: str, port: int, primary: int) -> None:
        conf = self.root / f"{name}.conf"
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {self.root}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {primary} 2\n"
            f"sentinel down-after-milliseconds {MASTER} 1000\n"
            f"sentinel failover-timeout {MASTER} 10000\n"
            f"sentinel parallel-syncs {MASTER} 1\n"
        )
        await self.spawn(name, str(conf), "--sentinel")

    async def kill(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
            self.bed.reaper.forget(proc.pid)

    async def close(self) -> None:
        for name in list(self.procs):
            await self.kill(name)


async def _primary_port(sentinel_port: int) -> int | None:
    client = Redis(host="127.0.0.1", port=sentinel_port, decode_responses=True)
    try:
        addr = await client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)  # type: ignore[no-untyped-call]
        return int(addr[1]) if addr else None
    except Exception:
        return None
    finally:
        await client.aclose()


async def _sentinels_ready(ports: list[int]) -> bool:
    for port in ports:
        client = Redis(host="127.0.0.1", port=port, decode_responses=True)
        try:
            peers = await client.execute_command("SENTINEL", "SENTINELS", MASTER)  # type: ignore[no-untyped-call]
            replicas = await client.execute_command("SENTINEL", "REPLICAS", MASTER)  # type: ignore[no-untyped-call]
        except Exception:
            return False
        finally:
            await client.aclose()
        if len(peers) < 2 or len(replicas) < 1:
            return False
    return True


async def sentinel(bed: Bed) -> Row:
    """Subscribers keep being created through the API; the primary is SIGKILLed."""
    row = Row("sentinel", SENTINEL_TARGET)
    reason = sentinel_supported()
    if reason is not None:
        return Row("sentinel", SENTINEL_TARGET, ok=None, skipped=reason)
    nodes = Nodes(bed, bed.root / "sentinel")
    nodes.root.mkdir(parents=True, exist_ok=True)
    primary, replica = free_port(), free_port()
    sentinels = [free_port() for _ in range(3)]
    try:
        await nodes.node("primary", primary)
        await nodes.node("replica", replica, "--replicaof", "127.0.0.1", str(primary))
        for i, port in enumerate(sentinels):
            await nodes.sentinel(f"sentinel{i}", port, primary)
        await must(lambda: _sentinels_ready(sentinels), 30, "the sentinels never saw each other")
        return await _failover(bed, row, nodes, sentinels, primary)
    finally:
        await nodes.close()


async def _failover(bed: Bed, row: Row, nodes: Nodes, sentinels: list[int], primary: int) -> Row:
    svc = await bed.service(
        "a",
        IMSYS_REDIS__URL=f"redis://127.0.0.1:{primary}/0",
        IMSYS_REDIS__SENTINELS=orjson.dumps([f"127.0.0.1:{p}" for p in sentinels]).decode(),
        IMSYS_REDIS__SENTINEL_MASTER=MASTER,
    )
    await bed.network(svc)
    sim = bed.sims[0]
    created: list[tuple[int, float]] = []
    refused = 0
    stop = asyncio.Event()

    async def load() -> None:
        nonlocal refused
        i = 0
        while not stop.is_set() and i < 5000:
            status, body = await bed.call(
                svc, "POST", "/api/subscribers", bed.subscriber_body(f"sn{i:05d}")
            )
            if status == 201:
                created.append((int(body["id"]), time.monotonic()))
            else:
                refused += 1
            i += 1
            await asyncio.sleep(0.1)

    task = asyncio.create_task(load())
    resume: float | None = None
    try:
        await asyncio.sleep(bed.t(5, 3))
        killed = time.monotonic()
        await nodes.kill("primary")

        async def resumed() -> bool:
            after = [sid for sid, at in created if at > killed]
            if not after:
                return False
            rows = await bed.sub_rows(after)
            return any(r["sync_status"] == "synced" for r in rows)

        if await until(resumed, bed.t(60, 30), 0.25) is not None:
            resume = time.monotonic() - killed
        await asyncio.sleep(bed.t(10, 3))
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
    ids = [sid for sid, _ in created]

    async def all_synced() -> bool:
        return (await bed.truth(ids, sim))[0] == len(ids)

    await until(all_synced, bed.t(60, 30), 0.5)
    healed, false, dups = await bed.truth(ids, sim)
    moved_to = await _primary_port(sentinels[0])
    row.lost, row.false_statuses, row.overlapping = len(ids) - healed, false, dups
    row.stalls = 0 if resume is not None and resume <= RESUME_S else 1
    row.measured = (
        f"{len(ids)} created under load, {refused} refused by the API; "
        + (f"resumed {resume:.1f} s after the kill" if resume is not None else "never resumed")
        + ("" if moved_to != primary else "; the sentinels never failed over")
    )
    row.ok = row.lost == 0 and row.stalls == 0 and false == 0 and dups == 0 and bool(ids)
    return row
