"""Unit tests of the RL core: networks, replay, residual SAC and Cal-QL equations."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal, TransformedDistribution
from torch.distributions.transforms import TanhTransform

from pld_core.calql import CalQLConfig, calql_critic_loss, calql_pretrain
from pld_core.errors import PLDError
from pld_core.networks import DoubleQ, ResidualActor, combine, mlp
from pld_core.replay import ReplayBuffer, mc_returns, sample_mixed, to_torch
from pld_core.sac import ResidualSAC, SACConfig

torch.set_num_threads(1)

SMALL = dict(hidden=32, layers=2)


def small_sac(obs_dim=4, act_dim=3, **overrides) -> ResidualSAC:
    cfg = SACConfig(**{**SMALL, "batch_size": 16, **overrides})
    return ResidualSAC(obs_dim, act_dim, cfg)


def random_batch(B=8, obs_dim=4, act_dim=3, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "obs": torch.randn(B, obs_dim, generator=g),
        "base_action": torch.rand(B, act_dim, generator=g) * 2 - 1,
        "action": torch.rand(B, act_dim, generator=g) * 2 - 1,
        "reward": (torch.rand(B, generator=g) > 0.5).float(),
        "done": (torch.rand(B, generator=g) > 0.5).float(),
        "next_obs": torch.randn(B, obs_dim, generator=g),
        "next_base_action": torch.rand(B, act_dim, generator=g) * 2 - 1,
        "mc_return": torch.rand(B, generator=g),
    }


# ---------------------------------------------------------------------------- networks


def test_mlp_shapes_and_layernorm():
    net = mlp(5, 2, hidden=8, layers=3)
    assert net(torch.randn(4, 5)).shape == (4, 2)
    assert sum(isinstance(m, torch.nn.LayerNorm) for m in net) == 3
    assert DoubleQ(5, 2, hidden=8, layers=2, n_heads=3)(torch.randn(4, 5), torch.randn(4, 2)).shape == (3, 4)


def test_tanh_log_prob_matches_transformed_distribution():
    torch.manual_seed(0)
    actor = ResidualActor(6, 3, hidden=16, layers=2).double()
    for head in (actor.mean_head, actor.log_std_head):  # leave the zero init: mean and std vary
        torch.nn.init.normal_(head.weight, std=0.5)
    obs, base = torch.randn(256, 6, dtype=torch.float64), torch.rand(256, 3, dtype=torch.float64)
    delta, log_prob, _ = actor.sample(obs, base)
    mean, log_std = actor(obs, base)
    reference = TransformedDistribution(Normal(mean, log_std.exp()), [TanhTransform()])
    expected = reference.log_prob(delta).sum(-1)
    # Away from saturation, where the 1e-6 guard in log(1 - tanh^2 + 1e-6) is negligible.
    unsaturated = (1 - delta.pow(2) > 1e-2).all(-1)
    assert unsaturated.sum() > 128
    assert torch.allclose(log_prob[unsaturated], expected[unsaturated], atol=1e-3)
    uncorrected = Normal(mean, log_std.exp()).log_prob(torch.atanh(delta)).sum(-1)
    assert not torch.allclose(log_prob[unsaturated], uncorrected[unsaturated], atol=1e-1)


def test_tanh_log_prob_matches_finite_difference_density():
    """1-D: log p(delta) against (CDF(atanh(d+h)) - CDF(atanh(d-h))) / 2h in plain math."""
    torch.manual_seed(1)
    actor = ResidualActor(2, 1, hidden=8, layers=1).double()
    torch.nn.init.normal_(actor.mean_head.weight, std=1.0)
    obs, base = torch.randn(64, 2, dtype=torch.float64), torch.zeros(64, 1, dtype=torch.float64)
    delta, log_prob, _ = actor.sample(obs, base)
    mean, log_std = actor(obs, base)

    def cdf(x, m, s):
        return 0.5 * (1.0 + math.erf((x - m) / (s * math.sqrt(2.0))))

    h = 1e-5
    for i in range(64):
        d, m, s = delta[i, 0].item(), mean[i, 0].item(), math.exp(log_std[i, 0].item())
        if abs(d) > 0.99:
            continue
        p = (cdf(math.atanh(d + h), m, s) - cdf(math.atanh(d - h), m, s)) / (2 * h)
        assert math.log(p) == pytest.approx(log_prob[i].item(), abs=1e-3)


def test_zero_init_residual_reproduces_base_action():
    sac = small_sac(obs_dim=5, act_dim=3)
    obs = np.random.default_rng(0).normal(size=(10, 5)).astype(np.float32)
    base = np.random.default_rng(1).uniform(-1, 1, size=(10, 3)).astype(np.float32)
    mean, log_std = sac.actor(torch.from_numpy(obs), torch.from_numpy(base))
    assert torch.equal(mean, torch.zeros_like(mean))
    assert torch.allclose(log_std, torch.full_like(log_std, -1.5))  # midpoint of [-5, 2]
    assert np.array_equal(sac.act(obs, base, deterministic=True), base)
    assert np.array_equal(sac.act(obs[0], base[0], deterministic=True), base[0])
    stochastic = sac.act(obs, base)
    assert not np.array_equal(stochastic, base) and np.abs(stochastic - base).max() <= 0.5
    edge = np.tile(np.array([[0.99, -0.99, 0.0]], np.float32), (200, 1))
    executed = sac.act(np.zeros((200, 5), np.float32), edge)
    assert np.abs(executed).max() == 1.0  # residual pushes past the edge; the action is clipped


def test_combine_clips_and_no_base_ablation():
    a = combine(torch.tensor([0.9, -0.9, 0.2]), torch.tensor([1.0, -1.0, 0.4]), 0.5)
    assert torch.allclose(a, torch.tensor([1.0, -1.0, 0.4]))
    sac = small_sac(obs_dim=2, act_dim=2, use_base=False)
    out = sac.act(np.zeros((3, 2), np.float32), np.full((3, 2), 0.7, np.float32), deterministic=True)
    assert np.array_equal(out, np.zeros((3, 2), np.float32))  # executes delta (=0), ignores base


# ---------------------------------------------------------------------------- TD target


def target_min_q(sac: ResidualSAC, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """min over heads, evaluating each head of the target critic separately."""
    x = torch.cat([obs, action], dim=-1)
    qs = [head(x).squeeze(-1) for head in sac.critic_target.heads]
    return torch.minimum(qs[0], qs[1])


def test_td_target_uses_stored_next_base_action():
    torch.manual_seed(0)
    sac = small_sac()
    batch = random_batch()
    torch.manual_seed(7)
    y1 = sac.td_target(batch)
    changed = dict(batch, next_base_action=batch["next_base_action"].clone())
    changed["next_base_action"][0] = -changed["next_base_action"][0]
    torch.manual_seed(7)
    y2 = sac.td_target(changed)
    bootstraps = batch["done"][0] == 0
    assert (y1[0] != y2[0]) == bool(bootstraps)
    assert torch.equal(y1[1:], y2[1:])
    batch["done"][0] = 0.0
    torch.manual_seed(7)
    y3 = sac.td_target(batch)
    changed["done"][0] = 0.0
    torch.manual_seed(7)
    assert not torch.isclose(sac.td_target(changed)[0], y3[0])


def test_td_target_formula_with_xi_zero():
    torch.manual_seed(0)
    sac = small_sac(xi=0.0, reward_bias=0.25, init_temperature=0.3, gamma=0.9)
    batch = random_batch(B=6)
    batch["next_base_action"][0, 0] = 1.7  # out of range: the executed action is clipped
    seen = {}

    def fake_sample(obs, base):  # deterministic residual, nonzero: xi=0 must remove it
        seen["base"] = base.clone()
        return torch.full_like(base, 0.7), obs.sum(-1), torch.zeros_like(base)

    sac.actor.sample = fake_sample
    y = sac.td_target(batch)
    assert torch.equal(seen["base"], batch["next_base_action"])
    next_action = batch["next_base_action"].clamp(-1, 1)
    v = target_min_q(sac, batch["next_obs"], next_action) - 0.3 * batch["next_obs"].sum(-1)
    expected = batch["reward"] + 0.25 + 0.9 * (1 - batch["done"]) * v
    assert torch.allclose(y, expected, atol=1e-5)


def test_otf_max_backup_is_max_over_samples():
    torch.manual_seed(0)
    K, B = 4, 8
    sac = small_sac(otf_samples=K, xi=0.5)
    batch = random_batch(B=B)
    batch["done"].zero_()
    table = torch.Generator().manual_seed(3)
    deltas = torch.rand(K * B, 3, generator=table) * 2 - 1
    logps = torch.randn(K * B, generator=table)
    seen = {}

    def fake_sample(obs, base):
        seen["obs"], seen["base"] = obs.clone(), base.clone()
        return deltas, logps, torch.zeros_like(base)

    sac.actor.sample = fake_sample
    y = sac.td_target(batch)
    # Per-sample (K=1-style) targets, grouped by which transition each row belongs to.
    a = combine(seen["base"], deltas, 0.5)
    per_row = target_min_q(sac, seen["obs"], a) - sac.alpha * logps
    expected, first = [], []
    for b in range(B):
        rows = (seen["obs"] == batch["next_obs"][b]).all(-1).nonzero().squeeze(-1)
        assert len(rows) == K
        targets = batch["reward"][b] + 0.99 * per_row[rows]
        expected.append(targets.max())
        first.append(targets[0])
    assert torch.allclose(y, torch.stack(expected), atol=1e-5)
    assert (y >= torch.stack(first) - 1e-6).all() and (y > torch.stack(first) + 1e-6).any()


# ---------------------------------------------------------------------------- Cal-QL


def constant_critic(sac: ResidualSAC, c: float) -> None:
    for head in sac.critic.heads:
        torch.nn.init.zeros_(head[-1].weight)
        torch.nn.init.constant_(head[-1].bias, c)
    sac.critic_target.load_state_dict(sac.critic.state_dict())


def test_calql_lower_bound_uses_mc_return():
    A, N, H, c, L, xi, alpha, T = 3, 5, 2, -1.0, 0.4, 0.5, 0.5, 0.7
    sac = small_sac(act_dim=A, xi=xi, init_temperature=alpha, gamma=0.9)
    constant_critic(sac, c)
    sac.actor.sample = lambda obs, base: (torch.zeros_like(base), torch.full((obs.shape[0],), L), torch.zeros_like(base))
    batch = random_batch(B=3, act_dim=A)
    batch["reward"] = torch.tensor([0.0, 1.0, 0.0])
    batch["done"] = torch.tensor([0.0, 1.0, 0.0])
    batch["mc_return"] = torch.tensor([4.0, -5.0, 2.0])  # above, below, above Q = c
    cfg = CalQLConfig(cql_alpha=5.0, n_actions=N, temperature=T)
    loss, metrics = calql_critic_loss(sac, batch, cfg)

    def expected_loss(bound: bool) -> float:
        td, cons = 0.0, 0.0
        for r, d, g in zip(batch["reward"].tolist(), batch["done"].tolist(), batch["mc_return"].tolist()):
            y = r + 0.9 * (1 - d) * (c - alpha * L)
            td += H * (c - y) ** 2 / 3
            x_unif = c + A * math.log(2.0)  # Q - log(2^-A)
            q_pi = max(c, g) if bound else c
            x_pi = q_pi - (L - A * math.log(xi))  # Q - log density of a = a_b + xi * delta
            lse = T * math.log(N * math.exp(x_unif / T) + 2 * N * math.exp(x_pi / T))
            cons += H * (lse - c) / 3
        return td + 5.0 * cons

    assert loss.item() == pytest.approx(expected_loss(bound=True), rel=1e-5)
    assert abs(expected_loss(bound=True) - expected_loss(bound=False)) > 1.0  # the bound matters here
    assert metrics["calql_bound_rate"] == pytest.approx(2 / 3)


def test_calql_rejects_missing_mc_return_and_pretrains():
    rng = np.random.default_rng(0)
    buf = ReplayBuffer(200, 4, 3, gamma=0.99)
    for _ in range(10):
        T = 8
        buf.add_episode(rng.normal(size=(T + 1, 4)), rng.uniform(-1, 1, (T + 1, 3)), rng.uniform(-1, 1, (T, 3)),
                        np.eye(T)[-1], np.eye(T)[-1])
    torch.manual_seed(0)
    sac = small_sac()
    calls = []
    history = calql_pretrain(sac, buf, 6, CalQLConfig(n_actions=4), rng, callback=lambda s, m: calls.append(s))
    assert calls == list(range(6)) and len(history) == 6
    assert all(math.isfinite(h["calql_loss"]) for h in history)
    assert sum("actor_loss" in h for h in history) == 3  # critic:actor ratio 2
    batch = to_torch(buf.sample(4, rng))
    batch["mc_return"][0] = float("nan")
    with pytest.raises(PLDError, match=r"^Cal-QL needs Monte-Carlo returns, but the batch has NaN mc_return; store 'mc_return' "
                                       r"for the offline episodes \(ReplayBuffer\.add_episode computes it when None\)\.$"):
        calql_critic_loss(sac, batch, CalQLConfig())


# ---------------------------------------------------------------------------- SAC updates and checkpoint


def test_critic_actor_ratio():
    torch.manual_seed(0)
    sac = small_sac(critic_actor_ratio=2)
    batch = random_batch(B=16)
    actor0 = [p.clone() for p in sac.actor.parameters()]
    critic0 = [p.clone() for p in sac.critic.parameters()]
    m0 = sac.update(batch, step=0)
    assert "actor_loss" not in m0
    assert all(torch.equal(a, b) for a, b in zip(actor0, sac.actor.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(critic0, sac.critic.parameters()))
    m1 = sac.update(batch, step=1)
    assert "actor_loss" in m1
    assert not all(torch.equal(a, b) for a, b in zip(actor0, sac.actor.parameters()))


def test_polyak_update():
    torch.manual_seed(0)
    sac = small_sac(tau=0.1)
    targ = [p.clone() for p in sac.critic_target.parameters()]
    with torch.no_grad():
        for p in sac.critic.parameters():
            p.add_(1.0)
    sac.polyak_update()
    for t0, p, t1 in zip(targ, sac.critic.parameters(), sac.critic_target.parameters()):
        assert torch.allclose(t1, 0.9 * t0 + 0.1 * p)


def test_sac_state_dict_roundtrip_through_safetensors(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    a = small_sac()
    batch = random_batch(B=16)
    for step in range(4):
        a.update(batch, step)
    safetensors_torch.save_file(a.state_dict(), tmp_path / "residual.safetensors")
    torch.manual_seed(123)
    b = small_sac()
    b.load_state_dict(safetensors_torch.load_file(tmp_path / "residual.safetensors"))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    # Same next update on both (Adam moments restored, not reset).
    for sac in (a, b):
        torch.manual_seed(5)
        sac.update(batch, 5)
    for pa, pb in zip(a.actor.parameters(), b.actor.parameters()):
        assert torch.equal(pa, pb)
    with pytest.raises(PLDError):
        small_sac(hidden=16).load_state_dict(a.state_dict())


def test_sac_learns_toward_rewarded_action():
    """1-D toy: base action 0, reward 1 iff executed action > 0.5; the residual must move up."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    buf = ReplayBuffer(4000, 1, 1)
    for _ in range(1000):  # one-step episodes with uniformly random residuals
        a = rng.uniform(-1, 1, size=(1, 1))
        r = (a[:, 0] > 0.5).astype(np.float32)
        buf.add_episode(rng.uniform(-1, 1, (2, 1)), np.zeros((2, 1)), a, r, np.ones(1))
    cfg = SACConfig(hidden=64, layers=2, batch_size=128, lr=1e-3, xi=1.0, init_temperature=0.05)
    sac = ResidualSAC(1, 1, cfg)
    for step in range(300):
        sac.update(to_torch(buf.sample(cfg.batch_size, rng)), step)
    obs = rng.uniform(-1, 1, (32, 1)).astype(np.float32)
    executed = sac.act(obs, np.zeros((32, 1), np.float32), deterministic=True)
    assert executed.mean() > 0.5, executed.mean()  # inside the rewarded region (5 seeds: 0.69-0.75)


