"""What each base version is, read back from the data dir: its success per task (with 95% CIs) and, for
a version made by an iteration, what that iteration did per task (offline successes, the specialist's
success before and after training, PLD episodes kept) and what each of its stages cost.

The flows attach a version's record to its MLflow registry entry; the report writes all of them as
``figures/versions.json``. Everything here reads stage manifests and evaluation reports; nothing runs.
"""

from __future__ import annotations

import json
from pathlib import Path

from pld_core.artifacts import MANIFEST, read_manifest
from pld_core.layout import Layout

BOOTSTRAP_DIRS = ("demos", "demos_dataset_raw", "demos_dataset", "base_v0", "base_v0_eval")


def _metrics(out_dir: Path) -> dict | None:
    m = read_manifest(out_dir)
    return None if m is None else (m.get("metrics") or {})


def _stage_seconds(root: Path, dirs: list[Path]) -> dict[str, float]:
    """Compute seconds per stage output dir (relative to the data dir), for the dirs that hold a manifest."""
    out = {}
    for d in dirs:
        m = read_manifest(d)
        if m is not None and m.get("compute_seconds") is not None:
            out[str(d.relative_to(root))] = round(float(m["compute_seconds"]), 1)
    return out


def _iteration_dirs(layout: Layout, k: int) -> list[Path]:
    """Every stage output dir of iteration ``k`` (a stage dir holds a manifest; its subfolders do not count)."""
    it = layout.iteration(k)
    if not it.is_dir():
        return []
    dirs = sorted({f.parent for f in it.rglob(MANIFEST)})
    return [d for d in dirs if not any(p in dirs for p in d.parents)]


def task_record(params, layout: Layout, k: int, task: int) -> dict:
    """What iteration ``k`` did for one task; fields are None where the stage has not run."""
    suite = params.env.suite
    off = _metrics(layout.offline(k, suite, task)) or {}
    res = _metrics(layout.residual(k, suite, task)) or {}
    pld = _metrics(layout.pld(k, suite, task)) or {}
    reason = next((m["reason"] for m in (off, res, pld) if m.get("no_data")), None)
    return {
        "offline_successes": off.get("successes"),
        "offline_episodes": off.get("episodes"),
        "specialist_base_success_rate": res.get("base_success_rate"),
        "specialist_final_success_rate": res.get("final_success_rate"),
        "specialist_final_ci95": res.get("ci95"),
        "specialist_env_steps": res.get("env_steps"),
        "pld_episodes_kept": pld.get("episodes"),
        "pld_attempts": pld.get("attempts"),
        "hybrid_success_rate": pld.get("hybrid_success_rate"),
        "no_data": reason is not None,
        "reason": reason,
    }


def version_record(params, layout: Layout, v: int) -> dict | None:
    """Base ``v``'s record, or None if it has not been evaluated."""
    f = layout.base_eval(v) / "eval.json"
    if not f.is_file():
        return None
    rep = json.loads(f.read_text())
    rec = {
        "version": v,
        "parent": v - 1 if v > 0 else None,
        "mean": rep["mean"],
        "mean_ci95": rep["mean_ci95"],
        "per_task": {t: {"success_rate": s["success_rate"], "ci95": s["ci95"], "episodes": s["episodes"]}
                     for t, s in rep["tasks"].items()},
    }
    if v == 0:
        rec["stage_seconds"] = _stage_seconds(layout.root, [layout.root / d for d in BOOTSTRAP_DIRS])
    else:
        k = v - 1
        rec["tasks"] = {f"{params.env.suite}/{t}": task_record(params, layout, k, t) for t in params.env.tasks}
        data = _metrics(layout.dataset_raw(k)) or {}
        rec["sft_dataset"] = {"episodes": data.get("episodes"), "frames": data.get("frames")}
        rec["stage_seconds"] = _stage_seconds(layout.root, _iteration_dirs(layout, k))
    rec["compute_seconds"] = round(sum(rec["stage_seconds"].values()), 1)
    return rec


def versions_report(params, layout: Layout) -> dict:
    """Every evaluated base version under the data dir, oldest first."""
    versions = []
    v = 0
    while True:
        rec = version_record(params, layout, v)
        if rec is None:
            break
        versions.append(rec)
        v += 1
    return {"suite": params.env.suite, "tasks": list(params.env.tasks), "versions": versions}
