"""A scheduled flywheel on a real Prefect server, run the way the README tells a user to:

    prefect server start --host 127.0.0.1 --port P        (PREFECT_HOME in a temp dir)
    export PREFECT_API_URL=http://127.0.0.1:P/api
    pld serve --cron "0 3 * * *"                           (registers the deployment and serves it)
    prefect deployment run pld-flywheel/pld-flywheel       (a run now, besides the schedule)

and read back through the server's REST API: the flow run, its subflow runs and every stage's task run. Then
what a user expects of a scheduled run: one that starts while another flywheel holds the data dir ends
Cancelled with the holder in its message; a stage that fails on bad input fails the run with the stage's
one-line error in the run's logs and is not retried; a stage that crashes is retried once (its task's policy)."""

from __future__ import annotations

from harness import api, trigger, wait_final, wait_logs

from pld_core.layout import PER_ITERATION, PER_TASK


def _subflow_runs(server: dict, run_id: str) -> list[dict]:
    parents = [t["id"] for t in api(server, "POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})]
    return api(server, "POST", "/flow_runs/filter", {"flow_runs": {"parent_task_run_id": {"any_": parents}}}) if parents else []


def _task_runs(server: dict, flow_run_ids: list[str]) -> list[dict]:
    return api(server, "POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": flow_run_ids}}, "limit": 200})


def test_a_scheduled_run_completes_and_the_server_lists_every_stage(served, served_run):
    proj, run, seconds = served_run
    dep = served["deployment"]
    assert [s["schedule"].get("cron") for s in dep["schedules"]] == ["0 3 * * *"], dep["schedules"]
    assert dep["parameters"]["params_path"] == "params.yaml" and dep["parameters"]["root"] == str(proj)
    assert run["deployment_id"] == dep["id"]
    subflows = _subflow_runs(served, run["id"])
    flow_names = {api(served, "GET", f"/flows/{f['flow_id']}")["name"]: f["state_type"] for f in subflows}
    assert flow_names == {"pld-bootstrap": "COMPLETED", "pld-iteration": "COMPLETED"}, flow_names
    tasks = _task_runs(served, [f["id"] for f in subflows])
    got = {t["name"]: t["state_type"] for t in tasks}
    # base v0 is the scripted base, adopted (no demonstrations to train it from)
    want = {f"{s}-it0-taskNone" for s in ("base_v0", "evaluate_v0", *PER_ITERATION)} | {f"{s}-it0-task{t}" for s in PER_TASK for t in (0, 1)}
    assert got == dict.fromkeys(want, "COMPLETED"), got
    assert all(t["empirical_policy"]["retries"] == 1 for t in tasks)  # each stage: once more after a crash
    # the run did the flywheel's work in the project's data dir: base v1 registered, figures drawn
    assert (proj / "data/iter_0/eval/manifest.json").is_file() and (proj / "data/figures/success_over_versions.png").is_file()
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{proj / 'mlflow.db'}")
    assert {v.tags["pld_version"] for v in client.search_model_versions("name='pld-base'")} == {"0", "1"}
    assert any("registered base versions" in m for m in wait_logs(served, run["id"], "registered base versions"))


def test_a_run_while_another_flywheel_holds_the_data_dir_ends_cancelled(served):
    from pld_core.locking import data_lock

    with data_lock(served["proj"] / "data"):  # another flywheel at work (this process)
        run = wait_final(served, trigger(served), timeout=600)
    assert run["state_type"] == "CANCELLED", run["state"]
    assert "is in use by another flywheel" in run["state"]["message"] and "Fix:" in run["state"]["message"], run["state"]
    assert run["run_count"] == 1 and _subflow_runs(served, run["id"]) == []  # nothing started, nothing retried


def test_a_failed_stage_fails_the_run_with_its_one_line_error_and_no_retry(served):
    run = wait_final(served, trigger(served, "params_path=broken.yaml"), timeout=900)
    assert run["state_type"] == "FAILED", run["state"]
    line = "no config.json, so it is not a LeRobot checkpoint"
    assert line in run["state"]["message"] and "\n" not in run["state"]["message"], run["state"]
    logs = wait_logs(served, run["id"], line)  # the run's own logs: the stage's error on one line
    assert any(line in m and m.count("\n") == 0 for m in logs), logs
    assert run["run_count"] == 1  # a deliberate error is not retried: the same input gives the same error
    boot = _subflow_runs(served, run["id"])
    failed = [t for t in _task_runs(served, [f["id"] for f in boot]) if t["state_type"] == "FAILED"]
    assert [t["name"] for t in failed] == ["evaluate_v0-it0-taskNone"] and failed[0]["run_count"] == 1, failed
