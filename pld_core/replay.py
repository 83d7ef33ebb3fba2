"""Memory-frugal ring replay buffer for the PLD specialist, and RLPD-style mixed sampling.

Layout: one row per *observation*. An episode of T transitions writes T+1 consecutive rows
(ring order); row t holds obs_t and the base action at obs_t, and, for t < T, the transition
fields (executed action, reward, done, mc_return). The next observation and the next base
action of the transition at row i are simply row i+1, so nothing is stored twice.

``valid[i]`` is True exactly when row i is a transition whose successor row (i+1 mod capacity)
is the next observation of the same episode. Writing a row at position p clears ``valid[p]``:
the old row p pointed at the old row p+1, which now follows a different row. ``valid[p-1]`` is
set only by ``add_step`` / ``add_episode`` when row p continues the same episode. Hence
overwriting the oldest rows can never yield a sample whose next row belongs to another episode.
"""

from __future__ import annotations

import numpy as np
import torch

from pld_core.errors import PLDError
from pld_core.store import mc_returns  # noqa: F401  (re-exported: Cal-QL's Monte-Carlo return)

_ROW_FIELDS = ("obs", "base_action", "action", "reward", "done", "mc_return", "valid")
_INT_FIELDS = ("capacity", "obs_dim", "act_dim", "ptr", "size", "ep_start", "ep_len")


