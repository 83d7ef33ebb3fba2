"""The residual's observation encoders: what the critic and the residual actor see.

:class:`StateEncoder` (``residual.encoder: state``): the concatenation of ``state`` (8) and ``env_state`` (objects +
task one-hot), normalised with the mean/std of the offline store, fixed for the whole run (so the replay holds
normalised vectors and Cal-QL, SAC and the saved specialist all see the same inputs).

:class:`ImageEncoder` (``residual.encoder: image``, ``env.mode: images``): ``state`` plus frozen ResNet-18 latents of
both cameras, so the replay holds latents, never pixels.

Camera frames become latents before anything is stored: the online replay and the offline buffer
hold ``concat(state (8), latent(agentview) (512), latent(wrist) (512))`` = 1032 floats per row,
normalised with the offline store's mean/std exactly like :class:`StateEncoder`
(privileged object poses, ``env_state``, are not an input in this mode). Pixels stay only in the
offline Zarr store (the distillation needs them); they are encoded once when the offline buffer is
built.

The trunk is torchvision's ResNet-18 without its classifier (global-average-pooled ``layer4``: 512
features per camera), shared by both cameras, in eval mode with gradients off: SAC never changes it.
Its weights (``residual.image_encoder_weights``):

- a local safetensors file holding a torchvision ResNet-18 ``state_dict`` (ImageNet weights, or the
  vision trunk of your base), loaded strictly (the ``fc.*`` keys are ignored);
- ``null``: a fixed random initialisation (seed 0). Random convolutional features separate states,
  but a real run should give pretrained weights; nothing is downloaded.

The trunk's weights are saved inside the specialist (``encoder.backbone.*`` in
``residual.safetensors``), so a specialist loads without the weights file.

Replay memory at the paper's 250k capacity: one row per observation (the next observation of a
transition is the next row, not a copy), 1032 float32 + two actions + four scalars = 4,197 bytes,
so 250k rows take 1.05 GB (state mode: 48 floats, 261 bytes a row, 65 MB). Latents in float16 would halve the
observation part; ``replay_bytes`` computes it for any size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pld_core.errors import PLDError
from pld_core.store import TrajectoryStore


class StateEncoder:
    """obs dict -> normalised vector ``(concat(state, env_state) - mean) / std``, clipped to +-10.

    The statistics come from the offline store and stay fixed. Features constant in the data
    (e.g. the task one-hot) get std 1, so they map to 0 instead of blowing up.
    """

    kind = "state"
    keys = ("state", "env_state")
    store_keys = ("obs_state", "obs_env_state")
    CLIP = 10.0

    def __init__(self, mean: np.ndarray, std: np.ndarray):
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        if self.mean.shape != self.std.shape or self.mean.ndim != 1:
            raise PLDError(f"state encoder: mean {self.mean.shape} and std {self.std.shape} must be equal 1-D shapes")

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @staticmethod
    def fit_stats(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raw = np.asarray(raw, dtype=np.float64)
        if raw.ndim != 2 or len(raw) == 0:
            raise PLDError("state encoder: no observations to fit mean/std on. Fix: collect offline episodes first")
        mean, std = raw.mean(0), raw.std(0)
        return mean, np.where(std < 1e-6, 1.0, np.maximum(std, 1e-3))

    @classmethod
    def fit(cls, raw: np.ndarray) -> "StateEncoder":
        return cls(*cls.fit_stats(raw))

    @classmethod
    def from_store(cls, store: TrajectoryStore) -> "StateEncoder":
        steps = store.load(list(cls.store_keys), validate=False)
        return cls.fit(np.concatenate([steps[k] for k in cls.store_keys], axis=1))

    def raw_rows(self, steps: dict[str, np.ndarray]) -> np.ndarray:
        """Un-normalised rows from store arrays (``store_keys``), as :meth:`raw` gives one observation."""
        return np.concatenate([steps[k] for k in self.store_keys], axis=1)

    def raw(self, obs: dict) -> np.ndarray:
        return np.concatenate([np.asarray(obs[k], dtype=np.float32).reshape(-1) for k in self.keys])

    def normalize(self, raw: np.ndarray) -> np.ndarray:
        return np.clip((np.asarray(raw, dtype=np.float32) - self.mean) / self.std, -self.CLIP, self.CLIP).astype(np.float32)

    def __call__(self, obs: dict) -> np.ndarray:
        return self.normalize(self.raw(obs))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"encoder.mean": torch.from_numpy(self.mean.copy()), "encoder.std": torch.from_numpy(self.std.copy())}

    @classmethod
    def from_tensors(cls, state: dict[str, torch.Tensor], where: str) -> "StateEncoder":
        if "encoder.mean" not in state or "encoder.std" not in state:
            raise PLDError(f"{where}: keys 'encoder.mean'/'encoder.std' missing; it was not written by train_residual. Fix: retrain the specialist")
        return cls(state["encoder.mean"].numpy(), state["encoder.std"].numpy())


def check_encoder(kind: str, mode: str | None = None) -> None:
    if kind not in ("state", "image"):
        raise PLDError(f"residual.encoder '{kind}' is unknown. Fix: state or image")
    if kind == "image" and mode is not None and mode != "images":
        raise PLDError(f"residual.encoder: image needs camera frames, but env.mode is '{mode}'. "
                       "Fix: set env.mode: images, or residual.encoder: state")


def make_encoder(params, store: TrajectoryStore) -> StateEncoder:
    """The residual's observation encoder for ``params.residual.encoder``, fitted on the offline store."""
    check_encoder(params.residual.encoder, params.env.mode)
    if params.residual.encoder == "image":
        return ImageEncoder.from_store(store, build_backbone(params.residual.image_encoder_weights))
    return StateEncoder.from_store(store)


