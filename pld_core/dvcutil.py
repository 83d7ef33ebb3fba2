"""`pld repro`: ``dvc repro`` of dvc.yaml, after checking that it can run at all.

DVC needs an initialised repository (a ``.dvc/`` directory here or in a parent, as DVC itself
looks for it) and ``dvc.yaml``; its stages run ``pld stage ...``, which read the top level of
params.yaml. Every check fails before DVC starts, so a failed check creates nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from pld_core.errors import PLDError


def require_dvc_repo(root: str | Path) -> Path:
    """The DVC repository root at or above ``root``; PLDError if there is none."""
    root = Path(root).resolve()
    for d in (root, *root.parents):
        if (d / ".dvc").is_dir():
            return d
    raise PLDError(f"{root}: not a DVC repository (no .dvc/ here or in a parent directory). "
                   f"Fix: run `dvc init` in {root} (`dvc init --no-scm` outside a Git repository), then rerun")


def require_pipeline(root: str | Path) -> Path:
    path = Path(root).resolve() / "dvc.yaml"
    if not path.is_file():
        raise PLDError(f"{path}: no DVC pipeline here. Fix: run `pld repro` from the project root, where dvc.yaml is")
    return path


def dvc_repro(root: str | Path, targets: list[str]) -> int:
    """Run ``dvc repro [targets]`` in ``root`` with this interpreter's bin dir first on PATH (so the
    stages' ``pld`` is this installation's)."""
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    dvc = shutil.which("dvc", path=env["PATH"])
    if dvc is None:
        raise PLDError("the `dvc` command is not installed. Fix: pip install dvc (it is a dependency of pld-flywheel)")
    return subprocess.run([dvc, "repro", *targets], cwd=str(root), env=env).returncode


# ----------------------------------------------------------------------------- dvc.yaml from the stage graph
# The params sections each stage's key reads (what makes DVC rerun it when they change).
STAGE_PARAMS: dict[str, list[str]] = {
    "demos": ["env", "demo", "sac.gamma"],
    "base_v0_dataset_raw": ["env.mode"],
    "base_v0_dataset": ["hub"],
    "base_v0": ["base", "device", "flywheel.seed", "sft.lora", "hub"],
    "evaluate_v0": ["env", "evaluate", "device", "flywheel.seed"],
    "collect_offline": ["env", "offline", "sac.gamma", "device", "flywheel.keep_failures"],
    "pretrain_critic": ["calql", "sac", "residual"],
    "train_residual": ["env", "sac", "residual", "device"],
    "collect_pld": ["env", "collect", "sac.gamma", "device", "flywheel.keep_failures"],
    "convert_dataset": ["env.mode", "sft.include_base_data", "flywheel.keep_failures"],
    "augment_quantiles": ["hub"],
    "sft": ["sft", "device", "flywheel.seed", "hub"],
    "evaluate": ["env", "evaluate", "device", "flywheel.seed"],
}

PIPELINE_HEADER = """\
# The flywheel as a DVC pipeline, {iterations} iteration(s): written by `pld pipeline` from the stage graph
# (pld_core/layout.py:STAGES) for flywheel.iterations; rewrite it after changing that. Every stage is one
# `pld stage` call reading the top-level (default-profile) sections of params.yaml; iteration k's stages
# are named <stage>_it<k> and run base vk (data/base_v0, then data/iter_<k-1>/base_next). Outputs live under
# data/ (flywheel.data_dir must stay `data` here). Run: `pld repro` (or `PATH=$PWD/.venv/bin:$PATH dvc repro`).
# For another profile, write its resolved params first: `pld params --profile smoke > /tmp/p.yaml && mv /tmp/p.yaml params.yaml`
# (not `> params.yaml`: the shell empties the file before pld reads it).
"""


def stage_name(name: str, k: int) -> str:
    """The DVC stage of ``name`` in iteration ``k`` (bootstrap stages have one name)."""
    from pld_core.layout import STAGE

    return name if STAGE[name].scope == "bootstrap" else f"{name}_it{k}"


def pipeline(iterations: int) -> dict:
    """dvc.yaml's ``stages`` for ``iterations`` iterations: one stage per node of the graph per iteration
    (per-task ones as ``foreach`` over ``env.tasks``), each depending on exactly the outputs of the stages it
    needs (per-task: of the same task; in the same iteration) and, where it runs the base, on that base."""
    from types import SimpleNamespace

    from pld_core.layout import STAGES, Layout, output_dir

    layout = Layout(Path("data"))
    params = SimpleNamespace(env=SimpleNamespace(suite="${env.suite}"))

    def out(name: str, k: int, per_task: bool) -> str:
        d = output_dir(name, layout, params, k, "${item}")
        # a per-task stage read by a per-iteration one: the folder holding every task's output
        return str(d.parent if not per_task and "${item}" in d.name else d)

    stages: dict[str, dict] = {}
    for k in range(iterations):
        for s in STAGES:
            if s.scope == "bootstrap" and k > 0:
                continue
            per_task = s.scope == "task"
            deps = ([str(layout.base(k))] if s.runs_base else []) + [out(n, k, per_task) for n in s.needs]
            spec: dict = {"cmd": f"pld stage {s.name}" + ("" if s.scope == "bootstrap" else f" --iteration {k}")
                          + (" --task ${item}" if per_task else "")}
            if deps:
                spec["deps"] = list(dict.fromkeys(deps))
            spec["params"] = list(STAGE_PARAMS[s.name])
            spec["outs"] = [out(s.name, k, True)]
            stages[stage_name(s.name, k)] = {"foreach": "${env.tasks}", "do": spec} if per_task else spec
    return stages


def pipeline_yaml(iterations: int) -> str:
    import yaml

    body = yaml.safe_dump({"stages": pipeline(iterations)}, sort_keys=False, default_flow_style=None, width=120)
    return PIPELINE_HEADER.format(iterations=iterations) + body


def pipeline_iterations(path: Path) -> int | None:
    """How many iterations a dvc.yaml written by :func:`pipeline_yaml` holds (None: not one of ours)."""
    import yaml

    try:
        stages = (yaml.safe_load(Path(path).read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError):
        return None
    ks = [int(n.rsplit("_it", 1)[1]) for n in stages if n.startswith("evaluate_it") and n.rsplit("_it", 1)[1].isdigit()]
    return max(ks) + 1 if ks else None
