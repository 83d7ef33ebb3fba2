"""Distill: stores -> LeRobotDataset (+ quantiles), SFT with LeRobot's trainer, the base-policy adapter.

Everything runs offline on tiny synthetic data; the trainings are a tiny state-only ACT
(a few steps each, trainer in a child process with one thread).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

try:
    from builders import ENV_DIM, IMG_HW, TASKS, TINY_ACT, make_image_act_checkpoint, make_store
except ImportError:  # tests/ became a package
    from tests.builders import ENV_DIM, IMG_HW, TASKS, TINY_ACT, make_image_act_checkpoint, make_store
from pld_core.base_policy import BasePolicy
from pld_core.dataset import augment_quantiles, convert_stores, push_to_hub
from pld_core.errors import PLDError
from pld_core.sft import checkpoint_norm_stats, sft
from pld_core.store import TrajectoryStore

N_EPS, LEN = 3, 40


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the trainer child: tiny model, shared cores


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("stores")
    return {
        "images": make_store(d / "img.zarr", n_episodes=N_EPS, length=12, images=True, seed=1),
        "state": make_store(d / "state.zarr", n_episodes=N_EPS, length=LEN, images=False, seed=2),
    }


@pytest.fixture(scope="module")
def datasets(stores, tmp_path_factory):
    d = tmp_path_factory.mktemp("datasets")
    return {
        "images": convert_stores([stores["images"]], d / "ds_img", "local/ds_img"),
        "state": convert_stores([stores["state"]], d / "ds_state", "local/ds_state"),
    }


@pytest.fixture(scope="module")
def tiny_ckpt(datasets, tmp_path_factory):
    """A tiny ACT trained from a config (a new base) for 20 steps."""
    out = tmp_path_factory.mktemp("sft") / "base_v0"
    t0 = time.time()
    ckpt = sft(datasets["state"], "local/ds_state", out, dict(TINY_ACT), steps=20, batch_size=8, lr=1e-3,
               seed=0, log_freq=10, num_threads=1)
    print(f"sft from config: 20 steps in {time.time() - t0:.1f} s, {json.loads((out / 'sft_info.json').read_text())}")
    return ckpt


def _lerobot_dataset(root: Path):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    return LeRobotDataset(f"local/{root.name}", root=root)


def _successful(store_path: Path):
    return [ep for ep in TrajectoryStore.open(store_path).episodes() if ep.success]


# --------------------------------------------------------------------------------- dataset
@pytest.mark.parametrize("kind", ["images", "state"])
def test_convert_reloads_with_stock_lerobot(kind, stores, datasets):
    eps = _successful(stores[kind])
    ds = _lerobot_dataset(datasets[kind])
    assert ds.num_episodes == N_EPS and ds.num_frames == sum(len(e) for e in eps)  # the failed one is dropped
    feats = ds.features
    assert tuple(feats["observation.state"]["shape"]) == (8,)
    assert tuple(feats["observation.environment_state"]["shape"]) == (ENV_DIM,)
    assert tuple(feats["action"]["shape"]) == (7,)
    assert ("observation.images.image" in feats) == (kind == "images")
    assert ("observation.images.image2" in feats) == (kind == "images")

    # action == label_action, frame by frame, in episode order
    actions = np.stack([np.asarray(a) for a in ds.hf_dataset.with_format(None)["action"]])
    np.testing.assert_allclose(actions, np.concatenate([e.steps["label_action"] for e in eps]), atol=1e-7)
    state = np.stack([np.asarray(a) for a in ds.hf_dataset.with_format(None)["observation.state"]])
    np.testing.assert_allclose(state, np.concatenate([e.steps["obs_state"] for e in eps]), atol=1e-7)

    # the task text of each episode is its store's task name
    starts = np.cumsum([0] + [len(e) for e in eps[:-1]])
    for i, (ep, s) in enumerate(zip(eps, starts)):
        item = ds[int(s) + 1]
        assert item["task"] == TASKS[ep.task_index]
        assert int(item["episode_index"]) == i
        if kind == "images":
            img = item["observation.images.image"]
            assert tuple(img.shape) == (3, *IMG_HW) and img.dtype == torch.float32
            # exact pixels, channel order kept (HWC uint8 -> CHW float / 255)
            want = ep.steps["obs_image"][1].transpose(2, 0, 1).astype(np.float32) / 255.0
            np.testing.assert_allclose(img.numpy(), want, atol=1e-6)
            wrist = ep.steps["obs_wrist_image"][1].transpose(2, 0, 1).astype(np.float32) / 255.0
            np.testing.assert_allclose(item["observation.images.image2"].numpy(), wrist, atol=1e-6)
    assert set(ds.meta.tasks.index) == {TASKS[e.task_index] for e in eps}


def test_augment_quantiles_matches_numpy(stores, datasets, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(datasets["state"], root)
    summary = augment_quantiles(root)
    stats = json.loads((root / "meta" / "stats.json").read_text())
    eps = _successful(stores["state"])
    data = {
        "action": np.concatenate([e.steps["label_action"] for e in eps]),
        "observation.state": np.concatenate([e.steps["obs_state"] for e in eps]),
        "observation.environment_state": np.concatenate([e.steps["obs_env_state"] for e in eps]),
    }
    for key, x in data.items():
        for q in ("q01", "q99"):
            assert q in stats[key], f"{key}.{q} missing"
        spread = x.max(0) - x.min(0)
        # the estimator is a histogram; with 120 frames adjacent order statistics lie ~spread/120 apart
        np.testing.assert_allclose(stats[key]["q01"], np.quantile(x, 0.01, axis=0), atol=float(spread.max()) * 0.03)
        np.testing.assert_allclose(stats[key]["q99"], np.quantile(x, 0.99, axis=0), atol=float(spread.max()) * 0.03)
    # a feature constant within episodes (like the task one-hot): whole-dataset quantiles, not
    # LeRobot's average of per-episode quantiles (which would give q99 = 1/3 here)
    assert stats["observation.environment_state"]["q99"][-1] == pytest.approx(1.0, abs=1e-3)
    assert stats["observation.environment_state"]["q01"][-1] == pytest.approx(0.0, abs=1e-3)
    assert summary["frames"] == N_EPS * LEN
    assert set(summary["features"]) == {"action", "observation.state"}
    # still a loadable dataset
    assert _lerobot_dataset(root).num_frames == N_EPS * LEN


def test_augment_quantiles_images(datasets, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(datasets["images"], root)
    summary = augment_quantiles(root)
    assert "observation.images.image" in summary["quantile_features"]
    stats = json.loads((root / "meta" / "stats.json").read_text())
    assert np.asarray(stats["observation.images.image"]["q01"]).shape == (3, 1, 1)


def test_convert_rejects_disagreeing_stores(tmp_path):
    a = make_store(tmp_path / "a.zarr", n_episodes=1, length=5, env_dim=6)
    b = make_store(tmp_path / "b.zarr", n_episodes=1, length=5, env_dim=7)
    with pytest.raises(PLDError) as e:
        convert_stores([a, b], tmp_path / "out", "local/out")
    msg = str(e.value)
    assert "a.zarr" in msg and "b.zarr" in msg and "obs_env_state" in msg
    assert not (tmp_path / "out").exists()
    with pytest.raises(PLDError, match="use_images=True"):
        convert_stores([a], tmp_path / "out", "local/out", use_images=True)


def test_convert_is_atomic(stores, tmp_path, monkeypatch):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    out = convert_stores([stores["state"]], tmp_path / "ds", "local/ds", only_successful=False)
    assert _lerobot_dataset(out).num_episodes == N_EPS + 1  # failed episode kept on request
    calls = {"n": 0}
    real = LeRobotDataset.save_episode

    def dying_save_episode(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("killed mid-conversion")
        return real(self, *a, **k)

    monkeypatch.setattr(LeRobotDataset, "save_episode", dying_save_episode)
    with pytest.raises(RuntimeError, match="killed"):
        convert_stores([stores["images"]], out, "local/ds")
    monkeypatch.undo()
    # the old complete dataset is untouched and no temporary directory is left
    ds = _lerobot_dataset(out)
    assert ds.num_episodes == N_EPS + 1 and "observation.images.image" not in ds.features
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # a successful rerun replaces it
    convert_stores([stores["images"]], out, "local/ds")
    assert "observation.images.image" in _lerobot_dataset(out).features


@pytest.mark.timeout(60)
def test_push_to_hub_fails_fast_offline(datasets, monkeypatch):
    from huggingface_hub import constants

    t0 = time.time()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PLDError, match="HF_HUB_OFFLINE"):
        push_to_hub(datasets["state"], "someone/ds", "dataset")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # loopback, nothing listens
    with pytest.raises(PLDError, match="unreachable"):
        push_to_hub(datasets["state"], "someone/ds", "dataset")
    with pytest.raises(PLDError, match="config.json"):
        push_to_hub(datasets["state"], "someone/model", "model")  # a dataset is not a model dir
    assert time.time() - t0 < 30


# --------------------------------------------------------------------------------- sft
def test_sft_from_config_loads_with_stock_lerobot(tiny_ckpt, datasets):
    from lerobot.policies.act.modeling_act import ACTPolicy
    from lerobot.policies.factory import make_pre_post_processors

    assert tiny_ckpt.name == "pretrained_model" and (tiny_ckpt / "model.safetensors").is_file()
    assert not any(p.name.startswith(".tmp") for p in tiny_ckpt.parent.parent.iterdir())
    policy = ACTPolicy.from_pretrained(tiny_ckpt)
    pre, post = make_pre_post_processors(policy.config, pretrained_path=str(tiny_ckpt))
    assert policy.config.dim_model == TINY_ACT["dim_model"] and policy.config.n_action_steps == 5
    ds = _lerobot_dataset(datasets["state"])
    item = ds[0]
    batch = {k: item[k].unsqueeze(0) for k in ("observation.state", "observation.environment_state")}
    with torch.inference_mode():
        a = post(policy.select_action(pre(batch)))
    assert tuple(a.shape) == (1, 7) and torch.isfinite(a).all()
    info = json.loads((tiny_ckpt.parent / "sft_info.json").read_text())
    assert info["steps"] == 20 and info["final_loss"] is not None


def test_sft_finetunes_current_base(tiny_ckpt, stores, tmp_path):
    # the PLD data of the next iteration: another distribution, so its statistics differ
    ds_root = convert_stores([stores["images"]], tmp_path / "pld_ds", "local/pld_ds")
    t0 = time.time()
    # the default log period (100) is longer than the run: it is capped, so the run still reports
    new = sft(ds_root, "local/pld_ds", tmp_path / "base_v1", tiny_ckpt, steps=6, batch_size=8, lr=1e-3, seed=1,
              num_threads=1)
    print(f"sft fine-tune: 6 steps in {time.time() - t0:.1f} s")
    info = json.loads((new.parent / "sft_info.json").read_text())
    assert info["final_loss"] is not None and info["train_step_s"] > 0, info
    old_w, new_w = load_file(tiny_ckpt / "model.safetensors"), load_file(new / "model.safetensors")
    assert old_w.keys() == new_w.keys()
    assert any(not torch.equal(old_w[k], new_w[k]) for k in old_w), "fine-tuning changed no weight"
    old_cfg, new_cfg = (json.loads((p / "config.json").read_text()) for p in (tiny_ckpt, new))
    for key in ("type", "dim_model", "n_heads", "chunk_size", "n_action_steps", "input_features",
                "output_features", "normalization_mapping", "latent_dim"):
        assert new_cfg[key] == old_cfg[key], key
    assert new_cfg["pretrained_path"] == str(tiny_ckpt)
    # norm_stats="base": the base's normalization is kept, not re-fitted to the new dataset
    base_stats, new_stats = checkpoint_norm_stats(tiny_ckpt), checkpoint_norm_stats(new)
    ds_stats = json.loads((ds_root / "meta" / "stats.json").read_text())
    for key in ("observation.state", "observation.environment_state", "action"):
        np.testing.assert_allclose(new_stats[key]["mean"], base_stats[key]["mean"])
        assert not np.allclose(new_stats[key]["mean"], ds_stats[key]["mean"])
    # the new version loads as a base policy
    bp = BasePolicy.load(new, "state", env_state_dim=ENV_DIM)
    bp.reset(TASKS[0])
    assert bp.act({"state": np.zeros(8, np.float32), "env_state": np.zeros(ENV_DIM, np.float32)}).shape == (7,)


def test_sft_resumes_after_a_crash(datasets, tmp_path, monkeypatch):
    import pld_core.sft as sft_mod

    out = tmp_path / "base"
    real_publish = sft_mod._publish

    def crash(*a, **k):
        raise RuntimeError("killed after training")

    monkeypatch.setattr(sft_mod, "_publish", crash)
    with pytest.raises(RuntimeError, match="killed"):
        sft(datasets["state"], "local/ds_state", out, dict(TINY_ACT), steps=2, batch_size=4, seed=0, num_threads=1)
    assert not out.exists() and (tmp_path / ".tmp-base" / "train" / "checkpoints" / "last").exists()
    monkeypatch.setattr(sft_mod, "_publish", real_publish)
    ckpt = sft(datasets["state"], "local/ds_state", out, dict(TINY_ACT), steps=4, batch_size=4, seed=0, num_threads=1)
    info = json.loads((out / "sft_info.json").read_text())
    assert info["resumed_from_step"] == 2 and info["steps"] == 4
    assert "Resuming data order" in (out / "train.log").read_text()  # LeRobot resumed, did not restart
    assert (ckpt / "model.safetensors").is_file() and not (tmp_path / ".tmp-base").exists()


def test_sft_rejects_bad_requests(datasets, tiny_ckpt, tmp_path):
    with pytest.raises(PLDError, match="invalid for type 'act'"):
        sft(datasets["state"], "r", tmp_path / "o", {"type": "act", "no_such_field": 1}, steps=1, batch_size=2)
    with pytest.raises(PLDError, match="info.json"):
        sft(tmp_path, "r", tmp_path / "o", dict(TINY_ACT), steps=1, batch_size=2)
    with pytest.raises(PLDError, match="lora|LoRA|peft"):
        sft(datasets["state"], "r", tmp_path / "o", dict(TINY_ACT), steps=1, batch_size=2, lora={"r": 32})
    # a base needing observation.images.* cannot be fine-tuned on a state-only dataset
    img_ckpt = make_image_act_checkpoint(tmp_path / "img_ckpt")
    with pytest.raises(PLDError, match="observation.images.image"):
        sft(datasets["state"], "r", tmp_path / "o", img_ckpt, steps=1, batch_size=2)
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------- base policy
def test_chunk_queue_calls_model_every_n_action_steps(tiny_ckpt):
    bp = BasePolicy.load(tiny_ckpt, "state", env_state_dim=ENV_DIM)
    k = bp.n_action_steps
    assert k == TINY_ACT["n_action_steps"] and bp.policy_type == "act"
    assert bp.checkpoint_path == tiny_ckpt
    assert not any(p.requires_grad for p in bp.policy.parameters()) and not bp.policy.training
    rng = np.random.default_rng(0)
    bp.reset(TASKS[0])
    actions = []
    for _ in range(3 * k):
        obs = {"state": rng.normal(size=8).astype(np.float32), "env_state": rng.normal(size=ENV_DIM).astype(np.float32)}
        a = bp.act(obs)
        assert a.shape == (7,) and a.dtype == np.float32
        actions.append(a)
    assert bp.n_model_calls == 3
    bp.act(obs)  # mid-chunk? no: 3k actions used up the third chunk, so this is a 4th call
    assert bp.n_model_calls == 4
    bp.act(obs)
    assert bp.n_model_calls == 4  # served from the queue
    bp.reset(TASKS[1])
    bp.act(obs)
    assert bp.n_model_calls == 5  # reset emptied the queue
    # the adapter returns what stock LeRobot returns for the same chunk
    from lerobot.policies.act.modeling_act import ACTPolicy
    from lerobot.policies.factory import make_pre_post_processors

    ref = ACTPolicy.from_pretrained(tiny_ckpt)
    pre, post = make_pre_post_processors(ref.config, pretrained_path=str(tiny_ckpt))
    bp.reset(TASKS[0])
    ref.reset()
    with torch.inference_mode():
        for _ in range(k + 1):
            want = post(ref.select_action(pre(bp.build_batch(obs)))).numpy().reshape(-1)
            np.testing.assert_allclose(bp.act(obs), want, atol=1e-5)
    # the call counter sits on the model, so it holds the adapter and the model weakly: the adapter goes with
    # its last reference, not at the next cyclic collection (regression seen red: the counter's closure held both)
    import gc
    import weakref

    gone = weakref.ref(bp)
    gc.disable()
    try:
        del bp
        assert gone() is None
    finally:
        gc.enable()


def test_observation_mapping_and_images_mode(tmp_path):
    ckpt = make_image_act_checkpoint(tmp_path / "img_ckpt")
    bp = BasePolicy.load(ckpt, "images", env_state_dim=ENV_DIM)
    assert set(bp.input_features) == {"observation.state", "observation.environment_state",
                                      "observation.images.image", "observation.images.image2"}
    h, w = IMG_HW
    image = np.zeros((h, w, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 255, 51, 0  # R, G, B
    image[0, 0] = (10, 20, 30)
    wrist = np.full((h, w, 3), 128, np.uint8)[::-1, ::-1]  # a flipped (negative-stride) view
    obs = {"state": np.arange(8, dtype=np.float64), "env_state": np.ones(ENV_DIM, np.float32),
           "image": image, "wrist_image": wrist}
    batch = bp.build_batch(obs)
    bp.reset("put the bowl on the plate")
    batch = bp.build_batch(obs)
    assert set(batch) == {"observation.state", "observation.environment_state",
                          "observation.images.image", "observation.images.image2", "task"}
    assert batch["task"] == ["put the bowl on the plate"]
    st = batch["observation.state"]
    assert tuple(st.shape) == (1, 8) and st.dtype == torch.float32 and st[0, 7] == 7.0
    assert tuple(batch["observation.environment_state"].shape) == (1, ENV_DIM)
    img = batch["observation.images.image"]
    assert tuple(img.shape) == (1, 3, h, w) and img.dtype == torch.float32
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    assert img[0, :, 5, 5].tolist() == pytest.approx([1.0, 0.2, 0.0])  # channel 0 is red
    assert img[0, :, 0, 0].tolist() == pytest.approx([10 / 255, 20 / 255, 30 / 255])
    assert float(batch["observation.images.image2"].mean()) == pytest.approx(128 / 255)
    a = bp.act(obs)
    assert a.shape == (7,) and np.isfinite(a).all() and bp.n_model_calls == 1
    with pytest.raises(PLDError, match="image"):
        bp.act({"state": obs["state"], "env_state": obs["env_state"]})  # a state-mode observation


# --------------------------------------------------------------------------------- bad checkpoints
def test_load_rejects_bad_checkpoints(tiny_ckpt, tmp_path):
    missing = tmp_path / "no_such_ckpt"
    with pytest.raises(PLDError, match=str(missing)):
        BasePolicy.load(missing, "state")

    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(PLDError) as e:
        BasePolicy.load(empty, "state")
    assert str(empty) in str(e.value) and "config.json" in str(e.value)

    img_ckpt = make_image_act_checkpoint(tmp_path / "img_ckpt")
    with pytest.raises(PLDError) as e:
        BasePolicy.load(img_ckpt, "state", env_state_dim=ENV_DIM)
    assert str(img_ckpt) in str(e.value) and "observation.images.image" in str(e.value)

    with pytest.raises(PLDError, match="observation.environment_state"):
        BasePolicy.load(tiny_ckpt, "state", env_state_dim=ENV_DIM + 3)

    no_weights = tmp_path / "no_weights"
    shutil.copytree(tiny_ckpt, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(PLDError, match="model.safetensors"):
        BasePolicy.load(no_weights, "state")

    bad_type = tmp_path / "bad_type"
    shutil.copytree(tiny_ckpt, bad_type)
    cfg = json.loads((bad_type / "config.json").read_text())
    (bad_type / "config.json").write_text(json.dumps({**cfg, "type": "no_such_policy"}))
    with pytest.raises(PLDError, match="no_such_policy"):
        BasePolicy.load(bad_type, "state")

    with pytest.raises(PLDError, match="obs_mode"):
        BasePolicy.load(tiny_ckpt, "pixels")

    # a train output dir is accepted: the pretrained_model inside it is used
    assert BasePolicy.load(tiny_ckpt.parent, "state").checkpoint_path == tiny_ckpt


@pytest.mark.timeout(60)
def test_load_hub_id_fails_fast_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    t0 = time.time()
    with pytest.raises(PLDError) as e:
        BasePolicy.load("lerobot/pi05_libero", "images")
    assert "lerobot/pi05_libero" in str(e.value) and "HF_HUB_OFFLINE" in str(e.value)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # loopback, nothing listens
    with pytest.raises(PLDError, match="lerobot/pi05_libero"):
        BasePolicy.load("lerobot/pi05_libero", "images")
    assert time.time() - t0 < 30


def test_sft_lora_is_refused_before_training_when_the_disk_cannot_hold_the_merge(tiny_ckpt, datasets, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    real = shutil.disk_usage
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(real(p).total, real(p).total - 10**6, 10**6))
    with pytest.raises(PLDError, match=r"sft lora: merging the adapter writes a full checkpoint of 0\.3 GB .* has 0\.0 GB free"):
        sft(datasets["state"], "local/ds_state", tmp_path / "o", tiny_ckpt, steps=1, batch_size=2, num_threads=1,
            lora={"r": 4, "target_modules": r".*\.linear[12]"})
    assert not (tmp_path / "o").exists() and not (tmp_path / ".tmp-o").exists()  # refused before any work


def test_sft_lora_merges_adapter_into_a_full_checkpoint(tiny_ckpt, datasets, tmp_path):
    # rank-4 LoRA on ACT's feed-forward layers (ACT has no default PEFT targets); pi0.5 uses r=32
    new = sft(datasets["state"], "local/ds_state", tmp_path / "lora_v1", tiny_ckpt, steps=3, batch_size=4, lr=1e-2, seed=0,
              num_threads=1, lora={"r": 4, "lora_alpha": 8, "target_modules": r".*\.linear[12]"})
    assert (new / "lora_adapter").is_dir()
    old_w, new_w = load_file(tiny_ckpt / "model.safetensors"), load_file(new / "model.safetensors")
    assert old_w.keys() == new_w.keys()  # merged back: same parameter names as the base, no lora_A/B
    changed = [k for k in old_w if not torch.equal(old_w[k], new_w[k])]
    assert changed and all("linear" in k for k in changed), changed  # only the targeted layers moved
    # each moved weight is exactly W + (lora_alpha / r) * B @ A of the saved adapter
    adapter = load_file(new / "lora_adapter" / "adapter_model.safetensors")
    cfg = json.loads((new / "lora_adapter" / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    moved = set()
    for key in (k for k in adapter if k.endswith(".lora_A.weight")):
        name = key[len("base_model.model."):-len(".lora_A.weight")] + ".weight"
        delta = adapter[key.replace("lora_A", "lora_B")] @ adapter[key]
        torch.testing.assert_close(new_w[name], old_w[name] + scale * delta, rtol=1e-5, atol=1e-6)
        moved.add(name)
    assert moved == set(changed)
    # and the merged policy acts as the base with the adapter attached (unmerged) does
    from lerobot.policies.act.modeling_act import ACTPolicy
    from peft import PeftModel

    with_adapter = PeftModel.from_pretrained(ACTPolicy.from_pretrained(tiny_ckpt), str(new / "lora_adapter")).eval()
    merged = ACTPolicy.from_pretrained(new).eval()
    g = torch.Generator().manual_seed(0)
    batch = {"observation.state": torch.randn(3, 8, generator=g), "observation.environment_state": torch.randn(3, ENV_DIM, generator=g)}
    with torch.no_grad():
        torch.testing.assert_close(merged.predict_action_chunk(batch), with_adapter.predict_action_chunk(batch), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(merged.predict_action_chunk(batch), ACTPolicy.from_pretrained(tiny_ckpt).eval().predict_action_chunk(batch))
    bp = BasePolicy.load(new, "state", env_state_dim=ENV_DIM)
    bp.reset(TASKS[0])
    assert bp.act({"state": np.zeros(8, np.float32), "env_state": np.zeros(ENV_DIM, np.float32)}).shape == (7,)
