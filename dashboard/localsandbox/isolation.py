"""Each sandbox process in its own bubblewrap container.

Every exec or agent session runs as `bwrap ... -- python -I -S jail.py`, with:

- the system directories (`/usr` and its merged-usr links, a chosen few entries of `/etc`) and
  the Python that runs the agent wrappers bound read-only; nothing else of the host's files;
- the sandbox's workspace as its only writable tree, and a private `/tmp` per sandbox (a
  directory beside the workspace, shared by that sandbox's sessions like a machine's `/tmp`);
- its own PID, IPC and UTS namespaces (so it sees no host process, and when its first process
  ends, or is killed, the kernel ends everything else in it, double forks and `setsid` included)
  and `--die-with-parent`;
- an unprivileged user: when the server runs as root, a uid of the sandbox's own (far above any
  real account's); otherwise a user namespace mapping the server's user;
- an environment made only of what the sandbox was given, and rlimits from its template.

The network is the host's unless the sandbox's template turns it off (`--unshare-net`: only a
loopback of its own). README.md ("Security") says what this does not isolate.

Where bubblewrap cannot run, `probe()` says why; the server then refuses to start processes
unless the operator opted into running them unisolated.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
# The directory that holds the `dashboard` package (wrappers/boot.py puts it on sys.path).
PROJECT_ROOT = PACKAGE_DIR.parent.parent
JAIL = PACKAGE_DIR / "jail.py"
# Where the workspace appears inside the container.
WORKSPACE = "/workspace"
SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Sandbox users when the server is root: far above any real account, one per sandbox.
SANDBOX_UID_BASE = 1_500_000_000
SANDBOX_UID_RANGE = 500_000_000
# The few entries of /etc that programs need (names, TLS roots, DNS, time, the loader).
ETC_ENTRIES = (
    "alternatives",
    "ca-certificates",
    "ca-certificates.conf",
    "debian_version",
    "gai.conf",
    "group",
    "host.conf",
    "hostname",
    "hosts",
    "inputrc",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "mime.types",
    "nsswitch.conf",
    "os-release",
    "passwd",
    "pki",
    "protocols",
    "resolv.conf",
    "services",
    "ssl",
    "timezone",
)
MERGED_USR = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")

Mode = Literal["bubblewrap", "unsafe-none", "unavailable"]
MiB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """Per-process rlimits inside a sandbox (the kernel counts processes per sandbox user)."""

    cpu_seconds: int = 6 * 3600
    memory_mb: int = 4096  # RLIMIT_DATA: heap and private mappings, not reserved address space
    max_processes: int = 512  # threads count too
    file_size_mb: int = 4096
    open_files: int = 4096
    # Not an rlimit: the size of the sandbox's own /dev/shm (a tmpfs, so RAM that no rlimit
    # counts), enough for POSIX semaphores and modest shared memory.
    shm_mb: int = 64

    def rlimits(self) -> dict[str, int]:
        return {
            "cpu_seconds": self.cpu_seconds,
            "data_bytes": self.memory_mb * MiB,
            "processes": self.max_processes,
            "file_bytes": self.file_size_mb * MiB,
            "open_files": self.open_files,
            "core_bytes": 0,
        }


@dataclass(frozen=True)
class Template:
    """What a sandbox's `templateID` means here. Unknown names get the defaults."""

    network: bool = True
    limits: Limits = field(default_factory=Limits)


TEMPLATES: dict[str, Template] = {
    "base": Template(),
    "offline": Template(network=False),
}


class TemplateError(ValueError):
    """A templates file that does not say what a template must."""


def load_templates(path: Path) -> dict[str, Template]:
    """The built-in templates, with those of a JSON file added or replaced:
    `{"name": {"network": bool, "cpu_seconds": int, "memory_mb": int, "max_processes": int,
    "file_size_mb": int, "open_files": int}}`; every key optional (defaults as in `base`)."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TemplateError(f"cannot read templates from {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise TemplateError(f"{path}: expected an object of templates by name")
    templates = dict(TEMPLATES)
    limit_names = {f.name for f in fields(Limits)}
    for name, settings in raw.items():
        if not isinstance(settings, dict) or not set(settings) <= limit_names | {"network"}:
            known = ", ".join(sorted(limit_names | {"network"}))
            raise TemplateError(f"{path}: template {name!r} must be an object of: {known}")
        network = settings.get("network", True)
        limits = {key: value for key, value in settings.items() if key != "network"}
        if not isinstance(network, bool) or not all(
            isinstance(value, int) and not isinstance(value, bool) and value > 0
            for value in limits.values()
        ):
            raise TemplateError(
                f"{path}: template {name!r}: network is true or false, limits positive integers"
            )
        templates[name] = Template(network=network, limits=Limits(**limits))
    return templates


def template_for(
    template_id: str, memory_mb: int | None = None, templates: dict[str, Template] | None = None
) -> Template:
    known = TEMPLATES if templates is None else templates
    template = known.get(template_id, known["base"])
    if memory_mb is not None:
        limits = Limits(**{**asdict(template.limits), "memory_mb": memory_mb})
        template = Template(network=template.network, limits=limits)
    return template


@dataclass(frozen=True)
class Confinement:
    """Where and as whom one sandbox's processes run."""

    workspace: Path
    tmp: Path
    template: Template
    uid: int | None  # set when the server is root: the sandbox's own unprivileged user
    readonly: tuple[Path, ...] = ()  # more host paths it sees read-only (the Claude CLI)


