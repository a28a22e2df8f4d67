"""The sync benchmark's routers: RouterOS simulators in a child process of their own.

A real router does its work on its own CPU, not on imsys's: so the simulators run in a
separate process (multiprocessing, spawn), never in the service's and never in the
benchmark's event loop. The benchmark talks to them over a Pipe, outside the RouterOS
API, so what it reads (command counts, entries) and what it changes (drift, as an
operator would on the router's console) are not router API commands and are not counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import random
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from imsys.sim.routeros import RouterOSSimulator

# Fields that make a managed login what imsys wrote: drift changes one, a heal restores it.
_COMPARED = ("name", "password", "profile", "service", "disabled", "comment")


class _Routers:
    """The child's side: the simulators and the drift each one was given."""

    def __init__(self, sims: list[RouterOSSimulator]) -> None:
        self.sims = sims
        # Per router: name -> the managed entry as it was before drift.
        self.drifted: list[dict[str, dict[str, str]]] = [{} for _ in sims]
        # Per router: name -> the profile a managed entry had before `move_profiles`.
        self.moved: list[dict[str, str]] = [{} for _ in sims]

    def counts(self) -> list[dict[str, int]]:
        return [dict(sim.command_counts) for sim in self.sims]

    def managed(self, i: int, menu: str, tag: str) -> tuple[int, int]:
        """(entries, distinct names) carrying the managed comment `tag:sub=...`."""
        names = [
            row["name"]
            for row in self.sims[i].items(menu)
            if row.get("comment", "").startswith(f"{tag}:sub=")
        ]
        return len(names), len(set(names))

    def has(self, i: int, menu: str, name: str) -> int:
        return len(self._by_name(i, menu, name))

    def _by_name(self, i: int, menu: str, name: str) -> list[dict[str, str]]:
        # The state's own print, by its index on name: a lookup, not a walk of the menu.
        return self.sims[i].state.execute(menu, "print", {}, [f"?name={name}"]).rows

    def drift(self, i: int, menu: str, tag: str, count: int, seed: int) -> dict[str, int]:
        """Change `count` managed entries as someone on the router would: half removed,
        the rest disabled or moved to the built-in `default` profile, in turn."""
        state = self.sims[i].state
        rows = [r for r in self.sims[i].items(menu) if r.get("comment", "").startswith(f"{tag}:")]
        chosen = random.Random(seed).sample(rows, min(count, len(rows)))
        removed = altered = 0
        for n, row in enumerate(chosen):
            self.drifted[i][row["name"]] = {k: row[k] for k in _COMPARED if k in row}
            if n < len(chosen) // 2:
                state.execute(menu, "remove", {".id": row[".id"]}, [])
                removed += 1
            elif altered % 2 == 0:
                state.execute(menu, "set", {".id": row[".id"], "disabled": "yes"}, [])
                altered += 1
            else:
                state.execute(menu, "set", {".id": row[".id"], "profile": "default"}, [])
                altered += 1
        return {"removed": removed, "altered": altered}

    def move_profiles(self, i: int, menu: str, tag: str, profile: str, keep: str) -> int:
        """Move every managed entry but `keep` (a name) to `profile`, as someone on the
        router would: drift that reconciliation repairs with a `set` and that cuts nobody
        off (the mass-disconnect guard lets it through). Returns how many moved."""
        state = self.sims[i].state
        self.moved[i] = {}
        for row in self.sims[i].items(menu):
            if not row.get("comment", "").startswith(f"{tag}:sub=") or row["name"] == keep:
                continue
            self.moved[i][row["name"]] = row.get("profile", "")
            state.execute(menu, "set", {".id": row[".id"], "profile": profile}, [])
        return len(self.moved[i])

    def still_moved(self, i: int, menu: str) -> int:
        """How many entries `move_profiles` moved are not back on their profile yet."""
        now = {row["name"]: row.get("profile", "") for row in self.sims[i].items(menu)}
        return sum(1 for name, before in self.moved[i].items() if now.get(name) != before)

    def landed(self, i: int, menu: str, name: str, password: str) -> int | None:
        """None while entry `name` does not hold `password`; once it does, how many moved
        entries are still not back, read in the same step (no command runs in between)."""
        rows = self._by_name(i, menu, name)
        if len(rows) != 1 or rows[0].get("password") != password:
            return None
        return self.still_moved(i, menu)

    def healed(self, i: int, menu: str) -> int:
        """How many drifted entries are back: one entry by that name, as before."""
        good = 0
        for name, before in self.drifted[i].items():
            rows = self._by_name(i, menu, name)
            if len(rows) == 1 and all(rows[0].get(k) == v for k, v in before.items()):
                good += 1
        return good


