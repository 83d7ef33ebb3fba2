"""Residual SAC: the PLD specialist's learner (soft actor-critic on a frozen base policy).

Reads top to bottom like CleanRL's ``sac_continuous_action.py``; every equation is a few lines
with its name in a comment:

- executed action         a = clip(a_b + xi * delta, -1, 1),    delta ~ pi(. | s, a_b)
                          (``xi_gripper``: the gripper's delta scaled by xi * xi_gripper / xi)
- TD target (soft, OTF)   y = (r + b) + gamma (1 - d) max_k [ min_j Q'_j(s', a'_k) - alpha log pi(delta'_k) ]
                          with a'_k = clip(a_b' + xi * delta'_k) and a_b' the *stored* next base action;
                          ``backup_entropy: false`` drops the alpha log pi term (as SERL and the
                          Cal-QL/CQL reference code do: with a 0/1 reward the entropy bonus would
                          otherwise dominate Q, ~alpha * H / (1 - gamma))
- critic loss             sum_j mean (Q_j(s, a) - y)^2
- actor loss              mean [ alpha log pi(delta) - min_j Q_j(s, clip(a_b + xi * delta)) ]
                          (+ residual_l2 * ||tanh(mu)||^2, off in the paper)
- temperature loss        mean [ -alpha (log pi(delta) + H_target) ],  H_target = -res_dim / 2
                          (res_dim = the action dims the residual acts on: all 7 in the paper)
- Polyak update           theta' <- (1 - tau) theta' + tau theta

Critic:actor ratio: every call of :meth:`ResidualSAC.update` makes one critic update; the actor
and the temperature are updated on every ``critic_actor_ratio``-th call (``(step + 1) % ratio
== 0``), i.e. ``ratio`` critic updates per actor update, each on its own batch.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pld_core.errors import PLDError
from pld_core.features import GRIPPER_DIM
from pld_core.networks import DoubleQ, ResidualActor, combine


@dataclass
class SACConfig:
    """Hyperparameters of residual SAC (defaults: PLD paper, Tables 4/5)."""

    batch_size: int = 256
    """Transitions per gradient step (half offline, half online under RLPD sampling)."""
    gamma: float = 0.99
    """Discount factor."""
    lr: float = 3e-4
    """AdamW learning rate of actor, critic and temperature."""
    weight_decay: float = 0.01
    """AdamW weight decay of actor and critic (torch's default; the temperature gets none)."""
    grad_clip: float = 1.0
    """Max global grad norm of actor and critic."""
    tau: float = 0.005
    """Polyak rate of the target critic."""
    critic_actor_ratio: int = 2
    """Critic updates per actor/temperature update."""
    init_temperature: float = 1.0
    """Initial entropy temperature alpha."""
    target_entropy: float | None = None
    """Target entropy of the residual; None means -res_dim / 2 (res_dim: len(residual_dims) or act_dim)."""
    xi: float = 0.5
    """Residual scale in a = clip(a_b + xi * delta); the trainer may schedule ``sac.xi``."""
    xi_gripper: float | None = None
    """The gripper's (dim 6) residual scale at full ``xi``; None: ``xi``, as every other dim (the paper).
    robosuite's gripper acts on the *sign* of its command, so with the base at +-1 a residual scaled by
    xi <= 0.5 can never open or close it against the base; 1.0 lets the residual hold the gripper
    (command 0) or, where the base is below 1, flip it. Under the xi schedule it ramps with xi."""
    hidden: int = 256
    """Hidden width of actor and critic MLPs."""
    layers: int = 3
    """Hidden layers of actor and critic MLPs."""
    n_q: int = 2
    """Number of Q heads (the target takes their min)."""
    critic_dropout: float = 0.0
    """Dropout in the critic (0 in the paper)."""
    otf_samples: int = 1
    """K residual samples at s' for the on-the-fly max-Q backup (K=1: plain SAC)."""
    reward_bias: float = 0.0
    """Constant added to every reward in the TD target."""
    n_step: int = 1
    """n-step TD returns (1 = the paper's one-step target). With a 0/1 reward at the end of
    ~150-step episodes, one-step targets need ~150 rounds of bootstrapping (each slowed by the
    target network's tau) before the start of an episode sees the reward; n steps cut that n-fold."""
    target_bounds: tuple[float, float] | None = None
    """Clip the TD target to [lo, hi]: the returns the reward can give (a 0/1 success reward,
    once per episode: [0, 1]). A warm-started critic that is conservative away from the base
    action (Cal-QL) would otherwise bootstrap values below any possible return into the states
    before it. None: no clip (the paper)."""
    residual_l2: float = 0.0
    """Weight of mean ||tanh(mu)||^2 in the actor loss: a pull of the deterministic residual toward
    zero (= the base's action) that only a critic gradient larger than it overcomes. 0 = the paper."""
    backup_entropy: bool = True
    """Include -alpha log pi(delta') in the TD target (soft Q, as the SAC paper). False: the plain
    Q of the combined policy (SERL's and the Cal-QL reference code's default)."""
    use_base: bool = True
    """False = RLPD-style ablation: base action is zeros and the executed action is delta."""
    residual_dims: tuple[int, ...] | None = None
    """Action dims the residual may change (None: all, as in the paper). The embedded default
    restricts it to xyz + gripper: its base never rotates the wrist, and per-step rotation noise
    random-walks the wrist out of the base's training distribution. The actor outputs only these
    dims, so its entropy (and the temperature's target) counts only what it can change."""


class ResidualSAC:
    """Residual actor, double-Q critic, its target, the temperature and their AdamW optimizers."""

    def __init__(self, obs_dim: int, act_dim: int, cfg: SACConfig | None = None, device: str | torch.device = "cpu"):
        self.cfg = cfg = cfg or SACConfig()
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.device = torch.device(device)
        self.xi = cfg.xi
        # the dims the residual acts on (the no-base ablation executes delta itself: all dims)
        self.res_dims = list(cfg.residual_dims) if (cfg.residual_dims is not None and cfg.use_base) else None
        self.res_dim = len(self.res_dims) if self.res_dims is not None else act_dim
        self.target_entropy = -self.res_dim / 2.0 if cfg.target_entropy is None else cfg.target_entropy
        # xi_gripper as a gain on the gripper's delta relative to xi (so the xi schedule scales both)
        acts_on_gripper = cfg.use_base and act_dim > GRIPPER_DIM and (self.res_dims is None or GRIPPER_DIM in self.res_dims)
        self.gripper_gain = (cfg.xi_gripper / cfg.xi if cfg.xi > 0 else 1.0) if (cfg.xi_gripper is not None and acts_on_gripper) else 1.0
        self._gain = torch.ones(act_dim, device=self.device)
        if self.gripper_gain != 1.0:
            self._gain[GRIPPER_DIM] = self.gripper_gain
        self.actor = ResidualActor(obs_dim, act_dim, cfg.hidden, cfg.layers, out_dim=self.res_dim).to(self.device)
        self.critic = DoubleQ(obs_dim, act_dim, cfg.hidden, cfg.layers, cfg.n_q, cfg.critic_dropout).to(self.device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = torch.tensor(math.log(cfg.init_temperature), device=self.device, requires_grad=True)
        self.actor_optim = torch.optim.AdamW(self.actor.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.critic_optim = torch.optim.AdamW(self.critic.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.alpha_optim = torch.optim.AdamW([self.log_alpha], lr=cfg.lr, weight_decay=0.0)

    # ------------------------------------------------------------------ policy
    @property
    def alpha(self) -> torch.Tensor:
        """Current temperature, detached."""
        return self.log_alpha.detach().exp()

    def base(self, base_action: torch.Tensor) -> torch.Tensor:
        """The base action the actor conditions on (zeros in the no-base ablation)."""
        return base_action if self.cfg.use_base else torch.zeros_like(base_action)

    def executed(self, base_action: torch.Tensor, delta: torch.Tensor, xi: float | None = None) -> torch.Tensor:
        """Executed action: combine(a_b, delta, xi); the no-base ablation executes delta.

        With ``residual_dims``, ``delta`` holds those dims only (the actor's output) and the
        other dims of the executed action are the base's exactly."""
        if not self.cfg.use_base:
            return delta
        if self.res_dims is not None:
            full = torch.zeros_like(base_action)
            full[..., self.res_dims] = delta
            delta = full
        if self.gripper_gain != 1.0:
            delta = delta * self._gain
        return combine(base_action, delta, self.xi if xi is None else xi)

    @torch.no_grad()
    def act(self, obs: np.ndarray, base_action: np.ndarray, deterministic: bool = False, xi: float | None = None) -> np.ndarray:
        """Executed action for one observation (1-D arrays) or a batch (2-D arrays)."""
        o = torch.as_tensor(obs, dtype=torch.float32, device=self.device)
        b = torch.as_tensor(base_action, dtype=torch.float32, device=self.device)
        single = o.dim() == 1
        if single:
            o, b = o[None], b[None]
        b = self.base(b)
        delta = self.actor.deterministic(o, b) if deterministic else self.actor.sample(o, b)[0]
        a = self.executed(b, delta, xi).cpu().numpy()
        return a[0] if single else a

    # ------------------------------------------------------------------ critic
    @torch.no_grad()
    def td_target(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Soft TD target y (B,), bootstrapping the combined policy at the stored next base action."""
        K = self.cfg.otf_samples
        B = batch["reward"].shape[0]
        # K residual samples per next state; row k*B + b is sample k of transition b.
        next_obs = batch["next_obs"].repeat(K, 1)
        next_base = self.base(batch["next_base_action"]).repeat(K, 1)
        next_delta, next_logp, _ = self.actor.sample(next_obs, next_base)
        next_action = self.executed(next_base, next_delta)
        # Clipped double Q: min over heads of the target critic.
        q_next = self.critic_target(next_obs, next_action).min(dim=0).values
        soft_q_next = (q_next - self.alpha * next_logp if self.cfg.backup_entropy else q_next).view(K, B)
        # On-the-fly max-Q backup: best of the K soft values (K=1 is plain SAC).
        v_next = soft_q_next.max(dim=0).values
        # Soft Bellman target.
        reward = batch["reward"] + self.cfg.reward_bias
        # n-step batches carry gamma^m per sample (m <= n steps to the bootstrap state)
        discount = batch["discount"] if "discount" in batch else self.cfg.gamma
        y = reward + discount * (1.0 - batch["done"]) * v_next
        if self.cfg.target_bounds is not None:
            y = y.clamp(*self.cfg.target_bounds)
        return y

    def critic_td_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Critic loss sum_j mean (Q_j(s, a) - y)^2 on the executed action a."""
        y = self.td_target(batch)
        q = self.critic(batch["obs"], batch["action"])
        loss = (q - y.unsqueeze(0)).pow(2).mean(dim=1).sum()
        return loss, {"critic_td_loss": loss.item(), "q_data": q.mean().item(), "td_target": y.mean().item()}

    def critic_step(self, loss: torch.Tensor) -> dict[str, float]:
        """One clipped AdamW step of the critic on ``loss``, then the Polyak update."""
        self.critic_optim.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(self.critic.parameters(), self.cfg.grad_clip)
        self.critic_optim.step()
        self.polyak_update()
        return {"critic_grad_norm": grad_norm.item()}

    @torch.no_grad()
    def polyak_update(self) -> None:
        """theta' <- (1 - tau) theta' + tau theta."""
        tau = self.cfg.tau
        for p, p_targ in zip(self.critic.parameters(), self.critic_target.parameters()):
            p_targ.mul_(1.0 - tau).add_(p, alpha=tau)

    def update_critic(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One SAC critic update."""
        loss, metrics = self.critic_td_loss(batch)
        metrics.update(self.critic_step(loss))
        return metrics

    # ------------------------------------------------------------------ actor and temperature
    def update_actor(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One actor update and one temperature update on the batch's states."""
        obs, base = batch["obs"], self.base(batch["base_action"])
        delta, logp, mean_delta = self.actor.sample(obs, base)
        q_pi = self.critic(obs, self.executed(base, delta)).min(dim=0).values
        # Actor loss: alpha log pi - min_j Q_j(s, a_b + xi delta) (+ residual_l2 ||tanh(mu)||^2).
        actor_loss = (self.alpha * logp - q_pi).mean()
        if self.cfg.residual_l2 > 0:
            actor_loss = actor_loss + self.cfg.residual_l2 * mean_delta.pow(2).sum(-1).mean()
        self.actor_optim.zero_grad(set_to_none=True)
        actor_loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(self.actor.parameters(), self.cfg.grad_clip)
        self.actor_optim.step()
        # Temperature loss: -alpha (log pi + H_target), pushing the entropy toward H_target.
        alpha_loss = (-self.log_alpha.exp() * (logp.detach() + self.target_entropy)).mean()
        self.alpha_optim.zero_grad(set_to_none=True)
        alpha_loss.backward()
        self.alpha_optim.step()
        return {
            "actor_loss": actor_loss.item(),
            "actor_grad_norm": grad_norm.item(),
            "alpha_loss": alpha_loss.item(),
            "alpha": self.alpha.item(),
            "entropy": -logp.mean().item(),
        }

    def update(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, float]:
        """Gradient step ``step`` (0-based): critic always; actor+alpha when (step+1) % ratio == 0."""
        metrics = self.update_critic(batch)
        if (step + 1) % self.cfg.critic_actor_ratio == 0:
            metrics.update(self.update_actor(batch))
        return metrics

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat ``name -> tensor`` dict (safetensors-compatible), optimizer moments included.

        Optimizer state is flattened as ``optim.<name>.<param index>.<key>`` (AdamW's step,
        exp_avg, exp_avg_sq); the param groups (lr, betas, ...) are rebuilt from the config.
        """
        state: dict[str, torch.Tensor] = {}
        for prefix, module in (("actor", self.actor), ("critic", self.critic), ("critic_target", self.critic_target)):
            for k, v in module.state_dict().items():
                state[f"{prefix}.{k}"] = v.detach().clone()
        state["log_alpha"] = self.log_alpha.detach().clone()
        for name, optim in self._optimizers().items():
            for idx, param_state in optim.state_dict()["state"].items():
                for k, v in param_state.items():
                    state[f"optim.{name}.{idx}.{k}"] = torch.as_tensor(v).detach().clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from :meth:`state_dict` output; raises PLDError naming a missing/mismatched key."""
        try:
            for prefix, module in (("actor", self.actor), ("critic", self.critic), ("critic_target", self.critic_target)):
                sub = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
                module.load_state_dict(sub, strict=True)
        except RuntimeError as err:
            raise PLDError(f"residual checkpoint does not match the network config (hidden/layers/n_q/dims): {err}") from err
        if "log_alpha" not in state:
            raise PLDError("residual checkpoint lacks key 'log_alpha'; it is not a ResidualSAC checkpoint.")
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        for name, optim in self._optimizers().items():
            prefix = f"optim.{name}."
            param_states: dict[int, dict[str, torch.Tensor]] = {}
            for k, v in state.items():
                if k.startswith(prefix):
                    idx, key = k[len(prefix):].split(".", 1)
                    param_states.setdefault(int(idx), {})[key] = v
            optim_state = optim.state_dict()
            optim.load_state_dict({"state": param_states, "param_groups": optim_state["param_groups"]})

    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"actor": self.actor_optim, "critic": self.critic_optim, "alpha": self.alpha_optim}
