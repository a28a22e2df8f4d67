"""Run ``python -m imsys bench`` several times per workload and print the medians.

Usage: bench_median.py [RUNS]   (default 5). Workloads are the design card's two:
no-op at concurrency 50 over 20,000 jobs, and 10 ms jobs at concurrency 100 over 5,000.
Set BENCH_MILLION=1 to add the 1,000,000-job memory run.

Then ``python -m imsys bench sync`` 3 times each for 1 router x 10,000 subscribers and
10 routers x 10,000 (BENCH_SYNC=0 skips them), with one summary line of per-field
medians each (peak RSS: the largest), ``priority_change_s`` among them (issue 16's
target: an API change reaches the router within 2 s while 10,000 reconciliation jobs
wait).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from typing import Any

WORKLOADS = [(20_000, 0.0, 50), (5_000, 0.01, 100)]
SYNC_WORKLOADS = [(1, 10_000), (10, 10_000)]
SYNC_RUNS = 3


def run(jobs: int, sleep: float, concurrency: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "imsys", "bench", "--jobs", str(jobs), "--sleep", str(sleep),
         "--concurrency", str(concurrency)],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def run_sync(routers: int, subscribers: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "imsys", "bench", "sync", "--routers", str(routers),
         "--subscribers", str(subscribers)],
        check=True, stdout=subprocess.PIPE, text=True,  # progress stays on stderr
    ).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def sync_summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-field medians of the numeric figures (peak RSS: the largest), and of each
    command kind; a field a run did not reach (a timed-out phase: None) is left out of
    its median, and ``<field>_runs`` then says how many runs it has."""
    summary: dict[str, Any] = {"system": "imsys", "bench": "sync", "summary": "median",
                               "runs": len(results)}
    keys = list(dict.fromkeys(k for r in results for k in r))
    for key in keys:
        values = [r[key] for r in results if r.get(key) is not None]
        if not values:
            continue
        if all(isinstance(v, dict) for v in values):
            kinds = dict.fromkeys(k for v in values for k in v)
            summary[key] = {k: statistics.median(v.get(k, 0) for v in values) for k in kinds}
        elif not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            continue
        elif key == "peak_rss_mb":
            summary[key] = max(values)
        else:
            summary[key] = statistics.median(values)
        if len(values) < len(results):
            summary[f"{key}_runs"] = len(values)
    return summary


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    workloads = list(WORKLOADS)
    if os.environ.get("BENCH_MILLION"):
        workloads.append((1_000_000, 0.0, 50))
    for jobs, sleep, concurrency in workloads:
        results = [run(jobs, sleep, concurrency) for _ in range(runs if jobs < 1_000_000 else 1)]
        for r in results:
            print(json.dumps(r))
        summary = {
            "system": "imsys",
            "summary": "median",
            "runs": len(results),
            "n": jobs,
            "sleep": sleep,
            "concurrency": concurrency,
            "enqueue_per_s": round(statistics.median(r["enqueue_per_s"] for r in results)),
            "process_per_s": round(statistics.median(r["process_per_s"] for r in results)),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
            "stream_length_after": max(r["stream_length_after"] for r in results),
        }
        print(json.dumps(summary), flush=True)
    if os.environ.get("BENCH_SYNC", "1") == "0":
        return
    for routers, subscribers in SYNC_WORKLOADS:
        results = [run_sync(routers, subscribers) for _ in range(SYNC_RUNS)]
        for r in results:
            print(json.dumps(r))
        print(json.dumps(sync_summary(results)), flush=True)


if __name__ == "__main__":
    main()
