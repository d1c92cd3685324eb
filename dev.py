#!/usr/bin/env python3
"""Porthole's launcher: everything a fresh machine needs, in two commands.

    python3 dev.py start   # set up, migrate, run Porthole on the embedded sandbox server
    python3 dev.py test    # set up (dev tools and Chromium too), run the whole suite

It runs on any Python 3.11+, but Django 6 needs 3.12+, so it finds (or, with uv and a
network, installs) a 3.12+ interpreter for the project's virtual environment. Set-up is
idempotent: the locked requirements are installed again only when the lock file changes.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("PORTHOLE_VENV", ROOT / ".venv"))
MIN_PYTHON = (3, 12)
CHROMIUM = "/usr/bin/chromium"


def say(message: str) -> None:
    print(f"[porthole] {message}", flush=True)


def run(*args: str | os.PathLike[str], **kwargs) -> None:
    subprocess.run([str(a) for a in args], check=True, **kwargs)


def python_version(executable: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run(
            [executable, "-c", "import sys; print(*sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout.split()
        return int(out[0]), int(out[1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def find_python() -> str:
    if sys.version_info[:2] >= MIN_PYTHON:
        return sys.executable
    candidates = [shutil.which(f"python3.{minor}") for minor in (12, 13, 14)]
    pyenv_root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates += sorted(glob.glob(f"{pyenv_root}/versions/3.1[2-9]*/bin/python3"))
    candidates += sorted(glob.glob("/usr/local/bin/python3.1[2-9]")) + sorted(
        glob.glob("/usr/bin/python3.1[2-9]")
    )
    for candidate in filter(None, candidates):
        version = python_version(candidate)
        if version and version >= MIN_PYTHON:
            return candidate
    say("Django 6 needs Python 3.12+; none found, trying `uv python install 3.12`")
    try:
        run(sys.executable, "-m", "pip", "install", "--quiet", "--user", "uv")
        found = subprocess.run(
            [sys.executable, "-m", "uv", "python", "find", "--system", "3.12"],
            capture_output=True,
            text=True,
        )
        if found.returncode != 0:
            run(sys.executable, "-m", "uv", "python", "install", "3.12")
            found = subprocess.run(
                [sys.executable, "-m", "uv", "python", "find", "3.12"],
                capture_output=True,
                text=True,
                check=True,
            )
        return found.stdout.strip()
    except subprocess.CalledProcessError:
        sys.exit("Porthole needs Python 3.12 or newer (Django 6). Install one and run again.")


def venv_python() -> Path:
    return VENV / "bin" / "python"


def ensure_venv(lock: str) -> Path:
    py = venv_python()
    if not py.exists() or (python_version(str(py)) or (0, 0)) < MIN_PYTHON:
        interpreter = find_python()
        say(f"creating {VENV} with {interpreter}")
        run(interpreter, "-m", "venv", "--clear", VENV)
        run(py, "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    lock_path = ROOT / "requirements" / lock
    digest = hashlib.sha256(lock_path.read_bytes()).hexdigest()
    stamp = VENV / f".installed-{lock}"
    if not stamp.exists() or stamp.read_text() != digest:
        say(f"installing requirements/{lock}")
        run(py, "-m", "pip", "install", "--quiet", "--require-hashes", "-r", lock_path)
        stamp.write_text(digest)
    return py


# Debian packages, each with the file that shows it is installed and what it is for.
# Running Porthole needs these (bubblewrap isolates each embedded sandbox):
RUNTIME_PACKAGES: list[tuple[str, tuple[str, ...], str]] = [
    ("/usr/bin/bwrap", ("bubblewrap",), "embedded sandboxes will refuse to run agents"),
]
# The tests need these as well (add more here: package, the file it installs, what skips):
TEST_PACKAGES: list[tuple[str, tuple[str, ...], str]] = [
    *RUNTIME_PACKAGES,
    (
        os.environ.get("PORTHOLE_CHROMIUM", CHROMIUM),
        ("chromium", "fonts-dejavu-core"),
        "end-to-end tests will skip",
    ),
    ("/usr/sbin/nginx", ("nginx",), "the tests behind a real proxy will skip"),
]


def ensure_debian_packages(wanted: list[tuple[str, tuple[str, ...], str]]) -> None:
    """Install with apt-get whatever of `wanted` is missing (as root, or with sudo -n)."""
    missing = [entry for entry in wanted if not os.path.exists(entry[0])]
    if not missing:
        return
    packages = [package for _, names, _ in missing for package in names]
    consequences = "; ".join(f"without {names[0]}, {then}" for _, names, then in missing)
    if shutil.which("apt-get") is None:
        say(f"apt-get is not available to install {' '.join(packages)}: {consequences}")
        return
    prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
    say(f"installing Debian's {' '.join(packages)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        run(*prefix, "apt-get", "update", "-qq", env=env)
        run(*prefix, "apt-get", "install", "-y", "-qq", *packages, env=env)
    except (subprocess.CalledProcessError, OSError) as exc:
        say(f"could not install {' '.join(packages)} ({exc}): {consequences}")


def start(args: list[str]) -> int:
    py = ensure_venv("dev.lock" if os.environ.get("PORTHOLE_DEV") else "base.lock")
    ensure_debian_packages(RUNTIME_PACKAGES)
    run(py, "manage.py", "migrate", "--noinput", cwd=ROOT)
    # Content-hashed, compressed static files for WhiteNoise to serve with long caching.
    run(py, "manage.py", "collectstatic", "--noinput", "--verbosity", "0", cwd=ROOT)
    # Replaced by serve, not its parent: a SIGTERM to this process (a supervisor, `kill`)
    # reaches serve, which stops its sandbox server and bridges; a parent would die alone.
    os.chdir(ROOT)
    os.execv(py, [str(py), "manage.py", "serve", *args])


LINTERS = (
    ("ruff", "check", "."),
    ("ruff", "format", "--check", "."),
    ("mypy",),
)


def test(args: list[str]) -> int:
    """Lint and type-check (unless pytest arguments narrow the run), then the whole suite.

    The linters run beside pytest rather than before it (their output kept in files and
    shown after it), which keeps the whole run shorter.
    """
    py = ensure_venv("dev.lock")
    ensure_debian_packages(TEST_PACKAGES)
    with contextlib.ExitStack() as files:
        linters = []
        for linter in LINTERS if not args else ():
            out = files.enter_context(tempfile.TemporaryFile("w+"))
            process = subprocess.Popen(
                [str(py), "-m", *linter], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
            )
            linters.append((linter, process, out))
        result = subprocess.call([str(py), "-m", "pytest", *args], cwd=ROOT)
        failed = 0
        for linter, process, out in linters:
            code = process.wait()
            out.seek(0)
            say(f"{' '.join(linter)}: {'ok' if code == 0 else f'failed ({code})'}")
            print(out.read(), end="", flush=True)
            failed |= code != 0
    return result or int(failed)


def main() -> int:
    commands = {"start": start, "test": test}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        print(__doc__)
        return 2
    try:
        return commands[sys.argv[1]](sys.argv[2:])
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
