"""End to end: the smoke profile through Prefect on a local Dask cluster (real LIBERO, LeRobot, MLflow),
the MLflow lineage read back with the client, and the same pipeline through `dvc repro`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}


def pld(*args, cwd=ROOT, timeout=1200):
    return subprocess.run([sys.executable, "-m", "pld_core.cli", *args], capture_output=True, text=True, cwd=cwd, env=_env(), timeout=timeout)


def smoke_overrides(tmp: Path, runner: str = "dask") -> list[str]:
    return ["--profile", "smoke", "--set", f"flywheel.data_dir={tmp / 'data'}", "--set", f"flywheel.task_runner={runner}",
            "--set", f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", "--set", f"mlflow.artifact_dir={tmp / 'mlartifacts'}"]


def manifests(data: Path) -> dict[str, str]:
    return {str(p.relative_to(data)): json.loads(p.read_text())["finished_at"] + json.loads(p.read_text())["key"]
            for p in data.rglob("manifest.json") if ".tmp-" not in str(p)}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flywheel")
    t0 = time.time()
    r = pld("flywheel", *smoke_overrides(tmp))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return tmp, r, time.time() - t0


def test_smoke_flywheel_through_prefect_and_dask(smoke_run):
    tmp, r, seconds = smoke_run
    data = tmp / "data"
    assert "DaskTaskRunner" in r.stdout + r.stderr or "dask" in (r.stdout + r.stderr).lower()
    stages = manifests(data)
    for rel in ("base_v0/manifest.json", "base_v0_eval/manifest.json",
                "iter_0/libero_object-0/offline/manifest.json", "iter_0/libero_object-0/critic_init/manifest.json",
                "iter_0/libero_object-0/residual/manifest.json", "iter_0/pld/libero_object-0/manifest.json",
                "iter_0/pld_dataset_raw/manifest.json", "iter_0/pld_dataset/manifest.json",
                "iter_0/base_next/manifest.json", "iter_0/eval/manifest.json"):
        assert rel in stages, f"missing {rel}; have {sorted(stages)}"
    # the PLD store holds only successful hybrid episodes, each with its t_base
    from pld_core.store import TrajectoryStore

    t = TrajectoryStore.open(data / "iter_0/pld/libero_object-0/pld.zarr").episode_table()
    assert len(t) == 2 and t.success.all() and (t.t_base >= 0).all()
    # base v1 is a standard LeRobot checkpoint
    assert (data / "iter_0/base_next/pretrained_model/model.safetensors").exists()
    assert (data / "figures" / "success_over_versions.png").exists()
    # every stage times its own work (what `pld bench overhead` sets against the wall time)
    from pld_core.perfbench import _manifests

    ms = _manifests(data)
    assert len(ms) == len(stages) and all(m["compute_seconds"] is not None and m["compute_seconds"] >= 0 for m in ms), ms
    assert all(m["compute_seconds"] > 0.5 for m in ms if m["stage"] in ("train_residual", "collect_pld", "sft", "evaluate")), ms
    assert sum(m["compute_seconds"] for m in ms) < seconds  # one task, sequential stages: compute <= wall


def test_lineage_in_mlflow_registry(smoke_run):
    tmp, _, _ = smoke_run
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    versions = {int(v.tags["pld_version"]): v for v in client.search_model_versions("name='pld-base'")}
    assert set(versions) == {0, 1}
    v0, v1 = versions[0], versions[1]
    assert v0.tags["parent_version"] == "" and v1.tags["parent_version"] == "0"
    digest = json.loads((tmp / "data/iter_0/pld_dataset/manifest.json").read_text())["output_digest"]
    assert v1.tags["dataset_digest"] == digest
    spec_runs = v1.tags["specialist_runs"].split(",")
    assert len(spec_runs) == 1 and client.get_run(spec_runs[0]).data.tags["pld.stage"] == "train_residual"
    assert client.get_model_version_by_alias("pld-base", "newest").tags["pld_version"] == "1"
    assert client.get_model_version_by_alias("pld-base", "best").tags["pld_version"] in {"0", "1"}
    # nested runs: every stage run of iteration 0 hangs under the iteration's parent run
    parent = client.get_run(v1.run_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {c.data.tags["pld.stage"] for c in children} >= {"collect_offline", "pretrain_critic", "train_residual", "collect_pld",
                                                           "convert_dataset", "augment_quantiles", "sft", "evaluate"}
    r = pld("lineage", "--json", *smoke_overrides(tmp)[0:2], *smoke_overrides(tmp)[2:])
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    assert [(x["version"], x["parent"]) for x in rows] == [(0, None), (1, 0)]
    assert rows[1]["dataset_digest"] == digest and 0.0 <= rows[1]["success_rate"] <= 1.0


def test_rerun_skips_every_stage(smoke_run):
    tmp, _, first_seconds = smoke_run
    before = manifests(tmp / "data")
    figures = {p.name: p.stat().st_mtime_ns for p in (tmp / "data" / "figures").iterdir()}
    t0 = time.time()
    r = pld("flywheel", *smoke_overrides(tmp, runner="sequential"))
    seconds = time.time() - t0
    assert r.returncode == 0, r.stderr[-2000:]
    assert manifests(tmp / "data") == before  # nothing rebuilt
    assert {p.name: p.stat().st_mtime_ns for p in (tmp / "data" / "figures").iterdir()} == figures  # nor redrawn
    assert seconds < first_seconds / 2, (seconds, first_seconds)


def test_dvc_repro_runs_once_then_nothing_then_downstream_only(tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copy(ROOT / "dvc.yaml", proj / "dvc.yaml")
    r = pld("params", "--profile", "smoke", "--set", "flywheel.data_dir=data", "--set", "mlflow.tracking_uri=sqlite:///data/mlflow.db")
    assert r.returncode == 0, r.stderr
    (proj / "params.yaml").write_text(r.stdout)
    dvc = [str(VENV_BIN / "dvc")]
    env = _env()

    def run(*args, timeout=1500):
        out = subprocess.run([*dvc, *args], capture_output=True, text=True, cwd=proj, env=env, timeout=timeout)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        return out.stdout + out.stderr

    run("init", "--no-scm", "-q")
    out = run("repro")
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"demos", "base_v0_dataset_raw", "base_v0_dataset", "base_v0", "evaluate_v0", "collect_offline@0",
                   "pretrain_critic@0", "train_residual@0", "collect_pld@0", "convert_dataset", "augment_quantiles",
                   "sft", "evaluate"}, out[-2000:]
    assert "changed" not in run("status").lower() or "up to date" in run("status").lower()
    out = run("repro")
    assert "Running stage" not in out
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["sft"]["steps"] = 25
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run("repro")
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"sft", "evaluate"}, out[-2000:]


def test_a_rebuilt_base_gets_a_new_registry_version_and_lineage_reads_it(tmp_path):
    from pld_core import lineage

    client = lineage.setup(f"sqlite:///{tmp_path / 'm.db'}", "e", "art", root=tmp_path)
    import mlflow

    ckpt = tmp_path / "base_v0" / "pretrained_model"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")
    (ckpt.parent / "manifest.json").write_text(json.dumps({"output_digest": "aaa"}))
    with mlflow.start_run() as r:
        first = lineage.register_base(client, "m", 0, ckpt, r.info.run_id, None, None, [], 0.5)
        assert lineage.register_base(client, "m", 0, ckpt, r.info.run_id, None, None, [], 0.5) == first  # idempotent
        (ckpt.parent / "manifest.json").write_text(json.dumps({"output_digest": "bbb"}))  # base rebuilt
        second = lineage.register_base(client, "m", 0, ckpt, r.info.run_id, None, None, ["run1"], 0.7)
    assert int(second) > int(first)
    rows = lineage.lineage(client, "m")
    assert len(rows) == 1 and rows[0]["success_rate"] == 0.7 and rows[0]["specialist_runs"] == ["run1"]
    assert client.get_model_version_by_alias("m", "newest").version == second
