"""The Prefect API a `pld flywheel` command talks to.

With no server configured, Prefect starts a temporary one on the first flow run: it imports its
whole server app in this process (~2 s), then waits for the uvicorn subprocess (~4 s), and at exit
waits for that subprocess's graceful shutdown (~3 s), all on the critical path. `prefect_api()`
starts the same server (Prefect's own app factory, UI off, ephemeral flags on) before the command's
heavy imports, so its start-up overlaps them, and stops it without waiting on a graceful shutdown
once every flow run has finished. Flow runs are unchanged; they see an ordinary ``PREFECT_API_URL``.

A configured API (``PREFECT_API_URL`` in the environment or in the active Prefect profile) is used as
is, and ``PREFECT_SERVER_EPHEMERAL_ENABLED=false`` turns this off, as it does Prefect's own.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import random
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from pld_core.errors import PLDError


def _configured_api() -> str | None:
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    home = Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect")).expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH", home / "profiles.toml")).expanduser()
    try:
        profiles = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active") or "ephemeral"
    return (profiles.get("profiles", {}).get(active) or {}).get("PREFECT_API_URL") or None


def _free_port() -> int:
    for _ in range(50):
        port = random.randrange(8000, 9000)
        with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise PLDError("no free local port in 8000-8999 for the temporary Prefect server. "
                   "Fix: free one, or start a server (`prefect server start`) and export PREFECT_API_URL")


class _Server:
    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> None:
        spec = importlib.util.find_spec("prefect")  # its install path, without importing it (~2 s)
        if spec is None or not spec.origin:
            raise PLDError("prefect is not installed. Fix: make setup (or pip install -e .)")
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}/api"
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(spec.origin).parent.parent), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "error", "--lifespan", "on"],
            env=env, stdin=subprocess.DEVNULL)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:  # 3: the port was taken between the probe and the bind
                raise PLDError(f"the temporary Prefect server exited with code {code} before it was ready. "
                               "Fix: see its output above; or start a server (`prefect server start`) and export PREFECT_API_URL")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise PLDError(f"the temporary Prefect server at {self.url} was not healthy within {timeout:.0f} s "
                       "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS). Fix: raise that, or start a server "
                       "(`prefect server start`) and export PREFECT_API_URL")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:  # every flow run has finished: nothing is left to flush
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def prefect_api() -> Iterator[Callable[[], None]]:
    """Start a temporary Prefect API now (unless one is configured); yields ``ready()``, which blocks
    until it answers. Call it before the first flow run."""
    enabled = os.environ.get("PREFECT_SERVER_EPHEMERAL_ENABLED", "true").strip().lower() not in ("0", "false", "no")
    if _configured_api() or not enabled:
        yield lambda: None
        return
    server = _Server()
    server.start()
    os.environ["PREFECT_API_URL"] = server.url
    timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180"))
    try:
        yield lambda: server.wait_ready(timeout)
    finally:
        _drain_prefect()
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()


def _drain_prefect(timeout: float = 5.0) -> None:
    """Send Prefect's queued logs and events while the server is still up (as Prefect's own test
    harness does before it stops its server); otherwise they are retried against a dead port at exit."""
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=timeout, at_exit=False)
