"""End to end: the smoke profile through Prefect on a Dask cluster started as a user starts one (real LIBERO,
LeRobot, MLflow; the `smoke_run` fixture in conftest.py), the MLflow lineage read back with the client, and the
same pipeline through `dvc repro`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from harness import ROOT, TWO_TASKS, VENV_BIN, built_by, manifests, pld, smoke_overrides
from harness import env as _env


def test_smoke_flywheel_through_prefect_and_dask(smoke_run, dask_cluster):
    tmp, r, seconds = smoke_run
    data = tmp / "data"
    assert "DaskTaskRunner" in r.stdout + r.stderr or "dask" in (r.stdout + r.stderr).lower()
    # every stage ran in the `dask worker` started beside the test (a process under it), none in the flow's process
    import psutil

    workers = {p.pid for p in psutil.Process(dask_cluster[1].pid).children(recursive=True)} | {dask_cluster[1].pid}
    pids = {b["pid"] for b in built_by(data).values()}
    assert r.pid not in pids and pids <= workers, (r.pid, pids, workers)
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
    assert len(t) == 2 and t.success.all() and ((t.t_base >= 0) & (t.t_base <= int(0.6 * 280))).all()  # U{0..alpha*T_max}
    # base v1 is a standard LeRobot checkpoint
    assert (data / "iter_0/base_next/pretrained_model/model.safetensors").exists()
    assert (data / "figures" / "success_over_versions.png").exists()
    # every stage times its own work (what `pld bench overhead` sets against the wall time)
    from bench.perf import stage_manifests

    ms = stage_manifests(data)
    assert len(ms) == len(stages) and all(m["compute_seconds"] is not None and m["compute_seconds"] >= 0 for m in ms), ms
    worked = [m for m in ms if "libero_object-1" not in m["dir"]]  # task 1's stages only record that they had no data
    assert all(m["compute_seconds"] > 0.5 for m in worked if m["stage"] in ("train_residual", "collect_pld", "sft", "evaluate")), ms
    assert sum(m["compute_seconds"] for m in ms) < seconds  # one worker, sequential stages: compute <= wall


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
    rates = {v: float(versions[v].tags["success_rate"]) for v in (0, 1)}
    assert client.get_model_version_by_alias("pld-base", "best").tags["pld_version"] == str(max((1, 0), key=lambda v: rates[v]))
    # nested runs: every stage run of iteration 0 hangs under the iteration's parent run
    parent = client.get_run(v1.run_id)
    # the PLD dataset is the iteration run's input (the MLflow UI lists it with the run): name, digest, source
    inputs = {i.dataset.name: i for i in parent.inputs.dataset_inputs}
    assert inputs["pld_dataset_it0"].dataset.digest == digest[:36]
    assert json.loads(inputs["pld_dataset_it0"].dataset.source)["uri"] == str((tmp / "data/iter_0/pld_dataset").resolve())
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {c.data.tags["pld.stage"] for c in children} >= {"collect_offline", "pretrain_critic", "train_residual", "collect_pld",
                                                           "convert_dataset", "augment_quantiles", "sft", "evaluate"}
    r = pld("lineage", "--json", *smoke_overrides(tmp), *TWO_TASKS)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    assert [(x["version"], x["parent"]) for x in rows] == [(0, None), (1, 0)]
    evaluated = json.loads((tmp / "data/iter_0/eval/manifest.json").read_text())["metrics"]
    assert rows[1]["dataset_digest"] == digest and rows[1]["success_rate"] == pytest.approx(evaluated["success_rate"], abs=1e-4)
    # the task without data is in the lineage with its reason, and v1 was still evaluated on it
    assert list(rows[1]["tasks_without_data"]) == ["libero_object/1"], rows[1]
    assert "succeeded in 0 of 6 episodes" in rows[1]["tasks_without_data"]["libero_object/1"]
    assert set(rows[1]["per_task"]) == {"libero_object/0", "libero_object/1"}, rows[1]
    assert json.loads(v1.tags["tasks_without_data"]) == rows[1]["tasks_without_data"]
    assert json.loads(parent.data.tags["pld.tasks_without_data"]) == rows[1]["tasks_without_data"]
    task1 = [c for c in children if c.data.tags.get("pld.task") == "libero_object/1"]
    assert {c.data.tags["pld.stage"] for c in task1} == {"collect_offline", "pretrain_critic", "train_residual", "collect_pld"}
    assert all(c.data.tags.get("pld.no_data") == "true" for c in task1), [c.data.tags for c in task1]


def test_a_task_whose_base_never_succeeds_is_recorded_and_the_rest_is_distilled(smoke_run):
    """Task 1's base never succeeds: its four stages finish with no-data manifests naming the reason, the dataset
    holds task 0's PLD episodes only, and v1 is evaluated on both tasks."""
    tmp, r, _ = smoke_run
    data = tmp / "data"
    for rel in ("iter_0/libero_object-1/offline", "iter_0/libero_object-1/critic_init", "iter_0/libero_object-1/residual",
                "iter_0/pld/libero_object-1"):
        m = json.loads((data / rel / "manifest.json").read_text())["metrics"]
        assert m.get("no_data") is True and "succeeded in 0 of 6 episodes" in m["reason"], (rel, m)
    off = json.loads((data / "iter_0/libero_object-1/offline/manifest.json").read_text())["metrics"]
    assert off["episodes"] == 6 and off["successes"] == 0
    task0 = json.loads((data / "iter_0/pld/libero_object-0/manifest.json").read_text())["metrics"]
    assert not task0.get("no_data") and task0["episodes"] == 2
    conv = json.loads((data / "iter_0/pld_dataset_raw/manifest.json").read_text())
    assert [Path(x).parent.name for x in conv["metrics"]["stores"] if "pld" in Path(x).parts] == ["libero_object-0"], conv
    ev = json.loads((data / "iter_0/eval/manifest.json").read_text())["metrics"]
    assert set(ev["per_task"]) == {"libero_object/0", "libero_object/1"}, ev
    assert "no PLD data from libero_object task 1" in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]


