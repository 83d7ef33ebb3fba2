"""Stage `base_v0` when ``base.steps`` is 0: base v0 is ``base.policy`` at initialisation, with the demos'
features and normalization statistics, trained on nothing. A plumbing check for a base too large to train here
(profile ``pi05-tiny``: a random pi0.5); with ``base.tokenizer: stand-in`` its tokenizer is built from the
suite's instructions and kept in the checkpoint (``pretrained_model/tokenizer``)."""

from __future__ import annotations

from pathlib import Path

from pld_core.config import Params
from pld_core.stage import input_digests, run_stage

STAND_IN = "stand-in"


def run(params: Params, out_dir: Path, dataset_dir: Path, force: bool = False) -> dict:
    b = params.base
    used = {"policy": dict(b.policy), "steps": 0, "tokenizer": b.tokenizer, "device": params.device,
            "suite": params.env.suite if b.tokenizer == STAND_IN else None}

    def build(tmp: Path) -> dict:
        import time

        from pld_core.env import task_names
        from pld_core.pi05 import stand_in_tokenizer
        from pld_core.sft import init_policy

        t0 = time.perf_counter()
        tokenizer, tokenizer_as = b.tokenizer, None
        if b.tokenizer == STAND_IN:
            tokenizer = stand_in_tokenizer(task_names(params.env.suite), tmp / "pretrained_model" / "tokenizer")
            tokenizer_as = Path(out_dir).resolve() / "pretrained_model" / "tokenizer"
        ckpt = init_policy(Path(dataset_dir) / "dataset", dict(b.policy), tmp, tokenizer=tokenizer,
                           tokenizer_as=tokenizer_as, device=params.device)
        n = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
        return {"steps": 0, "checkpoint_mb": round(n / 2**20, 1), "init_s": round(time.perf_counter() - t0, 2)}

    return run_stage("base_v0", out_dir, used, input_digests(dataset=dataset_dir), build, force=force)
