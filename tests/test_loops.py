"""The two loops that make PLD what it is, step by step, on a toy task with LIBERO's interface:

- the specialist's training episode (``SpecialistTrainer._episode``): warm-up (the base alone, stored),
  base-policy probing (the base alone for ``n ~ U{0..probe_max}`` steps, never stored), then base +
  residual with exploration noise; what the replay holds, what the base is asked, the counters;
- the hybrid collection episode (``collect_pld.hybrid_episode``): the base alone for ``t_base`` steps
  (label: its action), then the specialist (label: the executed action).

The toy task is deterministic and costs no physics, so every step's action, label and stored row is checked
exactly; the simulator tests in ``test_probe.py`` check the same loops on LIBERO. These tests are also the
ones the mutation benchmark (``bench/mutation.py``) runs against both functions' mutants.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pld_core.config import validate_params
from pld_core.replay import ReplayBuffer
from pld_core.encoders import StateEncoder
from pld_core.trainer import SpecialistTrainer, xi_schedule
from pld_core.store import mc_returns
from tasks.collect_pld import hybrid_episode

torch.set_num_threads(1)
OBS_DIM = 8 + 24


class LineEnv:
    """LiberoEnv's interface on a toy task: the state moves by 0.01 * action; initial states 0 and 2 succeed at
    step ``succeed_at[i]`` whatever is sent, 1 and 3 never do (the episode is truncated at ``max_steps``).
    Every episode's observations and received actions (as sent: dtype kept) are recorded."""

    n_init_states = 4
    task = 2

    def __init__(self, max_steps: int = 30, succeed_at=(12, None, 20, None)):
        self.max_steps, self.succeed_at = max_steps, succeed_at
        self.episodes: list[dict] = []

    def _obs(self) -> dict:
        ep = self.episodes[-1]
        env_state = np.r_[np.full(23, 0.01 * (ep["seed"] % 7)), ep["init_state"]]
        return {"state": np.r_[self.pos, self.t / 100].astype(np.float32), "env_state": env_state.astype(np.float32)}

    def reset(self, init_state: int = 0, seed: int = 0) -> dict:
        assert 0 <= init_state < self.n_init_states
        self.t, self.pos = 0, np.full(7, 0.1 * init_state)
        self.episodes.append({"init_state": init_state, "seed": seed, "obs": [], "actions": []})
        obs = self._obs()
        self.episodes[-1]["obs"].append(obs)
        return obs

    def step(self, action):
        ep = self.episodes[-1]
        ep["actions"].append(action.copy())
        self.pos = self.pos + 0.01 * np.asarray(action, dtype=np.float64)
        self.t += 1
        at = self.succeed_at[ep["init_state"]]
        terminated = at is not None and self.t >= at
        truncated = not terminated and self.t >= self.max_steps
        obs = self._obs()
        ep["obs"].append(obs)
        return obs, float(terminated), terminated, truncated, {}


class LinearBase:
    """A deterministic base, ``tanh(W state)``; records the observations it was asked about and its resets."""

    def __init__(self):
        self.W = np.random.default_rng(0).normal(0, 3, (7, 8))
        self.asked: list[list[np.ndarray]] = []
        self.reset_envs: list = []

    def reset(self, env) -> None:
        self.reset_envs.append(env)
        self.asked.append([])

    def act(self, obs: dict) -> np.ndarray:
        self.asked[-1].append(obs["state"].copy())
        return np.tanh(self.W @ obs["state"]).astype(np.float32)

    def action(self, obs: dict) -> np.ndarray:  # the same action, unrecorded
        return np.tanh(self.W @ obs["state"]).astype(np.float32)


def params_for(**residual):
    return validate_params({
        "sac": {"hidden": 16, "layers": 1, "batch_size": 8, "n_q": 2},
        "residual": {"warmup_episodes": 2, "learning_starts": 0, "probe_max_fraction": 0.5, "xi_start": 0.1,
                     "xi_warmup_steps": 70, "replay_capacity": 5000, "seed": 3, "torch_threads": 1, "mode": "sync",
                     **residual},
    })


def offline_buffer(encoder: StateEncoder) -> ReplayBuffer:
    rng = np.random.default_rng(1)
    buf = ReplayBuffer(200, OBS_DIM, 7, 0.99)
    for _ in range(3):
        T = 10
        reward = np.zeros(T, np.float32)
        reward[-1] = 1.0
        buf.add_episode(rng.normal(0, 1, (T + 1, OBS_DIM)), rng.uniform(-1, 1, (T + 1, 7)), rng.uniform(-1, 1, (T, 7)),
                        reward, reward > 0)
    return buf


