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
    """``scripted[:noise=X][,idle=T1/T2...]``: noise on the executed xyz; ``idle`` lists tasks on which the controller
    holds still (a stand-in for a base that never learned those tasks: it never succeeds there)."""
    opts = {}
    if ":" in spec:
        for kv in spec.split(":", 1)[1].split(","):
            k, _, v = kv.partition("=")
            if k == "noise":
                try:
                    opts["noise"] = float(v)
                except ValueError:
                    raise PLDError(f"policy spec '{spec}': noise '{v}' is not a number. Fix: e.g. scripted:noise=0.3") from None
            elif k == "idle":
                try:
                    opts["idle"] = tuple(int(t) for t in v.split("/"))
                except ValueError:
                    raise PLDError(f"policy spec '{spec}': idle '{v}' is not a list of task indices. Fix: e.g. scripted:noise=0.3,idle=1/4") from None
            else:
                raise PLDError(f"policy spec '{spec}': unknown option '{k}'. Fix: use scripted, scripted:noise=0.3 or scripted:noise=0.3,idle=4")
    return opts


def is_scripted(spec: str) -> bool:
    return spec == "scripted" or spec.startswith("scripted:")


class EpisodeSeededExpert(ScriptedExpert):
    """The scripted expert whose noise stream restarts at every episode from (its seed, the episode's seed).

    An episode's actions then depend only on the episode (initial state, env seed), not on which
    episodes the same object played before: episodes can run in parallel worker processes, in any
    order, and give the same trajectories as one process playing them in turn.
    """

    def __init__(self, noise: float = 0.0, seed: int = 0, idle: tuple[int, ...] = ()):
        super().__init__(noise=noise, seed=seed)
        self.seed, self.idle, self.idle_now = int(seed), tuple(idle), False

    def reset(self, env: LiberoEnv) -> None:
        self.rng = np.random.default_rng([self.seed, int(getattr(env, "episode_seed", 0))])
        self.idle_now = env.task in self.idle
        super().reset(env)

    def act(self, obs: dict | None = None) -> np.ndarray:
        if self.idle_now:  # holds still with the gripper open: never succeeds on this task
            a = np.zeros(7, dtype=np.float32)
            a[6] = -1.0
            self.last_label = a.copy()
            return a
        return super().act(obs)


class PolicyFactory:
    """``factory(env) -> policy`` for a spec; picklable (worker processes build their own policy).

    A LeRobot checkpoint is loaded once per process and shared by every env of that process.
    """

    def __init__(self, spec: str, mode: str = "state", device: str = "cpu", seed: int = 0):
        self.spec, self.mode, self.device, self.seed = spec, mode, device, seed
        self._policy = None

    def __call__(self, env: LiberoEnv):
        if is_scripted(self.spec):
            return EpisodeSeededExpert(seed=self.seed + env.task, **parse_scripted(self.spec))
        from pld_core.base_server import remote_for

        remote = remote_for(self.spec)  # a worker whose pool serves this base in batches
        if remote is not None:
            return remote
        if self._policy is None:
            self._policy = LeRobotBase(self.spec, self.mode, env.env_state_dim, self.device)
        return self._policy

    def __getstate__(self):
        return {**self.__dict__, "_policy": None}


def make_policy_factory(spec: str, mode: str = "state", device: str = "cpu", seed: int = 0) -> PolicyFactory:
    """Return ``make(env) -> policy`` (picklable). Checkpoints are loaded (and validated) once, before any rollout."""
    return PolicyFactory(spec, mode=mode, device=device, seed=seed)


def served_base(params, factory: PolicyFactory) -> PolicyFactory | None:
    """What an :class:`~pld_core.parallel.EpisodePool` serves batched: with ``flywheel.batch_base`` one copy of
    the base, its calls batched across the pool's simulators; otherwise None (each worker loads its own)."""
    return factory if params.flywheel.batch_base else None


def validate_policy_spec(spec: str) -> None:
    if is_scripted(spec):
        parse_scripted(spec)
        return
    p = Path(spec)
    if not p.exists() and (spec.startswith((".", "/")) or spec.count("/") != 1):
        raise PLDError(f"policy '{spec}': no such checkpoint directory. Fix: pass 'scripted', a LeRobot pretrained_model directory, or a hub id (owner/name)")
