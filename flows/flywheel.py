"""Prefect flows: the PLD flywheel. Wiring only: every stage lives in ``tasks/``.

    flywheel(profile)                      the loop over base versions
      bootstrap                            demos -> base v0 (LeRobot, from scripted demos) -> eval v0
      iteration(k)                         base vK -> base vK+1
        per task (fanned out)              collect_offline -> pretrain_critic -> train_residual -> collect_pld
        then                               convert_dataset -> augment_quantiles -> sft -> evaluate
        register base vK+1 in MLflow       (parent vK, PLD dataset digest, specialist runs)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NONE as NO_CACHE

from pld_core import lineage
from pld_core.config import Params
from pld_core.errors import PLDError
from pld_core.layout import BOOTSTRAP, PER_ITERATION, PER_TASK, Layout, base_ref, output_dir
from pld_core.stage import no_data_reason
from pld_core.versions import version_record
from flows.stages import call_stage


def mlflow_setup(params: Params, root: Path):
    """The MLflow client of ``params.mlflow`` (tracking store, experiment, artifact dir under ``root``)."""
    m = params.mlflow
    return lineage.setup(m.tracking_uri, m.experiment, m.artifact_dir, root=root)


def run_stage_logged(name: str, params: Params, root: str, k: int = 0, task_index: int | None = None,
                     parent_run_id: str | None = None) -> dict:
    """One stage inside a nested MLflow run (usable from any worker: threads, Dask or Ray processes)."""
    os.chdir(root)  # Dask/Ray workers may start elsewhere
    mlflow_setup(params, Path(root))
    import mlflow

    label = name if task_index is None else f"{name}[{params.env.suite}-{task_index}]"
    tags = {"pld.stage": name, "pld.iteration": str(k), "pld.profile": params.profile}
    if task_index is not None:
        tags["pld.task"] = f"{params.env.suite}/{task_index}"
    t0 = time.time()
    with mlflow.start_run(run_name=label, nested=parent_run_id is not None, parent_run_id=parent_run_id, tags=tags) as r:
        manifest = call_stage(name, params, k=k, task=task_index)
        mlflow.set_tags({"pld.skipped": str(manifest.get("skipped", False)), "pld.output_digest": manifest.get("output_digest") or ""})
        reason = no_data_reason(manifest)
        if reason:
            mlflow.set_tags({"pld.no_data": "true", "pld.no_data_reason": reason[:5000]})
        lineage.log_metrics({k2: v for k2, v in (manifest.get("metrics") or {}).items()})
        lineage.log_metrics({"stage_seconds": time.time() - t0})
    manifest["run_id"] = r.info.run_id
    manifest["wall_seconds"] = time.time() - t0
    return manifest


def retry_on_crash(task, task_run, state) -> bool:
    """Retries are for crashes (a killed worker, a flaky file system), not for a PLDError a stage raises on
    purpose (bad input, nothing to learn from): rerunning it gives the same error."""
    try:
        state.result()
    except PLDError:
        return False
    except BaseException:
        pass
    return True


@task(name="stage", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2, retry_condition_fn=retry_on_crash,
      task_run_name="{name}-it{k}-task{task_index}")
def stage(name: str, params: Params, root: str, k: int = 0, task_index: int | None = None, parent_run_id: str | None = None) -> dict:
    return run_stage_logged(name, params, root, k, task_index, parent_run_id)


def make_task_runner(params: Params):
    f = params.flywheel
    if f.task_runner in ("sequential", "threads"):
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=1 if f.task_runner == "sequential" else f.max_workers)
    if f.task_runner == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise PLDError("flywheel.task_runner is 'dask' but prefect-dask is not installed. Fix: pip install prefect-dask") from None
        address = os.environ.get("PLD_DASK_ADDRESS")
        if address:
            return DaskTaskRunner(address=address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": f.max_workers, "threads_per_worker": 1, "processes": True,
                                              "dashboard_address": None, "host": "127.0.0.1"})
    if f.task_runner == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError:
            raise PLDError("flywheel.task_runner is 'ray' but prefect-ray is not installed. Fix: pip install prefect-ray") from None
        return RayTaskRunner(address=os.environ.get("PLD_RAY_ADDRESS"))
    raise PLDError(f"unknown flywheel.task_runner '{f.task_runner}'")


def _result(future) -> dict:
    """A stage future's manifest; a failed stage raises its own exception (its one-line PLDError), not the
    Prefect 'NotReady'/'PENDING' state that the stages waiting on it end in."""
    future.wait()
    state = future.state
    if not state.is_completed():
        exc = state.result(raise_on_failure=False)
        if isinstance(exc, BaseException):
            raise exc
        raise RuntimeError(f"stage run ended in state {state.type.value}: {state.message}")
    return future.result()


def _iteration_body(params: Params, root: str, k: int, parent_run_id: str | None) -> dict:
    """Per-task chains fanned out through the flow's task runner, then the distill chain. A task whose base
    or specialist never succeeded finishes its chain with no-data manifests and is left out of the distill."""
    chains: dict[int, list] = {}
    for t in params.env.tasks:
        prev, chain = None, []
        for name in PER_TASK:
            prev = stage.submit(name, params, root, k, t, parent_run_id, wait_for=[prev] if prev is not None else None)
            chain.append(prev)
        chains[t] = chain
    # chain order: the first failed stage of a chain, not the stages it left waiting
    done = {t: {name: _result(f) for name, f in zip(PER_TASK, chain)} for t, chain in chains.items()}
    specialists, per_task = [], {}
    for t, ms in done.items():
        res, pld = ms["train_residual"], ms["collect_pld"]
        reason = no_data_reason(pld)
        if no_data_reason(res) is None:
            specialists.append(res["run_id"])
        per_task[t] = {**(res.get("metrics") or {}), "pld_episodes": int((pld.get("metrics") or {}).get("episodes", 0)),
                       "no_data": reason is not None, **({"reason": reason} if reason else {})}
    without = {t: m["reason"] for t, m in per_task.items() if m["no_data"]}
    if without:
        print(f"iteration {k}: no PLD data from " + "; ".join(f"{params.env.suite} task {t} ({r})" for t, r in without.items()))
    out = {"specialist_runs": specialists, "specialists": per_task, "tasks_without_data": without}
    for name in PER_ITERATION:
        out[name] = _result(stage.submit(name, params, root, k, None, parent_run_id))
    return out


@flow(name="pld-iteration", log_prints=True)
def iteration_flow(params: Params, k: int, root: str | None = None) -> dict:
    """Base vK -> base vK+1, registered in MLflow with its lineage."""
    root = root or os.getcwd()
    client = mlflow_setup(params, Path(root))
    import mlflow

    with mlflow.start_run(run_name=f"iteration-{k}", tags={"pld.iteration": str(k), "pld.profile": params.profile}) as parent:
        lineage.log_metrics({"iteration": k})
        out = _iteration_body(params, root, k, parent.info.run_id)
        layout = Layout.of(params, Path(root))
        rate = out["evaluate"]["metrics"]["success_rate"]
        mlflow.log_metric("base_success_rate", rate)
        without = {f"{params.env.suite}/{t}": r for t, r in out["tasks_without_data"].items()}
        mlflow.set_tags({"pld.tasks_without_data": json.dumps(without)[:5000]})
        mlflow.log_dict({"tasks": {f"{params.env.suite}/{t}": m for t, m in out["specialists"].items()}}, "iteration_tasks.json")
        lineage.log_dataset_input(layout.dataset(k), f"pld_dataset_it{k}", out["augment_quantiles"]["output_digest"], "sft",
                                  tags={"base_version": str(k), "tasks_without_data": json.dumps(without)[:250]})
        record = version_record(params, layout, k + 1)
        mlflow.log_dict(record, "version.json")
        version = lineage.register_base(
            client, params.mlflow.model_name, k + 1, Path(base_ref(params, layout, k + 1).spec), parent.info.run_id, parent=k,
            dataset_digest=out["augment_quantiles"]["output_digest"], specialist_runs=out["specialist_runs"], success_rate=rate,
            tasks_without_data=without, record=record)
        out["registered_version"] = version
    return out


@flow(name="pld-bootstrap", log_prints=True)
def bootstrap_flow(params: Params, root: str | None = None) -> dict:
    """Base v0: the user's checkpoint, or a LeRobot policy trained on scripted demos; evaluated and registered."""
    root = root or os.getcwd()
    client = mlflow_setup(params, Path(root))
    import mlflow

    layout = Layout.of(params, Path(root))
    with mlflow.start_run(run_name="base-v0", tags={"pld.iteration": "bootstrap", "pld.profile": params.profile}) as parent:
        out = {}
        names = ("base_v0", "evaluate_v0") if params.base.path else BOOTSTRAP  # a user's base needs no demos
        for name in names:
            out[name] = _result(stage.submit(name, params, root, 0, None, parent.info.run_id))
        rate = out["evaluate_v0"]["metrics"]["success_rate"]
        mlflow.log_metric("base_success_rate", rate)
        digest = out["base_v0_dataset"]["output_digest"] if "base_v0_dataset" in out else None
        if digest:
            lineage.log_dataset_input(output_dir("base_v0_dataset", layout, params), "demos_dataset", digest, "training")
        ckpt = Path(base_ref(params, layout, 0).spec)
        if not ckpt.is_dir():  # a hub id or a scripted controller: register the adopted spec (base.json)
            ckpt = layout.base(0)
        record = version_record(params, layout, 0)
        mlflow.log_dict(record, "version.json")
        if ckpt.is_dir():
            out["registered_version"] = lineage.register_base(client, params.mlflow.model_name, 0, ckpt, parent.info.run_id,
                                                              parent=None, dataset_digest=digest, specialist_runs=[], success_rate=rate,
                                                              record=record)
    return out


def flywheel(params: Params, iterations: int | None = None, root: str | None = None) -> dict:
    """The loop over base versions, each piece a Prefect flow run on the configured task runner."""
    root = root or os.getcwd()
    runner = make_task_runner(params)
    boot = bootstrap_flow.with_options(task_runner=runner)(params, root)
    results = {"bootstrap": boot, "iterations": []}
    target = params.flywheel.target_success
    for k in range(iterations or params.flywheel.iterations):
        out = iteration_flow.with_options(task_runner=make_task_runner(params))(params, k, root)
        results["iterations"].append(out)
        rate = out["evaluate"]["metrics"]["success_rate"]
        if target is not None and rate >= target:
            print(f"base v{k + 1} reached flywheel.target_success ({rate:.3f} >= {target}): no further iterations")
            results["stopped_at_target"] = k + 1
            break
    return results
