"""Running the product as a user runs it, for the end-to-end tests: the `pld` command, the smoke flywheel's
overrides, servers and clusters started as processes on 127.0.0.1 (Prefect, MLflow, Dask, Ray), and a
headless Chromium for the UIs. Test modules import it explicitly (``from harness import ...``)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
# where the UI tests leave their screenshots (the committed ones in docs/ are made with PLD_SCREENSHOTS=docs)
SCREENSHOTS = os.environ.get("PLD_SCREENSHOTS")


def env(**extra) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180", **extra}


def pld(*args, cwd=ROOT, timeout=1200, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """`pld <args>` in a subprocess; the result also carries the process id (``.pid``)."""
    cmd = [sys.executable, "-m", "pld_app.cli", *args]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env(**(extra_env or {}))) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            raise
    r = subprocess.CompletedProcess(cmd, p.returncode, out, err)
    r.pid = p.pid
    return r


def smoke_overrides(tmp: Path, runner: str = "dask") -> list[str]:
    return ["--profile", "smoke", "--set", f"flywheel.data_dir={tmp / 'data'}", "--set", f"flywheel.task_runner={runner}",
            "--set", f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", "--set", f"mlflow.artifact_dir={tmp / 'mlartifacts'}"]


# the smoke flywheel on two tasks: the base sometimes succeeds on task 0 and never on task 1 (it holds still there);
# the specialist in one process (residual.mode sync), so that every stage's output is a function of its inputs
TWO_TASKS = ["--set", "env.tasks=[0, 1]", "--set", "base.path=scripted:noise=0.6,idle=1", "--set", "offline.max_episodes=6",
             "--set", "residual.mode=sync"]


def manifests(data: Path) -> dict[str, str]:
    return {str(p.relative_to(data)): json.loads(p.read_text())["finished_at"] + json.loads(p.read_text())["key"]
            for p in data.rglob("manifest.json") if ".tmp-" not in str(p)}


def built_by(data: Path) -> dict[str, dict]:
    return {str(p.parent.relative_to(data)): json.loads(p.read_text())["built_by"]
            for p in data.rglob("manifest.json") if ".tmp-" not in str(p)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}: {log.read_text()[-3000:] if log else ''}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        time.sleep(1)
    raise TimeoutError(f"{url} not up after {timeout:.0f} s: {log.read_text()[-3000:] if log else ''}")


def wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}: {log.read_text()[-3000:] if log else ''}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
            return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s: {log.read_text()[-3000:] if log else ''}")


@contextlib.contextmanager
def process(args: list[str], log: Path, cwd: Path | None = None, environ: dict | None = None):
    """A server or worker process for the duration of a block; its output in ``log``; stopped (then killed)."""
    fh = open(log, "w")
    proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd, env=environ or env(), start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            proc.wait(timeout=30)
        fh.close()


def chromium():
    """A headless Chromium driven by selenium (Debian's chromium and chromium-driver; `make test` installs them)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1600,1000"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=opts)


def wait_for_text(driver, texts: list[str], timeout: float = 90) -> str:
    """The page's visible text once it holds every one of ``texts`` (single-page apps render late)."""
    from selenium.webdriver.common.by import By

    t0, body = time.time(), ""
    while time.time() - t0 < timeout:
        with contextlib.suppress(Exception):
            body = driver.find_element(By.TAG_NAME, "body").text
            if all(t in body for t in texts):
                return body
        time.sleep(1)
    raise AssertionError(f"{driver.current_url}: not all of {texts} within {timeout:.0f} s; the page shows:\n{body[:3000]}")


UNFOLD_JS = """
for (const el of document.querySelectorAll('*')) {
  const st = getComputedStyle(el);
  if ((st.overflowY === 'auto' || st.overflowY === 'scroll') && el.innerText.includes(arguments[0])) {
    el.style.maxHeight = 'none'; el.style.height = 'auto'; el.style.overflowY = 'visible';
  }
}
"""


def unfold(driver, text: str) -> None:
    """Let the scroll boxes holding ``text`` grow to their content, so that a screenshot shows all of it."""
    driver.execute_script(UNFOLD_JS, text)


def screenshot(driver, name: str, tmp: Path) -> Path:
    out = Path(SCREENSHOTS) if SCREENSHOTS else tmp
    out.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(out / name))
    return out / name


