"""Baseline: the official Python SDK consumes the flood directly, as a script would.

Nothing is stored or rendered: each event's arrival time is noted against the
`demo_emitted_at` the demo agent stamped on it, and that is all.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from opencomputer import Sandbox
from opencomputer.agent import AgentEvent

from bench.common import Clock, PeakRSS, flood_prompt, percentiles


async def run(
    api_url: str, api_key: str, events: int, size: int, pace: float = 0.0
) -> dict[str, Any]:
    sandbox = await Sandbox.create(api_url=api_url, api_key=api_key, metadata={"purpose": "bench"})
    latencies: list[float] = []
    kinds: Counter[str] = Counter()
    window = [0.0, 0.0]  # first flood event emitted, last flood event received

    def on_event(event: AgentEvent) -> None:
        now = time.time()
        kinds[event.type] += 1
        emitted = event.data.get("demo_emitted_at")
        if emitted is not None:
            if not latencies:
                window[0] = emitted
            window[1] = now
            latencies.append(now - emitted)

    memory = PeakRSS()
    try:
        memory.start()
        clock = Clock()
        session = await sandbox.agent.start(
            prompt=flood_prompt(events, size, pace), on_event=on_event
        )
        code = await session.wait()
        wall = clock.elapsed()
        mem = memory.stop()
    finally:
        await sandbox.kill()
        await sandbox.close()
    return {
        "exit_code": code,
        "wall_s": wall,
        "flood_events": len(latencies),
        "events_total": sum(kinds.values()),
        "flood_window_s": window[1] - window[0],
        "events_per_s": len(latencies) / (window[1] - window[0]),
        "latency": percentiles(latencies),
        "memory": mem,
        "event_types": dict(kinds),
    }
