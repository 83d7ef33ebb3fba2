"""Stage `demos`: scripted demonstrations for every default task (the stand-in for teleoperation)."""

from __future__ import annotations

from pathlib import Path

from pld_core.config import Params
from pld_core.demos import record_demos
from pld_core.stage import run_stage


def run(params: Params, out_dir: Path, force: bool = False) -> dict:
    used = {"env": params.section_dict("env"), "demo": params.section_dict("demo"), "gamma": params.sac.gamma}

    def build(tmp: Path) -> dict:
        e, d = params.env, params.demo
        return record_demos(tmp / "demos.zarr", e.suite, list(e.tasks), d.episodes_per_task, mode=e.mode,
                            image_size=e.image_size, max_objects=e.max_objects, noise=d.noise, seed=d.seed,
                            gamma=params.sac.gamma)

    return run_stage("demos", out_dir, used, {}, build, resume=True, force=force)  # the store tops itself up