# ---------------------------------------------------------------------------- replay


def test_mc_returns():
    assert np.allclose(mc_returns(np.array([0.0, 0.0, 1.0]), 0.9), [0.81, 0.9, 1.0])
    buf = ReplayBuffer(10, 1, 1, gamma=0.5)
    buf.start_episode(np.zeros(1), np.zeros(1))
    for t in range(3):
        buf.add_step(np.zeros(1), float(t == 2), float(t == 2), np.full(1, t + 1), np.zeros(1))
    assert np.allclose(buf.mc_return[:3], [0.25, 0.5, 1.0]) and np.isnan(buf.mc_return[3])


def test_replay_never_links_episodes_across_wraparound():
    C = 13
    rng = np.random.default_rng(0)
    buf = ReplayBuffer(C, 3, 2)
    log: list[tuple[int, int]] = []  # every row ever written, as (episode, t)

    def row(ep, t):
        return np.array([ep, t, rng.normal()], np.float32), np.array([ep, -t], np.float32)

    def check():
        total = len(log)
        expected = {log[j] for j in range(max(0, total - C), total - 1) if log[j + 1] == (log[j][0], log[j][1] + 1)}
        assert len(buf) == len(expected)
        if not expected:
            return
        s = buf.sample(64, rng)
        assert np.array_equal(s["next_obs"][:, 0], s["obs"][:, 0])
        assert np.array_equal(s["next_obs"][:, 1], s["obs"][:, 1] + 1)
        assert np.array_equal(s["next_base_action"], np.stack([s["obs"][:, 0], -(s["obs"][:, 1] + 1)], 1))
        assert np.array_equal(s["action"], s["obs"][:, :2])
        assert np.allclose(s["reward"], s["obs"][:, 1] / 10)
        assert {(int(e), int(t)) for e, t in s["obs"][:, :2]} <= expected

    for ep in range(400):
        T = int(rng.integers(0, 8)) if ep % 50 else 30  # every 50th episode is longer than C
        if rng.random() < 0.5 and T < C:
            rows = [row(ep, t) for t in range(T + 1)]
            buf.add_episode(np.stack([o for o, _ in rows]), np.stack([b for _, b in rows]),
                            np.array([[ep, t] for t in range(T)], np.float32).reshape(T, 2),
                            np.arange(T) / 10, np.zeros(T))
            log.extend((ep, t) for t in range(T + 1))
        else:
            buf.start_episode(*row(ep, 0))
            log.append((ep, 0))
            for t in range(T):
                buf.add_step(np.array([ep, t], np.float32), t / 10, float(t == T - 1 and ep % 3 == 0), *row(ep, t + 1))
                log.append((ep, t + 1))
                if t % 3 == 0:
                    check()
        check()


