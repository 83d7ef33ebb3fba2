"""The Probe stage end to end on real LIBERO (libero_object task 0), tiny budgets.

The base is the scripted expert with noise 0.3 (a flawed base, ~50-70% success). What is checked:
the offline store (successes, Monte-Carlo returns, next base actions), the Cal-QL warm start's
outputs, and the residual training loop's own properties: probing steps never reach the replay,
warm-up episodes execute the base action, every update draws a 1:1 offline/online batch, the
ablation switches, and a SIGKILLed train_residual resuming from its checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pld_core.artifacts import read_manifest, tmp_dir_for
from pld_core.config import validate_params
from pld_core.env import LiberoEnv
from pld_core.errors import PLDError
from pld_core.replay import ReplayBuffer
from pld_core.scripted import ScriptedExpert
from pld_core.encoders import StateEncoder
from pld_core.residual_policy import load_residual
from pld_core.evaluation import EVAL_SEED, steps_to_threshold
from pld_core.learner import offline_buffer_from_store
from pld_core.trainer import SpecialistTrainer, xi_schedule
from pld_core.store import TrajectoryStore, mc_returns
from pld_core.layout import OFFLINE_STORE, BaseRef
from tasks import collect_offline, pretrain_critic, train_residual

from builders import RecordingEnv, kill_at_first_checkpoint

ROOT = Path(__file__).resolve().parent.parent
BASE = "scripted:noise=0.3"
SUITE, TASK = "libero_object", 0

torch.set_num_threads(1)


def tiny(**residual) -> dict:
    return {
        "env": {"suite": SUITE, "tasks": [TASK]},
        "offline": {"successes": 2, "max_episodes": 8},
        "calql": {"steps": 6, "n_actions": 2},
        "sac": {"hidden": 32, "layers": 1, "batch_size": 32},
        "residual": {"env_steps": 500, "warmup_episodes": 1, "learning_starts": 0, "checkpoint_every": 150,
                     "eval_every": 10_000, "eval_episodes": 1, "replay_capacity": 4000, "xi_warmup_steps": 200,
                     **residual},
        "evaluate": {"episodes": 1},
    }


def training_episodes(renv: RecordingEnv) -> list[dict]:
    return [e for e in renv.episodes if e["seed"] < EVAL_SEED]


class CountingBase(ScriptedExpert):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls = 0

    def act(self, obs=None):
        self.calls += 1
        return super().act(obs)


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """collect_offline (2 successes) and pretrain_critic, once for the module."""
    root = tmp_path_factory.mktemp("probe")
    params = validate_params(tiny())
    off = collect_offline.run(params, root / "offline", BaseRef.of(BASE), TASK, show_progress=False)
    crit = pretrain_critic.run(params, root / "critic_init", root / "offline", show_progress=False)
    return {"root": root, "params": params, "offline": off, "critic": crit}


@pytest.fixture(scope="module")
def env():
    e = LiberoEnv(SUITE, TASK, max_steps=150)  # short episodes: the loop's properties, not success, are tested
    yield e
    e.close()


def make_trainer(probe, env, params, work: Path, base=None) -> SpecialistTrainer:
    store = TrajectoryStore.open(probe["root"] / "offline" / OFFLINE_STORE)
    encoder = StateEncoder.from_store(store)
    offline = offline_buffer_from_store(store, encoder, params.sac.gamma)
    base = base if base is not None else CountingBase(noise=0.3, seed=0)
    return SpecialistTrainer(params, env, base, encoder, offline, work, key="test", show_progress=False)


# ----------------------------------------------------------------------------- offline + Cal-QL stages
def test_collect_offline_store_is_consistent(probe):
    off, root, params = probe["offline"], probe["root"], probe["params"]
    assert off["stage"] == "collect_offline" and off["metrics"]["successes"] == 2
    assert 0 < off["metrics"]["base_success_rate"] <= 1 and off["metrics"]["episodes"] >= 2
    store = TrajectoryStore.open(root / "offline" / OFFLINE_STORE)
    steps = store.load()  # pandera-validated
    table = store.episode_table()
    assert len(table) == 2 and table["success"].all() and store.attrs["gamma"] == params.sac.gamma
    ends = store.episode_ends
    for s, e in zip(np.concatenate([[0], ends[:-1]]), ends):
        ep = {k: v[s:e] for k, v in steps.items()}
        assert ep["done"][-1] and not ep["done"][:-1].any()
        assert ep["reward"][-1] == 1.0 and not ep["reward"][:-1].any()
        assert np.allclose(ep["mc_return"], mc_returns(ep["reward"], params.sac.gamma))
        assert np.isclose(ep["mc_return"][0], params.sac.gamma ** (e - s - 1))
        # the base action at every next state is the next step's base action
        assert np.array_equal(ep["next_base_action"][:-1], ep["base_action"][1:])
        assert np.array_equal(ep["action"], ep["base_action"]) and np.array_equal(ep["label_action"], ep["base_action"])
    # a second run with the same params and base is skipped (same manifest)
    again = collect_offline.run(params, root / "offline", BaseRef.of(BASE), TASK, show_progress=False)
    assert again["finished_at"] == off["finished_at"] and again["key"] == off["key"]
    assert (off["skipped"], again["skipped"]) == (False, True)  # every stage reports it, through the one protocol


def test_offline_buffer_has_every_stored_transition(probe):
    store = TrajectoryStore.open(probe["root"] / "offline" / OFFLINE_STORE)
    encoder = StateEncoder.from_store(store)
    buf = offline_buffer_from_store(store, encoder, 0.99)
    assert len(buf) == store.n_steps  # successes end in done: no transition is dropped
    batch = buf.sample(512, np.random.default_rng(0))
    assert np.isfinite(batch["mc_return"]).all() and np.abs(batch["obs"]).max() <= StateEncoder.CLIP


def test_pretrain_critic_outputs(probe):
    crit, root = probe["critic"], probe["root"]
    d = root / "critic_init"
    state = load_file(str(d / pretrain_critic.WEIGHTS))
    assert any(k.startswith("critic.") for k in state) and "encoder.mean" in state
    config = json.loads((d / pretrain_critic.CONFIG).read_text())
    assert config["steps"] == 6 and config["obs_dim"] == state["encoder.mean"].shape[0]
    losses = json.loads((d / "loss.json").read_text())
    assert len(losses) == 6 and all(np.isfinite(h["calql_loss"]) for h in losses)
    assert (d / "loss.png").stat().st_size > 1000 and crit["metrics"]["offline_transitions"] > 0


# ----------------------------------------------------------------------------- the training loop
@pytest.fixture(scope="module")
def trained(probe, env, tmp_path_factory):
    """One in-process run recording env observations/actions and every replay sample."""
    params = validate_params(tiny(env_steps=600, probe_max_fraction=0.3))
    renv = RecordingEnv(env)
    trainer = make_trainer(probe, renv, params, tmp_path_factory.mktemp("loop"))
    samples: list[tuple[int, int]] = []
    original = ReplayBuffer.sample

    def recording_sample(self, batch_size, rng, n_step=1):
        samples.append((id(self), batch_size))
        return original(self, batch_size, rng, n_step)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ReplayBuffer, "sample", recording_sample)
        summary = trainer.run()
    return {"trainer": trainer, "env": renv, "samples": samples, "summary": summary, "params": params}


def test_probing_steps_never_enter_the_replay(trained):
    trainer, renv = trained["trainer"], trained["env"]
    log = trainer.episode_log
    episodes = training_episodes(renv)
    assert len(episodes) == len(log) >= 3
    assert sum(e["probe_steps"] for e in log) > 0, "no probing happened: the test would prove nothing"
    assert not any(e["probe_steps"] for e in log if e["warmup"])
    expected_rows = []
    for entry, ep in zip(log, episodes):
        T, p = entry["length"], entry["probe_steps"]
        assert len(ep["obs"]) == T + 1
        if T > p:  # rows: the states from the takeover on (s_p .. s_T); s_0 .. s_{p-1} are probe states
            expected_rows.extend(trainer.encoder(o) for o in ep["obs"][p:])
    buf = trainer.online
    assert buf.size == len(expected_rows) == trainer.env_steps - sum(e["probe_steps"] for e in log) + sum(e["stored_steps"] > 0 for e in log)
    assert np.array_equal(buf.obs[:buf.size], np.stack(expected_rows))
    assert len(buf) == sum(e["stored_steps"] for e in log)


def test_warmup_episodes_execute_the_base_action(trained):
    trainer, renv = trained["trainer"], trained["env"]
    log, buf = trainer.episode_log, trainer.online
    row = 0
    residual_differs = []
    for entry, ep in zip(log, training_episodes(renv)):
        n = entry["stored_steps"]
        if n == 0:
            continue
        rows = slice(row, row + n)
        # what was stored is what the env received
        assert np.array_equal(buf.action[rows], np.stack(ep["actions"][entry["probe_steps"]:]))
        if entry["warmup"]:
            assert np.array_equal(buf.action[rows], buf.base_action[rows])
        else:
            residual_differs.append(np.any(buf.action[rows] != buf.base_action[rows], axis=1).mean())
        row += n + 1
    assert log[0]["warmup"] and residual_differs and min(residual_differs) > 0.9


class FrozenEnv:
    """The real env's first observation, forever: a step costs no physics and an episode ends at ``max_steps``.
    For the loop's bookkeeping over many episodes (what the base, the residual and the replay see), not behaviour."""

    def __init__(self, env: LiberoEnv, max_steps: int):
        self._env, self.max_steps = env, max_steps
        self.actions: list[list[np.ndarray]] = []

    def __getattr__(self, name):
        return getattr(self._env, name)

    def reset(self, init_state: int = 0, seed: int = 0):
        self.obs, self.t = self._env.reset(init_state, seed=seed), 0
        self.actions.append([])
        return self.obs

    def step(self, action):
        self.t += 1
        self.actions[-1].append(np.asarray(action, dtype=np.float32).copy())
        return self.obs, 0.0, False, self.t >= self.max_steps, {}


