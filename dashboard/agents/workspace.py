"""The Changes panel: files the agent wrote or edited, from the recorded tool calls, and, on
demand while the sandbox lives, a file's current content or its diff against git's index,
fetched by running a command in the sandbox through the exec API (an exec session, read
through its WebSocket until it exits). The diff is made here from the two copies, never by
`git diff`, which runs commands the sandbox's repository names (filters, diff.external...).

Only paths the session's own calls wrote can be fetched (a viewer cannot read arbitrary
files of the sandbox through this), each passed as one argv element (no shell), the output
capped. When the sandbox is gone the list stays, marked stale, and nothing is fetched.
"""

from __future__ import annotations

import asyncio
import difflib
import posixpath
from dataclasses import dataclass, field
from typing import Any

from asgiref.sync import async_to_sync, sync_to_async
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from dashboard.agents import access, upstream
from dashboard.agents.access import viewer_required
from dashboard.agents.models import AgentSession, Event, Sandbox
from dashboard.agents.rendering import budget, highlight
from dashboard.agents.rendering.base import clean_text
from dashboard.opencomputer import Exit, OpenComputerError, Stdout

WRITERS = ("Write", "Edit", "MultiEdit", "NotebookEdit")
MAX_CALLS = 5_000  # recorded assistant turns scanned for writes (the most recent)
MAX_OUTPUT = 200_000  # bytes of a fetched file or diff
FETCH_TIMEOUT = 20.0  # seconds for the command in the sandbox


@dataclass
class ChangedFile:
    path: str
    tools: list[str] = field(default_factory=list)
    last_seq: int = 0
    count: int = 0


def changed_files(session: AgentSession) -> list[ChangedFile]:
    """Files written or edited by the session's tool calls, most recently changed first."""
    events = (
        Event.objects.filter(session=session, source=Event.Source.AGENT, type="assistant")
        .filter(raw__contains='"file_path"')
        .order_by("-seq")
        .only("seq", "raw")[:MAX_CALLS]
    )
    found: dict[str, ChangedFile] = {}
    for event in events:
        data = event.data or {}
        message = data.get("message")
        content = message.get("content") if isinstance(message, dict) else None
        for block in content if isinstance(content, list) else []:
            if not isinstance(block, dict) or block.get("name") not in WRITERS:
                continue
            tool_input = block.get("input")
            path = tool_input.get("file_path") if isinstance(tool_input, dict) else None
            if not isinstance(path, str) or not path or len(path) > 1000:
                continue
            entry = found.setdefault(clean_text(path), ChangedFile(clean_text(path)))
            entry.count += 1
            entry.last_seq = max(entry.last_seq, event.seq)
            if block["name"] not in entry.tools:
                entry.tools.append(str(block["name"]))
    return sorted(found.values(), key=lambda f: -f.last_seq)


def _cwd(session: AgentSession) -> str:
    """The agent's working directory, from its init message (for `git diff`)."""
    init = (
        Event.objects.filter(session=session, source=Event.Source.AGENT, type="system")
        .filter(subtype="init")
        .order_by("-seq")
        .first()
    )
    cwd = (init.data or {}).get("cwd") if init is not None else None
    return cwd if isinstance(cwd, str) and cwd.startswith("/") else ""


async def run_in_sandbox(
    sandbox_id: str, cmd: str, args: list[str], *, cwd: str = ""
) -> tuple[int | None, bytes]:
    """Run a command in the sandbox and collect its stdout (capped) until it exits."""
    client = upstream.client()
    info = await client.start_exec(
        sandbox_id, cmd, args, cwd=cwd or None, timeout=int(FETCH_TIMEOUT)
    )
    output = bytearray()
    code: int | None = None

    async def read() -> None:
        nonlocal code
        async with client.open_stream(sandbox_id, info.session_id) as stream:
            async for frame in stream:
                if isinstance(frame, Stdout) and len(output) <= MAX_OUTPUT:
                    output.extend(frame.data[: MAX_OUTPUT + 1 - len(output)])
                elif isinstance(frame, Exit):
                    code = frame.code
                    return

    await asyncio.wait_for(read(), FETCH_TIMEOUT + 5)
    return code, bytes(output)


def _alive(sandbox: Sandbox) -> bool:
    return sandbox.status == Sandbox.Status.RUNNING


@require_GET
@viewer_required
def changes(request: HttpRequest, session_id: str) -> HttpResponse:
    """The panel's list (loaded when the panel is opened)."""
    session, _ = access.session_for_user(request.user, session_id)
    context = {
        "session": session,
        "files": changed_files(session),
        "alive": _alive(session.sandbox),
    }
    return render(request, "agents/workspace.html#changes", context)


