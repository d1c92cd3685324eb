"""Settings: the secret key a new data directory gets, and values read from the
environment, checked at start-up."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from dashboard import settings

ROOT = Path(__file__).resolve().parent.parent


def test_it_keeps_the_key_of_a_process_that_wrote_it_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several processes start on a new data directory at once (web workers, bridges): one
    of them writes the key between another's look and its own write. That other one must
    use the key on disk, not fail (it did: `FileExistsError` in a two-worker test)."""
    data_dir = tmp_path / "data"
    real = settings.secrets.token_urlsafe

    def meanwhile_another_process_wins(size: int) -> str:
        (data_dir / "secret_key").write_text("the-first-process-key-" + "x" * 40)
        return real(size)

    monkeypatch.setattr(settings.secrets, "token_urlsafe", meanwhile_another_process_wins)

    assert settings._persistent_secret_key(data_dir) == "the-first-process-key-" + "x" * 40
    assert sorted(p.name for p in data_dir.iterdir()) == ["secret_key"]  # no draft left


def test_it_creates_a_key_only_its_owner_can_read(tmp_path: Path) -> None:
    key = settings._persistent_secret_key(tmp_path / "data")
    assert len(key) >= 50
    assert (tmp_path / "data" / "secret_key").stat().st_mode & 0o777 == 0o600
    assert settings._persistent_secret_key(tmp_path / "data") == key


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("PORTHOLE_TRUSTED_PROXIES", "127.0.0.1,nginx", "'nginx' is not an address or network"),
        ("PORTHOLE_METRICS_ALLOW", "10.0.0.0/33", "'10.0.0.0/33' is not an address or network"),
        ("LOG_LEVEL", "verbose", "must be one of critical, debug, error, info, warning"),
        ("LOG_FORMAT", "yaml", "must be one of json, text"),
        ("TIME_ZONE", "Mars/Olympus", "is not a time zone"),
        ("REDIS_URL", "notaurl", "must be a URL starting with redis:// or rediss:// or unix://"),
        ("PORTHOLE_PORT", "eighty", "is not a whole number"),
        ("LOCALSANDBOX_PORT", "99999", "must be at most 65535"),
        ("LOCALSANDBOX_AGENT", "gpt", "must be one of auto, claude, demo"),
        ("DATABASE_URL", "garbage", "must be a URL starting with postgres:// or postgresql://"),
        ("OPENCOMPUTER_API_URL", "app.opencomputer.dev", "must be a URL starting with http://"),
        ("PORTHOLE_PUBLIC_URL", "porthole.example.org", "must be a URL starting with http://"),
    ],
)
def test_it_refuses_to_start_on_a_value_that_does_not_parse(
    tmp_path: Path, name: str, value: str, says: str
) -> None:
    """At start-up, naming the variable: not on the first request that reads it (a proxy
    list that did not parse answered every page, /healthz included, with a 500)."""
    env = {
        **os.environ,
        "PORTHOLE_DATA_DIR": str(tmp_path),
        "DJANGO_SETTINGS_MODULE": "dashboard.settings",
        name: value,
    }
    if name != "DATABASE_URL":
        env.pop("DATABASE_URL", None)
    if name != "REDIS_URL":
        env.pop("REDIS_URL", None)
    done = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("django.core.exceptions.ImproperlyConfigured: "), last
    assert name in last and says in last, last


@pytest.mark.parametrize(
    ("name", "value", "read"),
    [
        ("LOG_LEVEL", "warning", "warning"),
        ("LOG_LEVEL", " DEBUG ", "debug"),
        ("LOG_FORMAT", "JSON", "json"),
    ],
)
def test_it_takes_a_choice_in_any_case(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, read: str
) -> None:
    monkeypatch.setenv(name, value)
    levels = {"debug", "info", "warning", "error", "critical", "text", "json"}
    assert settings.env_choice(name, "info", levels) == read


def test_it_takes_networks_and_time_zones_that_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORTHOLE_TRUSTED_PROXIES", "127.0.0.1, 10.0.0.0/8,::1")
    assert settings.env_networks("PORTHOLE_TRUSTED_PROXIES", []) == [
        "127.0.0.1",
        "10.0.0.0/8",
        "::1",
    ]
    monkeypatch.setenv("TIME_ZONE", "Europe/Paris")
    assert settings.env_time_zone("TIME_ZONE", "UTC") == "Europe/Paris"
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/3")
    assert settings.env_url("REDIS_URL", {"redis"}) == "redis://127.0.0.1:6379/3"


@pytest.mark.parametrize(
    ("value", "says"),
    [("soon", "is not a number"), ("nan", "must be at least"), ("0", "must be at least")],
)
def test_it_refuses_a_webhook_backoff_that_is_not_a_positive_number(
    monkeypatch: pytest.MonkeyPatch, value: str, says: str
) -> None:
    monkeypatch.setenv("PORTHOLE_WEBHOOK_BACKOFF_SECONDS", value)
    with pytest.raises(ImproperlyConfigured, match=says):
        settings.env_float("PORTHOLE_WEBHOOK_BACKOFF_SECONDS", 5.0, minimum=0.01)


def test_it_reads_the_webhook_retries_from_the_environment(tmp_path: Path) -> None:
    """docs/awareness.md has always named these two; they used to be read from nowhere."""
    env = {
        **os.environ,
        "PORTHOLE_DATA_DIR": str(tmp_path),
        "DJANGO_SETTINGS_MODULE": "dashboard.settings",
        "PORTHOLE_WEBHOOK_MAX_ATTEMPTS": "3",
        "PORTHOLE_WEBHOOK_BACKOFF_SECONDS": "0.5",
    }
    code = (
        "import django; django.setup();"
        "from dashboard.awareness import dispatcher as d;"
        "print(d.max_attempts(), d.backoff(3).total_seconds())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.stdout.split() == ["3", "2.0"], done.stderr


# Where an operator looks for what a variable does.
ENVIRONMENT_DOCS = ("README.md", "docs/deploy.md", "docs/localsandbox.md", "docs/claude-wrapper.md")
READS_ENVIRONMENT = re.compile(
    r'(?:env_[a-z_]+\(|os\.environ\.get\(|os\.environ\[|getenv\()\s*"([A-Z][A-Z0-9_]+)"'
)


def test_it_documents_every_environment_variable_it_reads() -> None:
    """An operator's walk-through found two read and documented nowhere they would look."""
    read = {
        name
        for path in (ROOT / "dashboard").rglob("*.py")
        for name in READS_ENVIRONMENT.findall(path.read_text())
    }
    assert {"DATABASE_URL", "PORTHOLE_WORKER_ID", "DATABASE_CONN_MAX_AGE"} <= read  # it reads
    documented = "".join((ROOT / name).read_text() for name in ENVIRONMENT_DOCS)
    named = {name for name in read if f"`{name}`" in documented or f"${name}" in documented}
    assert sorted(read - named) == []


@pytest.mark.django_db
def test_it_cuts_sqlites_write_ahead_log_back_once_it_starts_over() -> None:
    """A flood grows the log; a server's connections stay open for its whole life, so
    without a limit the file would keep its largest size on disk until a restart."""
    from django.db import connection

    if connection.vendor != "sqlite":
        pytest.skip("SQLite's write-ahead log")
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA journal_size_limit")
        assert cursor.fetchone()[0] == 32 * 1024 * 1024
