"""Every stage by name, called the same way from Prefect, the CLI (`pld stage`) and `dvc repro`:
``call_stage(name, params, iteration, task) -> manifest``. Paths come from the Layout only."""

from __future__ import annotations

from pathlib import Path

from pld_core.config import Params
from pld_core.errors import PLDError
from pld_core.artifacts import require_manifest
from tasks.common import Layout, base_checkpoint, base_digest, check_suite_task, no_data_reason

PER_TASK = ("collect_offline", "pretrain_critic", "train_residual", "collect_pld")
PER_ITERATION = ("convert_dataset", "augment_quantiles", "sft", "evaluate")
BOOTSTRAP = ("demos", "base_v0_dataset_raw", "base_v0_dataset", "base_v0", "evaluate_v0")
ALL_STAGES = BOOTSTRAP + PER_TASK + PER_ITERATION


def output_dir(name: str, layout: Layout, params: Params, k: int = 0, task: int | None = None) -> Path:
    s = params.env.suite
    return {
        "demos": lambda: layout.demos,
        "base_v0_dataset_raw": lambda: layout.root / "demos_dataset_raw",
        "base_v0_dataset": lambda: layout.root / "demos_dataset",
        "base_v0": lambda: layout.base(0),
        "evaluate_v0": lambda: layout.base_eval(0),
        "collect_offline": lambda: layout.offline(k, s, task),
        "pretrain_critic": lambda: layout.critic_init(k, s, task),
        "train_residual": lambda: layout.residual(k, s, task),
        "collect_pld": lambda: layout.pld(k, s, task),
        "convert_dataset": lambda: layout.dataset_raw(k),
        "augment_quantiles": lambda: layout.dataset(k),
        "sft": lambda: layout.base(k + 1),
        "evaluate": lambda: layout.base_eval(k + 1),
    }[name]()


def tasks_without_data(params: Params, layout: Layout, k: int) -> dict[int, str]:
    """Iteration ``k``'s tasks whose PLD stage recorded no data, with the reason (every PLD stage must have finished)."""
    s = params.env.suite
    out = {}
    for t in params.env.tasks:
        reason = no_data_reason(require_manifest(layout.pld(k, s, t), f"PLD data of {s} task {t} (stage collect_pld)"))
        if reason:
            out[t] = reason
    return out


def pld_dirs_with_data(params: Params, layout: Layout, k: int) -> list[Path]:
    """The PLD stage dirs that convert_dataset distills; PLDError (the iteration stops) when no task has data."""
    s = params.env.suite
    missing = tasks_without_data(params, layout, k)
    if len(missing) == len(params.env.tasks):
        detail = "; ".join(f"task {t}: {r}" for t, r in missing.items())
        raise PLDError(f"iteration {k}: no task has PLD data, nothing to distill ({s} {detail}). "
                       "Fix: a base that sometimes succeeds on some task, or larger offline.max_episodes / collect.max_episodes")
    return [layout.pld(k, s, t) for t in params.env.tasks if t not in missing]


def adopt_base(params: Params, out: Path) -> dict:
    """base.path set: base v0 is the user's checkpoint, hub id or scripted controller; record it."""
    import json

    from tasks.common import run_stage

    def build(tmp: Path) -> dict:
        (tmp / "base.json").write_text(json.dumps({"spec": params.base.path}))
        return {"adopted": params.base.path}

    return run_stage("base_v0", out, {"base_path": params.base.path}, {}, build)


def call_stage(name: str, params: Params, k: int = 0, task: int | None = None, force: bool = False, layout: Layout | None = None) -> dict:
    if name not in ALL_STAGES:
        raise PLDError(f"unknown stage '{name}'. Fix: use one of {list(ALL_STAGES)}")
    if name in PER_TASK:
        if task is None:
            raise PLDError(f"stage '{name}' runs per task. Fix: pass --task (one of env.tasks {params.env.tasks})")
        check_suite_task(params, task)
    layout = layout or Layout.of(params)
    out = output_dir(name, layout, params, k, task)

    if name == "demos":
        from tasks import demos
        return demos.run(params, out, force=force)
    if name == "base_v0_dataset_raw":
        from tasks import convert_dataset
        return convert_dataset.run(params, out, pld_dirs=[], extra_dirs=[layout.demos], force=force)
    if name == "base_v0_dataset":
        from tasks import augment_quantiles
        return augment_quantiles.run(params, out, output_dir("base_v0_dataset_raw", layout, params), force=force)
    if name == "base_v0":
        from tasks import sft
        b = params.base
        if b.path:
            return adopt_base(params, out)
        return sft.run(params, out, output_dir("base_v0_dataset", layout, params), init=dict(b.policy),
                       steps=b.steps, batch_size=b.batch_size, lr=b.lr, force=force)
    if name in ("evaluate_v0", "evaluate"):
        from tasks import evaluate
        version = 0 if name == "evaluate_v0" else k + 1
        return evaluate.run(params, out, base_checkpoint(params, layout, version), base_digest(params, layout, version),
                            label=f"v{version}", force=force)

    base = base_checkpoint(params, layout, k)
    bdig = base_digest(params, layout, k)
    s = params.env.suite
    if name == "collect_offline":
        from tasks import collect_offline
        return collect_offline.run(params, out, base=base, task=task, force=force)
    if name == "pretrain_critic":
        from tasks import pretrain_critic
        return pretrain_critic.run(params, out, offline_dir=layout.offline(k, s, task), force=force)
    if name == "train_residual":
        from tasks import train_residual
        return train_residual.run(params, out, base=base, offline_dir=layout.offline(k, s, task),
                                  critic_dir=layout.critic_init(k, s, task), force=force)
    if name == "collect_pld":
        from tasks import collect_pld
        return collect_pld.run(params, out, base=base, base_digest=bdig, task=task, residual_dir=layout.residual(k, s, task), force=force)
    if name == "convert_dataset":
        from tasks import convert_dataset
        extra = [layout.demos] if params.sft.include_base_data and not params.base.path else []
        return convert_dataset.run(params, out, pld_dirs=pld_dirs_with_data(params, layout, k), extra_dirs=extra, force=force)
    if name == "augment_quantiles":
        from tasks import augment_quantiles
        return augment_quantiles.run(params, out, layout.dataset_raw(k), force=force)
    if name == "sft":
        from pld_core.policies import is_scripted
        from tasks import sft
        # a LeRobot base is fine-tuned; a scripted base is distilled into a new LeRobot policy (base.policy)
        init = dict(params.base.policy) if is_scripted(base) else base
        return sft.run(params, out, layout.dataset(k), init=init, init_digest=bdig, force=force)
    raise AssertionError(name)
