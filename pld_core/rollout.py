"""Rollouts of a policy in a LIBERO environment, recorded as trajectory-store episodes.

A policy here is anything with ``reset(env)`` and ``act(obs) -> action (7,)``: the scripted
expert, a LeRobot base policy (through :class:`pld_core.policies.LeRobotBase`), or base + residual.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from pld_core.env import LiberoEnv
from pld_core.features import store_key
from pld_core.store import Episode, mc_returns


class Policy(Protocol):
    def reset(self, env: LiberoEnv) -> None: ...

    def act(self, obs: dict) -> np.ndarray: ...


class EpisodeRecorder:
    """Collects per-step arrays of one episode in the store's layout."""

    def __init__(self):
        self.obs: dict[str, list] = {}
        self.cols: dict[str, list] = {k: [] for k in ("base_action", "action", "label_action", "reward", "done")}

    def add(self, obs: dict, base_action, action, label_action, reward: float, done: bool) -> None:
        for k, v in obs.items():
            self.obs.setdefault(store_key(k), []).append(v)
        self.cols["base_action"].append(base_action)
        self.cols["action"].append(action)
        self.cols["label_action"].append(label_action)
        self.cols["reward"].append(reward)
        self.cols["done"].append(done)

    def __len__(self) -> int:
        return len(self.cols["action"])

    def finish(self, final_base_action, gamma: float, **meta) -> Episode:
        """``final_base_action``: the base action at the state after the last step (TD target)."""
        steps = {k: np.asarray(v) for k, v in self.obs.items()}
        for k, v in self.cols.items():
            steps[k] = np.asarray(v, dtype=np.float32 if k != "done" else bool)
        base = steps["base_action"]
        steps["next_base_action"] = np.concatenate([base[1:], np.asarray(final_base_action, dtype=np.float32)[None]])
        steps["mc_return"] = mc_returns(steps["reward"], gamma)
        return Episode(steps=steps, **meta)


def run_episode(env: LiberoEnv, policy: Policy, init_state: int, seed: int = 0, record: bool = False, gamma: float = 0.99,
                clean_labels: bool = False):
    """Roll ``policy`` out once from a fixed initial state. Returns (success, length, Episode | None).

    ``clean_labels``: label each step with the policy's ``last_label`` (the scripted expert's action
    before its DART perturbation) instead of the executed action; used for demonstrations.
    """
    obs = env.reset(init_state, seed=seed)
    policy.reset(env)
    rec = EpisodeRecorder() if record else None
    success = False
    while True:
        action = np.asarray(policy.act(obs), dtype=np.float32)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        if rec is not None:
            label = np.asarray(policy.last_label if clean_labels else action, dtype=np.float32)
            rec.add(obs, action, action, label, reward, terminated)
        obs = next_obs
        if terminated or truncated:
            success = terminated
            break
    episode = None
    if rec is not None:
        # successful episodes end in a terminal state (bootstrap masked); for a truncated one the
        # base action at the final state is asked of the policy, as the TD target needs it
        final = action if success else np.asarray(policy.act(obs), dtype=np.float32)
        episode = rec.finish(final, gamma, task_index=env.task, init_state=init_state, seed=seed, success=success, t_base=-1)
    return success, env.t, episode
