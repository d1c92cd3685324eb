"""Reading aids for the session page, as template tags so that the page's view (another
module's) needs no change: `{% session_outline session last_seq %}`."""

from __future__ import annotations

from django import template
from django.utils.safestring import SafeString

from dashboard.agents.models import AgentSession
from dashboard.agents.rendering.outline import outline
from dashboard.agents.rendering.templates import render

register = template.Library()


@register.simple_tag
def session_outline(session: AgentSession, last_seq: int) -> SafeString:
    """The outline as of the page's last seq (what comes after it arrives live)."""
    return render("outline_list", entries=outline(session, through=last_seq))
