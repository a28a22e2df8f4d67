"""The dashboard's operator controls in a real headless Chromium: a stream's paused badge
and its Pause / Resume button, a router in maintenance marked, against the real admin
server (as the service builds it) and stack."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from imsys.app import build_http
from imsys.sync.maintenance import set_maintenance
from tests.browser import Browser, available, png_pixels
from tests.sync_support import Stack

TOKEN = "test-token"  # the `settings` fixture's

needs_chromium = pytest.mark.skipif(
    not available(), reason="Debian's chromium is not installed (make test runs scripts/browser.sh)"
)

STATE = """(() => {
  const row = (s) => document.querySelector(`#streams tr[data-stream="${s}"]`);
  return JSON.stringify({
    paused: ["sync", "billing", "events", "bouncer"].filter(
      (s) => row(s) && row(s).dataset.paused === "true"),
    badges: [...document.querySelectorAll("#streams .state-paused")].map((b) => b.textContent),
    syncButton: row("sync") && row("sync").querySelector("button[data-pause]").textContent,
    cells: [...document.querySelectorAll("#streams tbody tr")].map((r) => r.cells.length),
    maintenance: [...document.querySelectorAll("#routers [data-maintenance]")]
      .map((b) => [b.dataset.maintenance, b.textContent, b.title]),
    errors: [...document.querySelectorAll("[data-error]")]
      .map((e) => e.textContent).filter(Boolean),
  });
})()"""


@needs_chromium
async def test_dashboard_pauses_and_resumes_a_stream_and_marks_maintenance(
    isolated_stack: Stack, tmp_path: Path
) -> None:
    """The Pause button of a stream pauses it in the engine (badge and Resume shown), the
    Resume button resumes it; a router in maintenance carries a mark with its end."""
    stack = isolated_stack
    # Well inside the hour it is shown in (2 h exactly can round to "2h 0m").
    until = datetime.now(UTC) + timedelta(hours=1, minutes=50)
    await set_maintenance(stack.db, stack.router_id, until)
    async with (
        TestServer(build_http(stack.deps), host="127.0.0.1") as server,
        Browser(width=1400, height=1000) as browser,
    ):
        await browser.goto(f"http://127.0.0.1:{server.port}/#token={TOKEN}")
        await browser.wait_for(
            "document.querySelectorAll('#streams tbody tr').length === 4"
            " && document.querySelectorAll('#routers [data-maintenance]').length === 1"
        )
        before = json.loads(await browser.evaluate(STATE))
        await browser.click('#streams button[data-pause="sync"]')
        await browser.wait_for(
            "document.querySelector('#streams tr[data-stream=\"sync\"]').dataset.paused === 'true'"
        )
        paused = json.loads(await browser.evaluate(STATE))
        engine_paused = stack.engine.consumers["sync"].paused
        redis_paused = await stack.engine.pauses.paused()
        png = await browser.screenshot()
        (tmp_path / "controls.png").write_bytes(png)
        await browser.click('#streams button[data-pause="sync"]')
        await browser.wait_for(
            "document.querySelector('#streams tr[data-stream=\"sync\"]').dataset.paused === 'false'"
        )
        resumed = json.loads(await browser.evaluate(STATE))
        exceptions = browser.exceptions()

    assert before["paused"] == []
    assert before["syncButton"] == "Pause"
    assert set(before["cells"]) == {10}  # the controls sit in the stream's own cell
    [(router_id, text, title)] = before["maintenance"]
    assert router_id == str(stack.router_id)
    assert text.startswith("maintenance, ends in 1h")
    assert datetime.fromisoformat(title.replace("Z", "+00:00")) == until.replace(
        microsecond=until.microsecond // 1000 * 1000
    )
    assert paused["paused"] == ["sync"]
    assert paused["badges"] == ["paused"]
    assert paused["syncButton"] == "Resume"
    assert engine_paused is True
    assert list(redis_paused) == ["sync"]
    assert resumed["paused"] == []
    assert resumed["syncButton"] == "Pause"
    assert stack.engine.consumers["sync"].paused is False
    assert await stack.engine.pauses.paused() == {}
    assert not paused["errors"]
    assert not exceptions
    width, height, _ = png_pixels(png)
    assert (width, height) == (1400, 1000)
