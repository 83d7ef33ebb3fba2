"""The frozen base policy: an adapter around any LeRobot policy checkpoint.

PLD never changes the base while probing and learning ("Probe" and "Learn"): it only
asks it for actions. This adapter wraps LeRobot's own policy class and its saved processor
pipelines (normalization, tokenization, device) rather than re-implementing them:
``<Policy>.from_pretrained(dir)`` + ``make_pre_post_processors(config, pretrained_path=dir)``, then
``post(policy.select_action(pre(batch)))``. The policy keeps its own action-chunk queue: the model
runs once every ``n_action_steps`` calls of :meth:`BasePolicy.act`, and :meth:`BasePolicy.reset`
empties the queue at every episode start.

Everything a user can get wrong is checked in :meth:`BasePolicy.load`, before any rollout:
the path, that it is a LeRobot checkpoint (config.json with a known ``type``, weights, processor
files), and that the environment's observation mode can give every input feature the
checkpoint asks for.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from pld_core.errors import PLDError
from pld_core.features import ACT_DIM, OBS_FEATURES, STATE_DIM, env_key_for_lerobot, env_keys_for_mode, lerobot_key

log = logging.getLogger(__name__)

OBS_MODES = ("state", "images")
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PROCESSOR_FILES = ("policy_preprocessor.json", "policy_postprocessor.json")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# built on LeRobot's PaliGemma: pld_core.pi05.patch_lerobot sizes a gemma_300m VLM's image projector
PI_TYPES = ("pi0", "pi05", "pi0_fast")
# methods that run the model to refill the action queue (smolvla uses the private one)
_CHUNK_METHODS = ("predict_action_chunk", "_get_action_chunk")


def _fail(path: Any, what: str, fix: str) -> PLDError:
    return PLDError(f"base policy checkpoint {path}: {what}. Fix: {fix}")


# --------------------------------------------------------------------------------- checkpoint
def find_checkpoint_dir(path: Path) -> Path:
    """The pretrained_model directory at or under ``path`` (a train output dir is accepted too)."""
    if (path / CONFIG_FILE).is_file():
        return path
    for sub in ("pretrained_model", "checkpoints/last/pretrained_model"):
        if (path / sub / CONFIG_FILE).is_file():
            return path / sub
    raise _fail(path, f"no {CONFIG_FILE}, so it is not a LeRobot checkpoint",
                "point at a LeRobot `pretrained_model` directory (config.json, model.safetensors, "
                "policy_preprocessor.json, ...), e.g. <train output>/checkpoints/last/pretrained_model")


def read_checkpoint_config(ckpt: Path) -> dict:
    """config.json as a dict, checked for a known policy ``type``, weights and processor files."""
    import lerobot.policies  # noqa: F401  (importing it registers the built-in policy configs)
    from lerobot.configs import PreTrainedConfig
    from lerobot.utils.import_utils import register_third_party_plugins

    register_third_party_plugins()  # lerobot_policy_* packages register their types on import

    try:
        raw = json.loads((ckpt / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise _fail(ckpt, f"{CONFIG_FILE} is not readable JSON ({e})", "restore the file from the training output") from e
    ptype = raw.get("type") if isinstance(raw, dict) else None
    if not ptype:
        raise _fail(ckpt, f"{CONFIG_FILE} has no 'type' key", "use a config.json written by LeRobot's save_pretrained")
    known = PreTrainedConfig.get_known_choices()
    if ptype not in known:
        raise _fail(ckpt, f"policy type '{ptype}' in {CONFIG_FILE} is not a LeRobot policy type "
                    f"(known: {', '.join(sorted(known))})", "use a checkpoint of a LeRobot 0.6 policy, or install its plugin")
    if (ckpt / "adapter_config.json").is_file() and not (ckpt / WEIGHTS_FILE).is_file():
        raise _fail(ckpt, "holds only a PEFT/LoRA adapter, no full weights",
                    "use the merged checkpoint that pld_core.sft.sft writes, or merge the adapter into its base")
    if not (ckpt / WEIGHTS_FILE).is_file():
        raise _fail(ckpt, f"weights file {WEIGHTS_FILE} is missing", "copy the whole pretrained_model directory")
    for name in PROCESSOR_FILES:
        if not (ckpt / name).is_file():
            raise _fail(ckpt, f"processor file {name} is missing (normalization stats live there)",
                        "copy the whole pretrained_model directory written by lerobot-train (LeRobot >= 0.4)")
    return raw


def resolve_checkpoint(path_or_repo_id: str | Path) -> Path:
    """A local pretrained_model dir for a path or, when no such path exists, a hub repo id."""
    s = str(path_or_repo_id)
    local = Path(s).expanduser()
    if local.exists():
        if not local.is_dir():
            raise _fail(local, "is a file, not a directory", "point at the pretrained_model directory")
        return find_checkpoint_dir(local)
    if not _REPO_ID.match(s):
        raise _fail(local, "does not exist", "check the path (a hub id looks like 'owner/name')")
    return _download(s)


def _download(repo_id: str) -> Path:
    from huggingface_hub import constants, snapshot_download

    offline = constants.HF_HUB_OFFLINE
    try:
        # offline: served from the local HF cache or LocalEntryNotFoundError at once
        local = snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, etag_timeout=10)
    except Exception as e:
        why = "HF_HUB_OFFLINE=1 and it is not in the local HF cache" if offline else f"{type(e).__name__}: {e}"
        raise PLDError(
            f"base policy checkpoint '{repo_id}': no such local path, and fetching it as a hub repo "
            f"failed ({why}). Fix: check the path, or download it once where the hub is reachable "
            f"(`hf download {repo_id}`) and point at the local copy") from e
    return find_checkpoint_dir(Path(local))


def check_input_features(ckpt: Path | str, input_features: dict[str, tuple[int, ...]], obs_mode: str,
                         env_state_dim: int | None = None) -> None:
    """Raise PLDError if the env in ``obs_mode`` cannot give a feature the checkpoint expects."""
    if obs_mode not in OBS_MODES:
        raise PLDError(f"obs_mode '{obs_mode}' unknown. Fix: use one of {OBS_MODES}")
    available = {lerobot_key(k) for k in env_keys_for_mode(obs_mode)}
    for key, shape in input_features.items():
        env_key = env_key_for_lerobot(key)
        if env_key is None:
            raise _fail(ckpt, f"expects input feature '{key}', which the LIBERO environment does not give "
                        f"(it gives {sorted(lerobot_key(k) for k in OBS_FEATURES)})",
                        "use a checkpoint trained on pld's feature names (see pld_core/features.py)")
        if key not in available:
            raise _fail(ckpt, f"expects input feature '{key}', which obs mode '{obs_mode}' cannot give",
                        "run with obs_mode='images' (camera rendering on), or use a checkpoint that needs no cameras")
        if env_key == "state" and tuple(shape) != (STATE_DIM,):
            raise _fail(ckpt, f"expects '{key}' of shape {tuple(shape)}, the env gives ({STATE_DIM},)",
                        "use a checkpoint trained on LIBERO's 8-dim state")
        if env_key == "env_state" and env_state_dim is not None and tuple(shape) != (env_state_dim,):
            raise _fail(ckpt, f"expects '{key}' of shape {tuple(shape)}, the env gives ({env_state_dim},)",
                        "use a checkpoint trained on the same suite (its object poses + task one-hot)")


def _check_weights(ckpt: Path, policy) -> None:
    """from_pretrained loads non-strictly: refuse weights that do not belong to this model."""
    from safetensors import safe_open

    with safe_open(str(ckpt / WEIGHTS_FILE), framework="pt") as f:
        saved = set(f.keys())
    expected = set(policy.state_dict().keys())
    missing = expected - saved
    if expected and len(missing) > len(expected) // 2:
        raise _fail(ckpt, f"{WEIGHTS_FILE} lacks {len(missing)} of the model's {len(expected)} tensors "
                    f"(e.g. {sorted(missing)[:3]})", "the weights belong to another model: copy the matching model.safetensors")
    if missing:
        log.warning("checkpoint %s: %d tensors not in %s (left at init): %s", ckpt, len(missing), WEIGHTS_FILE, sorted(missing)[:5])


def _check_loaded(ckpt: Path, policy, samples: int = 8) -> None:
    """For a policy class with its own from_pretrained: that the weights were loaded, not just the keys found.
    pi0 and pi0.5 print a load error (a shape mismatch, an unreadable file) and return the model at random
    init; so every shared tensor's shape is compared, and the values of ``samples`` of them, spread over the model."""
    import torch
    from safetensors import safe_open

    state = policy.state_dict()
    with safe_open(str(ckpt / WEIGHTS_FILE), framework="pt") as f:
        shared = [k for k in f.keys() if k in state]
        for k in shared:
            shape = tuple(f.get_slice(k).get_shape())
            if shape != tuple(state[k].shape):
                raise _fail(ckpt, f"tensor '{k}' in {WEIGHTS_FILE} has shape {shape}, the model built from "
                            f"{CONFIG_FILE} has {tuple(state[k].shape)}, so the weights were not loaded",
                            "use the config.json saved with these weights (for a gemma_300m pi0.5, load it "
                            "through pld, which sizes the image projector to the language model)")
        step = max(1, len(shared) // samples)
        for k in shared[::step]:
            if not torch.equal(f.get_tensor(k).to(state[k].dtype), state[k].detach().cpu()):
                raise _fail(ckpt, f"tensor '{k}' of the loaded model differs from {WEIGHTS_FILE}: the policy "
                            "class did not load the weights (see its printed load error)",
                            "check that the checkpoint's files belong together (config.json, model.safetensors)")


# --------------------------------------------------------------------------------- adapter
def require_device(device: str, who: str) -> None:
    """One clear error when CUDA is asked for on a machine without it."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PLDError(f"{who}: device '{device}' asked, but CUDA is not available. Fix: use device='cpu' (params.yaml device)")


class BasePolicy:
    """A frozen LeRobot policy that maps one env observation to one 7-dim action."""

    def __init__(self, policy, preprocessor, postprocessor, checkpoint_path: Path, obs_mode: str, device: str):
        self.policy = policy
        self.preprocessor = preprocessor
        self.postprocessor = postprocessor
        self.checkpoint_path = Path(checkpoint_path)
        self.obs_mode = obs_mode
        self.device = device
        self.policy_type: str = policy.config.type
        self.input_features: dict[str, tuple[int, ...]] = {
            k: tuple(ft.shape) for k, ft in policy.config.input_features.items()}
        self.image_keys = [k for k in self.input_features if (e := env_key_for_lerobot(k)) and OBS_FEATURES[e][2]]
        self.n_action_steps: int = int(getattr(policy.config, "n_action_steps", 1) or 1)
        self.n_model_calls = 0
        self.task = ""
        self._called = False
        for name in _CHUNK_METHODS:
            if callable(getattr(policy, name, None)):
                setattr(policy, name, self._counted(getattr(policy, name)))

    def _counted(self, fn):
        """Observe the chunk-prediction method: a real forward pass happens inside it.

        The wrapper is stored on the policy, so it holds the policy and this adapter only weakly: strong
        references would make a cycle (policy -> wrapper -> bound method -> policy) that only the cyclic
        garbage collector frees, and a process that loads one base per stage (a flywheel's) would then hold
        several copies (7.4 GB each for a tiny pi0.5) until it happens to run."""
        owner = weakref.ref(self)
        if inspect.ismethod(fn):
            func, target = fn.__func__, weakref.ref(fn.__self__)

            def call(*args, **kwargs):
                return func(target(), *args, **kwargs)
        else:
            call = fn

        def wrapper(*args, **kwargs):
            me = owner()
            if me is not None:
                me._called = True  # nested or repeated calls within one act() count once
            return call(*args, **kwargs)
        return wrapper

    # ------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, path_or_repo_id: str | Path, obs_mode: str, env_state_dim: int | None = None,
             device: str = "cpu") -> "BasePolicy":
        from lerobot.configs import PreTrainedConfig
        from lerobot.policies.factory import get_policy_class, make_pre_post_processors

        if obs_mode not in OBS_MODES:
            raise PLDError(f"obs_mode '{obs_mode}' unknown. Fix: use one of {OBS_MODES}")
        require_device(device, "the base policy")
        ckpt = resolve_checkpoint(path_or_repo_id)
        raw = read_checkpoint_config(ckpt)
        feats = {k: tuple(v.get("shape", ())) for k, v in (raw.get("input_features") or {}).items()}
        check_input_features(ckpt, feats, obs_mode, env_state_dim)
        out = (raw.get("output_features") or {}).get("action", {}).get("shape")
        if out is not None and tuple(out) != (ACT_DIM,):
            raise _fail(ckpt, f"outputs 'action' of shape {tuple(out)}, LIBERO takes ({ACT_DIM},)",
                        "use a checkpoint trained on LIBERO's 7-dim delta-pose + gripper actions")
        try:
            config = PreTrainedConfig.from_pretrained(ckpt)
        except Exception as e:
            raise _fail(ckpt, f"{CONFIG_FILE} does not parse as a '{raw['type']}' config ({type(e).__name__}: {e})",
                        "use a checkpoint written by LeRobot 0.6") from e
        config.device = device
        if config.type in PI_TYPES:
            from pld_core.pi05 import patch_lerobot

            patch_lerobot()
        try:
            policy_cls = get_policy_class(config.type)
            policy = policy_cls.from_pretrained(ckpt, config=config)
        except Exception as e:
            raise _fail(ckpt, f"the '{config.type}' policy cannot be built from it ({type(e).__name__}: {e})",
                        "check the weights match config.json, and that the policy's extra is installed") from e
        _check_weights(ckpt, policy)
        from lerobot.policies.pretrained import PreTrainedPolicy

        if policy_cls.from_pretrained.__func__ is not PreTrainedPolicy.from_pretrained.__func__:
            _check_loaded(ckpt, policy)
        # move the saved pipelines' device step (trained on a GPU, say) to ours; LeRobot
        # rejects overrides for steps a pipeline does not have
        overrides = []
        for name, dev in zip(PROCESSOR_FILES, (device, "cpu")):
            steps = json.loads((ckpt / name).read_text()).get("steps", [])
            has_device = any(st.get("registry_name") == "device_processor" for st in steps)
            overrides.append({"device_processor": {"device": dev}} if has_device else {})
        try:
            pre, post = make_pre_post_processors(
                policy.config, pretrained_path=str(ckpt),
                preprocessor_overrides=overrides[0], postprocessor_overrides=overrides[1],
            )
        except Exception as e:
            raise _fail(ckpt, f"its processor pipelines cannot be loaded ({type(e).__name__}: {e})",
                        "copy the processor files with the weights; a tokenizer the processor needs must be in the "
                        "local HF cache when HF_HUB_OFFLINE=1") from e
        policy.eval()
        for p in policy.parameters():
            p.requires_grad_(False)
        return cls(policy, pre, post, ckpt, obs_mode, device)

    # ------------------------------------------------------------------------- acting
    def reset(self, task: str) -> None:
        """Start an episode: empty the action-chunk queue, set the language instruction."""
        self.policy.reset()
        for pipe in (self.preprocessor, self.postprocessor):
            if hasattr(pipe, "reset"):
                pipe.reset()
        self.task = str(task)

    def build_batch(self, obs: dict[str, np.ndarray]) -> dict[str, Any]:
        """Env observation -> LeRobot batch (before the pre-processor), as lerobot-eval builds it:
        state features float32 (1, D); images uint8 HWC -> float32 (1, 3, H, W) in [0, 1];
        ``task`` a one-element list of the instruction."""
        import torch

        batch: dict[str, Any] = {}
        for key in self.input_features:
            env_key = env_key_for_lerobot(key)
            if env_key not in obs:
                raise PLDError(f"observation lacks '{env_key}', needed for the base policy's '{key}' "
                               f"(checkpoint {self.checkpoint_path}). Fix: run the env in obs mode "
                               f"'{'images' if OBS_FEATURES[env_key][2] else self.obs_mode}'")
            x = np.asarray(obs[env_key])
            if OBS_FEATURES[env_key][2]:
                if x.dtype != np.uint8 or x.ndim != 3 or x.shape[-1] != 3:
                    raise PLDError(f"observation '{env_key}' must be uint8 (H, W, 3), got {x.dtype} {x.shape}. "
                                   "Fix: pass the env's raw RGB image")
                t = torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1).to(torch.float32).div_(255.0)
            else:
                want = self.input_features[key]
                if tuple(x.shape) != tuple(want):
                    raise PLDError(f"observation '{env_key}' has shape {x.shape}, the base policy "
                                   f"({self.checkpoint_path}) expects {want} for '{key}'. Fix: use the env "
                                   "the checkpoint was trained on")
                t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            batch[key] = t.unsqueeze(0)
        batch["task"] = [self.task]
        return batch

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """One action (7,) float32 for one observation; runs the model when the chunk queue is empty."""
        import torch

        batch = self.build_batch(obs)
        self._called = False
        with torch.inference_mode():
            action = self.postprocessor(self.policy.select_action(self.preprocessor(batch)))
        if self._called:
            self.n_model_calls += 1
        a = action.detach().to("cpu", torch.float32).numpy().reshape(-1)
        if a.shape != (ACT_DIM,):
            raise PLDError(f"base policy {self.checkpoint_path} returned an action of shape {a.shape}, "
                           f"expected ({ACT_DIM},). Fix: use a LIBERO checkpoint")
        # LIBERO's controller takes actions in [-1, 1] (it clips); a regressed policy can overshoot
        # (ACT gave 1.24). Return what is executed, so stores hold the executed action.
        return np.clip(a, -1.0, 1.0)

    def __repr__(self) -> str:
        return (f"BasePolicy(type={self.policy_type}, checkpoint={self.checkpoint_path}, obs_mode={self.obs_mode}, "
                f"n_action_steps={self.n_action_steps}, inputs={list(self.input_features)})")
