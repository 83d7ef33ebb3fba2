"""Speed benchmarks: ``pld bench loop | replay | collect``. Each prints one JSON line last.

- :func:`bench_loop`     bare simulator steps/s (the base acting, no learning) against
                         ``train_residual``'s env steps/s, async and sync, on the same task in one run;
- :func:`bench_replay`   RLPD batches (50/50 offline/online, batch 256, 250k online capacity, state
                         mode) sampled per second against what the learner consumes;
- :func:`bench_collect`  episodes/s of :class:`pld_core.parallel.EpisodePool` with W workers over 1
                         (worker start-up timed apart), checking the episodes are the same.

The SAC networks are the paper's (``params.yaml``'s ``sac`` section: hidden 256, 3 layers, batch
256, critic:actor 2). ``bench_loop``'s offline buffer is synthetic (random transitions of the
right shapes): it measures speed, not learning.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pld_core.artifacts import MANIFEST, read_manifest
from pld_core.config import Params, validate_params
from pld_core.env import EnvSpec, LiberoEnv, check_task, env_state_dim
from pld_core.errors import PLDError
from pld_core.features import ACT_DIM
from pld_core.replay import ReplayBuffer, sample_mixed

DEFAULT_BASE = "scripted:noise=0.6"


def _synthetic_buffer(n_transitions: int, obs_dim: int, episode_len: int, capacity: int | None, seed: int) -> ReplayBuffer:
    rng = np.random.default_rng(seed)
    episodes = max(1, n_transitions // episode_len)
    buf = ReplayBuffer(capacity or episodes * (episode_len + 1), obs_dim, ACT_DIM, 0.99)
    for _ in range(episodes):
        T = episode_len
        reward = np.zeros(T, dtype=np.float32)
        reward[-1] = 1.0
        buf.add_episode(rng.standard_normal((T + 1, obs_dim)).astype(np.float32), rng.uniform(-1, 1, (T + 1, ACT_DIM)),
                        rng.uniform(-1, 1, (T, ACT_DIM)), reward, reward.copy())
    return buf


def _bench_params(params: Params, suite: str, task: int, mode: str) -> Params:
    raw = params.model_dump()
    raw["env"].update(suite=suite, tasks=[int(task)], mode="state")
    raw["residual"].update(mode=mode, warmup_episodes=0, learning_starts=0, env_steps=10**9, eval_every=10**9,
                           checkpoint_every=10**9, ablation="none")
    return validate_params(raw, source="bench loop")


# ----------------------------------------------------------------------------- loop
def _bare(env: LiberoEnv, base, seconds: float, first_episode: int) -> tuple[int, float, int]:
    """Steps of the base alone (resets included) for ``seconds``: (steps, seconds, episodes)."""
    steps = episodes = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    k = first_episode
    while time.perf_counter() < deadline:
        obs = env.reset(k % env.n_init_states, seed=k)
        base.reset(env)
        k += 1
        episodes += 1
        while True:
            obs, _, terminated, truncated, _ = env.step(base.act(obs))
            steps += 1
            if terminated or truncated or time.perf_counter() >= deadline:
                break
    return steps, time.perf_counter() - t0, episodes


def _train(trainer, seconds: float, warm_s: float) -> dict:
    """Run the trainer's episodes: first until its learner has updated (at most ``warm_s``), then ``seconds`` measured."""
    trainer.show_progress = False
    trainer.start()
    try:
        t_warm = time.time()
        while trainer.grad_steps == 0 and time.time() - t_warm < warm_s:
            trainer.deadline = min(time.time() + 1.0, t_warm + warm_s)
            trainer._episode()
        steps0, grads0 = trainer.env_steps, trainer.grad_steps
        t0 = time.time()
        trainer.deadline = t0 + seconds
        while time.time() < trainer.deadline:
            trainer._episode()
        dt = time.time() - t0
        steps, grads = trainer.env_steps - steps0, trainer.grad_steps - grads0
    finally:
        trainer.close()
    return {"steps_per_s": steps / dt, "updates_per_s": grads / dt, "steps": steps, "updates": grads, "seconds": dt,
            "warmup_seconds": t0 - t_warm}


