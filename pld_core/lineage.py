"""MLflow lineage: runs per iteration/stage/task, and base versions as versions of one registered model.

Each registered version of ``mlflow.model_name`` is one base policy (v0, v1, ...), tagged with
``pld_version`` (0, 1, ...), ``parent_version`` (the base it was fine-tuned from), ``dataset_digest``
(the PLD dataset it was distilled from), ``specialist_runs`` (MLflow run ids of the residual
specialists whose data made it), ``success_rate`` and ``checkpoint`` (the pretrained_model dir).
Aliases: ``newest`` on the newest version, ``best`` on the one with the highest success rate.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from pathlib import Path

from pld_core.errors import PLDError


def _mlflow():
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    import mlflow

    return mlflow


def resolve_uri(uri: str, root: Path | None = None) -> str:
    """Make relative sqlite paths absolute (relative to ``root``) and create their directory."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel = uri[len("sqlite:///"):]
        path = (Path(root or ".") / rel).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    return uri


def setup(tracking_uri: str, experiment: str, artifact_dir: str | None = None, root: Path | None = None):
    """Point MLflow at the store and make sure the experiment exists. Fails fast if unreachable."""
    mlflow = _mlflow()
    uri = resolve_uri(tracking_uri, root)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    try:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            loc = None
            if artifact_dir:
                loc = (Path(root or ".") / artifact_dir).resolve().as_uri()
            client.create_experiment(experiment, artifact_location=loc)
    except Exception as e:  # MlflowException, connection errors
        raise PLDError(f"MLflow tracking URI '{tracking_uri}' is unreachable or unusable ({type(e).__name__}: {str(e)[:200]}). "
                       f"Fix: set mlflow.tracking_uri in params.yaml to a reachable server or a sqlite:/// path") from None
    mlflow.set_experiment(experiment)
    return client


