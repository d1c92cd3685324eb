"""Porthole run for real (`manage.py serve`, embedded sandbox server, demo agent) and driven
from headless Chromium through Playwright's sync API.

pytest-playwright is not a dependency: the fixtures here launch Debian's Chromium
(`/usr/bin/chromium`, or `PORTHOLE_E2E_CHROMIUM`) themselves. Every page a test opens
reports console errors, uncaught page errors and Content Security Policy violations; a test
that leaves any behind fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "e2e"
# The layouts pages are drawn and photographed in: wide light, wide dark, a phone.
LAYOUTS: dict[str, dict[str, Any]] = {
    "light": {"color_scheme": "light", "viewport": {"width": 1280, "height": 900}},
    "dark": {"color_scheme": "dark", "viewport": {"width": 1280, "height": 900}},
    "narrow": {
        "color_scheme": "light",
        "viewport": {"width": 390, "height": 844},
        "device_scale_factor": 2,
        "is_mobile": True,
        "has_touch": True,
    },
}
CHROMIUM = Path(os.environ.get("PORTHOLE_E2E_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ADMIN_USERNAME = "admin"
ADMIN_PASSWORD = "e2e-" + secrets.token_urlsafe(12)
SERVING = re.compile(r"Porthole on (http://\S+?)/?\s")
START_TIMEOUT = 60.0


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def require_browser() -> None:
    """Skip the calling module when there is no Chromium or Playwright; fail instead in CI."""
    problem = ""
    if not CHROMIUM.exists():
        problem = f"no Chromium at {CHROMIUM} (install Debian's `chromium` package)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "the `playwright` Python package is not installed"
    if not problem:
        return
    if _in_ci():
        pytest.fail(f"end-to-end tests cannot run in CI: {problem}", pytrace=False)
    pytest.skip(f"end-to-end tests skipped: {problem}", allow_module_level=True)


# -- Porthole, for real ------------------------------------------------------------------------


@dataclass
class Porthole:
    url: str  # no trailing slash
    data_dir: Path
    process: subprocess.Popen[str]
    env: dict[str, str]  # the server's environment: for `manage.py` commands against it
    log: list[str] = field(default_factory=list)

    def output(self) -> str:
        return "".join(self.log)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _server_env(data_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    # Embedded mode, production settings; nothing from the developer's shell leaks in.
    for name in (
        "ANTHROPIC_API_KEY",
        "OPENCOMPUTER_API_URL",
        "OPENCOMPUTER_API_KEY",
        "DATABASE_URL",
        "REDIS_URL",
        "SECRET_KEY",
        "ALLOWED_HOSTS",
        "CSRF_TRUSTED_ORIGINS",
        "SESSION_COOKIE_SECURE",
        "CSRF_COOKIE_SECURE",
        "SECURE_SSL_REDIRECT",
        "LOCALSANDBOX_AGENT",
        "LOCALSANDBOX_PORT",
        "PORTHOLE_HOST",
        "PORTHOLE_PORT",
        "PORTHOLE_RUN_BRIDGES",
    ):
        env.pop(name, None)
    env.update(
        DEBUG="false",
        PORTHOLE_DATA_DIR=str(data_dir),
        # Beside the data directory (never in it), not in the user's default place, which
        # the servers of a run beside this one (the team-mode child) would share.
        LOCALSANDBOX_WORKSPACES_DIR=str(data_dir.parent / f"{data_dir.name}-workspaces"),
        DJANGO_SETTINGS_MODULE="dashboard.settings",
        PYTHONUNBUFFERED="1",
    )
    return env


def _manage(env: dict[str, str], *args: str) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"manage.py {' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
        )


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _stop(process: subprocess.Popen[str]) -> None:
    """SIGTERM (serve stops its embedded sandbox server itself), then kill the whole group."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=20)
    # The group was created for this server: it holds serve, the sandbox server and agents.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)


@contextlib.contextmanager
def _team_services(name: str) -> Iterator[dict[str, str]]:
    """On PostgreSQL + Redis (the team-mode child run): a database of the server's own, made
    afresh and dropped afterwards, and a Redis key prefix of its own. Two servers of one run
    never share either: another server's bridges would take this one's sessions (and fail to
    find their sandboxes, which its own embedded server holds)."""
    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith(("postgres://", "postgresql://")) or not os.environ.get("REDIS_URL"):
        yield {}
        return
    import psycopg

    parts = urlsplit(url)
    database = f"{parts.path.lstrip('/') or 'porthole'}_{name}"
    admin_url = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{database}"')
    try:
        yield {
            "DATABASE_URL": urlunsplit(parts._replace(path=f"/{database}")),
            "REDIS_URL": os.environ["REDIS_URL"],
            "REDIS_PREFIX": f"{database}-{secrets.token_hex(4)}",
        }
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


