"""Small helpers shared by the benchmark phases: statistics, memory, the flood script."""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Where runs write their JSON; the test suite's smoke runs point it at a scratch directory.
RESULTS = Path(os.environ.get("PORTHOLE_BENCH_RESULTS") or ROOT / "bench" / "results")


def flood_prompt(events: int, size: int, pace: float = 0.0) -> str:
    """The demo agent's script: `events` assistant texts of `size` characters, each stamped
    with `demo_emitted_at`, then exit. With `pace`, one text every `pace` seconds, after a
    half-second pause so that the consumer is attached and live before the first one (each
    pause adds two unstamped texts: the demo's `sleep` says when it starts and ends)."""
    if not pace:
        return f"flood {events} {size}\nexit 0"
    return "sleep 0.5\n" + f"flood 1 {size}\nsleep {pace:g}\n" * events + "exit 0"


def percentiles(values: Iterable[float]) -> dict[str, float | int]:
    """p50/p95/p99/max/mean of seconds, reported in milliseconds (nearest-rank)."""
    ordered = sorted(values)
    if not ordered:
        return {"count": 0}

    def rank(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]

    return {
        "count": len(ordered),
        "p50_ms": rank(50) * 1000,
        "p95_ms": rank(95) * 1000,
        "p99_ms": rank(99) * 1000,
        "max_ms": ordered[-1] * 1000,
        "mean_ms": sum(ordered) / len(ordered) * 1000,
    }


# -- memory ----------------------------------------------------------------------------------

_STATUS_FIELD = re.compile(r"^(VmRSS|VmHWM):\s+(\d+) kB", re.MULTILINE)


def _status() -> dict[str, int]:
    """VmRSS and VmHWM of this process in bytes (Linux); empty elsewhere."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return {}
    return {name: int(kb) * 1024 for name, kb in _STATUS_FIELD.findall(text)}


def rss() -> int:
    """Resident set size now, in bytes (0 when unknown)."""
    found = _status().get("VmRSS")
    if found is not None:
        return found
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # a peak, not "now"


class PeakRSS:
    """The growth of resident memory over a measured section.

    The peak is the kernel's high-water mark (VmHWM), reset at `start()` through
    `/proc/self/clear_refs` (Linux >= 4.0), so what came before the section does not count.
    Only where that reset is refused does a thread sample the RSS (every 5 ms): it would
    otherwise compete for the GIL with what is measured.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.start_rss = 0
        self.peak_rss = 0
        self.end_rss = 0
        self.method = "sampled"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "VmHWM"
        except OSError:
            self.method = "sampled"
        self.start_rss = self.peak_rss = rss()
        if self.method == "sampled":
            self._thread = threading.Thread(target=self._sample, daemon=True, name="bench-rss")
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_rss = max(self.peak_rss, rss())

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.end_rss = rss()
        peak = max(self.peak_rss, self.end_rss)
        if self.method == "VmHWM":
            peak = max(peak, _status().get("VmHWM", 0))
        return {
            "method": self.method,
            "start_mb": self.start_rss / 2**20,
            "peak_delta_mb": (peak - self.start_rss) / 2**20,
            "end_delta_mb": (self.end_rss - self.start_rss) / 2**20,
        }


# -- results ---------------------------------------------------------------------------------


class Clock:
    """Wall-clock (for latencies against the agent's `time.time()`) and a monotonic span."""

    def __init__(self) -> None:
        self.wall0 = time.time()
        self.mono0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.mono0


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