class RecordingBase:
    """Any base, with every action it returned recorded per episode."""

    def __init__(self, base):
        self.base, self.episodes = base, []

    def reset(self, env):
        self.base.reset(env)
        self.episodes.append([])

    def act(self, obs):
        a = np.asarray(self.base.act(obs), dtype=np.float32)
        self.episodes[-1].append(a.copy())
        return a


def test_probe_prefix_is_the_base_alone_with_a_uniform_length_then_the_residual_acts(probe, env, tmp_path):
    """150 episodes of 40 steps: each starts with n ~ U{0..int(0.3 * 40)} steps in which the env receives exactly the
    base's action, then the residual (forced far from zero) changes every action; only those steps are stored.
    Regressions seen red: the residual acting during the prefix (``(probing or warmup)`` -> ``warmup``); the draw's
    upper end excluded (``integers(0, probe_max)``); the prefix bounded by the episode length instead of the fraction."""
    params = validate_params(tiny(probe_max_fraction=0.3, warmup_episodes=0, learning_starts=10**9))
    fenv = FrozenEnv(env, max_steps=40)
    base = RecordingBase(ScriptedExpert(noise=0.3, seed=0))
    trainer = make_trainer(probe, fenv, params, tmp_path, base=base)
    with torch.no_grad():
        trainer.sac.actor.mean_head.bias.fill_(2.0)  # a residual far from zero on every dim it acts on
    assert trainer.probe_max == 12
    for _ in range(150):
        trainer._episode()
    probes = [e["probe_steps"] for e in trainer.episode_log]
    assert set(probes) == set(range(13)), sorted(set(probes))
    assert abs(np.mean(probes) - 6.0) < 1.0
    for entry, executed, base_actions in zip(trainer.episode_log, fenv.actions, base.episodes):
        p = entry["probe_steps"]
        assert len(executed) == 40 and entry["stored_steps"] == 40 - p
        assert all(np.array_equal(a, b) for a, b in zip(executed[:p], base_actions[:p]))
        assert all(np.any(a != b) for a, b in zip(executed[p:], base_actions[p:]))
    assert trainer.stored_transitions == sum(40 - p for p in probes)


