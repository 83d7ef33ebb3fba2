"""Stage `collect_pld` (PLD "Learn"): hybrid rollouts of base then base + residual; successes kept.

Each episode draws ``T_base ~ U{0, ..., floor(alpha * T_max)}``. For the first ``T_base`` steps the
frozen base acts alone and the SFT label is the base action; from then on the specialist acts,
executing ``clip(a_b + xi * delta)``, and the label is that executed action. Only successful
episodes enter ``pld.zarr``, each with its ``t_base``, seed and initial state. A few pure
specialist rollouts (``T_base = 0``) also go to ``specialist_rollouts.zarr`` for the trajectory
figure; they are not part of the dataset.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.progress import Progress

from pld_core.config import Params
from pld_core.demos import open_or_create
from pld_core.env import LiberoEnv
from pld_core.errors import PLDError
from pld_core.policies import make_policy_factory
from pld_core.rollout import EpisodeRecorder
from pld_core.specialist import load_residual
from pld_core.stats import success_summary
from tasks.common import input_digests, run_stage

SPECIALIST_ROLLOUTS = 4


def hybrid_episode(env: LiberoEnv, policy, init_state: int, seed: int, t_base: int, gamma: float):
    """One hybrid episode. Returns (success, Episode)."""
    obs = env.reset(init_state, seed=seed)
    policy.reset(env)
    rec = EpisodeRecorder()
    while True:
        base_action = policy.base_act(obs)
        if env.t < t_base:
            action = label = base_action  # probing: the base acts, the label is its action
        else:
            action = policy.residual_action(obs, base_action)
            label = action  # takeover: the label is the executed action
        next_obs, reward, terminated, truncated, _ = env.step(action)
        rec.add(obs, base_action, action, label, reward, terminated)
        obs = next_obs
        if terminated or truncated:
            break
    final_base = base_action if terminated else policy.base_act(obs)
    ep = rec.finish(final_base, gamma, task_index=env.task, init_state=init_state, seed=seed, success=bool(terminated), t_base=int(t_base))
    return bool(terminated), ep


def run(params: Params, out_dir: Path, base: str, task: int, residual_dir: Path, base_digest: str | None = None, force: bool = False,
        show_progress: bool = True) -> dict:
    e, c = params.env, params.collect
    used = {"env": {"suite": e.suite, "task": task, "mode": e.mode, "image_size": e.image_size, "max_objects": e.max_objects},
            "collect": params.section_dict("collect"), "gamma": params.sac.gamma, "base": base_digest or base, "seed": params.flywheel.seed}

    def build(tmp: Path) -> dict:
        env = LiberoEnv(e.suite, task, mode=e.mode, image_size=e.image_size, max_objects=e.max_objects)
        policy = load_residual(residual_dir, base=None, device=params.device)
        policy.make_base = make_policy_factory(base, mode=e.mode, device=params.device, seed=params.flywheel.seed)
        rng = np.random.default_rng([params.flywheel.seed, task, 17])
        t_max = int(c.alpha * env.max_steps)
        store = open_or_create(tmp / "pld.zarr", env, {"source": "pld", "alpha": c.alpha, "task": task})
        outcomes, kept_t_base = [], []
        with Progress(transient=True, disable=not show_progress) as progress:
            bar = progress.add_task(f"collect_pld {e.suite}/{task}", total=c.episodes_per_task)
            attempt = 0
            while len(kept_t_base) < c.episodes_per_task and attempt < c.max_episodes:
                t_base = int(rng.integers(0, t_max + 1))
                init = attempt % env.n_init_states
                ok, ep = hybrid_episode(env, policy, init, seed=params.flywheel.seed * 100_000 + attempt, t_base=t_base, gamma=params.sac.gamma)
                attempt += 1
                outcomes.append(ok)
                if ok:
                    store.append([ep])
                    kept_t_base.append(t_base)
                    progress.advance(bar)
        if not kept_t_base:
            raise PLDError(f"collect_pld: no successful hybrid episode on {e.suite} task {task} in {attempt} attempts. "
                           f"Fix: train the specialist longer (residual.env_steps) or raise collect.max_episodes")
        spec = open_or_create(tmp / "specialist_rollouts.zarr", env, {"source": "specialist", "task": task})
        for i in range(SPECIALIST_ROLLOUTS):
            _, ep = hybrid_episode(env, policy, i % env.n_init_states, seed=10_000 + i, t_base=0, gamma=params.sac.gamma)
            spec.append([ep])
        env.close()
        s = success_summary(outcomes)
        return {"task": task, "episodes": len(kept_t_base), "attempts": attempt, "hybrid_success_rate": s["success_rate"],
                "hybrid_ci95": s["ci95"], "mean_t_base": float(np.mean(kept_t_base)), "steps": store.n_steps}

    inputs = input_digests(residual=residual_dir)
    return run_stage("collect_pld", out_dir, used, inputs, build, force=force)
