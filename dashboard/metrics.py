"""Porthole's Prometheus metrics that code increments as things happen.

Import the one you need and call it (`metrics.LAYER_DROPS.labels("full").inc()`). Each
process counts its own; `/metrics` on a web worker shows that worker's, and a bridges
worker exposes its own with `start_metrics_server()` when PORTHOLE_METRICS_PORT is set.
What the database knows (sessions by status, leases held, viewers, events stored) is read
from it when scraped (dashboard/ops.py), so it is the same on every worker.

Each metric's note says what counts it.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Counted by recording.record after each committed batch.
EVENTS_RECORDED = Counter(
    "porthole_events_recorded", "Events this process recorded (committed to the database)"
)
# Observed by the bridge for each event it records: from reading the frame it came in (for
# an event of the bridge's own, such as a reconnection's note: from making it) to the commit.
RECORDING_LAG = Histogram(
    "porthole_recording_lag_seconds",
    "Time from reading a frame upstream to committing its events",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
# Counted by the bridge where it records `reconnected`.
UPSTREAM_RECONNECTS = Counter(
    "porthole_upstream_reconnects", "Upstream exec sockets this process reconnected"
)
# Counted by the bridge when it drops its upstream socket on purpose because its reader fell
# behind (also counted in UPSTREAM_RECONNECTS): the server would otherwise drop live output.
UPSTREAM_LAG_RECONNECTS = Counter(
    "porthole_upstream_lag_reconnects",
    "Upstream exec sockets this process reconnected because its reader fell behind",
)
# Counted where a message goes missing: a direct send on Redis that fails
# (dashboard.redis_layer: reason "full", the channel's capacity reached; "error", Redis
# failed), and a session's live message that a feed found never arrived (fanout.Feed:
# "lost"; its viewers are caught up from the database).
LAYER_DROPS = Counter(
    "porthole_channel_layer_drops",
    "Channel-layer messages dropped or failed in this process",
    ["reason"],
)
# Kept by the hub (agents.fanout.Hub) as sockets join and leave a session's feed: how a load
# balancer spreads viewers over the workers (the database's porthole_viewers is the total).
VIEWERS_HERE = Gauge("porthole_viewers_here", "Session sockets open on this process")
# Counted by the supervisor (claims) and the bridge (fenced out by another worker).
LEASES_CLAIMED = Counter("porthole_leases_claimed", "Bridge leases this process claimed")
LEASES_LOST = Counter("porthole_leases_lost", "Bridge leases this process lost (fenced out)")
