"""The bad-input catalogue.

Every case runs the real CLI (``pld_app.cli.main([...])`` in process, or ``python -m pld_app.cli``
in a child process where a second process or a mount namespace is the point) and checks

(a) exit code 2;
(b) the message names the offending file, key or path and carries a ``Fix:`` hint;
(c) nothing partial is left: the directory tree the case works in is the same after the command as
    before it (no stage output dir, no ``.tmp-*`` dir, no half-written store or report).

Catalogue (case -> command -> message fragment):

params.yaml (``pld stage demos --params P``; data_dir inside the test's tmp dir)
  wrong_type            sac.batch_size: "big"          -> "key 'sac.batch_size' is invalid"
  unknown_key           sac.batchsize                  -> "key 'sac.batchsize'", "remove or rename"
  unknown_section       trainer: {}                    -> "key 'trainer'"
  section_not_mapping   sac: 5                         -> "key 'sac'"
  xi_above_1            sac.xi: 1.5                    -> "key 'sac.xi'"
  xi_negative           sac.xi: -0.1                   -> "key 'sac.xi'"
  alpha_above_1         collect.alpha: 2.0             -> "key 'collect.alpha'"
  batch_zero            sac.batch_size: 0              -> "key 'sac.batch_size'"
  steps_negative        sft.steps: -5                  -> "key 'sft.steps'"
  env_steps_zero        residual.env_steps: 0          -> "key 'residual.env_steps'"
  bad_mode              env.mode: pixels               -> "key 'env.mode'"
  bad_ablation          residual.ablation: no_brain    -> "key 'residual.ablation'"
  bad_task_runner       flywheel.task_runner: slurm    -> "key 'flywheel.task_runner'"
  duplicate_tasks       env.tasks: [0, 0]              -> "env.tasks has duplicates"
  negative_task         env.tasks: [-1]                -> "env.tasks must be non-negative"
  empty_tasks           env.tasks: []                  -> "key 'env.tasks'"
  bad_key_in_profile    profiles.smoke.sac.xii (--profile smoke) -> "key 'sac.xii'"
  params_file_missing   --params nope.yaml             -> "params file not found"
  params_not_yaml       "sac: [1, 2"                   -> "not valid YAML"
  params_not_mapping    a YAML list                    -> "top level must be a mapping"
  unknown_profile       --profile turbo                -> "profile 'turbo' not found"
  set_bad_value         --set sac.batch_size=-1        -> "key 'sac.batch_size'"
  set_not_key_value     --set sac.batch_size           -> "override 'sac.batch_size' is not KEY=VALUE"
stages (``pld stage ...``)
  unknown_stage         train_everything               -> "unknown stage 'train_everything'"
  per_task_without_task collect_offline                -> "stage 'collect_offline' runs per task"
  task_not_in_params    collect_offline --task 7       -> "task 7 is not in env.tasks"
  missing_upstream      collect_offline, no base v0    -> "<data>/base_v0: base v0 is missing or incomplete"
  corrupt_manifest      base_v0/manifest.json garbage  -> "<data>/base_v0/manifest.json: unreadable manifest"
environment arguments (``pld eval`` / ``pld demo``)
  unknown_suite         --suite libero_objet           -> "unknown LIBERO suite 'libero_objet'"
  tasks_not_a_list      --tasks a,b                    -> "--tasks 'a,b' is not a comma-separated list"
  eval_episodes_zero    eval --episodes 0              -> "--episodes must be positive"
  demo_episodes_zero    demo --episodes 0              -> "--episodes must be positive"
  bad_scripted_option   --policy scripted:speed=2      -> "unknown option 'speed'"
base checkpoints (``pld eval --policy <ckpt> --out <report>``)
  ckpt_missing          no such directory              -> "no such checkpoint directory"
  ckpt_is_a_file        a torch pickle file            -> "is a file, not a directory"
  ckpt_no_config        dir with only a pickle         -> "no config.json, so it is not a LeRobot checkpoint"
  ckpt_config_not_json  config.json garbage            -> "config.json is not readable JSON"
  ckpt_config_no_type   config.json without 'type'     -> "config.json has no 'type' key"
  ckpt_unknown_type     type: my_policy                -> "policy type 'my_policy'"
  ckpt_lora_only        adapter, no weights            -> "holds only a PEFT/LoRA adapter"
  ckpt_no_weights       model.safetensors deleted      -> "weights file model.safetensors is missing"
  ckpt_no_processor     policy_preprocessor.json gone  -> "processor file policy_preprocessor.json is missing"
  ckpt_pickle_weights   torch pickle as model.safetensors -> "the 'act' policy cannot be built from it"
  ckpt_foreign_weights  another model's safetensors    -> "model.safetensors lacks"
  ckpt_action_dim       action (6,)                    -> "outputs 'action' of shape (6,)"
  ckpt_needs_cameras    image ACT in state mode        -> "which obs mode 'state' cannot give"
  ckpt_hub_id_offline   owner/name not in the HF cache -> "fetching it as a hub repo failed"
  suite_not_trained_on  libero_object base on libero_90 -> "expects 'observation.environment_state' of shape (40,), the env gives (120,)"
  task_out_of_range     --tasks 10                     -> "task index 10 is out of range"
trajectory stores (``pld store <path>``)
  store_missing         no such path                   -> "does not exist"
  store_not_zarr        an empty directory             -> "is not a Zarr group"
  store_missing_array   data/mc_return deleted         -> "array 'data/mc_return' is missing"
  store_wrong_dtype     data/reward int64              -> "'data/reward' has dtype int64, expected float32"
  store_wrong_shape     obs_env_state (5,) not (4,)    -> "'data/obs_env_state' has per-step shape (5,)"
  store_nan_actions     NaN in data/action             -> "array 'data/action' holds NaN or infinite values"
  store_inf_actions     +inf in data/base_action       -> "array 'data/base_action' holds NaN or infinite values"
  store_bad_reward      reward 0.5                     -> "per-step data fails validation"
  store_no_attribute    format_version removed         -> "attribute 'format_version' missing"
  store_bad_task_index  task_index 5 of 2 tasks        -> "meta/task_index 5 >= number of tasks 2"
dataset vs base (``pld stage sft`` with base.path = a checkpoint)
  sft_env_state_dim     dataset (6,), base (40,)       -> "feature 'observation.environment_state' has shape (6,)"
  sft_action_dim        dataset (7,), base (6,)        -> "feature 'action' has shape (7,)"
  sft_missing_feature   state dataset, camera base     -> "has no feature 'observation.images.image'"
infrastructure
  mlflow_unreachable    pld lineage, http://127.0.0.1:9 -> "MLflow tracking URI 'http://127.0.0.1:9' is unreachable"
  dvc_not_initialised   pld repro, no .dvc/            -> "<dir>: not a DVC repository"
  dvc_no_pipeline       pld repro, no dvc.yaml         -> "<dir>/dvc.yaml: no DVC pipeline here"
  dvc_profile_mismatch  pld repro --profile smoke      -> "dvc.yaml's stages read its top level"
  dvc_iterations        pld repro, flywheel.iterations 3, dvc.yaml of 2 -> "its stages build 2 iteration(s)"
  two_flywheels         pld flywheel, data dir locked  -> "<data> is in use by another flywheel ({"pid": ...})"
  disk_full_at_create   pld demo into a 64 KiB tmpfs   -> "no space left on device" (no store, no .tmp-*)
  disk_full_in_append   pld demo into a 104 KiB tmpfs  -> "no space left on device" (the failed episode is invisible)
  disk_full_at_commit   pld demo top-up, ENOSPC on the new episode's episode_ends chunk -> "no space left on device"
                        (the old episode kept, the new one invisible)
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from pld_app.cli import main as pld_main
from pld_core.store import TrajectoryStore

from builders import make_episode, make_state_act

try:
    from builders import make_image_act_checkpoint, make_store
except ImportError:  # tests/ became a package
    from tests.builders import make_image_act_checkpoint, make_store

ROOT = Path(__file__).resolve().parent.parent
OBJECT_ENV_DIM = 40  # libero_object: 3 objects x 10 + 10 tasks
EVAL = ["eval", "--suite", "libero_object", "--tasks", "0", "--episodes", "1"]


# ----------------------------------------------------------------------------- helpers
def pld(capsys, *args) -> tuple[int, str]:
    """Run the CLI in this process; returns (exit code, stderr)."""
    capsys.readouterr()
    code = pld_main([str(a) for a in args])
    return code, capsys.readouterr().err


def cli(*args, cwd=ROOT, timeout=300):
    """Run the CLI in a child process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "pld_app.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def tree(root: Path) -> set[str]:
    """Every file and directory under ``root`` (hidden ones too)."""
    root = Path(root)
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


