"""Stage ``collect_offline``: the frozen base's successful rollouts on one task (PLD "Probe").

Rolls the base out on initial states 0, 1, 2, ... (wrapping) until ``offline.successes``
successful episodes or ``offline.max_episodes`` episodes; ``flywheel.collect_workers`` simulators
play them at once (:class:`pld_core.parallel.EpisodePool`; the kept episodes do not depend on it). Successful episodes go into
``<out>/offline.zarr`` with their Monte-Carlo returns (sparse binary reward, ``sac.gamma``) and the
base action at every next state; failures are only counted (the base's success rate is a metric).
A base that never succeeds is an outcome, not an error: the stage finishes with an empty store and
``metrics.no_data`` + ``metrics.reason``, and the task's later stages record that they had no data.

Output: ``<out>/offline.zarr``, ``<out>/manifest.json`` (written last).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from pld_core.artifacts import atomic_dir, digest_json, finish_manifest, is_fresh, read_manifest
from pld_core.config import Params
from pld_core.env import EnvSpec, task_names
from pld_core.policies import is_scripted, make_policy_factory, served_base, validate_policy_spec
from pld_core.parallel import EpisodePool, record_episode
from pld_core.stats import success_summary
from pld_core.store import TrajectoryStore

log = logging.getLogger("pld")

STAGE = "collect_offline"
STORE_NAME = "offline.zarr"


def env_key(params: Params, task: int) -> dict:
    """The env settings a per-task stage depends on (not the whole ``env.tasks`` list)."""
    e = params.env
    return {"suite": e.suite, "task": int(task), "mode": e.mode, "image_size": e.image_size, "max_objects": e.max_objects}


def base_identity(spec: str) -> dict:
    """What identifies a base policy in a stage key: the spec, plus a content digest for a directory.

    A directory made by a stage (it or one of its two parents holds a manifest) is identified by
    that manifest's output digest; another directory by its JSON files' bytes and every file's
    name and size (hashing multi-GB weights on every run would be slow).
    """
    if is_scripted(spec):
        return {"spec": spec}
    path = Path(spec)
    if not path.exists():
        return {"spec": spec}  # hub id
    path = path.resolve()
    for d in (path, path.parent, path.parent.parent):
        m = read_manifest(d) if d.is_dir() else None
        if m and m.get("output_digest"):
            return {"spec": str(path), "digest": m["output_digest"], "stage_dir": str(d)}
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path)}:{f.stat().st_size}".encode())
        if f.suffix == ".json":
            h.update(f.read_bytes())
    return {"spec": str(path), "digest": h.hexdigest()[:16]}


def base_key(spec: str) -> dict:
    """The base in a stage key: its content digest where it has one (not its path: a data dir that
    moves, or a DVC checkout elsewhere, keeps its keys), else the spec (scripted, hub id)."""
    ident = base_identity(spec)
    return {"digest": ident["digest"]} if "digest" in ident else ident


def stage_key(params: Params, base: str, task: int) -> str:
    return digest_json({
        "stage": STAGE, "env": env_key(params, task), "offline": params.section_dict("offline"),
        "gamma": params.sac.gamma, "base": base_key(base),
    })


def run(params: Params, out_dir: Path, base: str, task: int, force: bool = False, show_progress: bool = True) -> dict:
    """Collect the base's successes on ``task`` into ``out_dir/offline.zarr``; returns the manifest."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    out_dir = Path(out_dir)
    validate_policy_spec(base)
    key = stage_key(params, base, task)
    if not force and is_fresh(out_dir, key):
        return read_manifest(out_dir)
    op, ep = params.offline, params.env
    gamma = params.sac.gamma
    t0 = time.time()
    with atomic_dir(out_dir) as work:
        spec = EnvSpec(ep.suite, task, mode=ep.mode, image_size=ep.image_size, max_objects=ep.max_objects)
        factory = make_policy_factory(base, mode=ep.mode, device=params.device, seed=op.seed)
        n_init = spec.n_init_states
        store = TrajectoryStore.create(
            work / STORE_NAME, spec.obs_shapes(), ep.suite, task_names(ep.suite),
            extra_attrs={"stage": STAGE, "task": int(task), "base": base, "gamma": gamma},
        )
        outcomes, lengths, steps = [], [], 0
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
                if ok:
                    store.append([episode])  # one successful episode per write: bounded memory with images
                    steps += length
                progress.update(bar, completed=sum(outcomes), info=f"episodes {k + 1}")
                if sum(outcomes) >= op.successes:
                    break
        summary = success_summary(outcomes)
        metrics = {
            "suite": ep.suite, "task": int(task), "base": base,
            "episodes": len(outcomes), "successes": summary["successes"],
            "base_success_rate": summary["success_rate"], "base_ci95": summary["ci95"],
            "short": summary["successes"] < op.successes,
            "steps": steps, "mean_success_length": round(steps / summary["successes"], 1) if summary["successes"] else None,
            "seconds": round(time.time() - t0, 1),
        }
        if summary["successes"] == 0:
            # an outcome, not an error: no offline data, so no specialist and no PLD data for this task this
            # iteration; the iteration goes on with the other tasks (the task's demos stay in the SFT data)
            metrics.update(no_data=True, reason=f"collect_offline: the base succeeded in 0 of {len(outcomes)} episodes (offline.max_episodes)")
            log.warning("%s task %s: %s", ep.suite, task, metrics["reason"])
        (work / "collect.json").write_text(json.dumps({"outcomes": outcomes, "lengths": lengths}))
        return finish_manifest(
            work, STAGE, key,
            params={"env": env_key(params, task), "offline": params.section_dict("offline"), "gamma": gamma},
            inputs={"base": base_identity(base)}, metrics=metrics, compute_seconds=time.time() - t0,
        )