def test_sample_mixed_is_symmetric():
    rng = np.random.default_rng(0)
    offline, online = ReplayBuffer(100, 2, 1), ReplayBuffer(100, 2, 1)
    offline.add_episode(np.zeros((21, 2)), np.zeros((21, 1)), np.zeros((20, 1)), np.zeros(20), np.zeros(20))
    online.add_episode(np.ones((21, 2)), np.zeros((21, 1)), np.zeros((20, 1)), np.zeros(20), np.zeros(20))
    batch = sample_mixed(offline, online, 256, rng)
    assert batch["obs"].dtype == torch.float32 and batch["obs"].shape == (256, 2)
    assert int((batch["obs"][:, 0] == 0).sum()) == 128 and int((batch["obs"][:, 0] == 1).sum()) == 128
    assert int((sample_mixed(offline, online, 100, rng, offline_fraction=0.25)["obs"][:, 0] == 0).sum()) == 25
    empty = ReplayBuffer(100, 2, 1)
    assert int((sample_mixed(offline, empty, 64, rng)["obs"][:, 0] == 0).sum()) == 64
    assert int((sample_mixed(empty, online, 64, rng)["obs"][:, 0] == 1).sum()) == 64


def test_replay_memory_at_paper_capacity():
    buf = ReplayBuffer(250_000, 64, 7)
    assert buf.nbytes < 1e9
    assert buf.nbytes < 2 * buf.obs.nbytes  # no duplicated next-observation array
    assert buf.obs.nbytes == 250_000 * 64 * 4


def test_replay_state_dict_roundtrip():
    rng = np.random.default_rng(0)
    a = ReplayBuffer(50, 3, 2)
    for ep in range(12):
        T = 5
        a.add_episode(rng.normal(size=(T + 1, 3)), rng.normal(size=(T + 1, 2)), rng.normal(size=(T, 2)),
                      rng.random(T), np.zeros(T))
    a.start_episode(rng.normal(size=3), rng.normal(size=2))
    a.add_step(rng.normal(size=2), 0.0, 0.0, rng.normal(size=3), rng.normal(size=2))
    f = io.BytesIO()
    np.savez(f, **a.state_dict())
    f.seek(0)
    b = ReplayBuffer(50, 3, 2)
    b.load_state_dict(dict(np.load(f, allow_pickle=False)))
    assert len(a) == len(b) > 0
    sa, sb = a.sample(32, np.random.default_rng(1)), b.sample(32, np.random.default_rng(1))
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k])
    for buf in (a, b):  # the open episode continues identically
        buf.add_step(np.ones(2), 1.0, 1.0, np.ones(3), np.ones(2))
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(v, b.state_dict()[k])
    with pytest.raises(PLDError, match="obs_dim"):
        ReplayBuffer(50, 4, 2).load_state_dict(a.state_dict())


def test_residual_dims_leave_the_other_dims_to_the_base():
    torch.manual_seed(0)
    sac = ResidualSAC(6, 7, SACConfig(hidden=16, layers=1, xi=0.5, residual_dims=(0, 1, 2, 6)))
    obs = np.random.default_rng(0).normal(size=(64, 6)).astype(np.float32)
    base = np.random.default_rng(1).uniform(-0.5, 0.5, size=(64, 7)).astype(np.float32)
    a = sac.act(obs, base, deterministic=False)  # sampled: the zero-init mean plus unit-std noise
    np.testing.assert_array_equal(a[:, 3:6], base[:, 3:6])  # rotation: exactly the base's
    assert np.abs(a[:, [0, 1, 2, 6]] - base[:, [0, 1, 2, 6]]).max() > 0.05  # the residual acts on the rest
    full = ResidualSAC(6, 7, SACConfig(hidden=16, layers=1, xi=0.5))
    assert np.abs(full.act(obs, base)[:, 3:6] - base[:, 3:6]).max() > 0.05


def test_residual_dims_param_is_validated():
    from pld_core.config import SACParams

    assert SACParams(residual_dims=[0, 1, 2, 6]).to_sac_config().residual_dims == (0, 1, 2, 6)
    for bad in ([], [7], [0, 0]):
        with pytest.raises(Exception, match="action dims"):
            SACParams(residual_dims=bad)


def test_td_target_without_entropy_backup_is_plain_q_of_the_combined_policy():
    torch.manual_seed(0)
    soft = small_sac(xi=0.5, init_temperature=0.7, gamma=0.9)
    hard = small_sac(xi=0.5, init_temperature=0.7, gamma=0.9, backup_entropy=False)
    hard.actor.load_state_dict(soft.actor.state_dict())
    hard.critic_target.load_state_dict(soft.critic_target.state_dict())
    batch = random_batch(B=6)
    delta = torch.rand(6, 3) * 2 - 1
    logp = torch.randn(6)
    for s in (soft, hard):
        s.actor.sample = lambda obs, base: (delta, logp, torch.zeros_like(base))
    v = target_min_q(soft, batch["next_obs"], combine(batch["next_base_action"], delta, 0.5))
    expected_hard = batch["reward"] + 0.9 * (1 - batch["done"]) * v
    assert torch.allclose(hard.td_target(batch), expected_hard, atol=1e-5)
    assert torch.allclose(soft.td_target(batch), expected_hard - 0.9 * (1 - batch["done"]) * 0.7 * logp, atol=1e-5)


