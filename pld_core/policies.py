"""Policy specs as users write them (``scripted``, ``scripted:noise=0.3``, a checkpoint dir, a hub id)
turned into objects with ``reset(env)`` and ``act(obs)``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pld_core.env import LiberoEnv
from pld_core.errors import PLDError
from pld_core.scripted import ScriptedExpert


class LeRobotBase:
    """A frozen LeRobot policy (any type) behind the rollout protocol."""

    def __init__(self, path: str, mode: str, env_state_dim: int | None, device: str = "cpu"):
        from pld_core.base_policy import BasePolicy

        self.policy = BasePolicy.load(path, obs_mode=mode, env_state_dim=env_state_dim, device=device)

    def reset(self, env: LiberoEnv) -> None:
        self.policy.reset(env.language)

    def act(self, obs: dict) -> np.ndarray:
        return self.policy.act(obs)


def parse_scripted(spec: str) -> dict:
    opts = {}
    if ":" in spec:
        for kv in spec.split(":", 1)[1].split(","):
            k, _, v = kv.partition("=")
            if k != "noise":
                raise PLDError(f"policy spec '{spec}': unknown option '{k}'. Fix: use scripted or scripted:noise=0.3")
            try:
                opts["noise"] = float(v)
            except ValueError:
                raise PLDError(f"policy spec '{spec}': noise '{v}' is not a number. Fix: e.g. scripted:noise=0.3") from None
    return opts


def is_scripted(spec: str) -> bool:
    return spec == "scripted" or spec.startswith("scripted:")


def make_policy_factory(spec: str, mode: str = "state", device: str = "cpu", seed: int = 0):
    """Return ``make(env) -> policy``. Checkpoints are loaded (and validated) once, before any rollout."""
    if is_scripted(spec):
        opts = parse_scripted(spec)
        return lambda env: ScriptedExpert(seed=seed + env.task, **opts)
    cache: dict = {}

    def make(env: LiberoEnv):
        if "policy" not in cache:
            cache["policy"] = LeRobotBase(spec, mode, env.env_state_dim, device)
        return cache["policy"]

    return make


def validate_policy_spec(spec: str) -> None:
    if is_scripted(spec):
        parse_scripted(spec)
        return
    p = Path(spec)
    if not p.exists() and (spec.startswith((".", "/")) or spec.count("/") != 1):
        raise PLDError(f"policy '{spec}': no such checkpoint directory. Fix: pass 'scripted', a LeRobot pretrained_model directory, or a hub id (owner/name)")
