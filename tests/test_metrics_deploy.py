"""deploy/prometheus/alerts.yml and deploy/grafana/imsys.json: valid for promtool, firing as
written, and using only metrics a live service really exports."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from imsys.settings import Settings
from tests.conftest import ROOT
from tests.test_metrics import fresh_service_scrape

ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "imsys.json"
METRIC = re.compile(r"\bimsys_[a-z_]+\b")
# A histogram's samples carry these after the family name.
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def find_promtool() -> str | None:
    """promtool from IMSYS_PROMTOOL, the PATH, or where scripts/promtool.sh unpacks it."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    candidates = [
        os.environ.get("IMSYS_PROMTOOL"),
        shutil.which("promtool"),
        str(
            Path(os.environ.get("IMSYS_PROMTOOL_DIR", cache / "imsys" / "prometheus"))
            / "usr"
            / "bin"
            / "promtool"
        ),
    ]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


PROMTOOL = find_promtool()
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is missing: run `make promtool` (scripts/promtool.sh)"
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=60, check=False
    )


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and template variables."""
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    for var in doc["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["definition"])
    return exprs


@needs_promtool
def test_alert_rules_pass_promtool_check() -> None:
    """`promtool check rules` accepts the file (PromQL, durations, label and annotation
    templates) and finds every alert the file declares: the five the operator asked for
    (dead letters rising, oldest pending, router offline, guard tripped, channel stopped)
    among them."""
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    names = [r["alert"] for r in alert_rules()]
    assert f"SUCCESS: {len(names)} rules found" in result.stdout
    assert {
        "ImsysDeadLettersRising",
        "ImsysOldestPendingTooOld",
        "ImsysRouterOffline",
        "ImsysRouterGuardTripped",
        "ImsysChannelStopped",
    } <= set(names)


def series(metric: str, values: str, /, **labels: str) -> dict[str, str]:
    """One input series of a promtool unit test, scraped as job "imsys"."""
    text = ",".join(f'{k}="{v}"' for k, v in {"job": "imsys", "instance": "a", **labels}.items())
    return {"series": f"{metric}{{{text}}}", "values": values}


def expect(alert: str, at: str, *fired: dict[str, str]) -> dict[str, Any]:
    """The alert at ``at``: each firing instance's labels and summary, or none."""
    rules = {r["alert"]: r for r in alert_rules()}
    severity = rules[alert]["labels"]["severity"]
    return {
        "eval_time": at,
        "alertname": alert,
        "exp_alerts": [
            {
                "exp_labels": {
                    "severity": severity,
                    "job": "imsys",
                    **{k: v for k, v in f.items() if k != "summary"},
                },
                "exp_annotations": {"summary": f["summary"]},
            }
            for f in fired
        ],
    }


