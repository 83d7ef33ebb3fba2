"""The pi0.5 path's riskiest joints, on a random pi0.5 at the smallest size LeRobot allows (gemma_300m VLM and
action expert, 1.9 B parameters), offline: base v0 built at initialisation with a stand-in tokenizer, a served
action chunk for two instructions in one batch, one LoRA step through LeRobot's trainer, the adapter merged, and
the merged checkpoint loaded back through the same ``BasePolicy.load``.

The model is loaded at most once at a time in this process (freed before the trainer's child loads its own):
about 10 GB each. Profile ``pi05-tiny`` runs every stage of the flywheel on the same base."""

from __future__ import annotations

import gc
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open

try:
    from builders import ENV_DIM, IMG_HW, TASKS, make_store
except ImportError:  # tests/ became a package
    from tests.builders import ENV_DIM, IMG_HW, TASKS, make_store
from pld_core.base_policy import BasePolicy
from pld_core.base_server import BaseServer
from pld_core.dataset import augment_quantiles, convert_stores
from pld_core.errors import PLDError
from pld_core.lora import check_merge_space
from pld_core.pi05 import load_streaming, stand_in_tokenizer
from pld_core.sft import init_policy, sft

PI05_TINY = {"type": "pi05", "paligemma_variant": "gemma_300m", "action_expert_variant": "gemma_300m",
             "image_resolution": [56, 56], "chunk_size": 10, "n_action_steps": 10, "num_inference_steps": 2,
             "tokenizer_max_length": 48, "scheduler_warmup_steps": 1}
CHECKPOINT_BYTES = 7.8e9  # PI05_TINY's model.safetensors: 1.945 B float32 parameters


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")


def _observations(seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"state": rng.normal(size=8).astype(np.float32), "env_state": rng.normal(size=ENV_DIM).astype(np.float32),
             "image": rng.integers(0, 256, (*IMG_HW, 3), dtype=np.uint8),
             "wrist_image": rng.integers(0, 256, (*IMG_HW, 3), dtype=np.uint8)} for _ in range(2)]


def _tensor(ckpt, key):
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        return f.get_tensor(key)


@pytest.mark.cost(420)  # seconds (conftest.longest_first)
def test_random_pi05_serves_a_chunk_trains_a_lora_step_merges_and_loads_back(tmp_path):
    """Needs two full checkpoints on disk at once (v0, and v1 as the merge writes it): it is skipped, saying so,
    where the disk cannot hold them, and deletes both when it ends, so that the rest of the suite has the space."""
    free = shutil.disk_usage(tmp_path).free
    if free < CHECKPOINT_BYTES:
        pytest.skip(f"a random pi0.5 checkpoint takes {CHECKPOINT_BYTES / 1e9:.1f} GB; {tmp_path} has {free / 1e9:.1f} GB free")
    try:
        _serve_train_merge_reload(tmp_path)
    finally:
        for d in ("v0", "v1"):
            shutil.rmtree(tmp_path / d, ignore_errors=True)


