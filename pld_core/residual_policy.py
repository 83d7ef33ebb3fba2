"""The trained specialist as a policy, and its on-disk format (written and read here only).

A specialist directory holds ``residual.safetensors`` (actor, critic, target critic, log_alpha and the
encoder's statistics or image trunk) and ``config.json`` (format version, sizes, xi, the SAC config, the
encoder type, and what it was trained on: base spec, suite, task, mode). :func:`load_residual` gives a
:class:`ResidualPolicy`: the frozen base plus the residual, ``reset(env)`` / ``act(obs)`` like any policy.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from safetensors.torch import load_file, save_file

from pld_core.encoders import StateEncoder, check_encoder, encoder_from_tensors
from pld_core.errors import PLDError
from pld_core.features import ACT_DIM
from pld_core.sac import ResidualSAC, SACConfig

RESIDUAL_WEIGHTS = "residual.safetensors"
RESIDUAL_CONFIG = "config.json"
FORMAT_VERSION = 1


class ResidualPolicy:
    """Base policy + trained residual: ``reset(env)`` / ``act(obs)`` like any rollout policy.

    ``act`` returns the executed action clip(a_b + xi * delta) with the deterministic residual
    tanh(mean) by default. ``act_with_base`` also returns the base action (collect_pld's label
    during probing); ``residual_action(obs, a_b)`` applies the residual to a base action the caller
    already has (no second base call: LeRobot bases keep an action-chunk queue).
    """

    def __init__(self, sac: ResidualSAC, encoder: StateEncoder, base=None, make_base=None,
                 deterministic: bool = True, xi: float | None = None):
        self.sac, self.encoder = sac, encoder
        self.base, self.make_base = base, make_base
        self.deterministic = deterministic
        self.xi = xi
        self.use_base = sac.cfg.use_base

    def reset(self, env) -> None:
        if not self.use_base:
            return
        if self.base is None:
            if self.make_base is None:
                raise PLDError("ResidualPolicy has no base policy. Fix: pass base= or a base spec to load_residual")
            self.base = self.make_base(env)
        self.base.reset(env)

    def base_act(self, obs: dict) -> np.ndarray:
        if not self.use_base:
            return np.zeros(ACT_DIM, dtype=np.float32)
        return np.asarray(self.base.act(obs), dtype=np.float32)

    def residual_action(self, obs: dict, base_action: np.ndarray) -> np.ndarray:
        return self.sac.act(self.encoder(obs), base_action, deterministic=self.deterministic, xi=self.xi).astype(np.float32)

    def act_with_base(self, obs: dict) -> tuple[np.ndarray, np.ndarray]:
        a_b = self.base_act(obs)
        return self.residual_action(obs, a_b), a_b

    def act(self, obs: dict) -> np.ndarray:
        return self.act_with_base(obs)[0]




def save_residual(out_dir: Path, sac: ResidualSAC, encoder: StateEncoder, meta: dict) -> None:
    """``residual.safetensors`` (actor, critic, target, log_alpha, encoder stats) + ``config.json``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in sac.state_dict().items() if not k.startswith("optim.")}
    state.update(encoder.tensors())
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / RESIDUAL_WEIGHTS))
    config = {
        "format_version": FORMAT_VERSION,
        "obs_dim": sac.obs_dim,
        "act_dim": sac.act_dim,
        "xi": float(sac.xi),
        "sac": dataclasses.asdict(sac.cfg),
        "encoder": {"type": encoder.kind, "keys": list(encoder.keys)},
        **meta,
    }
    (out_dir / RESIDUAL_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))


def read_residual_config(path: Path) -> dict:
    path = Path(path)
    f = path / RESIDUAL_CONFIG
    if not f.is_file() or not (path / RESIDUAL_WEIGHTS).is_file():
        raise PLDError(f"{path}: not a residual specialist (needs {RESIDUAL_CONFIG} and {RESIDUAL_WEIGHTS}). Fix: point at a train_residual output dir")
    try:
        cfg = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise PLDError(f"{f}: not valid JSON ({e}). Fix: retrain the specialist") from None
    for key in ("format_version", "obs_dim", "act_dim", "xi", "sac", "encoder"):
        if key not in cfg:
            raise PLDError(f"{f}: key '{key}' missing. Fix: retrain the specialist with train_residual")
    if cfg["format_version"] != FORMAT_VERSION:
        raise PLDError(f"{f}: format_version {cfg['format_version']} != {FORMAT_VERSION}. Fix: retrain the specialist")
    return cfg


def load_residual(path: str | Path, base=None, device: str = "cpu", deterministic: bool = True, seed: int = 0) -> ResidualPolicy:
    """Load a specialist dir. ``base``: a policy object, a policy spec, or None (the spec it was trained with)."""
    path = Path(path)
    cfg = read_residual_config(path)
    check_encoder(cfg["encoder"].get("type", "?"))
    try:
        sac_cfg = SACConfig(**cfg["sac"])
    except TypeError as e:
        raise PLDError(f"{path / RESIDUAL_CONFIG}: key 'sac' does not match SACConfig ({e}). Fix: retrain the specialist") from None
    sac = ResidualSAC(int(cfg["obs_dim"]), int(cfg["act_dim"]), sac_cfg, device=device)
    state = load_file(str(path / RESIDUAL_WEIGHTS))
    sac.load_state_dict(state)
    sac.xi = float(cfg["xi"])
    encoder = encoder_from_tensors(state, str(path / RESIDUAL_WEIGHTS))
    if encoder.kind != cfg["encoder"].get("type"):
        raise PLDError(f"{path}: config.json says encoder '{cfg['encoder'].get('type')}', the weights hold a '{encoder.kind}' encoder. Fix: retrain the specialist")
    if encoder.dim != sac.obs_dim:
        raise PLDError(f"{path}: encoder dim {encoder.dim} != obs_dim {sac.obs_dim}. Fix: retrain the specialist")
    make_base = None
    if base is None or isinstance(base, str):
        from pld_core.policies import make_policy_factory

        spec = base or cfg.get("base")
        if sac_cfg.use_base and not spec:
            raise PLDError(f"{path / RESIDUAL_CONFIG}: no 'base' spec recorded. Fix: pass base= to load_residual")
        if spec:
            make_base = make_policy_factory(spec, mode=cfg.get("mode", "state"), device=device, seed=seed)
        base = None
    sac.actor.eval()
    return ResidualPolicy(sac, encoder, base=base, make_base=make_base, deterministic=deterministic)
