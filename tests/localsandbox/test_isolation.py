"""Each embedded sandbox is a bubblewrap container: real commands, run the way an agent would,
try to reach what is not theirs (other sandboxes, the host) and to outlive a kill. What they
try against Porthole itself (its data, environment and processes) is in
test_isolation_from_porthole.py."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.conf import settings

from dashboard.localsandbox.paths import default_workspaces_dir
from tests.conftest import LocalSandbox, start_localsandbox, stop_localsandbox
from tests.localsandbox.helpers import (
    Stream,
    api_client,
    eventually,
    host_pids_marked,
    start_exec,
    stream_url,
    wait_session_exited,
)


async def run(api: httpx.AsyncClient, sandbox_id: str, script: str, **body: Any) -> dict[str, Any]:
    response = await api.post(
        f"/sandboxes/{sandbox_id}/exec/run",
        json={"cmd": "sh", "args": ["-c", script], "timeout": 30, **body},
    )
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def new_sandbox(api: httpx.AsyncClient, **body: Any) -> str:
    response = await api.post("/sandboxes", json=body)
    assert response.status_code == 201, response.text
    sandbox_id: str = response.json()["sandboxID"]
    return sandbox_id


async def test_it_runs_commands_as_an_unprivileged_user_with_a_private_tmp(
    api: httpx.AsyncClient, sandbox_id: str
) -> None:
    result = await run(
        api,
        sandbox_id,
        "id -u; grep CapEff /proc/self/status; touch /usr/x /etc/x 2>&1 || true;"
        " echo hi > /tmp/t && cat /tmp/t; echo w > /workspace/w && cat w; pwd; whoami",
    )
    lines = result["stdout"].splitlines()
    assert int(lines[0]) != 0
    assert lines[1].split() == ["CapEff:", "0000000000000000"]
    assert "Read-only file system" in result["stdout"] or "Permission denied" in result["stdout"]
    # A user with a name, for the tools that look it up (ssh, getpass), and nothing more.
    assert lines[-4:] == ["hi", "w", "/workspace", "sandbox"]


async def test_it_keeps_each_sandbox_out_of_the_others_workspace_and_tmp(
    localsandbox: LocalSandbox, api: httpx.AsyncClient
) -> None:
    first, second = await new_sandbox(api), await new_sandbox(api)
    secret = secrets.token_hex(16)
    try:
        await run(api, first, f"echo {secret} > /workspace/mine; echo {secret} > /tmp/mine")
        own = await run(api, first, "cat /workspace/mine /tmp/mine")
        assert own["stdout"] == f"{secret}\n{secret}\n"  # the files are there, for the owner

        host_path = localsandbox.workspaces_dir / first / "workspace" / "mine"
        snoop = await run(
            api,
            second,
            f"cat {host_path} /workspace/mine /tmp/mine; ls -a /workspace /tmp;"
            f" ls {localsandbox.workspaces_dir}; grep -rs {secret} /workspace /tmp; echo done",
        )
        assert secret not in snoop["stdout"] + snoop["stderr"]
        assert snoop["stdout"].endswith("done\n")
    finally:
        for sandbox_id in (first, second):
            await api.delete(f"/sandboxes/{sandbox_id}")


@pytest.mark.parametrize(
    "escape",
    [
        "setsid sleep 300 &",  # a new session, still our child
        "(setsid sh -c 'sleep 300 & exit' &)",  # double fork: reparented, new session
        "nohup sh -c 'trap \"\" HUP TERM; sleep 300' >/dev/null 2>&1 &",  # ignores TERM
    ],
)
async def test_it_ends_daemonised_children_when_a_session_is_killed(
    localsandbox: LocalSandbox, api: httpx.AsyncClient, sandbox_id: str, escape: str
) -> None:
    mark = secrets.token_hex(8)
    session = await start_exec(
        api, sandbox_id, f"{escape}\necho started; exec sleep 300", envs={"PH_MARK": mark}
    )
    stream = await Stream.open(stream_url(localsandbox, sandbox_id, session["sessionID"]))
    await stream.wait_for(lambda s: b"started" in s.output())
    await eventually(lambda: len(host_pids_marked(mark)) >= 2, what="both processes")
    escaped = host_pids_marked(mark)

    kill = await api.post(f"/sandboxes/{sandbox_id}/exec/{session['sessionID']}/kill", json={})
    assert kill.status_code == 204
    assert await stream.wait_exit() == 128 + signal.SIGKILL
    await eventually(lambda: not (host_pids_marked(mark) & escaped), what="every process gone")


async def test_it_ends_what_a_session_left_running_when_the_session_ends(
    localsandbox: LocalSandbox, api: httpx.AsyncClient, sandbox_id: str
) -> None:
    mark = secrets.token_hex(8)
    session = await start_exec(
        api, sandbox_id, "(setsid sleep 300 &); echo started", envs={"PH_MARK": mark}
    )
    info = await wait_session_exited(api, sandbox_id, session["sessionID"])
    assert info["exitCode"] == 0
    await eventually(lambda: not host_pids_marked(mark), what="the daemon to go with it")


async def test_it_ends_an_agents_daemonised_commands_when_the_agent_is_killed(
    localsandbox: LocalSandbox, api: httpx.AsyncClient, sandbox_id: str
) -> None:
    mark = secrets.token_hex(8)
    prompt = f"$ (PH_MARK={mark} setsid sleep 300 > /dev/null 2>&1 &); echo ok\nsleep 300"
    created = await api.post(f"/sandboxes/{sandbox_id}/agent", json={"prompt": prompt})
    session_id = created.json()["sessionID"]
    await eventually(lambda: host_pids_marked(mark), what="the daemonised command")

    kill = await api.post(
        f"/sandboxes/{sandbox_id}/agent/{session_id}/kill", json={"signal": signal.SIGTERM}
    )
    assert kill.status_code == 204
    info = await wait_session_exited(api, sandbox_id, session_id)
    assert info["exitCode"] == 128 + signal.SIGTERM
    await eventually(lambda: not host_pids_marked(mark), what="the daemonised command to die")


async def test_it_turns_the_network_off_for_an_offline_template(
    localsandbox: LocalSandbox, api: httpx.AsyncClient
) -> None:
    port = int(re.search(r":(\d+)/api$", localsandbox.api_url).group(1))  # type: ignore[union-attr]
    probe = (
        f"{sys.executable} -c \"import socket; socket.create_connection(('127.0.0.1', {port}), 5);"
        " print('connected')\""
    )
    online, offline = await new_sandbox(api), await new_sandbox(api, templateID="offline")
    try:
        assert (await run(api, online, probe))["stdout"] == "connected\n"
        refused = await run(api, offline, probe + "; cat /proc/net/dev")
        assert "connected" not in refused["stdout"]
        assert "ConnectionRefusedError" in refused["stderr"]
        interfaces = {line.split(":")[0].strip() for line in refused["stdout"].splitlines()[2:]}
        assert interfaces == {"lo"}
    finally:
        for sandbox_id in (online, offline):
            await api.delete(f"/sandboxes/{sandbox_id}")


async def test_it_applies_the_templates_limits(api: httpx.AsyncClient) -> None:
    sandbox_id = await new_sandbox(api, memoryMB=256)
    try:
        limits = (await run(api, sandbox_id, "cat /proc/self/limits"))["stdout"]
        rows = {
            " ".join(line[:26].split()): line[26:].split()[:2] for line in limits.splitlines()[1:]
        }
        assert rows["Max data size"] == [str(256 * 1024 * 1024)] * 2
        assert rows["Max processes"] == ["512", "512"]
        assert rows["Max cpu time"] == [str(6 * 3600)] * 2
        assert rows["Max core file size"] == ["0", "0"]
        # A program that asks for more memory than allowed is refused it.
        greedy = await run(
            api, sandbox_id, f'{sys.executable} -c "b = bytearray(512 * 1024 * 1024)"'
        )
        assert greedy["exitCode"] != 0 and "MemoryError" in greedy["stderr"]
    finally:
        await api.delete(f"/sandboxes/{sandbox_id}")


@pytest.mark.parametrize("xdg", [True, False])
def test_it_keeps_workspaces_out_of_the_data_directory(tmp_path: Path, xdg: bool) -> None:
    # As `manage.py serve` starts it: no --workspaces-dir, Django's settings for the default.
    env = {"HOME": str(tmp_path / "home"), "PORTHOLE_DATA_DIR": str(tmp_path / "data")}
    if xdg:
        env["XDG_STATE_HOME"] = str(tmp_path / "state")
    expected = tmp_path / ("state" if xdg else "home/.local/state") / "porthole" / "workspaces"
    server = start_localsandbox(None, env=env)
    try:
        assert server.workspaces_dir == expected.resolve()
        assert not server.workspaces_dir.is_relative_to(tmp_path / "data")
        assert not server.workspaces_dir.is_relative_to(settings.DATA_DIR)
    finally:
        stop_localsandbox(server)
    # Django's setting and the server's own default are one definition.
    assert default_workspaces_dir() == settings.LOCALSANDBOX_WORKSPACES_DIR


# -- where bubblewrap cannot run -----------------------------------------------------------


@pytest.fixture
async def broken_bwrap(tmp_path: Path) -> str:
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    return str(fake)


@pytest.fixture
async def unisolated(
    request: pytest.FixtureRequest, tmp_path: Path, broken_bwrap: str
) -> AsyncIterator[LocalSandbox]:
    bwrap = broken_bwrap if request.param == "failing" else str(tmp_path / "missing" / "bwrap")
    server = start_localsandbox(tmp_path / "ws", env={"LOCALSANDBOX_BWRAP": bwrap})
    yield server
    stop_localsandbox(server)


@pytest.mark.parametrize("unisolated", ["missing", "failing"], indirect=True)
async def test_it_refuses_to_run_anything_without_isolation_unless_told_to(
    unisolated: LocalSandbox,
) -> None:
    log = "".join(unisolated.log)
    assert "(isolation: unavailable)" in log and "LOCALSANDBOX_UNSAFE_NO_ISOLATION" in log
    async with api_client(unisolated) as api:
        sandbox_id = await new_sandbox(api)
        for path, body in (("agent", {"prompt": "hello"}), ("exec", {"cmd": "true"})):
            refused = await api.post(f"/sandboxes/{sandbox_id}/{path}", json=body)
            assert refused.status_code == 503
            assert "LOCALSANDBOX_UNSAFE_NO_ISOLATION" in refused.json()["error"]
        assert (await api.get(f"/sandboxes/{sandbox_id}/exec")).json() == []


async def test_it_runs_unisolated_only_when_the_operator_opts_in_and_says_so(
    tmp_path: Path, broken_bwrap: str
) -> None:
    server = start_localsandbox(
        tmp_path / "ws",
        env={"LOCALSANDBOX_BWRAP": broken_bwrap, "LOCALSANDBOX_UNSAFE_NO_ISOLATION": "true"},
    )
    try:
        log = "".join(server.log)
        assert "(isolation: unsafe-none)" in log and "NO ISOLATION" in log
        async with api_client(server) as api:
            sandbox_id = await new_sandbox(api)
            result = await run(api, sandbox_id, "echo $HOME")
            assert result["stdout"].strip() == str(server.workspaces_dir / sandbox_id / "workspace")
    finally:
        stop_localsandbox(server)


async def test_it_refuses_a_flag_that_is_not_a_boolean(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="not a boolean"):
        start_localsandbox(tmp_path / "ws", env={"LOCALSANDBOX_UNSAFE_NO_ISOLATION": "maybe"})


async def test_it_runs_from_a_checkout_under_the_hosts_tmp(tmp_path: Path) -> None:
    """CI and many operators check out under /tmp: the sandbox's own /tmp must not hide the
    interpreter and the wrappers' code that live there."""
    assert tmp_path.is_relative_to("/tmp"), "pytest's temporary directory is not under /tmp"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(p for p in sys.path if p.endswith("site-packages"))
    server = start_localsandbox(
        tmp_path / "ws", python=str(venv / "bin" / "python"), env={"PYTHONPATH": site}
    )
    try:
        async with api_client(server) as api:
            sandbox_id = await new_sandbox(api)
            result = await run(api, sandbox_id, "echo inside; id -u")
            assert result["stdout"].split()[0] == "inside", result
    finally:
        stop_localsandbox(server)


