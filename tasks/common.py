"""What every stage shares: the artifact layout under ``flywheel.data_dir`` and the skip/build/manifest
protocol (key = digest of the params read and of the inputs' output digests)."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pld_core.artifacts import atomic_dir, digest_json, finish_manifest, is_fresh, read_manifest, require_manifest
from pld_core.config import Params
from pld_core.errors import PLDError

log = logging.getLogger("pld")


@dataclass(frozen=True)
class Layout:
    """Paths of every artifact, one place for the whole data flow."""

    root: Path

    @classmethod
    def of(cls, params: Params, project_root: Path | None = None) -> "Layout":
        root = Path(params.flywheel.data_dir)
        if not root.is_absolute():
            root = Path(project_root or os.getcwd()) / root
        return cls(root)

    @property
    def demos(self) -> Path:
        return self.root / "demos"

    def base(self, version: int) -> Path:
        """The stage dir whose ``pretrained_model`` is base ``v<version>``."""
        return self.root / "base_v0" if version == 0 else self.iteration(version - 1) / "base_next"

    def base_eval(self, version: int) -> Path:
        return self.root / "base_v0_eval" if version == 0 else self.iteration(version - 1) / "eval"

    def iteration(self, k: int) -> Path:
        return self.root / f"iter_{k}"

    def task_dir(self, k: int, suite: str, task: int) -> Path:
        return self.iteration(k) / f"{suite}-{task}"

    def offline(self, k, suite, task) -> Path:
        return self.task_dir(k, suite, task) / "offline"

    def critic_init(self, k, suite, task) -> Path:
        return self.task_dir(k, suite, task) / "critic_init"

    def residual(self, k, suite, task) -> Path:
        return self.task_dir(k, suite, task) / "residual"

    def pld(self, k, suite, task) -> Path:
        # all tasks' PLD data under one folder: convert_dataset (and DVC) depend on that folder
        return self.iteration(k) / "pld" / f"{suite}-{task}"

    def dataset_raw(self, k) -> Path:
        return self.iteration(k) / "pld_dataset_raw"

    def dataset(self, k) -> Path:
        return self.iteration(k) / "pld_dataset"

    def figures(self) -> Path:
        return self.root / "figures"


def base_checkpoint(params: Params, layout: Layout, version: int) -> str:
    """Base ``v<version>`` as a policy spec: a pretrained_model dir, a user's path/hub id, or 'scripted...'."""
    if version == 0 and params.base.path:
        return params.base.path
    d = layout.base(version)
    require_manifest(d, f"base v{version}")
    return str(d / "pretrained_model")


def base_digest(params: Params, layout: Layout, version: int) -> str:
    if version == 0 and params.base.path:
        return digest_json({"base_path": params.base.path})
    return require_manifest(layout.base(version), f"base v{version}")["output_digest"]


def input_digests(**dirs: Path | None) -> dict:
    """Output digests of upstream stage dirs (their manifests must exist: never consume half an artifact)."""
    out = {}
    for name, d in dirs.items():
        if d is None:
            continue
        out[name] = require_manifest(Path(d), name)["output_digest"]
    return out


def run_stage(stage: str, out_dir: Path, params_used: dict, inputs: dict, build: Callable[[Path], dict],
              resume: bool = False, force: bool = False) -> dict:
    """Skip when the manifest key matches; else build in a temp dir, manifest last, rename into place."""
    key = digest_json({"stage": stage, "params": params_used, "inputs": inputs})
    if not force and is_fresh(out_dir, key):
        m = read_manifest(out_dir)
        m["skipped"] = True
        log.info("%s: up to date (%s)", stage, out_dir)
        return m
    with atomic_dir(out_dir, resume=resume) as tmp:
        t0 = time.perf_counter()
        metrics = build(tmp) or {}
        finish_manifest(tmp, stage, key, params_used, inputs, metrics, compute_seconds=time.perf_counter() - t0)
    m = read_manifest(out_dir)
    m["skipped"] = False
    return m


def check_suite_task(params: Params, task: int) -> None:
    if task not in params.env.tasks:
        raise PLDError(f"task {task} is not in env.tasks {params.env.tasks} of params.yaml. Fix: add it to env.tasks or pick one of them")


def no_data_reason(manifest: dict | None) -> str | None:
    """Why a finished stage has no data for the next one (a base or a specialist that never succeeded),
    or None. That is an outcome the stage records, not an error: the iteration goes on without the task."""
    metrics = (manifest or {}).get("metrics") or {}
    return metrics.get("reason", "no data") if metrics.get("no_data") else None


def record_no_data(stage: str, out_dir: Path, params_used: dict, upstream: tuple[str, Path, str],
                   force: bool = False) -> dict | None:
    """If the upstream stage (``(input name, its dir, what it is)``) recorded no data, record the same reason as
    this stage's manifest (keyed on the upstream digest, so a rerun skips it) and return it; else None."""
    name, up_dir, what = upstream
    manifest = require_manifest(Path(up_dir), what)
    reason = no_data_reason(manifest)
    if reason is None:
        return None
    log.warning("%s: no data (%s); recorded in %s", stage, reason, out_dir)
    inputs = {name: manifest["output_digest"]}
    return run_stage(stage, out_dir, params_used, inputs, lambda tmp: {"no_data": True, "reason": reason}, force=force)
