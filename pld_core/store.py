"""Trajectory store: flat per-step arrays in one Zarr v3 group plus an ``episode_ends`` index.

The layout follows diffusion_policy's ReplayBuffer::

    <store>.zarr/
      data/<name>        per-step arrays, first axis = step (obs_state, base_action, action, ...)
      meta/<name>        per-episode arrays (task_index, init_state, seed, t_base, success)
      meta/episode_ends  int64, exclusive end of each episode in the step arrays

Crash safety: an append writes the step arrays, then the per-episode arrays, then
``episode_ends`` *last*. ``episode_ends`` is the commit record: readers only ever see the steps
and episodes it covers, and a writer that reopens a store first trims whatever a killed append
left beyond it. A half-written episode is therefore never read. Zarr grows an array's shape
(metadata) before it writes the chunk, so a commit whose chunk write failed (a full disk, a kill
between the two writes) shows up as trailing ``episode_ends`` entries holding the fill value 0;
they are not committed either (a real end is always > 0), and a writer trims them too.

Every reader validates the store: array presence, dtypes and trailing shapes by hand (with a
message naming the array and the fix), and the tabular per-episode and per-step columns with
pandera schemas.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pandera.pandas as pa
import zarr
from zarr.codecs import BloscCodec

from pld_core.errors import PLDError

ACT_DIM = 7
FORMAT_VERSION = 1

# name -> (dtype, trailing shape key). Trailing shapes that depend on the observation mode are
# resolved from the group's attrs ("obs_shapes").
STEP_ARRAYS: dict[str, str] = {
    "base_action": "float32",  # the frozen base policy's action at this state
    "action": "float32",  # the executed action: clip(a_b + xi * delta), or a_b for base steps
    "label_action": "float32",  # the SFT label: base action during probing, executed after
    "next_base_action": "float32",  # base action at the next state (the TD target needs it)
    "reward": "float32",  # sparse binary success reward
    "done": "bool",  # terminal success
    "mc_return": "float32",  # discounted Monte-Carlo return to go (Cal-QL's lower bound)
}
ACTION_ARRAYS = ("base_action", "action", "label_action", "next_base_action")
OBS_ARRAYS: dict[str, str] = {
    "obs_state": "float32",  # robot proprioception, LeRobot's LIBERO `observation.state` (8)
    "obs_env_state": "float32",  # object poses + task one-hot
    "obs_image": "uint8",  # agentview RGB (images mode only)
    "obs_wrist_image": "uint8",  # wrist RGB (images mode only)
    "obs_latent": "float32",  # frozen image-encoder latents (optional)
}
REQUIRED_OBS = ("obs_state", "obs_env_state")
EPISODE_ARRAYS: dict[str, str] = {
    "task_index": "int32",
    "init_state": "int32",
    "seed": "int64",
    "t_base": "int32",  # base steps before the residual took over (-1: base-only episode)
    "success": "bool",
}


@dataclass
class Episode:
    """One episode's per-step arrays (first axis = step) and its metadata."""

    steps: dict[str, np.ndarray]
    task_index: int
    init_state: int
    seed: int
    success: bool
    t_base: int = -1

    def __len__(self) -> int:
        return len(self.steps["action"])


class EpisodeMeta(pa.DataFrameModel):
    task_index: int = pa.Field(ge=0)
    init_state: int = pa.Field(ge=0)
    seed: int = pa.Field(ge=0)
    t_base: int = pa.Field(ge=-1)
    success: bool
    length: int = pa.Field(gt=0)

    class Config:
        strict = True
        coerce = False


class StepTable(pa.DataFrameModel):
    reward: float = pa.Field(isin=[0.0, 1.0])
    done: bool
    mc_return: float = pa.Field(ge=0.0, le=1.0 + 1e-6)
    action_abs_max: float = pa.Field(le=1.0 + 1e-6)  # actions live in [-1, 1]

    class Config:
        strict = True


def _fail(path: Path, what: str, fix: str) -> PLDError:
    return PLDError(f"trajectory store {path}: {what}. Fix: {fix}")