def test_hybrid_episode_hands_over_at_t_base_and_labels_what_was_executed(env):
    """collect_pld's episode: the base alone for exactly ``t_base`` steps (label: the base action), then the
    specialist (label: the executed action); the env receives those actions. Regressions seen red: the handover
    one step late (``env.t <= t_base``); the takeover labelled with the base action."""
    from tasks.collect_pld import hybrid_episode

    class Hybrid:
        def __init__(self):
            self.expert = ScriptedExpert(noise=0.0)

        def reset(self, env):
            self.expert.reset(env)

        def base_act(self, obs):
            return self.expert.act(obs)

        def residual_action(self, obs, base_action):
            return np.clip(base_action + np.array([0.0, 0.3, 0.0, 0.0, 0.0, 0.0, 0.5], dtype=np.float32), -1, 1)

    renv = RecordingEnv(env)
    for t_base in (0, 17):
        ok, ep = hybrid_episode(renv, Hybrid(), init_state=1, seed=3, t_base=t_base, gamma=0.99)
        s, executed = ep.steps, np.stack(renv.episodes[-1]["actions"])
        assert ep.t_base == t_base and ep.success == ok and len(ep) == len(executed)
        assert np.array_equal(s["action"], executed)
        assert np.array_equal(s["action"][:t_base], s["base_action"][:t_base])
        assert np.array_equal(s["label_action"][:t_base], s["base_action"][:t_base])
        after = slice(t_base, None)
        assert np.array_equal(s["label_action"][after], s["action"][after])
        assert np.all(s["action"][after, 6] != s["base_action"][after, 6])  # the specialist's gripper offset
        assert np.array_equal(s["next_base_action"][:-1], s["base_action"][1:])


