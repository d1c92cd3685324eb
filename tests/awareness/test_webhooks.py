"""Outgoing webhooks against a real receiver on loopback: signed, once per event per hook across
two concurrent dispatchers (each on its own thread and database connection), retried on 500,
given up after their budget, and logged."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from channels.db import database_sync_to_async
from django.db.models import Max
from django.utils import timezone

from dashboard.agents.models import AgentSession, Event
from dashboard.awareness import dispatcher, webhooks
from dashboard.awareness.checks import webhook_urls
from dashboard.awareness.models import Cursor, Delivery, Hook, Kind
from tests.agents.helpers import wait_for
from tests.awareness.helpers import new_session, ours, record, turn, wait_until
from tests.awareness.receiver import Receiver, receiver

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(120)]


@contextmanager
def dispatchers(count: int) -> Iterator[list[str]]:
    """`count` dispatchers, each `run_forever()` in a thread (an event loop) of its own."""
    names = [f"worker-{n}" for n in range(count)]
    loops: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
    ready = threading.Barrier(count + 1)
    failures: list[BaseException] = []

    def run(name: str) -> None:
        async def main() -> None:
            stop = asyncio.Event()
            loops.append((asyncio.get_running_loop(), stop))
            ready.wait()
            await dispatcher.run_forever(stop=stop, interval=0.02, worker=name)

        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced in the test thread
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(name,), daemon=True) for name in names]
    for thread in threads:
        thread.start()
    ready.wait(timeout=10)
    try:
        yield names
    finally:
        for loop, stop in loops:
            loop.call_soon_threadsafe(stop.set)
        for thread in threads:
            thread.join(30)
        assert not failures, failures


def hook_for(target: Receiver, **fields: object) -> Hook:
    return Hook.objects.create(
        url=target.url, created_at=timezone.now() - timedelta(minutes=1), **fields
    )


def finished(session: AgentSession, code: int) -> AgentSession:
    return record(session, ours(Event.Source.BRIDGE, {"type": "exit", "code": code}))


def started(title: str) -> AgentSession:
    session = new_session(title=title)
    return record(session, ours(Event.Source.DASHBOARD, {"type": "prompt", "text": title}))


def all_settled() -> bool:
    """Deliveries were made, and none is waiting any more."""
    return (
        Delivery.objects.exists()
        and not Delivery.objects.filter(status=Delivery.Status.PENDING).exists()
    )


def test_it_delivers_each_event_once_across_two_dispatchers(settings):
    settings.PORTHOLE_WEBHOOK_BACKOFF_SECONDS = 0.01
    with receiver() as target:
        hook = hook_for(target)
        dispatcher.scan()  # the cursor starts here: what follows is news
        expected: Counter[tuple[str, str]] = Counter()
        for n in range(6):
            ok = finished(turn(started(f"ok {n}")), 0)
            bad = finished(turn(started(f"bad {n}")), 3)
            stuck = turn(started(f"stuck {n}"), subtype="error_during_execution", is_error=True)
            gone = record(started(f"gone {n}"), ours(Event.Source.BRIDGE, {"type": "lost"}))
            for session, kind in (
                (ok, Kind.FINISHED),
                (bad, Kind.FAILED),
                (stuck, Kind.NEEDS_ATTENTION),
                (gone, Kind.LOST),
            ):
                expected[(str(session.id), Kind.STARTED)] += 1
                expected[(str(session.id), kind)] += 1

        with dispatchers(2):
            wait_until(lambda: len(target.received()) >= len(expected) and all_settled(), 60)
            # Scanning the same events again adds nothing.
            assert dispatcher.scan() == 0
        assert Delivery.objects.count() == len(expected)

        got = Counter()
        for request in target.received():
            body = json.loads(request.body)
            assert webhooks.verify(
                hook.secret, request.body, request.headers["x-porthole-signature"]
            )
            assert request.headers["x-porthole-event"] == body["kind"]
            assert request.headers["x-porthole-delivery"] == body["id"]
            assert body["text"]
            got[(body["session"]["id"], body["kind"])] += 1
        assert got == expected
        statuses = set(Delivery.objects.values_list("status", "attempts", "last_status_code"))
        assert statuses == {(Delivery.Status.DELIVERED, 1, 200)}


def test_it_retries_on_500_with_backoff_and_then_delivers(settings):
    settings.PORTHOLE_WEBHOOK_BACKOFF_SECONDS = 0.05
    settings.PORTHOLE_WEBHOOK_MAX_ATTEMPTS = 5
    with receiver(script=[500, 503]) as target:
        hook_for(target, kinds=[Kind.FAILED])
        dispatcher.scan()
        finished(turn(started("flaky")), 2)
        with dispatchers(1):
            wait_until(all_settled, 30)
        delivery = Delivery.objects.get()
        assert (delivery.status, delivery.attempts, delivery.last_status_code) == (
            Delivery.Status.DELIVERED,
            3,
            200,
        )
        ids = {r.headers["x-porthole-delivery"] for r in target.received()}
        assert len(target.received()) == 3 and ids == {str(delivery.pk)}


def test_it_gives_up_after_its_budget_and_logs_it(settings, caplog):
    settings.PORTHOLE_WEBHOOK_BACKOFF_SECONDS = 0.01
    settings.PORTHOLE_WEBHOOK_MAX_ATTEMPTS = 3
    caplog.set_level(logging.WARNING, logger="dashboard.awareness.dispatcher")
    with receiver(default=500) as target:
        hook_for(target)
        dispatcher.scan()
        record(started("doomed"), ours(Event.Source.BRIDGE, {"type": "lost"}))
        with dispatchers(1):
            wait_until(all_settled, 30)
        deliveries = list(Delivery.objects.order_by("kind"))
        assert {d.kind for d in deliveries} == {Kind.STARTED, Kind.LOST}
        for delivery in deliveries:
            assert delivery.status == Delivery.Status.FAILED
            assert delivery.attempts == 3 and delivery.last_status_code == 500
        assert len(target.received()) == 6
        assert sum("gave up" in r.getMessage() for r in caplog.records) == 2


def test_it_gives_up_on_an_unreachable_hook_and_says_why(settings):
    settings.PORTHOLE_WEBHOOK_BACKOFF_SECONDS = 0.01
    settings.PORTHOLE_WEBHOOK_MAX_ATTEMPTS = 2
    with receiver() as target:
        url = target.url
    Hook.objects.create(url=url, created_at=timezone.now() - timedelta(minutes=1))
    dispatcher.scan()
    started("nobody listens")
    with dispatchers(1):
        wait_until(all_settled, 30)
    delivery = Delivery.objects.get()
    assert delivery.status == Delivery.Status.FAILED and delivery.last_status_code is None
    assert "ConnectError" in delivery.last_error


def test_it_sends_only_the_kinds_a_hook_asked_for():
    with receiver() as target:
        hook_for(target, kinds=[Kind.FAILED, Kind.LOST])
        dispatcher.scan()
        finished(turn(started("fine")), 0)
        bad = finished(turn(started("broken")), 1)
        dispatcher.scan()
        assert list(Delivery.objects.values_list("kind", "session")) == [(Kind.FAILED, bad.id)]


def test_it_tells_a_new_hook_nothing_of_the_past():
    finished(turn(started("old news")), 1)
    with receiver() as target:
        dispatcher.scan()
        Hook.objects.create(url=target.url)
        dispatcher.scan()
        assert not Delivery.objects.exists()


def test_it_sends_one_needs_attention_per_turn(settings):
    with receiver() as target:
        hook_for(target, kinds=[Kind.NEEDS_ATTENTION])
        dispatcher.scan()
        session = turn(started("twice wrong"), subtype="error_during_execution")
        session = record(session, ours(Event.Source.BRIDGE, {"type": "gap", "message": "x"}))
        dispatcher.scan()
        dispatcher.scan(now=timezone.now() + timedelta(hours=1))  # idle too, by then
        assert Delivery.objects.count() == 1
        turn(session, subtype="error_max_turns")  # a follow-up, wrong again: a new turn
        dispatcher.scan()
        assert Delivery.objects.count() == 2


def test_it_flags_a_session_left_idle(settings):
    settings.PORTHOLE_ATTENTION_IDLE_MINUTES = 10
    with receiver() as target:
        hook_for(target, kinds=[Kind.NEEDS_ATTENTION])
        dispatcher.scan()
        turn(started("waiting for you"))
        dispatcher.scan()
        assert not Delivery.objects.exists()
        dispatcher.scan(now=timezone.now() + timedelta(minutes=11))
        delivery = Delivery.objects.get()
        assert delivery.payload["reasons"] == ["idle after a turn, nobody followed up"]


def test_it_signs_what_it_sends_and_nothing_else():
    body = b'{"kind":"session.failed"}'
    header = webhooks.sign("s3cret", body)
    assert webhooks.verify("s3cret", body, header)
    assert not webhooks.verify("s3cret", body + b" ", header)
    assert not webhooks.verify("other", body, header)
    assert not webhooks.verify("s3cret", body, webhooks.sign("s3cret", body, 1_000))  # stale
    assert not webhooks.verify("s3cret", body, "garbage")


def test_it_keeps_sandbox_text_from_pinging_a_slack_channel(settings):
    settings.PORTHOLE_PUBLIC_URL = "https://porthole.example.org"
    session = new_session(title="<!channel> & <https://evil|click>")
    text = webhooks.payload(Kind.FAILED, session, occurrence=1)["text"]
    assert "<!channel>" not in text and "&lt;!channel&gt; &amp;" in text
    assert text.startswith(f"<https://porthole.example.org/sessions/{session.id}/|")


def test_it_adds_the_hooks_of_the_environment_once(settings):
    settings.PORTHOLE_WEBHOOK_URLS = ["http://127.0.0.1:9/a", "https://hooks.example.org/b"]
    settings.PORTHOLE_WEBHOOK_SECRET = "from-env"
    webhooks.ensure_env_hooks()
    webhooks.ensure_env_hooks()
    assert Hook.objects.filter(source=Hook.Source.ENV, active=True).count() == 2
    assert set(Hook.objects.values_list("secret", flat=True)) == {"from-env"}
    settings.PORTHOLE_WEBHOOK_URLS = ["https://hooks.example.org/b"]
    webhooks.ensure_env_hooks()
    assert list(Hook.objects.filter(active=True).values_list("url", flat=True)) == [
        "https://hooks.example.org/b"
    ]


def test_it_refuses_a_malformed_webhook_url_at_start_up(settings):
    settings.PORTHOLE_WEBHOOK_URLS = ["https://ok.example.org/h", "hooks.example.org/no-scheme"]
    errors = webhook_urls()
    assert [e.id for e in errors] == ["awareness.E001"]
    assert "no-scheme" in errors[0].msg


def test_it_forgets_settled_deliveries_after_a_month():
    with receiver() as target:
        hook_for(target)
        dispatcher.scan()
        started("long ago")
        dispatcher.scan()
    Delivery.objects.update(status=Delivery.Status.DELIVERED)
    assert dispatcher.prune() == 0
    assert dispatcher.prune(now=timezone.now() + timedelta(days=31)) == 1
    assert not Delivery.objects.exists()


def test_it_keeps_up_with_the_log_while_no_hook_listens():
    dispatcher.scan()
    finished(turn(started("unheard")), 1)
    assert dispatcher.scan() == 0
    top = Event.objects.aggregate(top=Max("id"))["top"]
    assert Cursor.objects.get(name=dispatcher.CURSOR).position == top


async def test_it_stops_when_cancelled_as_serve_would_at_shutdown():
    task = asyncio.create_task(dispatcher.run_forever(interval=0.01))

    async def cursor_made() -> bool:
        return await database_sync_to_async(Cursor.objects.filter(name="events").exists)()

    await wait_for(cursor_made, 20)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def _database_url_for_children() -> str:
    """The test database, as a URL another process can open."""
    from django.db import connection

    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{db['NAME']}"
    user = db.get("USER") or ""
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    host = db.get("HOST") or "127.0.0.1"
    port = f":{db['PORT']}" if db.get("PORT") else ""
    return f"postgres://{user}{password}@{host}{port}/{db['NAME']}"


def _until_ready(worker: subprocess.Popen[str]) -> str:
    """A worker's output up to the line that says its signal handlers are in place."""
    assert worker.stdout is not None
    seen = []
    for line in worker.stdout:
        seen.append(line)
        if "Delivering webhooks" in line:
            break
    return "".join(seen)


