"""Foundation: LIBERO env, scripted expert, trajectory store, evaluation statistics, CLI errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from pld_core.env import LiberoEnv, quat_to_axis_angle
from pld_core.errors import PLDError
from pld_core.rollout import run_episode
from pld_core.scripted import ScriptedExpert
from pld_core.stats import wilson_interval
from pld_core.store import TrajectoryStore

from builders import make_episode

ROOT = Path(__file__).resolve().parent.parent
PLD = [sys.executable, "-m", "pld_app.cli"]


def run_cli(*args, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*PLD, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


# ----------------------------------------------------------------------------- statistics
def test_wilson_interval_known_values():
    # reference values computed with statsmodels' proportion_confint(method="wilson")
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(50, 50)
    assert hi == 1.0 and lo == pytest.approx(0.9287, abs=1e-4)


def test_quat_to_axis_angle_matches_scipy():
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(0)
    for _ in range(20):
        q = rng.standard_normal(4)
        q /= np.linalg.norm(q)
        if q[3] < 0:
            q = -q  # same rotation; the rotvec with angle <= pi
        np.testing.assert_allclose(quat_to_axis_angle(q), Rotation.from_quat(q).as_rotvec(), atol=1e-5)


# ----------------------------------------------------------------------------- environment
@pytest.fixture(scope="module")
def object_env():
    env = LiberoEnv("libero_object", 0)
    yield env
    env.close()


def test_state_observation_layout(object_env):
    env = object_env
    obs = env.reset(0)
    assert obs["state"].shape == (8,) and obs["state"].dtype == np.float32
    assert obs["env_state"].shape == (env.env_state_dim,) == (3 * 10 + 10,)
    raw = env.raw_obs
    np.testing.assert_allclose(obs["state"][:3], raw["robot0_eef_pos"], atol=1e-6)
    np.testing.assert_allclose(obs["state"][6:], raw["robot0_gripper_qpos"], atol=1e-6)
    # the first object is the task's target, with its pose and its offset to the end effector
    target = env.objects[0]
    np.testing.assert_allclose(obs["env_state"][:3], raw[f"{target}_pos"], atol=1e-6)
    np.testing.assert_allclose(obs["env_state"][7:10], raw[f"{target}_to_robot0_eef_pos"], atol=1e-6)
    one_hot = obs["env_state"][30:]
    assert one_hot[0] == 1.0 and one_hot.sum() == 1.0
    # padding slot for the absent third object stays zero
    assert np.all(obs["env_state"][20:30] == 0)


def test_reset_is_deterministic_per_initial_state(object_env):
    a = object_env.reset(3)["env_state"].copy()
    b = object_env.reset(3)["env_state"].copy()
    c = object_env.reset(4)["env_state"].copy()
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert np.abs(a - c).max() > 1e-3


def test_truncation_after_step_limit():
    env = LiberoEnv("libero_object", 0, max_steps=5)
    env.reset(0)
    for t in range(5):
        _, r, term, trunc, _ = env.step(np.zeros(7))
        assert r == 0.0 and not term
        assert trunc == (t == 4)
    env.close()


def test_scripted_expert_succeeds_with_reward_and_termination(object_env):
    env = object_env
    expert = ScriptedExpert()
    ok, length, ep = run_episode(env, expert, init_state=7, record=True)
    assert ok and length < env.max_steps
    steps = ep.steps
    assert steps["reward"][-1] == 1.0 and steps["reward"][:-1].sum() == 0
    assert steps["done"][-1] and not steps["done"][:-1].any()
    # Monte-Carlo return of a sparse terminal reward: gamma^(T-1-t)
    np.testing.assert_allclose(steps["mc_return"], 0.99 ** np.arange(length - 1, -1, -1), rtol=1e-5)
    np.testing.assert_allclose(steps["next_base_action"][:-1], steps["base_action"][1:])


def test_bad_env_inputs():
    with pytest.raises(PLDError, match="unknown LIBERO suite 'libero_objects'"):
        LiberoEnv("libero_objects", 0)
    with pytest.raises(PLDError, match="task index 10 is out of range"):
        LiberoEnv("libero_object", 10)
    with pytest.raises(PLDError, match="unknown observation mode"):
        LiberoEnv("libero_object", 0, mode="pixels")


def test_images_mode_flipped_like_lerobot():
    env = LiberoEnv("libero_object", 0, mode="images", image_size=32)
    obs = env.reset(0)
    assert obs["image"].shape == (32, 32, 3) and obs["image"].dtype == np.uint8
    assert obs["wrist_image"].shape == (32, 32, 3)
    np.testing.assert_array_equal(obs["image"], env.raw_obs["agentview_image"][::-1, ::-1])
    assert obs["image"].std() > 1.0  # a rendered scene, not a blank frame
    assert env.obs_shapes()["obs_image"] == (32, 32, 3)
    env.close()


# ----------------------------------------------------------------------------- trajectory store
def _new_store(path, env_dim=4):
    return TrajectoryStore.create(path, {"obs_state": (8,), "obs_env_state": (env_dim,)}, suite="libero_object", task_names=["a", "b"])


def test_store_roundtrip(tmp_path):
    s = _new_store(tmp_path / "s.zarr")
    s.append([make_episode(5, value=1.0), make_episode(3, task=1, value=2.0)])
    s.append([make_episode(4, value=3.0)])
    s = TrajectoryStore.open(tmp_path / "s.zarr")
    assert s.n_episodes == 3 and s.n_steps == 12
    np.testing.assert_array_equal(s.episode_ends, [5, 8, 12])
    eps = s.episodes()
    assert [len(e) for e in eps] == [5, 3, 4]
    assert eps[1].task_index == 1 and np.all(eps[1].steps["obs_state"] == 2.0)
    assert s.episode_table()["length"].tolist() == [5, 3, 4]


def test_store_uncommitted_rows_are_invisible_and_trimmed(tmp_path):
    path = tmp_path / "s.zarr"
    s = _new_store(path)
    s.append([make_episode(5)])
    # a killed append: step arrays written, episode_ends not
    g = zarr.open_group(str(path), mode="r+")
    for name in ("obs_state", "action", "reward"):
        arr = g["data"][name]
        arr.append(np.ones((3, *arr.shape[1:]), dtype=arr.dtype), axis=0)
    r = TrajectoryStore.open(path)
    assert r.n_steps == 5 and len(r.load()["obs_state"]) == 5
    a = TrajectoryStore.open(path, mode="a")  # a writer trims the half episode
    assert zarr.open_group(str(path))["data"]["action"].shape[0] == 5
    a.append([make_episode(2, value=7.0)])
    eps = TrajectoryStore.open(path).episodes()
    assert len(eps[1]) == 2 and np.all(eps[1].steps["obs_state"] == 7.0)


def test_store_missing_array_is_a_clear_error(tmp_path):
    path = tmp_path / "s.zarr"
    _new_store(path).append([make_episode(3)])
    del zarr.open_group(str(path), mode="r+")["data"]["mc_return"]
    with pytest.raises(PLDError, match=r"array 'data/mc_return' is missing"):
        TrajectoryStore.open(path)


def test_store_wrong_dtype_is_a_clear_error(tmp_path):
    path = tmp_path / "s.zarr"
    _new_store(path)
    g = zarr.open_group(str(path), mode="r+")
    del g["data"]["reward"]
    g["data"].create_array("reward", shape=(0,), dtype="int64", chunks=(16,))
    with pytest.raises(PLDError, match=r"'data/reward' has dtype int64, expected float32"):
        TrajectoryStore.open(path)


def test_store_rejects_nan_actions_and_bad_rewards(tmp_path):
    s = _new_store(tmp_path / "s.zarr")
    bad = make_episode(3)
    bad.steps["action"][1, 2] = np.nan
    with pytest.raises(PLDError, match="NaN or infinite"):
        s.append([bad])
    assert s.n_episodes == 0
    weird = make_episode(3)
    weird.steps["reward"][0] = 0.5
    s.append([weird])
    with pytest.raises(PLDError, match="per-step data fails validation"):
        TrajectoryStore.open(tmp_path / "s.zarr").load()


def test_store_not_a_store(tmp_path):
    with pytest.raises(PLDError, match="does not exist"):
        TrajectoryStore.open(tmp_path / "nope.zarr")
    (tmp_path / "junk").mkdir()
    with pytest.raises(PLDError, match="not a Zarr group"):
        TrajectoryStore.open(tmp_path / "junk")


# ----------------------------------------------------------------------------- CLI
def test_cli_bad_suite_and_task_exit_2():
    r = run_cli("eval", "--policy", "scripted", "--suite", "libero_objet", "--tasks", "0")
    assert r.returncode == 2 and "unknown LIBERO suite 'libero_objet'" in r.stderr
    r = run_cli("eval", "--policy", "scripted", "--suite", "libero_object", "--tasks", "0,12")
    assert r.returncode == 2 and "task index 12 is out of range" in r.stderr
    r = run_cli("eval", "--policy", "./no/such/ckpt", "--tasks", "0")
    assert r.returncode == 2 and "no/such/ckpt" in r.stderr


def test_cli_eval_json_scripted():
    r = run_cli("eval", "--policy", "scripted", "--suite", "libero_object", "--tasks", "3", "--episodes", "2", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(out) == {"tasks", "mean"}
    t = out["tasks"]["libero_object/3"]
    assert t["episodes"] == 2 and t["success_rate"] == 1.0 and out["mean"] == 1.0
    assert t["ci95"][0] < 1.0 == t["ci95"][1]


def test_killed_demo_leaves_only_complete_episodes(tmp_path):
    out = tmp_path / "demos.zarr"
    proc = subprocess.Popen([*PLD, "demo", "--tasks", "0", "--episodes", "6", "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        time.sleep(0.5)
        ends = out / "meta" / "episode_ends" / "zarr.json"
        if ends.exists() and TrajectoryStore.open(out).n_episodes >= 1:
            break
    time.sleep(float(np.random.default_rng(11).uniform(0.0, 2.0)))  # kill at a random moment, the same one every run
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = TrajectoryStore.open(out)
    n = store.n_episodes
    assert 1 <= n < 6
    for ep in store.episodes():  # validated; each committed episode is whole and successful
        assert ep.success and ep.steps["done"][-1] and ep.steps["reward"][-1] == 1.0
        assert len(ep.steps["obs_state"]) == len(ep.steps["action"])
    # a rerun tops up to 6 without duplicating committed episodes
    r = run_cli("demo", "--tasks", "0", "--episodes", "6", "--out", str(out))
    assert r.returncode == 0, r.stderr
    t = TrajectoryStore.open(out).episode_table()
    assert len(t) == 6 and t.init_state.is_unique


def test_dart_demos_label_the_clean_expert_action(tmp_path):
    from pld_core.demos import record_demos

    record_demos(tmp_path / "d.zarr", "libero_object", [2], 1, noise=0.3, show_progress=False)
    ep = TrajectoryStore.open(tmp_path / "d.zarr").episodes()[0]
    a, label = ep.steps["action"], ep.steps["label_action"]
    assert np.abs(a[:, :3] - label[:, :3]).mean() > 0.05  # executed: perturbed translation
    np.testing.assert_array_equal(a[:, 3:], label[:, 3:])  # rotation and gripper untouched
    assert np.abs(label).max() <= 1.0


# ----------------------------------------------------------------------------- the stage protocol
def test_a_stage_rebuilds_when_a_param_or_an_input_it_reads_changes_and_only_then(tmp_path):
    """run_stage: the same params and inputs skip; another value of a param the stage reads, or another input
    digest, rebuilds (a new manifest key, the new output in place); forcing rebuilds too. Regressions seen red:
    the key leaving out the params, or the inputs."""
    from pld_core.artifacts import read_manifest
    from pld_core.stage import run_stage

    builds = []

    def build(value):
        def _build(tmp: Path) -> dict:
            builds.append(value)
            (tmp / "out.txt").write_text(str(value))
            return {"value": value}
        return _build

    out = tmp_path / "stage"
    first = run_stage("s", out, {"steps": 10}, {"up": "aaa"}, build(1))
    assert first["skipped"] is False and builds == [1]
    assert run_stage("s", out, {"steps": 10}, {"up": "aaa"}, build(2))["skipped"] is True and builds == [1]
    second = run_stage("s", out, {"steps": 20}, {"up": "aaa"}, build(3))
    assert second["skipped"] is False and second["key"] != first["key"] and (out / "out.txt").read_text() == "3"
    third = run_stage("s", out, {"steps": 20}, {"up": "bbb"}, build(4))
    assert third["skipped"] is False and third["key"] not in (first["key"], second["key"])
    assert run_stage("s", out, {"steps": 20}, {"up": "bbb"}, build(5), force=True)["skipped"] is False
    assert builds == [1, 3, 4, 5] and read_manifest(out)["metrics"] == {"value": 5}


def test_what_a_stage_left_in_reference_cycles_is_freed_when_it_returns(tmp_path):
    """A flywheel process builds stage after stage, and a stage's base (7.4 GB for the tiny pi0.5) often sits in a
    reference cycle (an exception kept with its traceback's frames, a wrapper stored on the model): run_stage frees
    such garbage before it returns, so the next stage does not load its base beside the last one's. Automatic
    collection is off here, as it is in effect between the rare full collections. Regression seen red: no
    collection after the build."""
    import gc
    import weakref

    from pld_core.stage import run_stage

    class Model:  # stands in for a loaded base
        pass

    refs = []

    def build(tmp: Path) -> dict:
        model = Model()
        model.me = model  # a cycle: only the cyclic collector frees it
        refs.append(weakref.ref(model))
        (tmp / "out.txt").write_text("ok")
        return {}

    was = gc.isenabled()
    gc.disable()
    try:
        run_stage("s", tmp_path / "stage", {}, {}, build)
        assert refs and refs[0]() is None
    finally:
        if was:
            gc.enable()


def test_collect_offline_key_follows_what_the_stage_reads_for_its_task():
    """collect_offline's key changes with its own section, gamma and the base, and not with the other tasks in
    env.tasks (adding a task to the list rebuilds nothing of the tasks already there)."""
    from pld_core.config import validate_params
    from pld_core.layout import BaseRef
    from pld_core.stage import stage_key
    from tasks.collect_offline import STAGE, stage_inputs

    def key(base="scripted:noise=0.3", **sections):
        raw = {"env": {"tasks": [0, 1]}, **sections}
        return stage_key(STAGE, *stage_inputs(validate_params(raw), BaseRef.of(base), 0))

    k = key()
    assert key(env={"tasks": [0, 1, 2]}) == k
    assert key(offline={"max_episodes": 41}) != k
    assert key(sac={"gamma": 0.98}) != k
    assert key(base="scripted:noise=0.4") != k
    assert key(sac={"lr": 1e-3}) == k  # a param the stage does not read
