"""Reading aids for the session page, as template tags so that the page's view (another
module's) needs no change: `{% session_outline session %}`."""

from __future__ import annotations

from typing import Any

from django import template

from dashboard.agents.models import AgentSession
from dashboard.agents.rendering.outline import outline

register = template.Library()


@register.inclusion_tag("agents/timeline.html#outline")
def session_outline(session: AgentSession) -> dict[str, Any]:
    return {"entries": outline(session)}
