"""What a sandbox's commands see of Porthole itself: not its data directory, database or
secret key, not its environment, not its processes. Apart from the rest of the isolation
tests (test_isolation.py) because these depend on how Porthole is configured (a database
file or PostgreSQL, the environment a team deployment sets), so they run again in the
team-mode child run; the rest cannot depend on either."""

from __future__ import annotations

import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from django.conf import settings

from tests.conftest import LocalSandbox
from tests.localsandbox.test_isolation import run


@pytest.fixture
def canary() -> Iterator[str]:
    """A file of Porthole's data directory with contents no sandbox may ever print."""
    secret = "canary-" + secrets.token_hex(16)
    path = settings.DATA_DIR / "canary.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(secret)
    yield secret
    path.unlink(missing_ok=True)


async def test_it_keeps_portholes_data_directory_database_and_secret_key_out_of_reach(
    localsandbox: LocalSandbox, api: httpx.AsyncClient, sandbox_id: str, canary: str
) -> None:
    data_dir = settings.DATA_DIR
    database = Path(settings.DATABASES["default"]["NAME"])
    secret_key = data_dir / "secret_key"
    assert (data_dir / "canary.txt").is_file()
    script = (
        f"ls -la {data_dir}; cat {data_dir}/canary.txt {secret_key} {database};"
        f" ls {localsandbox.workspaces_dir}; grep -rs canary- /workspace /tmp /root /work /home;"
        " echo done"
    )
    result = await run(api, sandbox_id, script)
    output = result["stdout"] + result["stderr"]
    assert result["stdout"].endswith("done\n"), output
    assert canary not in output
    assert settings.SECRET_KEY not in output
    assert "No such file or directory" in output
    # And nothing the server's user could read (the source tree beyond the wrappers, the key)
    listing = await run(api, sandbox_id, f"ls -A {settings.BASE_DIR}; ls -A /")
    assert set(listing["stdout"].split()) <= {
        ".venv",
        "dashboard",
        *(
            [
                "bin",
                "dev",
                "etc",
                "lib",
                "lib32",
                "lib64",
                "libx32",
                "proc",
                "root",
                "sbin",
                "tmp",
                "usr",
                "work",
                "workspace",
            ]
        ),
        *(part for part in Path(sys.prefix).parts if part != "/"),
    }, listing


async def test_it_hides_portholes_environment_and_processes(
    localsandbox: LocalSandbox, api: httpx.AsyncClient, sandbox_id: str
) -> None:
    result = await run(
        api, sandbox_id, "env; echo ---; ps -eo pid,user,args; echo ---; cat /proc/*/environ"
    )
    output = result["stdout"] + result["stderr"]
    env_part, ps_part, _ = output.split("---\n", 2)
    # The server's own key (in its environment) appears nowhere.
    assert localsandbox.api_key not in output
    assert {line.split("=", 1)[0] for line in env_part.splitlines()} <= {
        "PATH",
        "HOME",
        "LANG",
        "PWD",
    }
    # Only the sandbox's own processes: no server, no pytest, no database.
    processes = ps_part.strip().splitlines()[1:]
    assert 2 <= len(processes) <= 4, ps_part
    assert "manage.py" not in ps_part and "pytest" not in ps_part
    assert str(localsandbox.process.pid) not in {line.split()[0] for line in processes}