class ReplayBuffer:
    """Fixed-capacity ring of per-episode rows; see the module docstring for the layout."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, gamma: float = 0.99):
        if capacity < 2:
            raise PLDError(f"ReplayBuffer capacity must be >= 2, got {capacity}; raise it.")
        self.capacity = int(capacity)
        self.obs_dim = int(obs_dim)
        self.act_dim = int(act_dim)
        self.gamma = float(gamma)  # only used to fill mc_return of online episodes
        self.obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.base_action = np.zeros((capacity, act_dim), dtype=np.float32)
        self.action = np.zeros((capacity, act_dim), dtype=np.float32)
        self.reward = np.zeros(capacity, dtype=np.float32)
        self.done = np.zeros(capacity, dtype=np.float32)
        self.mc_return = np.full(capacity, np.nan, dtype=np.float32)
        self.valid = np.zeros(capacity, dtype=bool)
        self.ptr = 0  # next row to write
        self.size = 0  # rows written so far, capped at capacity
        self.ep_start = 0  # first row of the open online episode
        self.ep_len = -1  # transitions in the open online episode; -1 = no episode open

    # ------------------------------------------------------------------ writing
    def _write_row(self, obs: np.ndarray, base_action: np.ndarray) -> int:
        """Write an observation row at ``ptr``; invalidate the rows that pointed into it."""
        p = self.ptr
        self.valid[p] = False
        self.valid[(p - 1) % self.capacity] = False  # defensive: p-1 is the last row written
        self.obs[p] = obs
        self.base_action[p] = base_action
        self.action[p] = 0.0
        self.reward[p] = 0.0
        self.done[p] = 0.0
        self.mc_return[p] = np.nan
        self.ptr = (p + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)
        return p

    def start_episode(self, obs: np.ndarray, base_action: np.ndarray) -> None:
        """Open an online episode with its first observation (closes any open one)."""
        self.end_episode()
        self.ep_start = self._write_row(obs, base_action)
        self.ep_len = 0

    def add_step(
        self,
        action: np.ndarray,
        reward: float,
        done: float,
        next_obs: np.ndarray,
        next_base_action: np.ndarray,
    ) -> None:
        """Record one transition of the open episode; a terminal ``done`` closes it."""
        if self.ep_len < 0:
            raise RuntimeError("ReplayBuffer.add_step called with no open episode; call start_episode first.")
        prev = (self.ptr - 1) % self.capacity
        self.action[prev] = action
        self.reward[prev] = reward
        self.done[prev] = done
        self._write_row(next_obs, next_base_action)
        self.valid[prev] = True  # its successor is now the next obs of the same episode
        self.ep_len += 1
        if done:
            self.end_episode()

    def end_episode(self) -> None:
        """Close the open episode (if any) and fill its transitions' Monte-Carlo returns."""
        if self.ep_len > 0:
            # Rows overwritten by a longer-than-capacity episode are gone; reward-to-go of the
            # surviving (later) rows only needs the rewards after them, which survive too.
            n = min(self.ep_len, self.capacity - 1)
            rows = (self.ep_start + self.ep_len - n + np.arange(n)) % self.capacity
            self.mc_return[rows] = mc_returns(self.reward[rows], self.gamma)
        self.ep_len = -1

    def add_episode(
        self,
        obs: np.ndarray,
        base_action: np.ndarray,
        action: np.ndarray,
        reward: np.ndarray,
        done: np.ndarray,
        mc_return: np.ndarray | None = None,
    ) -> None:
        """Bulk-load one episode: obs/base_action have T+1 rows, the rest T (offline data).

        ``mc_return=None`` computes it from ``reward`` with the buffer's ``gamma``.
        """
        obs = np.asarray(obs, dtype=np.float32)
        base_action = np.asarray(base_action, dtype=np.float32)
        action = np.asarray(action, dtype=np.float32)
        reward = np.asarray(reward, dtype=np.float32).reshape(-1)
        done = np.asarray(done, dtype=np.float32).reshape(-1)
        T = len(reward)
        expected = {
            "obs": (obs.shape, (T + 1, self.obs_dim)),
            "base_action": (base_action.shape, (T + 1, self.act_dim)),
            "action": (action.shape, (T, self.act_dim)),
            "done": (done.shape, (T,)),
        }
        for key, (got, want) in expected.items():
            if tuple(got) != want:
                raise PLDError(
                    f"add_episode: '{key}' has shape {tuple(got)}, expected {want} "
                    f"(T={T} transitions need T+1 observation rows); fix the episode arrays."
                )
        if mc_return is None:
            mc_return = mc_returns(reward, self.gamma)
        mc_return = np.asarray(mc_return, dtype=np.float32).reshape(-1)
        if mc_return.shape != (T,):
            raise PLDError(f"add_episode: 'mc_return' has shape {mc_return.shape}, expected ({T},).")
        if T + 1 > self.capacity:
            raise PLDError(
                f"add_episode: episode of {T + 1} rows does not fit a buffer of capacity "
                f"{self.capacity}; raise the replay capacity."
            )
        self.end_episode()
        idx = (self.ptr + np.arange(T + 1)) % self.capacity
        self.valid[idx] = False
        self.valid[(self.ptr - 1) % self.capacity] = False
        self.obs[idx] = obs
        self.base_action[idx] = base_action
        self.action[idx[:T]] = action
        self.reward[idx[:T]] = reward
        self.done[idx[:T]] = done
        self.mc_return[idx[:T]] = mc_return
        last = idx[T]
        self.action[last] = 0.0
        self.reward[last] = 0.0
        self.done[last] = 0.0
        self.mc_return[last] = np.nan
        self.valid[idx[:T]] = True
        self.ptr = int((self.ptr + T + 1) % self.capacity)
        self.size = min(self.size + T + 1, self.capacity)

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        """Number of sampleable transitions."""
        return int(self.valid.sum())

    @property
    def nbytes(self) -> int:
        """Bytes held by the row arrays."""
        return sum(getattr(self, name).nbytes for name in _ROW_FIELDS)

    def sample(self, batch_size: int, rng: np.random.Generator, n_step: int = 1) -> dict[str, np.ndarray]:
        """Uniformly sample transitions (with replacement); next fields come from row i+1.

        ``n_step > 1``: each sample's reward is the discounted sum of up to n rewards of its own
        episode, r_i + gamma r_{i+1} + ... (stopping at a terminal step or the episode's last row),
        its next fields come from the row m steps on (m <= n), and ``discount`` = gamma^m is what
        the TD target multiplies the bootstrap by. n_step=1 gives the one-step batch (no
        ``discount`` key: the learner's gamma applies).
        """
        candidates = np.flatnonzero(self.valid)
        if len(candidates) == 0:
            raise RuntimeError("ReplayBuffer.sample called on a buffer with no transitions.")
        i = candidates[rng.integers(0, len(candidates), size=batch_size)]
        out = {"obs": self.obs[i], "base_action": self.base_action[i], "action": self.action[i], "mc_return": self.mc_return[i]}
        if n_step <= 1:
            j = (i + 1) % self.capacity
            out.update(reward=self.reward[i], done=self.done[i], next_obs=self.obs[j], next_base_action=self.base_action[j])
            return out
        ret = np.zeros(batch_size, dtype=np.float32)
        done = np.zeros(batch_size, dtype=np.float32)
        m = np.zeros(batch_size, dtype=np.int64)
        active = np.ones(batch_size, dtype=bool)  # row i+k is a transition of the sample's episode
        for k in range(n_step):
            rows = (i + k) % self.capacity
            ret += np.where(active, self.gamma ** k * self.reward[rows], 0.0).astype(np.float32)
            m += active
            ended = active & (self.done[rows] > 0)
            done[ended] = 1.0
            # continue only within the episode: not terminal, and row i+k+1 is itself a transition
            active = active & ~ended & self.valid[(rows + 1) % self.capacity]
        j = (i + m) % self.capacity
        out.update(reward=ret, done=done, next_obs=self.obs[j], next_base_action=self.base_action[j],
                   discount=(self.gamma ** m).astype(np.float32))
        return out

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, np.ndarray | int]:
        """Plain numpy arrays and ints only: safe for ``np.savez`` / safetensors (no pickle).

        Rows are saved whole (not trimmed to ``size``) so the ring positions survive; the
        arrays are the live buffers (no copy), so save them before writing more rows.
        """
        state: dict[str, np.ndarray | int] = {name: getattr(self, name) for name in _ROW_FIELDS}
        state.update({name: int(getattr(self, name)) for name in _INT_FIELDS})
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict` output (values may be 0-d arrays after np.load)."""
        missing = [k for k in _ROW_FIELDS + _INT_FIELDS if k not in state]
        if missing:
            raise PLDError(f"replay state is missing keys {missing}; the buffer file is corrupt or from another version.")
        dims = tuple(int(state[k]) for k in ("capacity", "obs_dim", "act_dim"))
        if dims != (self.capacity, self.obs_dim, self.act_dim):
            raise PLDError(
                f"replay state has (capacity, obs_dim, act_dim)={dims}, this buffer has "
                f"{(self.capacity, self.obs_dim, self.act_dim)}; build the buffer with matching params."
            )
        for name in _ROW_FIELDS:
            current = getattr(self, name)
            value = np.asarray(state[name])
            if value.shape != current.shape:
                raise PLDError(f"replay state key '{name}' has shape {value.shape}, expected {current.shape}.")
            current[...] = value
        for name in ("ptr", "size", "ep_start", "ep_len"):
            setattr(self, name, int(state[name]))


def sample_mixed(
    offline: ReplayBuffer,
    online: ReplayBuffer,
    batch_size: int,
    rng: np.random.Generator,
    offline_fraction: float = 0.5,
    device: torch.device | str = "cpu",
    n_step: int = 1,
) -> dict[str, torch.Tensor]:
    """RLPD symmetric sampling: round(batch * fraction) rows from offline, the rest online.

    If one buffer is empty the whole batch comes from the other. Returns float32 tensors.
    """
    if len(offline) == 0 and len(online) == 0:
        raise RuntimeError("sample_mixed: both the offline and the online buffer are empty.")
    n_off = int(round(batch_size * offline_fraction))
    if len(online) == 0:
        n_off = batch_size
    elif len(offline) == 0:
        n_off = 0
    parts = []
    if n_off > 0:
        parts.append(offline.sample(n_off, rng, n_step))
    if batch_size - n_off > 0:
        parts.append(online.sample(batch_size - n_off, rng, n_step))
    return {
        key: torch.as_tensor(np.concatenate([p[key] for p in parts]), dtype=torch.float32, device=device)
        for key in parts[0]
    }


def to_torch(batch: dict[str, np.ndarray], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """A sampled numpy batch as float32 tensors on ``device``."""
    return {k: torch.as_tensor(v, dtype=torch.float32, device=device) for k, v in batch.items()}
