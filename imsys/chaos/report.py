"""One row per scenario, and the table (or JSON lines) they print as."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

COLUMNS = (
    "scenario",
    "lost",
    "overlapping",
    "false statuses",
    "stalls",
    "measured",
    "target",
    "ok",
)


@dataclass
class Row:
    scenario: str
    target: str
    lost: int = 0
    overlapping: int = 0
    false_statuses: int = 0
    stalls: int = 0
    measured: str = ""
    # True, False, or None for a row that could not run here (`skipped` says why).
    ok: bool | None = False
    skipped: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def ok_text(self) -> str:
        if self.ok is None:
            return f"skipped ({self.skipped})"
        return "yes" if self.ok else "NO"

    def cells(self) -> list[str]:
        if self.ok is None:
            return [
                self.scenario,
                "-",
                "-",
                "-",
                "-",
                self.measured or "-",
                self.target,
                self.ok_text,
            ]
        return [
            self.scenario,
            str(self.lost),
            str(self.overlapping),
            str(self.false_statuses),
            str(self.stalls),
            self.measured,
            self.target,
            self.ok_text,
        ]

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = "skipped" if self.ok is None else self.ok
        return d


def table(rows: list[Row]) -> str:
    cells = [list(COLUMNS)] + [r.cells() for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = [
        "| " + " | ".join(c[i].ljust(widths[i]) for i in range(len(COLUMNS))) + " |" for c in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines.extend(f"  {r.scenario}: {note}" for r in rows for note in r.notes)
    return "\n".join(lines)


def json_lines(rows: list[Row]) -> str:
    return "\n".join(orjson.dumps(r.as_dict()).decode() for r in rows)
