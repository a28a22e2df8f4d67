"""Logging: secrets never reach the output, whatever shape the event has."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
import structlog

from imsys import logging as imsys_logging
from imsys.logging import redact_secrets, redact_text

ReadLines = Callable[[], tuple[str, list[dict[str, Any]]]]


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Each test may reconfigure structlog; the suite's set-up comes back afterwards."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def json_output(capsys: pytest.CaptureFixture[str], level: str = "debug") -> ReadLines:
    """imsys's own JSON set-up, writing to the captured stderr (call it inside the test:
    the capture's stream during a test is not the one during fixture set-up)."""
    imsys_logging.configure(level, json=True)

    def read() -> tuple[str, list[dict[str, Any]]]:
        raw = capsys.readouterr().err
        return raw, [orjson.loads(line) for line in raw.splitlines() if line.strip()]

    return read


def run(event: dict[str, Any]) -> dict[str, Any]:
    return dict(redact_secrets(None, "info", dict(event)))


@pytest.mark.parametrize(
    "key",
    [
        "password",
        "router_password",
        "passwd",
        "secret",
        "client_secret",
        "token",
        "http_token",
        "api_key",
        "apikey",
        "X-Api-Key",
        "otp",
        "authorization",
        "Authorization",
    ],
)
def test_secret_named_keys_are_masked(key: str) -> None:
    """A key whose name says secret has its value replaced by ***, whatever the value."""
    out = run({"event": "router_added", key: "hunter2", "router_id": 7})
    assert out[key] == "***"
    assert out["router_id"] == 7
    assert out["event"] == "router_added"


def test_ordinary_keys_are_left_alone() -> None:
    """Keys that name nothing secret keep their values untouched."""
    event = {"event": "subscriber_synced", "subscriber_id": 3, "changed": ["profile"], "ok": True}
    assert run(event) == event


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("redis://:pw@h", "redis://:***@h"),
        ("redis://:s3cret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("postgresql://postgres:pw@db:5432/imsys", "postgresql://postgres:***@db:5432/imsys"),
        (
            "cannot reach rediss://user:pa55@cache.example:6380/1 (timeout)",
            "cannot reach rediss://user:***@cache.example:6380/1 (timeout)",
        ),
        (
            "postgresql://postgres@127.0.0.1:5432/imsys",
            "postgresql://postgres@127.0.0.1:5432/imsys",
        ),
        ("https://api.usebouncer.com/v1.1/email", "https://api.usebouncer.com/v1.1/email"),
    ],
)
def test_url_credentials_are_masked(text: str, expected: str) -> None:
    """The password part of any URL in a text is masked; URLs without one are unchanged."""
    assert redact_text(text) == expected


def test_url_credentials_in_values_are_masked() -> None:
    """A value holding a URL with a password is logged with the password masked."""
    out = run({"event": "redis_unavailable", "error": "Error connecting to redis://:pw@h:6379"})
    assert out["error"] == "Error connecting to redis://:***@h:6379"


def test_nested_structures_are_masked() -> None:
    """Secret keys and URL credentials are masked inside nested dicts and lists too."""
    out = run(
        {
            "event": "router_added",
            "router": {
                "host": "10.0.0.1",
                "password": "p",
                "login": {"username": "admin", "api_key": "k"},
            },
            "urls": ["redis://:pw@h/0", {"dsn": "postgresql://u:pw@db/x", "token": "t"}],
        }
    )
    assert out["router"] == {
        "host": "10.0.0.1",
        "password": "***",
        "login": {"username": "admin", "api_key": "***"},
    }
    assert out["urls"] == ["redis://:***@h/0", {"dsn": "postgresql://u:***@db/x", "token": "***"}]


def test_json_output_carries_no_secret(capsys: pytest.CaptureFixture[str]) -> None:
    """imsys's JSON set-up writes one JSON object a line, masked, with level and UTC time."""
    json_logs = json_output(capsys)
    log = structlog.get_logger("test")
    log.info(
        "router_added",
        router_id=5,
        password="hunter2-router",
        url="redis://:hunter2-redis@cache:6379/0",
        router={"otp": "123456", "host": "r1"},
    )
    raw, lines = json_logs()
    assert "hunter2" not in raw
    assert "123456" not in raw
    [line] = lines
    assert line["event"] == "router_added"
    assert line["level"] == "info"
    assert line["timestamp"].endswith("Z")
    assert line["router_id"] == 5
    assert line["password"] == "***"
    assert line["url"] == "redis://:***@cache:6379/0"
    assert line["router"] == {"otp": "***", "host": "r1"}


def test_exception_text_carries_no_url_password(capsys: pytest.CaptureFixture[str]) -> None:
    """A logged traceback whose message holds a URL with a password has it masked."""
    json_logs = json_output(capsys)
    log = structlog.get_logger("test")

    def connect() -> None:
        raise ConnectionError("could not connect to postgresql://app:hunter2-db@db:5432/imsys")

    try:
        connect()
    except ConnectionError:
        log.exception("postgres_unavailable")
    raw, [line] = json_logs()
    assert "hunter2-db" not in raw
    assert "postgresql://app:***@db:5432/imsys" in line["exception"]


def test_level_filters_lower_events(capsys: pytest.CaptureFixture[str]) -> None:
    """configure(level) drops events below it."""
    json_logs = json_output(capsys, "warning")
    log = structlog.get_logger("test")
    log.info("quiet_event")
    log.warning("loud_event")
    _, lines = json_logs()
    assert [line["event"] for line in lines] == ["loud_event"]