def test_updates_draw_one_to_one_offline_online_batches(trained):
    trainer, samples = trained["trainer"], trained["samples"]
    half = trained["params"].sac.batch_size // 2
    assert trainer.grad_steps > 100 and len(samples) == 2 * trainer.grad_steps
    offline, online = id(trainer.offline), id(trainer.online)
    assert samples[0::2] == [(offline, half)] * trainer.grad_steps
    assert samples[1::2] == [(online, half)] * trainer.grad_steps
    # no update during the warm-up episode
    assert trainer.grad_steps <= trainer.env_steps - trainer.episode_log[0]["length"]


def test_xi_schedule_and_curve(trained):
    trainer, summary = trained["trainer"], trained["summary"]
    assert xi_schedule(0, 0.1, 0.5, 200) == 0.1 and xi_schedule(100, 0.1, 0.5, 200) == pytest.approx(0.3)
    assert xi_schedule(10_000, 0.1, 0.5, 200) == 0.5 and xi_schedule(5, 0.1, 0.5, 0) == 0.5
    assert trainer.episode_log[0]["xi"] == pytest.approx(0.1)  # warm-up does not advance xi
    assert summary["xi"] == pytest.approx(0.5) and summary["env_steps"] >= 600
    assert [p["env_steps"] for p in trainer.curve] == [0, trainer.env_steps] and trainer.curve[-1]["final"]


def test_stage_keys_follow_the_base_content_not_its_path(tmp_path):
    """A base directory copied elsewhere (a moved data dir, a DVC checkout) keeps its identity, and so the keys of
    the stages that run it; a change to its content changes both."""
    from pld_core.stage import stage_key

    a = tmp_path / "a" / "pretrained_model"
    a.mkdir(parents=True)
    (a / "config.json").write_text('{"type": "act"}')
    (a / "model.safetensors").write_bytes(b"x" * 100)
    b = tmp_path / "elsewhere" / "pretrained_model"
    shutil.copytree(a, b)
    params = validate_params(tiny())

    def key(path):
        return stage_key(collect_offline.STAGE, *collect_offline.stage_inputs(params, BaseRef.of(str(path)), TASK))

    assert BaseRef.of(str(a)).digest == BaseRef.of(str(b)).digest and BaseRef.of(str(a)).spec != BaseRef.of(str(b)).spec
    assert key(a) == key(b)
    (b / "config.json").write_text('{"type": "act", "chunk_size": 5}')
    assert BaseRef.of(str(a)).digest != BaseRef.of(str(b)).digest and key(a) != key(b)
    (b / "config.json").write_text('{"type": "act"}')
    (b / "model.safetensors").write_bytes(b"x" * 101)  # weights: their size is part of the identity
    assert key(a) != key(b)
    # a stage's output dir is identified by its manifest, wherever it is
    (tmp_path / "a" / "manifest.json").write_text('{"output_digest": "0123456789abcdef"}')
    assert BaseRef.of(str(a)).digest == "0123456789abcdef"