def test_every_version_has_its_record(smoke_run):
    """figures/versions.json (= `pld lineage --versions`) and the registry tags carry, per version, success per task
    with its CI, and for v1 what iteration 0 did per task, each number read from the stage that made it."""
    tmp, _, _ = smoke_run
    data = tmp / "data"
    rec = json.loads((data / "figures" / "versions.json").read_text())
    r = pld("lineage", "--versions", *smoke_overrides(tmp), *TWO_TASKS)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == rec
    assert [v["version"] for v in rec["versions"]] == [0, 1] and rec["versions"][1]["parent"] == 0
    v0, v1 = rec["versions"]
    for v, ev_dir in ((v0, "base_v0_eval"), (v1, "iter_0/eval")):
        ev = json.loads((data / ev_dir / "eval.json").read_text())
        assert v["mean"] == ev["mean"] and v["mean_ci95"] == ev["mean_ci95"]
        assert v["per_task"] == {t: {"success_rate": x["success_rate"], "ci95": x["ci95"], "episodes": x["episodes"]}
                                 for t, x in ev["tasks"].items()}
    metrics = {rel: json.loads((data / rel / "manifest.json").read_text())["metrics"]
               for rel in ("iter_0/libero_object-0/offline", "iter_0/libero_object-0/residual", "iter_0/pld/libero_object-0")}
    t0, t1 = v1["tasks"]["libero_object/0"], v1["tasks"]["libero_object/1"]
    assert t0["offline_successes"] == metrics["iter_0/libero_object-0/offline"]["successes"]
    assert t0["specialist_final_success_rate"] == metrics["iter_0/libero_object-0/residual"]["final_success_rate"]
    assert t0["pld_episodes_kept"] == metrics["iter_0/pld/libero_object-0"]["episodes"] == 2 and not t0["no_data"]
    assert t1["no_data"] and "succeeded in 0 of 6 episodes" in t1["reason"] and t1["offline_successes"] == 0
    from bench.perf import stage_manifests

    it0 = {m["dir"]: m["compute_seconds"] for m in stage_manifests(data) if m["dir"].startswith("iter_0/")}
    assert set(v1["stage_seconds"]) == set(it0) and len(it0) == 12  # 4 stages x 2 tasks + convert, augment, sft, eval
    assert all(v1["stage_seconds"][d] == round(it0[d], 1) for d in it0)
    assert v1["compute_seconds"] == round(sum(v1["stage_seconds"].values()), 1)
    assert set(v0["stage_seconds"]) == {"base_v0", "base_v0_eval"}  # a scripted base.path: no demos, no training
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    tags = {int(v.tags["pld_version"]): v.tags for v in client.search_model_versions("name='pld-base'")}
    assert json.loads(tags[1]["per_task_success"]) == {t: [x["success_rate"], *x["ci95"]] for t, x in v1["per_task"].items()}
    assert json.loads(tags[1]["pld_episodes"]) == {"libero_object/0": 2, "libero_object/1": None}
    assert json.loads(tags[0]["mean_ci95"]) == v0["mean_ci95"] and "pld_episodes" not in tags[0]
    assert (data / "figures" / "specialist_curves.png").is_file()