def make_trainer(tmp_path: Path, base=None, env=None, **residual) -> tuple[SpecialistTrainer, LineEnv, LinearBase]:
    env = env or LineEnv()
    base = base or LinearBase()
    enc = StateEncoder(np.zeros(OBS_DIM), np.ones(OBS_DIM))
    trainer = SpecialistTrainer(params_for(**residual), env, base, enc, offline_buffer(enc), tmp_path, key="t", show_progress=False)
    return trainer, env, base


def force_residual(trainer: SpecialistTrainer, value: float = 2.0) -> None:
    """Push the residual's mean far from zero on every dim, so its actions differ from the base's everywhere."""
    with torch.no_grad():
        trainer.sac.actor.mean_head.bias.fill_(value)


# ----------------------------------------------------------------------------- the training episode
def test_training_episodes_warm_up_probe_then_act_and_store_only_what_follows_the_probe(tmp_path):
    """Per episode: what the env received, what the base was asked, what the replay holds (row by row), the log
    entry and every counter. Regressions this catches (among others): the residual acting in the probe prefix or
    the warm-up, probe steps stored, the probe drawn in the warm-up, the base asked at a terminal state, the
    next row's base action taken at the wrong state, training during the warm-up, xi not advanced, the episode's
    seed or initial state not the ones logged."""
    trainer, env, base = make_trainer(tmp_path, learning_starts=0)
    force_residual(trainer)
    enc = trainer.encoder
    assert trainer.probe_max == 15
    entries = [trainer._episode() for _ in range(8)]
    assert entries == trainer.episode_log
    assert len(env.episodes) == len(base.asked) == 8 and all(e is env for e in base.reset_envs)
    buf, row = trainer.online, 0
    rl_steps = env_steps = stored_total = 0
    for k, (entry, ep, asked) in enumerate(zip(entries, env.episodes, base.asked)):
        warm = k < 2
        T, p = len(ep["actions"]), entry["probe_steps"]
        terminated = env.succeed_at[ep["init_state"]] is not None and T == env.succeed_at[ep["init_state"]]
        assert T == (env.succeed_at[ep["init_state"]] or env.max_steps)
        env_steps += T
        rl_steps += 0 if warm else T
        stored_total += T - p
        assert entry == {"episode": k, "init_state": ep["init_state"], "seed": 3 * 1_000_003 + k, "warmup": warm,
                         "probe_steps": p, "stored_steps": T - p, "length": T, "success": terminated,
                         "env_steps": env_steps, "xi": round(xi_schedule(rl_steps, 0.1, trainer.params.sac.xi, 70), 4)}
        assert ep["seed"] == entry["seed"]
        if warm:
            assert p == 0
        assert 0 <= p <= trainer.probe_max
        # the base is asked at every state it acts from, plus the last one unless the episode succeeded there
        assert len(asked) == T + (0 if terminated else 1)
        assert all(np.array_equal(a, o["state"]) for a, o in zip(asked, ep["obs"]))
        base_actions = [base.action(o) for o in ep["obs"][:T]]
        sent = ep["actions"]
        assert all(a.dtype == np.float32 and a.shape == (7,) for a in sent)
        n_base = T if warm else p
        assert all(np.array_equal(a, b) for a, b in zip(sent[:n_base], base_actions[:n_base]))
        assert all(np.all(a != b) for a, b in zip(sent[n_base:], base_actions[n_base:]))
        # the replay: rows s_p .. s_T, then the next episode's rows
        rows = np.arange(row, row + T - p + 1)
        last_base = base_actions[-1] if terminated else base.action(ep["obs"][T])
        assert np.array_equal(buf.obs[rows], np.stack([enc(o) for o in ep["obs"][p:]]))
        assert np.array_equal(buf.base_action[rows], np.stack(base_actions[p:] + [last_base]))
        assert np.array_equal(buf.action[rows[:-1]], np.stack(sent[p:]))
        assert np.array_equal(buf.reward[rows[:-1]], np.r_[np.zeros(T - p - 1), float(terminated)])
        assert np.array_equal(buf.done[rows[:-1]], np.r_[np.zeros(T - p - 1), float(terminated)])
        assert np.allclose(buf.mc_return[rows[:-1]], mc_returns(buf.reward[rows[:-1]], trainer.params.sac.gamma))
        assert buf.valid[rows[:-1]].all() and not buf.valid[rows[-1]]
        row += T - p + 1
    assert buf.size == row
    assert {e["probe_steps"] for e in entries[2:]} != {0}, "no probing happened: the test would prove nothing"
    assert {e["success"] for e in entries} == {True, False}
    assert (trainer.env_steps, trainer.rl_steps, trainer.stored_transitions, trainer.episodes) == (env_steps, rl_steps, stored_total, 8)
    # learning_starts 0: one update after every step that follows the warm-up, none before
    assert trainer.train_steps == trainer.grad_steps == rl_steps
    assert trainer.sac.xi == pytest.approx(xi_schedule(rl_steps, 0.1, trainer.params.sac.xi, 70))