def test_steps_to_95_counts_only_full_evaluations():
    curve = [{"env_steps": 0, "success_rate": 0.0, "episodes": 10}, {"env_steps": 100, "success_rate": 1.0, "episodes": 10},
             {"env_steps": 200, "success_rate": 0.94, "episodes": 50}, {"env_steps": 300, "success_rate": 0.96, "episodes": 50}]
    assert steps_to_threshold(curve) == 100
    assert steps_to_threshold(curve, min_episodes=50) == 300
    assert steps_to_threshold(curve[:3], min_episodes=50) is None


def test_stop_at_ends_training_at_a_passing_full_evaluation(probe, env, tmp_path):
    """A base that solves the task and a residual that never trains (learning_starts beyond the run):
    the first periodic eval passes, the full one (2 states) confirms, training ends there and that
    full eval is the final one."""
    params = validate_params({**tiny(env_steps=3000, eval_every=150, eval_episodes=1, learning_starts=100_000, stop_at=0.95),
                              "evaluate": {"episodes": 2}})
    trainer = make_trainer(probe, env, params, tmp_path, base=CountingBase(noise=0.0, seed=0))
    summary = trainer.run()
    assert summary["stopped_early"] and 150 <= summary["env_steps"] < 600
    kinds = [(p["episodes"], p["final"]) for p in trainer.curve]
    assert kinds == [(1, False), (1, False), (2, True)], trainer.curve
    assert summary["final_success_rate"] == 1.0 and summary["steps_to_95"] == summary["env_steps"] == trainer.curve[-1]["env_steps"]
    # without stop_at the same run goes the distance
    params = validate_params({**tiny(env_steps=450, eval_every=150, eval_episodes=1, learning_starts=100_000),
                              "evaluate": {"episodes": 2}})
    trainer = make_trainer(probe, env, params, tmp_path / "full", base=CountingBase(noise=0.0, seed=0))
    summary = trainer.run()
    assert not summary["stopped_early"] and summary["env_steps"] >= 450


@pytest.mark.parametrize("ablation", ["no_base", "no_offline", "no_probe"])
def test_ablation_switches(probe, env, tmp_path, ablation):
    params = validate_params(tiny(ablation=ablation, env_steps=150, warmup_episodes=0))
    base = CountingBase(noise=0.3, seed=0)
    samples: list[int] = []
    original = ReplayBuffer.sample
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ReplayBuffer, "sample", lambda self, n, rng, n_step=1: (samples.append(id(self)), original(self, n, rng, n_step))[1])
        trainer = make_trainer(probe, env, params, tmp_path, base=base)
        trainer.run()
    log = trainer.episode_log
    assert trainer.grad_steps > 0
    if ablation == "no_base":
        assert base.calls == 0 and not trainer.sac.cfg.use_base
        assert not trainer.online.base_action[:trainer.online.size].any()
        assert sum(e["probe_steps"] for e in log) == 0
    if ablation == "no_offline":
        assert id(trainer.offline) not in samples and samples.count(id(trainer.online)) == trainer.grad_steps
    if ablation == "no_probe":
        assert sum(e["probe_steps"] for e in log) == 0 and base.calls > 0
        assert trainer.online.size == trainer.env_steps + len(log)