def test_version_record_reads_each_number_from_its_stage(tmp_path):
    """A data dir written by hand, every number distinct: the record takes each from the stage that made it."""
    from pld_core.config import load_params
    from pld_core.layout import Layout
    from pld_core.versions import versions_report

    params = load_params(ROOT / "params.yaml", "default")
    params = params.model_copy(update={"env": params.env.model_copy(update={"tasks": [0, 4]})})
    layout = Layout(tmp_path)

    def stage(d: Path, metrics: dict, seconds: float) -> None:
        d.mkdir(parents=True)
        (d / "manifest.json").write_text(json.dumps({"stage": d.name, "key": "k", "metrics": metrics, "compute_seconds": seconds}))

    def evaluation(d: Path, rates: tuple[float, float], seconds: float) -> None:
        stage(d, {}, seconds)
        tasks = {f"libero_object/{t}": {"success_rate": r, "ci95": [r / 2, r / 2 + 0.1], "episodes": 50} for t, r in zip((0, 4), rates)}
        (d / "eval.json").write_text(json.dumps({"tasks": tasks, "mean": sum(rates) / 2, "mean_ci95": [0.01, 0.99]}))

    stage(layout.root / "base_v0", {}, 11.0)
    evaluation(layout.base_eval(0), (0.2, 0.0), 12.0)
    stage(layout.offline(0, "libero_object", 0), {"successes": 3, "episodes": 7}, 1.0)
    stage(layout.critic_init(0, "libero_object", 0), {}, 2.0)
    stage(layout.residual(0, "libero_object", 0), {"base_success_rate": 0.3, "final_success_rate": 0.45, "ci95": [0.2, 0.7],
                                                   "env_steps": 6001}, 3.0)
    stage(layout.pld(0, "libero_object", 0), {"episodes": 9, "attempts": 13, "hybrid_success_rate": 0.69}, 4.0)
    reason = "collect_offline: the base succeeded in 0 of 40 episodes"
    stage(layout.offline(0, "libero_object", 4), {"successes": 0, "episodes": 40, "no_data": True, "reason": reason}, 5.0)
    stage(layout.dataset_raw(0), {"episodes": 21, "frames": 2100}, 6.0)
    stage(layout.base(1), {}, 7.0)
    evaluation(layout.base_eval(1), (0.6, 0.04), 8.0)

    rec = versions_report(params, layout)
    assert [v["version"] for v in rec["versions"]] == [0, 1]
    v0, v1 = rec["versions"]
    assert v0["stage_seconds"] == {"base_v0": 11.0, "base_v0_eval": 12.0} and v0["compute_seconds"] == 23.0
    assert v1["per_task"]["libero_object/0"] == {"success_rate": 0.6, "ci95": [0.3, 0.4], "episodes": 50}
    assert v1["mean"] == pytest.approx(0.32) and v1["mean_ci95"] == [0.01, 0.99] and v1["parent"] == 0
    assert v1["tasks"]["libero_object/0"] == {
        "offline_successes": 3, "offline_episodes": 7, "specialist_base_success_rate": 0.3, "specialist_final_success_rate": 0.45,
        "specialist_final_ci95": [0.2, 0.7], "specialist_env_steps": 6001, "pld_episodes_kept": 9, "pld_attempts": 13,
        "hybrid_success_rate": 0.69, "no_data": False, "reason": None}
    t4 = v1["tasks"]["libero_object/4"]
    assert t4["no_data"] and t4["reason"] == reason and t4["offline_successes"] == 0 and t4["pld_episodes_kept"] is None
    assert v1["sft_dataset"] == {"episodes": 21, "frames": 2100}
    assert v1["stage_seconds"] == {"iter_0/libero_object-0/offline": 1.0, "iter_0/libero_object-0/critic_init": 2.0,
                                   "iter_0/libero_object-0/residual": 3.0, "iter_0/pld/libero_object-0": 4.0,
                                   "iter_0/libero_object-4/offline": 5.0, "iter_0/pld_dataset_raw": 6.0, "iter_0/base_next": 7.0,
                                   "iter_0/eval": 8.0}
    assert v1["compute_seconds"] == 36.0


