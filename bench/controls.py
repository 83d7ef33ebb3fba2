"""Controls that say whether a flywheel iteration's gain came from PLD data.

``sft_control``: the iteration's SFT with everything equal (init = base v``k``, steps, batch, lr,
seed, LoRA) except the dataset, which holds only the data base v0 was trained on (the scripted
demonstrations, ``base_v0_dataset``), then the same evaluation (same initial states and seeds). With
``sft.include_base_data: true`` base v``k+1`` saw the demonstrations *and* the PLD episodes, so
v``k+1`` minus this control is what the PLD episodes added.

Outputs are stages like any other (manifest last, skipped when their inputs are unchanged), under
``<data_dir>/controls/iter_<k>/``.
"""

from __future__ import annotations

import json

from pld_core.config import Params
from pld_core.errors import PLDError


def sft_control(params: Params, k: int = 0, log=print) -> dict:
    from pld_core.layout import BaseRef, Layout, base_ref, output_dir
    from tasks import evaluate, sft

    if params.base.path:
        raise PLDError("bench sft-control compares against the demonstrations base v0 was trained on; this profile adopts "
                       f"a base (base.path: {params.base.path}), which has none here. Fix: use the default profile")
    layout = Layout.of(params)
    ev = layout.base_eval(k + 1) / "eval.json"
    if not ev.exists():
        raise PLDError(f"{ev} not found: iteration {k} has not been evaluated. Fix: run `pld flywheel` (or `pld stage evaluate "
                       f"--iteration {k}`) first")
    demos = output_dir("base_v0_dataset", layout, params)
    root = layout.root / "controls" / f"iter_{k}"
    log(f"sft-control: SFT of base v{k} on {demos} only ({params.sft.steps} steps), then evaluate")
    m = sft.run(params, root / "sft_demos_only", demos, init=base_ref(params, layout, k))
    ctrl = BaseRef(str(root / "sft_demos_only" / "pretrained_model"), m["output_digest"])
    evaluate.run(params, root / "eval_demos_only", ctrl, label=f"v{k + 1} demos only")
    reports = {"base": json.loads((layout.base_eval(k) / "eval.json").read_text()), "pld": json.loads(ev.read_text()),
               "control": json.loads((root / "eval_demos_only" / "eval.json").read_text())}

    def summary(r: dict) -> dict:
        return {"mean": round(r["mean"], 3), "ci95": [round(x, 3) for x in r["mean_ci95"]],
                "per_task": {t: v["success_rate"] for t, v in r["tasks"].items()}}

    out = {name: summary(r) for name, r in reports.items()}
    pld, ctl = out["pld"]["mean"], out["control"]["mean"]
    return {
        "ratio": round(pld / ctl, 3) if ctl > 0 else None,
        "ratio_is": f"mean success of base v{k + 1} (SFT on demonstrations + PLD episodes) over the control "
                    "(the same SFT on the demonstrations alone)",
        "gain_from_pld": round(pld - ctl, 3),
        "iteration": k,
        "episodes_per_task": next(iter(reports["control"]["tasks"].values()))["episodes"],
        "sft_steps": params.sft.steps,
        f"v{k}": out["base"], f"v{k + 1}": out["pld"], "demos_only": out["control"],
        "control_dir": str(root),
    }
