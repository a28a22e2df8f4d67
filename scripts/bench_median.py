"""Run ``python -m imsys bench`` several times per workload and print the medians.

Usage: bench_median.py [RUNS]   (default 5). Workloads are the design card's two:
no-op at concurrency 50 over 20,000 jobs, and 10 ms jobs at concurrency 100 over 5,000.
Set BENCH_MILLION=1 to add the 1,000,000-job memory run.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

WORKLOADS = [(20_000, 0.0, 50), (5_000, 0.01, 100)]


def run(jobs: int, sleep: float, concurrency: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "imsys", "bench", "--jobs", str(jobs), "--sleep", str(sleep),
         "--concurrency", str(concurrency)],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


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


if __name__ == "__main__":
    main()
