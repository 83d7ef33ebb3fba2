"""``pld bench specialist``: one task's specialist, from scratch (offline -> Cal-QL -> residual SAC), as a number.

Runs the three Probe stages (``tasks.collect_offline``, ``tasks.pretrain_critic``, ``tasks.train_residual``) into a
bench directory and returns steps-to-95%, the final success rate with its CI, the curve and the stage times.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pld_core.artifacts import write_json_atomic
from pld_core.config import Params, validate_params
from pld_core.env import check_task
from pld_core.errors import PLDError
from pld_core.layout import BaseRef
from pld_core.stage import no_data_reason
from tasks import collect_offline, pretrain_critic, train_residual


def bench_specialist(params: Params, suite: str, task: int, ablation: str = "none", out_dir: Path = Path("bench/results/specialist"),
                     base: str | None = None, show_progress: bool = True) -> dict:
    """Train one specialist (offline -> Cal-QL -> residual SAC) and return the benchmark fields.

    ``out_dir/offline`` and ``out_dir/critic_init`` do not depend on the ablation, so runs of
    several ablations into the same ``out_dir`` share them; each trains ``out_dir/residual-<ablation>``.
    ``base`` defaults to ``params.base.path``. Also writes ``out_dir/bench-<ablation>.json``.
    """
    raw = params.model_dump()
    raw["env"]["suite"] = suite
    raw["env"]["tasks"] = [int(task)]
    raw["residual"]["ablation"] = ablation
    raw["residual"]["final_eval_episodes"] = None  # the bench's number: evaluate.episodes (50) initial states
    params = validate_params(raw, source="bench specialist")
    check_task(suite, task)
    base = base or params.base.path
    if not base:
        raise PLDError("bench specialist: no base policy. Fix: set base.path in params.yaml (a LeRobot checkpoint dir, "
                       "or 'scripted:noise=0.5' as a stand-in), e.g. --set base.path=data/iter_0/base")
    out_dir = Path(out_dir)
    t0 = time.time()
    offline_dir, critic_dir = out_dir / "offline", out_dir / "critic_init"
    ref = BaseRef.of(base)
    off = collect_offline.run(params, offline_dir, ref, task, show_progress=show_progress)
    reason = no_data_reason(off)
    if reason:
        raise PLDError(f"bench specialist: {suite} task {task}: {reason}; there is nothing to train a specialist from. "
                       "Fix: raise offline.max_episodes (--set offline.max_episodes=200) or use a base that sometimes succeeds")
    crit = pretrain_critic.run(params, critic_dir, offline_dir, show_progress=show_progress) if ablation != "no_calql" else None
    res = train_residual.run(params, out_dir / f"residual-{ablation}", ref, offline_dir, critic_dir if crit else None, show_progress=show_progress)
    m = res["metrics"]
    curve = json.loads((out_dir / f"residual-{ablation}" / "curve.json").read_text())["points"]
    result = {
        "suite": suite, "task": int(task), "ablation": ablation, "base": base,
        "steps_to_95": m["steps_to_95"], "final_success_rate": m["final_success_rate"], "ci95": m["ci95"],
        "env_steps": m["env_steps"], "stopped_early": m.get("stopped_early", False), "base_success_rate": m["base_success_rate"],
        "offline_base_success_rate": off["metrics"]["base_success_rate"],
        "env_steps_per_s": m["env_steps_per_s"],
        "curve": [{k: p[k] for k in ("env_steps", "success_rate", "ci95", "episodes")} for p in curve],
        "seconds": round(time.time() - t0, 1),
        "stage_seconds": {"collect_offline": off["metrics"]["seconds"], "pretrain_critic": crit["metrics"]["seconds"] if crit else 0.0,
                          "train_residual": m["seconds"]},
        "out_dir": str(out_dir / f"residual-{ablation}"),
    }
    write_json_atomic(out_dir / f"bench-{ablation}.json", result)
    return result