@pytest.fixture(scope="session")
def porthole(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Porthole]:
    """`manage.py serve` with the embedded sandbox server and the demo agent, DEBUG off;
    on PostgreSQL and Redis too when this run is (tests/team/test_team_mode.py)."""
    with run_porthole(tmp_path_factory.mktemp("porthole-e2e"), "e2e") as server:
        yield server


@contextlib.contextmanager
def run_porthole(
    data_dir: Path, name: str, extra_env: dict[str, str] | None = None
) -> Iterator[Porthole]:
    """A Porthole server of its own (data directory, database, Redis prefix), stopped after."""
    with _team_services(name) as services:
        env = {**_server_env(data_dir), **services, **(extra_env or {})}
        yield from _serve(data_dir, env, f"server-{name}.log")


def _serve(data_dir: Path, env: dict[str, str], log_name: str) -> Iterator[Porthole]:
    _manage(env, "migrate", "--noinput")
    _manage(
        dict(env, DJANGO_SUPERUSER_PASSWORD=ADMIN_PASSWORD),
        "createsuperuser",
        "--noinput",
        "--username",
        ADMIN_USERNAME,
        "--email",
        "admin@example.org",
    )
    port = _free_port()
    # `manage.py serve`, run as `python -m django serve` (the same command, same settings):
    # other people's scripts on a shared machine stop their dev servers with `pkill -f
    # "manage.py serve"`, which must not take this one down in the middle of a run.
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "django",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--sandbox-port",
            "0",
            "--agent",
            "demo",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    server = Porthole(url="", data_dir=data_dir, process=process, env=env)
    announced = threading.Event()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            server.log.append(line)
            match = SERVING.search(line)
            if match and not server.url:
                server.url = match.group(1).rstrip("/")
                announced.set()
        announced.set()

    threading.Thread(target=pump, daemon=True, name="porthole-output").start()
    try:
        deadline = time.monotonic() + START_TIMEOUT
        if not announced.wait(START_TIMEOUT) or not server.url:
            raise RuntimeError("serve never said where it listens")
        while not _healthy(server.url):
            if process.poll() is not None:
                raise RuntimeError(f"serve exited with {process.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"/healthz did not answer 200 within {START_TIMEOUT:g} s")
            time.sleep(0.1)  # polling with a deadline, not synchronisation
    except BaseException as exc:
        _stop(process)
        raise RuntimeError(f"Porthole did not start: {exc}\n{server.output()}") from exc
    try:
        yield server
    finally:
        _stop(process)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / log_name).write_text(server.output())


@pytest.fixture(autouse=True)
def _porthole_alive(request: pytest.FixtureRequest) -> Iterator[None]:
    """Say so plainly when the server died (or was killed from outside) under a test."""
    yield
    if "porthole" in request.fixturenames:
        server: Porthole = request.getfixturevalue("porthole")
        code = server.process.poll()
        assert code is None, (
            f"the Porthole server exited with {code} during this test "
            f"(negative: killed by signal {-code if code and code < 0 else '-'}):\n"
            + "".join(server.log[-30:])
        )


# -- the browser ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Module-scoped: Playwright's sync API keeps an event loop running in this thread while
    it is started, and every asyncio test after it would fail to start its own."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def signed_in_state(browser: Any, porthole: Porthole) -> dict[str, Any]:
    """The admin's cookies, signed in once through the login form."""
    context = browser.new_context(base_url=porthole.url)
    try:
        page = context.new_page()
        sign_in(page)
        state: dict[str, Any] = context.storage_state()
    finally:
        context.close()
    return state


