"""Cal-QL critic warm-start on the base policy's successful rollouts (PLD, "Probe" stage).

Calibrated Q-learning (Nakamoto et al. 2023) = CQL with the Q values of policy actions
lower-bounded by the Monte-Carlo return of the data, so the conservative term never pushes the
critic below the value the base policy actually achieved:

- TD loss                 sum_j mean (Q_j(s, a) - y)^2, y from :meth:`ResidualSAC.td_target`
- calibration             Q~_j(s, a_pi) = max(Q_j(s, a_pi), G_MC(s, a))
- conservative term       sum_j mean [ T logsumexp_i( X_ij / T ) - Q_j(s, a_data) ]
      over N uniform actions  X = Q_j(s, a_unif) - log U,           log U = -act_dim log 2
      N policy actions at s   X = Q~_j(s, a_pi(s)) - log pi_a(a_pi(s))
      N policy actions at s'  X = Q~_j(s, a_pi(s')) - log pi_a(a_pi(s'))
- critic loss             TD loss + cql_alpha * conservative term

Policy actions are executed actions a = clip(a_b + xi * delta); their log density in action
space is log pi(delta) - res_dim * log(xi) [- log(xi_gripper / xi)] (change of variables of the xi scaling; the clip is
ignored), so all three importance-sampled terms are densities over the same action space.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pld_core.errors import PLDError
from pld_core.replay import ReplayBuffer, to_torch
from pld_core.sac import ResidualSAC


@dataclass
class CalQLConfig:
    """Cal-QL terms; every other hyperparameter (gamma, batch, lr, ratio, xi...) is the SAC's ``sac.cfg``."""

    cql_alpha: float = 5.0
    """Weight of the conservative term."""
    n_actions: int = 10
    """Sampled actions per state for each of the three logsumexp terms."""
    temperature: float = 1.0
    """CQL temperature T of the logsumexp."""


def _policy_action_log_density(sac: ResidualSAC, logp_delta: torch.Tensor) -> torch.Tensor:
    """log density of the executed action: log pi(delta) - res_dim * log(xi) - log(gripper gain) (no
    clip; over the residual's dims, the others being the base's; the gain is xi_gripper / xi)."""
    if not sac.cfg.use_base:
        return logp_delta
    log_xi = math.log(sac.xi) if sac.xi > 0 else -math.inf
    return logp_delta - sac.res_dim * log_xi - math.log(sac.gripper_gain)


def calql_critic_loss(
    sac: ResidualSAC, batch: dict[str, torch.Tensor], cfg: CalQLConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """Cal-QL critic loss = SAC TD loss + cql_alpha * calibrated conservative term."""
    mc_return = batch["mc_return"]
    if torch.isnan(mc_return).any():
        raise PLDError(
            "Cal-QL needs Monte-Carlo returns, but the batch has NaN mc_return; store "
            "'mc_return' for the offline episodes (ReplayBuffer.add_episode computes it when None)."
        )
    td_loss, metrics = sac.critic_td_loss(batch)

    obs, next_obs = batch["obs"], batch["next_obs"]
    N, B, A = cfg.n_actions, obs.shape[0], sac.act_dim
    obs_rep = obs.repeat(N, 1)  # row i*B + b is sample i of state b
    with torch.no_grad():
        # Uniform actions over [-1, 1]^A and their log density.
        a_unif = torch.rand(N * B, A, device=obs.device) * 2.0 - 1.0
        log_unif = -A * math.log(2.0)
        # Policy actions at s, conditioned on the base action at s.
        base = sac.base(batch["base_action"]).repeat(N, 1)
        delta, logp, _ = sac.actor.sample(obs_rep, base)
        a_pi = sac.executed(base, delta)
        log_pi = _policy_action_log_density(sac, logp).view(N, B)
        # Policy actions at s', conditioned on the stored next base action, evaluated at s.
        next_base = sac.base(batch["next_base_action"]).repeat(N, 1)
        next_delta, next_logp, _ = sac.actor.sample(next_obs.repeat(N, 1), next_base)
        a_pi_next = sac.executed(next_base, next_delta)
        log_pi_next = _policy_action_log_density(sac, next_logp).view(N, B)

    H = sac.cfg.n_q
    q_unif = sac.critic(obs_rep, a_unif).view(H, N, B)
    q_pi = sac.critic(obs_rep, a_pi).view(H, N, B)
    q_pi_next = sac.critic(obs_rep, a_pi_next).view(H, N, B)
    # Cal-QL calibration: policy-action Q values are lower-bounded by the Monte-Carlo return.
    q_pi = torch.maximum(q_pi, mc_return.view(1, 1, B))
    q_pi_next = torch.maximum(q_pi_next, mc_return.view(1, 1, B))
    # CQL regulariser: T * logsumexp over the 3N importance-weighted samples, minus Q(s, a_data).
    cat = torch.cat([q_unif - log_unif, q_pi - log_pi, q_pi_next - log_pi_next], dim=1)
    lse = cfg.temperature * torch.logsumexp(cat / cfg.temperature, dim=1)  # (H, B)
    q_data = sac.critic(obs, batch["action"])  # (H, B)
    conservative = (lse - q_data).mean(dim=1).sum()

    loss = td_loss + cfg.cql_alpha * conservative
    metrics.update(
        {
            "calql_loss": loss.item(),
            "cql_conservative": conservative.item(),
            "cql_lse": lse.mean().item(),
            "calql_bound_rate": (q_pi.detach() == mc_return.view(1, 1, B)).float().mean().item(),
        }
    )
    return loss, metrics


def calql_pretrain(
    sac: ResidualSAC,
    offline_buffer: ReplayBuffer,
    steps: int,
    cfg: CalQLConfig,
    rng: np.random.Generator,
    callback: Callable[[int, dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Warm-start critic (Cal-QL) and actor/temperature (SAC) on offline data only.

    Same critic:actor ratio as :meth:`ResidualSAC.update`. ``callback(step, metrics)`` is
    called after every step (logging, checkpointing). Returns the per-step metrics.
    """
    if len(offline_buffer) == 0:
        raise PLDError("calql_pretrain: the offline buffer has no transitions; collect base successes first.")
    history: list[dict[str, float]] = []
    for step in range(steps):
        batch = to_torch(offline_buffer.sample(sac.cfg.batch_size, rng, sac.cfg.n_step), sac.device)
        loss, metrics = calql_critic_loss(sac, batch, cfg)
        metrics.update(sac.critic_step(loss))
        if (step + 1) % sac.cfg.critic_actor_ratio == 0:
            metrics.update(sac.update_actor(batch))
        metrics["step"] = float(step)
        history.append(metrics)
        if callback is not None:
            callback(step, metrics)
    return history