def bench_loop(params: Params, seconds: float = 60.0, suite: str = "libero_object", task: int = 0, base: str | None = None,
               work_dir: Path | None = None, log=print) -> dict:
    """Bare steps/s vs train_residual env steps/s (async, sync) on one task; ``seconds`` per measurement.

    The bare rate is measured before and after the training runs (half of ``seconds`` each) and
    averaged, so a change in the machine's load during the run biases neither side.
    """
    import tempfile

    from pld_core.policies import make_policy_factory, validate_policy_spec
    from pld_core.encoders import StateEncoder
    from pld_core.learner import set_torch_threads
    from pld_core.trainer import SpecialistTrainer

    base = base or DEFAULT_BASE
    validate_policy_spec(base)
    check_task(suite, task)
    t_start = time.time()
    set_torch_threads(params.residual.torch_threads)
    env = LiberoEnv(suite, task, mode="state", max_objects=params.env.max_objects)
    try:
        base_policy = make_policy_factory(base, mode="state", device=params.device, seed=0)(env)
        obs_dim = 8 + env_state_dim(suite, params.env.max_objects)
        encoder = StateEncoder(np.zeros(obs_dim), np.ones(obs_dim))
        offline = _synthetic_buffer(20_000, obs_dim, 150, None, seed=0)
        bare_a = _bare(env, base_policy, seconds / 2, 0)
        log(f"bare (1/2): {bare_a[0] / bare_a[1]:.1f} steps/s")
        results = {}
        with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
            from pld_core.actor_learner import AsyncSpecialistTrainer

            for mode, cls in (("async", AsyncSpecialistTrainer), ("sync", SpecialistTrainer)):
                p = _bench_params(params, suite, task, mode)
                trainer = cls(p, env, base_policy, encoder, offline, Path(tmp) / mode, key=f"bench-{mode}", show_progress=False)
                results[mode] = _train(trainer, seconds, warm_s=max(10.0, seconds / 2))
                log(f"{mode}: {results[mode]['steps_per_s']:.1f} env steps/s, {results[mode]['updates_per_s']:.1f} updates/s")
        bare_b = _bare(env, base_policy, seconds / 2, 10_000)
        log(f"bare (2/2): {bare_b[0] / bare_b[1]:.1f} steps/s")
    finally:
        env.close()
    bare = (bare_a[0] + bare_b[0]) / (bare_a[1] + bare_b[1])
    a, s = results["async"], results["sync"]
    sp = params.sac
    return {
        "ratio": round(a["steps_per_s"] / bare, 3),
        "sync_ratio": round(s["steps_per_s"] / bare, 3),
        "bare_steps_per_s": round(bare, 2),
        "async_steps_per_s": round(a["steps_per_s"], 2),
        "sync_steps_per_s": round(s["steps_per_s"], 2),
        "updates_per_s": round(a["updates_per_s"], 2),
        "sync_updates_per_s": round(s["updates_per_s"], 2),
        "async_updates_per_env_step": round(a["updates"] / max(1, a["steps"]), 3),
        "bare_steps_per_s_before_after": [round(bare_a[0] / bare_a[1], 2), round(bare_b[0] / bare_b[1], 2)],
        "async_learner_startup_s": round(a["warmup_seconds"], 1),
        "seconds": seconds,
        "wall_seconds": round(time.time() - t_start, 1),
        "suite": suite, "task": int(task), "base": base,
        "sac": {"batch_size": sp.batch_size, "hidden": sp.hidden, "layers": sp.layers, "critic_actor_ratio": sp.critic_actor_ratio},
        "updates_per_step_cap": params.residual.updates_per_step, "sync_every": params.residual.sync_every,
    }


# ----------------------------------------------------------------------------- replay
def bench_replay(params: Params, seconds: float = 20.0, suite: str = "libero_object") -> dict:
    """Sampled transitions/s from 50/50 offline/online buffers vs transitions/s the learner consumes."""
    from pld_core.sac import ResidualSAC
    from pld_core.learner import set_torch_threads

    t_start = time.time()
    set_torch_threads(params.residual.torch_threads)
    sp, rp = params.sac, params.residual
    obs_dim = 8 + env_state_dim(suite, params.env.max_objects)
    B = sp.batch_size
    online = _synthetic_buffer(rp.replay_capacity, obs_dim, 150, rp.replay_capacity, seed=1)  # full ring
    offline = _synthetic_buffer(30_000, obs_dim, 150, None, seed=2)
    rng = np.random.default_rng(0)
    # sampling: what the learner does per update (two buffer samples, concatenation, tensors)
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds / 2:
        sample_mixed(offline, online, B, rng, rp.offline_fraction)
        n += 1
    sample_s = (time.perf_counter() - t0) / n
    # inserting: the online buffer's add_step, as the learner applies the actor's transitions
    x, a = np.zeros(obs_dim, np.float32), np.zeros(ACT_DIM, np.float32)
    online.start_episode(x, a)
    m = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < min(2.0, seconds / 10):
        online.add_step(a, 0.0, 0.0, x, a)
        m += 1
    insert_s = (time.perf_counter() - t0) / m
    online.end_episode()
    # updates: the paper's SAC on pre-sampled batches (what consumes the batches)
    sac = ResidualSAC(obs_dim, ACT_DIM, sp.to_sac_config())
    batches = [sample_mixed(offline, online, B, rng, rp.offline_fraction) for _ in range(8)]
    u = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds / 2:
        sac.update(batches[u % len(batches)], u)
        u += 1
    update_s = (time.perf_counter() - t0) / u
    sampled = B / sample_s
    consumed = B / update_s
    return {
        "ratio": round(sampled / consumed, 2),
        "ratio_is": "sampled transitions/s over transitions/s the learner consumes (batch x SAC updates/s); "
                    ">1: sampling is not the bottleneck; sample_share_of_update = the learner's time spent sampling",
        "transitions_per_s": round(sampled, 1),
        "consumed_transitions_per_s": round(consumed, 1),
        "updates_per_s": round(1 / update_s, 2),
        "sample_ms": round(sample_s * 1e3, 3),
        "update_ms": round(update_s * 1e3, 2),
        "sample_share_of_update": round(sample_s / (sample_s + update_s), 4),
        "inserts_per_s": round(1 / insert_s, 1),
        "batch_size": B, "online_capacity": rp.replay_capacity, "online_transitions": len(online),
        "offline_transitions": len(offline), "offline_fraction": rp.offline_fraction, "obs_dim": obs_dim,
        "seconds": round(time.time() - t_start, 1),
    }


