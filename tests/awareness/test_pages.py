"""The usage page and its CSV (numbers to the cent), the webhook settings (administrators
only, CSRF on every mutation), the attention feed, and the session list's additions."""

from __future__ import annotations

import csv
import io
import re
from datetime import timedelta
from decimal import Decimal

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from dashboard.agents.models import AgentSession, AuditEntry, Event
from dashboard.awareness import usage
from dashboard.awareness.models import Hook, Kind
from tests.awareness.helpers import new_session, ours, record, turn

pytestmark = pytest.mark.django_db


def signed_in(user) -> Client:  # type: ignore[no-untyped-def]
    client = Client()
    client.force_login(user)
    return client


def csrf_client(user) -> Client:  # type: ignore[no-untyped-def]
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    return client


def days_ago(n: int) -> object:
    return timezone.now() - timedelta(days=n)


# -- usage ----------------------------------------------------------------------------------------

# Costs as the SDK reports them: floats with many digits; what the page shows must be their
# exact sum, rounded once.
TURN_COSTS = [
    ("alice", "claude-sonnet-4", 0, ["0.123456", "0.000001"]),
    ("alice", "claude-sonnet-4", 0, ["1.999999"]),
    ("charlie", "claude-opus-4", 1, ["0.1", "0.2", "0.3"]),
    ("charlie", "claude-sonnet-4", 2, ["2.005", "0.005"]),
    ("alice", "claude-opus-4", 40, ["9.99"]),  # outside the 30 days
]


@pytest.fixture
def recorded(alice, charlie):  # type: ignore[no-untyped-def]
    people = {"alice": alice, "charlie": charlie}
    sessions = []
    for name, model, age, costs in TURN_COSTS:
        session = new_session(user=people[name], model=model, started_at=days_ago(age))
        for n, cost in enumerate(costs):
            session = turn(session, people[name], cost=cost, turns=2, tokens=(100 + n, 10))
        sessions.append(session)
    return sessions


def test_it_sums_usage_exactly_as_the_sessions_recorded_it(recorded, bob):
    in_period = [s for s in recorded if s.started_at >= days_ago(29)]
    expected = sum((s.total_cost_usd for s in in_period), Decimal(0))
    assert expected == Decimal("4.733456")
    report = usage.usage(usage.period_from({"period": "30d"}))
    assert report.total.cost == expected
    assert report.total.sessions == 4
    assert report.total.turns == sum(s.num_turns for s in in_period) == 16
    assert report.total.input_tokens == sum(s.input_tokens for s in in_period)
    people = {name: t.cost for name, t in report.by_person}
    assert people == {"alice": Decimal("2.123456"), "charlie": Decimal("2.610000")}
    models = {name: t.cost for name, t in report.by_model}
    assert models == {"claude-sonnet-4": Decimal("4.133456"), "claude-opus-4": Decimal("0.6")}

    page = signed_in(bob).get(reverse("usage"), {"period": "30d"})
    assert page.status_code == 200
    html = page.content.decode()
    assert 'id="total-cost">$4.73<' in html
    assert html.count("<svg") == 5
    assert 'data-cost="2.610000"' in html  # charlie's row, exact

    week = usage.usage(usage.period_from({"period": "7d"}))
    assert week.total.cost == expected  # the 40-day-old session is in neither


def test_it_downloads_the_table_as_csv_to_the_cent(recorded, bob):
    response = signed_in(bob).get(reverse("usage_csv"), {"period": "90d"})
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.content.decode())))
    assert sum(Decimal(r["cost_usd"]) for r in rows) == sum(
        (s.total_cost_usd for s in recorded), Decimal(0)
    )
    assert {(r["person"], r["model"]) for r in rows} == {
        ("alice", "claude-sonnet-4"),
        ("charlie", "claude-opus-4"),
        ("charlie", "claude-sonnet-4"),
        ("alice", "claude-opus-4"),
    }


def test_it_defuses_formulas_in_the_csv(alice, bob):
    new_session(user=alice, model='=HYPERLINK("http://evil")', started_at=days_ago(0))
    response = signed_in(bob).get(reverse("usage_csv"))
    row = list(csv.DictReader(io.StringIO(response.content.decode())))[0]
    assert row["model"].startswith("'=")


