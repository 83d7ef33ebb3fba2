"""`pld demo`: scripted demonstrations into a trajectory store, resumable episode by episode."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from rich.progress import Progress

from pld_core.env import LiberoEnv, task_names
from pld_core.errors import PLDError
from pld_core.rollout import run_episode
from pld_core.scripted import ScriptedExpert
from pld_core.store import TrajectoryStore


def open_or_create(out: Path, env: LiberoEnv, extra_attrs: dict | None = None) -> TrajectoryStore:
    """Open ``out`` for appending (trimming any half-written episode) or create it atomically."""
    if out.exists():
        store = TrajectoryStore.open(out, mode="a")
        if store.attrs["suite"] != env.suite:
            raise PLDError(f"trajectory store {out}: holds suite '{store.attrs['suite']}', not '{env.suite}'. Fix: use another --out")
        want = {k: list(v) for k, v in env.obs_shapes().items()}
        if store.attrs["obs_shapes"] != want:
            raise PLDError(f"trajectory store {out}: observation shapes {store.attrs['obs_shapes']} differ from this env's {want}. Fix: use another --out, or the same --mode/--max-objects")
        return store
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        TrajectoryStore.create(tmp, env.obs_shapes(), suite=env.suite, task_names=task_names(env.suite), extra_attrs=extra_attrs)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    except BaseException:  # e.g. a full disk: leave no half-created store behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TrajectoryStore.open(out, mode="a")


def record_demos(out: Path, suite: str, tasks: list[int], episodes: int, mode: str = "state", image_size: int = 128,
                 max_objects: int = 3, noise: float = 0.0, seed: int = 0, gamma: float = 0.99, show_progress: bool = True) -> dict:
    """Record ``episodes`` successful scripted episodes per task; a rerun tops up what is missing."""
    if episodes <= 0:
        raise PLDError(f"--episodes must be positive, got {episodes}. Fix: pass --episodes 1 or more")
    store = None
    attempts_total = 0
    with Progress(transient=True, disable=not show_progress) as progress:
        bar = progress.add_task("demos", total=len(tasks) * episodes)
        for task in tasks:
            env = LiberoEnv(suite, task, mode=mode, image_size=image_size, max_objects=max_objects)
            store = store or open_or_create(out, env, {"source": "scripted", "noise": noise})
            table = store.episode_table()
            mine = table[table.task_index == task]
            have = int(mine.success.sum())
            next_init = int(mine.init_state.max()) + 1 if len(mine) else 0
            progress.advance(bar, min(have, episodes))
            expert = ScriptedExpert(noise=noise, seed=seed + 1000 * task)
            attempts = 0
            while have < episodes:
                if attempts >= 3 * episodes + 10:
                    raise PLDError(f"scripted expert reached only {have}/{episodes} successes on {suite} task {task} in {attempts} attempts. Fix: lower demo.noise or pick another task")
                init = next_init % env.n_init_states
                ok, _, ep = run_episode(env, expert, init_state=init, seed=seed + next_init, record=True, gamma=gamma, clean_labels=True)
                next_init += 1
                attempts += 1
                if ok:
                    store.append([ep])  # one commit per episode: a kill loses at most this one
                    have += 1
                    progress.advance(bar)
            attempts_total += attempts
            env.close()
    summary = store.summary()
    summary["attempts_this_run"] = attempts_total
    return summary