def test_the_probe_length_is_uniform_over_zero_to_probe_max_and_absent_in_warm_up(tmp_path):
    trainer, env, _ = make_trainer(tmp_path, learning_starts=10**9, warmup_episodes=3, probe_max_fraction=0.2)
    assert trainer.probe_max == 6
    log = [trainer._episode() for _ in range(303)]
    assert [e["probe_steps"] for e in log[:3]] == [0, 0, 0]
    probes = [e["probe_steps"] for e in log[3:]]
    assert set(probes) == set(range(7))
    assert abs(np.mean(probes) - 3.0) < 0.4
    assert {e["init_state"] for e in log} == set(range(env.n_init_states))
    assert trainer.grad_steps == 0 and trainer.train_steps == 0


def test_training_actions_explore_around_the_deterministic_residual(tmp_path):
    """After the probe the executed action is a sample of the residual policy (not its mean) at that step's xi."""
    trainer, env, base = make_trainer(tmp_path, learning_starts=10**9, warmup_episodes=0, probe_max_fraction=0.0)
    entry = trainer._episode()
    ep = env.episodes[-1]
    T = entry["length"]
    assert entry["probe_steps"] == 0 and T == len(ep["actions"])
    xi = np.array([xi_schedule(t, 0.1, trainer.params.sac.xi, 70) for t in range(T)], dtype=np.float32)[:, None]
    x = np.stack([trainer.encoder(o) for o in ep["obs"][:T]])
    a_b = np.stack([base.action(o) for o in ep["obs"][:T]])
    mean = np.stack([trainer.sac.act(x[t], a_b[t], deterministic=True, xi=float(xi[t, 0])) for t in range(T)])
    sent = np.stack(ep["actions"])
    gap = np.abs(sent - mean).max(axis=1)
    assert np.all(gap > 0) and np.all(np.abs(sent - mean) <= 2 * xi + 1e-6)
    assert np.all(np.abs(sent - a_b) <= xi + 1e-6)


def test_without_a_base_the_residual_acts_from_step_zero_on_a_zero_base_action(tmp_path):
    trainer, env, base = make_trainer(tmp_path, learning_starts=10**9, ablation="no_base")
    force_residual(trainer)
    assert trainer.base is None and not trainer.use_probe
    log = [trainer._episode() for _ in range(4)]
    assert base.asked == [] and all(e["probe_steps"] == 0 for e in log)
    assert trainer.online.size == sum(e["length"] + 1 for e in log)
    assert np.all(trainer.online.base_action[:trainer.online.size] == 0)
    for ep in env.episodes:  # the residual alone from step 0, in the warm-up too (there is no base to warm up on)
        assert all(np.all(a != 0) for a in ep["actions"])


def test_no_probe_keeps_every_step_and_the_deadline_cuts_an_episode(tmp_path):
    trainer, env, _ = make_trainer(tmp_path, learning_starts=10**9, warmup_episodes=0, ablation="no_probe")
    log = [trainer._episode() for _ in range(6)]
    assert all(e["probe_steps"] == 0 and e["stored_steps"] == e["length"] for e in log)
    trainer.deadline = time.time() - 1
    cut = trainer._episode()
    assert cut["length"] == 1 and cut["success"] is False and trainer.online.ep_len == -1


# ----------------------------------------------------------------------------- the hybrid collection episode
class Hybrid:
    """The specialist's interface for collect_pld: ``base_act`` and ``residual_action`` (a fixed offset)."""

    OFFSET = np.array([0.0, 0.3, 0.0, 0.0, -0.2, 0.0, 0.5], dtype=np.float32)

    def __init__(self):
        self.base = LinearBase()

    def reset(self, env):
        self.base.reset(env)

    def base_act(self, obs):
        return self.base.act(obs)

    def residual_action(self, obs, base_action):
        return np.clip(base_action + self.OFFSET * (1 + obs["state"][7]), -1, 1)  # state[7] is t / 100