def test_the_loop_stops_at_the_target_and_runs_every_iteration_without_one(monkeypatch):
    """flywheel.iterations bounds the loop; flywheel.target_success ends it after the first version reaching it."""
    import flows.flywheel as fw
    from pld_core.config import load_params

    rates = [0.5, 0.92, 0.97]
    ran = []

    class Fake:
        def __init__(self, fn):
            self.fn = fn

        def with_options(self, **_):
            return self.fn

    def iteration(params, k, root):
        ran.append(k)
        return {"evaluate": {"metrics": {"success_rate": rates[k]}}}

    monkeypatch.setattr(fw, "bootstrap_flow", Fake(lambda params, root: {}))
    monkeypatch.setattr(fw, "iteration_flow", Fake(iteration))
    monkeypatch.setattr(fw, "make_task_runner", lambda params: None)
    base = load_params(ROOT / "params.yaml", "smoke")
    for target, iterations, want in ((0.9, 3, [0, 1]), (None, 3, [0, 1, 2]), (0.99, 2, [0, 1]), (0.5, 3, [0])):
        ran.clear()
        params = base.model_copy(update={"flywheel": base.flywheel.model_copy(update={"target_success": target,
                                                                                       "iterations": iterations})})
        out = fw.flywheel(params, root=str(ROOT))
        assert ran == want, (target, iterations, ran)
        assert out.get("stopped_at_target") == (len(want) if target is not None and rates[want[-1]] >= target else None)


def test_rerun_skips_every_stage(smoke_run):
    """Nothing rebuilt or redrawn (how fast a cached rerun is: `pld bench overhead`)."""
    tmp, _, _ = smoke_run
    before = manifests(tmp / "data")
    figures = {p.name: p.stat().st_mtime_ns for p in (tmp / "data" / "figures").iterdir()}
    r = pld("flywheel", *smoke_overrides(tmp, runner="sequential"), *TWO_TASKS)
    assert r.returncode == 0, r.stderr[-2000:]
    assert manifests(tmp / "data") == before  # nothing rebuilt
    assert {p.name: p.stat().st_mtime_ns for p in (tmp / "data" / "figures").iterdir()} == figures  # nor redrawn


