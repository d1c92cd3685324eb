"""A local stand-in for the Anthropic Messages API, enough for the Claude Code CLI to run offline.

The CLI honours `ANTHROPIC_BASE_URL`, so pointing it here lets tests drive the real CLI (and
everything above it: claude-agent-sdk, our wrapper, the sandbox server, the dashboard) with
scripted model replies and no network.

    api = MessagesAPI().start()
    api.script(ToolUse("Bash", {"command": "echo hi"}), Text("done"))
    env = {"ANTHROPIC_BASE_URL": api.base_url, "ANTHROPIC_API_KEY": "test", **api.cli_env()}
    ...
    assert api.turn_requests()[0].body["model"] == "claude-sonnet-4-20250514"
    api.stop()

Replies are consumed in order by the agent loop's requests (`POST /v1/messages` that offer tools,
see `Request.is_agent_turn`); the CLI's side requests (titles, summaries, ...) and any request
that finds the script empty get `MessagesAPI.default_reply`. Every request is recorded.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

logger = logging.getLogger(__name__)

_ids = itertools.count(1)


def _new_id(prefix: str) -> str:
    return f"{prefix}_fake{next(_ids):08d}"


# ---------------------------------------------------------------- replies a test can script


@dataclass
class Text:
    """A plain text answer that ends the turn."""

    text: str
    stop_reason: str = "end_turn"

    def blocks(self) -> list[dict[str, Any]]:
        return [{"type": "text", "text": self.text}]


@dataclass
class Thinking:
    """A thinking block followed by a text answer."""

    thinking: str
    text: str

    stop_reason: str = "end_turn"

    def blocks(self) -> list[dict[str, Any]]:
        return [
            {"type": "thinking", "thinking": self.thinking, "signature": "fake-signature"},
            {"type": "text", "text": self.text},
        ]


@dataclass
class ToolUse:
    """A request to run a tool; the CLI runs it and sends the tool_result in its next request."""

    name: str
    input: dict[str, Any]
    text: str | None = None  # optional text before the tool call
    id: str = field(default_factory=lambda: _new_id("toolu"))
    stop_reason: str = "tool_use"

    def blocks(self) -> list[dict[str, Any]]:
        blocks: list[dict[str, Any]] = [{"type": "text", "text": self.text}] if self.text else []
        blocks.append({"type": "tool_use", "id": self.id, "name": self.name, "input": self.input})
        return blocks


@dataclass
class Hold:
    """A reply that starts streaming and then stalls until released, for interrupt tests.

    `started` is set once the response headers and `message_start` are out, so a test can wait
    for "the model is answering" without sleeping. `release()` lets it finish with `text`; a
    client that hangs up (the CLI aborting on interrupt) also ends it. `timeout` bounds the stall
    so a broken test cannot wedge the server.
    """

    text: str = "finally done"
    timeout: float = 60.0
    started: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)
    stop_reason: str = "end_turn"

    def release(self) -> None:
        self.released.set()

    def blocks(self) -> list[dict[str, Any]]:
        return [{"type": "text", "text": self.text}]


@dataclass
class APIError:
    """An HTTP error in the Messages API's error shape, e.g. 400 invalid_request_error."""

    status: int = 400
    error_type: str = "invalid_request_error"
    message: str = "scripted error"


ModelReply = Text | Thinking | ToolUse | Hold
Reply = ModelReply | APIError
# A reply computed from the request it answers, e.g. `lambda r: Text("echo: " + r.last_user_text)`.
ReplyFactory = Callable[["Request"], Reply]


# ---------------------------------------------------------------- what the server received


