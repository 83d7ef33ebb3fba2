"""Every stage by name, called the same way from the Prefect flows, the CLI (``pld stage``, which ``dvc.yaml``
runs) and the benchmarks: ``call_stage(name, params, iteration, task) -> manifest``. Paths come from the
:class:`~pld_core.layout.Layout`, the graph from :data:`~pld_core.layout.STAGES`; the base a stage runs is
resolved here, once (:func:`~pld_core.layout.base_ref`), and handed to it."""

from __future__ import annotations

from pld_core.config import Params
from pld_core.errors import PLDError
from pld_core.layout import ALL_STAGES, PER_TASK, Layout, base_ref, check_suite_task, output_dir, pld_dirs_with_data
from pld_core.policies import is_scripted


def call_stage(name: str, params: Params, k: int = 0, task: int | None = None, force: bool = False, layout: Layout | None = None) -> dict:
    if name not in ALL_STAGES:
        raise PLDError(f"unknown stage '{name}'. Fix: use one of {list(ALL_STAGES)}")
    if name in PER_TASK:
        if task is None:
            raise PLDError(f"stage '{name}' runs per task. Fix: pass --task (one of env.tasks {params.env.tasks})")
        check_suite_task(params, task)
    layout = layout or Layout.of(params)
    out = output_dir(name, layout, params, k, task)
    s = params.env.suite

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
        b = params.base
        if b.path:
            from tasks import adopt_base
            return adopt_base.run(params, out, force=force)
        if b.steps == 0:  # the policy at initialisation (a random pi0.5): nothing trained
            from tasks import init_base
            return init_base.run(params, out, output_dir("base_v0_dataset", layout, params), force=force)
        from tasks import sft
        return sft.run(params, out, output_dir("base_v0_dataset", layout, params), init=dict(b.policy),
                       steps=b.steps, batch_size=b.batch_size, lr=b.lr, force=force)
    if name in ("evaluate_v0", "evaluate"):
        from tasks import evaluate
        version = 0 if name == "evaluate_v0" else k + 1
        return evaluate.run(params, out, base_ref(params, layout, version), label=f"v{version}", force=force)
    if name == "convert_dataset":
        from tasks import convert_dataset
        extra = [layout.demos] if params.sft.include_base_data and not params.base.path else []
        return convert_dataset.run(params, out, pld_dirs=pld_dirs_with_data(params, layout, k), extra_dirs=extra, force=force)
    if name == "augment_quantiles":
        from tasks import augment_quantiles
        return augment_quantiles.run(params, out, layout.dataset_raw(k), force=force)

    base = base_ref(params, layout, k)
    if name == "collect_offline":
        from tasks import collect_offline
        return collect_offline.run(params, out, base, task, force=force)
    if name == "pretrain_critic":
        from tasks import pretrain_critic
        return pretrain_critic.run(params, out, offline_dir=layout.offline(k, s, task), force=force)
    if name == "train_residual":
        from tasks import train_residual
        return train_residual.run(params, out, base, offline_dir=layout.offline(k, s, task),
                                  critic_dir=layout.critic_init(k, s, task), force=force)
    if name == "collect_pld":
        from tasks import collect_pld
        return collect_pld.run(params, out, base, task, residual_dir=layout.residual(k, s, task), force=force)
    if name == "sft":
        from tasks import sft
        # a LeRobot base is fine-tuned; a scripted base is distilled into a new LeRobot policy (base.policy)
        init = dict(params.base.policy) if is_scripted(base.spec) else base
        return sft.run(params, out, layout.dataset(k), init=init, force=force)
    raise AssertionError(name)
