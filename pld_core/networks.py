"""Networks of the PLD specialist: the residual Gaussian actor and the clipped double-Q critic.

The residual actor sees the observation *and* the frozen base policy's action at that observation
and outputs a tanh-squashed Gaussian over a correction ``delta`` in [-1, 1]^act_dim. The action
sent to the robot is ``combine(base_action, delta, xi) = clip(base_action + xi * delta, -1, 1)``
(PLD, Sec. "Residual RL"). Its last layer is zero-initialised so a fresh specialist reproduces
the base policy exactly.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Normal

LOG_STD_MIN = -5.0
LOG_STD_MAX = 2.0


def _hidden_stack(
    in_dim: int,
    hidden: int,
    layers: int,
    layer_norm: bool,
    activation: type[nn.Module],
    dropout: float,
) -> list[nn.Module]:
    """``layers`` blocks of Linear -> Dropout -> LayerNorm -> activation (DroQ order)."""
    blocks: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers):
        blocks.append(nn.Linear(dim, hidden))
        if dropout > 0.0:
            blocks.append(nn.Dropout(dropout))
        if layer_norm:
            blocks.append(nn.LayerNorm(hidden))
        blocks.append(activation())
        dim = hidden
    return blocks


def mlp(
    in_dim: int,
    out_dim: int,
    hidden: int = 256,
    layers: int = 3,
    layer_norm: bool = True,
    activation: type[nn.Module] = nn.Tanh,
    dropout: float = 0.0,
) -> nn.Sequential:
    """MLP with ``layers`` hidden layers of width ``hidden``, then a linear output layer."""
    blocks = _hidden_stack(in_dim, hidden, layers, layer_norm, activation, dropout)
    blocks.append(nn.Linear(hidden if layers > 0 else in_dim, out_dim))
    return nn.Sequential(*blocks)


def combine(base_action: torch.Tensor, delta: torch.Tensor, xi: float) -> torch.Tensor:
    """The executed action (PLD): ``clip(a_base + xi * delta, -1, 1)``."""
    return torch.clamp(base_action + xi * delta, -1.0, 1.0)


class ResidualActor(nn.Module):
    """pi(delta | s, a_base): tanh-squashed Gaussian over the residual, zero-init last layer."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, layers: int = 3, out_dim: int | None = None):
        super().__init__()
        self.obs_dim = obs_dim
        self.act_dim = act_dim  # the base action it conditions on
        self.out_dim = act_dim if out_dim is None else out_dim  # the residual dims it outputs
        self.trunk = nn.Sequential(
            *_hidden_stack(obs_dim + act_dim, hidden, layers, True, nn.Tanh, 0.0)
        )
        feat = hidden if layers > 0 else obs_dim + act_dim
        self.mean_head = nn.Linear(feat, self.out_dim)
        self.log_std_head = nn.Linear(feat, self.out_dim)
        # Zero-init last layer: mean delta is exactly 0, so the specialist starts as the base
        # policy; log_std starts at the midpoint of [LOG_STD_MIN, LOG_STD_MAX] (std ~ 0.22).
        for head in (self.mean_head, self.log_std_head):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(
        self, obs: torch.Tensor, base_action: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-squash Gaussian parameters ``(mean, log_std)``, each (B, out_dim)."""
        h = self.trunk(torch.cat([obs, base_action], dim=-1))
        mean = self.mean_head(h)
        # Bounded log-std by tanh rescaling (CleanRL): log_std in [LOG_STD_MIN, LOG_STD_MAX].
        log_std = torch.tanh(self.log_std_head(h))
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (log_std + 1.0)
        return mean, log_std

    def sample(
        self, obs: torch.Tensor, base_action: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reparameterised ``(delta, log_prob, mean_delta)``; log_prob is (B,)."""
        mean, log_std = self(obs, base_action)
        normal = Normal(mean, log_std.exp())
        u = normal.rsample()
        delta = torch.tanh(u)
        # Tanh change of variables: log pi(delta) = log N(u) - sum log(1 - tanh(u)^2).
        log_prob = normal.log_prob(u).sum(-1) - torch.log(1.0 - delta.pow(2) + 1e-6).sum(-1)
        return delta, log_prob, torch.tanh(mean)

    def deterministic(self, obs: torch.Tensor, base_action: torch.Tensor) -> torch.Tensor:
        """The mode-free deterministic residual ``tanh(mean)`` used at evaluation."""
        mean, _ = self(obs, base_action)
        return torch.tanh(mean)


class DoubleQ(nn.Module):
    """``n_heads`` independent Q(s, a) MLPs with LayerNorm (clipped double Q when n_heads=2)."""

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden: int = 256,
        layers: int = 3,
        n_heads: int = 2,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.heads = nn.ModuleList(
            mlp(obs_dim + act_dim, 1, hidden, layers, True, nn.Tanh, dropout)
            for _ in range(n_heads)
        )

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Q values of every head, shape (n_heads, B)."""
        x = torch.cat([obs, action], dim=-1)
        return torch.stack([head(x).squeeze(-1) for head in self.heads], dim=0)