def test_residual_dims_actor_outputs_only_those_dims_and_entropy_counts_them():
    sac = ResidualSAC(6, 7, SACConfig(hidden=16, layers=1, residual_dims=(0, 1, 2, 6)))
    assert sac.actor.out_dim == 4 and sac.target_entropy == -2.0
    obs, base = torch.randn(5, 6), torch.rand(5, 7) * 2 - 1
    delta, logp, _ = sac.actor.sample(obs, base)
    assert delta.shape == (5, 4) and logp.shape == (5,)
    a = sac.executed(base, delta, xi=0.5)
    assert torch.equal(a[:, 3:6], base[:, 3:6])
    assert torch.allclose(a[:, [0, 1, 2, 6]], (base[:, [0, 1, 2, 6]] + 0.5 * delta).clamp(-1, 1))
    # the no-base ablation executes delta itself: all 7 dims, whatever residual_dims says
    nb = ResidualSAC(6, 7, SACConfig(hidden=16, layers=1, residual_dims=(0, 1, 2, 6), use_base=False))
    assert nb.actor.out_dim == 7 and nb.target_entropy == -3.5


def test_n_step_sampling_sums_rewards_within_the_episode_and_discounts_the_bootstrap():
    g = 0.9
    buf = ReplayBuffer(64, 1, 2, gamma=g)
    # episode A: 5 transitions, success at the last (terminal); episode B: 4 transitions, truncated
    T_a, T_b = 5, 4
    buf.add_episode(np.arange(T_a + 1, dtype=np.float32)[:, None], np.zeros((T_a + 1, 2)), np.zeros((T_a, 2)),
                    np.array([0, 0, 0, 0, 1.0]), np.array([0, 0, 0, 0, 1.0]))
    buf.start_episode(np.array([100.0]), np.zeros(2))
    for t in range(T_b):
        buf.add_step(np.zeros(2), 0.5, 0.0, np.array([101.0 + t]), np.full(2, t + 1.0))
    buf.end_episode()
    b = buf.sample(4000, np.random.default_rng(0), n_step=3)
    o = b["obs"][:, 0]
    for x, r, d, nxt, disc in zip(o, b["reward"], b["done"], b["next_obs"][:, 0], b["discount"]):
        if x < 100:  # episode A, obs t = x
            t = int(x)
            m = min(3, T_a - t)
            assert nxt == t + m and np.isclose(disc, g ** m)
            assert np.isclose(r, g ** (T_a - 1 - t) if t + m == T_a else 0.0) and d == float(t + m == T_a)
        else:  # episode B: never crosses into another episode; truncated end is not terminal
            t = int(x) - 100
            m = min(3, T_b - t)
            assert nxt == 100 + t + m and np.isclose(disc, g ** m) and d == 0.0
            assert np.isclose(r, sum(0.5 * g ** k for k in range(m)))
    assert set(np.unique(o)) == {0, 1, 2, 3, 4, 100, 101, 102, 103}
    one = buf.sample(16, np.random.default_rng(0))  # one step: no discount key, next row
    assert "discount" not in one and np.array_equal(one["next_obs"][:, 0] - one["obs"][:, 0], np.ones(16))


def test_td_target_uses_the_n_step_discount():
    torch.manual_seed(0)
    sac = small_sac(xi=0.5, gamma=0.9, backup_entropy=False)
    batch = random_batch(B=4)
    y1 = sac.td_target(batch)
    batch["discount"] = torch.full((4,), 0.9 ** 3)
    torch.manual_seed(0)
    sac2 = small_sac(xi=0.5, gamma=0.9, backup_entropy=False)
    y3 = sac2.td_target(batch)
    v = (y1 - batch["reward"]) / 0.9
    assert torch.allclose(y3, batch["reward"] + 0.9 ** 3 * v, atol=1e-5)


def test_td_target_is_clipped_to_the_possible_returns():
    torch.manual_seed(0)
    free = small_sac(xi=0.5, gamma=0.9, backup_entropy=False)
    bounded = small_sac(xi=0.5, gamma=0.9, backup_entropy=False, target_bounds=(0.0, 1.0))
    constant_critic(free, -3.0)
    constant_critic(bounded, -3.0)  # a critic that is (wrongly) negative everywhere
    batch = random_batch(B=6)
    batch["reward"] = torch.tensor([0, 0, 1, 0, 0, 1.0])
    batch["done"] = torch.tensor([0, 0, 1, 0, 0, 1.0])
    assert (free.td_target(batch)[batch["done"] == 0] < 0).all()
    y = bounded.td_target(batch)
    assert torch.equal(y, torch.tensor([0, 0, 1, 0, 0, 1.0]))
    from pld_core.config import SACParams

    assert SACParams(target_bounds=[0, 1]).to_sac_config().target_bounds == (0.0, 1.0)
    with pytest.raises(Exception, match="lo < hi"):
        SACParams(target_bounds=[1, 0])


def test_residual_l2_adds_the_mean_penalty_and_pulls_the_mean_to_zero():
    batch = random_batch(B=32)
    losses, grads = {}, {}
    for l2 in (0.0, 0.5):
        torch.manual_seed(0)
        sac = small_sac(xi=0.5, init_temperature=1e-4, residual_l2=l2, grad_clip=1e9)
        constant_critic(sac, 0.3)  # no action gradient: only the penalty (and the tiny entropy term) acts
        torch.nn.init.constant_(sac.actor.mean_head.bias, 1.0)
        with torch.no_grad():
            mean0 = sac.actor.deterministic(batch["obs"], batch["base_action"])
        sac.actor_optim.step = lambda: None  # keep the weights: compare the gradients of one loss
        torch.manual_seed(1)
        losses[l2] = sac.update_actor(batch)["actor_loss"]
        grads[l2] = sac.actor.mean_head.bias.grad.clone()
    assert np.isclose(losses[0.5] - losses[0.0], 0.5 * mean0.pow(2).sum(-1).mean().item(), rtol=1e-3)
    # d/d(bias) of 0.5 * tanh(mu)^2 = tanh(mu) (1 - tanh(mu)^2) > 0: gradient descent lowers a positive mean
    expected = (0.5 * 2 * mean0 * (1 - mean0.pow(2))).mean(0)
    assert torch.allclose(grads[0.5] - grads[0.0], expected, atol=1e-4) and (expected > 0).all()


def test_xi_gripper_scales_only_the_gripper_and_ramps_with_the_xi_schedule():
    # robosuite's gripper acts on its command's sign: at xi 0.5 a residual cannot overrule a base at 0.9
    sac = ResidualSAC(6, 7, SACConfig(hidden=16, layers=1, xi=0.5, xi_gripper=1.0, residual_dims=(0, 1, 2, 6)))
    assert sac.gripper_gain == 2.0
    base = torch.tensor([[0.1, -0.2, 0.3, 0.0, 0.0, 0.0, 0.9]])
    delta = torch.tensor([[0.4, 0.4, -0.4, -1.0]])
    a = sac.executed(base, delta)
    assert torch.allclose(a[0, :3], base[0, :3] + 0.5 * delta[0, :3])  # xyz: xi
    assert torch.isclose(a[0, 6], torch.tensor(-0.1))  # gripper: 0.9 + 1.0 * -1.0, the sign flips
    assert torch.isclose(ResidualSAC(6, 7, SACConfig(hidden=16, layers=1, xi=0.5, residual_dims=(0, 1, 2, 6))).executed(base, delta)[0, 6],
                         torch.tensor(0.4))  # without it: 0.9 - 0.5, still closing
    # the schedule's xi = 0.25 halves both
    a = sac.executed(base, delta, xi=0.25)
    assert torch.allclose(a[0, :3], base[0, :3] + 0.25 * delta[0, :3]) and torch.isclose(a[0, 6], torch.tensor(0.4))
    # no gripper among the residual's dims, or the no-base ablation: no gain
    assert ResidualSAC(6, 7, SACConfig(hidden=16, layers=1, xi=0.5, xi_gripper=1.0, residual_dims=(0, 1, 2))).gripper_gain == 1.0
    assert ResidualSAC(6, 7, SACConfig(hidden=16, layers=1, xi=0.5, xi_gripper=1.0, use_base=False)).gripper_gain == 1.0