@dataclass
class Request:
    """One HTTP request the stand-in received."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any  # parsed JSON, or the raw text when it is not JSON, or None

    @property
    def is_messages(self) -> bool:
        return self.method == "POST" and self.path.split("?")[0] == "/v1/messages"

    @property
    def is_agent_turn(self) -> bool:
        """A request from the agent loop (it offers tools), as opposed to a CLI side request."""
        return self.is_messages and isinstance(self.body, dict) and bool(self.body.get("tools"))

    @property
    def model(self) -> str | None:
        return self.body.get("model") if isinstance(self.body, dict) else None

    @property
    def system_text(self) -> str:
        """The system prompt as one string, whether sent as a string or as text blocks."""
        system = self.body.get("system") if isinstance(self.body, dict) else None
        if isinstance(system, str):
            return system
        if isinstance(system, list):
            return "\n".join(b.get("text", "") for b in system if isinstance(b, dict))
        return ""

    @property
    def tool_names(self) -> list[str]:
        tools = self.body.get("tools") if isinstance(self.body, dict) else None
        return [t.get("name", "") for t in tools or [] if isinstance(t, dict)]

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.body.get("messages", []) if isinstance(self.body, dict) else []

    @property
    def last_user_text(self) -> str:
        """The text blocks of the last user message (the prompt, plus any CLI reminders)."""
        if not self.messages:
            return ""
        content = self.messages[-1].get("content")
        if isinstance(content, str):
            return content
        texts = [b for b in content or [] if isinstance(b, dict) and b.get("type") == "text"]
        return "\n".join(b.get("text", "") for b in texts)

    def tool_results(self) -> list[dict[str, Any]]:
        """The tool_result blocks in the last user message (what the CLI reports back)."""
        if not self.messages:
            return []
        content = self.messages[-1].get("content")
        if not isinstance(content, list):
            return []
        return [b for b in content if isinstance(b, dict) and b.get("type") == "tool_result"]


# ---------------------------------------------------------------- the server


class MessagesAPI:
    """A threaded HTTP server on 127.0.0.1 that answers like the Anthropic Messages API."""

    def __init__(self, default_reply: Reply | ReplyFactory | None = None) -> None:
        self.default_reply: Reply | ReplyFactory = default_reply or Text("OK")
        self.requests: list[Request] = []
        self._script: deque[Reply | ReplyFactory] = deque()
        self._holds: list[Hold] = []  # every Hold ever scripted, to release them on stop()
        self._lock = threading.Condition()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> MessagesAPI:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="messages-api")
        self._thread.daemon = True
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        with self._lock:  # unblock any Hold still stalling a handler thread
            for hold in self._holds:
                hold.release()
        self._server.shutdown()
        self._server.server_close()
        self._server = None

    def __enter__(self) -> MessagesAPI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """What to put in ANTHROPIC_BASE_URL (no trailing slash, no /v1)."""
        assert self._server is not None, "start() first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @staticmethod
    def cli_env() -> dict[str, str]:
        """Environment that keeps the Claude Code CLI from calling anything but this server."""
        return {
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "DISABLE_TELEMETRY": "1",
            "DISABLE_ERROR_REPORTING": "1",
            "DISABLE_AUTOUPDATER": "1",
            "DISABLE_BUG_COMMAND": "1",
        }

    # -- scripting and inspection

    def script(self, *replies: Reply | ReplyFactory) -> None:
        """Queue replies (or functions of the request returning one) for the next agent-loop
        requests, in order."""
        with self._lock:
            self._script.extend(replies)
            self._holds.extend(r for r in replies if isinstance(r, Hold))

    def pending(self) -> int:
        """How many scripted replies have not been used yet."""
        with self._lock:
            return len(self._script)

    def turn_requests(self) -> list[Request]:
        """The agent loop's `POST /v1/messages` requests so far."""
        with self._lock:
            return [r for r in self.requests if r.is_agent_turn]

    def unknown_requests(self) -> list[Request]:
        """Requests the stand-in does not implement (answered 404): what the CLI tried besides."""
        with self._lock:
            return [r for r in self.requests if _route(r) is None]

    def wait_for(self, predicate: Callable[[list[Request]], bool], timeout: float = 30.0) -> None:
        """Block until `predicate(requests)` holds; raise TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not predicate(list(self.requests)):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"condition not met; got {len(self.requests)} requests")
                self._lock.wait(remaining)

    # -- used by the handler

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)
            self._lock.notify_all()

    def _next_reply(self, request: Request) -> Reply:
        with self._lock:
            scripted = self._script.popleft() if request.is_agent_turn and self._script else None
        reply = scripted or self.default_reply
        if callable(reply):
            reply = reply(request)
            if isinstance(reply, Hold):
                with self._lock:
                    self._holds.append(reply)
        return reply


# ---------------------------------------------------------------- HTTP plumbing


def _route(request: Request) -> str | None:
    path = request.path.split("?")[0]
    if request.method == "POST" and path == "/v1/messages":
        return "messages"
    if request.method == "POST" and path == "/v1/messages/count_tokens":
        return "count_tokens"
    if request.method == "HEAD" or (request.method == "GET" and path in ("/", "/v1")):
        return "root"  # connectivity probes
    return None


def _handler_for(api: MessagesAPI) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        owner = api

    return Handler


class _Handler(BaseHTTPRequestHandler):
    owner: MessagesAPI
    protocol_version = "HTTP/1.1"  # keep-alive, chunked streaming: what fetch() expects

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        logger.debug("messages-api: " + format, *args)

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def _handle(self) -> None:
        request = self._read_request()
        self.owner._record(request)
        route = _route(request)
        if route == "messages":
            self._messages(request)
        elif route == "count_tokens":
            self._send_json(200, {"input_tokens": _estimate_tokens(request.body)})
        elif route == "root":
            self._send_json(200, {})
        else:
            logger.warning("messages-api: unhandled %s %s", request.method, request.path)
            self._send_json(404, _error_body("not_found_error", f"no route {request.path}"))

    def _read_request(self) -> Request:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        text = raw.decode("utf-8", errors="replace")
        try:
            body: Any = json.loads(text) if text else None
        except json.JSONDecodeError:
            body = text
        headers = {k.lower(): v for k, v in self.headers.items()}
        return Request(self.command, self.path, headers, body)

    # -- /v1/messages

    def _messages(self, request: Request) -> None:
        reply = self.owner._next_reply(request)
        if isinstance(reply, APIError):
            self._send_json(reply.status, _error_body(reply.error_type, reply.message))
            return
        model = request.model or "claude-sonnet-4-20250514"
        stream = isinstance(request.body, dict) and bool(request.body.get("stream"))
        try:
            if stream:
                self._stream_message(reply, model, _estimate_tokens(request.body))
            else:
                self._send_json(200, _message(reply, model, _estimate_tokens(request.body)))
        except (BrokenPipeError, ConnectionResetError):
            # The client hung up mid-reply: the CLI aborting a request on interrupt.
            logger.debug("messages-api: client went away during the reply")
            self.close_connection = True

    def _stream_message(self, reply: ModelReply, model: str, input_tokens: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("request-id", _new_id("req"))
        self.end_headers()
        for event in _sse_events(reply, model, input_tokens):
            if event is _STALL and isinstance(reply, Hold):
                self._stall(reply)
                continue
            self._send_chunk(_format_sse(event))
        self._send_chunk(b"")  # the terminating zero-length chunk

    def _stall(self, reply: Hold) -> None:
        """Hold the stream open (with pings, so the hang-up is noticed) until released."""
        reply.started.set()
        deadline = time.monotonic() + reply.timeout
        while not reply.released.wait(0.2) and time.monotonic() < deadline:
            self._send_chunk(_format_sse({"type": "ping"}))

    def _send_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _send_json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("request-id", _new_id("req"))
        if status >= 400:
            self.send_header("x-should-retry", "false")  # fail fast: no SDK retry loops
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


# ---------------------------------------------------------------- Messages API shapes


_STALL = object()  # marker in the event sequence: a Hold reply stalls here


def _usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


def _output_tokens(blocks: list[dict[str, Any]]) -> int:
    return max(1, len(json.dumps(blocks)) // 4)


def _message(reply: ModelReply, model: str, input_tokens: int) -> dict[str, Any]:
    """A complete non-streaming Messages API response."""
    blocks = reply.blocks()
    return {
        "id": _new_id("msg"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": blocks,
        "stop_reason": reply.stop_reason,
        "stop_sequence": None,
        "usage": _usage(input_tokens, _output_tokens(blocks)),
    }


def _sse_events(reply: ModelReply, model: str, input_tokens: int) -> Iterator[Any]:
    """The server-sent events of a streamed reply, in the order the real API sends them."""
    message = _message(reply, model, input_tokens)
    blocks = message.pop("content")
    usage = message.pop("usage")
    start = {**message, "content": [], "stop_reason": None, "usage": _usage(input_tokens, 1)}
    yield {"type": "message_start", "message": start}
    yield {"type": "ping"}
    if isinstance(reply, Hold):
        yield _STALL
    for index, block in enumerate(blocks):
        yield from _block_events(index, block)
    yield {
        "type": "message_delta",
        "delta": {"stop_reason": reply.stop_reason, "stop_sequence": None},
        "usage": {"output_tokens": usage["output_tokens"]},
    }
    yield {"type": "message_stop"}


def _block_events(index: int, block: dict[str, Any]) -> Iterator[dict[str, Any]]:
    kind = block["type"]
    start: dict[str, Any]
    if kind == "text":
        start, deltas = {"type": "text", "text": ""}, _split(block["text"], "text_delta", "text")
    elif kind == "thinking":
        start = {"type": "thinking", "thinking": "", "signature": ""}
        deltas = _split(block["thinking"], "thinking_delta", "thinking")
        deltas.append({"type": "signature_delta", "signature": block["signature"]})
    else:  # tool_use: the input arrives as partial JSON
        start = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
        deltas = _split(json.dumps(block["input"]), "input_json_delta", "partial_json")
    yield {"type": "content_block_start", "index": index, "content_block": start}
    for delta in deltas:
        yield {"type": "content_block_delta", "index": index, "delta": delta}
    yield {"type": "content_block_stop", "index": index}


def _split(text: str, delta_type: str, key: str, size: int = 16) -> list[dict[str, Any]]:
    """Cut text into a few deltas, as the real API streams it."""
    pieces = [text[i : i + size] for i in range(0, len(text), size)] or [""]
    return [{"type": delta_type, key: piece} for piece in pieces]


def _format_sse(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()


def _error_body(error_type: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type, "message": message}}


def _estimate_tokens(body: Any) -> int:
    return max(1, len(json.dumps(body)) // 4) if body is not None else 1


__all__ = [
    "APIError",
    "Hold",
    "MessagesAPI",
    "ModelReply",
    "Reply",
    "ReplyFactory",
    "Request",
    "Text",
    "Thinking",
    "ToolUse",
]