@contextlib.contextmanager
def run(name: str, nested: bool = False, tags: dict | None = None, params: dict | None = None):
    mlflow = _mlflow()
    with mlflow.start_run(run_name=name, nested=nested, tags=tags) as r:
        if params:
            mlflow.log_params({k: str(v)[:500] for k, v in _flatten(params).items()})
        yield r


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def log_metrics(metrics: dict, step: int | None = None) -> None:
    """Log the numeric entries of ``metrics`` (finite, not bool; nested dicts as ``a.b``) to the active MLflow run,
    if the caller started one. Never imports MLflow or starts a run: a stage run outside a flow logs nothing."""
    mlflow = sys.modules.get("mlflow")  # no run can be active if mlflow was never imported
    if mlflow is None or mlflow.active_run() is None:
        return
    clean = {k: float(v) for k, v in _flatten(metrics).items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    if clean:
        mlflow.log_metrics(clean, step=None if step is None else int(step))


def register_base(client, model_name: str, version: int, checkpoint: Path, run_id: str, parent: int | None,
                  dataset_digest: str | None, specialist_runs: list[str], success_rate: float | None,
                  tasks_without_data: dict[str, str] | None = None, record: dict | None = None) -> str:
    """Register base ``v<version>``; idempotent: a registry version with the same pld_version *and* the
    same checkpoint content (its stage manifest's output digest) is reused. A rebuilt base (new params,
    new data) gets a new registry version, and :func:`lineage` reads the newest one per pld_version."""
    with contextlib.suppress(Exception):
        client.create_registered_model(model_name, description="PLD flywheel base policies (one version per flywheel iteration)")
    digest = checkpoint_digest(Path(checkpoint))
    for mv in client.search_model_versions(f"name='{model_name}'"):
        if mv.tags.get("pld_version") == str(version) and mv.tags.get("base_digest", "") == (digest or ""):
            return mv.version
    artifact_path = f"base_v{version}"
    client.log_artifacts(run_id, str(checkpoint), artifact_path)
    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    tags = {
        "pld_version": str(version),
        "parent_version": "" if parent is None else str(parent),
        "dataset_digest": dataset_digest or "",
        "specialist_runs": ",".join(specialist_runs),
        "success_rate": "" if success_rate is None else f"{success_rate:.4f}",
        "checkpoint": str(Path(checkpoint).resolve()),
        "base_digest": digest or "",
        # the tasks that added no PLD data to this version, with the reason (a base or specialist that never succeeded)
        "tasks_without_data": json.dumps(tasks_without_data or {}, sort_keys=True)[:5000],
        **record_tags(record),
    }
    mv = client.create_model_version(model_name, source=source, run_id=run_id, tags=tags,
                                     description=f"base v{version}" + (f", fine-tuned from v{parent}" if parent is not None else ""))
    update_aliases(client, model_name)
    return mv.version


def log_dataset_input(path: Path, name: str, digest: str | None, context: str, tags: dict[str, str] | None = None) -> None:
    """A dataset as an input of the active MLflow run (the UI lists it under the run's datasets): its name,
    the digest of the stage that built it, and its local path as the source."""
    import warnings

    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # a local path "can be interpreted in multiple ways": all of them local
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(str(Path(path).resolve()))
    ds = MetaDataset(source=source, name=name, digest=(digest or "")[:36] or None)
    mlflow.log_input(ds, context=context, tags=tags)


def record_tags(record: dict | None) -> dict[str, str]:
    """A version's record (:func:`pld_core.versions.version_record`) as registry tags the MLflow UI lists:
    the mean's 95% CI, success per task with its CI, and for a version an iteration made, the PLD episodes
    kept and each specialist's final success per task, and the iteration's compute seconds."""
    if not record:
        return {}
    tags = {"mean_ci95": json.dumps(record["mean_ci95"]),
            "per_task_success": json.dumps({t: [s["success_rate"], *s["ci95"]] for t, s in record["per_task"].items()}),
            "compute_seconds": str(record.get("compute_seconds"))}
    if "tasks" in record:
        tags["pld_episodes"] = json.dumps({t: r["pld_episodes_kept"] for t, r in record["tasks"].items()})
        tags["specialist_final_success"] = json.dumps({t: r["specialist_final_success_rate"] for t, r in record["tasks"].items()})
    return {k: v[:5000] for k, v in tags.items()}


def checkpoint_digest(checkpoint: Path) -> str | None:
    """The output digest of the stage that made ``checkpoint`` (its dir or the parent's manifest)."""
    from pld_core.artifacts import read_manifest

    for d in (checkpoint, checkpoint.parent):
        with contextlib.suppress(PLDError):  # an unreadable manifest identifies nothing
            m = read_manifest(d)
            if m is not None:
                return m.get("output_digest")
    return None


def _current(versions) -> list:
    """The newest registry version of each pld_version (a rebuilt base supersedes the older entry)."""
    latest: dict[str, object] = {}
    for v in versions:
        key = v.tags.get("pld_version", "-1")
        if key not in latest or int(v.version) > int(latest[key].version):
            latest[key] = v
    return list(latest.values())


def update_aliases(client, model_name: str) -> None:
    versions = _current(client.search_model_versions(f"name='{model_name}'"))
    if not versions:
        return
    newest = max(versions, key=lambda v: int(v.tags.get("pld_version", -1)))
    client.set_registered_model_alias(model_name, "newest", newest.version)
    rated = [v for v in versions if v.tags.get("success_rate")]
    if rated:
        best = max(rated, key=lambda v: (float(v.tags["success_rate"]), int(v.tags.get("pld_version", -1))))
        client.set_registered_model_alias(model_name, "best", best.version)


def lineage(client, model_name: str) -> list[dict]:
    """The registered base versions, oldest first."""
    try:
        versions = _current(client.search_model_versions(f"name='{model_name}'"))
    except Exception:
        return []
    rows = []
    for v in versions:
        t = v.tags
        rows.append({
            "version": int(t.get("pld_version", -1)),
            "parent": int(t["parent_version"]) if t.get("parent_version") else None,
            "dataset_digest": t.get("dataset_digest") or None,
            "success_rate": float(t["success_rate"]) if t.get("success_rate") else None,
            "specialist_runs": [r for r in t.get("specialist_runs", "").split(",") if r],
            "tasks_without_data": json.loads(t.get("tasks_without_data") or "{}"),
            "mean_ci95": json.loads(t["mean_ci95"]) if t.get("mean_ci95") else None,
            "pld_episodes": json.loads(t["pld_episodes"]) if t.get("pld_episodes") else None,
            "specialist_final_success": json.loads(t["specialist_final_success"]) if t.get("specialist_final_success") else None,
            "registry_version": int(v.version),
            "checkpoint": t.get("checkpoint"),
            "run_id": v.run_id,
        })
    return sorted(rows, key=lambda r: r["version"])


# ----------------------------------------------------------------------------- logging from inside a stage
def mlflow_artifacts(paths: list[Path], artifact_path: str | None = None) -> None:
    mlflow = sys.modules.get("mlflow")
    if mlflow is None or mlflow.active_run() is None:
        return
    for p in paths:
        if Path(p).exists():
            mlflow.log_artifact(str(p), artifact_path=artifact_path)
