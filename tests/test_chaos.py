"""The chaos suite's short run (`python -m imsys chaos --short --json`), as `make test` runs it.

It starts its own private Redis and PostgreSQL servers, so it needs neither of the shared
ones; it fails while any row fails and names those rows with what was measured.
"""

from __future__ import annotations

import os
import subprocess
import sys

import orjson
import pytest

from tests.conftest import ROOT


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMSYS_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_chaos_short_every_row_ok() -> None:
    """Every row of the short chaos run meets its target (0 lost, 0 overlapping, 0 false
    statuses, 0 stalls); a row that cannot run here is skipped with its reason."""
    proc = subprocess.run(
        [sys.executable, "-m", "imsys", "chaos", "--short", "--json"],
        env=_env(),
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    rows = []
    for line in proc.stdout.splitlines():
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(row, dict) and "scenario" in row:
            rows.append(row)
    assert rows, f"no rows (exit {proc.returncode}): {proc.stdout[-1500:]} {proc.stderr[-1500:]}"
    if all(r["ok"] == "skipped" for r in rows):
        pytest.skip("; ".join(sorted({r["skipped"] for r in rows})))
    failed = [r for r in rows if r["ok"] is not True and r["ok"] != "skipped"]
    report = "\n".join(
        f"{r['scenario']}: lost={r['lost']} overlapping={r['overlapping']} "
        f"false_statuses={r['false_statuses']} stalls={r['stalls']} | {r['measured']} "
        f"| target: {r['target']} | {'; '.join(r['notes'])}"
        for r in failed
    )
    assert not failed, f"{len(failed)} chaos row(s) miss their target:\n{report}"
    assert proc.returncode == 0, proc.stderr[-2000:]
