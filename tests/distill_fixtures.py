"""Builders for the Distill tests: tiny synthetic trajectory stores, datasets and checkpoints.

Kept out of conftest.py so that they do not collide with the project's shared fixtures; the
test module imports them explicitly.
"""

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
