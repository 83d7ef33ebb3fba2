"""Stage `evaluate`: a base version's success per task on fixed initial states (Wilson CIs)."""

from __future__ import annotations

import json
from pathlib import Path

from pld_core.config import Params
from pld_core.layout import BaseRef
from pld_core.evaluation import evaluate, format_report
from pld_core.policies import make_policy_factory, served_base
from pld_core.stage import run_stage


def run(params: Params, out_dir: Path, base: BaseRef, label: str = "", force: bool = False) -> dict:
    """Evaluate ``base`` on every task of ``env.tasks``; returns the manifest."""
    e = params.env
    used = {"env": params.section_dict("env"), "episodes": params.evaluate.episodes, "seed": params.flywheel.seed}

    def build(tmp: Path) -> dict:
        factory = make_policy_factory(base.spec, mode=e.mode, device=params.device, seed=params.flywheel.seed)
        report = evaluate(factory, e.suite, list(e.tasks), params.evaluate.episodes, mode=e.mode, max_objects=e.max_objects,
                          image_size=e.image_size, seed=params.flywheel.seed, workers=params.flywheel.collect_workers,
                          serve_base=served_base(params, factory))
        report["policy"] = base.spec
        report["label"] = label
        (tmp / "eval.json").write_text(json.dumps(report, indent=2))
        (tmp / "eval.txt").write_text(format_report(report) + "\n")
        return {"success_rate": report["mean"], "mean_ci95": report["mean_ci95"],
                "per_task": {k: v["success_rate"] for k, v in report["tasks"].items()}, "seconds": report["seconds"]}

    return run_stage("evaluate", out_dir, used, {"base": base.digest}, build, force=force)


def load_report(out_dir: Path) -> dict:
    return json.loads((Path(out_dir) / "eval.json").read_text())
