"""Stage `sft`: fine-tune the current base on the PLD dataset with LeRobot's trainer (or, for base
v0 of the embedded default, train a new base from a policy config on the scripted demos)."""

from __future__ import annotations

import json
from pathlib import Path

from pld_core.config import Params
from pld_core.dataset import push_to_hub
from pld_core.layout import BaseRef
from pld_core.sft import sft
from pld_core.stage import input_digests, run_stage


def run(params: Params, out_dir: Path, dataset_dir: Path, init: BaseRef | dict,
        steps: int | None = None, batch_size: int | None = None, lr: float | None = None, repo_id: str = "local/pld",
        force: bool = False) -> dict:
    """``init``: the current base (a LeRobot checkpoint: fine-tune it) or a policy config dict (train a new base)."""
    s = params.sft
    steps, batch_size, lr = steps or s.steps, batch_size or s.batch_size, lr if lr is not None else s.lr
    used = {"steps": steps, "batch_size": batch_size, "lr": lr, "lora": s.lora, "device": params.device,
            "seed": params.flywheel.seed, "init": init if isinstance(init, dict) else None, "hub": params.hub.model_repo if params.hub.push else None}
    inputs = {**input_digests(dataset=dataset_dir), "base": None if isinstance(init, dict) else init.digest}

    def build(tmp: Path) -> dict:
        import shutil

        work = Path(out_dir).parent / f".sft-work-{Path(out_dir).name}"  # LeRobot's run dir: survives a kill, resumes
        ckpt = sft(Path(dataset_dir) / "dataset", repo_id, work, init if isinstance(init, dict) else init.spec, steps=steps, batch_size=batch_size, lr=lr,
                   seed=params.flywheel.seed, lora=s.lora, device=params.device, num_threads=1)
        shutil.copytree(ckpt, tmp / "pretrained_model")
        metrics = {"steps": steps}
        report = Path(work) / "sft_info.json"
        if report.exists():
            metrics.update({k: v for k, v in json.loads(report.read_text()).items() if isinstance(v, (int, float))})
        if params.hub.push and params.hub.model_repo:
            metrics["hub_url"] = str(push_to_hub(tmp / "pretrained_model", params.hub.model_repo, kind="model"))
        shutil.rmtree(work, ignore_errors=True)
        return metrics

    return run_stage("sft", out_dir, used, inputs, build, force=force)
