"""``pld bench pi05-tiny``: the flywheel on a random pi0.5 (profile ``pi05-tiny``), run as a user runs it, observed.

One ``pld flywheel --profile pi05-tiny`` child process in a fresh data dir (bootstrap + one iteration), while a
sampler reads the resident memory of the child's whole process tree (simulator workers, the trainer's child)
every half second. Afterwards each stage's manifest gives its compute interval (``finished_at`` minus
``compute_seconds``), so every stage gets its wall time and its peak RSS; the SFT manifest gives seconds per
training step; MLflow's registry must hold v1. Then base v0 is loaded once more and timed on its own: load
seconds and peak memory, seconds per model call (one action chunk) at batch 1 and at batch 2 (two simulators
served by one copy, ``flywheel.batch_base``).
"""

from __future__ import annotations

import calendar
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from pld_core.errors import PLDError


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def _run_sampled(cmd: list[str], cwd: Path, log_path: Path, period: float = 0.5) -> tuple[int, float, list[tuple[float, int]]]:
    samples: list[tuple[float, int]] = []
    with open(log_path, "w") as logf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=logf, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample():
            while not done.is_set():
                samples.append((time.time(), _tree_rss(proc.pid)))
                done.wait(period)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        rc = proc.wait()
        done.set()
        th.join()
    return rc, time.perf_counter() - t0, samples


def _epoch(ts: str) -> float:
    return float(calendar.timegm(time.strptime(ts, "%Y-%m-%dT%H:%M:%SZ")))


def stage_table(data: Path, samples: list[tuple[float, int]]) -> list[dict]:
    """One row per stage manifest under ``data`` (MLflow's copies left out), in the order the stages ran: its
    compute seconds, the peak tree RSS sampled while it computed, and seconds per training step where it trained.
    A stage computed from ``finished_at - compute_seconds`` to ``finished_at``; ``finished_at`` has whole seconds,
    so the window takes one second of slack on each side."""
    from bench.perf import stage_manifests

    slack = 1.0
    rows = []
    for m in stage_manifests(data, exclude=data / "mlartifacts"):
        compute = float(m["compute_seconds"] or 0.0)
        finished = _epoch(m["finished_at"])
        start, end = finished - compute - slack, finished + slack
        inside = [rss for t, rss in samples if start <= t <= end]
        step = m["metrics"].get("train_step_s")
        rows.append({"stage": m["stage"], "dir": m["dir"], "compute_s": round(compute, 1),
                     "peak_rss_gb": round(max(inside) / 2**30, 2) if inside else None,
                     **({"train_step_s": round(step, 2)} if step else {}), "_start": start})
    rows.sort(key=lambda r: r["_start"])
    for r in rows:
        del r["_start"]
    return rows