def test_it_uses_no_user_namespace_as_root_and_one_otherwise() -> None:
    from dashboard.localsandbox import isolation

    confinement = isolation.Confinement(
        workspace=Path("/w"), tmp=Path("/t"), template=isolation.Template(network=False), uid=None
    )
    args = isolation.bwrap_args("bwrap", confinement)
    assert "--unshare-user" in args and "--unshare-net" in args
    root = isolation.Confinement(
        workspace=Path("/w"), tmp=Path("/t"), template=isolation.Template(), uid=1_500_000_001
    )
    args = isolation.bwrap_args("bwrap", root)
    assert "--unshare-user" not in args and "--unshare-net" not in args
    assert args[args.index("--cap-drop") + 1] == "ALL"
    assert os.path.basename(args[0]) == "bwrap"


async def test_it_ends_every_daemon_of_a_deleted_sandbox(api: httpx.AsyncClient) -> None:
    sandbox_id = await new_sandbox(api)
    mark = secrets.token_hex(8)
    for _ in range(2):  # two sessions, each leaving a daemon behind a live first process
        await start_exec(
            api, sandbox_id, "(setsid sleep 300 &); exec sleep 300", envs={"PH_MARK": mark}
        )
    await eventually(lambda: len(host_pids_marked(mark)) == 4, what="two sessions, two daemons")
    assert (await api.delete(f"/sandboxes/{sandbox_id}")).status_code == 204
    await eventually(lambda: not host_pids_marked(mark), what="every process of the sandbox")