def test_xi_gripper_enters_the_calql_action_density():
    from pld_core.calql import _policy_action_log_density

    logp = torch.tensor([0.3])
    plain = ResidualSAC(6, 7, SACConfig(hidden=16, layers=1, xi=0.5, residual_dims=(0, 1, 2, 6)))
    grip = ResidualSAC(6, 7, SACConfig(hidden=16, layers=1, xi=0.5, xi_gripper=1.0, residual_dims=(0, 1, 2, 6)))
    # a = a_b + xi * g * delta on the gripper: the density in action space loses log(xi) per dim and log(g) more
    assert torch.isclose(_policy_action_log_density(plain, logp), logp - 4 * math.log(0.5))
    assert torch.isclose(_policy_action_log_density(grip, logp), logp - 4 * math.log(0.5) - math.log(2.0))


def test_xi_gripper_is_out_of_the_stage_keys_while_unset():
    from pld_core.config import Params

    p = Params()
    assert "xi_gripper" not in p.section_dict("sac")  # data built before the knob keeps its keys
    assert "stop_at" not in p.section_dict("residual") and "image_encoder_weights" not in p.section_dict("residual")
    set_ = Params(sac={"xi_gripper": 1.0}, residual={"stop_at": 0.95})
    assert set_.section_dict("sac")["xi_gripper"] == 1.0 and set_.section_dict("residual")["stop_at"] == 0.95
    assert set_.sac.to_sac_config().xi_gripper == 1.0
    with pytest.raises(Exception, match="xi_gripper"):
        Params(sac={"xi_gripper": 0.0})


# ---------------------------------------------------------------------------- mechanisms a mutation would break
# Each test below was seen to fail on the regression its docstring names (planted once, then restored).


def _grad_norm(module: torch.nn.Module) -> float:
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.parameters() if p.grad is not None])).item()


def test_critic_step_clips_the_gradient_then_moves_the_target_by_polyak():
    """Regressions: clip_grad_norm_ dropped from critic_step; polyak_update dropped from critic_step."""
    torch.manual_seed(0)
    sac = small_sac(tau=0.1, grad_clip=0.5)
    batch = random_batch(B=16)
    batch["reward"] = batch["reward"] * 1000.0  # huge TD errors: the raw gradient is far above the clip
    target0 = [p.clone() for p in sac.critic_target.parameters()]
    loss, _ = sac.critic_td_loss(batch)
    m = sac.critic_step(loss)
    assert m["critic_grad_norm"] > 100 * 0.5  # the norm before clipping is reported
    assert _grad_norm(sac.critic) == pytest.approx(0.5, rel=1e-4)  # what the optimizer stepped on
    for t0, p, t1 in zip(target0, sac.critic.parameters(), sac.critic_target.parameters()):
        assert torch.allclose(t1, 0.9 * t0 + 0.1 * p, atol=1e-6)
    assert not all(torch.equal(t0, t1) for t0, t1 in zip(target0, sac.critic_target.parameters()))


def test_actor_step_clips_its_gradient():
    """Regression: clip_grad_norm_ dropped from update_actor."""
    torch.manual_seed(0)
    sac = small_sac(grad_clip=0.01, residual_l2=50.0)
    with torch.no_grad():
        sac.actor.mean_head.bias.fill_(0.5)  # a residual far from zero under a large l2 pull: a large actor gradient
    m = sac.update_actor(random_batch(B=16))
    assert m["actor_grad_norm"] > 10 * 0.01
    assert _grad_norm(sac.actor) == pytest.approx(0.01, rel=1e-4)


@pytest.mark.parametrize("target_entropy,direction", [(-100.0, -1), (100.0, +1)])
def test_temperature_moves_toward_the_target_entropy(target_entropy, direction):
    """Entropy above the target lowers alpha; below it raises alpha. Regression: the sign of the temperature
    loss flipped (alpha would grow while the policy is already too random)."""
    torch.manual_seed(0)
    sac = small_sac(target_entropy=target_entropy, init_temperature=0.5)
    before = sac.alpha.item()
    sac.update_actor(random_batch(B=16))
    assert (sac.alpha.item() - before) * direction > 0, (before, sac.alpha.item())


class _RecordingCritic(torch.nn.Module):
    """Q_j(s, a) = w_j . a + v . s, with every (obs, action) pair it was asked recorded."""

    def __init__(self, obs_dim: int, act_dim: int, heads: int = 2):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w = torch.nn.Parameter(torch.randn(heads, act_dim, generator=g))
        self.v = torch.nn.Parameter(torch.randn(obs_dim, generator=g))
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, obs, action):
        self.calls.append((obs.detach().clone(), action.detach().clone()))
        return (self.w @ action.T) + (obs @ self.v)[None]


def test_calql_evaluates_every_policy_term_at_s_and_samples_next_actions_at_the_next_base_action():
    """Regressions: the pi(s') term's Q evaluated at s' instead of s; the s' samples conditioned on the base action at s
    (or the data action) instead of the stored next base action; the s samples conditioned on the next base action."""
    torch.manual_seed(0)
    A, B, N = 3, 5, 4
    sac = small_sac(act_dim=A)
    sac.critic = _RecordingCritic(4, A)
    sampled: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = sac.actor.sample

    def recording_sample(obs, base):
        sampled.append((obs.clone(), base.clone()))
        return original(obs, base)

    sac.actor.sample = recording_sample
    sac.critic_target = _RecordingCritic(4, A)
    batch = random_batch(B=B, act_dim=A)
    calql_critic_loss(sac, batch, CalQLConfig(n_actions=N))
    # the actor's samples: [TD target at s' (K=1)], then N at (s, a_b), then N at (s', a_b')
    (o_s, b_s), (o_n, b_n) = sampled[-2], sampled[-1]
    assert torch.equal(o_s, batch["obs"].repeat(N, 1)) and torch.equal(b_s, batch["base_action"].repeat(N, 1))
    assert torch.equal(o_n, batch["next_obs"].repeat(N, 1)) and torch.equal(b_n, batch["next_base_action"].repeat(N, 1))
    # the critic (not its target): TD Q(s, a), then uniform, pi(s), pi(s') -- all at s -- then Q(s, a_data)
    calls = sac.critic.calls
    assert len(calls) == 5
    assert torch.equal(calls[0][0], batch["obs"]) and torch.equal(calls[0][1], batch["action"])
    for obs, _ in calls[1:4]:
        assert torch.equal(obs, batch["obs"].repeat(N, 1))
    assert torch.equal(calls[4][0], batch["obs"]) and torch.equal(calls[4][1], batch["action"])