def expect_error(code: int, err: str, *names) -> str:
    """(a) exit 2; (b) the ``error:`` message names every one of ``names`` and has a Fix."""
    assert code == 2, f"exit {code}, stderr:\n{err[-3000:]}"
    lines = err.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith("error: ")), None)
    assert start is not None, err[-3000:]
    msg = "\n".join(lines[start:])
    for n in names:
        assert str(n) in msg, f"{n!r} not in: {msg}"
    assert "Fix:" in msg, msg
    return msg


def write_params(tmp_path: Path, mutate=None, name: str = "params.yaml", **top) -> Path:
    """params.yaml with data_dir under tmp_path, tiny budgets (a wrong pass would stay cheap), then ``mutate``."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["flywheel"]["data_dir"] = str(tmp_path / "data")
    raw["env"]["tasks"] = [0]
    raw["demo"]["episodes_per_task"] = 1
    raw.update(top)
    if mutate:
        mutate(raw)
    p = tmp_path / name
    p.write_text(yaml.safe_dump(raw))
    return p


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    return {
        # for `pld eval` on libero_object (env_state 40): each is wrong in one way only
        "object": make_state_act(d / "object", env_dim=OBJECT_ENV_DIM),
        "object_action6": make_state_act(d / "object_action6", env_dim=OBJECT_ENV_DIM, act_dim=6),
        "object_cameras": make_image_act_checkpoint(d / "object_cameras", env_dim=OBJECT_ENV_DIM),
        # for `pld stage sft` on the test dataset (env_state 6)
        "action6": make_state_act(d / "action6", env_dim=6, act_dim=6),
        "cameras": make_image_act_checkpoint(d / "cameras", env_dim=6),
    }


# ----------------------------------------------------------------------------- params.yaml
PARAM_CASES = [
    ("wrong_type", lambda r: r["sac"].__setitem__("batch_size", "big"), "sac.batch_size"),
    ("unknown_key", lambda r: r["sac"].__setitem__("batchsize", 64), "sac.batchsize"),
    ("unknown_section", lambda r: r.__setitem__("trainer", {}), "trainer"),
    ("section_not_mapping", lambda r: r.__setitem__("sac", 5), "key 'sac'"),
    ("xi_above_1", lambda r: r["sac"].__setitem__("xi", 1.5), "sac.xi"),
    ("xi_negative", lambda r: r["sac"].__setitem__("xi", -0.1), "sac.xi"),
    ("alpha_above_1", lambda r: r["collect"].__setitem__("alpha", 2.0), "collect.alpha"),
    ("batch_zero", lambda r: r["sac"].__setitem__("batch_size", 0), "sac.batch_size"),
    ("steps_negative", lambda r: r["sft"].__setitem__("steps", -5), "sft.steps"),
    ("env_steps_zero", lambda r: r["residual"].__setitem__("env_steps", 0), "residual.env_steps"),
    ("bad_mode", lambda r: r["env"].__setitem__("mode", "pixels"), "env.mode"),
    ("bad_ablation", lambda r: r["residual"].__setitem__("ablation", "no_brain"), "residual.ablation"),
    ("bad_task_runner", lambda r: r["flywheel"].__setitem__("task_runner", "slurm"), "flywheel.task_runner"),
    ("duplicate_tasks", lambda r: r["env"].__setitem__("tasks", [0, 0]), "env.tasks has duplicates"),
    ("negative_task", lambda r: r["env"].__setitem__("tasks", [-1]), "env.tasks must be non-negative"),
    ("empty_tasks", lambda r: r["env"].__setitem__("tasks", []), "env.tasks"),
]


@pytest.mark.parametrize("name,mutate,key", PARAM_CASES, ids=[c[0] for c in PARAM_CASES])
def test_bad_params(capsys, tmp_path, name, mutate, key):
    p = write_params(tmp_path, mutate)
    before = tree(tmp_path)
    code, err = pld(capsys, "stage", "demos", "--params", p)
    expect_error(code, err, p, key)
    assert tree(tmp_path) == before and not (tmp_path / "data").exists()


def test_bad_key_in_profile(capsys, tmp_path):
    p = write_params(tmp_path, lambda r: r["profiles"]["smoke"].__setitem__("sac", {"xii": 1}))
    before = tree(tmp_path)
    expect_error(*pld(capsys, "stage", "demos", "--params", p, "--profile", "smoke"), p, "sac.xii", "remove or rename")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("case", ["params_file_missing", "params_not_yaml", "params_not_mapping", "unknown_profile"])
def test_bad_params_file(capsys, tmp_path, case):
    p = tmp_path / "params.yaml"
    extra: list[str] = []
    if case == "params_file_missing":
        p = tmp_path / "nope.yaml"
        frag = "params file not found"
    elif case == "params_not_yaml":
        p.write_text("sac: [1, 2\n")
        frag = "not valid YAML"
    elif case == "params_not_mapping":
        p.write_text("- env\n- sac\n")
        frag = "top level must be a mapping"
    else:
        write_params(tmp_path)
        extra = ["--profile", "turbo"]
        frag = "profile 'turbo' not found"
    before = tree(tmp_path)
    expect_error(*pld(capsys, "stage", "demos", "--params", p, *extra), p, frag)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("override,frag", [("sac.batch_size=-1", "key 'sac.batch_size'"),
                                           ("sac.batch_size", "override 'sac.batch_size' is not KEY=VALUE")],
                         ids=["set_bad_value", "set_not_key_value"])
def test_bad_set_override(capsys, tmp_path, override, frag):
    p = write_params(tmp_path)
    before = tree(tmp_path)
    expect_error(*pld(capsys, "stage", "demos", "--params", p, "--set", override), frag)
    assert tree(tmp_path) == before


# ----------------------------------------------------------------------------- stages
@pytest.mark.parametrize("args,frag", [
    (["train_everything"], "unknown stage 'train_everything'"),
    (["collect_offline"], "stage 'collect_offline' runs per task"),
    (["collect_offline", "--task", "7"], "task 7 is not in env.tasks"),
], ids=["unknown_stage", "per_task_without_task", "task_not_in_params"])
def test_bad_stage_call(capsys, tmp_path, args, frag):
    p = write_params(tmp_path)
    before = tree(tmp_path)
    expect_error(*pld(capsys, "stage", *args, "--params", p), frag)
    assert tree(tmp_path) == before and not (tmp_path / "data").exists()


def test_missing_upstream_artifact(capsys, tmp_path):
    p = write_params(tmp_path)
    before = tree(tmp_path)
    code, err = pld(capsys, "stage", "collect_offline", "--task", "0", "--params", p)
    expect_error(code, err, tmp_path / "data" / "base_v0", "base v0 is missing or incomplete")
    assert tree(tmp_path) == before and not (tmp_path / "data" / "iter_0").exists()


def test_corrupt_upstream_manifest(capsys, tmp_path):
    p = write_params(tmp_path)
    (tmp_path / "data" / "base_v0").mkdir(parents=True)
    (tmp_path / "data" / "base_v0" / "manifest.json").write_text("{not json")
    before = tree(tmp_path)
    code, err = pld(capsys, "stage", "collect_offline", "--task", "0", "--params", p)
    expect_error(code, err, tmp_path / "data" / "base_v0" / "manifest.json", "unreadable manifest")
    assert tree(tmp_path) == before and not (tmp_path / "data" / "iter_0").exists()


# ----------------------------------------------------------------------------- environment arguments
@pytest.mark.parametrize("args,frag", [
    (["eval", "--policy", "scripted", "--suite", "libero_objet"], "unknown LIBERO suite 'libero_objet'"),
    (["eval", "--policy", "scripted", "--tasks", "a,b"], "--tasks 'a,b' is not a comma-separated list"),
    (["eval", "--policy", "scripted", "--episodes", "0"], "--episodes must be positive"),
    (["eval", "--policy", "scripted:speed=2"], "policy spec 'scripted:speed=2': unknown option 'speed'"),
], ids=["unknown_suite", "tasks_not_a_list", "eval_episodes_zero", "bad_scripted_option"])
def test_bad_eval_arguments(capsys, tmp_path, args, frag):
    before = tree(tmp_path)
    expect_error(*pld(capsys, *args, "--out", tmp_path / "report.json"), frag)
    assert tree(tmp_path) == before


def test_demo_episodes_zero(capsys, tmp_path):
    code, err = pld(capsys, "demo", "--tasks", "0", "--episodes", "0", "--out", tmp_path / "demos.zarr")
    expect_error(code, err, "--episodes must be positive")
    assert tree(tmp_path) == set()


# ----------------------------------------------------------------------------- base checkpoints
def _copy(ckpt: Path, dst: Path) -> Path:
    shutil.copytree(ckpt, dst)
    return dst


def _edit_config(d: Path, fn) -> None:
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def _torch_pickle(path: Path) -> Path:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"w": torch.randn(4, 4)}, path)
    return path


def _foreign_safetensors(path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"encoder.weight": torch.zeros(3, 3), "head.bias": torch.zeros(3)}, str(path))


def _lora_only(d: Path) -> None:
    (d / "model.safetensors").unlink()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    _foreign_safetensors(d / "adapter_model.safetensors")


def _broken(fn=None, src="object"):
    """A builder: copy checkpoint ``src`` to <tmp>/ckpt, then break it with ``fn(dir)``."""
    def build(t: Path, c: dict) -> Path:
        d = _copy(c[src], t / "ckpt")
        if fn:
            fn(d)
        return d
    return build


CKPT_CASES = {
    # name: (build(tmp_path, ckpts) -> policy spec, expected fragment)
    "ckpt_missing": (lambda t, c: t / "no_such_ckpt", "no such checkpoint directory"),
    "ckpt_is_a_file": (lambda t, c: _torch_pickle(t / "weights.pt"), "is a file, not a directory"),
    "ckpt_no_config": (lambda t, c: _torch_pickle(t / "ckpt" / "model.safetensors").parent,
                       "no config.json, so it is not a LeRobot checkpoint"),
    "ckpt_config_not_json": (_broken(lambda d: (d / "config.json").write_text("{type: act")), "config.json is not readable JSON"),
    "ckpt_config_no_type": (_broken(lambda d: _edit_config(d, lambda j: j.pop("type"))), "config.json has no 'type' key"),
    "ckpt_unknown_type": (_broken(lambda d: _edit_config(d, lambda j: j.update(type="my_policy"))),
                          "policy type 'my_policy' in config.json is not a LeRobot policy type"),
    "ckpt_lora_only": (_broken(_lora_only), "holds only a PEFT/LoRA adapter"),
    "ckpt_no_weights": (_broken(lambda d: (d / "model.safetensors").unlink()), "weights file model.safetensors is missing"),
    "ckpt_no_processor": (_broken(lambda d: (d / "policy_preprocessor.json").unlink()),
                          "processor file policy_preprocessor.json is missing"),
    "ckpt_pickle_weights": (_broken(lambda d: _torch_pickle(d / "model.safetensors")), "the 'act' policy cannot be built from it"),
    "ckpt_foreign_weights": (_broken(lambda d: _foreign_safetensors(d / "model.safetensors")), "model.safetensors lacks"),
    "ckpt_action_dim": (_broken(src="object_action6"), "outputs 'action' of shape (6,), LIBERO takes (7,)"),
    "ckpt_needs_cameras": (_broken(src="object_cameras"),
                           "expects input feature 'observation.images.image', which obs mode 'state' cannot give"),
}


@pytest.mark.parametrize("case", list(CKPT_CASES))
def test_foreign_or_broken_checkpoint(capsys, tmp_path, ckpts, case):
    build, frag = CKPT_CASES[case]
    policy = build(tmp_path, ckpts)
    before = tree(tmp_path)
    code, err = pld(capsys, *EVAL, "--policy", policy, "--out", tmp_path / "report.json")
    expect_error(code, err, policy, frag)
    assert tree(tmp_path) == before


def test_hub_id_not_in_offline_cache(capsys, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code, err = pld(capsys, *EVAL, "--policy", "pld-no-such-owner/no-such-policy", "--out", tmp_path / "report.json")
    expect_error(code, err, "pld-no-such-owner/no-such-policy", "fetching it as a hub repo failed", "HF_HUB_OFFLINE=1")
    assert tree(tmp_path) == set()


def test_suite_the_base_was_not_trained_on(capsys, tmp_path, ckpts):
    """A libero_object base (env_state 40: 3 objects + 10-task one-hot) asked to act on libero_90 (120)."""
    code, err = pld(capsys, "eval", "--suite", "libero_90", "--tasks", "0", "--episodes", "1",
                    "--policy", ckpts["object"], "--out", tmp_path / "report.json")
    expect_error(code, err, ckpts["object"], "expects 'observation.environment_state' of shape (40,), the env gives (120,)")
    assert tree(tmp_path) == set()


def test_task_out_of_range(capsys, tmp_path, ckpts):
    code, err = pld(capsys, "eval", "--suite", "libero_object", "--tasks", "10", "--policy", ckpts["object"],
                    "--out", tmp_path / "report.json")
    expect_error(code, err, "task index 10 is out of range for suite 'libero_object'")
    assert tree(tmp_path) == set()


# ----------------------------------------------------------------------------- trajectory stores
def _store(path: Path, task: int = 0) -> Path:
    s = TrajectoryStore.create(path, {"obs_state": (8,), "obs_env_state": (4,)}, suite="libero_object", task_names=["a", "b"])
    s.append([make_episode(5, task=task), make_episode(3, task=min(task, 1))])
    return path


def _replace_array(path: Path, group: str, name: str, dtype: str, shape: tuple) -> None:
    g = zarr.open_group(str(path), mode="r+")
    del g[group][name]
    g[group].create_array(name, shape=shape, dtype=dtype, chunks=(16, *shape[1:]))


def _poke(path: Path, name: str, value: float) -> None:
    arr = zarr.open_group(str(path), mode="r+")["data"][name]
    x = arr[:]
    x[1, 2] = value
    arr[:] = x


def _poke_reward(path: Path) -> None:
    arr = zarr.open_group(str(path), mode="r+")["data"]["reward"]
    x = arr[:]
    x[0] = 0.5
    arr[:] = x


def _drop_attr(path: Path, key: str) -> None:
    meta = path / "zarr.json"
    raw = json.loads(meta.read_text())
    del raw["attributes"][key]
    meta.write_text(json.dumps(raw))


def _junk_dir(path: Path) -> Path:
    path.mkdir()
    (path / "notes.txt").write_text("not a store")
    return path


STORE_CASES = {
    "store_missing": (lambda p: None, "does not exist"),
    "store_not_zarr": (lambda p: _junk_dir(p), "is not a Zarr group"),
    "store_missing_array": (lambda p: (_store(p), zarr.open_group(str(p), mode="r+")["data"].__delitem__("mc_return")),
                            "array 'data/mc_return' is missing"),
    "store_wrong_dtype": (lambda p: (_store(p), _replace_array(p, "data", "reward", "int64", (8,))),
                          "array 'data/reward' has dtype int64, expected float32"),
    "store_wrong_shape": (lambda p: (_store(p), _replace_array(p, "data", "obs_env_state", "float32", (8, 5))),
                          "array 'data/obs_env_state' has per-step shape (5,), expected (4,)"),
    "store_nan_actions": (lambda p: (_store(p), _poke(p, "action", np.nan)), "array 'data/action' holds NaN or infinite values"),
    "store_inf_actions": (lambda p: (_store(p), _poke(p, "base_action", np.inf)), "array 'data/base_action' holds NaN or infinite values"),
    "store_bad_reward": (lambda p: (_store(p), _poke_reward(p)), "per-step data fails validation"),
    "store_no_attribute": (lambda p: (_store(p), _drop_attr(p, "format_version")), "attribute 'format_version' missing"),
    "store_bad_task_index": (lambda p: _store(p, task=5), "meta/task_index 5 >= number of tasks 2"),
}


@pytest.mark.parametrize("case", list(STORE_CASES))
def test_bad_store(capsys, tmp_path, case):
    build, frag = STORE_CASES[case]
    path = tmp_path / "s.zarr"
    build(path)
    before = tree(tmp_path)
    code, err = pld(capsys, "store", path)
    msg = expect_error(code, err, f"trajectory store {path}", frag)
    assert "Traceback" not in err, msg
    assert tree(tmp_path) == before  # `pld store` only reads


# ----------------------------------------------------------------------------- dataset vs base
@pytest.fixture(scope="module")
def sft_dataset(tmp_path_factory):
    """A converted PLD dataset (state only, env_state 6, actions 7) as stage augment_quantiles leaves it."""
    from pld_core.artifacts import finish_manifest
    from pld_core.dataset import convert_stores

    d = tmp_path_factory.mktemp("sft_dataset")
    make_store(d / "s.zarr", n_episodes=2, length=10, env_dim=6)
    out = d / "pld_dataset"
    convert_stores([d / "s.zarr"], out / "dataset", "local/pld")
    finish_manifest(out, "augment_quantiles", "test", {}, {}, {})
    return out


@pytest.mark.parametrize("base,frag", [
    pytest.param("object", "feature 'observation.environment_state' has shape (6,), checkpoint {ckpt} expects (40,)",
                 id="sft_env_state_dim"),
    pytest.param("action6", "feature 'action' has shape (7,), checkpoint {ckpt} expects (6,)", id="sft_action_dim"),
    pytest.param("cameras", "has no feature 'observation.images.image', which checkpoint {ckpt} takes", id="sft_missing_feature"),
])
def test_dataset_does_not_match_base(capsys, tmp_path, ckpts, sft_dataset, base, frag):
    ds = tmp_path / "data" / "iter_0" / "pld_dataset"
    shutil.copytree(sft_dataset, ds)
    p = write_params(tmp_path, lambda r: r["base"].__setitem__("path", str(ckpts[base])))
    before = tree(tmp_path)
    code, err = pld(capsys, "stage", "sft", "--params", p)
    expect_error(code, err, f"SFT dataset {ds / 'dataset'}", frag.format(ckpt=ckpts[base]))
    assert tree(tmp_path) == before  # no base_next, no .tmp-base_next, no .sft-work-*, no .lock-*


# ----------------------------------------------------------------------------- infrastructure
def test_unreachable_mlflow_uri(tmp_path):
    p = write_params(tmp_path, lambda r: r["mlflow"].__setitem__("tracking_uri", "http://127.0.0.1:9"))
    before = tree(tmp_path)
    r = cli("lineage", "--json", "--params", p, cwd=tmp_path, timeout=120)
    expect_error(r.returncode, r.stderr, "MLflow tracking URI 'http://127.0.0.1:9' is unreachable", "mlflow.tracking_uri")
    assert tree(tmp_path) == before


def _dvc_project(tmp_path: Path, dvc_dir: bool, pipeline: bool, **top) -> None:
    write_params(tmp_path, **top)
    if pipeline:
        shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    if dvc_dir:
        (tmp_path / ".dvc").mkdir()


@pytest.mark.parametrize("case", ["dvc_not_initialised", "dvc_no_pipeline", "dvc_profile_mismatch", "dvc_iterations"])
def test_dvc_repro_refuses(capsys, tmp_path, monkeypatch, case):
    from pld_core.config import load_params

    n = load_params(ROOT / "params.yaml").flywheel.iterations
    more = {"flywheel": {**yaml.safe_load((ROOT / "params.yaml").read_text())["flywheel"], "data_dir": str(tmp_path / "data"),
                         "iterations": n + 1}} if case == "dvc_iterations" else {}
    _dvc_project(tmp_path, dvc_dir=case != "dvc_not_initialised", pipeline=case != "dvc_no_pipeline", **more)
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    if case == "dvc_not_initialised":
        expect_error(*pld(capsys, "repro"), f"{tmp_path}: not a DVC repository", f"run `dvc init` in {tmp_path}")
    elif case == "dvc_no_pipeline":
        expect_error(*pld(capsys, "repro"), f"{tmp_path / 'dvc.yaml'}: no DVC pipeline here")
    elif case == "dvc_iterations":
        expect_error(*pld(capsys, "repro"), f"{tmp_path / 'dvc.yaml'}: its stages build {n} iteration(s), params.yaml has "
                     f"flywheel.iterations {n + 1}", "Fix: `pld pipeline`")
    else:
        expect_error(*pld(capsys, "repro", "--profile", "smoke"), "params.yaml: dvc.yaml's stages read its top level",
                     "pld params --params params.yaml --profile smoke >")
    assert tree(tmp_path) == before  # DVC never ran: no .dvc/tmp, no dvc.lock, no data/


def test_two_flywheels_on_one_data_dir(tmp_path):
    from pld_core.locking import data_lock

    p = write_params(tmp_path)
    data = tmp_path / "data"
    with data_lock(data):
        before = tree(tmp_path)
        r = cli("flywheel", "--params", p, timeout=180)
        expect_error(r.returncode, r.stderr, f"{data} is in use by another flywheel", f'"pid": {os.getpid()}')
        assert tree(tmp_path) == before  # only the holder's lock file
    with data_lock(data):  # released: can be taken again
        pass


# ----------------------------------------------------------------------------- a full disk
_SMALL_FS_DRIVER = r"""
import json, shutil, subprocess, sys
from pathlib import Path
fs, size, snapshot = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(fs)], check=True)
r = subprocess.run([sys.executable, "-m", "pld_app.cli", "demo", "--tasks", "0", "--episodes", "1",
                    "--out", str(fs / "demos.zarr")], capture_output=True, text=True)
