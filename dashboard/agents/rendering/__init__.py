"""How every recorded event looks in the timeline, by concern:

- `base`: defensive accessors for hostile JSON, display caps, `clip`.
- `tools`: `ToolIndex`, pairing tool calls with their results across events.
- `items`: the dataclasses the partials in `templates/agents/timeline.html` render.
- `agent`: the agent's own messages (assistant/user turns, init, result, system…).
- `porthole`: Porthole's events (dashboard actions, bridge observations).
- `render`: `describe` and the entry points `render_event`, `render_event_oob`,
  `render_timeline`.

Nothing from an event is marked safe except markdown that went through
`render_markdown`'s sanitiser (DESIGN §4.3).
"""

from dashboard.agents.rendering.base import (
    DISPLAY_CAP,
    MAX_BLOCKS,
    MAX_PARTS,
    SUMMARY_CAP,
    TOOL_CAP,
    Clipped,
    clean_text,
    clip,
    dom_id,
    one_line,
    pretty_json,
)
from dashboard.agents.rendering.items import EventItem
from dashboard.agents.rendering.render import (
    RenderedTimeline,
    describe,
    render_event,
    render_event_oob,
    render_timeline,
)
from dashboard.agents.rendering.tools import ToolIndex, ToolRef, ToolStatus

__all__ = [
    "DISPLAY_CAP",
    "MAX_BLOCKS",
    "MAX_PARTS",
    "SUMMARY_CAP",
    "TOOL_CAP",
    "Clipped",
    "EventItem",
    "RenderedTimeline",
    "ToolIndex",
    "ToolRef",
    "ToolStatus",
    "clean_text",
    "clip",
    "describe",
    "dom_id",
    "one_line",
    "pretty_json",
    "render_event",
    "render_event_oob",
    "render_timeline",
]