def new_confinement(
    sandbox_dir: Path, template: Template, *, as_root: bool, readonly: tuple[Path, ...] = ()
) -> Confinement:
    """Make the sandbox's directories, owned by its user when there is one."""
    workspace, tmp = sandbox_dir / "workspace", sandbox_dir / "tmp"
    sandbox_dir.mkdir(parents=True, exist_ok=False)
    sandbox_dir.chmod(0o711)
    workspace.mkdir()
    tmp.mkdir()
    uid = SANDBOX_UID_BASE + secrets.randbelow(SANDBOX_UID_RANGE) if as_root else None
    if uid is not None:
        for path in (workspace, tmp):
            os.chown(path, uid, uid)
    workspace.chmod(0o700)
    # Traversable, not listable: the jail starts as a capability-less root, which must pass
    # through /tmp to an interpreter that lives under the host's /tmp (a checkout there).
    tmp.chmod(0o711)
    return Confinement(workspace=workspace, tmp=tmp, template=template, uid=uid, readonly=readonly)


def _ro_path_args(path: Path, seen: set[Path]) -> list[str]:
    """Bind `path` read-only at the same place, with world-traversable parents."""
    if path in seen or not path.exists():
        return []
    args: list[str] = []
    for parent in reversed(path.parents):
        if parent == Path("/") or parent in seen:
            continue
        seen.add(parent)
        args += ["--perms", "0755", "--dir", str(parent)]
    seen.add(path)
    return [*args, "--ro-bind", str(path), str(path)]


def python_paths() -> list[Path]:
    """What the agent wrappers need to run: the interpreter's prefixes and the wrappers' code."""
    paths = {Path(sys.prefix), Path(sys.base_prefix), Path(sys.executable).resolve().parent}
    if sys.base_prefix != sys.prefix:
        paths.add(Path(sys.base_prefix).resolve())
    kept = sorted(p for p in paths if not str(p).startswith(("/usr/", "/bin", "/lib")))
    return [*kept, PROJECT_ROOT / "dashboard" / "__init__.py", PACKAGE_DIR]


SANDBOX_USER = "sandbox"
# The uid and gid the command has inside a user namespace of our own (when not root).
USERNS_ID = 1000


def sandbox_id_of(confinement: Confinement) -> int:
    return USERNS_ID if confinement.uid is None else confinement.uid


def identity_files(confinement: Confinement) -> tuple[bytes, bytes]:
    """/etc/passwd and /etc/group as the host has them, plus the sandbox's user when its uid
    has no name there, so that tools that look the user up (ssh, whoami, getpass) work."""
    ident = sandbox_id_of(confinement)
    files = []
    for name, line in (
        ("passwd", f"{SANDBOX_USER}:x:{ident}:{ident}:sandbox:{WORKSPACE}:/bin/sh\n"),
        ("group", f"{SANDBOX_USER}:x:{ident}:\n"),
    ):
        try:
            text = (Path("/etc") / name).read_text()
        except OSError:
            text = ""
        taken = {row.split(":")[2] for row in text.splitlines() if row.count(":") >= 3}
        if str(ident) not in taken:
            text = (text if not text or text.endswith("\n") else text + "\n") + line
        files.append(text.encode())
    return files[0], files[1]


