"""What several test modules build, in one place: synthetic episodes and trajectory stores, untrained ACT
checkpoints (state only or with both cameras), and a LIBERO env that records what it was sent.
Test modules import them explicitly (``from builders import ...``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pld_core.store import Episode, TrajectoryStore, mc_returns

ENV_DIM = 6
IMG_HW = (16, 16)
TASKS = ["pick up the alphabet soup and place it in the basket", "pick up the cream cheese and place it in the basket"]

# A tiny ACT on state only (58k parameters). ENV is in the normalization mapping because ACT's
# default mapping leaves observation.environment_state unnormalized (and it exercises dict values
# on the trainer's command line).
TINY_ACT = {
    "type": "act", "dim_model": 32, "n_heads": 2, "dim_feedforward": 64, "n_encoder_layers": 1,
    "n_decoder_layers": 1, "latent_dim": 8, "chunk_size": 5, "n_action_steps": 5, "use_vae": True,
    "normalization_mapping": {"VISUAL": "MEAN_STD", "STATE": "MEAN_STD", "ENV": "MEAN_STD", "ACTION": "MEAN_STD"},
}


def make_store(path: Path, n_episodes: int = 3, length: int = 12, images: bool = False, seed: int = 0,
               failed_episode: bool = True, env_dim: int = ENV_DIM) -> Path:
    """A store with ``n_episodes`` successful episodes (+ one failed one), tasks alternating."""
    rng = np.random.default_rng(seed)
    shapes = {"obs_state": (8,), "obs_env_state": (env_dim,)}
    if images:
        shapes |= {"obs_image": (*IMG_HW, 3), "obs_wrist_image": (*IMG_HW, 3)}
    store = TrajectoryStore.create(path, obs_shapes=shapes, suite="libero_object", task_names=TASKS)
    eps = []
    for i in range(n_episodes + int(failed_episode)):
        success = i < n_episodes
        t = length
        reward = np.zeros(t, np.float32)
        if success:
            reward[-1] = 1.0
        base = rng.uniform(-0.9, 0.9, (t, 7)).astype(np.float32)
        label = np.clip(base + rng.normal(0, 0.05, (t, 7)), -1, 1).astype(np.float32)
        env_state = rng.normal(0, 1, (t, env_dim)).astype(np.float32)
        env_state[:, -1] = i % len(TASKS)  # constant within an episode, like the task one-hot
        steps = {
            "obs_state": rng.normal(0, 1, (t, 8)).astype(np.float32),
            "obs_env_state": env_state,
            "base_action": base,
            "action": label,
            "label_action": label,
            "next_base_action": np.roll(base, -1, axis=0),
            "reward": reward,
            "done": reward > 0,
            "mc_return": mc_returns(reward, 0.99),
        }
        if images:
            steps["obs_image"] = rng.integers(0, 256, (t, *IMG_HW, 3), dtype=np.uint8)
            steps["obs_wrist_image"] = rng.integers(0, 256, (t, *IMG_HW, 3), dtype=np.uint8)
        eps.append(Episode(steps=steps, task_index=i % len(TASKS), init_state=i, seed=seed * 100 + i,
                           success=success, t_base=t // 2))
    store.append(eps)
    return path


def make_image_act_checkpoint(path: Path, env_dim: int = ENV_DIM) -> Path:
    """An untrained ACT that takes both cameras, saved as LeRobot saves a pretrained_model dir."""
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.act.configuration_act import ACTConfig

    h, w = IMG_HW
    inputs = {
        "observation.state": PolicyFeature(type=FeatureType.STATE, shape=(8,)),
        "observation.environment_state": PolicyFeature(type=FeatureType.ENV, shape=(env_dim,)),
        "observation.images.image": PolicyFeature(type=FeatureType.VISUAL, shape=(3, h, w)),
        "observation.images.image2": PolicyFeature(type=FeatureType.VISUAL, shape=(3, h, w)),
    }
    cfg = ACTConfig(input_features=inputs, output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(7,))},
                    pretrained_backbone_weights=None, dim_model=32, n_heads=2, dim_feedforward=64,
                    n_encoder_layers=1, n_decoder_layers=1, latent_dim=8, chunk_size=4, n_action_steps=4,
                    device="cpu")
    return save_untrained_act(path, cfg)


def save_untrained_act(path: Path, cfg, seed: int = 0, random_stats: bool = False) -> Path:
    """An ACT built from ``cfg`` (seeded), saved as LeRobot saves a pretrained_model dir, with
    normalisation stats (mean 0, std 1; or drawn at random, so that normalising matters)."""
    import torch
    from lerobot.configs.types import FeatureType
    from lerobot.policies.act.modeling_act import ACTPolicy
    from lerobot.policies.factory import make_pre_post_processors

    torch.manual_seed(seed)
    policy = ACTPolicy(cfg)
    rng = np.random.default_rng(seed)
    stats = {}
    for k, ft in {**cfg.input_features, **cfg.output_features}.items():
        shape = ft.shape if ft.type is not FeatureType.VISUAL else (3, 1, 1)
        stats[k] = ({"mean": rng.normal(0, 0.3, shape).astype(np.float32), "std": rng.uniform(0.2, 0.6, shape).astype(np.float32)}
                    if random_stats else {"mean": np.zeros(shape, np.float32), "std": np.ones(shape, np.float32)})
    pre, post = make_pre_post_processors(cfg, dataset_stats=stats)
    policy.save_pretrained(path)
    pre.save_pretrained(path)
    post.save_pretrained(path)
    return path


def make_state_act(path: Path, env_dim: int = ENV_DIM, act_dim: int = 7, seed: int = 0, random_stats: bool = False,
                   **cfg_overrides) -> Path:
    """An untrained state-only ACT (tiny by default; ``cfg_overrides`` go to ACTConfig)."""
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.act.configuration_act import ACTConfig

    inputs = {"observation.state": PolicyFeature(type=FeatureType.STATE, shape=(8,)),
              "observation.environment_state": PolicyFeature(type=FeatureType.ENV, shape=(env_dim,))}
    kw = dict(pretrained_backbone_weights=None, dim_model=16, n_heads=2, dim_feedforward=32, n_encoder_layers=1,
              n_decoder_layers=1, latent_dim=4, chunk_size=2, n_action_steps=2, use_vae=False, device="cpu")
    cfg = ACTConfig(input_features=inputs, output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(act_dim,))},
                    **{**kw, **cfg_overrides})
    return save_untrained_act(path, cfg, seed=seed, random_stats=random_stats)


def make_episode(n: int, task: int = 0, env_dim: int = 4, value: float = 0.0, success: bool = True) -> Episode:
    """A synthetic n-step episode in the store's layout: observations all ``value``, reward 1 at the end."""
    steps = {
        "obs_state": np.full((n, 8), value, np.float32),
        "obs_env_state": np.full((n, env_dim), value, np.float32),
        "base_action": np.zeros((n, 7), np.float32),
        "action": np.full((n, 7), 0.1, np.float32),
        "label_action": np.full((n, 7), 0.1, np.float32),
        "next_base_action": np.zeros((n, 7), np.float32),
        "reward": np.r_[np.zeros(n - 1), 1.0].astype(np.float32),
        "done": np.r_[np.zeros(n - 1, bool), True],
        "mc_return": (0.99 ** np.arange(n - 1, -1, -1)).astype(np.float32),
    }
    return Episode(steps=steps, task_index=task, init_state=0, seed=0, success=success)


class RecordingEnv:
    """A LiberoEnv that logs every episode's seed, observations and executed actions."""

    def __init__(self, env):
        self._env = env
        self.episodes: list[dict] = []

    def __getattr__(self, name):
        return getattr(self._env, name)

    def reset(self, init_state: int = 0, seed: int = 0):
        obs = self._env.reset(init_state, seed=seed)
        self.episodes.append({"seed": seed, "obs": [obs], "actions": []})
        return obs

    def step(self, action):
        out = self._env.step(action)
        self.episodes[-1]["obs"].append(out[0])
        self.episodes[-1]["actions"].append(np.asarray(action, dtype=np.float32).copy())
        return out


def kill_at_first_checkpoint(args: list[str], env: dict, ckpt_root: Path, cwd: Path, timeout: float = 240) -> int:
    """Start ``args``, SIGKILL it as soon as a checkpoint (``ckpt_root/step_*/state.json``) exists; its return code."""
    import os
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + timeout
        while not list(Path(ckpt_root).glob("step_*/state.json")):
            assert proc.poll() is None, f"the run exited before its first checkpoint: {proc.stderr.read().decode()[-2000:]}"
            assert time.time() < deadline, f"no checkpoint within {timeout} s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return proc.returncode