def host_main(conn: Connection, count: int, username: str, password: str) -> None:
    """The child process: `count` simulators; their ports go back first, then it answers
    requests until the Pipe closes or says None."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(_host(conn, count, username, password))
    else:
        uvloop.run(_host(conn, count, username, password))


async def _host(conn: Connection, count: int, username: str, password: str) -> None:
    sims = [RouterOSSimulator(username=username, password=password) for _ in range(count)]
    for sim in sims:
        sim.set_resource(uptime="3d")  # a router in service, not one that just booted
        await sim.start("127.0.0.1", 0)
    routers = _Routers(sims)
    handlers: dict[str, Callable[..., Any]] = {
        "counts": routers.counts,
        "managed": routers.managed,
        "has": routers.has,
        "drift": routers.drift,
        "healed": routers.healed,
        "move_profiles": routers.move_profiles,
        "still_moved": routers.still_moved,
        "landed": routers.landed,
        "cpu": time.process_time,
    }
    loop = asyncio.get_running_loop()
    requests: asyncio.Queue[tuple[Any, ...] | None] = asyncio.Queue()

    def readable() -> None:
        try:
            requests.put_nowait(conn.recv())
        except (EOFError, OSError):
            loop.remove_reader(conn.fileno())
            requests.put_nowait(None)

    async def forget_sentences() -> None:
        # The sentence log is for tests; a long run would only pile it up (the counts
        # the benchmark reads are `command_counts`).
        while True:
            await asyncio.sleep(1)
            for sim in sims:
                sim.commands.clear()

    conn.send([sim.port for sim in sims])
    loop.add_reader(conn.fileno(), readable)
    forgetting = asyncio.create_task(forget_sentences())
    try:
        while (request := await requests.get()) is not None:
            name, *args = request
            try:
                conn.send(("ok", handlers[name](*args)))
            except Exception as exc:  # the parent raises it, with the reason
                conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        forgetting.cancel()
        with contextlib.suppress(OSError, ValueError):
            loop.remove_reader(conn.fileno())
        for sim in sims:
            await sim.stop()


class SimHost:
    """The parent's side: start the child, ask it things, stop it."""

    def __init__(self, count: int, username: str, password: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=host_main,
            args=(child, count, username, password),
            name="imsys-bench-routers",
            daemon=True,
        )
        self.process.start()
        child.close()
        self.ports: list[int] = []
        self._lock = threading.Lock()

    async def ready(self, limit: float = 60) -> list[int]:
        def wait() -> list[int]:
            if not self._conn.poll(limit):
                raise RuntimeError("the simulated routers did not start")
            ports: list[int] = self._conn.recv()
            return ports

        self.ports = await asyncio.to_thread(wait)
        return self.ports

    def _ask(self, *request: Any) -> Any:
        with self._lock:
            self._conn.send(request)
            status, value = self._conn.recv()
        if status != "ok":
            raise RuntimeError(f"simulated routers: {request[0]} failed: {value}")
        return value

    async def ask(self, *request: Any) -> Any:
        """One request to the child, off the event loop (the child may take a moment)."""
        return await asyncio.to_thread(self._ask, *request)

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._conn.send(None)
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self._conn.close()
