"""Settings: the TOML file, environment overrides, validation, and the retry schedule."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, SecretStr

from imsys import settings as settings_module
from imsys.errors import ConfigError
from imsys.settings import STREAMS, Settings, StreamPolicy, load_settings

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config.example.toml"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No IMSYS_* variable of the calling shell leaks into these tests."""
    for name in list(os.environ):
        if name.startswith("IMSYS_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "imsys.toml"
    path.write_text(text)
    return path


def flatten(s: Settings) -> dict[str, Any]:
    """Every setting as ``section.key`` (``streams.sync.key``) → plain value."""
    out: dict[str, Any] = {}

    def walk(prefix: str, model: BaseModel) -> None:
        for name in type(model).model_fields:
            value = getattr(model, name)
            key = f"{prefix}.{name}" if prefix else name
            if isinstance(value, BaseModel):
                walk(key, value)
            elif isinstance(value, dict) and all(isinstance(v, BaseModel) for v in value.values()):
                for sub, item in value.items():
                    walk(f"{key}.{sub}", item)
            elif isinstance(value, SecretStr):
                out[key] = value.get_secret_value()
            else:
                out[key] = value

    walk("", s)
    return out


def documented_settings() -> list[tuple[str, str]]:
    """(section, key) for every field the models in settings.py define."""
    out: list[tuple[str, str]] = []
    for section, field in Settings.model_fields.items():
        if section == "streams":
            out += [(f"streams.{s}", k) for s in STREAMS for k in StreamPolicy.model_fields]
            continue
        model = field.annotation
        assert isinstance(model, type), section
        assert issubclass(model, BaseModel), section
        out += [(section, k) for k in model.model_fields]
    return out


def example_keys() -> dict[str, set[str]]:
    """Keys the example file shows per ``[section]``, commented-out ones included."""
    keys: dict[str, set[str]] = {}
    section = ""
    for line in EXAMPLE.read_text().splitlines():
        if header := re.fullmatch(r"\[([\w.]+)\]\s*", line):
            section = header.group(1)
            keys.setdefault(section, set())
        elif key := re.match(r"#?\s?(\w+) = ", line):
            keys.setdefault(section, set()).add(key.group(1))
    return keys


# --- the example file ----------------------------------------------------------------------


def test_example_file_loads_to_the_defaults() -> None:
    """config.example.toml loads, and every value in it equals the built-in default."""
    loaded = flatten(load_settings(EXAMPLE))
    defaults = flatten(Settings())
    assert loaded == defaults
    assert loaded["http.token"] == "change-me"


def test_example_file_documents_every_setting() -> None:
    """Each field of settings.py appears in the example, with its env override named."""
    text = EXAMPLE.read_text()
    shown = example_keys()
    missing = [f"{s}.{k}" for s, k in documented_settings() if k not in shown.get(s, set())]
    assert missing == [], f"config.example.toml lacks {missing}"
    no_env = [
        f"{s}.{k}"
        for s, k in documented_settings()
        if f"IMSYS_{s.replace('.', '__').upper()}__{k.upper()}" not in text
    ]
    assert no_env == [], f"config.example.toml names no environment override for {no_env}"


def test_example_file_shows_no_stale_setting() -> None:
    """Every key the example shows is a real setting (a renamed field cannot linger)."""
    real = set(documented_settings())
    stale = [f"{s}.{k}" for s, keys in example_keys().items() for k in keys if (s, k) not in real]
    assert stale == []


# --- file and environment --------------------------------------------------------------------


def test_toml_file_is_read(tmp_path: Path) -> None:
    """Values from the TOML file replace the defaults; secrets stay wrapped."""
    path = write(
        tmp_path,
        '[redis]\nprefix = "fromfile"\n[http]\nport = 9000\ntoken = "file-token"\n'
        "[engine]\nmax_deliveries = 9\n",
    )
    s = load_settings(path)
    assert s.redis.prefix == "fromfile"
    assert s.http.port == 9000
    assert s.http.token.get_secret_value() == "file-token"
    assert s.engine.max_deliveries == 9
    assert "file-token" not in repr(s)
    assert s.database.pool_max == 30


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """IMSYS_<SECTION>__<KEY> wins over the file; the file's other keys still apply."""
    path = write(tmp_path, '[redis]\nprefix = "fromfile"\n[http]\nport = 9000\n')
    monkeypatch.setenv("IMSYS_HTTP__PORT", "9100")
    monkeypatch.setenv("IMSYS_DATABASE__URL", "postgresql://u:pw@db.example:5432/x")
    monkeypatch.setenv("IMSYS_ENGINE__CLAIM_IDLE_S", "2.5")
    s = load_settings(path)
    assert s.http.port == 9100
    assert s.redis.prefix == "fromfile"
    assert s.database.url.get_secret_value() == "postgresql://u:pw@db.example:5432/x"
    assert s.engine.claim_idle_s == 2.5


def test_environment_overrides_a_stream_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """IMSYS_STREAMS__<STREAM>__<KEY> sets one key of one stream, lists given as JSON."""
    path = write(tmp_path, "[streams.events]\nconcurrency = 5\n")
    monkeypatch.setenv("IMSYS_STREAMS__EVENTS__MAX_ATTEMPTS", "7")
    monkeypatch.setenv("IMSYS_STREAMS__SYNC__BACKOFF", "[1, 2]")
    s = load_settings(path)
    assert s.streams["events"].concurrency == 5
    assert s.streams["events"].max_attempts == 7
    assert s.streams["sync"].backoff == [1.0, 2.0]
    assert s.streams["sync"].max_attempts == 10


def test_config_path_from_imsys_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a path, load_settings reads the file named by IMSYS_CONFIG."""
    path = write(tmp_path, '[redis]\nprefix = "viaenv"\n')
    monkeypatch.setenv("IMSYS_CONFIG", str(path))
    assert load_settings().redis.prefix == "viaenv"


def test_no_file_gives_defaults() -> None:
    """With neither a path nor IMSYS_CONFIG, the defaults apply."""
    assert flatten(load_settings()) == flatten(Settings())


def test_partial_stream_section_keeps_other_defaults(tmp_path: Path) -> None:
    """A stream table with one key keeps that stream's other defaults and the other streams."""
    path = write(tmp_path, "[streams.billing]\nconcurrency = 5\n")
    s = load_settings(path)
    billing = s.streams["billing"]
    assert billing.concurrency == 5
    assert billing.max_attempts == 3
    assert billing.backoff == []
    assert billing.jitter == 0.2
    defaults = Settings().streams
    assert set(s.streams) == set(STREAMS)
    for name in ("sync", "events", "bouncer"):
        assert s.streams[name] == defaults[name]
    assert s.streams["sync"].backoff == [10, 60, 300, 900]


# --- errors ----------------------------------------------------------------------------------


def test_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    """A file that is not TOML gives a ConfigError naming the file."""
    path = write(tmp_path, "[redis\nurl = \n")
    with pytest.raises(ConfigError, match=r"is not valid TOML") as info:
        load_settings(path)
    assert str(path) in str(info.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """A config path that does not exist gives a ConfigError saying so."""
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.toml"):
        load_settings(tmp_path / "nope.toml")


def test_directory_as_file_is_a_config_error(tmp_path: Path) -> None:
    """A config path that cannot be read (a directory) gives a ConfigError, not a traceback."""
    with pytest.raises(ConfigError, match=r"cannot read config file"):
        load_settings(tmp_path)


def test_unknown_stream_is_a_config_error(tmp_path: Path) -> None:
    """A table for a stream imsys does not have is rejected, naming it and the real ones."""
    path = write(tmp_path, "[streams.mail]\nconcurrency = 1\n")
    with pytest.raises(ConfigError, match=r"unknown stream\(s\) \['mail'\]") as info:
        load_settings(path)
    assert "sync" in str(info.value)


def test_stream_that_is_not_a_table_is_a_config_error(tmp_path: Path) -> None:
    """``streams.sync = 3`` is a ConfigError about streams.sync, not a crash."""
    path = write(tmp_path, "[streams]\nsync = 3\n")
    with pytest.raises(ConfigError, match=r"streams\.sync: .*dictionary"):
        load_settings(path)


@pytest.mark.parametrize(
    ("toml", "where"),
    [
        ('[http]\nport = "eighty"\n', r"http\.port: Input should be a valid integer"),
        ("[engine]\nmax_deliveries = 0\n", r"engine\.max_deliveries: .*greater than or equal to 1"),
        ("[streams.sync]\njitter = 2\n", r"streams\.sync\.jitter: .*less than or equal to 1"),
        ('[log]\nformat = "xml"\n', r"log\.format: "),
        ("[http]\ntokn = 1\n", r"http\.tokn: Extra inputs are not permitted"),
        ("[bogus]\nx = 1\n", r"bogus: Extra inputs are not permitted"),
    ],
)
def test_bad_value_is_a_config_error(tmp_path: Path, toml: str, where: str) -> None:
    """A wrong type, an out-of-range value or an unknown key names the key in the error."""
    with pytest.raises(ConfigError, match=rf"invalid configuration: .*{where}"):
        load_settings(write(tmp_path, toml))


def test_bad_environment_value_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad IMSYS_* value is a ConfigError too."""
    monkeypatch.setenv("IMSYS_HTTP__PORT", "abc")
    with pytest.raises(ConfigError, match=r"http\.port"):
        load_settings()


def test_config_error_does_not_echo_the_value(tmp_path: Path) -> None:
    """A misspelt secret key is reported by name only: its value never reaches the message."""
    path = write(tmp_path, '[http]\ntokn = "hunter2-secret"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert "http.tokn" in str(info.value)
    assert "hunter2-secret" not in str(info.value)


# --- Redis Sentinel --------------------------------------------------------------------------


def test_sentinels_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """IMSYS_REDIS__SENTINELS (JSON) with a master name gives (host, port) pairs; the
    sentinel password stays wrapped."""
    monkeypatch.setenv("IMSYS_REDIS__SENTINELS", '["10.0.0.1:26379", "[fd00::2]:26380"]')
    monkeypatch.setenv("IMSYS_REDIS__SENTINEL_MASTER", "imsys")
    monkeypatch.setenv("IMSYS_REDIS__SENTINEL_PASSWORD", "s3cret-sentinel")
    s = load_settings()
    assert s.redis.sentinel_addresses() == [("10.0.0.1", 26379), ("fd00::2", 26380)]
    assert s.redis.sentinel_master == "imsys"
    assert "s3cret-sentinel" not in repr(s)
    assert s.redis.sentinel_password.get_secret_value() == "s3cret-sentinel"


@pytest.mark.parametrize(
    ("toml", "where"),
    [
        ('[redis]\nsentinels = ["10.0.0.1"]\nsentinel_master = "m"\n', r"must be host:port"),
        ('[redis]\nsentinels = ["h:0"]\nsentinel_master = "m"\n', r"must be host:port"),
        ('[redis]\nsentinels = [":26379"]\nsentinel_master = "m"\n', r"must be host:port"),
        ('[redis]\nsentinels = ["h:26379"]\n', r"sentinel_master is needed"),
        ('[redis]\nsentinel_master = "m"\n', r"redis\.sentinels is empty"),
    ],
)
def test_bad_sentinel_settings_are_config_errors(tmp_path: Path, toml: str, where: str) -> None:
    """A sentinel that is not host:port, or sentinels without a master name (or the
    reverse), is refused at start-up instead of silently using redis.url."""
    with pytest.raises(ConfigError, match=rf"invalid configuration: .*{where}"):
        load_settings(write(tmp_path, toml))


# --- retry schedule --------------------------------------------------------------------------


def test_read_ahead_defaults_to_half_the_concurrency() -> None:
    """prefetch unset reads ahead concurrency/2 (rounded up); set, it is taken as given."""
    assert StreamPolicy(concurrency=50).read_ahead == 25
    assert StreamPolicy(concurrency=5).read_ahead == 3
    assert StreamPolicy(concurrency=50, prefetch=0).read_ahead == 0


def test_explicit_backoff_repeats_its_last_step() -> None:
    """An explicit schedule is used step by step, then its last step for every later attempt."""
    policy = StreamPolicy(backoff=[10, 60, 300, 900], jitter=0)
    assert [policy.retry_delay(a) for a in range(1, 8)] == [10, 60, 300, 900, 900, 900, 900]


def test_exponential_backoff_is_capped() -> None:
    """Without a schedule, delays grow by backoff_factor from backoff_base up to backoff_max."""
    policy = StreamPolicy(backoff_base=1, backoff_factor=2, backoff_max=900, jitter=0)
    assert [policy.retry_delay(a) for a in range(1, 6)] == [1, 2, 4, 8, 16]
    assert policy.retry_delay(10) == 512
    assert policy.retry_delay(11) == 900
    assert policy.retry_delay(60) == 900


def test_jitter_stays_within_its_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Jitter spreads a delay by at most ±jitter of it: the extremes, the middle, and samples."""
    policy = StreamPolicy(backoff=[10], jitter=0.2)
    for rnd, expected in ((0.0, 8.0), (0.5, 10.0), (0.999999, 12.0)):
        with monkeypatch.context() as m:
            m.setattr(settings_module.random, "random", lambda r=rnd: r)
            assert policy.retry_delay(1) == pytest.approx(expected, abs=1e-4)
    samples = [policy.retry_delay(1) for _ in range(2000)]
    assert all(8.0 <= d <= 12.0 for d in samples)
    # Spread over the range, not stuck at one value.
    assert min(samples) < 9.0
    assert max(samples) > 11.0


def test_full_jitter_never_goes_negative(monkeypatch: pytest.MonkeyPatch) -> None:
    """With jitter 1 the delay may reach zero but never below it."""
    monkeypatch.setattr(settings_module.random, "random", lambda: 0.0)
    assert StreamPolicy(backoff=[5], jitter=1).retry_delay(1) == 0.0
