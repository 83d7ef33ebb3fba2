"""Issue 7, speed: the async actor-learner trainer, parallel collection, the speed benchmarks.

Real LIBERO (libero_object task 0, short episodes), a synthetic offline buffer (the loop's
mechanics are tested, not learning) and tiny networks. What is checked:

- async training: the learner receives every stored transition exactly once and no probing step;
  warm-up episodes execute the base; updates start only after the warm-up and learning_starts;
  the learner's weights reach the actor at every sync_every steps;
- a SIGKILLed async run leaves no learner behind and resumes from its checkpoint;
- parallel collection (2 workers) gives the same episodes as 1 worker;
- ``pld bench loop | replay | collect`` print a final JSON line with their keys.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pld_core.config import validate_params
from pld_core.env import EnvSpec, LiberoEnv, env_state_dim
from pld_core.parallel import EpisodePool, record_episode
from bench.perf import _synthetic_buffer
from pld_core.policies import make_policy_factory
from pld_core.encoders import StateEncoder
from pld_core.specialist import make_trainer
from pld_core.evaluation import EVAL_SEED

from builders import RecordingEnv, kill_at_first_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SUITE, TASK = "libero_object", 0
BASE = "scripted:noise=0.3"
MAX_STEPS = 60  # short episodes: the loop's properties, not success, are tested

torch.set_num_threads(1)


def raw_params(**residual) -> dict:
    return {
        "env": {"suite": SUITE, "tasks": [TASK]},
        "sac": {"hidden": 32, "layers": 1, "batch_size": 32},
        "residual": {"env_steps": 240, "warmup_episodes": 1, "learning_starts": 100, "checkpoint_every": 10_000,
                     "eval_every": 10_000, "eval_episodes": 1, "replay_capacity": 4000, "xi_warmup_steps": 100,
                     "probe_max_fraction": 0.3, "mode": "async", "sync_every": 20,
                     "learner_nice": 0, **residual},  # a niced learner can starve on a loaded 2-core machine: no update in 240 steps
        "evaluate": {"episodes": 1},
    }


def build_trainer(raw: dict, work: Path, env=None, **kw):
    """An async (or sync) trainer on a synthetic offline buffer; also used by the kill test's driver."""
    params = validate_params(raw)
    env = env or LiberoEnv(SUITE, TASK, max_steps=MAX_STEPS)
    dim = 8 + env_state_dim(SUITE, params.env.max_objects)
    encoder = StateEncoder(np.zeros(dim), np.ones(dim))
    offline = _synthetic_buffer(2000, dim, 100, None, seed=0)
    base = make_policy_factory(BASE, seed=0)(env)
    return make_trainer(params, env, base, encoder, offline, work, key="perf-test", show_progress=False, **kw)


# ----------------------------------------------------------------------------- async training
@pytest.fixture(scope="module")
def env():
    e = LiberoEnv(SUITE, TASK, max_steps=MAX_STEPS)
    yield e
    e.close()


def test_async_trainer_stores_every_transition_once(env, tmp_path):
    raw = raw_params()
    renv = RecordingEnv(env)
    trainer = build_trainer(raw, tmp_path / "work", env=renv, fetch_replay=True)
    assert trainer.mode == "async" and trainer.online is None  # the replay lives in the learner
    summary = trainer.run()
    info, log, buf = trainer.learner_info, trainer.episode_log, trainer.online
    rp = validate_params(raw).residual
    # every stored transition reached the learner exactly once; probing steps never did
    assert info["received"] == trainer.stored_transitions == sum(e["stored_steps"] for e in log) == len(buf)
    assert sum(e["probe_steps"] for e in log) > 0, "no probing happened: the test would prove nothing"
    episodes = [e for e in renv.episodes if e["seed"] < EVAL_SEED]
    assert len(episodes) == len(log)
    expected_rows = []
    row = 0
    for entry, ep in zip(log, episodes):
        T, p = entry["length"], entry["probe_steps"]
        if T > p:  # the takeover state s_p .. s_T, in order, once
            expected_rows.extend(trainer.encoder(o) for o in ep["obs"][p:])
            n = entry["stored_steps"]
            assert np.array_equal(buf.action[row:row + n], np.stack(ep["actions"][p:]))
            if entry["warmup"]:  # warm-up: the base acted alone
                assert np.array_equal(buf.action[row:row + n], buf.base_action[row:row + n])
            row += n + 1
    assert buf.size == len(expected_rows) and np.array_equal(buf.obs[:buf.size], np.stack(expected_rows))
    # the learner waited for the warm-up episode and learning_starts, then never ran ahead of the data
    warmup_steps = log[0]["length"]
    assert log[0]["warmup"] and not log[1]["warmup"]
    assert info["first_update_env_steps"] >= max(rp.learning_starts, warmup_steps + 1)
    assert 0 < summary["grad_steps"] <= rp.updates_per_step * trainer.train_steps
    assert trainer.train_steps == trainer.env_steps - max(rp.learning_starts - 1, warmup_steps)
    # the learner's weights reached the actor at every sync_every env steps
    pulls = [(s, v) for s, v in trainer.sync_log if s > 0]
    spacing = np.diff([s for s, _ in pulls])
    assert len(pulls) >= 5 and spacing.max() <= rp.sync_every
    versions = [v for _, v in pulls]
    assert versions == sorted(versions) and versions[-1] > 0  # learned weights were loaded
    assert summary["mode"] == "async" and summary["env_steps"] >= 240