@pytest.mark.cost(560)  # seconds (conftest.longest_first)
@pytest.mark.timeout(3600)  # 629 s (three iterations) on CI's machine, over 1500 s (make test's per-test limit) on a 3x slower one
def test_dvc_repro_builds_every_iteration_then_nothing_then_dependents_only(tmp_path):
    """Two iterations through `dvc repro` at smoke scale, dvc.yaml written by `pld pipeline`. The smoke base v1
    is distilled for 10 steps and never succeeds, so flywheel.keep_failures keeps every episode: each stage of
    every iteration runs on real input (one episode where the smoke profile has two). Every stage runs once, the
    second iteration fine-tunes the first one's base (its sft manifest's input is the first sft's output), a second
    repro runs nothing, and a changed evaluate.episodes reruns the three evaluations only (nothing reads them)."""
    iterations = 2
    proj = tmp_path / "proj"
    proj.mkdir()
    r = pld("params", "--profile", "smoke", "--set", "flywheel.data_dir=data", "--set", "mlflow.tracking_uri=sqlite:///data/mlflow.db",
            "--set", f"flywheel.iterations={iterations}", "--set", "flywheel.keep_failures=true",
            *(x for kv in ("offline.successes=1", "collect.episodes_per_task=1", "residual.eval_episodes=1",
                           "residual.final_eval_episodes=1", "evaluate.episodes=1", "demo.episodes_per_task=2",
                           "residual.env_steps=200", "calql.steps=10", "sft.steps=10") for x in ("--set", kv)))
    assert r.returncode == 0, r.stderr
    (proj / "params.yaml").write_text(r.stdout)
    r = pld("pipeline", cwd=proj)
    assert r.returncode == 0, r.stderr
    dvc = [str(VENV_BIN / "dvc")]
    env = _env()

    def run(*args, timeout=1500):
        out = subprocess.run([*dvc, *args], capture_output=True, text=True, cwd=proj, env=env, timeout=timeout)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        return out.stdout + out.stderr

    def ran(out: str) -> set[str]:
        return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}

    run("init", "--no-scm", "-q")
    out = run("repro")
    per_task = ("collect_offline", "pretrain_critic", "train_residual", "collect_pld")
    per_iteration = ("convert_dataset", "augment_quantiles", "sft", "evaluate")
    assert ran(out) == {"demos", "base_v0_dataset_raw", "base_v0_dataset", "base_v0", "evaluate_v0",
                        *(f"{s}_it{k}@0" for s in per_task for k in range(iterations)),
                        *(f"{s}_it{k}" for s in per_iteration for k in range(iterations))}, out[-2000:]
    data = proj / "data"
    for k in range(1, iterations):
        sft_in = json.loads((data / f"iter_{k}" / "base_next" / "manifest.json").read_text())["inputs"]
        parent = json.loads((data / f"iter_{k - 1}" / "base_next" / "manifest.json").read_text())["output_digest"]
        assert parent in json.dumps(sft_in), (k, sft_in)
    assert all((data / f"iter_{k}" / "eval" / "eval.json").is_file() for k in range(iterations))
    assert "Running stage" not in run("repro")
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["evaluate"]["episodes"] = 2
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert ran(run("repro")) == {"evaluate_v0", *(f"evaluate_it{k}" for k in range(iterations))}


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


@pytest.mark.cost(240)  # seconds (conftest.longest_first)
def test_default_profile_shape_at_smoke_budgets(tmp_path):
    """The default profile as `make flywheel` runs it (its five tasks, base v0 trained from scripted demos, its
    stages, task runner and collect workers), with every budget cut to the bone. A base trained for 10 steps
    never succeeds: v0 is evaluated on every task, each task's chain ends in no-data manifests (not a crash,
    not a retry), and the iteration stops with one line naming every task, exit code 2."""
    from pld_core.config import load_params

    default = load_params(ROOT / "params.yaml", "default")
    budgets = {"demo.episodes_per_task": 1, "base.steps": 10, "base.batch_size": 8, "offline.max_episodes": 1,
               "evaluate.episodes": 1, "flywheel.data_dir": str(tmp_path / "data"),
               "mlflow.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "mlflow.artifact_dir": str(tmp_path / "mlartifacts")}
    sets = [x for k, v in budgets.items() for x in ("--set", f"{k}={v}")]
    r = pld("flywheel", *sets, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 2, out[-4000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: iteration 0: no task has PLD data, nothing to distill"), out[-4000:]
    for t in default.env.tasks:
        assert f"task {t}: collect_offline: the base succeeded in 0 of 1 episodes" in last, last
    assert "UnfinishedRun" not in out and "AwaitingRetry" not in out, out[-4000:]
    data = tmp_path / "data"
    ev = json.loads((data / "base_v0_eval/manifest.json").read_text())["metrics"]
    assert sorted(ev["per_task"]) == [f"{default.env.suite}/{t}" for t in default.env.tasks], ev
    for t in default.env.tasks:
        for rel in (f"libero_object-{t}/offline", f"libero_object-{t}/critic_init", f"libero_object-{t}/residual", f"pld/libero_object-{t}"):
            assert json.loads((data / "iter_0" / rel / "manifest.json").read_text())["metrics"]["no_data"] is True, rel
    assert not (data / "iter_0/pld_dataset_raw").exists() and not list((data / "iter_0").glob(".tmp-*"))
