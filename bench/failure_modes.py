"""How a policy fails: deterministic episodes on initial states [first, last), each failure classified from
the target object's height (object of interest 0) and its distance to the basket (object of interest 1).

  never_lifted   the object never rose 3 cm above where it started
  dropped        it rose, and at the time limit lies within 3 cm of its start height
  held           at the time limit it is still 3 cm or more above its start height (carried, not released)

Usage: python bench/failure_modes.py <residual dir | policy spec> <task> <first> <last> [--base SPEC]
A residual dir is loaded with load_residual (its recorded base, or --base); anything else is a policy spec
(make_policy_factory). Episodes are run_episode's, on the specialist evaluation's states and seeds.
Prints one JSON line per failure, then a JSON summary as the last line."""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from pld_core.env import LiberoEnv
from pld_core.features import store_key
from pld_core.policies import make_policy_factory
from pld_core.rollout import run_episode
from pld_core.residual_policy import load_residual, RESIDUAL_WEIGHTS
from pld_core.evaluation import EVAL_SEED

LIFT = 0.03


def load(spec: str, base: str | None, env: LiberoEnv):
    if (Path(spec) / RESIDUAL_WEIGHTS).is_file():
        return load_residual(spec, base=base, deterministic=True)
    return make_policy_factory(spec, mode="state")(env)


def episode(env: LiberoEnv, policy, init_state: int, seed: int) -> dict:
    success, length, ep = run_episode(env, policy, init_state, seed=seed, record=True)
    before = ep.steps[store_key("env_state")]  # the state before each step
    target, basket = (np.asarray(env.raw_obs[f"{name}_pos"]) for name in env.objects[:2])  # after the last step
    z0, z = float(before[0, 2]), float(target[2])
    zmax = max(float(before[:, 2].max()), z)
    out = {"init_state": init_state, "success": bool(success), "length": length,
           "lift_max_cm": round(100 * (zmax - z0), 1), "lift_end_cm": round(100 * (z - z0), 1),
           "xy_to_basket_cm": round(100 * float(np.linalg.norm(target[:2] - basket[:2])), 1)}
    if not success:
        out["mode"] = "never_lifted" if zmax - z0 < LIFT else ("held" if z - z0 >= LIFT else "dropped")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("policy")
    ap.add_argument("task", type=int)
    ap.add_argument("first", type=int)
    ap.add_argument("last", type=int)
    ap.add_argument("--base", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    env = LiberoEnv("libero_object", args.task)
    policy = load(args.policy, args.base, env)
    t0, rows = time.time(), []
    for k in range(args.first, args.last):
        r = episode(env, policy, k % env.n_init_states, EVAL_SEED + k)
        rows.append(r)
        if not r["success"]:
            print(json.dumps(r), flush=True)
    fails = [r for r in rows if not r["success"]]
    modes = {m: sum(r["mode"] == m for r in fails) for m in ("never_lifted", "dropped", "held")}
    print(json.dumps({"policy": args.policy, "task": args.task, "states": [args.first, args.last], "episodes": len(rows),
                      "successes": len(rows) - len(fails), "failure_modes": modes, "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