def test_the_pretrained_critic_warm_starts_the_specialist_unless_no_calql(probe, tmp_path, monkeypatch):
    """Through the train_residual stage: the specialist's critic and target start as pretrain_critic's (the actor
    and the learner process start from this SAC's state); under ``residual.ablation: no_calql`` they start fresh
    and the stage runs to its end without a critic_init. Regression seen red: critic_state not passed to the trainer."""
    from tasks import train_residual as stage

    root, started = probe["root"], {}
    real = stage.make_trainer

    def spy(params, *args, **kwargs):
        trainer = real(params, *args, **kwargs)
        started[params.residual.ablation] = {k: v.clone() for k, v in trainer.sac.state_dict().items()
                                             if k.startswith(("critic.", "critic_target."))}
        return trainer

    monkeypatch.setattr(stage, "make_trainer", spy)
    init = load_file(str(root / "critic_init" / pretrain_critic.WEIGHTS))
    for ablation in ("none", "no_calql"):
        params = validate_params(tiny(ablation=ablation, env_steps=30, warmup_episodes=0, final_eval_episodes=1, mode="sync"))
        m = stage.run(params, tmp_path / ablation, BaseRef.of(BASE), root / "offline", root / "critic_init", show_progress=False)
        assert m["metrics"]["env_steps"] >= 30 and (tmp_path / ablation / "residual.safetensors").is_file()
        critic_digest = read_manifest(root / "critic_init")["output_digest"]
        assert m["inputs"].get("critic") == (None if ablation == "no_calql" else critic_digest)
    warm, fresh = started["none"], started["no_calql"]
    assert warm.keys() == fresh.keys() and len(warm) > 4
    assert all(torch.equal(v, init[k]) for k, v in warm.items())
    assert not any(torch.equal(v, init[k]) for k, v in fresh.items() if k.endswith("weight"))