def sign_in(page: Any) -> None:
    from playwright.sync_api import expect

    page.goto("/login/")
    page.get_by_label("Username").fill(ADMIN_USERNAME)
    page.get_by_label("Password").fill(ADMIN_PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Sessions")).to_be_visible()


# Recorded from the page itself, so that violations are seen even when the console is not;
# also counts the live socket's opens and closes and the finished XHRs, which the tests
# wait on.
CSP_LISTENER = """
(() => {
  window.__cspViolations = [];
  const describe = (el) => !el || !el.tagName ? String(el && el.nodeName)
    : el.tagName.toLowerCase() + (el.id ? '#' + el.id : '');
  document.addEventListener('securitypolicyviolation', (e) => {
    const v = {directive: e.violatedDirective, blocked: e.blockedURI,
               source: `${e.sourceFile}:${e.lineNumber}`, sample: e.sample,
               page: document.location.href, element: describe(e.target)};
    window.__cspViolations.push(v);
    if (window.__porthole_csp) { window.__porthole_csp(v); }
  });
  // htmx's ws extension: how many times a socket opened, and the close codes seen.
  window.__wsOpened = 0;
  window.__wsClosed = [];
  document.addEventListener('htmx:wsOpen', () => { window.__wsOpened += 1; });
  // XHRs (htmx's requests) finished: `loadend` follows the `load` handler in which htmx
  // swaps the reply, wherever the swap went (its own events may never reach document).
  window.__xhrDone = 0;
  const send = XMLHttpRequest.prototype.send;
  XMLHttpRequest.prototype.send = function (...args) {
    this.addEventListener('loadend', () => { window.__xhrDone += 1; });
    return send.apply(this, args);
  };
  document.addEventListener('htmx:wsClose', (e) => {
    window.__wsClosed.push(e.detail && e.detail.event ? e.detail.event.code : null);
  });
})();
"""


class Problems:
    """Console errors, page errors and CSP violations seen by every page of one context."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.allowed: list[re.Pattern[str]] = []

    def allow(self, pattern: str) -> None:
        """Expect console errors matching `pattern` (e.g. a socket cut on purpose)."""
        self.allowed.append(re.compile(pattern))

    def add(self, text: str) -> None:
        self.seen.append(text)

    def watch(self, page: Any) -> None:
        def on_console(message: Any) -> None:
            text = message.text
            if "Content Security Policy" in text:
                self.add(f"CSP (console) on {page.url}: {text}")
            elif message.type == "error":
                location = message.location or {}
                self.add(f"console error on {page.url}: {text} @ {location.get('url', '')}")

        page.on("console", on_console)
        page.on("pageerror", lambda error: self.add(f"page error on {page.url}: {error}"))

    def unexpected(self) -> list[str]:
        return [
            text
            for text in self.seen
            if text.startswith("CSP") or not any(p.search(text) for p in self.allowed)
        ]


@dataclass
class Browsing:
    """A signed-in browser context; `new_page()` opens watched pages in it."""

    context: Any
    problems: Problems
    pages: list[Any] = field(default_factory=list)
    closed: bool = False

    def new_page(self) -> Any:
        page = self.context.new_page()
        self.problems.watch(page)
        self.pages.append(page)
        return page

    def finish(self) -> None:
        """Check, then close the context (once: the proxy fixture may get here first)."""
        if self.closed:
            return
        self.closed = True
        try:
            self.check()
        finally:
            self.context.close()

    def check(self) -> None:
        for page in self.pages:
            if page.is_closed():
                continue
            with contextlib.suppress(Exception):
                for v in page.evaluate("window.__cspViolations || []"):
                    text = (
                        f"CSP (event) on {v['page']}: {v['directive']} blocked {v['blocked']}"
                        f" at {v['source']} {v['sample']!r} on {v['element']}"
                    )
                    if text not in self.problems.seen:
                        self.problems.add(text)
        unexpected = self.problems.unexpected()
        assert not unexpected, "the browser reported problems:\n" + "\n".join(unexpected)


def open_browsing(
    browser: Any, porthole: Porthole, state: dict[str, Any] | None, **options: Any
) -> Browsing:
    from playwright.sync_api import expect

    expect.set_options(timeout=15_000)
    context = browser.new_context(base_url=porthole.url, storage_state=state, **options)
    context.set_default_timeout(15_000)
    problems = Problems()

    def on_violation(source: Any, violation: dict[str, Any]) -> None:
        problems.add(
            f"CSP (event) on {violation['page']}: {violation['directive']} blocked "
            f"{violation['blocked']} at {violation['source']} {violation['sample']!r}"
            f" on {violation['element']}"
        )

    context.expose_binding("__porthole_csp", on_violation)
    context.add_init_script(CSP_LISTENER)
    return Browsing(context=context, problems=problems)


@pytest.fixture
def browsing(
    browser: Any, porthole: Porthole, signed_in_state: dict[str, Any]
) -> Iterator[Browsing]:
    """A fresh signed-in context for one test; fails the test on any browser problem."""
    session = open_browsing(browser, porthole, signed_in_state)
    try:
        yield session
    finally:
        session.finish()


@pytest.fixture
def page(browsing: Browsing) -> Any:
    return browsing.new_page()


@pytest.fixture
def open_context(
    browser: Any, porthole: Porthole, signed_in_state: dict[str, Any]
) -> Iterator[Callable[..., Browsing]]:
    """Further contexts (other colour schemes, viewports, signed out), checked like `browsing`."""
    opened: list[Browsing] = []

    def factory(*, signed_in: bool = True, **options: Any) -> Browsing:
        session = open_browsing(
            browser, porthole, signed_in_state if signed_in else None, **options
        )
        opened.append(session)
        return session

    try:
        yield factory
    finally:
        failures = []
        for session in opened:
            try:
                session.finish()
            except AssertionError as exc:
                failures.append(str(exc))
        assert not failures, "\n".join(failures)


# -- a network path the test can cut --------------------------------------------------------------


class CuttableProxy:
    """A loopback TCP proxy in its own thread, between the browser and Porthole.

    `cut()` aborts every connection (no close handshake, as a network failure would: the
    browser sees close code 1006); while `hold()` is in force new connections wait,
    unanswered, until `release()`. `pause_websockets()` stops what the server sends on
    WebSocket connections (buffered, not lost) until `resume_websockets()`, while plain
    HTTP keeps flowing: it decides which of a form's reply and a live update lands first.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._open = asyncio.Event()
        self._ws_flowing = asyncio.Event()
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._closing = False
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="e2e-proxy")

    def start(self) -> CuttableProxy:
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("the proxy did not start")
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())
        self._loop.run_forever()
        self._loop.close()

    async def _serve(self) -> None:
        self._open.set()
        self._ws_flowing.set()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self._started.set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            await self._open.wait()
            if self._closing:
                writer.transport.abort()
                return
            self.connections += 1
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            except OSError:
                writer.transport.abort()
                return
            self._writers.add(up_writer)
            kind: dict[str, bool] = {}
            await asyncio.gather(
                self._pipe(reader, up_writer, kind, upstream=True),
                self._pipe(up_reader, writer, kind, upstream=False),
                return_exceptions=True,
            )
        finally:
            self._tasks.discard(task)

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        kind: dict[str, bool],
        *,
        upstream: bool,
    ) -> None:
        try:
            while data := await reader.read(65536):
                if upstream and "websocket" not in kind:
                    kind["websocket"] = data.startswith(b"GET /ws/")
                if not upstream and kind.get("websocket"):
                    await self._ws_flowing.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()
            self._writers.discard(writer)

    def _call(self, fn: Callable[[], None]) -> None:
        done = threading.Event()

        def run() -> None:
            try:
                fn()
            finally:
                done.set()

        self._loop.call_soon_threadsafe(run)
        if not done.wait(5):
            raise RuntimeError("the proxy did not answer")

    def _abort_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def cut(self) -> None:
        self._call(self._abort_all)

    def hold(self) -> None:
        self._call(self._open.clear)

    def release(self) -> None:
        self._call(self._open.set)

    def pause_websockets(self) -> None:
        self._call(self._ws_flowing.clear)

    def resume_websockets(self) -> None:
        self._call(self._ws_flowing.set)

    def close(self) -> None:
        async def shut() -> None:
            self._closing = True
            if self._server is not None:
                self._server.close()
            self._open.set()
            self._ws_flowing.set()
            self._abort_all()
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=5)
            self._loop.stop()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(shut(), self._loop)
            self._thread.join(5)


@pytest.fixture
def proxy(porthole: Porthole, browsing: Browsing) -> Iterator[CuttableProxy]:
    """A proxy for the pages of `browsing`, which are checked and closed before it goes
    (a page still open on a closed proxy would report its socket's failure)."""
    port = int(porthole.url.rsplit(":", 1)[1])
    cuttable = CuttableProxy(port).start()
    try:
        yield cuttable
        browsing.finish()
    finally:
        cuttable.close()