async def test_it_takes_every_sandbox_process_with_it_when_the_server_is_killed(
    tmp_path: Path,
) -> None:
    server = start_localsandbox(tmp_path / "ws")
    mark = secrets.token_hex(8)
    try:
        async with api_client(server) as api:
            sandbox_id = await new_sandbox(api)
            await start_exec(
                api, sandbox_id, "(setsid sleep 300 &); exec sleep 300", envs={"PH_MARK": mark}
            )
            await eventually(lambda: len(host_pids_marked(mark)) == 2, what="the processes")
        # No chance to clean up: --die-with-parent and the PID namespace do it.
        server.process.kill()
        server.process.wait(timeout=10)
        await eventually(lambda: not host_pids_marked(mark), what="the sandbox to die with it")
    finally:
        if server.process.poll() is None:
            stop_localsandbox(server)


async def test_it_takes_templates_from_the_operators_file(tmp_path: Path) -> None:
    templates = tmp_path / "templates.json"
    templates.write_text(
        json.dumps({"tiny": {"network": False, "max_processes": 30, "memory_mb": 128}})
    )
    server = start_localsandbox(tmp_path / "ws", env={"LOCALSANDBOX_TEMPLATES": str(templates)})
    try:
        async with api_client(server) as api:
            sandbox_id = await new_sandbox(api, templateID="tiny")
            result = await run(api, sandbox_id, "cat /proc/self/limits /proc/net/dev")
            assert re.search(r"Max processes\s+30\s+30", result["stdout"])
            assert re.search(rf"Max data size\s+{128 * 1024 * 1024}\s", result["stdout"])
            assert "eth" not in result["stdout"] and "lo:" in result["stdout"]
            # The template's own process limit holds (no `ulimit` of the shell's): a fork bomb
            # stops at it, and the sandbox carries on.
            bomb = await run(
                api,
                sandbox_id,
                "i=0; while [ $i -lt 60 ]; do sleep 30 & i=$((i+1)); done; echo all",
            )
            assert bomb["exitCode"] != 0 and "fork" in bomb["stderr"].lower(), bomb
            assert "all" not in bomb["stdout"]
            assert (await run(api, sandbox_id, "echo fine"))["stdout"] == "fine\n"
            # The built-in ones are still there.
            base = await new_sandbox(api, templateID="base")
            limits = (await run(api, base, "cat /proc/self/limits"))["stdout"]
            assert re.search(r"Max processes\s+512\s+512", limits)
    finally:
        stop_localsandbox(server)