def model_call_cost(ckpt: Path, mode: str, env_state_dim: int, image_size: int, calls: int = 3) -> dict:
    """Load the base once (seconds, peak RSS of this process) and time action-chunk calls at batch 1 and 2."""
    import numpy as np
    import torch

    from pld_core.base_policy import BasePolicy
    from pld_core.base_server import BaseServer
    from pld_core.env import task_names

    t0 = time.perf_counter()
    base = BasePolicy.load(ckpt, mode, env_state_dim=env_state_dim)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)

    def obs():
        return {"state": rng.normal(size=8).astype(np.float32), "env_state": rng.normal(size=env_state_dim).astype(np.float32),
                "image": rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8),
                "wrist_image": rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)}

    server = BaseServer(base, [])
    tasks = task_names("libero_object")[:2]
    out = {"load_s": round(load_s, 1)}
    for b in (1, 2):
        server.predict(tasks[:b], [obs() for _ in range(b)])  # warm-up
        t0 = time.perf_counter()
        for _ in range(calls):
            torch.manual_seed(0)
            server.predict(tasks[:b], [obs() for _ in range(b)])
        out[f"s_per_call_batch{b}"] = round((time.perf_counter() - t0) / calls, 2)
    out["peak_rss_gb_load_and_calls"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    out["n_action_steps"] = base.n_action_steps
    out["parameters_b"] = round(sum(p.numel() for p in base.policy.parameters()) / 1e9, 3)
    return out


class _AnonPeak:
    """The peak of this process's anonymous resident memory (``RssAnon``), sampled every 0.2 s while active: the
    memory a load really holds; ``ru_maxrss`` also counts the memory-mapped file's pages (page cache)."""

    def __enter__(self):
        self.peak, self._done = 0, threading.Event()

        def sample():
            while not self._done.is_set():
                with open("/proc/self/status") as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            self.peak = max(self.peak, int(line.split()[1]) * 1024)
                self._done.wait(0.2)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()


def _digest(model) -> dict[str, str]:
    import hashlib

    import torch

    out = {}
    for k, v in [*model.state_dict().items(), *(("buffer:" + k, b) for k, b in model.named_buffers())]:
        flat = v.detach().reshape(-1).contiguous()
        out[k] = f"{v.dtype}{tuple(v.shape)}" + hashlib.sha1(flat.view(torch.uint8).numpy().tobytes()).hexdigest()
    return out


def load_comparison(ckpt: Path) -> dict:
    """A pi-family checkpoint loaded by :func:`pld_core.pi05.load_streaming` and by LeRobot's own
    ``from_pretrained``, one after the other in this process: seconds, anonymous-memory peak, and whether every
    tensor and buffer (non-persistent ones included) is byte-identical."""
    import gc

    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.factory import get_policy_class

    from pld_core.pi05 import patch_lerobot

    patch_lerobot()
    ckpt = Path(ckpt)
    cls = get_policy_class(PreTrainedConfig.from_pretrained(ckpt).type)
    out, digests = {}, {}
    for name, load in (("streaming", cls.from_pretrained), ("lerobot", cls._pld_lerobot_from_pretrained)):
        gc.collect()
        with _AnonPeak() as peak:
            t0 = time.perf_counter()
            model = load(ckpt, config=PreTrainedConfig.from_pretrained(ckpt))
            seconds = time.perf_counter() - t0
        if name == "streaming" and not getattr(model, "_pld_streamed", False):
            raise PLDError(f"bench pi05-load: {ckpt} did not take the streaming path (its tensor names are not the model's own)")
        digests[name] = _digest(model)
        out[name] = {"load_s": round(seconds, 1), "peak_anon_gb": round(peak.peak / 2**30, 2)}
        del model
    out["speedup"] = round(out["lerobot"]["load_s"] / max(out["streaming"]["load_s"], 1e-9), 2)
    out["tensors"] = len(digests["streaming"])
    out["identical"] = digests["streaming"] == digests["lerobot"]
    return out


def bench_pi05_tiny(params_path: str | Path = "params.yaml", profile: str = "pi05-tiny", root: str | Path | None = None,
                    log=print) -> dict:
    from pld_core.config import load_params
    from pld_core.env import env_state_dim

    project = Path(params_path).resolve().parent
    params = load_params(params_path, profile)
    root = Path(root or project / "data" / "bench_pi05_tiny").resolve()
    shutil.rmtree(root, ignore_errors=True)
    data = root / "data"
    data.mkdir(parents=True)
    sets = [f"flywheel.data_dir={data}", f"mlflow.tracking_uri=sqlite:///{data}/mlflow.db", f"mlflow.artifact_dir={data}/mlartifacts"]
    cmd = [sys.executable, "-m", "pld_app.cli", "flywheel", "--params", str(Path(params_path).resolve()), "--profile", profile]
    for s in sets:
        cmd += ["--set", s]
    log(f"bench pi05-tiny: pld flywheel --profile {profile} in {data} (log {root / 'flywheel.log'})")
    rc, wall, samples = _run_sampled(cmd, project, root / "flywheel.log")
    if rc != 0:
        tail = (root / "flywheel.log").read_text(errors="replace")[-3000:]
        raise PLDError(f"bench pi05-tiny: the flywheel failed (exit {rc}); log {root / 'flywheel.log'}:\n{tail}")
    rows = stage_table(data, samples)

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{data}/mlflow.db")
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{params.mlflow.model_name}'"))
    v0 = data / "base_v0" / "pretrained_model"
    log("bench pi05-tiny: model call cost of base v0")
    calls = model_call_cost(v0, params.env.mode, env_state_dim(params.env.suite, params.env.max_objects), params.env.image_size)
    log("bench pi05-tiny: base v0 loaded by streaming and by LeRobot's from_pretrained")
    loads = load_comparison(v0)
    sft_rows = [r for r in rows if r["stage"] == "sft"]
    return {
        "profile": profile,
        "policy": params.base.policy,
        "flywheel_wall_s": round(wall, 1),
        "peak_rss_gb": round(max((r for _, r in samples), default=0) / 2**30, 2),
        "registered_versions": versions,
        "stages": rows,
        "sft_step_s": sft_rows[0].get("train_step_s") if sft_rows else None,
        "model_call": calls,
        "load": loads,
        "data_dir": str(data),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip() or None,
        "threads": os.environ.get("OMP_NUM_THREADS"),
    }
