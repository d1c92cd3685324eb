from __future__ import annotations

import json
import re
import secrets
from typing import Any

from django import forms
from django.core.exceptions import ValidationError

from dashboard.agents.models import AgentSession, Sandbox

PERMISSION_MODES = [
    ("", "Agent default"),
    ("default", "default: ask before tools"),
    ("acceptEdits", "acceptEdits: allow file edits"),
    ("bypassPermissions", "bypassPermissions: allow everything"),
    ("plan", "plan: plan only, no changes"),
]
NEW_SANDBOX = "new"
PROMPT_LIMIT = 200_000  # characters, on every form that takes a prompt
TOO_LONG = f"A prompt is at most {PROMPT_LIMIT:,} characters; this one has %(show_value)s."
MCP_DEPTH = 10  # a server definition is an object of objects of strings and lists
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
TOOL_NAME = re.compile(r"^[A-Za-z0-9_.:*()\- ]+$")


def parse_tools(value: str) -> list[str]:
    tools = [t.strip() for t in re.split(r"[,\n]", value) if t.strip()]
    for tool in tools:
        if len(tool) > 200 or not TOOL_NAME.match(tool):
            raise ValidationError(f"“{tool[:50]}” is not a tool name.")
    return tools


def parse_envs(value: str) -> dict[str, str]:
    envs: dict[str, str] = {}
    for number, line in enumerate(value.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, val = line.partition("=")
        name = name.strip()
        if not sep or not ENV_NAME.match(name):
            raise ValidationError(f"Line {number}: write NAME=value (letters, digits, _).")
        envs[name] = val
    return envs


def parse_mcp_servers(value: str) -> dict[str, Any]:
    if not value.strip():
        return {}
    if _nesting(value) > MCP_DEPTH:
        # Refused before parsing: deep enough, the parser itself runs out of stack.
        raise ValidationError(f"Nested too deeply: at most {MCP_DEPTH} levels.")
    try:
        servers = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValidationError(
            f"Not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}."
        ) from None
    if not isinstance(servers, dict):
        raise ValidationError('Write an object: {"name": {"command": "...", "args": [...]}}.')
    for name, spec in servers.items():
        if not isinstance(spec, dict):
            raise ValidationError(f"Server “{name}” must be an object.")
        if not isinstance(spec.get("command"), str) or not spec["command"].strip():
            raise ValidationError(f"Server “{name}” needs a “command” string.")
        args = spec.get("args", [])
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise ValidationError(f"Server “{name}”: “args” must be a list of strings.")
        env = spec.get("env", {})
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise ValidationError(f"Server “{name}”: “env” must map strings to strings.")
        if not isinstance(spec.get("type", ""), str):
            raise ValidationError(f"Server “{name}”: “type” must be a string.")
        unknown = set(spec) - {"command", "args", "env", "type"}
        if unknown:
            raise ValidationError(f"Server “{name}”: unknown keys {', '.join(sorted(unknown))}.")
    return servers


def _nesting(text: str) -> int:
    """How deeply brackets nest in this JSON text, strings aside."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def prompt_field(required_message: str, rows: int = 3, **attrs: Any) -> forms.CharField:
    """A prompt box that says its limit when it is exceeded."""
    return forms.CharField(
        widget=forms.Textarea(attrs={"rows": rows, **attrs}),
        max_length=PROMPT_LIMIT,
        error_messages={
            "required": required_message,
            "max_length": TOO_LONG,
        },
    )


class AgentOptionsForm(forms.Form):
    """The options an agent takes at start and between turns (configure)."""

    model = forms.CharField(max_length=128, required=False, help_text="Empty: the agent default")
    system_prompt = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3}),
        required=False,
        max_length=PROMPT_LIMIT,
        error_messages={"max_length": TOO_LONG},
    )
    allowed_tools = forms.CharField(
        required=False, help_text="Comma separated, e.g. Read, Edit, Bash"
    )
    permission_mode = forms.ChoiceField(choices=PERMISSION_MODES, required=False)
    max_turns = forms.IntegerField(min_value=1, max_value=1000, required=False)

    @classmethod
    def initial_for(cls, session: AgentSession) -> dict[str, Any]:
        config = session.config or {}
        return {
            "model": config.get("model", session.model),
            "system_prompt": config.get("systemPrompt", ""),
            "allowed_tools": ", ".join(config.get("allowedTools", []) or []),
            "permission_mode": config.get("permissionMode", ""),
            "max_turns": config.get("maxTurns"),
        }

    def clean_allowed_tools(self) -> list[str]:
        return parse_tools(self.cleaned_data.get("allowed_tools") or "")

    def options(self) -> dict[str, Any]:
        """The options that were set, with the wire's camelCase names."""
        data = self.cleaned_data
        wire = {
            "model": data.get("model"),
            "systemPrompt": data.get("system_prompt"),
            "allowedTools": data.get("allowed_tools"),
            "permissionMode": data.get("permission_mode"),
            "maxTurns": data.get("max_turns"),
        }
        return {k: v for k, v in wire.items() if v not in (None, "", [])}


class StartSessionForm(AgentOptionsForm):
    prompt = prompt_field("Write a prompt.", rows=6, autofocus=True)
    cwd = forms.CharField(max_length=500, required=False, label="Working directory")
    mcp_servers = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3}), required=False, label="MCP servers (JSON)"
    )
    sandbox = forms.ChoiceField(label="Sandbox")
    template = forms.CharField(max_length=128, initial="base", required=False)
    idle_timeout = forms.IntegerField(
        min_value=0,
        max_value=7 * 24 * 3600,
        initial=0,
        required=False,
        help_text="Seconds without activity before the sandbox stops; 0 keeps it.",
    )
    envs = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3}),
        required=False,
        label="Environment variables",
        help_text="NAME=value, one a line",
    )
    # One token per rendered form: the start view starts one session per token.
    submission = forms.CharField(widget=forms.HiddenInput, required=False, max_length=64)

    field_order = [
        "prompt",
        "model",
        "system_prompt",
        "allowed_tools",
        "permission_mode",
        "max_turns",
        "cwd",
        "mcp_servers",
        "sandbox",
        "template",
        "idle_timeout",
        "envs",
    ]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["submission"].initial = secrets.token_urlsafe(18)
        running = Sandbox.objects.filter(status=Sandbox.Status.RUNNING).order_by("-created_at")
        sandbox = self.fields["sandbox"]
        assert isinstance(sandbox, forms.ChoiceField)
        sandbox.choices = [(NEW_SANDBOX, "A new sandbox")] + [
            (str(s.id), f"{s.upstream_id} ({s.template or 'base'})") for s in running[:100]
        ]

    def clean_prompt(self) -> str:
        prompt = str(self.cleaned_data["prompt"])
        if not prompt.strip():
            raise ValidationError("Write a prompt.")
        return prompt

    def clean_mcp_servers(self) -> dict[str, Any]:
        return parse_mcp_servers(self.cleaned_data.get("mcp_servers") or "")

    def clean_envs(self) -> dict[str, str]:
        return parse_envs(self.cleaned_data.get("envs") or "")

    def options(self) -> dict[str, Any]:
        options = super().options()
        if self.cleaned_data.get("cwd"):
            options["cwd"] = self.cleaned_data["cwd"]
        if self.cleaned_data.get("mcp_servers"):
            options["mcpServers"] = self.cleaned_data["mcp_servers"]
        return options

    def existing_sandbox(self) -> Sandbox | None:
        choice = self.cleaned_data["sandbox"]
        if choice == NEW_SANDBOX:
            return None
        return Sandbox.objects.get(id=choice)


class PromptForm(forms.Form):
    text = prompt_field("Write a prompt.")

    def clean_text(self) -> str:
        text = str(self.cleaned_data["text"])
        if not text.strip():
            raise ValidationError("Write a prompt.")
        return text


class ContinueForm(forms.Form):
    prompt = prompt_field("Write a prompt for the new session.")


def controls_context(session: AgentSession) -> dict[str, Any]:
    """What the controls need besides the session, fresh (no bound data, no messages)."""
    return {
        "prompt_form": PromptForm(),
        "configure_form": AgentOptionsForm(initial=AgentOptionsForm.initial_for(session)),
        "continue_form": ContinueForm(),
    }
