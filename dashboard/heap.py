"""The long-lived processes' heap: what start-up loaded is set aside from garbage collection.

Django, Channels, the web server, the templates' modules and the models are hundreds of thousands of
objects that live as long as the process. Python's full (oldest-generation) collections
walk all of them again and again: at 100–300 viewers a worker paused 75–95 ms for one, which
every viewer's latency of the moment then carried (bench/fanout.py's p99, docs/benchmarks.md).
`gc.freeze()` moves them out of the collector's sight; what is created later is collected
as before.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect what start-up left behind, then freeze the rest; returns the objects frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
