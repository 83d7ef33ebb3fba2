"""A specialist on N initial states in several rollout modes, same states and seeds (the specialist
evaluation's: states 0..N-1, seeds EVAL_SEED + k):

  deterministic   base + tanh(mean) residual from the first step (what `pld bench specialist` reports)
  stochastic      base + sampled residual from the first step
  --prefix P      also both again after a base-only prefix of U(0, P) steps per episode, as training
                  episodes have (base-policy probing: residual.probe_max_fraction x max_steps) and
                  collect_pld's hybrid rollouts have

State mode. The specialist is a train_residual output dir, or a bench out dir whose training is unfinished: its
newest checkpoint (``.tmp-residual-<ablation>/checkpoints/step_*``) is evaluated, with the offline
store's observation statistics from ``critic_init``.

Usage: python bench/stochastic_eval.py <residual dir | bench out dir> <task> <N> [--prefix P] [--base SPEC]
Prints one line per mode, then a JSON summary as the last line."""
import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from pld_core.env import LiberoEnv
from pld_core.sac import ResidualSAC, SACConfig
from pld_core.encoders import StateEncoder
from pld_core.residual_policy import load_residual, RESIDUAL_WEIGHTS, save_residual
from pld_core.rollout import prefixed_steps
from pld_core.evaluation import eval_outcomes, EVAL_SEED
from pld_core.stats import success_summary


def from_checkpoint(bench_dir: Path, base: str, out: Path) -> str:
    """Write the newest training checkpoint under ``bench_dir`` as a residual dir in ``out``; returns its name."""
    ckpts = sorted(bench_dir.glob(".tmp-residual-*/checkpoints/step_*/state.json"))
    if not ckpts:
        raise SystemExit(f"{bench_dir}: no {RESIDUAL_WEIGHTS} and no .tmp-residual-*/checkpoints/step_*/state.json. "
                         "Fix: pass a train_residual output dir or a bench out dir with a checkpoint")
    ckpt = ckpts[-1].parent
    counters = json.loads(ckpts[-1].read_text())
    init = json.loads((bench_dir / "critic_init" / "config.json").read_text())
    sac = ResidualSAC(int(init["obs_dim"]), int(init["act_dim"]), SACConfig(**init["sac"]))
    state = load_file(str(ckpt / "sac.safetensors"))
    state.pop("rng.torch", None)
    sac.load_state_dict(state)
    sac.xi = float(counters["xi"])
    encoder = StateEncoder.from_tensors(load_file(str(bench_dir / "critic_init" / "critic.safetensors")), "critic_init")
    save_residual(out, sac, encoder, {"base": base, "mode": "state"})
    return str(ckpt)


def prefixed_outcomes(env, policy, lengths) -> list[bool]:
    """The evaluation's initial states and seeds, with the base alone for the first ``lengths[k]`` steps of episode k."""
    outcomes = []
    for k, n in enumerate(lengths):
        for step in prefixed_steps(env, policy, k % env.n_init_states, EVAL_SEED + k, prefix=int(n)):
            pass
        outcomes.append(bool(step.terminated))
    return outcomes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("path", type=Path)
    ap.add_argument("task", type=int)
    ap.add_argument("n", type=int)
    ap.add_argument("--prefix", type=int, default=None, help="also evaluate after a base-only prefix of U(0, P) steps")
    ap.add_argument("--base", default=None, help="the base policy spec (default: the one the specialist recorded)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    env = LiberoEnv("libero_object", args.task)
    out, source = {}, str(args.path)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.path
        if not (path / RESIDUAL_WEIGHTS).is_file():
            if not args.base:
                raise SystemExit("a checkpoint records no base. Fix: pass --base <the base the run trained on>")
            source = from_checkpoint(args.path, args.base, Path(tmp))
            path = Path(tmp)
        prefixes = [None] if args.prefix is None else [None, args.prefix]
        for prefix in prefixes:
            for det in (True, False):
                torch.manual_seed(0)
                policy = load_residual(path, base=args.base, deterministic=det)
                t0 = time.time()
                if prefix is None:
                    outcomes = eval_outcomes(env, policy, args.n)  # the evaluation's states and seeds
                else:
                    outcomes = prefixed_outcomes(env, policy, np.random.default_rng(0).integers(0, prefix + 1, size=args.n))
                s = success_summary(outcomes)
                name = ("deterministic" if det else "stochastic") + ("" if prefix is None else f"_after_base_prefix_U(0,{prefix})")
                out[name] = {"success_rate": s["success_rate"], "ci95": s["ci95"], "episodes": args.n, "seconds": round(time.time() - t0, 1)}
                print(name, out[name], flush=True)
    out["specialist"] = source
    print(json.dumps(out))


if __name__ == "__main__":
    main()
