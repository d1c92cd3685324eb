"""A month of recorded sessions and a webhook log, for the browser tests' screenshots.

Run inside the Porthole under test (`manage.py shell -c "from tests.awareness.seed import
seed; seed()"`): sessions are recorded through `append_events` like the bridge records them,
and the webhook log comes from the real dispatcher POSTing to two loopback receivers (one
answers 200, one 500 until the dispatcher gives up).
"""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import timedelta
from decimal import Decimal

import httpx
from django.contrib.auth.models import User
from django.test import override_settings
from django.utils import timezone

from dashboard.agents.access import set_role
from dashboard.agents.models import AgentSession, Event, Sandbox
from dashboard.agents.recording import append_events
from dashboard.awareness import dispatcher
from dashboard.awareness.models import Delivery, Hook, Kind
from tests.awareness.helpers import agent, ours, result
from tests.awareness.receiver import receiver

PEOPLE = ("alice", "charlie", "dave", "erin")
MODELS = ("claude-sonnet-4-20250514", "claude-opus-4-20250514", "claude-haiku-3-5")
TASKS = (
    "Refactor the parser",
    "Write the migration guide",
    "Fix flaky upload test",
    "Bump dependencies",
    "Triage open issues",
    "Profile the importer",
)


def _session(person: User, day: int, rng: random.Random) -> None:
    model = rng.choice(MODELS)
    started = timezone.now() - timedelta(days=day, hours=rng.randint(0, 8))
    session = AgentSession.objects.create(
        sandbox=Sandbox.objects.create(upstream_id=f"sbx-seed-{uuid.uuid4().hex[:10]}"),
        upstream_id=f"ses-{uuid.uuid4().hex[:10]}",
        title=rng.choice(TASKS),
        started_by=person,
        started_at=started,
        ended_at=started + timedelta(minutes=rng.randint(2, 50)),
        status=AgentSession.Status.EXITED,
        model=model,
    )
    scale = {"opus": 5, "sonnet": 1}.get(model.split("-")[1], 0.2)
    events = [ours(Event.Source.DASHBOARD, {"type": "prompt", "text": session.title})]
    for _ in range(rng.randint(1, 3)):
        cost = Decimal(str(round(rng.uniform(0.05, 0.9) * scale, 6)))
        tokens = (rng.randint(2_000, 40_000), rng.randint(500, 8_000))
        events += [
            agent({"type": "system", "subtype": "init", "model": model}),
            result(cost=str(cost), turns=rng.randint(1, 12), tokens=tokens),
            agent({"type": "turn_complete"}),
        ]
    code = 0 if rng.random() > 0.15 else 1
    events.append(ours(Event.Source.BRIDGE, {"type": "exit", "code": code}))
    append_events(session.id, events)


def seed(days: int = 30, seed_value: int = 13) -> None:
    rng = random.Random(seed_value)
    people = []
    for name in PEOPLE:
        person, created = User.objects.get_or_create(username=name)
        if created:
            set_role(person, "operator")
        people.append(person)
    dispatcher.scan()  # the cursor starts before the seeded events
    with receiver() as ok, receiver(default=500) as failing:
        Hook.objects.create(
            url=ok.url.replace("/hook", "/slack"),
            description="#agents channel",
            created_at=timezone.now() - timedelta(days=1),
        )
        Hook.objects.create(
            url=failing.url.replace("/hook", "/ci"),
            description="CI dashboard (down)",
            kinds=[Kind.FAILED, Kind.LOST],
            created_at=timezone.now() - timedelta(days=1),
        )
        for day in range(days):
            for _ in range(rng.randint(0, 4) + (2 if day % 7 in (1, 2, 3) else 0)):
                _session(rng.choice(people), day, rng)
        with override_settings(
            PORTHOLE_WEBHOOK_MAX_ATTEMPTS=3, PORTHOLE_WEBHOOK_BACKOFF_SECONDS=0.01
        ):
            asyncio.run(_deliver())


async def _deliver() -> None:
    from asgiref.sync import sync_to_async

    async with httpx.AsyncClient(timeout=5) as client:
        for _ in range(200):
            await dispatcher.run_once(client, "seed")
            pending = await sync_to_async(
                Delivery.objects.filter(status=Delivery.Status.PENDING).exists
            )()
            if not pending:
                return
            await asyncio.sleep(0.02)