# ----------------------------------------------------------------------------- a Prefect server's REST API
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "CRASHED")
DEPLOYMENT = "pld-flywheel/pld-flywheel"  # <flow name>/<deployment name> (`pld serve --name`)


def api(server: dict, method: str, path: str, body: dict | None = None):
    import httpx

    r = httpx.request(method, server["api"] + path, json=body, timeout=30)
    r.raise_for_status()
    return r.json()


def wait_deployment(server: dict, proc: subprocess.Popen, log: Path, timeout: float = 300) -> dict:
    """The deployment once `pld serve` has registered it (and its worker is polling)."""
    import httpx

    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, f"pld serve exited with {proc.returncode}: {log.read_text()[-3000:]}"
        with contextlib.suppress(httpx.HTTPError):
            return api(server, "GET", f"/deployments/name/{DEPLOYMENT}")
        time.sleep(1)
    raise TimeoutError(f"no deployment {DEPLOYMENT} after {timeout:.0f} s: {log.read_text()[-3000:]}")


def trigger(server: dict, *params: str) -> str:
    """A run of the deployment now, as a user starts one: `prefect deployment run ... [--param k=v]`."""
    cmd = [str(VENV_BIN / "prefect"), "deployment", "run", DEPLOYMENT]
    for p in params:
        cmd += ["--param", p]
    r = subprocess.run(cmd, capture_output=True, text=True, env=server["env"], timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    import re

    m = re.search(r"UUID: ([0-9a-f-]{36})", r.stdout)
    assert m, r.stdout
    return m.group(1)


def wait_final(server: dict, run_id: str, timeout: float) -> dict:
    t0 = time.time()
    while time.time() - t0 < timeout:
        run = api(server, "GET", f"/flow_runs/{run_id}")
        if run["state_type"] in FINAL:
            return run
        time.sleep(2)
    raise TimeoutError(f"flow run {run_id} not finished after {timeout:.0f} s: {run['state_type']}")


def run_logs(server: dict, flow_run_ids: list[str]) -> list[str]:
    logs = api(server, "POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": flow_run_ids}}, "limit": 200})
    return [x["message"] for x in logs]


# ----------------------------------------------------------------------------- comparing two data dirs
VOLATILE = ("seconds", "finished_at")  # wall-clock values some outputs carry (eval.json, curve.json, state.json)


def _canonical(path: Path, roots: list[str]) -> bytes:
    """A file's bytes with the data dir's own location and wall-clock values taken out: JSON with sorted keys
    (LeRobot's stats.json lists features in set order), the project's paths as <ROOT>."""
    raw = path.read_bytes()
    if path.suffix not in (".json", ".txt", ".yaml", ".jsonl"):
        return raw
    text = raw.decode()
    for r in roots:
        text = text.replace(r, "<ROOT>")
    if path.suffix != ".json":
        return text.encode()

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in VOLATILE}
        return [strip(v) for v in x] if isinstance(x, list) else x

    return json.dumps(strip(json.loads(text)), sort_keys=True).encode()


def content_digests(data: Path, *roots: Path) -> dict[str, dict[str, str]]:
    """Per stage dir under ``data``: {file: digest of its canonical content}, the manifest left out."""
    import hashlib

    names = sorted({str(Path(r).resolve()) for r in (data, *roots)}, key=len, reverse=True)
    stages = sorted(p.parent for p in data.rglob("manifest.json") if ".tmp-" not in str(p))
    out = {}
    for d in stages:
        files = {}
        for f in sorted(d.rglob("*")):
            owner = next(s for s in reversed(stages) if f.is_relative_to(s))  # the innermost stage dir holding it
            if f.is_file() and f.name != "manifest.json" and owner == d:
                files[str(f.relative_to(d))] = hashlib.sha256(_canonical(f, names)).hexdigest()[:16]
        out[str(d.relative_to(data))] = files
    return out


def wait_logs(server: dict, flow_run_id: str, text: str, timeout: float = 60) -> list[str]:
    """A flow run's log messages once one holds ``text`` (the run's process sends its logs in batches)."""
    t0 = time.time()
    while True:
        logs = run_logs(server, [flow_run_id])
        if any(text in m for m in logs) or time.time() - t0 > timeout:
            return logs
        time.sleep(2)