def encoder_from_tensors(state: dict[str, torch.Tensor], where: str) -> StateEncoder:
    """The encoder saved with a critic or a specialist (an image trunk when its weights are there)."""
    return (ImageEncoder if has_backbone(state) else StateEncoder).from_tensors(state, where)


CAMERAS = ("image", "wrist_image")
STORE_CAMERAS = ("obs_image", "obs_wrist_image")
LATENT_DIM = 512
BATCH = 64
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
_PREFIX = "encoder.backbone."


def build_backbone(weights: str | Path | None = None, where: str = "residual.image_encoder_weights") -> torch.nn.Module:
    """ResNet-18 trunk (fc removed), frozen; ``weights``: a safetensors state dict, or None (seed-0 init)."""
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = torchvision.models.resnet18(weights=None)
    net.fc = torch.nn.Identity()
    if weights:
        path = Path(weights)
        if not path.is_file():
            raise PLDError(f"{where}: {path} is not a file. Fix: give a safetensors file of a torchvision ResNet-18 "
                           "state_dict (e.g. saved once with save_file(resnet18(weights='DEFAULT').state_dict(), path)), or null")
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise PLDError(f"{where}: {path} is not a readable safetensors file ({e}). Fix: re-save the weights with safetensors") from None
        _load_strict(net, {k: v for k, v in state.items() if not k.startswith("fc.")}, f"{where}: {path}")
    return freeze(net)


def freeze(net: torch.nn.Module) -> torch.nn.Module:
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def _load_strict(net: torch.nn.Module, state: dict, where: str) -> None:
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise PLDError(f"{where}: not a torchvision ResNet-18 state_dict ({str(e)[:300]}). "
                       "Fix: save resnet18().state_dict() (the fc keys may be left in)") from None


