"""`pld serve --cron "..."`: the flywheel as a scheduled Prefect deployment.

Needs a Prefect server (cron schedules do not fire on the ephemeral one):

    .venv/bin/prefect server start --host 127.0.0.1          # UI at http://127.0.0.1:4200
    PREFECT_API_URL=http://127.0.0.1:4200/api .venv/bin/pld serve --cron "0 2 * * *"

`serve` registers the deployment ``pld-flywheel/<name>`` and keeps running as its worker. Each run
re-reads params.yaml, takes the data directory's lock, resumes or skips every stage through the
manifests, and redraws the figures. How a run ends:

    Completed   every stage done (or already done)
    Cancelled   another flywheel holds the data directory: nothing was done (the holder is in the message)
    Failed      a stage raised its one-line error (bad input, nothing to learn from); not retried

A stage that crashes (a killed worker, a flaky file system) is retried once by its task; a run whose own
process dies ends Crashed and the next run resumes from the manifests. There are no flow-level retries:
Prefect retries a flow on any failure, and an error on purpose would only repeat itself.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.states import Cancelled, Failed

from pld_core.errors import PLDError


@flow(name="pld-flywheel", log_prints=True)
def scheduled_flywheel(profile: str = "default", params_path: str = "params.yaml", iterations: int | None = None,
                       root: str | None = None):
    """One scheduled run: the loop over base versions under the data directory's lock, then the figures."""
    from pld_app.job import run_flywheel
    from pld_core.config import load_params
    from pld_core.layout import Layout
    from pld_core.locking import DataDirInUse

    log = get_run_logger()
    root = root or os.getcwd()
    os.chdir(root)
    try:
        params = load_params(Path(root) / params_path, profile)
        layout = Layout.of(params, Path(root))
        out = run_flywheel(params, iterations, Path(root))
    except DataDirInUse as e:
        log.warning(str(e))
        return Cancelled(message=str(e))
    except PLDError as e:  # deliberate: the same input gives the same error, so no retry
        log.error(str(e))
        return Failed(message=str(e))
    versions = [it.get("registered_version") for it in out["iterations"]]
    log.info(f"registered base versions {versions}; artifacts under {layout.root}")
    return {"iterations": len(out["iterations"]), "stopped_at_target": out.get("stopped_at_target")}


def serve(cron: str, profile: str | None = None, params_path: str = "params.yaml", name: str = "pld-flywheel") -> None:
    try:
        from datetime import datetime

        from cronsim import CronSim  # prefect's own cron parser dependency

        CronSim(cron, datetime.now())
    except Exception as e:
        raise PLDError(f"--cron '{cron}' is not a valid cron expression ({e}). Fix: e.g. --cron '0 2 * * *'") from None
    if not (Path.cwd() / params_path).is_file():
        raise PLDError(f"{Path.cwd() / params_path}: no such params file. Fix: run pld serve in the project root, or pass --params")
    from prefect.settings import PREFECT_API_URL

    if not (os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()):
        raise PLDError("pld serve needs a Prefect server: cron schedules never fire on the ephemeral one. "
                       "Fix: run `.venv/bin/prefect server start --host 127.0.0.1` and export PREFECT_API_URL=http://127.0.0.1:4200/api")
    scheduled_flywheel.serve(name=name, cron=cron, parameters={"profile": profile or "default", "params_path": params_path,
                                                               "root": os.getcwd()})
