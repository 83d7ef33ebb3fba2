"""The bad-input catalogue: each case gets one clear message naming the file/key/path and the fix,
exit code 2 from the CLI, and no partial artifact."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pld_core.config import load_params
from pld_core.errors import PLDError

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, cwd=ROOT, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "pld_core.cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def write_params(tmp_path: Path, mutate) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    mutate(raw)
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


PARAM_CASES = [
    ("wrong_type", lambda r: r["sac"].__setitem__("batch_size", "big"), "sac.batch_size"),
    ("unknown_key", lambda r: r["sac"].__setitem__("batchsize", 64), "sac.batchsize"),
    ("unknown_section", lambda r: r.__setitem__("trainer", {}), "trainer"),
    ("xi_above_1", lambda r: r["sac"].__setitem__("xi", 1.5), "sac.xi"),
    ("xi_negative", lambda r: r["sac"].__setitem__("xi", -0.1), "sac.xi"),
    ("alpha_above_1", lambda r: r["collect"].__setitem__("alpha", 2.0), "collect.alpha"),
    ("batch_zero", lambda r: r["sac"].__setitem__("batch_size", 0), "sac.batch_size"),
    ("steps_negative", lambda r: r["sft"].__setitem__("steps", -5), "sft.steps"),
    ("env_steps_zero", lambda r: r["residual"].__setitem__("env_steps", 0), "residual.env_steps"),
    ("bad_mode", lambda r: r["env"].__setitem__("mode", "pixels"), "env.mode"),
    ("bad_ablation", lambda r: r["residual"].__setitem__("ablation", "no_brain"), "residual.ablation"),
    ("bad_task_runner", lambda r: r["flywheel"].__setitem__("task_runner", "slurm"), "flywheel.task_runner"),
    ("duplicate_tasks", lambda r: r["env"].__setitem__("tasks", [0, 0]), "duplicates"),
]


@pytest.mark.parametrize("name,mutate,key", PARAM_CASES, ids=[c[0] for c in PARAM_CASES])
def test_bad_params_name_the_file_and_key(tmp_path, name, mutate, key):
    p = write_params(tmp_path, mutate)
    with pytest.raises(PLDError) as e:
        load_params(p)
    msg = str(e.value)
    assert str(p) in msg and key in msg and "Fix:" in msg


def test_bad_params_cli_exit_2(tmp_path):
    p = write_params(tmp_path, lambda r: r["sac"].__setitem__("xi", 3))
    r = cli("params", "--params", str(p))
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and "sac.xi" in r.stderr and str(p) in r.stderr


def test_missing_params_file_and_unknown_profile(tmp_path):
    with pytest.raises(PLDError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(PLDError, match="profile 'turbo' not found"):
        load_params(ROOT / "params.yaml", "turbo")
    (tmp_path / "broken.yaml").write_text("sac: [1, 2\n")
    with pytest.raises(PLDError, match="not valid YAML"):
        load_params(tmp_path / "broken.yaml")


def test_every_profile_validates_offline():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for profile in ["default", *raw["profiles"]]:
        params = load_params(ROOT / "params.yaml", profile)
        assert params.profile == profile
    pi = load_params(ROOT / "params.yaml", "pi05-libero")
    assert pi.env.mode == "images" and pi.base.policy["type"] == "pi05" and pi.sft.lora == {"r": 32}
    assert pi.device == "cuda"


def test_set_override_is_validated():
    r = cli("params", "--set", "sac.batch_size=-1")
    assert r.returncode == 2 and "sac.batch_size" in r.stderr
    r = cli("params", "--set", "sac.batch_size")
    assert r.returncode == 2 and "KEY=VALUE" in r.stderr


def test_stage_task_not_in_params():
    r = cli("stage", "collect_offline", "--task", "7")
    assert r.returncode == 2 and "task 7 is not in env.tasks" in r.stderr


def test_unknown_stage():
    r = cli("stage", "train_everything")
    assert r.returncode == 2 and "unknown stage 'train_everything'" in r.stderr


def test_two_flywheels_on_one_data_dir(tmp_path):
    from pld_core.locking import data_lock

    with data_lock(tmp_path):
        code = ("import sys; from pld_core.locking import data_lock\n"
                f"with data_lock({str(tmp_path)!r}): pass\n")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode != 0 and "is in use by another flywheel" in r.stderr and f'"pid": {os.getpid()}' in r.stderr
    with data_lock(tmp_path):  # released: can be taken again
        pass


def test_unreachable_mlflow_uri_fails_fast(tmp_path):
    import time

    from pld_core import lineage

    t0 = time.time()
    with pytest.raises(PLDError, match="MLflow tracking URI 'http://127.0.0.1:9' is unreachable"):
        lineage.setup("http://127.0.0.1:9", "x")
    assert time.time() - t0 < 60


def test_missing_upstream_artifact_is_named(tmp_path):
    p = write_params(tmp_path, lambda r: r["flywheel"].__setitem__("data_dir", str(tmp_path / "data")))
    r = cli("stage", "collect_offline", "--task", "0", "--params", str(p))
    assert r.returncode == 2 and "base v0 is missing or incomplete" in r.stderr
    assert not (tmp_path / "data" / "iter_0").exists()  # no partial artifact