@torch.no_grad()
def embed(net: torch.nn.Module, frames: np.ndarray) -> np.ndarray:
    """``(N, H, W, 3)`` uint8 frames -> ``(N, 512)`` float32 latents, in batches of 64."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise PLDError(f"image encoder: frames must be (N, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    out = np.empty((len(frames), LATENT_DIM), dtype=np.float32)
    for i in range(0, len(frames), BATCH):
        x = torch.from_numpy(np.ascontiguousarray(frames[i:i + BATCH])).permute(0, 3, 1, 2).float().div_(255.0)
        out[i:i + BATCH] = net((x - _MEAN) / _STD).numpy()
    return out


class ImageEncoder(StateEncoder):
    """obs -> normalised ``concat(state, latent(image), latent(wrist_image))``; the trunk stays frozen."""

    kind = "image"
    keys = ("state", *CAMERAS)
    store_keys = ("obs_state", *STORE_CAMERAS)

    def __init__(self, mean: np.ndarray, std: np.ndarray, backbone: torch.nn.Module):
        super().__init__(mean, std)
        self.backbone = freeze(backbone)

    @classmethod
    def from_store(cls, store, backbone: torch.nn.Module | None = None) -> "ImageEncoder":
        missing = [k for k in cls.store_keys if k not in store.step_array_names]
        if missing:
            raise PLDError(f"{store.path}: no {missing} arrays, so the image encoder has nothing to encode. "
                           "Fix: collect the offline store with env.mode: images")
        backbone = backbone if backbone is not None else build_backbone(None)
        steps = store.load(list(cls.store_keys), validate=False)
        mean, std = cls.fit_stats(cls.raw_rows_with(backbone, steps))
        return cls(mean, std, backbone)

    @staticmethod
    def raw_rows_with(backbone: torch.nn.Module, steps: dict) -> np.ndarray:
        return np.concatenate([np.asarray(steps["obs_state"], dtype=np.float32)]
                              + [embed(backbone, steps[k]) for k in STORE_CAMERAS], axis=1)

    def raw_rows(self, steps: dict) -> np.ndarray:
        return self.raw_rows_with(self.backbone, steps)

    def raw(self, obs: dict) -> np.ndarray:
        missing = [k for k in CAMERAS if k not in obs]
        if missing:
            raise PLDError(f"image encoder: the observation has no {missing}. Fix: env.mode: images (residual.encoder: image needs cameras)")
        latents = embed(self.backbone, np.stack([obs[k] for k in CAMERAS]))
        return np.concatenate([np.asarray(obs["state"], dtype=np.float32).reshape(-1), latents.reshape(-1)])

    def tensors(self) -> dict[str, torch.Tensor]:
        out = super().tensors()
        out.update({_PREFIX + k: v.detach().clone() for k, v in self.backbone.state_dict().items()})
        return out

    @classmethod
    def from_tensors(cls, state: dict[str, torch.Tensor], where: str) -> "ImageEncoder":
        stats = StateEncoder.from_tensors(state, where)
        net = build_backbone(None)
        _load_strict(net, {k[len(_PREFIX):]: v for k, v in state.items() if k.startswith(_PREFIX)}, where)
        return cls(stats.mean, stats.std, net)


def has_backbone(state: dict) -> bool:
    return any(k.startswith(_PREFIX) for k in state)


def replay_bytes(capacity: int, obs_dim: int, act_dim: int = 7) -> int:
    """RAM of a ``ReplayBuffer`` of ``capacity`` rows (what it allocates)."""
    from pld_core.replay import ReplayBuffer

    return ReplayBuffer(capacity, obs_dim, act_dim, 0.99).nbytes


def encoder_weights_identity(params) -> str | None:
    """What identifies ``residual.image_encoder_weights`` in a stage key: the file's content digest."""
    import hashlib

    weights = params.residual.image_encoder_weights
    if not weights:
        return None
    path = Path(weights)
    if not path.is_file():
        raise PLDError(f"params.yaml: residual.image_encoder_weights: {path} is not a file. "
                       "Fix: give a safetensors file of a torchvision ResNet-18 state_dict, or null")
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]
