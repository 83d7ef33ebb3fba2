"""A specialist on N initial states, deterministic (tanh of the mean: what `pld bench specialist` reports) vs
stochastic (sampled residual), same states and seeds. Usage: python bench/stochastic_eval.py <residual dir> <task> <N>"""
import json
import sys
import time

import torch
from pld_core.env import LiberoEnv
from pld_core.specialist import eval_outcomes, load_residual
from pld_core.stats import success_summary

path, task, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)
env = LiberoEnv("libero_object", task)
out = {}
for det in (False, True):
    torch.manual_seed(0)
    pol = load_residual(path, deterministic=det)
    t0 = time.time()
    s = success_summary(eval_outcomes(env, pol, n))
    out["deterministic" if det else "stochastic"] = {"success_rate": s["success_rate"], "ci95": s["ci95"], "episodes": n, "seconds": round(time.time() - t0, 1)}
    print(out, flush=True)
print(json.dumps(out))
