"""Operations: /readyz names what is not ready, /metrics is Prometheus text for the monitoring
system only, and JSON logs carry the session id of the work they are about."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import subprocess
import sys
import threading
import urllib.request

import pytest
from django.db.backends.signals import connection_created
from django.test import Client
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from dashboard import ops
from dashboard.agents.models import AgentSession, Sandbox, Watcher
from dashboard.logs import JsonFormatter, SessionFilter, bind_session, logging_config
from dashboard.ops import start_metrics_server
from tests.conftest import LocalSandbox
from tests.team.procs import ROOT, free_port, redis_url, require_team

pytestmark = pytest.mark.django_db


def test_it_is_ready_when_database_layer_and_upstream_answer(oc: LocalSandbox) -> None:
    response = Client().get("/readyz")
    assert response.status_code == 200, response.content
    assert response.json()["checks"] == {
        "database": "ok",
        "channel_layer": "ok",
        "live_layer": "ok",
        "upstream": "ok",
    }
    assert Client().get("/healthz").status_code == 200


def test_it_says_which_check_failed_when_the_upstream_is_away(settings) -> None:  # type: ignore[no-untyped-def]
    settings.OPENCOMPUTER_API_URL = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    settings.OPENCOMPUTER_API_KEY = "k"
    response = Client().get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["failed"] == ["upstream"]
    assert body["checks"]["database"] == "ok" and body["checks"]["channel_layer"] == "ok"
    assert "127.0.0.1" not in response.content.decode()  # the kind of failure, no addresses


def test_it_answers_within_its_timeout_while_the_database_hangs(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A database that does not answer held both probes for the pool's whole wait (30 s):
    load balancers and compose health checks gave up on a timeout, not on a 503."""
    released, returned = threading.Event(), threading.Event()

    def hanging(*args: object) -> None:
        released.wait(30)  # as long as the pool waits for a connection
        returned.set()

    monkeypatch.setattr(ops, "_database", hanging)
    monkeypatch.setattr(ops, "CHECK_TIMEOUT", 0.5)
    try:
        ready = Client().get("/readyz")
        health = Client().get("/healthz")
        assert not returned.is_set()  # both answered while the database still hung
    finally:
        released.set()
    assert ready.status_code == 503
    assert ready.json()["checks"]["database"] == "timed out after 0.5 s"
    assert health.status_code == 503
    assert health.content == b"database: timed out after 0.5 s\n"


def test_it_is_not_ready_on_a_database_that_is_not_migrated(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Pages fail on such a database while the database itself answers: /readyz says so."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("DATABASE_URL", "REDIS_URL", "OPENCOMPUTER_API_URL")
    }
    env.update(PORTHOLE_DATA_DIR=str(tmp_path), ALLOWED_HOSTS="testserver", LOG_LEVEL="ERROR")
    probe = (
        "import json; from django.test import Client; "
        "print(json.dumps([[r.status_code, r.content.decode()] "
        "for r in (Client().get('/readyz'), Client().get('/healthz'))]))"
    )
    done = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", probe],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    (ready_status, ready), (health_status, health) = json.loads(done.stdout.splitlines()[-1])
    assert ready_status == 503
    assert json.loads(ready)["checks"]["database"] == "UnappliedMigrations"
    assert (health_status, health) == (200, "ok")  # the database answers: the process lives


def test_it_says_the_live_layer_is_not_ready_when_its_redis_is_away(settings) -> None:  # type: ignore[no-untyped-def]
    layers = dict(settings.CHANNEL_LAYERS)
    layers["live"] = {
        "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
        "CONFIG": {"hosts": [f"redis://127.0.0.1:{free_port()}/0"]},  # nothing listens there
    }
    settings.CHANNEL_LAYERS = layers
    response = Client().get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert "live_layer" in body["failed"] and body["checks"]["channel_layer"] == "ok"


def test_it_says_the_live_layer_is_not_ready_when_nothing_published_comes_back(  # type: ignore[no-untyped-def]
    oc: LocalSandbox, settings
) -> None:
    """Publishing alone succeeds on a worker whose subscription is gone, and its viewers get
    nothing live: the check goes there and back."""
    layers = dict(settings.CHANNEL_LAYERS)
    layers["live"] = {"BACKEND": "tests.fakes.layers.PublishOnlyLayer"}
    settings.CHANNEL_LAYERS = layers
    response = Client().get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["failed"] == ["live_layer"]
    assert body["checks"]["live_layer"].startswith("timed out")


def test_it_leaves_nothing_subscribed_on_redis_after_checking_the_live_layer() -> None:
    """A worker answers /readyz for as long as it runs, on one event loop: each round trip
    must unsubscribe what it subscribed."""
    require_team()
    import redis
    from django.conf import settings

    from dashboard.ops import _check_live_layer

    prefix = settings.CHANNEL_LAYERS["live"]["CONFIG"]["prefix"].encode()

    async def check_often() -> list[bytes]:
        for _ in range(5):
            await _check_live_layer()
        with redis.Redis.from_url(redis_url()) as client:
            return [c for c in client.pubsub_channels() if c.startswith(prefix)]

    assert asyncio.run(check_often()) == []