@pytest.mark.parametrize("init_state,t_base", [(0, 0), (0, 5), (2, 19), (1, 7), (3, 30)])
def test_hybrid_episode_hands_over_at_t_base_and_labels_what_was_executed(init_state, t_base):
    """Before ``t_base`` the base acts (label: its action); from ``t_base`` the specialist acts (label: what was
    executed). The next base action of the last step is the base's at the final state, unless that state is a
    success (then the TD target masks it and the base is not asked). Episode metadata: task, state, seed, t_base."""
    env, pol = LineEnv(), Hybrid()
    ok, ep = hybrid_episode(env, pol, init_state=init_state, seed=11, t_base=t_base, gamma=0.9)
    rec = env.episodes[-1]
    T = len(rec["actions"])
    terminated = env.succeed_at[init_state] is not None
    assert ok is terminated and ep.success is terminated and T == (env.succeed_at[init_state] or env.max_steps)
    assert (ep.task_index, ep.init_state, ep.seed, ep.t_base) == (2, init_state, 11, t_base)
    assert (rec["init_state"], rec["seed"]) == (init_state, 11) and pol.base.reset_envs == [env]
    s = ep.steps
    base_actions = np.stack([pol.base.action(o) for o in rec["obs"][:T]])
    n = min(t_base, T)
    t = np.arange(n, T, dtype=np.float32)[:, None] / 100
    executed = np.concatenate([base_actions[:n], np.clip(base_actions[n:] + Hybrid.OFFSET * (1 + t), -1, 1)])
    assert np.array_equal(np.stack(rec["actions"]), executed)
    assert np.array_equal(s["action"], executed) and np.array_equal(s["base_action"], base_actions)
    assert np.array_equal(s["label_action"], executed)  # base action before t_base, executed action after
    assert np.array_equal(s["obs_state"], np.stack([o["state"] for o in rec["obs"][:T]]))
    assert np.array_equal(s["obs_env_state"], np.stack([o["env_state"] for o in rec["obs"][:T]]))
    final = base_actions[-1] if terminated else pol.base.action(rec["obs"][T])
    assert np.array_equal(s["next_base_action"], np.concatenate([base_actions[1:], final[None]]))
    assert len(pol.base.asked[-1]) == T + (0 if terminated else 1)
    reward = np.r_[np.zeros(T - 1), float(terminated)]
    assert np.array_equal(s["reward"], reward) and np.array_equal(s["done"], reward > 0)
    assert np.allclose(s["mc_return"], mc_returns(reward, 0.9))


# ----------------------------------------------------------------------------- the prefixed rollout itself
@pytest.mark.parametrize("init_state,prefix", [(0, 4), (1, 0), (3, 50)])
def test_prefixed_steps_reports_each_step(init_state, prefix):
    """Every step says its index, whether it was in the prefix, and how the episode ended (only the last one
    is terminated or truncated); the next step starts where the last one left off."""
    from pld_core.rollout import prefixed_steps

    env, pol = LineEnv(), Hybrid()
    steps = list(prefixed_steps(env, pol, init_state, seed=5, prefix=prefix))
    T = len(env.episodes[-1]["actions"])
    assert [s.t for s in steps] == list(range(T))
    assert [s.prefix for s in steps] == [t < prefix for t in range(T)]
    ended = env.succeed_at[init_state] is not None
    assert [s.terminated for s in steps] == [False] * (T - 1) + [ended]
    assert [s.truncated for s in steps] == [False] * (T - 1) + [not ended]
    assert all(a.next_obs is b.obs and a.next_base_action is b.base_action for a, b in zip(steps, steps[1:]))


def test_each_observation_is_encoded_once(tmp_path):
    """The trainer encodes an observation once, for the residual and the replay (an image encoder is a ResNet pass)."""
    trainer, env, _ = make_trainer(tmp_path, learning_starts=10**9, warmup_episodes=1)
    calls = []
    real = trainer.encoder.__class__.__call__

    class Counting(trainer.encoder.__class__):
        def __call__(self, obs):
            calls.append(obs)  # kept alive, so ids stay distinct
            return real(self, obs)

    trainer.encoder.__class__ = Counting
    for _ in range(5):
        n = len(calls)
        trainer._episode()
        ep = env.episodes[-1]
        assert len(calls) - n <= len(ep["obs"]) and len({id(o) for o in calls[n:]}) == len(calls) - n