@dataclass
class TrajectoryStore:
    """A Zarr trajectory store. Create with :meth:`create`, open with :meth:`open`."""

    path: Path
    group: zarr.Group
    attrs: dict = field(default_factory=dict)

    # ----------------------------------------------------------------------------- creation
    @classmethod
    def create(
        cls,
        path: str | Path,
        obs_shapes: dict[str, tuple[int, ...]],
        suite: str,
        task_names: list[str],
        extra_attrs: dict | None = None,
        chunk_steps: int = 4096,
    ) -> "TrajectoryStore":
        path = Path(path)
        if path.exists():
            raise _fail(path, "already exists", "open it with TrajectoryStore.open or delete it")
        for name in REQUIRED_OBS:
            if name not in obs_shapes:
                raise _fail(path, f"observation '{name}' missing from obs_shapes", "pass it")
        g = zarr.open_group(str(path), mode="w-")
        data, meta = g.create_group("data"), g.create_group("meta")
        shapes = {k: tuple(v) for k, v in obs_shapes.items()}
        for name, shape in shapes.items():
            if name not in OBS_ARRAYS:
                raise _fail(path, f"unknown observation array '{name}'", f"use one of {list(OBS_ARRAYS)}")
            cls._new_array(data, name, OBS_ARRAYS[name], shape, chunk_steps)
        for name, dtype in STEP_ARRAYS.items():
            shape = (ACT_DIM,) if name in ACTION_ARRAYS else ()
            cls._new_array(data, name, dtype, shape, chunk_steps)
        for name, dtype in EPISODE_ARRAYS.items():
            cls._new_array(meta, name, dtype, (), 1024)
        cls._new_array(meta, "episode_ends", "int64", (), 1024)
        attrs = {
            "format_version": FORMAT_VERSION,
            "suite": suite,
            "task_names": list(task_names),
            "obs_shapes": {k: list(v) for k, v in shapes.items()},
            **(extra_attrs or {}),
        }
        g.attrs.update(attrs)
        return cls(path, g, attrs)

    @staticmethod
    def _new_array(group: zarr.Group, name: str, dtype: str, trailing: tuple, chunk: int):
        # images get small step chunks so one episode append touches few chunks
        step_chunk = max(1, min(chunk, 64)) if dtype == "uint8" else chunk
        group.create_array(
            name,
            shape=(0, *trailing),
            chunks=(step_chunk, *trailing),
            dtype=dtype,
            compressors=BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),
        )

    # ----------------------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> "TrajectoryStore":
        path = Path(path)
        if not path.exists():
            raise _fail(path, "does not exist", "check the path, or create it (e.g. `pld demo`)")
        try:
            g = zarr.open_group(str(path), mode="r" if mode == "r" else "r+")
        except Exception as e:  # zarr raises several types for a non-group
            raise _fail(path, f"is not a Zarr group ({type(e).__name__}: {e})", "point at a .zarr store made by pld") from e
        store = cls(path, g, dict(g.attrs))
        store._check_layout()
        if mode != "r":
            store._trim_uncommitted()
        return store

    def _check_layout(self) -> None:
        a = self.attrs
        for key in ("format_version", "suite", "task_names", "obs_shapes"):
            if key not in a:
                raise _fail(self.path, f"attribute '{key}' missing from zarr.json", "recreate the store with pld")
        if a["format_version"] != FORMAT_VERSION:
            raise _fail(self.path, f"format_version {a['format_version']} != {FORMAT_VERSION}", "recreate the store")
        expected = {name: (dtype, (ACT_DIM,) if name in ACTION_ARRAYS else ()) for name, dtype in STEP_ARRAYS.items()}
        for name, shape in a["obs_shapes"].items():
            expected[name] = (OBS_ARRAYS.get(name, "float32"), tuple(shape))
        for name in REQUIRED_OBS:
            if name not in a["obs_shapes"]:
                raise _fail(self.path, f"obs_shapes lacks '{name}'", "recreate the store")
        for group_name, specs in (("data", expected), ("meta", {**{k: (v, ()) for k, v in EPISODE_ARRAYS.items()}, "episode_ends": ("int64", ())})):
            try:
                grp = self.group[group_name]
            except KeyError:
                raise _fail(self.path, f"group '{group_name}' is missing", "recreate the store") from None
            for name, (dtype, trailing) in specs.items():
                try:
                    arr = grp[name]
                except KeyError:
                    raise _fail(self.path, f"array '{group_name}/{name}' is missing", "recreate the store (it was not written by pld, or was damaged)") from None
                if str(arr.dtype) != dtype:
                    raise _fail(self.path, f"array '{group_name}/{name}' has dtype {arr.dtype}, expected {dtype}", "recreate the store")
                if tuple(arr.shape[1:]) != tuple(trailing):
                    raise _fail(self.path, f"array '{group_name}/{name}' has per-step shape {tuple(arr.shape[1:])}, expected {tuple(trailing)}", "recreate the store")

    @property
    def data(self) -> zarr.Group:
        return self.group["data"]

    @property
    def meta(self) -> zarr.Group:
        return self.group["meta"]

    @property
    def episode_ends(self) -> np.ndarray:
        """The committed ends: trailing fill values (0) of a commit whose chunk write failed are dropped."""
        ends = np.asarray(self.meta["episode_ends"][:], dtype=np.int64)
        n = len(ends)
        while n and ends[n - 1] == 0:
            n -= 1
        return ends[:n]

    @property
    def n_episodes(self) -> int:
        return len(self.episode_ends)

    @property
    def n_steps(self) -> int:
        ends = self.episode_ends
        return int(ends[-1]) if len(ends) else 0

    @property
    def step_array_names(self) -> list[str]:
        return list(STEP_ARRAYS) + list(self.attrs["obs_shapes"])

    def _trim_uncommitted(self) -> None:
        """Drop rows a killed append wrote beyond the last committed episode."""
        n_steps, n_eps = self.n_steps, self.n_episodes
        for name in self.step_array_names:
            arr = self.data[name]
            if arr.shape[0] != n_steps:
                arr.resize((n_steps, *arr.shape[1:]))
        for name in (*EPISODE_ARRAYS, "episode_ends"):
            arr = self.meta[name]
            if arr.shape[0] != n_eps:
                arr.resize((n_eps,))

    # ----------------------------------------------------------------------------- writing
    def append(self, episodes: list[Episode]) -> None:
        """Append whole episodes in one write per array; ``episode_ends`` is written last."""
        if not episodes:
            return
        names = self.step_array_names
        for ep in episodes:
            missing = set(names) - set(ep.steps)
            if missing:
                raise _fail(self.path, f"episode lacks arrays {sorted(missing)}", "fill every array of the store")
            n = len(ep)
            if n == 0:
                raise _fail(self.path, "empty episode", "append episodes with at least one step")
            for name in names:
                if len(ep.steps[name]) != n:
                    raise _fail(self.path, f"array '{name}' has {len(ep.steps[name])} steps, 'action' has {n}", "give every array one row per step")
            for name in ACTION_ARRAYS:
                x = np.asarray(ep.steps[name])
                if not np.all(np.isfinite(x)):
                    raise _fail(self.path, f"array '{name}' holds NaN or infinite values", "clip or drop the offending episode before storing it")
        for name in names:
            arr = self.data[name]
            arr.append(np.concatenate([np.asarray(ep.steps[name], dtype=arr.dtype) for ep in episodes]), axis=0)
        for name in EPISODE_ARRAYS:
            arr = self.meta[name]
            arr.append(np.asarray([getattr(ep, name) for ep in episodes], dtype=arr.dtype), axis=0)
        ends = self.n_steps + np.cumsum([len(ep) for ep in episodes])
        self.meta["episode_ends"].append(ends.astype(np.int64), axis=0)  # commit record, last

    # ----------------------------------------------------------------------------- reading
    def episode_table(self, validate: bool = True) -> pd.DataFrame:
        n = self.n_episodes
        ends = self.episode_ends
        starts = np.concatenate([[0], ends[:-1]])
        df = pd.DataFrame({name: np.asarray(self.meta[name][:n]) for name in EPISODE_ARRAYS})
        df["length"] = (ends - starts).astype(np.int64)
        for col, dt in (("task_index", "int64"), ("init_state", "int64"), ("seed", "int64"), ("t_base", "int64")):
            df[col] = df[col].astype(dt)
        if validate:
            n_tasks = len(self.attrs["task_names"])
            try:
                EpisodeMeta.validate(df, lazy=True)
            except pa.errors.SchemaErrors as e:
                raise _fail(self.path, f"per-episode metadata fails validation:\n{e.failure_cases.head(10)}", "recreate the store") from None
            if n and df["task_index"].max() >= n_tasks:
                raise _fail(self.path, f"meta/task_index {df['task_index'].max()} >= number of tasks {n_tasks}", "recreate the store")
        return df

    def load(self, names: list[str] | None = None, validate: bool = True) -> dict[str, np.ndarray]:
        """Read committed steps into RAM (sampling from RAM is ~1000x faster than from disk)."""
        n = self.n_steps
        names = names or self.step_array_names
        out = {}
        for name in names:
            if name not in self.data:
                raise _fail(self.path, f"array 'data/{name}' is missing", "recreate the store with the needed observation mode")
            out[name] = np.asarray(self.data[name][:n])
        if validate:
            self._validate_steps(out)
        return out

    def _validate_steps(self, steps: dict[str, np.ndarray]) -> None:
        for name in ACTION_ARRAYS:
            if name in steps and not np.all(np.isfinite(steps[name])):
                raise _fail(self.path, f"array 'data/{name}' holds NaN or infinite values", "recreate the store")
        if not {"reward", "done", "mc_return", "action"} <= set(steps):
            return
        table = pd.DataFrame({
            "reward": steps["reward"].astype(np.float64),
            "done": steps["done"].astype(bool),
            "mc_return": steps["mc_return"].astype(np.float64),
            "action_abs_max": np.abs(np.stack([steps[k] for k in ACTION_ARRAYS if k in steps])).max(axis=(0, 2)).astype(np.float64),
        })
        try:
            StepTable.validate(table, lazy=True)
        except pa.errors.SchemaErrors as e:
            raise _fail(self.path, f"per-step data fails validation:\n{e.failure_cases.head(10)}", "recreate the store") from None

    def episodes(self, names: list[str] | None = None) -> list[Episode]:
        steps = self.load(names)
        table = self.episode_table()
        ends = self.episode_ends
        starts = np.concatenate([[0], ends[:-1]])
        out = []
        for i, row in table.iterrows():
            s, e = int(starts[i]), int(ends[i])
            out.append(Episode(
                steps={k: v[s:e] for k, v in steps.items()},
                task_index=int(row.task_index), init_state=int(row.init_state), seed=int(row.seed),
                success=bool(row.success), t_base=int(row.t_base),
            ))
        return out

    def summary(self) -> dict:
        t = self.episode_table()
        return {
            "path": str(self.path),
            "suite": self.attrs["suite"],
            "episodes": self.n_episodes,
            "steps": self.n_steps,
            "success_rate": float(t["success"].mean()) if len(t) else None,
            "per_task": {int(k): int(v) for k, v in t.groupby("task_index").size().items()},
        }


def mc_returns(reward: np.ndarray, gamma: float) -> np.ndarray:
    """Discounted reward-to-go ``G_t = r_t + gamma * G_{t+1}`` (Cal-QL's Monte-Carlo return)."""
    out = np.zeros(len(reward), dtype=np.float64)
    g = 0.0
    for t in range(len(reward) - 1, -1, -1):
        g = float(reward[t]) + gamma * g
        out[t] = g
    return out.astype(np.float32)


def describe(path: str | Path) -> str:
    return json.dumps(TrajectoryStore.open(path).summary(), indent=2)