def _scrape(client: Client, **extra: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    response = client.get("/metrics", **extra)  # type: ignore[arg-type]
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain")
    found: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            found.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def test_it_exports_what_the_database_knows(alice) -> None:  # type: ignore[no-untyped-def]
    sandbox = Sandbox.objects.create(upstream_id="sb-m")
    for n, status in enumerate(["working", "working", "idle", "exited"]):
        AgentSession.objects.create(
            sandbox=sandbox,
            upstream_id=f"s{n}",
            status=status,
            next_seq=11,
            undrawn_from=8 if n == 0 else None,  # 8, 9 and 10 stored, not yet drawn
        )
    session = AgentSession.objects.first()
    assert session is not None
    Watcher.objects.create(channel_name="c1", session=session, user=alice)
    samples = _scrape(Client())
    sessions = samples["porthole_sessions"]
    assert sessions[(("status", "working"),)] == 2
    assert sessions[(("status", "idle"),)] == 1
    assert sessions[(("status", "lost"),)] == 0
    assert samples["porthole_events_stored"][()] == 40
    assert samples["porthole_events_undrawn"][()] == 3
    assert samples["porthole_viewers"][(("kind", "member"),)] == 1
    assert samples["porthole_sessions_unbridged"][()] == 3  # nothing holds their leases
    # This process's own counters are there too, ready for the code that counts.
    assert "porthole_upstream_reconnects_total" in samples
    assert "porthole_events_recorded_total" in samples


@pytest.mark.django_db(transaction=True)
def test_it_closes_each_scrapes_database_connection_on_a_bridges_metrics_port() -> None:
    """The port answers each scrape on a thread of its own: a connection left open there
    held one of the pool's slots for good, and a few dozen scrapes left a bridges worker
    unable to claim or record anything."""
    opened: list[object] = []

    def created(sender: object, connection: object, **kwargs: object) -> None:
        if threading.current_thread() is not threading.main_thread():
            opened.append(connection)

    connection_created.connect(created)
    port = free_port()
    server = start_metrics_server(port, registry=CollectorRegistry())
    assert server is not None
    try:
        for _ in range(30):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
                assert reply.status == 200
                assert "porthole_sessions_unbridged" in reply.read().decode()
    finally:
        server.shutdown()
        server.server_close()
        connection_created.disconnect(created)
    assert len(opened) == 30
    assert all(wrapper.connection is None for wrapper in opened)  # type: ignore[attr-defined]


def test_it_serves_metrics_only_to_allowed_addresses_or_the_token(settings) -> None:  # type: ignore[no-untyped-def]
    settings.PORTHOLE_METRICS_TOKEN = "s3cret-token"
    outsider = Client(REMOTE_ADDR="203.0.113.9")
    assert outsider.get("/metrics").status_code == 403
    assert outsider.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 403
    _scrape(outsider, HTTP_AUTHORIZATION="Bearer s3cret-token")
    _scrape(Client())  # loopback: the monitoring agent on this machine
    # Through a proxy on this machine that we were not told to trust: its loopback address
    # is not the client's.
    forwarded = Client(HTTP_X_FORWARDED_FOR="203.0.113.9")
    assert forwarded.get("/metrics").status_code == 403
    # Through a trusted proxy, the client's own address decides.
    settings.PORTHOLE_TRUSTED_PROXIES = ["127.0.0.1"]
    assert forwarded.get("/metrics").status_code == 403
    _scrape(Client(HTTP_X_FORWARDED_FOR="127.0.0.1"))


def test_it_puts_the_session_id_on_every_line_of_a_sessions_work() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(SessionFilter())
    logger = logging.getLogger("dashboard.agents.bridge.test")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

    async def bridge(session_id: str) -> None:
        bind_session(session_id)
        logger.info("connected to %s", "upstream")
        await asyncio.create_task(asyncio.sleep(0))  # tasks started later inherit it
        await asyncio.to_thread(logger.warning, "from a thread")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("recording failed")

    async def two() -> None:
        await asyncio.gather(bridge("session-a"), bridge("session-b"))
        logger.info("supervisor line")

    try:
        asyncio.run(two())
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 7
    by_session = [line.get("session_id") for line in lines]
    assert by_session.count("session-a") == 3 and by_session.count("session-b") == 3
    assert lines[-1]["message"] == "supervisor line" and "session_id" not in lines[-1]
    failed = [line for line in lines if line["message"] == "recording failed"]
    assert all("ValueError: boom" in line["exception"] for line in failed)
    assert {line["level"] for line in lines} == {"INFO", "WARNING", "ERROR"}


def test_it_configures_json_or_text_logs() -> None:
    config = logging_config("json", "INFO")
    assert config["handlers"]["console"]["formatter"] == "json"
    assert config["handlers"]["console"]["filters"] == ["session"]
    assert logging_config("text", "INFO")["handlers"]["console"]["formatter"] == "text"


def test_it_keeps_terminal_colours_and_each_api_request_out_of_the_logs() -> None:
    line = logging.LogRecord("uvicorn.error", logging.INFO, "", 0, "Started %s", ("x",), None)
    line.color_message = "Started \x1b[36m%s\x1b[0m"
    entry = json.loads(JsonFormatter().format(line))
    assert entry["message"] == "Started x" and "color_message" not in entry
    assert logging.getLogger("httpx").getEffectiveLevel() == logging.WARNING