shutil.copytree(fs, snapshot, symlinks=True)  # what the command left, for the test to inspect
print(json.dumps({"rc": r.returncode, "stderr": r.stderr}))
"""


def _private_mount_namespace() -> list[str] | None:
    """How to run the driver in a mount namespace of its own, where it may mount a tmpfs: an unprivileged user +
    mount namespace, or (as root, e.g. on CI) a mount namespace alone. None if neither works here."""
    if not shutil.which("unshare"):
        return None
    for prefix in (["unshare", "--user", "--map-root-user", "--mount"], ["unshare", "--mount"]):
        if prefix[1] == "--mount" and os.geteuid() != 0:
            continue
        if subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
            return prefix
    return None


@pytest.mark.parametrize("case,size", [("disk_full_at_create", "64k"), ("disk_full_in_append", "104k")])
def test_disk_full(tmp_path, case, size):
    """`pld demo --episodes 1` into a tiny tmpfs (in a private mount namespace). On this LIBERO version
    the empty store needs 72-88 KiB and one episode of task 0 another ~40 KiB: 64 KiB fails while
    the store is created, 104 KiB while the episode is appended."""
    prefix = _private_mount_namespace()
    if prefix is None:
        pytest.skip("no mount namespace can be made here: unprivileged user namespaces fail (`unshare -rm true`) "
                    "and the tests do not run as root (`unshare -m true` needs it), so no small filesystem can be mounted")
    fs, left = tmp_path / "fs", tmp_path / "left"
    fs.mkdir()
    r = subprocess.run([*prefix, sys.executable, "-c", _SMALL_FS_DRIVER, str(fs), size, str(left)],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    msg = expect_error(out["rc"], out["stderr"], "no space left on device", fs)
    assert "Traceback" not in out["stderr"], out["stderr"][-3000:]
    files = tree(left)
    assert not [f for f in files if ".tmp-" in f or f.endswith(".partial")], files
    if case == "disk_full_at_create":
        assert files == set(), files  # the half-created store was removed
    else:
        assert "demos.zarr" in files, msg
        store = TrajectoryStore.open(left / "demos.zarr")  # opens and validates
        assert zarr.open_group(str(left / "demos.zarr"))["data"]["base_action"].shape[0] > 0  # rows of the failed append...
        assert store.n_episodes == 0 and store.n_steps == 0 and store.episodes() == []  # ...are not visible
    assert tree(fs) == set()  # the tmpfs lived only in the child's namespace


def test_disk_full_at_the_commit_record(capsys, tmp_path, monkeypatch):
    """`pld demo` tops up a store holding one complete episode and hits ENOSPC exactly on the new
    episode's `episode_ends` chunk: zarr has already grown the shape, so the store holds an
    uncommitted trailing entry (the fill value 0). The old episode stays, the new one is invisible."""
    import zarr.storage._local as local

    from pld_core.env import task_names

    out = tmp_path / "demos.zarr"
    store = TrajectoryStore.create(out, {"obs_state": (8,), "obs_env_state": (OBJECT_ENV_DIM,)}, suite="libero_object",
                                   task_names=task_names("libero_object"), extra_attrs={"source": "scripted", "noise": 0.0})
    store.append([make_episode(6, env_dim=OBJECT_ENV_DIM)])
    real_put = local._put

    def put(path, value, exclusive=False):
        p = str(path)
        if "episode_ends" in p and not p.endswith("zarr.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), p + ".partial")
        return real_put(path, value, exclusive=exclusive)

    monkeypatch.setattr(local, "_put", put)
    code, err = pld(capsys, "demo", "--tasks", "0", "--episodes", "2", "--out", out)
    monkeypatch.setattr(local, "_put", real_put)
    expect_error(code, err, "no space left on device", f"while writing {out}", out / "meta" / "episode_ends")
    assert zarr.open_group(str(out))["meta"]["episode_ends"].shape == (2,)  # the failed commit's entry is on disk
    store = TrajectoryStore.open(out)
    assert store.n_episodes == 1 and store.n_steps == 6 and list(store.episode_ends) == [6]
    (ep,) = store.episodes()  # validated: the complete episode from before
    assert ep.success and len(ep) == 6
    TrajectoryStore.open(out, mode="a")  # a writer trims the uncommitted entry and rows
    g = zarr.open_group(str(out))
    assert g["meta"]["episode_ends"].shape == (1,) and g["data"]["action"].shape[0] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demos.zarr"]  # no .tmp-*


# ----------------------------------------------------------------------------- the good path still validates
def test_every_profile_validates_offline():
    from pld_core.config import load_params

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for profile in ["default", *raw["profiles"]]:
        params = load_params(ROOT / "params.yaml", profile)
        assert params.profile == profile
    pi = load_params(ROOT / "params.yaml", "pi05-libero")
    assert pi.env.mode == "images" and pi.base.policy["type"] == "pi05" and pi.sft.lora == {"r": 32}
    assert pi.device == "cuda"
    assert pi.flywheel.batch_base and pi.flywheel.collect_workers > 1  # one pi0.5 for several simulators


def test_sft_control_needs_a_finished_iteration_and_demonstrations(capsys, tmp_path):
    code, err = pld(capsys, "bench", "sft-control", "--set", f"flywheel.data_dir={tmp_path / 'data'}")
    assert code == 2 and "iter_0/eval/eval.json not found" in err and "pld flywheel" in err
    code, err = pld(capsys, "bench", "sft-control", "--profile", "smoke", "--set", f"flywheel.data_dir={tmp_path / 'data'}")
    assert code == 2 and "base.path" in err and "default profile" in err
    assert not (tmp_path / "data" / "controls").exists()


@pytest.mark.parametrize("case", ["serve_without_server", "serve_bad_cron", "serve_missing_params"])
def test_bad_serve(capsys, tmp_path, monkeypatch, case):
    """`pld serve` refuses before it registers anything: a bad cron, no params file, no server to schedule on."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    args, frag = {"serve_without_server": (["--cron", "0 2 * * *"], "pld serve needs a Prefect server"),
                  "serve_bad_cron": (["--cron", "0 2 * *"], "--cron '0 2 * *' is not a valid cron expression"),
                  "serve_missing_params": (["--cron", "0 2 * * *", "--params", "nope.yaml"], "nope.yaml: no such params file")}[case]
    if case == "serve_without_server":
        (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    before = tree(tmp_path)
    expect_error(*pld(capsys, "serve", *args), frag)
    assert tree(tmp_path) == before