def test_it_delivers_once_across_two_worker_processes(tmp_path):
    """`manage.py webhooks` twice, as two real processes, stopped with SIGTERM."""
    with receiver() as target:
        hook = hook_for(target)
        dispatcher.scan()
        expected = set()
        for n in range(8):
            session = finished(turn(started(f"process {n}")), n % 2)
            kind = Kind.FINISHED if n % 2 == 0 else Kind.FAILED
            expected |= {(str(session.id), Kind.STARTED), (str(session.id), kind)}
        env = dict(
            os.environ,
            DATABASE_URL=_database_url_for_children(),
            PORTHOLE_DATA_DIR=str(tmp_path),
            DJANGO_SETTINGS_MODULE="dashboard.settings",
        )
        env.pop("PORTHOLE_WEBHOOK_URLS", None)
        workers = [
            subprocess.Popen(
                [sys.executable, "-m", "django", "webhooks", "--interval", "0.05"],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for _ in range(2)
        ]
        # Both able to stop gracefully before they are asked to: one still importing Django
        # when the other had delivered everything died of the SIGTERM, as it should.
        said = [_until_ready(worker) for worker in workers]
        try:
            wait_until(lambda: len(target.received()) >= len(expected) and all_settled(), 60)
        finally:
            for worker in workers:
                worker.send_signal(signal.SIGTERM)
            outputs = [
                before + worker.communicate(timeout=30)[0]
                for before, worker in zip(said, workers, strict=True)
            ]
        assert [w.returncode for w in workers] == [0, 0], outputs
        got = Counter()
        for request in target.received():
            assert webhooks.verify(
                hook.secret, request.body, request.headers["x-porthole-signature"]
            )
            body = json.loads(request.body)
            got[(body["session"]["id"], body["kind"])] += 1
        assert set(got) == expected and set(got.values()) == {1}, got


def test_it_takes_over_what_a_dead_worker_had_claimed():
    with receiver() as target:
        hook_for(target, kinds=[Kind.LOST])
        dispatcher.scan()
        record(started("orphaned"), ours(Event.Source.BRIDGE, {"type": "lost"}))
        dispatcher.scan()
        assert [d.pk for d in dispatcher.claim_due("worker-that-dies")]
        # Held: nobody else may take it while the claim lasts.
        assert dispatcher.claim_due("another") == []
        # The worker died; its claim runs out.
        Delivery.objects.update(claimed_until=timezone.now() - timedelta(seconds=1))
        with dispatchers(1):
            wait_until(all_settled, 30)
        delivery = Delivery.objects.get()
        assert (delivery.status, delivery.attempts) == (Delivery.Status.DELIVERED, 1)
        assert len(target.received()) == 1
