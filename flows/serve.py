"""`pld serve --cron "..."`: the flywheel as a scheduled Prefect deployment.

Needs a Prefect server (cron schedules do not fire on the ephemeral one):

    .venv/bin/prefect server start --host 127.0.0.1          # UI at http://127.0.0.1:4200
    PREFECT_API_URL=http://127.0.0.1:4200/api .venv/bin/pld serve --cron "0 2 * * *"

`serve` registers the deployment and keeps running as its worker: each scheduled run re-reads
params.yaml and resumes or skips every stage through the manifests.
"""

from __future__ import annotations

import os

from pld_core.errors import PLDError


def serve(cron: str, profile: str | None = None, params_path: str = "params.yaml", name: str = "pld-flywheel") -> None:
    from prefect.settings import PREFECT_API_URL

    from flows.flywheel import flywheel_flow

    if not PREFECT_API_URL.value():
        raise PLDError("pld serve needs a Prefect server: cron schedules never fire on the ephemeral one. "
                       "Fix: run `.venv/bin/prefect server start --host 127.0.0.1` and export PREFECT_API_URL=http://127.0.0.1:4200/api")
    try:
        from cronsim import CronSim  # prefect's own cron parser dependency
        from datetime import datetime

        CronSim(cron, datetime.now())
    except Exception as e:
        raise PLDError(f"--cron '{cron}' is not a valid cron expression ({e}). Fix: e.g. --cron '0 2 * * *'") from None
    flywheel_flow.serve(name=name, cron=cron, parameters={"profile": profile or "default", "params_path": params_path, "root": os.getcwd()})
