"""Stage `collect_pld` (PLD "Learn"): hybrid rollouts of base then base + residual; successes kept
(every episode with ``flywheel.keep_failures``, a plumbing check).

Each episode draws ``T_base ~ U{0, ..., floor(alpha * T_max)}``. For the first ``T_base`` steps the
frozen base acts alone and the SFT label is the base action; from then on the specialist acts,
executing ``clip(a_b + xi * delta)``, and the label is that executed action. Only successful
episodes enter ``pld.zarr``, each with its ``t_base``, seed and initial state. No success in
``collect.max_episodes`` attempts, or no specialist (its base never succeeded), is recorded as
``metrics.no_data`` with the reason; ``convert_dataset`` leaves such a task out. A few pure
specialist rollouts (``T_base = 0``) also go to ``specialist_rollouts.zarr`` for the trajectory
figure; they are not part of the dataset. ``flywheel.collect_workers`` simulators play the episodes
at once (:class:`pld_core.parallel.EpisodePool`); the kept episodes do not depend on it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.progress import Progress

from pld_core.config import Params
from pld_core.demos import open_or_create
from pld_core.env import EnvSpec, LiberoEnv
from pld_core.layout import PLD_STORE, BaseRef
from pld_core.policies import make_policy_factory, served_base
from pld_core.parallel import EpisodePool
from pld_core.rollout import EpisodeRecorder, prefixed_steps
from pld_core.residual_policy import load_residual
from pld_core.stats import success_summary
from pld_core.stage import input_digests, record_no_data, run_stage

SPECIALIST_ROLLOUTS = 4


def hybrid_episode(env: LiberoEnv, policy, init_state: int, seed: int, t_base: int, gamma: float):
    """One hybrid episode: the base for ``t_base`` steps (label: its action), then the specialist (label: the
    executed action). Returns (success, Episode)."""
    rec = EpisodeRecorder()
    for s in prefixed_steps(env, policy, init_state, seed, prefix=t_base):
        rec.add(s.obs, s.base_action, s.action, s.action, s.reward, s.terminated)  # in the prefix, action = base action
    ep = rec.finish(s.next_base_action, gamma, task_index=env.task, init_state=init_state, seed=seed, success=bool(s.terminated),
                    t_base=int(t_base))
    return bool(s.terminated), ep


class HybridPolicyFactory:
    """``factory(env) -> ResidualPolicy`` (the specialist on its base); picklable for worker processes."""

    def __init__(self, residual_dir: Path, base: str, mode: str, device: str, seed: int):
        self.residual_dir, self.base, self.mode, self.device, self.seed = Path(residual_dir), base, mode, device, seed

    def __call__(self, env: LiberoEnv):
        policy = load_residual(self.residual_dir, base=None, device=self.device)
        policy.make_base = make_policy_factory(self.base, mode=self.mode, device=self.device, seed=self.seed)
        return policy


def hybrid_job(env: LiberoEnv, policy, init_state: int, seed: int, t_base: int, gamma: float):
    return hybrid_episode(env, policy, init_state, seed=seed, t_base=t_base, gamma=gamma)


def run(params: Params, out_dir: Path, base: BaseRef, task: int, residual_dir: Path, force: bool = False,
        show_progress: bool = True) -> dict:
    e, c = params.env, params.collect
    used = {"env": {"suite": e.suite, "task": task, "mode": e.mode, "image_size": e.image_size, "max_objects": e.max_objects},
            "collect": params.section_dict("collect"), "gamma": params.sac.gamma, "seed": params.flywheel.seed}
    keep_failures = params.flywheel.keep_failures
    if keep_failures:  # only when set: the keys of data dirs made without it stay valid
        used["keep_failures"] = True

    def build(tmp: Path) -> dict:
        spec = EnvSpec(e.suite, task, mode=e.mode, image_size=e.image_size, max_objects=e.max_objects)
        load_residual(residual_dir, base=None, device=params.device)  # fail here, not in a worker, on a bad specialist
        factory = HybridPolicyFactory(residual_dir, base.spec, e.mode, params.device, params.flywheel.seed)
        rng = np.random.default_rng([params.flywheel.seed, task, 17])
        t_max = int(c.alpha * spec.max_steps)
        n_init = spec.n_init_states
        gamma = params.sac.gamma
        store = open_or_create(tmp / PLD_STORE, spec, {"source": "pld", "alpha": c.alpha, "task": task})
        outcomes, kept_t_base = [], []

        def jobs():
            # attempt a: T_base is the a-th draw of rng, initial state a mod n, seed seed * 100_000 + a
            for attempt in range(c.max_episodes):
                t_base = int(rng.integers(0, t_max + 1))
                yield task, (attempt % n_init, params.flywheel.seed * 100_000 + attempt, t_base, gamma)

        served = served_base(params, make_policy_factory(base.spec, mode=e.mode, device=params.device))
        with EpisodePool(spec, factory, params.flywheel.collect_workers, serve_base=served) as pool, \
                Progress(transient=True, disable=not show_progress) as progress:
            bar = progress.add_task(f"collect_pld {e.suite}/{task}", total=c.episodes_per_task)
            attempt = 0
            if c.episodes_per_task > 0:
                for ok, ep in pool.imap(hybrid_job, jobs()):
                    attempt += 1
                    outcomes.append(ok)
                    if ok or keep_failures:
                        store.append([ep])
                        kept_t_base.append(int(ep.t_base))
                        progress.advance(bar)
                    if len(kept_t_base) >= c.episodes_per_task:
                        break
            if not kept_t_base:  # an outcome, not an error: the task adds no PLD data this iteration
                s = success_summary(outcomes)
                return {"task": task, "episodes": 0, "attempts": attempt, "hybrid_success_rate": s["success_rate"],
                        "hybrid_ci95": s["ci95"], "steps": 0, "no_data": True,
                        "reason": f"collect_pld: no successful hybrid episode in {attempt} attempts (collect.max_episodes)"}
            spec_store = open_or_create(tmp / "specialist_rollouts.zarr", spec, {"source": "specialist", "task": task})
            rollouts = ((task, (i % n_init, 10_000 + i, 0, gamma)) for i in range(SPECIALIST_ROLLOUTS))
            for _, ep in pool.imap(hybrid_job, rollouts):
                spec_store.append([ep])
        s = success_summary(outcomes)
        return {"task": task, "episodes": len(kept_t_base), "attempts": attempt, "hybrid_success_rate": s["success_rate"],
                "hybrid_ci95": s["ci95"], "mean_t_base": float(np.mean(kept_t_base)), "steps": store.n_steps}

    recorded = record_no_data("collect_pld", out_dir, used, ("residual", residual_dir, "specialist (stage train_residual)"), force=force)
    if recorded:
        return recorded
    return run_stage("collect_pld", out_dir, used, {**input_digests(residual=residual_dir), "base": base.digest}, build, force=force)