def test_it_takes_a_custom_period_and_refuses_a_bad_one(recorded, bob):
    client = signed_in(bob)
    start = (timezone.localdate() - timedelta(days=45)).isoformat()
    end = (timezone.localdate() - timedelta(days=35)).isoformat()
    html = client.get(reverse("usage"), {"period": "custom", "start": start, "end": end})
    assert 'id="total-cost">$9.99<' in html.content.decode()
    bad = client.get(reverse("usage"), {"period": "custom", "start": end, "end": start})
    assert "The start must not be after the end." in bad.content.decode()
    # Dates alone (no period=custom in the link) are taken as asked, or refused as such.
    dated = client.get(reverse("usage"), {"start": start, "end": end})
    assert 'id="total-cost">$9.99<' in dated.content.decode()
    swapped = client.get(reverse("usage"), {"start": end, "end": start})
    assert "The start must not be after the end." in swapped.content.decode()


def test_it_escapes_hostile_model_names_in_the_charts(alice, bob):
    session = new_session(user=alice, model="<script>alert(1)</script>", started_at=days_ago(0))
    turn(session, alice, cost="0.5")
    html = signed_in(bob).get(reverse("usage")).content.decode()
    assert "<script>alert(1)" not in html and "&lt;script&gt;" in html


def test_it_shows_each_rows_cost_against_the_median(alice, recorded):
    from django.core.cache import cache

    cache.clear()
    html = signed_in(alice).get(reverse("index")).content.decode()
    # Median of 0.123457, 1.999999, 0.6, 2.01 is (0.6 + 1.999999) / 2 = 1.2999995.
    ratios = re.findall(r'class="rel-cost rel-(\w+)"[^>]*>×([\d.]+)<', html)
    assert ("low", "0.1") in ratios and ("usual", "1.5") in ratios


# -- access ---------------------------------------------------------------------------------------


def test_it_shows_usage_to_viewers_and_nothing_to_others(bob, erin):
    assert signed_in(bob).get(reverse("usage")).status_code == 200
    assert signed_in(erin).get(reverse("usage")).status_code == 403
    assert signed_in(erin).get(reverse("usage_csv")).status_code == 403
    assert signed_in(erin).get(reverse("attention_feed")).status_code == 403
    anonymous = Client()
    for name in ("usage", "usage_csv", "hooks", "attention_feed"):
        response = anonymous.get(reverse(name))
        assert response.status_code == 302 and "/login/" in response.url, name


def test_it_lets_only_administrators_manage_hooks(alice, bob, dave):
    hook = Hook.objects.create(url="https://hooks.example.org/x")
    for person in (alice, bob):
        client = signed_in(person)
        assert client.get(reverse("hooks")).status_code == 403
        assert client.post(reverse("hooks"), {"url": "https://a.example/"}).status_code == 403
        for name in ("hook_delete", "hook_rotate", "hook_toggle"):
            assert client.post(reverse(name, args=[hook.pk])).status_code == 403
    assert signed_in(dave).get(reverse("hooks")).status_code == 200
    assert Hook.objects.count() == 1


def test_it_needs_csrf_for_every_hook_mutation(dave):
    hook = Hook.objects.create(url="https://hooks.example.org/x")
    client = csrf_client(dave)
    assert client.post(reverse("hooks"), {"url": "https://a.example/"}).status_code == 403
    for name in ("hook_delete", "hook_rotate", "hook_toggle"):
        assert client.post(reverse(name, args=[hook.pk])).status_code == 403
    assert list(Hook.objects.values_list("url", "active")) == [(hook.url, True)]


def test_it_adds_a_hook_and_shows_its_secret_once(dave):
    client = signed_in(dave)
    response = client.post(
        reverse("hooks"),
        {"url": "https://hooks.example.org/in", "kinds": [Kind.FAILED, Kind.LOST]},
    )
    assert response.status_code == 201
    hook = Hook.objects.get()
    assert hook.kinds == [Kind.FAILED, Kind.LOST] and hook.created_by == dave
    assert hook.secret in response.content.decode()
    assert hook.secret not in client.get(reverse("hooks")).content.decode()
    assert AuditEntry.objects.filter(action="webhook.add", actor=dave).exists()

    rotated = client.post(reverse("hook_rotate", args=[hook.pk])).content.decode()
    hook.refresh_from_db()
    assert hook.secret in rotated
    client.post(reverse("hook_toggle", args=[hook.pk]))
    assert not Hook.objects.get().active
    client.post(reverse("hook_delete", args=[hook.pk]))
    assert not Hook.objects.exists()


