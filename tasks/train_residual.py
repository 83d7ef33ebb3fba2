"""Stage ``train_residual``: the PLD specialist (residual SAC on the frozen base), resumable.

Inputs: the base spec, the ``collect_offline`` output dir (offline successes; also the source of
the observation normaliser) and, unless ``residual.ablation: no_calql``, the ``pretrain_critic``
output dir (its critic and target warm-start SAC's; the actor starts at zero = the base).

Output ``<out>/`` (built in ``.tmp-<name>`` beside it, renamed into place when done):
``residual.safetensors`` + ``config.json`` (load with :func:`pld_core.residual_policy.load_residual`),
``curve.json`` + ``curve.png`` (eval success vs env steps), ``train_log.json`` (per episode),
``checkpoints/step_<N>/`` (SAC + optimizers + RNG, online replay, counters) and ``manifest.json``.
A killed run leaves ``.tmp-<name>``; rerunning with the same params and inputs resumes from its
newest checkpoint; other params or inputs start over. ``residual.mode: async`` (default) trains with
a learner process beside the simulator (:mod:`pld_core.actor_learner`); ``sync`` in one process,
bit-reproducible.

"""

from __future__ import annotations

import time
from pathlib import Path

from safetensors.torch import load_file

from pld_core.config import Params
from pld_core.env import LiberoEnv, check_task
from pld_core.errors import PLDError
from pld_core.encoders import encoder_weights_identity
from pld_core.layout import BaseRef, env_key, open_offline
from pld_core.policies import make_policy_factory, validate_policy_spec
from pld_core.encoders import check_encoder, make_encoder, StateEncoder
from pld_core.specialist import make_trainer
from pld_core.learner import offline_buffer_from_store, set_torch_threads
from pld_core.lineage import log_metrics
from pld_core.trainer import final_eval_episodes
from pld_core.stage import input_digests, record_no_data, run_stage, stage_key

STAGE = "train_residual"
CRITIC_WEIGHTS = "critic.safetensors"  # pretrain_critic's output


def _residual_params(params: Params) -> dict:
    d = params.section_dict("residual")
    for speed_only in ("torch_threads", "learner_nice"):
        d.pop(speed_only, None)
    if d.get("image_encoder_weights"):
        d["image_encoder_weights"] = encoder_weights_identity(params)
    return d


def run(params: Params, out_dir: Path, base: BaseRef | None, offline_dir: Path, critic_dir: Path | None = None,
        force: bool = False, show_progress: bool = True) -> dict:
    """Train (or resume, or skip) the specialist of the offline store's task; returns the manifest.
    ``base`` may be None only under ``residual.ablation: no_base``."""
    rp, ep = params.residual, params.env
    check_encoder(rp.encoder, ep.mode)
    use_base = rp.ablation != "no_base"
    use_critic = rp.ablation != "no_calql"
    if use_base:
        if base is None:
            raise PLDError("train_residual: no base policy given. Fix: pass the base spec (or use residual.ablation: no_base)")
        validate_policy_spec(base.spec)
    recorded = record_no_data(STAGE, out_dir, {"residual": _residual_params(params), "sac": params.section_dict("sac")},
                              ("offline", offline_dir, "offline store (stage collect_offline)"), force=force)
    if recorded:
        return recorded
    offline_manifest, store = open_offline(offline_dir, params)
    task = int(store.attrs.get("task", offline_manifest.get("metrics", {}).get("task", -1)))
    check_task(ep.suite, task)
    if use_critic and critic_dir is None:
        raise PLDError("train_residual: no critic_init dir given. Fix: run pretrain_critic first, or set residual.ablation: no_calql")
    used = {"env": env_key(params, task), "residual": _residual_params(params), "sac": params.section_dict("sac"),
            "final_eval_episodes": final_eval_episodes(params)}
    inputs = {**input_digests(offline=offline_dir, critic=critic_dir if use_critic else None),
              "base": base.digest if use_base else None}
    key = stage_key(STAGE, used, inputs)

    def build(work: Path) -> dict:
        set_torch_threads(rp.torch_threads)
        t0 = time.time()
        encoder = make_encoder(params, store)
        offline = offline_buffer_from_store(store, encoder, params.sac.gamma)
        critic_state = None
        if use_critic:
            critic_file = Path(critic_dir) / CRITIC_WEIGHTS
            if not critic_file.is_file():
                raise PLDError(f"{critic_file}: missing. Fix: rerun pretrain_critic (delete {critic_dir})")
            critic_state = load_file(str(critic_file))
            _check_same_encoder(critic_state, encoder, critic_file)
        env = LiberoEnv(ep.suite, task, mode=ep.mode, image_size=ep.image_size, max_objects=ep.max_objects)
        try:
            base_policy = make_policy_factory(base.spec, mode=ep.mode, device=params.device, seed=rp.seed)(env) if use_base else None
            meta = {"base": base.spec if use_base else None, "suite": ep.suite, "task": task, "mode": ep.mode,
                    "max_objects": ep.max_objects, "ablation": rp.ablation, "language": env.language}
            trainer = make_trainer(params, env, base_policy, encoder, offline, work, key=key,
                                   critic_state=critic_state, meta=meta, show_progress=show_progress)
            summary = trainer.run()
            trainer.save_outputs(work, summary)
        finally:
            env.close()
        metrics = {**summary, "suite": ep.suite, "task": task, "seconds": round(time.time() - t0, 1),
                   "offline_transitions": len(offline), "online_transitions": trainer.online_transitions}
        log_metrics({f"specialist/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
                   summary["env_steps"])
        return metrics

    return run_stage(STAGE, out_dir, used, inputs, build, resume=True, force=force)


def _check_same_encoder(critic_state: dict, encoder: StateEncoder, where: Path) -> None:
    other = StateEncoder.from_tensors(critic_state, str(where))
    if other.mean.shape != encoder.mean.shape or not (abs(other.mean - encoder.mean).max() < 1e-4 and abs(other.std - encoder.std).max() < 1e-4):
        raise PLDError(f"{where}: the critic was trained on another offline store (observation statistics differ). "
                       "Fix: rerun pretrain_critic on this offline store")
