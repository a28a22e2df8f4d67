"""The stream contract as JSON Schema: ``python -m imsys schema``.

Every job payload comes from its `JobSpec` (the model the engine validates the entry
with), found in the domain packages' modules; every backend-event payload from
`imsys.backend_events.EVENTS` (the model the publisher checks it against). Nothing here
is written by hand, so a backend in another language can generate its types from it,
and ``tests/test_contract.py`` holds DESIGN.md's and README's tables to it.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Final

from imsys.backend_events import EVENTS
from imsys.streams.job import JobSpec

# The packages that register job handlers with the engine (each has a ``domain.py``).
DOMAINS: Final = ("imsys.sync", "imsys.billing", "imsys.events", "imsys.bouncer")
DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"


def job_specs() -> list[JobSpec[Any]]:
    """Every JobSpec declared at module level in the domain packages, by stream and name."""
    found: dict[tuple[str, str], JobSpec[Any]] = {}
    for package in DOMAINS:
        pkg = importlib.import_module(package)
        for info in pkgutil.iter_modules(pkg.__path__, f"{package}."):
            module = importlib.import_module(info.name)
            for value in vars(module).values():
                if isinstance(value, JobSpec):
                    found[(value.stream, value.name)] = value
    return [found[key] for key in sorted(found)]


def _job(spec: JobSpec[Any]) -> dict[str, Any]:
    schema = spec.model.model_json_schema(mode="validation")
    out: dict[str, Any] = {"stream": spec.stream, "payload": schema}
    if spec.secret_fields:
        out["secret_fields"] = list(spec.secret_fields)
    return out


def document() -> dict[str, Any]:
    """``{"jobs": {stream: {type: {...}}}, "events": {type: {...}}}`` with each payload's
    JSON Schema (draft 2020-12)."""
    jobs: dict[str, dict[str, Any]] = {}
    for spec in job_specs():
        jobs.setdefault(spec.stream, {})[spec.name] = _job(spec)
    events = {
        name: {"when": e.when, "payload": e.model.model_json_schema(mode="validation")}
        for name, e in sorted(EVENTS.items())
    }
    return {
        "$schema": DIALECT,
        "title": "imsys stream contract",
        "description": "Job entries on <prefix>:<stream> carry the string fields type, "
        "payload (JSON, as below), and optionally job_id, attempt, enqueued_at (epoch ms). "
        "Backend events on <prefix>:backend-events carry type, payload (JSON, as below) "
        "and ts (epoch ms).",
        "jobs": jobs,
        "events": events,
    }