@pytest.mark.parametrize(
    "content",
    ["not json", '["tiny"]', '{"tiny": {"network": "no"}}', '{"tiny": {"max_processes": 0}}'],
)
def test_it_refuses_to_start_with_a_bad_templates_file(tmp_path: Path, content: str) -> None:
    templates = tmp_path / "templates.json"
    templates.write_text(content)
    with pytest.raises(RuntimeError, match="templates"):
        start_localsandbox(tmp_path / "ws", env={"LOCALSANDBOX_TEMPLATES": str(templates)})


@pytest.mark.parametrize("planted", ["dashboard/__init__.py", "json.py", "typing.py"])
async def test_it_imports_nothing_an_exec_session_planted_in_the_workspace_into_the_agent(
    localsandbox: LocalSandbox, api: httpx.AsyncClient, sandbox_id: str, planted: str
) -> None:
    # The agent wrapper holds ANTHROPIC_API_KEY; the workspace is anyone's who can exec.
    workspace = "/workspace"
    await run(
        api,
        sandbox_id,
        f"mkdir -p {workspace}/dashboard && printf '%s\\n' \"open('/workspace/pwned', 'w')\""
        f" 'raise SystemExit(99)' > {workspace}/{planted}",
    )
    created = await api.post(f"/sandboxes/{sandbox_id}/agent", json={"prompt": "hello"})
    assert created.status_code == 201, created.text
    stream = await Stream.open(stream_url(localsandbox, sandbox_id, created.json()["sessionID"]))
    await stream.wait_for(lambda s: any(e.get("type") == "result" for e in s.events()))
    await stream.close()
    assert "system" in [e["type"] for e in stream.events()]
    assert stream.exit_code is None  # still running, waiting for the next prompt
    assert "pwned" not in (await run(api, sandbox_id, "ls /workspace"))["stdout"]