def bwrap_args(
    bwrap: str, confinement: Confinement, identity_fds: tuple[int, int] | None = None
) -> list[str]:
    """The bubblewrap command line for one process of the sandbox (without the command)."""
    args = [bwrap, "--die-with-parent", "--new-session"]
    args += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if not confinement.template.network:
        args.append("--unshare-net")
    if confinement.uid is None:
        # Not root: a user namespace of our own, where we are an ordinary user.
        args += ["--unshare-user", "--uid", str(USERNS_ID), "--gid", str(USERNS_ID)]
    else:
        # Root: no user namespace (so the sandbox's uid is a real, unprivileged one); the jail
        # keeps only what it needs to become that uid.
        args += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    args += ["--hostname", "sandbox", "--proc", "/proc", "--dev", "/dev"]
    # A writable /dev/shm of a bounded size (as root bubblewrap's is root's; in a user
    # namespace it is part of /dev, a tmpfs that could take half the host's RAM).
    shm_bytes = str(confinement.template.limits.shm_mb * MiB)
    args += ["--size", shm_bytes, "--perms", "1777", "--tmpfs", "/dev/shm"]
    args += ["--ro-bind", "/usr", "/usr"]
    for name in MERGED_USR:
        top = Path("/") / name
        if top.is_symlink():
            args += ["--symlink", os.readlink(top), str(top)]
        elif top.is_dir():
            args += ["--ro-bind", str(top), str(top)]
    args += ["--perms", "0755", "--dir", "/etc"]
    for name in ETC_ENTRIES:
        entry = Path("/etc") / name
        if identity_fds is not None and name in ("passwd", "group"):
            fd = identity_fds[0] if name == "passwd" else identity_fds[1]
            args += ["--perms", "0644", "--ro-bind-data", str(fd), str(entry)]
        elif entry.exists():
            args += ["--ro-bind", str(entry.resolve()), str(entry)]
    seen: set[Path] = {Path("/usr"), Path("/etc")}
    python = python_paths()
    # What lives under the host's /tmp (a checkout or virtualenv there, a CLI) is bound after
    # the sandbox's own /tmp, which would hide it otherwise.
    under_tmp = [path for path in python if path.is_relative_to("/tmp")]
    for path in python:
        if path not in under_tmp:
            args += _ro_path_args(path, seen)
    args += ["--bind", str(confinement.workspace), WORKSPACE]
    args += ["--bind", str(confinement.tmp), "/tmp"]
    for path in under_tmp:
        args += _ro_path_args(path, seen)
    bound = [Path("/usr"), *python]
    for path in confinement.readonly:
        if not any(path.is_relative_to(root) for root in bound):
            args += _ro_path_args(path, seen)
    # The root and /dev are tmpfs of bubblewrap's; in a user namespace the sandbox owns them,
    # and what it wrote there would be RAM beyond its limits. Only mounts of their own (the
    # workspace, /tmp, /dev/shm, the device nodes) stay writable.
    args += ["--remount-ro", "/dev", "--remount-ro", "/"]
    # No --chdir: the workspace is its user's alone, so the jail enters it as that user.
    return args


def jail_spec(
    confinement: Confinement, argv: Sequence[str], env: dict[str, str], cwd: str
) -> bytes:
    spec = {
        "argv": list(argv),
        "env": env,
        "cwd": cwd,
        "limits": confinement.template.limits.rlimits(),
        "uid": confinement.uid,
        "gid": confinement.uid,
    }
    return json.dumps(spec).encode()


def jail_command(spec_fd: int, status_fd: int) -> list[str]:
    return [sys.executable, "-I", "-S", str(JAIL), str(spec_fd), str(status_fd)]


# -- is it available? --------------------------------------------------------------------


@dataclass(frozen=True)
class Status:
    mode: Mode
    detail: str

    @property
    def runs_processes(self) -> bool:
        return self.mode != "unavailable"


UNSAFE_SETTING = "LOCALSANDBOX_UNSAFE_NO_ISOLATION"


def probe(bwrap: str, *, unsafe_no_isolation: bool = False) -> Status:
    """Whether sandboxes can be isolated here, and so which mode the server runs in."""
    problem = _bwrap_problem(bwrap)
    if problem is None:
        return Status("bubblewrap", f"each sandbox in its own bubblewrap container ({bwrap})")
    if unsafe_no_isolation:
        return Status(
            "unsafe-none",
            f"NO ISOLATION: {problem}; sandbox commands run as this server's own user with "
            f"its files and processes in reach, because {UNSAFE_SETTING}=true",
        )
    return Status(
        "unavailable",
        f"bubblewrap cannot run ({problem}); agents and commands are refused. Install "
        f"bubblewrap, or set {UNSAFE_SETTING}=true to run them unisolated",
    )


def _bwrap_problem(bwrap: str) -> str | None:
    found = shutil.which(bwrap)
    if found is None:
        return f"{bwrap!r} not found"
    with tempfile.TemporaryDirectory(prefix="porthole-probe-") as scratch:
        root = Path(scratch)
        template = Template(network=False)
        confinement = Confinement(
            workspace=root, tmp=root, template=template, uid=65534 if os.geteuid() == 0 else None
        )
        root.chmod(0o755)
        argv = [*bwrap_args(found, confinement), "--", "/bin/true"]
        try:
            result = subprocess.run(argv, capture_output=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{found} failed: {exc}"
    if result.returncode != 0:
        said = result.stderr.decode(errors="replace").strip().splitlines()
        return f"{found} exited {result.returncode}: {said[-1] if said else 'no message'}"
    return None