def test_calql_conservative_term_subtracts_q_of_the_stored_data_action():
    """Q linear in the action: moving the data action by d changes the conservative term by exactly
    -sum_j mean_b w_j . d (the sampled terms are the same under the same seed). Regression: the data
    term evaluated at the base action or a policy action instead of the stored action."""
    A, B = 3, 6
    torch.manual_seed(0)
    sac = small_sac(act_dim=A)
    sac.critic = _RecordingCritic(4, A)
    batch = random_batch(B=B, act_dim=A)
    moved = dict(batch, action=batch["action"] + 0.25)
    cfg = CalQLConfig(n_actions=3, cql_alpha=1.0)
    torch.manual_seed(5)
    _, m1 = calql_critic_loss(sac, batch, cfg)
    torch.manual_seed(5)
    _, m2 = calql_critic_loss(sac, moved, cfg)
    expected = -(sac.critic.w.detach() @ torch.full((A,), 0.25)).sum().item()
    assert m2["cql_conservative"] - m1["cql_conservative"] == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_calql_pretraining_ranks_data_actions_above_out_of_distribution_ones():
    """On offline successes whose actions sit in one corner of the action space, Cal-QL pretraining leaves
    Q(s, a_data) above Q(s, a) for uniform actions at the same states; plain TD training (cql_alpha 0)
    on the same data does not separate them as much. Regression: the conservative term dropped or its sign flipped."""
    rng = np.random.default_rng(0)
    buf = ReplayBuffer(2000, 4, 3, gamma=0.9)
    for _ in range(40):
        T = 10
        acts = np.clip(0.6 + 0.05 * rng.standard_normal((T, 3)), -1, 1)
        buf.add_episode(rng.normal(size=(T + 1, 4)), np.full((T + 1, 3), 0.6), acts, np.eye(T)[-1], np.eye(T)[-1])

    def gap(alpha: float) -> float:
        torch.manual_seed(0)
        sac = small_sac(gamma=0.9, batch_size=64, xi=0.5)
        calql_pretrain(sac, buf, 300, CalQLConfig(cql_alpha=alpha, n_actions=4), np.random.default_rng(1))
        batch = to_torch(buf.sample(256, np.random.default_rng(2)))
        with torch.no_grad():
            q_data = sac.critic(batch["obs"], batch["action"]).min(0).values.mean().item()
            q_ood = sac.critic(batch["obs"], -batch["action"]).min(0).values.mean().item()
        return q_data - q_ood

    conservative, plain = gap(1.0), gap(0.0)
    assert conservative > 0.5, conservative
    assert conservative > plain + 0.3, (conservative, plain)


def test_sac_update_reports_every_metric_under_its_name_with_its_value():
    """The names MLflow logs and the values behind them (with a fixed residual sample): a renamed metric or a
    wrong temperature loss (e.g. -alpha / (logp + H) for -alpha * (logp + H)) shows here."""
    torch.manual_seed(0)
    sac = small_sac(init_temperature=0.5, target_entropy=-1.0)
    L = torch.full((16,), -0.3)
    sac.actor.sample = lambda obs, base: (torch.zeros_like(base), L.clone(), torch.zeros_like(base))
    m = sac.update(random_batch(B=16), step=1)
    assert set(m) == {"critic_td_loss", "q_data", "td_target", "critic_grad_norm", "actor_loss", "actor_grad_norm",
                      "alpha_loss", "alpha", "entropy"}
    assert m["alpha_loss"] == pytest.approx(-0.5 * (-0.3 - 1.0), rel=1e-5)
    assert m["entropy"] == pytest.approx(0.3, rel=1e-5)
    assert m["alpha"] == pytest.approx(sac.alpha.item())


def test_calql_reports_its_terms_by_name():
    torch.manual_seed(0)
    _, m = calql_critic_loss(small_sac(), random_batch(B=8), CalQLConfig(n_actions=2))
    assert set(m) == {"critic_td_loss", "q_data", "td_target", "calql_loss", "cql_conservative", "cql_lse", "calql_bound_rate"}
    assert m["calql_loss"] == pytest.approx(m["critic_td_loss"] + 5.0 * m["cql_conservative"], rel=1e-5)


def test_actor_updates_on_every_ratio_th_step_for_a_ratio_of_three():
    """(step + 1) % 3 == 0: steps 2, 5, 8 (a ratio of 2 cannot tell step + 1 from step - 1)."""
    torch.manual_seed(0)
    sac = small_sac(critic_actor_ratio=3)
    batch = random_batch(B=16)
    assert [("actor_loss" in sac.update(batch, step=s)) for s in range(9)] == [False, False, True] * 3


def test_calql_uniform_actions_cover_the_action_box_and_xi_zero_is_finite():
    """The uniform term samples [-1, 1]^A (not [-1, 0] or [-2, 1]); at xi = 0 (no residual authority) the policy
    terms drop out of the logsumexp instead of making the loss infinite or raising."""
    torch.manual_seed(0)
    A, N, B = 3, 64, 8
    sac = small_sac(act_dim=A)
    seen = []
    critic = sac.critic
    sac.critic = lambda obs, action: (seen.append(action.detach().clone()), critic(obs, action))[1]
    calql_critic_loss(sac, random_batch(B=B, act_dim=A), CalQLConfig(n_actions=N))
    unif = seen[1]
    assert unif.shape == (N * B, A) and unif.min() >= -1 and unif.max() <= 1 and unif.min() < -0.95 and unif.max() > 0.95
    assert abs(unif.mean().item()) < 0.05
    sac = small_sac(act_dim=A, xi=0.0)
    loss, m = calql_critic_loss(sac, random_batch(B=B, act_dim=A), CalQLConfig(n_actions=4))
    assert math.isfinite(loss.item()) and math.isfinite(m["cql_lse"])


def test_sac_checkpoint_names_and_a_mismatched_checkpoint_is_refused():
    """The checkpoint format: optimizer moments under optim.<actor|critic|alpha>.<param index>.<key>; a checkpoint
    missing a network tensor, or 'log_alpha', is refused with the reason (never loaded partially)."""
    torch.manual_seed(0)
    sac = small_sac()
    sac.update(random_batch(B=16), step=1)
    state = sac.state_dict()
    for name in ("actor", "critic", "alpha"):
        assert {f"optim.{name}.0.step", f"optim.{name}.0.exp_avg", f"optim.{name}.0.exp_avg_sq"} <= set(state), name
    missing = {k: v for k, v in state.items() if k != "critic.heads.0.0.weight"}
    with pytest.raises(PLDError, match=r"residual checkpoint does not match the network config \(hidden/layers/n_q/dims\)"):
        small_sac().load_state_dict(missing)
    with pytest.raises(PLDError, match=r"^residual checkpoint lacks key 'log_alpha'; it is not a ResidualSAC checkpoint\.$"):
        small_sac().load_state_dict({k: v for k, v in state.items() if k != "log_alpha"})


def _episode_arrays(T: int, obs_dim: int = 4, act_dim: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(T + 1, obs_dim)), rng.uniform(-1, 1, (T + 1, act_dim)), rng.uniform(-1, 1, (T, act_dim)),
            np.eye(T)[-1], np.eye(T)[-1])


@pytest.mark.parametrize("key,index,bad_shape", [("obs", 0, (4, 4)), ("base_action", 1, (6, 2)), ("action", 2, (4, 3)),
                                                 ("done", 4, (4,))])
def test_add_episode_names_the_array_whose_shape_is_wrong(key, index, bad_shape):
    """T = 5 transitions: obs and base_action need 6 rows, action 5, done 5; the message names the array, both shapes
    and the rule, and nothing is written."""
    buf = ReplayBuffer(50, 4, 3)
    arrays = list(_episode_arrays(5))
    arrays[index] = np.zeros(bad_shape)
    want = {"obs": (6, 4), "base_action": (6, 3), "action": (5, 3), "done": (5,)}[key]
    msg = (f"add_episode: '{key}' has shape {bad_shape}, expected {want} (T=5 transitions need T+1 observation rows); "
           "fix the episode arrays.")
    with pytest.raises(PLDError) as e:
        buf.add_episode(*arrays)
    assert str(e.value) == msg and buf.size == 0 and len(buf) == 0


def test_add_episode_capacity_bound_and_mc_return_shape_are_exact():
    buf = ReplayBuffer(6, 4, 3)
    buf.add_episode(*_episode_arrays(5))  # 6 rows: fits exactly
    assert buf.size == 6 and len(buf) == 5
    with pytest.raises(PLDError) as e:
        ReplayBuffer(5, 4, 3).add_episode(*_episode_arrays(5))
    assert str(e.value) == "add_episode: episode of 6 rows does not fit a buffer of capacity 5; raise the replay capacity."
    with pytest.raises(PLDError) as e:
        ReplayBuffer(50, 4, 3).add_episode(*_episode_arrays(5), mc_return=np.zeros(4))
    assert str(e.value) == "add_episode: 'mc_return' has shape (4,), expected (5,)."