def test_it_refuses_urls_that_are_not_http(dave):
    response = signed_in(dave).post(reverse("hooks"), {"url": "ftp://files.example.org/"})
    assert response.status_code == 400 and not Hook.objects.exists()


def test_it_keeps_env_hooks_until_the_environment_drops_them(dave):
    hook = Hook.objects.create(url="https://hooks.example.org/env", source=Hook.Source.ENV)
    signed_in(dave).post(reverse("hook_delete", args=[hook.pk]))
    assert Hook.objects.filter(pk=hook.pk).exists()


# -- the attention feed ---------------------------------------------------------------------------


def test_it_feeds_the_sessions_a_person_started_or_watches(alice, bob, charlie):
    mine = turn(new_session(title="mine", user=alice), subtype="error_during_execution")
    watched = record(
        turn(new_session(title="watched", user=charlie)),
        ours(Event.Source.BRIDGE, {"type": "exit", "code": 2}),
    )
    turn(new_session(title="elsewhere", user=charlie), subtype="error_during_execution")

    feed = signed_in(alice).get(reverse("attention_feed"), {"watch": f"{watched.id},junk"}).json()
    by_title = {item["title"]: item for item in feed["sessions"]}
    assert set(by_title) == {"mine", "watched"}
    assert feed["count"] == 2
    assert by_title["mine"]["kind"] == Kind.NEEDS_ATTENTION
    assert by_title["mine"]["reasons"] == ["the last turn ended with an error"]
    assert by_title["watched"]["kind"] == Kind.FAILED
    assert by_title["mine"]["key"] != by_title["watched"]["key"]
    assert signed_in(bob).get(reverse("attention_feed")).json()["count"] == 0
    _ = mine


def test_it_shows_the_attention_badge_in_the_list(alice):
    turn(new_session(title="broken", user=alice), subtype="error_during_execution")
    turn(new_session(title="fine", user=alice))
    html = signed_in(alice).get(reverse("index")).content.decode()
    assert html.count('class="badge badge-attention"') == 1
    assert AgentSession.objects.count() == 2


def test_it_judges_a_page_of_rows_in_one_query(alice, django_assert_max_num_queries):
    for n in range(12):
        turn(new_session(title=f"task {n}", user=alice), subtype="error_during_execution")
    client = signed_in(alice)
    client.get(reverse("index"))  # warm the median's cache and the session
    with django_assert_max_num_queries(9):  # 8 today; one per row would be 20
        html = client.get(reverse("index")).content.decode()
    assert html.count('class="badge badge-attention"') == 12


def test_it_puts_the_badge_on_live_rows_too(alice):
    from dashboard.agents.recording import render_state

    session = turn(new_session(title="live one", user=alice), subtype="error_during_execution")
    assert 'class="badge badge-attention"' in render_state(session)["row"]
    fine = turn(new_session(title="live two", user=alice))
    assert "badge-attention" not in render_state(fine)["row"]


def test_it_dates_idleness_from_when_the_threshold_passed(alice, settings):
    """So a browser that turned notifications on while the session sat idle still hears of it."""
    settings.PORTHOLE_ATTENTION_IDLE_MINUTES = 10
    session = turn(new_session(title="waiting", user=alice))
    ended = timezone.now() - timedelta(minutes=11)
    Event.objects.filter(session=session).update(created_at=ended)
    AgentSession.objects.filter(pk=session.pk).update(last_event_at=ended)
    item = signed_in(alice).get(reverse("attention_feed")).json()["sessions"][0]
    assert item["kind"] == Kind.NEEDS_ATTENTION and item["reasons"] == [
        "idle after a turn, nobody followed up"
    ]
    assert item["changed_at"] == (ended + timedelta(minutes=10)).isoformat()


def test_it_shows_share_link_holders_none_of_it(alice):
    from dashboard.agents.access import create_share_link

    session = turn(new_session(title="shared", user=alice), cost="1.5")
    _, token = create_share_link(session, alice, label="for a guest", expiry="1d")
    guest = Client()
    assert guest.get(reverse("share", args=[token])).status_code == 200
    for name in ("usage", "usage_csv", "hooks", "attention_feed"):
        response = guest.get(reverse(name))
        assert response.status_code == 302 and "/login/" in response.url, name
    page = guest.get(reverse("share", args=[token])).content.decode()
    assert "notify.js" not in page and "/usage/" not in page