# ----------------------------------------------------------------------------- collect
def _digest_episode(ep) -> str:
    h = hashlib.sha256()
    for k in sorted(ep.steps):
        h.update(k.encode())
        h.update(np.ascontiguousarray(ep.steps[k]).tobytes())
    return h.hexdigest()[:16]


def _ready(env, policy) -> int:
    """A no-op job: the worker has built its env and policy."""
    return os.getpid()


def _collect(spec: EnvSpec, factory, workers: int, episodes: int, serve_base=None) -> tuple[list, float, float, list, list]:
    """(results, seconds for the episodes, seconds to start the workers and build their envs,
    actions of every episode, the served base's batch sizes)."""
    from pld_core.parallel import EpisodePool, record_episode

    jobs = [(spec.task, (k % spec.n_init_states, k, 0.99)) for k in range(episodes)]
    t0 = time.time()
    with EpisodePool(spec, factory, workers, serve_base=serve_base) as pool:
        list(pool.imap(_ready, [(spec.task, ())] * workers))  # start-up, timed apart
        t1 = time.time()
        eps = list(pool.imap(record_episode, jobs))
        t2 = time.time()
        sizes = pool.base_batch_sizes
    out = [(ok, length, _digest_episode(ep)) for ok, length, ep in eps]
    return out, t2 - t1, t1 - t0, [ep.steps["action"] for _, _, ep in eps], sizes


def bench_collect(params: Params, workers: int = 2, episodes: int = 8, suite: str = "libero_object", task: int = 0,
                  base: str | None = None, batch_base: bool = False, log=print) -> dict:
    """Episodes/s of W simulator workers over 1 (worker start-up included), on the same episodes.
    ``batch_base``: the W workers share one copy of a LeRobot base, its calls batched (pld_core/base_server.py)."""
    from pld_core.policies import is_scripted, make_policy_factory, validate_policy_spec

    if workers < 1 or episodes < 1:
        raise PLDError(f"bench collect: --workers ({workers}) and --episodes ({episodes}) must be positive")
    base = base or DEFAULT_BASE
    validate_policy_spec(base)
    check_task(suite, task)
    spec = EnvSpec(suite, task, mode="state", max_objects=params.env.max_objects)
    factory = make_policy_factory(base, mode="state", device=params.device, seed=0)
    if batch_base and is_scripted(base):
        raise PLDError("bench collect --batch-base needs a LeRobot base. Fix: --base data/base_v0/pretrained_model (or another checkpoint)")
    serial, t1, start1, acts1, _ = _collect(spec, factory, 1, episodes)
    log(f"1 worker: {episodes / t1:.3f} episodes/s (start-up {start1:.1f} s)")
    parallel, tw, startw, actsw, sizes = _collect(spec, factory, workers, episodes, serve_base=factory if batch_base else None)
    log(f"{workers} workers{' sharing one batched base' if batch_base else ''}: {episodes / tw:.3f} episodes/s (start-up {startw:.1f} s)")
    same_len = all(a.shape == b.shape for a, b in zip(acts1, actsw))
    return {
        "ratio": round(t1 / tw, 3),
        "ratio_is": "episodes/s with W workers over 1 worker, once the workers have started (start-up apart)",
        "ratio_with_startup": round((t1 + start1) / (tw + startw), 3),
        "workers": workers,
        "episodes": episodes,
        "episodes_per_s": round(episodes / tw, 3),
        "serial_episodes_per_s": round(episodes / t1, 3),
        "startup_s": round(startw, 1),
        "serial_startup_s": round(start1, 1),
        "steps_per_s": round(sum(length for _, length, _ in parallel) / tw, 1),
        "serial_steps_per_s": round(sum(length for _, length, _ in serial) / t1, 1),
        "identical": serial == parallel,
        "max_action_diff": float(max(np.abs(a - b).max() for a, b in zip(acts1, actsw))) if same_len else None,
        "batch_base": bool(batch_base),
        "base_calls": len(sizes) if batch_base else None,
        "mean_base_batch": round(float(np.mean(sizes)), 2) if sizes else None,
        "successes": sum(ok for ok, _, _ in parallel),
        "serial_successes": sum(ok for ok, _, _ in serial),
        "seconds": round(t1 + tw + start1 + startw, 1),
        "suite": suite, "task": int(task), "base": base,
    }