@needs_promtool
def test_alert_rules_fire_as_written(tmp_path: Path) -> None:
    """Each alert fires on the series it is about, with the labels that say which stream,
    router or channel, and stays quiet on an idle installation whose series are all 0
    (run as `promtool test rules` on a copy keeping only each alert's summary)."""
    doc = yaml.safe_load(ALERTS.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule["annotations"] = {"summary": rule["annotations"]["summary"]}
    rules = tmp_path / "alerts.yml"
    rules.write_text(yaml.safe_dump(doc))
    info = {"router_id": "3", "name": "north", "tenant_id": "1"}
    firing = {
        "interval": "1m",
        "input_series": [
            series("imsys_dead_letters", "0x5 1 2x14"),
            series("imsys_stream_oldest_pending_age_seconds", "0+60x20", stream="sync"),
            series("imsys_stream_oldest_pending_age_seconds", "0x20", stream="billing"),
            series("imsys_router_info", "1x20", **info),
            series("imsys_router_online", "0x20", router_id="3"),
            series("imsys_router_guard_tripped", "1x20", router_id="3"),
            series("imsys_router_info", "1x20", router_id="4", name="south", tenant_id="1"),
            series("imsys_router_online", "1x20", router_id="4"),
            series("imsys_router_guard_tripped", "0x20", router_id="4"),
            series("imsys_channel_stopped", "1x80", channel="sms"),
            series("imsys_channel_stopped", "0x80", channel="email"),
            series("imsys_channel_out_of_credit_tenants", "0 2x20", channel="whatsapp"),
            series("imsys_stream_paused", "0 1x80", stream="billing"),
            series("imsys_stream_paused", "0x80", stream="sync"),
        ],
        "alert_rule_test": [
            # 0 until 5 m, 2 from 7 m: over the 15 min up to 20 m, 2 more.
            expect(
                "ImsysDeadLettersRising",
                "20m",
                {"summary": "imsys: dead letters rising (2 more in 15 min)"},
            ),
            # 16 min old at 16 m, over 10 min since 10 m: fires after its 5 min.
            expect("ImsysOldestPendingTooOld", "14m"),
            expect(
                "ImsysOldestPendingTooOld",
                "16m",
                {"stream": "sync", "summary": "imsys: stream sync has an entry pending for 16m 0s"},
            ),
            expect("ImsysRouterOffline", "4m"),
            expect(
                "ImsysRouterOffline",
                "6m",
                {**info, "summary": "imsys: router north (3) offline"},
            ),
            expect(
                "ImsysRouterGuardTripped",
                "1m",
                {**info, "summary": "imsys: guard tripped on router north (3)"},
            ),
            expect("ImsysChannelStopped", "59m"),
            expect(
                "ImsysChannelStopped",
                "61m",
                {"channel": "sms", "summary": "imsys: channel sms stopped for over an hour"},
            ),
            expect(
                "ImsysChannelOutOfCredit",
                "2m",
                {
                    "channel": "whatsapp",
                    "summary": "imsys: channel whatsapp out of credit for 2 tenant(s)",
                },
            ),
            expect("ImsysStreamPaused", "60m"),
            expect(
                "ImsysStreamPaused",
                "62m",
                {"stream": "billing", "summary": "imsys: stream billing paused for over an hour"},
            ),
            expect("ImsysMetricsAbsent", "10m"),
        ],
    }
    idle = {
        "interval": "1m",
        "input_series": [
            series("imsys_dead_letters", "0x120"),
            series("imsys_stream_oldest_pending_age_seconds", "0x120", stream="sync"),
            series("imsys_stream_lag", "0x120", stream="sync"),
            series("imsys_router_info", "1x120", **info),
            series("imsys_router_online", "1x120", router_id="3"),
            series("imsys_router_guard_tripped", "0x120", router_id="3"),
            series("imsys_channel_stopped", "0x120", channel="sms"),
            series("imsys_channel_out_of_credit_tenants", "0x120", channel="sms"),
            series("imsys_stream_paused", "0x120", stream="sync"),
        ],
        "alert_rule_test": [expect(r["alert"], "120m") for r in alert_rules()],
    }
    absent = {
        "interval": "1m",
        "input_series": [series("imsys_stream_lag", "0x10", stream="sync")],
        "alert_rule_test": [
            expect("ImsysMetricsAbsent", "4m"),
            expect(
                "ImsysMetricsAbsent",
                "6m",
                {"summary": "imsys: no process exports metrics"},
            ),
        ],
    }
    for case in (firing, idle, absent):
        for check in case["alert_rule_test"]:  # absent() carries no job label
            if check["alertname"] == "ImsysMetricsAbsent":
                for fired in check["exp_alerts"]:
                    fired["exp_labels"].pop("job")
    unit = tmp_path / "alerts_test.yml"
    unit.write_text(
        yaml.safe_dump(
            {
                "rule_files": [str(rules)],
                "evaluation_interval": "1m",
                "tests": [firing, idle, absent],
            }
        )
    )
    result = promtool("test", "rules", str(unit))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Every query of the Grafana dashboard parses as PromQL (promtool checks them as
    recording rules, Grafana's variables replaced by what Grafana would put there)."""
    exprs = dashboard_queries()
    assert len(exprs) > 10
    grafana = {"$__rate_interval": "5m", "$job": ".+"}
    rules = []
    for n, expr in enumerate(exprs):
        for var, value in grafana.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, expr
        if expr.startswith("label_values("):  # a Grafana function: its metric argument
            expr = expr.removeprefix("label_values(").split(",")[0]
        rules.append({"record": f"dashboard:query_{n}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_covers_streams_routers_and_messages() -> None:
    """The dashboard has its three rows, and each panel's position and data source are set
    the way Grafana imports them (a datasource variable, not a fixed uid)."""
    doc = json.loads(DASHBOARD.read_text())
    rows = [p["title"] for p in doc["panels"] if p["type"] == "row"]
    assert rows == ["Streams", "Routers", "Messages"]
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for panel in doc["panels"]:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], panel["title"]


async def test_deploy_files_use_only_exported_metrics(
    settings: Settings, isolated_database: str
) -> None:
    """Every metric name in alerts.yml and the Grafana dashboard is in the /metrics of a
    live service (with one router, so the router series exist), and both files use the
    router, channel and dead-letter figures they are meant to watch."""
    db = await asyncpg.connect(isolated_database)
    try:
        tenant = await db.fetchval("INSERT INTO tenants (name) VALUES ('t') RETURNING id")
        await db.execute(
            "INSERT INTO routers (tenant_id, name, host, username, password, online)"
            " VALUES ($1, 'r', '127.0.0.1', 'admin', '', false)",
            tenant,
        )
    finally:
        await db.close()
    _, text = await fresh_service_scrape(settings, isolated_database)
    exported = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    used_alerts = set(METRIC.findall(ALERTS.read_text()))
    used_dashboard = {m for e in dashboard_queries() for m in METRIC.findall(e)}
    assert used_alerts - exported == set()
    assert used_dashboard - exported == set()
    for name in (
        "imsys_dead_letters",
        "imsys_stream_oldest_pending_age_seconds",
        "imsys_router_online",
        "imsys_router_guard_tripped",
        "imsys_channel_stopped",
    ):
        assert name in used_alerts
        assert name in used_dashboard
    assert any(m.endswith(HISTOGRAM_SUFFIXES) for m in used_dashboard)
