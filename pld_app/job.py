"""The main job, as `pld flywheel` and the scheduled deployment both run it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pld_core.config import Params


def run_flywheel(params: Params, iterations: int | None = None, root: Path | None = None,
                 before_flows: Callable[[], None] = lambda: None) -> dict:
    """Under the data directory's lock: MLflow set up, the loop over base versions, the figures redrawn.

    ``before_flows`` runs once the lock is held and before the first flow run (the CLI waits there for the
    Prefect API it started). Raises ``DataDirInUse`` when another flywheel holds the data directory."""
    from flows.flywheel import flywheel, mlflow_setup
    from pld_app.report import write_figures
    from pld_core.layout import Layout
    from pld_core.locking import data_lock

    root = Path(root or Path.cwd())
    with data_lock(Layout.of(params, root).root):
        mlflow_setup(params, root)
        before_flows()
        out = flywheel(params, iterations, str(root))
        write_figures(params)
    return out