DRIVER = """
import importlib.util, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location("perf_helpers", sys.argv[1])
helpers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(helpers)
import json
helpers.build_trainer(json.loads(sys.argv[2]), Path(sys.argv[3])).run()
"""


def _gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return "\nState:\tZ" in status


def test_async_resume_after_sigkill(tmp_path):
    raw = raw_params(env_steps=180, checkpoint_every=60, learning_starts=0)
    work = tmp_path / "work"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    environ = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "HF_HUB_OFFLINE": "1"}  # the driver imports this module
    kill_at_first_checkpoint([sys.executable, str(driver), str(Path(__file__)), json.dumps(raw), str(work)], environ,
                             work / "checkpoints", ROOT)
    ckpt = sorted((work / "checkpoints").glob("step_*"))[-1]
    killed = json.loads((ckpt / "state.json").read_text())
    learner = json.loads((ckpt / "learner.json").read_text())
    assert killed["mode"] == "async" and 60 <= killed["env_steps"] < 180
    assert learner["received"] == killed["stored_transitions"] and learner["grad_steps"] == killed["grad_steps"]
    # the learner died with its actor
    t0 = time.time()
    while not _gone(learner["pid"]) and time.time() - t0 < 10:
        time.sleep(0.1)
    assert _gone(learner["pid"]), "the learner outlived its killed actor"

    trainer = build_trainer(raw, work)
    summary = trainer.run()
    assert summary["resumed_from"] == [killed["env_steps"]]
    assert trainer.episode_log[:len(killed["episode_log"])] == killed["episode_log"]
    assert [e["episode"] for e in trainer.episode_log] == list(range(len(trainer.episode_log)))
    info = trainer.learner_info
    # the learner went on from the checkpoint's replay and update count
    assert info["received"] == trainer.stored_transitions == sum(e["stored_steps"] for e in trainer.episode_log)
    assert info["grad_steps"] >= learner["grad_steps"] and summary["env_steps"] >= 180
    trainer.env.close()


# ----------------------------------------------------------------------------- parallel collection
def test_parallel_collection_gives_the_serial_episodes():
    spec = EnvSpec(SUITE, TASK)
    factory = make_policy_factory(BASE, seed=3)
    jobs = [(TASK, (k, 100 + k, 0.99)) for k in (4, 0, 7)]
    results = {}
    for workers in (1, 2):
        with EpisodePool(spec, factory, workers, max_steps=MAX_STEPS) as pool:
            results[workers] = list(pool.imap(record_episode, jobs))
    assert len(results[1]) == len(results[2]) == 3
    for (ok1, len1, ep1), (ok2, len2, ep2) in zip(results[1], results[2]):
        assert (ok1, len1, ep1.init_state, ep1.seed) == (ok2, len2, ep2.init_state, ep2.seed)
        assert sorted(ep1.steps) == sorted(ep2.steps)
        for k in ep1.steps:
            assert np.array_equal(ep1.steps[k], ep2.steps[k]), k
    # an episode is the same whichever episodes ran before it in the same env
    with EpisodePool(spec, factory, 1, max_steps=MAX_STEPS) as pool:
        (_, _, alone), = pool.imap(record_episode, [jobs[2]])
    assert np.array_equal(alone.steps["obs_env_state"], results[1][2][2].steps["obs_env_state"])


