"""The learning half of the specialist, one object for both modes: the SAC networks and optimizers, the online
replay, the offline buffer and the RNG that samples them.

``residual.mode: sync`` holds it in the trainer's process (:class:`pld_core.trainer.SpecialistTrainer`);
``async`` holds it in the learner process (:mod:`pld_core.actor_learner`). Either way an update is
:meth:`Learner.update` (an RLPD batch, ``offline_fraction`` of it offline, then ``ResidualSAC.update``) and a
checkpoint is :meth:`Learner.save` / :meth:`Learner.load`: ``sac.safetensors`` (networks, optimizer moments,
the torch RNG) and ``replay.npz`` (the online replay; read with ``allow_pickle=False``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pld_core.encoders import StateEncoder
from pld_core.features import ACT_DIM
from pld_core.replay import ReplayBuffer, sample_mixed, to_torch
from pld_core.sac import ResidualSAC
from pld_core.store import TrajectoryStore

SAC_FILE = "sac.safetensors"
REPLAY_FILE = "replay.npz"


class Learner:
    """``offline`` None: online batches only (the ``no_offline`` ablation)."""

    def __init__(self, sac: ResidualSAC, online: ReplayBuffer, offline: ReplayBuffer | None, rng: np.random.Generator,
                 batch_size: int, offline_fraction: float):
        self.sac, self.online, self.offline, self.rng = sac, online, offline, rng
        self.batch_size, self.offline_fraction = batch_size, offline_fraction

    def has_data(self) -> bool:
        return len(self.online) > 0 or (self.offline is not None and len(self.offline) > 0)

    def sample_batch(self) -> dict[str, torch.Tensor]:
        """RLPD batch: ``offline_fraction`` from the offline buffer, the rest online."""
        n_step, device = self.sac.cfg.n_step, self.sac.device
        if self.offline is not None:
            return sample_mixed(self.offline, self.online, self.batch_size, self.rng, self.offline_fraction, device, n_step)
        return to_torch(self.online.sample(self.batch_size, self.rng, n_step), device)

    def update(self, step: int) -> dict[str, float]:
        """One SAC update (critic; actor and temperature every ``critic_actor_ratio``-th ``step``)."""
        return self.sac.update(self.sample_batch(), step)

    def save(self, path: Path) -> None:
        state = self.sac.state_dict()
        state["rng.torch"] = torch.get_rng_state()
        save_file({k: v.contiguous() for k, v in state.items()}, str(Path(path) / SAC_FILE))
        with open(Path(path) / REPLAY_FILE, "wb") as fh:
            np.savez(fh, **self.online.state_dict())

    def load(self, path: Path) -> None:
        state = load_file(str(Path(path) / SAC_FILE))
        torch_rng = state.pop("rng.torch", None)
        self.sac.load_state_dict(state)
        if torch_rng is not None:
            torch.set_rng_state(torch_rng)
        with np.load(Path(path) / REPLAY_FILE, allow_pickle=False) as z:
            self.online.load_state_dict({k: z[k] for k in z.files})


def offline_buffer_from_store(store: TrajectoryStore, encoder: StateEncoder, gamma: float) -> ReplayBuffer:
    """The offline buffer: every stored episode, obs normalised, T transitions + 1 final row.

    The store keeps no observation after the last step. A successful episode ends in a terminal
    state (bootstrap masked by done), so its final row repeats the last observation with the
    stored next base action. An episode that did not end in ``done`` loses its last transition
    (its next observation is unknown).
    """
    names = [*encoder.store_keys, "base_action", "action", "reward", "done", "mc_return", "next_base_action"]
    steps = store.load(names)
    x = encoder.normalize(encoder.raw_rows(steps))
    ends = store.episode_ends
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    # mc_return in the store was computed with the collecting stage's gamma
    same_gamma = math.isclose(float(store.attrs.get("gamma", -1.0)), gamma, rel_tol=0, abs_tol=1e-9)
    buf = ReplayBuffer(max(2, int(ends[-1]) + len(ends) + 1) if len(ends) else 2, encoder.dim, ACT_DIM, gamma)
    for s, e in zip(starts, ends):
        s, e = int(s), int(e)
        if steps["done"][e - 1]:
            obs = np.concatenate([x[s:e], x[e - 1:e]])
            base = np.concatenate([steps["base_action"][s:e], steps["next_base_action"][e - 1:e]])
            sl = slice(s, e)
        else:
            if e - s < 2:
                continue
            obs, base, sl = x[s:e], steps["base_action"][s:e], slice(s, e - 1)
        buf.add_episode(obs, base, steps["action"][sl], steps["reward"][sl], steps["done"][sl],
                        steps["mc_return"][sl] if same_gamma and steps["done"][e - 1] else None)
    return buf


def set_torch_threads(threads: int | None) -> None:
    """Small MLPs on a shared CPU run fastest on one thread (42 ms vs 220 ms per update on 2 busy cores)."""
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
