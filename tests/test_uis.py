"""The lineage and the runs where a user looks at them: the MLflow UI and the Prefect UI, served as a user serves
them (`mlflow server`, `prefect server start`) and opened in a headless Chromium. The screenshots beside the
README (docs/mlflow-lineage.png, docs/prefect-runs.png) are these tests' own, made with PLD_SCREENSHOTS=docs."""

from __future__ import annotations

import json

from harness import VENV_BIN, chromium, free_port, process, screenshot, unfold, wait_for_text, wait_http


def test_the_mlflow_ui_shows_v1_with_its_parent_dataset_and_success(smoke_run, tmp_path):
    tmp = smoke_run[0]
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    v1 = next(v for v in client.search_model_versions("name='pld-base'") if v.tags["pld_version"] == "1")
    digest = json.loads((tmp / "data/iter_0/pld_dataset/manifest.json").read_text())["output_digest"]
    port = free_port()
    cmd = [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
           "--default-artifact-root", str(tmp / "mlartifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with process(cmd, tmp_path / "mlflow.log") as proc:
        wait_http(f"http://127.0.0.1:{port}/health", 180, proc, tmp_path / "mlflow.log")
        driver = chromium()
        try:
            driver.get(f"http://127.0.0.1:{port}/#/models/pld-base/versions/{v1.version}")
            body = wait_for_text(driver, ["parent_version", "dataset_digest", digest, "success_rate", v1.tags["success_rate"],
                                          "iteration-0"])  # the tags, and the run that produced the version
            # the parent's value sits in the tags table row after its key
            rows = [line for line in body.splitlines() if line.strip()]
            assert rows[rows.index("parent_version") + 1] == "0", rows
            unfold(driver, "parent_version")  # the tags table scrolls: show every tag
            driver.set_window_size(1600, 1700)
            screenshot(driver, "mlflow-lineage.png", tmp_path)
            # the producing run lists the PLD dataset as its input
            driver.get(f"http://127.0.0.1:{port}/#/experiments/{client.get_run(v1.run_id).info.experiment_id}/runs/{v1.run_id}")
            wait_for_text(driver, ["pld_dataset_it0"])
        finally:
            driver.quit()


def test_the_prefect_ui_lists_the_flywheel_runs(served, served_run, tmp_path):
    driver = chromium()
    try:
        driver.get(f"{served['url']}/runs")
        wait_for_text(driver, ["pld-flywheel", "pld-iteration", "pld-bootstrap"])
        driver.set_window_size(1600, 1500)  # the list below the chart
        screenshot(driver, "prefect-runs.png", tmp_path)
        driver.get(f"{served['url']}/runs/flow-run/{served_run[1]['id']}")
        wait_for_text(driver, ["Completed"])
    finally:
        driver.quit()
