"""Stage `augment_quantiles`: the converted dataset plus q01..q99 per feature in meta/stats.json
(pi0.5's quantile normalization needs them), computed locally; published to the hub only if asked."""

from __future__ import annotations

import shutil
from pathlib import Path

from pld_core.config import Params
from pld_core.dataset import augment_quantiles, push_to_hub
from pld_core.stage import input_digests, run_stage


def run(params: Params, out_dir: Path, raw_dir: Path, repo_id: str = "local/pld", force: bool = False) -> dict:
    used = {"hub_push": params.hub.push, "dataset_repo": params.hub.dataset_repo}

    def build(tmp: Path) -> dict:
        root = tmp / "dataset"
        shutil.copytree(Path(raw_dir) / "dataset", root)
        summary = augment_quantiles(root, repo_id=repo_id)
        if params.hub.push and params.hub.dataset_repo:
            summary["hub_url"] = str(push_to_hub(root, params.hub.dataset_repo, kind="dataset"))
        return summary

    return run_stage("augment_quantiles", out_dir, used, input_digests(raw=raw_dir), build, force=force)
