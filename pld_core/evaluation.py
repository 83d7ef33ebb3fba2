"""Evaluation on fixed initial states: per-task success with 95% Wilson intervals."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from rich.progress import Progress

from pld_core.env import EnvSpec, LiberoEnv, check_task, init_states, task_names
from pld_core.parallel import EpisodePool, outcome_episode
from pld_core.rollout import Policy, run_episode
from pld_core.stats import success_summary, wilson_interval

EVAL_SEED = 1_000_000  # a specialist's eval episodes use seeds EVAL_SEED + k on initial states k (fixed)


def evaluate(
    make_policy: Callable[[LiberoEnv], Policy],
    suite: str,
    tasks: list[int],
    episodes: int,
    mode: str = "state",
    max_objects: int = 3,
    image_size: int = 128,
    seed: int = 0,
    show_progress: bool = True,
    workers: int = 1,
    serve_base=None,
) -> dict:
    """Roll out on initial states 0..episodes-1 of each task (wrapping past the suite's 50).

    Episode k of a task uses initial state k mod 50 and seed ``seed + k``. ``workers > 1`` plays
    them in that many simulator processes (``make_policy`` must be picklable, e.g. a
    :class:`pld_core.policies.PolicyFactory`); the report is the same.

    Returns ``{"tasks": {"<suite>/<i>": {success_rate, ci95, episodes, ...}}, "mean": x, ...}``.
    """
    for t in tasks:
        check_task(suite, t)
    report: dict = {"suite": suite, "tasks": {}}
    total_s = total_n = 0
    t0 = time.time()
    results: dict[int, list[tuple[bool, int]]] = {t: [] for t in tasks}
    jobs = [(task, (k % len(init_states(suite, task)), seed + k)) for task in tasks for k in range(episodes)]
    spec = EnvSpec(suite, tasks[0] if tasks else 0, mode=mode, image_size=image_size, max_objects=max_objects)
    with EpisodePool(spec, make_policy, workers, serve_base=serve_base) as pool, Progress(transient=True, disable=not show_progress) as progress:
        bar = progress.add_task(f"eval {suite}", total=len(jobs))
        for (task, _), outcome in zip(jobs, pool.imap(outcome_episode, jobs)):
            results[task].append(outcome)
            progress.advance(bar)
    for task in tasks:
        outcomes = [ok for ok, _ in results[task]]
        lengths = [length for _, length in results[task]]
        summary = success_summary(outcomes)
        summary["mean_length"] = round(sum(lengths) / len(lengths), 1)
        summary["language"] = task_names(suite)[task]
        report["tasks"][f"{suite}/{task}"] = summary
        total_s += summary["successes"]
        total_n += len(outcomes)
    rates = [v["success_rate"] for v in report["tasks"].values()]
    report["mean"] = sum(rates) / len(rates) if rates else 0.0
    lo, hi = wilson_interval(total_s, total_n)
    report["mean_ci95"] = [round(lo, 4), round(hi, 4)]
    report["seconds"] = round(time.time() - t0, 1)
    return report


def format_report(report: dict) -> str:
    lines = [f"{'task':<20} {'success':>8} {'95% CI':>16} {'n':>4}  instruction"]
    for key, v in report["tasks"].items():
        lo, hi = v["ci95"]
        lines.append(f"{key:<20} {v['success_rate']:>8.2f} {f'[{lo:.2f}, {hi:.2f}]':>16} {v['episodes']:>4}  {v.get('language', '')}")
    lo, hi = report["mean_ci95"]
    lines.append(f"{'mean':<20} {report['mean']:>8.2f} {f'[{lo:.2f}, {hi:.2f}]':>16}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- a specialist's evaluation
def eval_outcomes(env, policy, episodes: int) -> list[bool]:
    """The specialist's evaluation protocol: initial states 0..episodes-1 (wrapping), seeds ``EVAL_SEED + k``."""
    return [run_episode(env, policy, init_state=k % env.n_init_states, seed=EVAL_SEED + k)[0] for k in range(episodes)]


def steps_to_threshold(curve: list[dict], threshold: float = 0.95, min_episodes: int = 1) -> int | None:
    """Env steps of the first evaluation on at least ``min_episodes`` initial states at or above ``threshold``."""
    for point in curve:
        if point["episodes"] >= min_episodes and point["success_rate"] >= threshold - 1e-9:
            return int(point["env_steps"])
    return None


def plot_curve(curve: list[dict], path: Path, title: str) -> None:
    """Eval success rate (with 95% Wilson band) against env steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    if curve:
        x = [p["env_steps"] for p in curve]
        y = [p["success_rate"] for p in curve]
        lo = [p["ci95"][0] for p in curve]
        hi = [p["ci95"][1] for p in curve]
        ax.fill_between(x, lo, hi, alpha=0.2, label="95% CI")
        ax.plot(x, y, marker="o", label="base + residual")
    ax.axhline(0.95, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("env steps")
    ax.set_ylabel("eval success rate")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