def test_collect_offline_same_store_with_workers(tmp_path):
    from pld_core.store import TrajectoryStore
    from pld_core.layout import OFFLINE_STORE, BaseRef
    from tasks import collect_offline

    stores = {}
    for workers in (1, 2):
        params = validate_params({"env": {"suite": SUITE, "tasks": [TASK]}, "offline": {"successes": 2, "max_episodes": 4},
                                  "flywheel": {"collect_workers": workers}})
        m = collect_offline.run(params, tmp_path / f"w{workers}", BaseRef.of(BASE), TASK, show_progress=False)
        stores[workers] = (m["metrics"], TrajectoryStore.open(tmp_path / f"w{workers}" / OFFLINE_STORE))
    (m1, s1), (m2, s2) = stores[1], stores[2]
    assert {k: m1[k] for k in ("episodes", "successes", "steps")} == {k: m2[k] for k in ("episodes", "successes", "steps")}
    a, b = s1.load(), s2.load()
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert s1.episode_table().equals(s2.episode_table())
    assert json.loads((tmp_path / "w1" / "collect.json").read_text()) == json.loads((tmp_path / "w2" / "collect.json").read_text())


# ----------------------------------------------------------------------------- bench commands
def _bench(*argv) -> dict:
    proc = subprocess.run([sys.executable, "-m", "pld_app.cli", "bench", *argv], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_bench_replay_prints_json():
    out = _bench("replay", "--seconds", "1")
    assert {"ratio", "ratio_is", "transitions_per_s", "consumed_transitions_per_s", "updates_per_s"} <= set(out)
    assert out["ratio"] > 0 and out["batch_size"] == 256 and out["online_capacity"] == 250_000


def test_bench_collect_prints_json():
    out = _bench("collect", "--workers", "2", "--episodes", "2")
    assert {"ratio", "workers", "episodes_per_s", "serial_episodes_per_s", "identical"} <= set(out)
    assert out["workers"] == 2 and out["identical"] is True and out["ratio"] > 0


def test_bench_loop_prints_json():
    # learner_nice 0: on a loaded machine (other tests, a training) a niced learner can get no update in 2 s
    out = _bench("loop", "--seconds", "2", "--set", "residual.learner_nice=0")
    assert {"ratio", "sync_ratio", "bare_steps_per_s", "async_steps_per_s", "sync_steps_per_s", "updates_per_s", "seconds"} <= set(out)
    assert out["ratio"] > 0 and out["sync_ratio"] > 0 and out["updates_per_s"] > 0


# ----------------------------------------------------------------------------- orchestration overhead
def test_prefect_api_starts_a_server_and_defers_to_a_configured_one(tmp_path, monkeypatch):
    """`pld flywheel`'s temporary Prefect API answers /health, is gone after the block, and is not
    started at all when PREFECT_API_URL is set (in the environment or the active Prefect profile)."""
    import urllib.request

    from flows import api

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PREFECT_PROFILES_PATH", str(tmp_path / "profiles.toml"))
    with api.prefect_api() as ready:
        url = os.environ["PREFECT_API_URL"]
        ready()
        with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
            assert r.status == 200
    assert "PREFECT_API_URL" not in os.environ
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/health", timeout=2)

    (tmp_path / "profiles.toml").write_text('active = "mine"\n[profiles.mine]\nPREFECT_API_URL = "http://10.0.0.1:4200/api"\n')
    assert api._configured_api() == "http://10.0.0.1:4200/api"
    with api.prefect_api() as ready:
        ready()
        assert "PREFECT_API_URL" not in os.environ  # Prefect reads the profile itself
    monkeypatch.setenv("PREFECT_API_URL", "http://10.0.0.2:4200/api")
    with api.prefect_api():
        assert os.environ["PREFECT_API_URL"] == "http://10.0.0.2:4200/api"


def test_cli_entry_runs_exit_handlers_and_keeps_the_exit_code(tmp_path):
    """`pld` skips the interpreter teardown, not the atexit handlers, and keeps the command's exit code."""
    marker = tmp_path / "atexit-ran"
    code = ("import atexit, sys; from pathlib import Path; "
            f"atexit.register(lambda: Path({str(marker)!r}).write_text('yes')); "
            "sys.argv = ['pld', 'stage', 'no-such-stage']; from pld_app.cli import entry; entry()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "unknown stage 'no-such-stage'" in r.stderr
    assert marker.read_text() == "yes"
