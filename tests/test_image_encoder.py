"""The residual's frozen image encoder (``residual.encoder: image``) on real LIBERO camera frames.

One small images-mode run (64 px): collect_offline -> pretrain_critic -> train_residual, then what
it must hold: the replay rows are latents (1032 floats), never pixels; the trunk is the same
after training as before (frozen); the batched store path and the per-step path encode a frame
the same; the specialist reloads with its encoder; bad settings give one clear error.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pld_core.config import validate_params
from pld_core.errors import PLDError
from pld_core.encoders import build_backbone, embed, encoder_weights_identity, ImageEncoder, LATENT_DIM, replay_bytes
from pld_core.encoders import make_encoder
from pld_core.residual_policy import load_residual, RESIDUAL_WEIGHTS
from pld_core.learner import offline_buffer_from_store
from pld_core.store import TrajectoryStore
from pld_core.layout import OFFLINE_STORE, BaseRef
from tasks import collect_offline, pretrain_critic, train_residual

BASE = "scripted:noise=0.3"
TASK = 0


def params_for(**residual):
    return validate_params({
        "env": {"suite": "libero_object", "tasks": [TASK], "mode": "images", "image_size": 64},
        "offline": {"successes": 1, "max_episodes": 3},
        "calql": {"steps": 4, "n_actions": 2},
        "sac": {"hidden": 32, "layers": 1, "batch_size": 16},
        "residual": {"encoder": "image", "mode": "sync", "env_steps": 120, "warmup_episodes": 0, "learning_starts": 0,
                     "checkpoint_every": 10_000, "eval_every": 10_000, "eval_episodes": 1, "replay_capacity": 2000,
                     "xi_warmup_steps": 50, **residual},
        "evaluate": {"episodes": 1},
    })


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("img")
    params = params_for()
    off = collect_offline.run(params, root / "offline", BaseRef.of(BASE), TASK, show_progress=False)
    crit = pretrain_critic.run(params, root / "critic", root / "offline", show_progress=False)
    res = train_residual.run(params, root / "residual", BaseRef.of(BASE), root / "offline", root / "critic", show_progress=False)
    return {"root": root, "params": params, "offline": off, "critic": crit, "residual": res}


def test_replay_rows_are_latents_not_pixels(run):
    root = run["root"]
    store = TrajectoryStore.open(root / "offline" / OFFLINE_STORE)
    assert "obs_image" in store.step_array_names  # pixels stay in the store (distillation needs them) ...
    encoder = make_encoder(run["params"], store)
    buf = offline_buffer_from_store(store, encoder, 0.99)
    obs_dim = 8 + 2 * LATENT_DIM
    assert isinstance(encoder, ImageEncoder) and encoder.dim == obs_dim == buf.obs.shape[1]  # ... the replay holds latents
    assert buf.obs.dtype == np.float32 and not any(np.asarray(v).dtype == np.uint8 for v in vars(buf).values() if isinstance(v, np.ndarray))
    assert buf.nbytes == buf.capacity * (4 * obs_dim + 2 * 4 * 7 + 4 * 3 + 1)
    assert replay_bytes(250_000, obs_dim) < 1.1e9  # the paper's capacity with latents
    cfg = json.loads((root / "residual" / "config.json").read_text())
    assert cfg["obs_dim"] == obs_dim and cfg["encoder"]["type"] == "image"
    assert run["residual"]["metrics"]["online_transitions"] > 0


def test_store_path_and_step_path_encode_alike(run):
    store = TrajectoryStore.open(run["root"] / "offline" / OFFLINE_STORE)
    encoder = make_encoder(run["params"], store)
    steps = store.load(["obs_state", "obs_image", "obs_wrist_image"], validate=False)
    rows = encoder.normalize(encoder.raw_rows(steps))
    for i in (0, len(rows) // 2, len(rows) - 1):
        obs = {"state": steps["obs_state"][i], "image": steps["obs_image"][i], "wrist_image": steps["obs_wrist_image"][i]}
        np.testing.assert_allclose(encoder(obs), rows[i], atol=1e-3)
    # the latents see the frames: two frames of the episode (gripper moved) give different latents
    a, b = embed(encoder.backbone, steps["obs_wrist_image"][[0, len(rows) - 1]])
    assert np.abs(a - b).max() > 1e-2


def test_trunk_stays_frozen_and_reloads(run):
    path = run["root"] / "residual"
    state = load_file(str(path / RESIDUAL_WEIGHTS))
    fresh = build_backbone(None).state_dict()
    saved = {k[len("encoder.backbone."):]: v for k, v in state.items() if k.startswith("encoder.backbone.")}
    assert saved.keys() == fresh.keys() and all(torch.equal(saved[k], fresh[k]) for k in fresh)  # SAC never moved it
    policy = load_residual(path, base=BASE)
    enc = policy.encoder
    assert isinstance(enc, ImageEncoder) and not any(p.requires_grad for p in enc.backbone.parameters())
    store = TrajectoryStore.open(run["root"] / "offline" / OFFLINE_STORE)
    steps = store.load(["obs_state", "obs_image", "obs_wrist_image"], validate=False)
    obs = {"state": steps["obs_state"][3], "image": steps["obs_image"][3], "wrist_image": steps["obs_wrist_image"][3]}
    np.testing.assert_allclose(enc(obs), make_encoder(run["params"], store)(obs), atol=1e-6)


def test_weights_file_is_loaded_and_keyed(tmp_path):
    import torchvision

    torch.manual_seed(7)
    net = torchvision.models.resnet18(weights=None)
    f = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(f))
    loaded = build_backbone(f).state_dict()
    assert torch.equal(loaded["conv1.weight"], net.state_dict()["conv1.weight"])
    assert not torch.equal(loaded["conv1.weight"], build_backbone(None).state_dict()["conv1.weight"])
    import hashlib

    key = encoder_weights_identity(params_for(image_encoder_weights=str(f)))
    assert key == hashlib.sha256(f.read_bytes()).hexdigest()[:16]  # the file's content, not its name
    g = tmp_path / "copy.safetensors"
    g.write_bytes(f.read_bytes())
    assert encoder_weights_identity(params_for(image_encoder_weights=str(g))) == key
    torch.manual_seed(8)
    save_file({k: v.contiguous() for k, v in torchvision.models.resnet18(weights=None).state_dict().items()}, str(g))
    assert encoder_weights_identity(params_for(image_encoder_weights=str(g))) != key  # other weights, another key
    assert train_residual._residual_params(params_for(image_encoder_weights=str(f)))["image_encoder_weights"] == key


def test_image_encoder_errors_name_the_fix(tmp_path):
    with pytest.raises(PLDError, match=r"residual.image_encoder_weights: .*nope.safetensors is not a file"):
        build_backbone(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    save_file({"conv1.weight": torch.zeros(1)}, str(bad))
    with pytest.raises(PLDError, match="not a torchvision ResNet-18 state_dict"):
        build_backbone(bad)
    state_params = validate_params({"env": {"mode": "state"}, "residual": {"encoder": "image"}})
    with pytest.raises(PLDError, match="env.mode is 'state'. Fix: set env.mode: images"):
        pretrain_critic.run(state_params, tmp_path / "c", tmp_path / "o")
