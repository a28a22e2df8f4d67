"""`python -m imsys schema` and the documents that describe the stream contract."""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any, get_args

import orjson
import pytest

from imsys.backend_events import EVENTS
from imsys.contract import document
from imsys.publisher import EventType, off_contract
from tests.conftest import ROOT
from tests.sync_support import Stack

README = ROOT / "README.md"
DESIGN = ROOT.parent / "shared" / "DESIGN.md"
PUBLISH = re.compile(r"\.publish\(\s*\"(\w+)\"")


def table_after(text: str, heading: str) -> list[list[str]]:
    """The cells of the first Markdown table after ``heading``, header rows left out."""
    start = text.index(heading)
    rows: list[list[str]] = []
    skip = 0 if heading.startswith("|") else 1  # a table's own header line, or a heading
    for line in text[start:].splitlines()[skip:]:
        if line.startswith("|"):
            rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip("|"))])
        elif rows:
            break
    return rows[2:]


def names(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def fields(cell: str) -> dict[str, bool]:
    """README's payload cell: ``name`` required, ``name?`` optional."""
    return {n.rstrip("?"): not n.endswith("?") for n in names(cell)}


def required(schema: dict[str, Any]) -> dict[str, bool]:
    return {p: p in schema.get("required", []) for p in schema["properties"]}


def test_schema_command_prints_every_job_and_event() -> None:
    """`python -m imsys schema` prints JSON Schema for each registered job type and
    each declared backend event (the same document `imsys.contract` builds)."""
    out = subprocess.run(
        [sys.executable, "-m", "imsys", "schema"], capture_output=True, cwd=ROOT, check=True
    )
    doc = orjson.loads(out.stdout)
    assert doc == orjson.loads(orjson.dumps(document()))
    assert doc["jobs"]["sync"]["sync_subscriber"]["payload"]["required"] == ["subscriber_id"]
    assert doc["jobs"]["events"]["whatsapp_otp"]["secret_fields"] == ["otp"]
    assert set(doc["events"]) == set(EVENTS)


async def test_schema_jobs_are_exactly_the_registered_handlers(stack: Stack) -> None:
    """The JobSpecs the schema finds are the job types the running service dispatches
    (the registry `register_domains` fills), no more, no fewer."""
    registry = stack.engine.registry
    registered = {(s, t) for s in registry.streams for t in registry.types(s)}
    in_schema = {(s, t) for s, types in document()["jobs"].items() for t in types}
    assert in_schema == registered


def test_every_published_event_has_a_declared_payload() -> None:
    """`EventType` and every ``events.publish("...")`` in the code name declared events,
    and every declared event is a possible `EventType`."""
    assert set(get_args(EventType)) == set(EVENTS)
    published = {
        m for path in (ROOT / "imsys").rglob("*.py") for m in PUBLISH.findall(path.read_text())
    }
    assert published, "the scan found no publish call"
    assert published <= set(EVENTS)


def test_publisher_flags_a_payload_off_contract() -> None:
    """A payload with a missing or an undeclared key is flagged; the declared one is not."""
    good = {"router_id": 3, "error": "timed out"}
    assert off_contract("router_offline", good) is False
    assert off_contract("router_offline", {"router_id": 3}) is True
    assert off_contract("router_offline", {**good, "extra": 1}) is True


def test_readme_tables_match_the_schema() -> None:
    """README's job and backend-event tables list exactly the schema's types, each with
    exactly its payload's fields (``name?`` for the optional ones)."""
    doc = document()
    text = README.read_text()
    jobs = {}
    for stream, type_, payload, *_ in table_after(text, "### Job payloads"):
        for name in names(type_):
            jobs[(stream.strip("`"), name)] = fields(payload)
    expected = {
        (stream, t): required(spec["payload"])
        for stream, types in doc["jobs"].items()
        for t, spec in types.items()
    }
    assert jobs == expected
    events = {}
    for type_, payload, *_ in table_after(text, "### Backend event payloads"):
        events[names(type_)[0]] = fields(payload)
    assert events == {t: required(e["payload"]) for t, e in doc["events"].items()}


@pytest.mark.skipif(not DESIGN.exists(), reason=f"{DESIGN} is not beside the repository")
def test_design_job_table_is_in_the_schema() -> None:
    """Every job type DESIGN.md's contract names exists on its stream, with every field
    DESIGN names, and needs no field DESIGN leaves out."""
    doc = document()
    rows = table_after(DESIGN.read_text(), "| stream | type | payload |")
    assert len(rows) >= 10
    for stream, type_, payload in rows:
        design_fields = set(re.findall(r'"(\w+)":', payload))
        for name in names(type_):
            schema = doc["jobs"][stream][name]["payload"]
            assert design_fields <= set(schema["properties"]), name
            assert set(schema.get("required", [])) <= design_fields, name


def test_design_and_readme_name_the_stream_and_prefix() -> None:
    """The backend-events stream the docs name is the one the publisher writes."""
    from imsys.streams.keys import Keys

    assert Keys("imsys").backend_events == "imsys:backend-events"
    assert "imsys:backend-events" in README.read_text()
