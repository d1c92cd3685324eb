"""A channel layer with one fault, for checks that must notice it."""

from __future__ import annotations

from typing import Any

from channels.layers import InMemoryChannelLayer


class PublishOnlyLayer(InMemoryChannelLayer):  # type: ignore[misc]
    """Takes every group message and delivers none: a worker whose subscription is gone
    while publishing still succeeds."""

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        self.require_valid_group_name(group)