NOBODY = 65534
FILLED = ["/filler", "/etc/filler", "/dev/filler", "/dev/shm/filler", "/usr/filler"]
# Each write is more than a sandbox's /dev/shm may hold (and less than the host's RAM); then
# the POSIX semaphore multiprocessing needs, in that small /dev/shm of the sandbox's own.
MEMORY_SCRIPT = "".join(
    f"head -c 209715200 /dev/zero > {path} 2>/dev/null && echo filled {path}"
    f" || echo refused {path}; rm -f {path} 2>/dev/null;"
    for path in FILLED
) + (
    "/usr/bin/python3 -I -c \"import multiprocessing; multiprocessing.Lock(); print('locked')\";"
    " grep ' /dev/shm ' /proc/mounts"
)


def assert_memory_bounded(stdout: str) -> None:
    lines = stdout.splitlines()
    assert lines[: len(FILLED)] == [f"refused {path}" for path in FILLED], stdout
    assert lines[len(FILLED)] == "locked", stdout
    assert "size=65536k" in lines[len(FILLED) + 1], stdout


async def test_it_bounds_what_a_sandbox_can_keep_in_memory_as_root(
    api: httpx.AsyncClient, sandbox_id: str
) -> None:
    assert os.geteuid() == 0, "this suite runs as root; the user-namespace case is below"
    assert_memory_bounded((await run(api, sandbox_id, MEMORY_SCRIPT))["stdout"])


