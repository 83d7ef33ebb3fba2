"""Stage ``collect_offline``: the frozen base's successful rollouts on one task (PLD "Probe").

Rolls the base out on initial states 0, 1, 2, ... (wrapping) until ``offline.successes``
successful episodes or ``offline.max_episodes`` episodes; ``flywheel.collect_workers`` simulators
play them at once (:class:`pld_core.parallel.EpisodePool`; the kept episodes do not depend on it). Successful episodes go into
``<out>/offline.zarr`` with their Monte-Carlo returns (sparse binary reward, ``sac.gamma``) and the
base action at every next state; failures are only counted (the base's success rate is a metric),
unless ``flywheel.keep_failures`` (a plumbing check) keeps them too.
A base that never succeeds is an outcome, not an error: the stage finishes with an empty store and
``metrics.no_data`` + ``metrics.reason``, and the task's later stages record that they had no data.

Output: ``<out>/offline.zarr``, ``<out>/manifest.json`` (written last).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from pld_core.config import Params
from pld_core.env import EnvSpec, task_names
from pld_core.layout import OFFLINE_STORE, BaseRef, env_key
from pld_core.policies import make_policy_factory, served_base, validate_policy_spec
from pld_core.parallel import EpisodePool, record_episode
from pld_core.stage import run_stage
from pld_core.stats import success_summary
from pld_core.store import TrajectoryStore

log = logging.getLogger("pld")

STAGE = "collect_offline"


def stage_inputs(params: Params, base: BaseRef, task: int) -> tuple[dict, dict]:
    """(params read, inputs): what the stage key is made of."""
    used = {"env": env_key(params, task), "offline": params.section_dict("offline"), "gamma": params.sac.gamma}
    if params.flywheel.keep_failures:  # only when set: the keys of data dirs made without it stay valid
        used["keep_failures"] = True
    return used, {"base": base.digest}


def run(params: Params, out_dir: Path, base: BaseRef, task: int, force: bool = False, show_progress: bool = True) -> dict:
    """Collect the base's successes on ``task`` into ``out_dir/offline.zarr``; returns the manifest."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    validate_policy_spec(base.spec)
    op, ep = params.offline, params.env
    gamma = params.sac.gamma
    used, inputs = stage_inputs(params, base, task)

    def build(work: Path) -> dict:
        t0 = time.time()
        spec = EnvSpec(ep.suite, task, mode=ep.mode, image_size=ep.image_size, max_objects=ep.max_objects)
        factory = make_policy_factory(base.spec, mode=ep.mode, device=params.device, seed=op.seed)
        n_init = spec.n_init_states
        store = TrajectoryStore.create(
            work / OFFLINE_STORE, spec.obs_shapes(), ep.suite, task_names(ep.suite),
            extra_attrs={"stage": STAGE, "task": int(task), "base": base.spec, "gamma": gamma},
        )
        outcomes, lengths, steps, kept = [], [], 0, 0
        keep_failures = params.flywheel.keep_failures
        columns = [TextColumn(f"[bold]offline {ep.suite}/{task}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("successes"), TimeElapsedColumn(), TextColumn("{task.fields[info]}")]
        # episode k: initial state k mod n, seed op.seed * 1_000_003 + k, whichever worker plays it
        jobs = ((task, (k % n_init, op.seed * 1_000_003 + k, gamma)) for k in range(op.max_episodes))
        with EpisodePool(spec, factory, params.flywheel.collect_workers,
                         serve_base=served_base(params, factory)) as pool, \
                Progress(*columns, disable=not show_progress) as progress:
            bar = progress.add_task("collect", total=op.successes, info="")
            for k, (ok, length, episode) in enumerate(pool.imap(record_episode, jobs)):
                outcomes.append(ok)
                lengths.append(length)
                if ok or keep_failures:
                    store.append([episode])  # one episode per write: bounded memory with images
                    steps += length
                    kept += 1
                progress.update(bar, completed=kept, info=f"episodes {k + 1}")
                if kept >= op.successes:
                    break
        summary = success_summary(outcomes)
        metrics = {
            "suite": ep.suite, "task": int(task), "base": base.spec,
            "episodes": len(outcomes), "successes": summary["successes"],
            "base_success_rate": summary["success_rate"], "base_ci95": summary["ci95"],
            "short": summary["successes"] < op.successes, "kept": kept,
            "steps": steps, "seconds": round(time.time() - t0, 1),
            "mean_success_length": (round(sum(n for n, ok in zip(lengths, outcomes) if ok) / summary["successes"], 1)
                                    if summary["successes"] else None),
        }
        if kept == 0:
            # an outcome, not an error: no offline data, so no specialist and no PLD data for this task this
            # iteration; the iteration goes on with the other tasks (the task's demos stay in the SFT data)
            metrics.update(no_data=True, reason=f"collect_offline: the base succeeded in 0 of {len(outcomes)} episodes (offline.max_episodes)")
            log.warning("%s task %s: %s", ep.suite, task, metrics["reason"])
        (work / "collect.json").write_text(json.dumps({"outcomes": outcomes, "lengths": lengths}))
        return metrics

    return run_stage(STAGE, out_dir, used, inputs, build, force=force)
