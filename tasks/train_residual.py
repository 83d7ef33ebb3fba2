"""Stage ``train_residual``: the PLD specialist (residual SAC on the frozen base), resumable.

Inputs: the base spec, the ``collect_offline`` output dir (offline successes; also the source of
the observation normaliser) and, unless ``residual.ablation: no_calql``, the ``pretrain_critic``
output dir (its critic and target warm-start SAC's; the actor starts at zero = the base).

Output ``<out>/`` (built in ``.tmp-<name>`` beside it, renamed into place when done):
``residual.safetensors`` + ``config.json`` (load with :func:`pld_core.specialist.load_residual`),
``curve.json`` + ``curve.png`` (eval success vs env steps), ``train_log.json`` (per episode),
``checkpoints/step_<N>/`` (SAC + optimizers + RNG, online replay, counters) and ``manifest.json``.
A killed run leaves ``.tmp-<name>``; rerunning with the same params and inputs resumes from its
newest checkpoint; other params or inputs start over. ``residual.mode: async`` (default) trains with
a learner process beside the simulator (:mod:`pld_core.actor_learner`); ``sync`` in one process,
bit-reproducible.

:func:`bench_specialist` runs the three Probe stages for one task and returns the benchmark fields.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from safetensors.torch import load_file

from pld_core.artifacts import (atomic_dir, digest_json, finish_manifest, is_fresh, read_manifest, require_manifest,
                                tmp_dir_for, write_json_atomic)
from pld_core.config import Params, validate_params
from pld_core.env import LiberoEnv, check_task
from pld_core.errors import PLDError
from pld_core.policies import make_policy_factory, validate_policy_spec
from pld_core.image_encoder import encoder_weights_identity
from pld_core.specialist import (StateEncoder, check_encoder, final_eval_episodes, make_encoder, make_trainer, mlflow_log,
                                 offline_buffer_from_store, set_torch_threads)
from tasks import collect_offline, pretrain_critic
from tasks.collect_offline import base_identity, base_key, env_key
from tasks.common import no_data_reason, record_no_data
from tasks.pretrain_critic import open_offline

STAGE = "train_residual"
RUN_KEY = "run_key"


def _residual_params(params: Params) -> dict:
    d = params.section_dict("residual")
    for speed_only in ("torch_threads", "learner_nice"):
        d.pop(speed_only, None)
    if d.get("image_encoder_weights"):
        d["image_encoder_weights"] = encoder_weights_identity(params)
    return d


def stage_key(params: Params, base: str, task: int, offline_manifest: dict, critic_manifest: dict | None) -> str:
    use_base = params.residual.ablation != "no_base"
    return digest_json({
        "stage": STAGE, "env": env_key(params, task), "residual": _residual_params(params),
        "sac": params.section_dict("sac"), "final_eval_episodes": final_eval_episodes(params),
        "offline": offline_manifest["output_digest"],
        "critic": critic_manifest["output_digest"] if critic_manifest else None,
        "base": base_key(base) if use_base else None,
    })


def run(params: Params, out_dir: Path, base: str, offline_dir: Path, critic_dir: Path | None = None,
        force: bool = False, show_progress: bool = True) -> dict:
    """Train (or resume, or skip) the specialist of the offline store's task; returns the manifest."""
    out_dir = Path(out_dir)
    rp, ep = params.residual, params.env
    check_encoder(rp.encoder, ep.mode)
    use_base = rp.ablation != "no_base"
    use_critic = rp.ablation != "no_calql"
    if use_base:
        validate_policy_spec(base)
    recorded = record_no_data(STAGE, out_dir, {"residual": _residual_params(params), "sac": params.section_dict("sac")},
                              ("offline", offline_dir, "offline store (stage collect_offline)"), force=force)
    if recorded:
        return recorded
    offline_manifest, store = open_offline(offline_dir, params)
    task = int(store.attrs.get("task", offline_manifest.get("metrics", {}).get("task", -1)))
    check_task(ep.suite, task)
    critic_manifest = None
    if use_critic:
        if critic_dir is None:
            raise PLDError("train_residual: no critic_init dir given. Fix: run pretrain_critic first, or set residual.ablation: no_calql")
        critic_manifest = require_manifest(critic_dir, "Cal-QL critic (stage pretrain_critic)")
    key = stage_key(params, base, task, offline_manifest, critic_manifest)
    if not force and is_fresh(out_dir, key):
        return read_manifest(out_dir)
    tmp = tmp_dir_for(out_dir)
    if tmp.exists() and ((tmp / RUN_KEY).read_text().strip() if (tmp / RUN_KEY).is_file() else None) != key:
        shutil.rmtree(tmp)  # an interrupted run with other params or inputs: start over
    set_torch_threads(rp.torch_threads)
    t0 = time.time()
    with atomic_dir(out_dir, resume=True) as work:
        (work / RUN_KEY).write_text(key)
        encoder = make_encoder(params, store)
        offline = offline_buffer_from_store(store, encoder, params.sac.gamma)
        critic_state = None
        if use_critic:
            critic_file = Path(critic_dir) / pretrain_critic.WEIGHTS
            if not critic_file.is_file():
                raise PLDError(f"{critic_file}: missing. Fix: rerun pretrain_critic (delete {critic_dir})")
            critic_state = load_file(str(critic_file))
            _check_same_encoder(critic_state, encoder, critic_file)
        env = LiberoEnv(ep.suite, task, mode=ep.mode, image_size=ep.image_size, max_objects=ep.max_objects)
        try:
            base_policy = make_policy_factory(base, mode=ep.mode, device=params.device, seed=rp.seed)(env) if use_base else None
            base_spec = str(Path(base).resolve()) if use_base and Path(base).exists() else base
            meta = {"base": base_spec if use_base else None, "suite": ep.suite, "task": task, "mode": ep.mode,
                    "max_objects": ep.max_objects, "ablation": rp.ablation, "language": env.language}
            trainer = make_trainer(params, env, base_policy, encoder, offline, work, key=key,
                                   critic_state=critic_state, meta=meta, show_progress=show_progress)
            summary = trainer.run()
            trainer.save_outputs(work, summary)
        finally:
            env.close()
        metrics = {**summary, "suite": ep.suite, "task": task, "seconds": round(time.time() - t0, 1),
                   "offline_transitions": len(offline), "online_transitions": trainer.online_transitions}
        mlflow_log({f"specialist/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
                   summary["env_steps"])
        return finish_manifest(
            work, STAGE, key,
            params={"env": env_key(params, task), "residual": _residual_params(params), "sac": params.section_dict("sac"),
                    "final_eval_episodes": final_eval_episodes(params)},
            inputs={"base": base_identity(base) if use_base else None,
                    "offline": {"dir": str(offline_dir), "output_digest": offline_manifest["output_digest"]},
                    "critic": {"dir": str(critic_dir), "output_digest": critic_manifest["output_digest"]} if critic_manifest else None},
            metrics=metrics, compute_seconds=time.time() - t0,
        )


def _check_same_encoder(critic_state: dict, encoder: StateEncoder, where: Path) -> None:
    other = StateEncoder.from_tensors(critic_state, str(where))
    if other.mean.shape != encoder.mean.shape or not (abs(other.mean - encoder.mean).max() < 1e-4 and abs(other.std - encoder.std).max() < 1e-4):
        raise PLDError(f"{where}: the critic was trained on another offline store (observation statistics differ). "
                       "Fix: rerun pretrain_critic on this offline store")


def bench_specialist(params: Params, suite: str, task: int, ablation: str = "none", out_dir: Path = Path("bench/results/specialist"),
                     base: str | None = None, show_progress: bool = True) -> dict:
    """Train one specialist (offline -> Cal-QL -> residual SAC) and return the benchmark fields.

    ``out_dir/offline`` and ``out_dir/critic_init`` do not depend on the ablation, so runs of
    several ablations into the same ``out_dir`` share them; each trains ``out_dir/residual-<ablation>``.
    ``base`` defaults to ``params.base.path``. Also writes ``out_dir/bench-<ablation>.json``.
    """
    raw = params.model_dump()
    raw["env"]["suite"] = suite
    raw["env"]["tasks"] = [int(task)]
    raw["residual"]["ablation"] = ablation
    raw["residual"]["final_eval_episodes"] = None  # the bench's number: evaluate.episodes (50) initial states
    params = validate_params(raw, source="bench specialist")
    check_task(suite, task)
    base = base or params.base.path
    if not base:
        raise PLDError("bench specialist: no base policy. Fix: set base.path in params.yaml (a LeRobot checkpoint dir, "
                       "or 'scripted:noise=0.5' as a stand-in), e.g. --set base.path=data/iter_0/base")
    out_dir = Path(out_dir)
    t0 = time.time()
    offline_dir, critic_dir = out_dir / "offline", out_dir / "critic_init"
    off = collect_offline.run(params, offline_dir, base, task, show_progress=show_progress)
    reason = no_data_reason(off)
    if reason:
        raise PLDError(f"bench specialist: {suite} task {task}: {reason}; there is nothing to train a specialist from. "
                       "Fix: raise offline.max_episodes (--set offline.max_episodes=200) or use a base that sometimes succeeds")
    crit = pretrain_critic.run(params, critic_dir, offline_dir, show_progress=show_progress) if ablation != "no_calql" else None
    res = run(params, out_dir / f"residual-{ablation}", base, offline_dir, critic_dir if crit else None, show_progress=show_progress)
    m = res["metrics"]
    curve = json.loads((out_dir / f"residual-{ablation}" / "curve.json").read_text())["points"]
    result = {
        "suite": suite, "task": int(task), "ablation": ablation, "base": base,
        "steps_to_95": m["steps_to_95"], "final_success_rate": m["final_success_rate"], "ci95": m["ci95"],
        "env_steps": m["env_steps"], "stopped_early": m.get("stopped_early", False), "base_success_rate": m["base_success_rate"],
        "offline_base_success_rate": off["metrics"]["base_success_rate"],
        "env_steps_per_s": m["env_steps_per_s"],
        "curve": [{k: p[k] for k in ("env_steps", "success_rate", "ci95", "episodes")} for p in curve],
        "seconds": round(time.time() - t0, 1),
        "stage_seconds": {"collect_offline": off["metrics"]["seconds"], "pretrain_critic": crit["metrics"]["seconds"] if crit else 0.0,
                          "train_residual": m["seconds"]},
        "out_dir": str(out_dir / f"residual-{ablation}"),
    }
    write_json_atomic(out_dir / f"bench-{ablation}.json", result)
    return result