# ----------------------------------------------------------------------------- overhead
def stage_manifests(root: Path, exclude: Path | None = None) -> list[dict]:
    """Every stage manifest under ``root`` (sorted by path): where, which stage, its compute time, its metrics.
    ``exclude``: a folder whose copies do not count (MLflow's artifact store keeps a copy of each
    registered checkpoint, manifest included)."""
    out = []
    for f in sorted(root.rglob(MANIFEST)):
        if exclude is not None and f.is_relative_to(exclude):
            continue
        m = read_manifest(f.parent)
        if isinstance(m, dict) and "stage" in m and "key" in m:
            out.append({"dir": str(f.parent.relative_to(root)), "stage": m["stage"], "compute_seconds": m.get("compute_seconds"),
                        "finished_at": m.get("finished_at"), "key": m["key"], "metrics": m.get("metrics") or {}})
    return out


def _run_flywheel(cmd: list[str], cwd: Path, log) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise PLDError(f"bench overhead: `{' '.join(cmd)}` failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
    log(proc.stdout[-1500:])
    return wall


def bench_overhead(params_path: str | Path = "params.yaml", profile: str = "smoke", root: str | Path | None = None,
                   log=print) -> dict:
    """A whole ``pld flywheel --profile <profile>`` (bootstrap + iteration 0) in a fresh data dir, timed
    from the command's start to its exit, against the sum of its stages' own compute (each manifest's
    ``compute_seconds``: the time spent building that stage's outputs); then the same command again,
    with nothing changed, which must skip every stage.

    Orchestration = wall - compute: interpreter start and imports, Prefect flow/task runs, MLflow runs,
    model registration and figures, manifest checks and digests.
    """
    project = Path(params_path).resolve().parent
    root = Path(root or project / "data" / "bench_overhead").resolve()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    data = root / "data"
    sets = [f"flywheel.data_dir={data}", f"mlflow.tracking_uri=sqlite:///{data}/mlflow.db", f"mlflow.artifact_dir={data}/mlartifacts"]
    cmd = [sys.executable, "-m", "pld_app.cli", "flywheel", "--params", str(Path(params_path).resolve()), "--profile", profile]
    for s in sets:
        cmd += ["--set", s]
    # imports alone (what every `pld` process pays before any work), for the breakdown
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import flows.flywheel, flows.stages, pld_app.cli"], cwd=project, check=True)
    import_s = time.perf_counter() - t0

    log(f"bench overhead: pld flywheel --profile {profile} in {data} (fresh)")
    wall = _run_flywheel(cmd, project, log)
    first = stage_manifests(data, exclude=data / "mlartifacts")
    if not first:
        raise PLDError(f"bench overhead: no stage manifest under {data} after the flywheel ran")
    compute = sum(m["compute_seconds"] or 0.0 for m in first)
    log("bench overhead: cached rerun")
    cached = _run_flywheel(cmd, project, log)
    second = stage_manifests(data, exclude=data / "mlartifacts")
    rebuilt = [m["dir"] for m, n in zip(first, second) if m["finished_at"] != n["finished_at"]]
    per_stage: dict[str, float] = {}
    for m in first:  # by output dir: evaluate_v0 and evaluate are one stage function with two outputs
        per_stage[m["dir"]] = round(per_stage.get(m["dir"], 0.0) + (m["compute_seconds"] or 0.0), 2)
    return {
        "ratio": round(wall / max(compute, 1e-9), 3),
        "orchestration_share": round(1.0 - compute / wall, 3),
        "wall_s": round(wall, 1),
        "compute_s": round(compute, 1),
        "orchestration_s": round(wall - compute, 1),
        "import_s": round(import_s, 1),
        "cached_rerun_s": round(cached, 1),
        "cached_rebuilt": rebuilt,
        "stages": len(first),
        "stage_compute_s": per_stage,
        "profile": profile,
    }