def test_sync_trainer_resumed_from_its_checkpoint_ends_bit_identical_to_an_uninterrupted_run(probe, env, tmp_path):
    """``residual.mode: sync`` is documented as bit-reproducible: a run stopped after its first checkpoint and
    resumed by a new trainer ends with the same weights, replay and episode log as a run that was never stopped.
    Regressions seen red: the numpy RNG state not restored on resume; the torch RNG state not restored."""
    from pld_core.policies import make_policy_factory

    params = validate_params(tiny(mode="sync", env_steps=400, checkpoint_every=200, probe_max_fraction=0.3))  # 150-step episodes

    def trainer(work: Path) -> SpecialistTrainer:
        torch.manual_seed(0)  # the trainer seeds torch only after building its networks: fix their init here
        return make_trainer(probe, env, params, work, base=make_policy_factory(BASE, seed=0)(env))

    whole = trainer(tmp_path / "whole")
    whole.run()

    class Stop(Exception):
        pass

    first = trainer(tmp_path / "split")
    real_checkpoint = first.checkpoint

    def checkpoint_then_stop():
        real_checkpoint()
        raise Stop  # as if killed right after the first checkpoint

    first.checkpoint = checkpoint_then_stop
    with pytest.raises(Stop):
        first.run()
    resumed = trainer(tmp_path / "split")
    resumed.run()
    assert resumed.resumed_from == [first.env_steps] == [300]  # after a warm-up and a trained episode: torch RNG used
    assert resumed.episode_log == whole.episode_log and resumed.grad_steps == whole.grad_steps > 0
    a, b = whole.sac.state_dict(), resumed.sac.state_dict()
    diff = {k: (a[k].float() - b[k].float()).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert a.keys() == b.keys() and not diff, diff
    n = whole.online.size
    assert resumed.online.size == n and np.array_equal(resumed.online.obs[:n], whole.online.obs[:n])


# ----------------------------------------------------------------------------- resume after SIGKILL
DRIVER = """
import json, sys
from pathlib import Path
from pld_core.config import validate_params
from pld_core.layout import BaseRef
from tasks import train_residual
params = validate_params(json.loads(sys.argv[1]))
train_residual.run(params, Path(sys.argv[2]), BaseRef.of(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5]), show_progress=False)
"""


def test_train_residual_resumes_after_sigkill(probe, env, tmp_path):
    raw = tiny()
    params = validate_params(raw)
    root = probe["root"]
    out = tmp_path / "residual"
    ckpt_root = tmp_dir_for(out) / "checkpoints"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    args = [sys.executable, str(driver), json.dumps(raw), str(out), BASE, str(root / "offline"), str(root / "critic_init")]
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    returncode = kill_at_first_checkpoint(args, environ, ckpt_root, ROOT)
    assert returncode == -signal.SIGKILL
    assert read_manifest(out) is None and not out.exists()
    done = sorted(p for p in ckpt_root.glob("step_*") if (p / "state.json").is_file())
    assert len(done) == 1
    killed_state = json.loads((done[0] / "state.json").read_text())
    step = killed_state["env_steps"]
    assert 150 <= step < 500

    manifest = train_residual.run(params, out, BaseRef.of(BASE), root / "offline", root / "critic_init", show_progress=False)
    m = manifest["metrics"]
    assert m["resumed_from"] == [step], "did not resume from the checkpoint"
    assert m["env_steps"] >= 500 and m["episodes"] > killed_state["episodes"]
    log = json.loads((out / "train_log.json").read_text())
    assert log[:len(killed_state["episode_log"])] == killed_state["episode_log"]
    assert [e["episode"] for e in log] == list(range(len(log)))
    curve = json.loads((out / "curve.json").read_text())
    assert curve["points"][0] == killed_state["curve"][0] and curve["points"][-1]["final"]
    for name in ("residual.safetensors", "config.json", "curve.png", "manifest.json"):
        assert (out / name).is_file(), name
    assert not tmp_dir_for(out).exists()
    # fresh: a rerun is skipped
    assert train_residual.run(params, out, BaseRef.of(BASE), root / "offline", root / "critic_init", show_progress=False)["finished_at"] == manifest["finished_at"]

    # the saved specialist: base action + xi * tanh(mean) of the trained actor, clipped
    policy = load_residual(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["base"] == BASE and cfg["task"] == TASK and policy.sac.xi == pytest.approx(0.5)
    obs = env.reset(3, seed=0)
    policy.reset(env)
    a_b = policy.base_act(obs)
    x = torch.as_tensor(policy.encoder(obs))[None]
    with torch.no_grad():
        delta = torch.tanh(policy.sac.actor(x, torch.as_tensor(a_b)[None])[0])[0].numpy()
    assert np.allclose(policy.residual_action(obs, a_b), np.clip(a_b + 0.5 * delta, -1, 1), atol=1e-6)


def test_user_errors_name_the_fix(probe, tmp_path):
    root = probe["root"]
    with pytest.raises(PLDError, match="residual.encoder"):
        train_residual.run(validate_params(tiny(encoder="image")), tmp_path / "r", BaseRef.of(BASE), root / "offline", root / "critic_init")
    with pytest.raises(PLDError, match="pretrain_critic"):
        train_residual.run(validate_params(tiny()), tmp_path / "r", BaseRef.of(BASE), root / "offline", None)
    with pytest.raises(PLDError, match="collect_offline"):
        pretrain_critic.run(validate_params(tiny()), tmp_path / "c", tmp_path / "missing")
    with pytest.raises(PLDError, match="not a residual specialist"):
        load_residual(root / "critic_init")


def test_pld_bench_specialist_prints_its_json_last_with_the_overrides(capsys, tmp_path):
    """`pld bench specialist`: the last stdout line is the benchmark JSON (steps_to_95, final_success_rate, ci95,
    env_steps) with the --set overrides it ran under; the specialist it trained carries sac.xi_gripper."""
    from pld_app.cli import main as pld_main

    capsys.readouterr()
    code = pld_main(["bench", "specialist", "--profile", "smoke", "--task", "0", "--base", "scripted:noise=0.6",
                     "--set", "residual.env_steps=300", "--set", "residual.mode=sync", "--set", "sac.xi_gripper=1.0", "--out", str(tmp_path / "b")])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    r = json.loads(out[-1])
    assert r["set"] == ["residual.env_steps=300", "residual.mode=sync", "sac.xi_gripper=1.0"]
    assert r["env_steps"] >= 300 and r["task"] == 0 and r["ablation"] == "none"
    from pld_core.stats import wilson_interval

    assert r["ci95"] == pytest.approx(list(wilson_interval(round(r["final_success_rate"] * 2), 2)), abs=1e-3)  # 2 states
    last = r["curve"][-1]
    assert (last["env_steps"], last["success_rate"], last["episodes"]) == (r["env_steps"], r["final_success_rate"], 2)
    # steps_to_95: the first evaluation on the full 2 states at >= 95% (the smoke's periodic evals are full too)
    assert r["steps_to_95"] == next((p["env_steps"] for p in r["curve"] if p["episodes"] >= 2 and p["success_rate"] >= 0.95), None)
    spec = load_residual(r["out_dir"], base="scripted:noise=0.6")
    assert spec.sac.cfg.xi_gripper == 1.0 and spec.sac.gripper_gain == 1.0 / spec.sac.cfg.xi
