"""README's domain examples (the fenced blocks after ``<!-- example -->``), run in order in
one shell against a live service, its RouterOS and gateway simulators."""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import aiohttp
import pytest
from pydantic import SecretStr

from imsys.settings import Settings
from tests.conftest import ROOT, TEST_REDIS_URL, subprocess_env
from tests.test_sync_processes import Service

README = ROOT / "README.md"
BLOCK = re.compile(r"<!-- example -->\n```(sh|python)\n(.*?)```", re.DOTALL)
TOOLS = ("curl", "jq", "redis-cli", "bash")

pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in TOOLS),
    reason=f"the README's examples need {', '.join(TOOLS)}",
)


def examples() -> list[tuple[str, str]]:
    """(language, code) of each marked block, in README order."""
    return [(m[1], m[2]) for m in BLOCK.finditer(README.read_text())]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def localize(code: str, *, prefix: str, http: int, router: int) -> str:
    """The README's defaults (port 8080 and 8728, prefix ``imsys``, the local Redis) as
    this test's live service has them; nothing else of the code changes."""
    code = code.replace("127.0.0.1:8080", f"127.0.0.1:{http}")
    code = code.replace('"port": 8728', f'"port": {router}')
    code = code.replace("redis-cli ", f"redis-cli -u {TEST_REDIS_URL} ")
    code = code.replace("redis.Redis(", f"redis.Redis.from_url({TEST_REDIS_URL!r}, ")
    return re.sub(r"\bimsys:(?=[a-z])", f"{prefix}:", code)


def script(blocks: list[tuple[str, str]], **where: int | str) -> str:
    lines = ["set -euo pipefail"]
    for i, (lang, code) in enumerate(blocks):
        lines.append(f"echo '### example {i}' >&2")
        code = localize(code, **where)  # type: ignore[arg-type]
        if lang == "python":
            lines += ["python - <<'PYTHON'", code.rstrip("\n"), "PYTHON"]
        else:
            lines.append(code)
        lines.append(f"echo '### example {i} done'")
    return "\n".join(lines) + "\n"


@pytest.fixture
def simulators() -> Iterator[tuple[int, int]]:
    """`python -m imsys sim routeros` and `sim gateway`, as the README starts them."""
    ports = free_port(), free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "imsys", "sim", which, "--port", str(port)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for which, port in zip(("routeros", "gateway"), ports, strict=True)
    ]
    try:
        for port in ports:
            deadline = time.monotonic() + 30
            while True:
                assert all(p.poll() is None for p in procs), "a simulator exited"
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, f"nothing listens on {port}"
                    time.sleep(0.1)
        yield ports
    finally:
        for p in procs:
            p.kill()
            p.wait(10)


async def wait_healthy(url: str, service: Service) -> None:
    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession() as http:
        while True:
            assert service.proc.poll() is None, service.output()[-3000:]
            assert time.monotonic() < deadline, service.output()[-3000:]
            try:
                async with http.get(f"{url}/healthz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)


async def test_readme_examples_run_against_a_live_service(
    settings: Settings, prefix: str, isolated_database: str, simulators: tuple[int, int]
) -> None:
    """Every marked README example runs, in order, against `python -m imsys run`: the
    subscriber syncs, bills and payments go through, an OTP and a service_control job are
    answered on the backend-events stream, and the Python consumer reads them."""
    blocks = examples()
    assert len(blocks) >= 9
    router_port, gateway_port = simulators
    http_port = free_port()
    settings = settings.model_copy(
        update={
            "database": settings.database.model_copy(update={"url": SecretStr(isolated_database)})
        }
    )
    env = subprocess_env(
        settings,
        IMSYS_HTTP__PORT=str(http_port),
        IMSYS_HTTP__TOKEN="change-me",
        IMSYS_RECOVERY__ENABLED="false",
        IMSYS_WHATSAPP__BASE_URL=f"http://127.0.0.1:{gateway_port}/v21.0",
        IMSYS_ENGINE__READ_BLOCK_MS="100",
        IMSYS_SYNC__OUTBOX_POLL_S="0.2",
    )
    service = Service(env)
    try:
        await wait_healthy(f"http://127.0.0.1:{http_port}", service)
        code = script(blocks, prefix=prefix, http=http_port, router=router_port)
        run_env = {**env, "PATH": f"{ROOT / '.venv' / 'bin'}:{env.get('PATH', '')}"}
        run_env["PATH"] = f"{sys.executable.rsplit('/', 1)[0]}:{run_env['PATH']}"
        done = await asyncio.to_thread(
            subprocess.run,
            ["bash", "-c", code],
            cwd=ROOT,
            env=run_env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        out = done.stdout
        failed = done.stderr.strip().splitlines()[-1:] if done.returncode else []
        assert done.returncode == 0, f"{failed}\n{done.stderr[-3000:]}\n{out[-3000:]}"
        for i in range(len(blocks)):
            assert f"### example {i} done" in out
        assert "subscriber_synced {'subscriber_id'" in out  # the Python consumer's print
        assert '"duplicate":false' in out  # the payment was recorded once
        assert '"/api/subscribers/bulk"' in out  # from the OpenAPI document
        assert '["subscriber_id"]' in out
    finally:
        service.kill()