def test_add_episode_rows_sizes_and_the_closing_row():
    """Two episodes of 3 and 4 transitions: 4 + 5 rows, 7 transitions; each episode's last row is an observation only
    (no action, reward, done or return, not sampleable), and the stored arrays are float32 copies of the inputs."""
    buf = ReplayBuffer(20, 4, 3, gamma=0.9)
    a = _episode_arrays(3, seed=1)
    b = _episode_arrays(4, seed=2)
    buf.add_episode(*a)
    assert (buf.size, buf.ptr, len(buf)) == (4, 4, 3)
    buf.action[:] = 7.0  # stale values in the rows the next episode writes must not survive
    buf.reward[:] = 7.0
    buf.done[:] = 7.0
    buf.add_episode(*b)
    assert (buf.size, buf.ptr, len(buf)) == (9, 9, 7)
    last = 8
    assert not buf.valid[last] and buf.valid[4:8].all() and buf.valid.dtype == bool
    assert np.all(buf.action[last] == 0.0) and buf.reward[last] == 0.0 and buf.done[last] == 0.0 and np.isnan(buf.mc_return[last])
    np.testing.assert_array_equal(buf.obs[4:9], b[0].astype(np.float32))
    np.testing.assert_array_equal(buf.action[4:8], b[2].astype(np.float32))
    np.testing.assert_allclose(buf.mc_return[4:8], [0.9 ** 3, 0.9 ** 2, 0.9, 1.0], rtol=1e-6)
    assert buf.obs.dtype == buf.reward.dtype == buf.mc_return.dtype == np.float32


def test_samples_carry_the_next_base_action_for_one_and_two_step_batches():
    buf = ReplayBuffer(40, 4, 3, gamma=0.5)
    obs, base, act, rew, done = _episode_arrays(6)
    buf.add_episode(obs, base, act, rew, done)
    rng = np.random.default_rng(0)
    one = buf.sample(64, rng)
    rows = [int(np.flatnonzero((obs.astype(np.float32) == o).all(1))[0]) for o in one["obs"]]
    np.testing.assert_array_equal(one["next_base_action"], base.astype(np.float32)[np.array(rows) + 1])
    assert "discount" not in one and one["reward"].dtype == np.float32
    two = buf.sample(64, rng, n_step=2)
    rows = np.array([int(np.flatnonzero((obs.astype(np.float32) == o).all(1))[0]) for o in two["obs"]])
    m = np.where(rows == 5, 1, 2)  # the last transition ends the episode after one step
    np.testing.assert_array_equal(two["next_base_action"], base.astype(np.float32)[rows + m])
    np.testing.assert_allclose(two["discount"], 0.5 ** m)
    np.testing.assert_allclose(two["reward"], np.where(rows == 4, 0.5, np.where(rows == 5, 1.0, 0.0)))
    assert two["reward"].dtype == two["done"].dtype == two["discount"].dtype == np.float32
    with pytest.raises(RuntimeError, match=r"^ReplayBuffer\.sample called on a buffer with no transitions\.$"):
        ReplayBuffer(10, 4, 3).sample(2, rng)


def test_sample_mixed_passes_n_step_and_splits_even_a_one_row_share():
    """The n-step setting reaches both buffers' samples; a share of one row is still drawn (31 online + 1 offline);
    an empty buffer leaves the batch to the other; both empty is an error naming both."""
    off, on = ReplayBuffer(40, 4, 3, gamma=0.5), ReplayBuffer(40, 4, 3, gamma=0.5)
    off.add_episode(*_episode_arrays(6, seed=1))
    on.add_episode(*_episode_arrays(6, seed=2))
    rng = np.random.default_rng(0)
    b = sample_mixed(off, on, 32, rng, offline_fraction=1 / 32, n_step=3)
    assert "discount" in b and b["obs"].shape == (32, 4) and b["obs"].dtype == torch.float32
    assert any(torch.equal(b["obs"][0], torch.as_tensor(o, dtype=torch.float32)) for o in off.obs[:6])
    assert all(any(torch.equal(x, torch.as_tensor(o, dtype=torch.float32)) for o in on.obs[:6]) for x in b["obs"][1:])
    b = sample_mixed(off, on, 32, rng, offline_fraction=31 / 32)
    assert all(any(torch.equal(x, torch.as_tensor(o, dtype=torch.float32)) for o in off.obs[:6]) for x in b["obs"][:31])
    assert any(torch.equal(b["obs"][31], torch.as_tensor(o, dtype=torch.float32)) for o in on.obs[:6])
    single = ReplayBuffer(4, 4, 3)
    single.add_episode(*_episode_arrays(1))  # exactly one transition offline, none online
    assert sample_mixed(single, ReplayBuffer(4, 4, 3), 8, rng)["obs"].shape == (8, 4)
    assert sample_mixed(ReplayBuffer(4, 4, 3), single, 8, rng)["obs"].shape == (8, 4)
    with pytest.raises(RuntimeError, match=r"^sample_mixed: both the offline and the online buffer are empty\.$"):
        sample_mixed(ReplayBuffer(4, 4, 3), ReplayBuffer(4, 4, 3), 8, rng)


def test_add_episode_takes_column_vectors_for_the_per_step_scalars():
    """reward, done and mc_return given as (T, 1) columns (as a dataset column often is) load like (T,) arrays."""
    obs, base, act, rew, done = _episode_arrays(5)
    flat, cols = ReplayBuffer(20, 4, 3, gamma=0.9), ReplayBuffer(20, 4, 3, gamma=0.9)
    flat.add_episode(obs, base, act, rew, done, mc_return=np.arange(5.0))
    cols.add_episode(obs, base, act, rew[:, None], done[:, None], mc_return=np.arange(5.0)[:, None])
    for name in ("reward", "done", "mc_return", "valid"):
        np.testing.assert_array_equal(getattr(cols, name), getattr(flat, name))


# ---------------------------------------------------------------------------- what the mutation benchmark found untested
# Each test below was written against surviving mutants of ``bench/mutation.py`` and kills the ones its docstring names.


def _linears(module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in module.modules() if isinstance(m, torch.nn.Linear)]


def test_network_defaults_are_the_papers_and_layer_norm_and_dropout_are_where_asked():
    """Defaults 256 wide, 3 hidden layers, 2 Q heads, no dropout, LayerNorm in every hidden block (actor and
    critics); ``layers=0`` is one linear map; critic dropout only when asked (mutants of the defaults, the
    layer-norm flag, the dropout condition and the layers-0 branches)."""
    assert _linears(mlp(5, 2)) == [(5, 256), (256, 256), (256, 256), (256, 2)]
    assert not any(isinstance(m, torch.nn.Dropout) for m in mlp(5, 2).modules())
    assert _linears(mlp(5, 2, layers=0)) == [(5, 2)]
    q = DoubleQ(5, 2)
    assert len(q.heads) == 2 and _linears(q.heads[0]) == [(7, 256), (256, 256), (256, 256), (256, 1)]
    assert sum(isinstance(m, torch.nn.LayerNorm) for m in q.modules()) == 6
    assert not any(isinstance(m, torch.nn.Dropout) for m in q.modules())
    drop = [m.p for m in DoubleQ(5, 2, hidden=8, layers=2, dropout=0.1).modules() if isinstance(m, torch.nn.Dropout)]
    assert drop == [0.1] * 4
    actor = ResidualActor(5, 2)
    assert (actor.obs_dim, actor.act_dim) == (5, 2)
    assert _linears(actor.trunk) == [(7, 256), (256, 256), (256, 256)]
    assert sum(isinstance(m, torch.nn.LayerNorm) for m in actor.modules()) == 3
    flat = ResidualActor(5, 2, hidden=8, layers=0)
    assert _linears(flat)[0][0] == 7 and all(i == 7 for i, _ in _linears(flat))


