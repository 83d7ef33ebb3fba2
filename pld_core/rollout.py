"""Rollouts of a policy in a LIBERO environment, recorded as trajectory-store episodes.

A policy here is anything with ``reset(env)`` and ``act(obs) -> action (7,)``: the scripted
expert, a LeRobot base policy (through :class:`pld_core.policies.LeRobotBase`), or base + residual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

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


# ----------------------------------------------------------------------------- base, then base + residual
class HybridPolicy(Protocol):
    """What :func:`prefixed_steps` drives: the base and the residual on top of it (e.g.
    :class:`pld_core.residual_policy.ResidualPolicy`)."""

    def reset(self, env: LiberoEnv) -> None: ...

    def base_act(self, obs: dict) -> np.ndarray: ...

    def residual_action(self, obs: dict, base_action: np.ndarray) -> np.ndarray: ...


@dataclass
class Step:
    """One env step of :func:`prefixed_steps`. ``prefix``: the base acted alone (``action`` is ``base_action``);
    ``next_base_action``: the base's action at ``next_obs`` (at a terminal state, where the TD target masks it,
    the base is not asked and it repeats ``base_action``)."""

    t: int
    obs: dict
    base_action: np.ndarray
    action: np.ndarray
    prefix: bool
    next_obs: dict
    reward: float
    terminated: bool
    truncated: bool
    next_base_action: np.ndarray


def prefixed_steps(env: LiberoEnv, policy: HybridPolicy, init_state: int, seed: int, prefix: int | float) -> Iterator[Step]:
    """The base alone for the first ``prefix`` steps, then base + residual, to the end of the episode (or until
    the caller stops iterating). The one loop behind base-policy probing (the specialist's training episodes,
    ``prefix`` ~ U{0..probe_max}, ``inf`` in warm-up), hybrid collection (``prefix = T_base``) and the benchmarks.
    The base is asked once per state, in order (LeRobot bases keep an action-chunk queue)."""
    obs = env.reset(init_state, seed=seed)
    policy.reset(env)
    base_action = policy.base_act(obs)
    t = 0
    while True:
        in_prefix = t < prefix
        action = base_action if in_prefix else policy.residual_action(obs, base_action)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        next_base = policy.base_act(next_obs) if not terminated else base_action
        yield Step(t, obs, base_action, action, in_prefix, next_obs, reward, terminated, truncated, next_base)
        t += 1
        if terminated or truncated:
            return
        obs, base_action = next_obs, next_base