def test_it_bounds_what_a_sandbox_can_keep_in_memory_in_a_user_namespace(
    tmp_path: Path,
) -> None:
    """The container a non-root operator's server makes (a user namespace), started as
    nobody. Not the whole server: nobody cannot read the interpreter under /root here, so
    Debian's own Python builds the same bubblewrap command line."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run the container as another user")
    setpriv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    probe = subprocess.run(
        [*setpriv, "bwrap", "--unshare-user", "--ro-bind", "/", "/", "true"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip(f"unprivileged user namespaces unavailable here: {probe.stderr.strip()}")
    sandbox_dir = Path(tempfile.mkdtemp(prefix="ph-nobody-"))
    sandbox_dir.chmod(0o755)
    try:
        for path in (sandbox_dir / "workspace", sandbox_dir / "tmp"):
            path.mkdir()
            os.chown(path, NOBODY, NOBODY)
        build = (
            f"import os, sys; sys.path.insert(0, {str(settings.BASE_DIR)!r});"
            "from pathlib import Path; from dashboard.localsandbox import isolation;"
            f"root = Path({str(sandbox_dir)!r});"
            "c = isolation.Confinement(root / 'workspace', root / 'tmp', isolation.Template(),"
            " None);"
            "args = isolation.bwrap_args('bwrap', c);"
            "os.execvp(args[0], [*args, '--chdir', '/workspace', '--', '/bin/sh', '-c',"
            " sys.argv[1]])"
        )
        result = subprocess.run(
            [*setpriv, "/usr/bin/python3", "-I", "-c", build, MEMORY_SCRIPT],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert_memory_bounded(result.stdout + result.stderr)
    finally:
        shutil.rmtree(sandbox_dir, ignore_errors=True)


async def test_it_runs_the_claude_cli_it_found_on_the_host_inside_the_sandbox(
    tmp_path: Path,
) -> None:
    # Where a user's own install puts it (~/.local/bin), which the sandbox does not otherwise
    # see: choosing Claude because of it means making it visible there.
    home_bin = tmp_path / "home" / ".local" / "bin"
    home_bin.mkdir(parents=True)
    (home_bin / "secret.txt").write_text("not for sandboxes")
    cli = home_bin / "claude"
    cli.write_text(
        '#!/bin/sh\n{ ls $(dirname $0); echo "$CLAUDE_CODE_CLI"; } > /workspace/.out\n'
        "mv /workspace/.out /workspace/cli-ran; exit 3\n"
    )
    cli.chmod(0o755)
    for path in (tmp_path, tmp_path / "home", tmp_path / "home" / ".local", home_bin):
        path.chmod(0o755)
    server = start_localsandbox(
        tmp_path / "ws",
        extra_args=["--agent", "auto"],
        env={
            "ANTHROPIC_API_KEY": "sk-fake",
            "ANTHROPIC_BASE_URL": "http://127.0.0.1:9",
            "PATH": f"{home_bin}:{os.environ['PATH']}",
        },
    )
    try:
        async with api_client(server) as api:
            # Offline: whatever CLI runs can reach nothing beyond the sandbox's own loopback.
            created = await api.post("/sandboxes", json={"templateID": "offline"})
            sandbox = created.json()
            assert sandbox["metadata"]["agent"] == "claude"
            agent = await api.post(
                f"/sandboxes/{sandbox['sandboxID']}/agent", json={"prompt": "hello"}
            )
            assert agent.status_code == 201, agent.text
            ran = server.workspaces_dir / sandbox["sandboxID"] / "workspace" / "cli-ran"
            await eventually(ran.exists, what="the host's CLI to run in the sandbox")
            # Only the CLI itself is bound, not its neighbours.
            assert ran.read_text().split() == ["claude", str(cli)]
    finally:
        stop_localsandbox(server)
