"""Porthole's benchmark: recording and fan-out against direct SDK consumption, in one run.

    .venv/bin/python bench/run.py [--events N] [--bytes B] [--viewers V] [--repeat R]
                                  [--paced P] [--pace S] [--database-url URL]
                                  [--no-slow] [--profile]

One embedded sandbox server (demo agent) is started on a free loopback port. The demo
agent floods N assistant texts of B characters, each stamped with `demo_emitted_at`, then
exits. Each phase runs in a fresh child process (so one phase's heap does not hide the
next one's growth), against that same server:

- baseline: the official SDK (`opencomputer.Sandbox`) consumes the flood directly;
- porthole: a `Bridge` records it into a throwaway database (SQLite in a temporary
  directory, or `--database-url`) while V viewers watch through the real ASGI app;
- paced: both again with P texts one every S seconds (what one event costs when nothing
  queues);
- slow viewer: one reader, two readers, one reader and one viewer that never reads
  (DESIGN invariant 6; `bench/stalled_daphne.py` does the same under real Daphne);
- profile (`--profile`): the Porthole phase once more under cProfile, and the per-event cost
  of each step of `record` measured alone.

It prints tables (medians over the repeats, and Porthole/baseline ratios) and writes
everything to `bench/results/<timestamp>.json`. Nothing is asserted: this measures.
See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, write_json  # noqa: E402

CHILD_TIMEOUT = 900


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=5000, help="flood events (default 5000)")
    parser.add_argument("--bytes", type=int, default=200, help="characters per event (200)")
    parser.add_argument("--viewers", type=int, default=3, help="reading viewers (3)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each phase (3)")
    parser.add_argument(
        "--database-url",
        default="",
        help="record into this database (e.g. a scratch PostgreSQL) instead of a temporary "
        "SQLite file; the benchmark migrates it and deletes the rows it created",
    )
    parser.add_argument(
        "--paced",
        type=int,
        default=100,
        help="events of the paced scenario, one every --pace seconds (100; 0 skips it)",
    )
    parser.add_argument(
        "--pace", type=float, default=0.02, help="seconds between paced events (0.02)"
    )
    parser.add_argument("--no-slow", action="store_true", help="skip the slow-viewer scenario")
    parser.add_argument(
        "--profile", action="store_true", help="also run the Porthole phase once under cProfile"
    )
    parser.add_argument(
        "--switch-interval",
        type=float,
        default=0.0,
        help="diagnostic: sys.setswitchinterval() for the Porthole phases (Python's default "
        "is 0.005 s); lowering it shows how much of the latency is the GIL hand-off between "
        "the rendering thread and the event loop",
    )
    parser.add_argument(
        "--bridge-thread",
        action="store_true",
        help="diagnostic: run each bridge's database work and rendering in a thread of its own "
        "(asgiref ThreadSensitiveContext) instead of the process-wide one consumers share",
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=0,
        help="diagnostic: record each of the bridge's batches in slices of at most this many "
        "events (each stored, rendered and published before the next)",
    )
    parser.add_argument("--json", type=Path, help="where to write the result JSON")
    # Internal: one phase in this (child) process.
    parser.add_argument("--phase", choices=["baseline", "porthole"], help=argparse.SUPPRESS)
    parser.add_argument("--api-url", help=argparse.SUPPRESS)
    parser.add_argument("--api-key", help=argparse.SUPPRESS)
    parser.add_argument("--stalled", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--profile-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.events < 1 or args.viewers < 1 or args.repeat < 1 or args.bytes < 1:
        parser.error("--events, --bytes, --viewers and --repeat must be at least 1")
    if not args.phase and args.paced and args.pace <= 0:
        parser.error("--pace must be positive")
    return args


# -- a phase, in a child process ---------------------------------------------------------------


def run_phase(args: argparse.Namespace) -> None:
    result: dict[str, Any]
    if args.phase == "baseline":
        from bench import baseline

        result = asyncio.run(
            baseline.run(args.api_url, args.api_key, args.events, args.bytes, args.pace)
        )
    else:
        from bench import porthole

        if args.switch_interval:
            sys.setswitchinterval(args.switch_interval)
        vendor = porthole.setup(args.data_dir, args.api_url, args.api_key, args.database_url)
        result = asyncio.run(
            porthole.run(
                args.events,
                args.bytes,
                args.viewers,
                stalled=args.stalled,
                profile_dir=args.profile_dir,
                pace=args.pace,
                bridge_thread=args.bridge_thread,
                max_batch=args.max_batch,
            )
        )
        result["database"] = vendor
    write_json(args.out, result)


def child(
    args: argparse.Namespace, api_url: str, api_key: str, phase: str, **extra: Any
) -> dict[str, Any]:
    import json

    with tempfile.TemporaryDirectory(prefix="porthole-bench-") as scratch:
        out = Path(scratch) / "result.json"
        command = [
            sys.executable,
            str(ROOT / "bench" / "run.py"),
            "--phase",
            phase,
            "--api-url",
            api_url,
            "--api-key",
            api_key,
            "--events",
            str(extra.get("events", args.events)),
            "--pace",
            str(extra.get("pace", 0)),
            "--bytes",
            str(args.bytes),
            "--viewers",
            str(extra.get("viewers", args.viewers)),
            "--stalled",
            str(extra.get("stalled", 0)),
            "--data-dir",
            scratch,
            "--out",
            str(out),
        ]
        if args.database_url:
            command += ["--database-url", args.database_url]
        if args.switch_interval:
            command += ["--switch-interval", str(args.switch_interval)]
        if args.bridge_thread:
            command += ["--bridge-thread"]
        if args.max_batch:
            command += ["--max-batch", str(args.max_batch)]
        if extra.get("profile_dir"):
            command += ["--profile-dir", str(extra["profile_dir"])]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        subprocess.run(command, cwd=ROOT, env=env, check=True, timeout=CHILD_TIMEOUT)
        return json.loads(out.read_text())


# -- the whole run ---------------------------------------------------------------------------


def median(runs: list[dict[str, Any]], *path: str) -> float:
    values = []
    for run in runs:
        value: Any = run
        for key in path:
            value = value[key]
        values.append(float(value))
    return statistics.median(values)


def summarise(
    baseline: list[dict[str, Any]], porthole: list[dict[str, Any]]
) -> dict[str, dict[str, float]]:
    flood_mb = median(porthole, "flood_bytes") / 2**20  # the same script in both phases
    base = {
        "wall_s": median(baseline, "wall_s"),
        "events_per_s": median(baseline, "events_per_s"),
        "p50_ms": median(baseline, "latency", "p50_ms"),
        "p95_ms": median(baseline, "latency", "p95_ms"),
        "p99_ms": median(baseline, "latency", "p99_ms"),
        "max_ms": median(baseline, "latency", "max_ms"),
        "peak_rss_delta_mb": median(baseline, "memory", "peak_delta_mb"),
    }
    base["mb_per_s"] = base["events_per_s"] * flood_mb / median(porthole, "flood_events")
    ours = {
        "wall_s": median(porthole, "stored_s"),
        "delivered_s": median(porthole, "delivered_s"),
        "events_per_s": median(porthole, "events_per_s"),
        "viewer_events_per_s": median(porthole, "viewer_events_per_s"),
        "mb_per_s": median(porthole, "mb_per_s"),
        "p50_ms": median(porthole, "latency", "p50_ms"),
        "p95_ms": median(porthole, "latency", "p95_ms"),
        "p99_ms": median(porthole, "latency", "p99_ms"),
        "max_ms": median(porthole, "latency", "max_ms"),
        "peak_rss_delta_mb": median(porthole, "memory", "peak_delta_mb"),
        "transaction_p50_ms": median(porthole, "emit_to_transaction", "p50_ms"),
        "transaction_p95_ms": median(porthole, "emit_to_transaction", "p95_ms"),
        "published_p50_ms": median(porthole, "emit_to_published", "p50_ms"),
        "published_p95_ms": median(porthole, "emit_to_published", "p95_ms"),
        "to_viewer_p50_ms": median(porthole, "published_to_viewer", "p50_ms"),
        "to_viewer_p95_ms": median(porthole, "published_to_viewer", "p95_ms"),
        "db_connections_opened": median(porthole, "db_connections_opened"),
        "db_pooled": porthole[0].get("db_pooled", False),
        "db_server_sessions": (
            median(porthole, "db_server_sessions")
            if all(run.get("db_server_sessions") is not None for run in porthole)
            else None
        ),
        "transactions": median(porthole, "transactions"),
        "largest_transaction": median(porthole, "largest_transaction"),
    }
    ratios = {
        "throughput": ours["events_per_s"] / base["events_per_s"],
        "viewer_throughput": ours["viewer_events_per_s"] / base["events_per_s"],
        "latency_p50": ours["p50_ms"] / base["p50_ms"],
        "latency_p95": ours["p95_ms"] / base["p95_ms"],
        "latency_p99": ours["p99_ms"] / base["p99_ms"],
        "memory": ours["peak_rss_delta_mb"] / max(base["peak_rss_delta_mb"], 0.1),
    }
    return {"baseline": base, "porthole": ours, "ratio": ratios}


def _row(label: str, *cells: str) -> str:
    return "| " + " | ".join([f"{label:<40}", *(f"{cell:>13}" for cell in cells)]) + " |"


def _rule(columns: int) -> str:
    return _row("-" * 40, *(["-" * 13] * columns))


def table(config: dict[str, Any], summary: dict[str, dict[str, float]]) -> str:
    b, p, r = summary["baseline"], summary["porthole"], summary["ratio"]
    return "\n".join(
        [
            f"{config['events']} events x {config['bytes']} B, {config['viewers']} viewers, "
            f"median of {config['repeat']} runs; {config['database']}, Python "
            f"{config['python']}, {config['cpus']} CPUs, load average "
            f"{config['load_average_before']:.1f} before, "
            f"{config['load_average_after']:.1f} after",
            "",
            _row("", "baseline SDK", "Porthole", "P / base"),
            _rule(3),
            _row(
                "start -> exit received/stored (s)", f"{b['wall_s']:.2f}", f"{p['wall_s']:.2f}", ""
            ),
            _row("  ... -> exit on every viewer (s)", "", f"{p['delivered_s']:.2f}", ""),
            _row(
                "throughput, stored (events/s)",
                f"{b['events_per_s']:,.0f}",
                f"{p['events_per_s']:,.0f}",
                f"{r['throughput']:.3f}",
            ),
            _row(
                "throughput, on viewers (events/s)",
                "",
                f"{p['viewer_events_per_s']:,.0f}",
                f"{r['viewer_throughput']:.3f}",
            ),
            _row("throughput, stored (MB/s)", f"{b['mb_per_s']:.2f}", f"{p['mb_per_s']:.2f}", ""),
            *(
                _row(
                    f"latency {name} (ms)",
                    f"{b[key]:.1f}",
                    f"{p[key]:.1f}",
                    f"{r['latency_' + name]:,.0f}" if "latency_" + name in r else "",
                )
                for name, key in (
                    ("p50", "p50_ms"),
                    ("p95", "p95_ms"),
                    ("p99", "p99_ms"),
                    ("max", "max_ms"),
                )
            ),
            _row(
                "peak RSS growth (MB)",
                f"{b['peak_rss_delta_mb']:.1f}",
                f"{p['peak_rss_delta_mb']:.1f}",
                f"{r['memory']:.1f}",
            ),
            _row(
                "  emit -> transaction start p50/p95 (ms)",
                "",
                f"{p['transaction_p50_ms']:.0f} / {p['transaction_p95_ms']:.0f}",
                "",
            ),
            _row(
                "  emit -> published p50/p95 (ms)",
                "",
                f"{p['published_p50_ms']:.0f} / {p['published_p95_ms']:.0f}",
                "",
            ),
            _row(
                "  published -> viewer p50/p95 (ms)",
                "",
                f"{p['to_viewer_p50_ms']:.0f} / {p['to_viewer_p95_ms']:.0f}",
                "",
            ),
            _row(
                "  transactions (largest, in events)",
                "",
                f"{p['transactions']:.0f} ({p['largest_transaction']:.0f})",
                "",
            ),
            _row(
                "  database connections lent by the pool"
                if p.get("db_pooled")
                else "  database connections opened",
                "",
                f"{p['db_connections_opened']:.0f}",
                "",
            ),
            *(
                [_row("  ... as PostgreSQL counts them", "", f"{server:.0f}", "")]
                if (server := p.get("db_server_sessions")) is not None
                else []
            ),
        ]
    )


def runs_table(baseline: list[dict[str, Any]], porthole: list[dict[str, Any]]) -> str:
    """Every repeat, not only the medians: stored events/s beside the SDK's in the same
    repeat, and whether the whole flood was stored."""
    lines = ["Each run (SDK events/s, Porthole stored events/s, ratio, flood events stored):"]
    for number, (base, ours) in enumerate(zip(baseline, porthole, strict=True), 1):
        lines.append(
            f"  run {number}: {base['events_per_s']:,.0f}  {ours['events_per_s']:,.0f}  "
            f"{ours['events_per_s'] / base['events_per_s']:.3f}  {ours['flood_events']:,}"
        )
    return "\n".join(lines)


def paced_table(paced: dict[str, list[dict[str, Any]]]) -> str:
    base, ours = paced["baseline"], paced["porthole"]
    rows = [_row("", "baseline SDK", "Porthole", "P / base"), _rule(3)]
    for name in ("p50", "p95", "p99", "max"):
        b = median(base, "latency", f"{name}_ms")
        p = median(ours, "latency", f"{name}_ms")
        rows.append(_row(f"latency {name} (ms)", f"{b:.1f}", f"{p:.1f}", f"{p / b:.1f}"))
    rows.append(
        _row(
            "  emit -> published p50 (ms)",
            "",
            f"{median(ours, 'emit_to_published', 'p50_ms'):.1f}",
            "",
        )
    )
    rows.append(
        _row(
            "  published -> viewer p50 (ms)",
            "",
            f"{median(ours, 'published_to_viewer', 'p50_ms'):.1f}",
            "",
        )
    )
    return "\n".join(rows)


SLOW_CONFIGS = {"1 reader": (1, 0), "2 readers": (2, 0), "1 + 1 stalled": (1, 1)}


def slow_table(slow: dict[str, list[dict[str, Any]]]) -> str:
    runs = [slow[name] for name in SLOW_CONFIGS]

    def first_reader(key: str) -> list[str]:
        return [
            f"{statistics.median(r['viewers'][0]['latency'][key] for r in config):.0f}"
            for config in runs
        ]

    stalled = slow["1 + 1 stalled"]
    pile_mb = statistics.median(r["stalled"][0]["chars"] for r in stalled) / 2**20
    pile_events = statistics.median(r["stalled"][0]["events"] for r in stalled)
    return "\n".join(
        [
            f"median of {len(stalled)} runs each",
            "",
            _row("", *SLOW_CONFIGS),
            _rule(3),
            _row("first reader's latency p50 (ms)", *first_reader("p50_ms")),
            _row("first reader's latency p95 (ms)", *first_reader("p95_ms")),
            _row(
                "throughput, stored (events/s)",
                *(f"{median(config, 'events_per_s'):,.0f}" for config in runs),
            ),
            _row(
                "peak RSS growth (MB)",
                *(f"{median(config, 'memory', 'peak_delta_mb'):.1f}" for config in runs),
            ),
            _row("stalled viewer's unsent pile (MB)", "", "", f"{pile_mb:.1f}"),
            _row("  ... events in it", "", "", f"{pile_events:,.0f}"),
            _row(
                "readers got every event once, in order",
                *(
                    _yes(all(v["exactly_once_in_order"] for r in config for v in r["viewers"]))
                    for config in runs
                ),
            ),
        ]
    )


def _yes(value: bool) -> str:
    return "yes" if value else "NO"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.phase:
        run_phase(args)
        return 0

    from tests.conftest import start_localsandbox, stop_localsandbox

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.json or RESULTS / f"{stamp}.json"
    started = time.perf_counter()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="porthole-bench-server-") as server_dir:
        server = start_localsandbox(Path(server_dir))
        print(f"embedded sandbox server: {server.api_url} (demo agent)", flush=True)
        try:
            baseline_runs: list[dict[str, Any]] = []
            porthole_runs: list[dict[str, Any]] = []
            for index in range(args.repeat):
                print(f"run {index + 1}/{args.repeat}: baseline", flush=True)
                baseline_runs.append(child(args, server.api_url, server.api_key, "baseline"))
                print(f"run {index + 1}/{args.repeat}: porthole", flush=True)
                porthole_runs.append(child(args, server.api_url, server.api_key, "porthole"))
            paced: dict[str, list[dict[str, Any]]] = {}
            if args.paced:
                for index in range(args.repeat):
                    for phase in ("baseline", "porthole"):
                        print(f"paced {index + 1}/{args.repeat}: {phase}", flush=True)
                        paced.setdefault(phase, []).append(
                            child(
                                args,
                                server.api_url,
                                server.api_key,
                                phase,
                                events=args.paced,
                                pace=args.pace,
                            )
                        )
            slow: dict[str, list[dict[str, Any]]] = {}
            if not args.no_slow:
                for index in range(args.repeat):
                    for name, (readers, stalled) in SLOW_CONFIGS.items():
                        print(f"slow viewer {index + 1}/{args.repeat}: {name}", flush=True)
                        slow.setdefault(name, []).append(
                            child(
                                args,
                                server.api_url,
                                server.api_key,
                                "porthole",
                                viewers=readers,
                                stalled=stalled,
                            )
                        )
            profile: dict[str, Any] = {}
            if args.profile:
                print("profile: porthole under cProfile", flush=True)
                profile_dir = out.parent / f"{out.stem}-profile"
                profiled = child(
                    args, server.api_url, server.api_key, "porthole", profile_dir=profile_dir
                )
                profile = {
                    "run": profiled,
                    "summary": profiled.pop("profile"),
                    "unit_costs": profiled.pop("unit_costs"),
                }
        except BaseException:
            state = server.process.poll()
            print(
                f"\nthe embedded sandbox server is "
                f"{'running' if state is None else f'gone (exit status {state})'}; "
                "its last output:\n" + "".join(server.log[-40:]),
                file=sys.stderr,
            )
            raise
        finally:
            stop_localsandbox(server)

    config = {
        "events": args.events,
        "bytes": args.bytes,
        "viewers": args.viewers,
        "repeat": args.repeat,
        "database": porthole_runs[0]["database"],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average_before": load_before[0],
        "load_average_after": os.getloadavg()[0],
        "switch_interval": args.switch_interval or sys.getswitchinterval(),
        "bridge_thread": args.bridge_thread,
        "max_batch": args.max_batch,
    }
    summary = summarise(baseline_runs, porthole_runs)
    print()
    print(table(config, summary))
    print()
    print(runs_table(baseline_runs, porthole_runs))
    if paced:
        print()
        print(f"Paced: {args.paced} events, one every {args.pace * 1000:g} ms:")
        print(paced_table(paced))
    if slow:
        print()
        print("Slow viewer (DESIGN invariant 6):")
        print(slow_table(slow))
    checked = [(run, args.events) for run in porthole_runs]
    checked += [(run, args.events) for runs in slow.values() for run in runs]
    checked += [(run, args.paced) for run in paced.get("porthole", [])]
    for run, expected in checked:
        if run["flood_events"] != expected or not all(
            viewer["exactly_once_in_order"] for viewer in run["viewers"]
        ):
            print("\nWARNING: a Porthole run lost, doubled or reordered events; see the JSON.")
            break
    if profile:
        print("\nCost per event of each step of `record`, measured alone (microseconds):")
        costs = profile["unit_costs"]
        for name in UNIT_COSTS:
            print(f"  {name:<32} {costs[name]:>10,.0f}")
        print("\nA one-event record, per statement (milliseconds per record, wall clock):")
        for kind, ms in costs["statements"].items():
            print(f"  {kind:<40} {ms:>6.2f}")
        print("\ncProfile of the Porthole phase (all threads), by own time:")
        print(_head(profile["summary"]["tottime"], 25))
        print("\n... by cumulative time:")
        print(_head(profile["summary"]["cumulative"], 40))
    write_json(
        out,
        {
            "config": config,
            "summary": summary,
            "baseline": baseline_runs,
            "porthole": porthole_runs,
            "paced": paced,
            "slow_viewer": slow,
            "profile": profile,
            "elapsed_s": time.perf_counter() - started,
        },
    )
    print(f"\nresult: {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    print(f"elapsed: {time.perf_counter() - started:.0f} s")
    return 0


UNIT_COSTS = (
    "json_parse_us",
    "store_in_one_transaction_us",
    "describe_us",
    "render_event_oob_us",
    "store_one_per_transaction_us",
    "record_one_per_call_us",
)


def _head(text: str, lines: int) -> str:
    kept = text.strip("\n").splitlines()
    start = next((i for i, line in enumerate(kept) if "ncalls" in line), 0)
    return "\n".join(kept[start : start + lines + 1])


if __name__ == "__main__":
    sys.exit(main())