@dataclass
class Fetched:
    path: str
    view: str  # content | diff
    lines: list[Any] | None = None  # highlighted lines
    text: str = ""  # when not highlighted
    truncated: bool = False
    error: str = ""


# Only a regular file is read: `head` on a FIFO or a device the agent left at that path would
# block (or stream) until the fetch times out. The path is an argument, never shell text.
_READ_REGULAR = 'test -f "$1" && exec head -c "$2" -- "$1"'


async def _read_file(sandbox_id: str, path: str) -> tuple[int | None, bytes]:
    return await run_in_sandbox(
        sandbox_id, "sh", ["-c", _READ_REGULAR, "sh", path, str(MAX_OUTPUT + 1)]
    )


async def _read_index(sandbox_id: str, path: str) -> tuple[int | None, bytes]:
    """The file's copy in git's index, read with `cat-file` (no --filters): unlike `git diff`,
    it runs none of the commands the sandbox's repository names in its config or attributes
    (clean/textconv filters, diff.external, core.fsmonitor), which a viewer must not trigger."""
    directory, name = posixpath.split(path)
    return await run_in_sandbox(
        sandbox_id,
        "git",
        ["-c", "core.fsmonitor=false", "-C", directory or ".", "cat-file", "blob", f":./{name}"],
    )


def _decoded(data: bytes) -> str:
    return clean_text(data[:MAX_OUTPUT].decode("utf-8", "replace"))


def _diff_lines(text: str) -> list[str]:
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n\\ No newline at end of file\n"
    return lines


def unified_diff(path: str, staged: bytes, current: bytes) -> str:
    """`git diff`'s view of one file (its index copy against the work tree), made here."""
    if b"\0" in staged[:8000] or b"\0" in current[:8000]:
        return "" if staged == current else f"Binary files a/{path} and b/{path} differ\n"
    return "".join(
        difflib.unified_diff(
            _diff_lines(_decoded(staged)),
            _diff_lines(_decoded(current)),
            f"a/{path.lstrip('/')}",
            f"b/{path.lstrip('/')}",
        )
    )


async def _fetch(session: AgentSession, path: str, view: str) -> Fetched:
    fetched = Fetched(path, view)
    sandbox_id = session.sandbox.upstream_id
    if view == "diff" and not path.startswith("/"):
        path = posixpath.join(await sync_to_async(_cwd)(session) or "/", path)
    try:
        code, output = await _read_file(sandbox_id, path)
        if view == "diff":
            index_code, staged = await _read_index(sandbox_id, path)
    except (OpenComputerError, OSError, TimeoutError) as exc:
        message = upstream.shown(exc) if isinstance(exc, OpenComputerError) else str(exc)
        fetched.error = f"Could not reach the sandbox: {message or type(exc).__name__}"
        return fetched
    if view == "diff" and index_code != 0:
        fetched.error = "Not in a git repository's index there (or git is missing)."
        return fetched
    if code != 0:
        fetched.error = "The file is not there any more (or is not a regular file)."
        return fetched
    fetched.truncated = len(output) > MAX_OUTPUT
    if view == "diff":
        fetched.truncated = fetched.truncated or len(staged) > MAX_OUTPUT
        text = unified_diff(fetched.path, staged, output)
    else:
        text = _decoded(output)
    if view == "diff" and not text.strip():
        fetched.text = "(no uncommitted changes to this file)"
        return fetched
    lexer = highlight.lexer_named("diff") if view == "diff" else highlight.lexer_for_path(path)
    with budget.event_budget():
        fetched.lines = highlight.lines(text, lexer)
    fetched.text = text if fetched.lines is None else ""
    return fetched


@require_GET
@viewer_required
def changed_file(request: HttpRequest, session_id: str) -> HttpResponse:
    """One changed file, now: its content or its diff, fetched from the live sandbox."""
    session, _ = access.session_for_user(request.user, session_id)
    path = request.GET.get("path", "")
    view = "diff" if request.GET.get("view") == "diff" else "content"
    if path not in {f.path for f in changed_files(session)}:
        raise Http404("The session did not write that file.")
    if not _alive(session.sandbox):
        fetched = Fetched(path, view, error="The sandbox is gone: this list is what was recorded.")
    else:
        fetched = async_to_sync(_fetch)(session, path, view)
    return render(request, "agents/workspace.html#file", {"session": session, "fetched": fetched})
