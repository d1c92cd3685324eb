from __future__ import annotations

from datetime import UTC, datetime


def utc_now_iso() -> str:
    """RFC 3339 in UTC with milliseconds, e.g. 2025-01-31T12:00:00.123Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