def test_tanh_log_prob_stays_finite_when_the_squash_saturates():
    """At |tanh(u)| == 1 in float32 the Jacobian term is log(1 - 1 + eps): the eps must be added (mutant: subtracted -> NaN)."""
    actor = ResidualActor(3, 2, hidden=8, layers=1)
    with torch.no_grad():
        actor.mean_head.bias.fill_(50.0)
    delta, logp, _ = actor.sample(torch.zeros(4, 3), torch.zeros(4, 2))
    assert torch.all(delta == 1.0) and torch.isfinite(logp).all()


def test_sac_builds_its_networks_and_optimizers_from_the_config():
    """Actor depth, critic dropout, frozen target, AdamW lr/weight decay per optimizer (temperature: none), and
    the base action zeroed when the config has no base (mutants dropping these arguments or flags)."""
    sac = small_sac(layers=1, critic_dropout=0.2, lr=2e-3, weight_decay=0.05)  # AdamW default lr: 1e-3
    assert _linears(sac.actor.trunk) == [(4 + 3, 32)]
    assert [m.p for m in sac.critic.modules() if isinstance(m, torch.nn.Dropout)] == [0.2] * sac.cfg.n_q
    assert not any(p.requires_grad for p in sac.critic_target.parameters())
    for opt, wd in ((sac.actor_optim, 0.05), (sac.critic_optim, 0.05), (sac.alpha_optim, 0.0)):
        assert opt.param_groups[0]["lr"] == 2e-3 and opt.param_groups[0]["weight_decay"] == wd
    a_b = torch.ones(2, 3)
    assert torch.equal(small_sac(use_base=False).base(a_b), torch.zeros(2, 3))
    assert torch.equal(small_sac().base(a_b), a_b)


def test_gripper_gain_only_where_there_is_a_gripper_and_a_positive_xi():
    """``xi_gripper`` scales dim 6 by xi_gripper / xi; with no dim 6 (6-D actions) or xi = 0 the gain is 1
    (mutants: ``>=`` on the action size, the xi > 0 guard, the fallback gain)."""
    assert small_sac(act_dim=7, xi=0.5, xi_gripper=1.0).gripper_gain == 2.0
    six = small_sac(act_dim=6, xi=0.5, xi_gripper=1.0)
    assert six.gripper_gain == 1.0 and torch.equal(six._gain, torch.ones(6))
    assert small_sac(act_dim=7, xi=0.0, xi_gripper=1.0).gripper_gain == 1.0


def test_calql_pretrain_schedule_metrics_and_refusal():
    """One-transition buffers train; an empty one is refused with the fix; the actor updates on every
    ``critic_actor_ratio``-th step only; each step's metrics carry the step and reach the callback; the
    buffer is sampled with the config's n-step (mutants of each of these)."""
    empty = ReplayBuffer(10, 4, 3)
    with pytest.raises(PLDError, match=r"^calql_pretrain: the offline buffer has no transitions; collect base successes first\.$"):
        calql_pretrain(small_sac(), empty, 2, CalQLConfig(n_actions=2), np.random.default_rng(0))
    one = ReplayBuffer(10, 4, 3)
    one.add_episode(np.zeros((2, 4)), np.zeros((2, 3)), np.zeros((1, 3)), np.ones(1), np.ones(1))
    assert len(one) == 1
    assert len(calql_pretrain(small_sac(), one, 1, CalQLConfig(n_actions=2), np.random.default_rng(0))) == 1
    buf = ReplayBuffer(100, 4, 3)
    rng = np.random.default_rng(0)
    for _ in range(3):
        buf.add_episode(rng.normal(size=(11, 4)), rng.uniform(-1, 1, (11, 3)), rng.uniform(-1, 1, (10, 3)),
                        np.r_[np.zeros(9), 1.0], np.r_[np.zeros(9), 1.0])
    n_steps, seen = [], []
    orig = buf.sample
    buf.sample = lambda B, g, n_step=1: (n_steps.append(n_step), orig(B, g, n_step))[1]
    hist = calql_pretrain(small_sac(critic_actor_ratio=3, n_step=2), buf, 7, CalQLConfig(n_actions=2),
                          np.random.default_rng(0), callback=lambda s, m: seen.append((s, m)))
    assert n_steps == [2] * 7
    assert [h["step"] for h in hist] == [float(s) for s in range(7)]
    assert [i for i, h in enumerate(hist) if "actor_loss" in h] == [2, 5]
    assert [s for s, _ in seen] == list(range(7)) and all(m is h for (_, m), h in zip(seen, hist))


def test_replay_construction_defaults_dtypes_and_refusals():
    """gamma 0.99 by default; capacity 2 is the least; float32 columns; mc_return NaN until an episode closes;
    add_step before start_episode and bad state dicts raise with their messages (mutants of each)."""
    buf = ReplayBuffer(2, 3, 2)
    assert buf.gamma == 0.99
    assert all(getattr(buf, k).dtype == np.float32 for k in ("obs", "base_action", "action", "reward", "done", "mc_return"))
    assert np.isnan(buf.mc_return).all()
    with pytest.raises(PLDError, match=r"^ReplayBuffer capacity must be >= 2, got 1; raise it\.$"):
        ReplayBuffer(1, 3, 2)
    with pytest.raises(RuntimeError, match=r"^ReplayBuffer\.add_step called with no open episode; call start_episode first\.$"):
        buf.add_step(np.zeros(2), 0.0, 0.0, np.zeros(3), np.zeros(2))
    state = buf.state_dict()
    del state["valid"]
    with pytest.raises(PLDError, match=r"^replay state is missing keys \['valid'\]; the buffer file is corrupt"):
        buf.load_state_dict(state)
    state = buf.state_dict()
    state["obs"] = np.zeros((2, 4), np.float32)
    with pytest.raises(PLDError, match=r"^replay state key 'obs' has shape \(2, 4\), expected \(2, 3\)\.$"):
        buf.load_state_dict(state)


def test_online_rows_overwrite_old_transition_fields_and_returns_cover_what_survives():
    """A closing row written over an old transition row is cleared (action, reward, done 0; mc_return NaN); a
    one-step episode cut without ``done`` gets its return; an episode longer than the ring fills the returns
    of exactly the transitions that survive (the reward-to-go of the last ``capacity - 1`` rewards)."""
    buf = ReplayBuffer(4, 1, 1, gamma=0.5)
    buf.add_episode(np.ones((4, 1)), np.ones((4, 1)), np.ones((3, 1)), np.ones(3), np.ones(3))
    buf.start_episode(np.zeros(1), np.zeros(1))
    buf.add_step(np.full(1, 0.3), 2.0, 0.0, np.zeros(1), np.zeros(1))
    buf.end_episode()
    assert buf.mc_return[0] == 2.0 and buf.action[0, 0] == np.float32(0.3)
    assert (buf.action[1, 0], buf.reward[1], buf.done[1]) == (0.0, 0.0, 0.0) and np.isnan(buf.mc_return[1])
    long = ReplayBuffer(5, 1, 1, gamma=0.5)
    long.start_episode(np.zeros(1), np.zeros(1))
    rewards = np.arange(1, 11, dtype=np.float32)
    for r in rewards:
        long.add_step(np.zeros(1), float(r), 0.0, np.zeros(1), np.zeros(1))
    long.end_episode()
    closing = (long.ptr - 1) % 5
    rows = [(closing - 4 + i) % 5 for i in range(4)]
    assert np.isnan(long.mc_return[closing])
    assert np.allclose(long.mc_return[rows], mc_returns(rewards[-4:], 0.5))


def test_sample_mixed_defaults_to_one_step_returns():
    rng = np.random.default_rng(0)
    bufs = []
    for _ in range(2):
        b = ReplayBuffer(50, 2, 1, gamma=0.5)
        b.add_episode(np.zeros((11, 2)), np.zeros((11, 1)), np.zeros((10, 1)), np.ones(10), np.r_[np.zeros(9), 1.0])
        bufs.append(b)
    batch = sample_mixed(bufs[0], bufs[1], 8, rng, 0.5)
    assert torch.all(batch["reward"] == 1.0)  # n-step 2 would give 1 + 0.5 on all but the last transition