def _serve_train_merge_reload(tmp_path):
    store = make_store(tmp_path / "img.zarr", n_episodes=2, length=12, images=True, seed=3)
    ds = convert_stores([store], tmp_path / "ds", "local/ds")
    augment_quantiles(ds)  # pi0.5 normalizes state and action with q01/q99
    tok = stand_in_tokenizer(TASKS, tmp_path / "tokenizer")
    v0 = init_policy(ds, PI05_TINY, tmp_path / "v0", tokenizer=tok)
    pre = json.loads((v0 / "policy_preprocessor.json").read_text())
    assert [s["config"]["tokenizer_name"] for s in pre["steps"] if "tokenizer_name" in s.get("config", {})] == [str(tok)]

    # ---- the served chunk: two instructions in one forward pass, through the local tokenizer
    base = BasePolicy.load(v0, "images", env_state_dim=ENV_DIM)
    assert base.policy._pld_streamed  # built without random init, filled from the file: every tensor it holds
    state = base.policy.state_dict()
    with safe_open(str(v0 / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) <= set(state) and all(torch.equal(state[k], f.get_tensor(k)) for k in f.keys())
    del state
    step = next(s for s in base.preprocessor.steps if hasattr(s, "input_tokenizer"))
    ids = step.input_tokenizer(TASKS)["input_ids"]
    assert all(step.input_tokenizer.unk_token_id not in row for row in ids)  # every instruction word is known
    server = BaseServer(base, [])
    torch.manual_seed(0)
    chunk = server.predict(TASKS, _observations(0))
    assert chunk.shape == (2, 10, 7) and np.isfinite(chunk).all() and np.abs(chunk).max() <= 1.0
    assert base.n_model_calls == 1
    del base, server, step
    gc.collect()

    # ---- one LoRA step through LeRobot's trainer, merged into a full checkpoint
    try:
        check_merge_space(v0, tmp_path / "v1")  # what sft checks before it trains
    except PLDError as e:
        pytest.skip(f"the served chunk passed; the LoRA step, merge and reload need the disk: {e}")
    v1 = sft(ds, "local/ds", tmp_path / "v1", str(v0), steps=1, batch_size=2, lr=1e-2, lora={"r": 4},
             num_threads=2, log_freq=1)
    info = json.loads((tmp_path / "v1" / "sft_info.json").read_text())
    assert info["steps"] == 1 and info["lora"] == {"r": 4}
    assert (v1 / "lora_adapter").is_dir() and (v1 / "model.safetensors").is_file()
    with safe_open(str(v1 / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert not any("lora_" in k for k in keys)  # merged: plain weights only
    expert_q = next(k for k in keys if "gemma_expert" in k and k.endswith("self_attn.q_proj.weight"))
    vision = next(k for k in keys if "vision_tower" in k and k.endswith("weight"))
    assert not torch.equal(_tensor(v0, expert_q), _tensor(v1, expert_q))  # a LoRA target moved
    assert torch.equal(_tensor(v0, vision), _tensor(v1, vision))  # the rest is v0's

    # ---- and it loads back as the next base, values checked against the file
    nxt = BasePolicy.load(v1, "images", env_state_dim=ENV_DIM)
    assert nxt.policy.config.type == "pi05" and not nxt.policy.config.use_peft
    torch.manual_seed(0)
    again = BaseServer(nxt, []).predict(TASKS, _observations(0))
    assert again.shape == (2, 10, 7) and np.isfinite(again).all()


def test_pi05_weights_that_do_not_load_are_refused(tmp_path):
    """pi0.5's from_pretrained prints a load error and returns the model at random init: BasePolicy.load must
    see it. A config.json whose width differs from the weights' (a gemma_2b expert over gemma_300m weights)
    is refused by its shapes, weights left at init by their values; checked on stand-in models (no 10 GB build)."""
    from pld_core.base_policy import _check_loaded

    class Stub:
        def __init__(self, state):
            self._state = state

        def state_dict(self):
            return self._state

    from safetensors.torch import save_file

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file({"model.a": torch.ones(4, 3), "model.b": torch.zeros(2)}, str(ckpt / "model.safetensors"))
    _check_loaded(ckpt, Stub({"model.a": torch.ones(4, 3), "model.b": torch.zeros(2)}))  # loaded: fine
    with pytest.raises(PLDError, match=r"model\.a.*shape \(4, 3\).*\(8, 3\)"):
        _check_loaded(ckpt, Stub({"model.a": torch.ones(8, 3), "model.b": torch.zeros(2)}))
    with pytest.raises(PLDError, match=r"differs from model\.safetensors"):
        _check_loaded(ckpt, Stub({"model.a": torch.full((4, 3), 0.5), "model.b": torch.zeros(2)}), samples=2)


class _Tied(torch.nn.Module):
    """A stand-in with pi0.5's load-relevant traits: built from a config, a tied pair, a non-persistent buffer."""

    def __init__(self, config, **kwargs):
        super().__init__()
        self.embed = torch.nn.Embedding(5, 3)
        self.head = torch.nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.proj = torch.nn.Linear(3, 3)
        self.register_buffer("freq", torch.arange(3.0), persistent=False)
        torch.nn.init.normal_(self.proj.weight)


def test_streaming_load_fills_every_tensor_and_refuses_what_it_cannot_fill(tmp_path):
    from safetensors.torch import save_file

    src = _Tied(None)
    full = {k: v.detach().clone() for k, v in src.state_dict().items()}

    def ckpt(name, tensors):
        d = tmp_path / name
        d.mkdir()
        save_file(tensors, str(d / "model.safetensors"))
        return d

    one_tied = {k: v for k, v in full.items() if k != "head.weight"}  # what safetensors keeps of a tied pair
    m = load_streaming(_Tied, ckpt("tied", one_tied), config=object())
    assert m._pld_streamed and m.head.weight is m.embed.weight
    for k, v in full.items():
        assert torch.equal(m.state_dict()[k], v), k
    assert torch.equal(m.freq, torch.arange(3.0))  # built, not loaded

    assert load_streaming(_Tied, ckpt("full", full), config=object()) is not None
    assert load_streaming(_Tied, ckpt("extra", {**full, "other.weight": torch.ones(2)}), config=object()) is None
    assert load_streaming(_Tied, ckpt("short", {k: v for k, v in full.items() if k != "proj.bias"}), config=object()) is None
    assert load_streaming(_Tied, "lerobot/pi05_base", config=object()) is None  # a hub id: LeRobot's own path
