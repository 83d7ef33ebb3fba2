"""The one stage protocol: every stage of the flywheel (``tasks/``) is built through :func:`run_stage`.

A stage's key is the digest of its name, the params it reads and its inputs' identities (upstream output
digests, the base's digest). When ``<out>/manifest.json`` holds that key the stage is skipped; otherwise it
is built in ``.tmp-<out>`` beside the output, the manifest is written last and the directory is renamed
into place (:func:`pld_core.artifacts.atomic_dir`), so a half-written artifact is never visible. A
resumable stage (``resume=True``) keeps its temp dir across a crash and continues from what is in it,
but only when that temp dir was started under the same key.

Every manifest has the same fields: ``stage``, ``key``, ``params``, ``inputs``, ``metrics``,
``output_digest``, ``code_version``, ``finished_at``, ``compute_seconds``; the returned dict adds
``skipped``. A stage that had nothing to work from records ``metrics.no_data`` and ``metrics.reason``.
"""

from __future__ import annotations

import gc
import logging
import shutil
import time
from pathlib import Path
from typing import Callable

from pld_core.artifacts import atomic_dir, digest_json, finish_manifest, is_fresh, read_manifest, require_manifest, tmp_dir_for

log = logging.getLogger("pld")

RUN_KEY = ".run_key"  # in a resumable stage's temp dir: the key it was started under (removed before the manifest)


def stage_key(stage: str, params_used: dict, inputs: dict) -> str:
    return digest_json({"stage": stage, "params": params_used, "inputs": inputs})


def run_stage(stage: str, out_dir: Path, params_used: dict, inputs: dict, build: Callable[[Path], dict],
              resume: bool = False, force: bool = False) -> dict:
    """Skip when the manifest key matches; else ``build(tmp) -> metrics`` in a temp dir, manifest last, rename.

    ``resume``: an interrupted build's temp dir is kept and handed to ``build`` again if it was started with
    the same key (``build`` continues from its checkpoints); a temp dir of other params or inputs is cleared.
    """
    out_dir = Path(out_dir)
    key = stage_key(stage, params_used, inputs)
    if not force and is_fresh(out_dir, key):
        m = read_manifest(out_dir)
        m["skipped"] = True
        log.info("%s: up to date (%s)", stage, out_dir)
        return m
    if resume:
        tmp = tmp_dir_for(out_dir)
        started = (tmp / RUN_KEY).read_text().strip() if (tmp / RUN_KEY).is_file() else None
        if tmp.exists() and started != key:
            shutil.rmtree(tmp)  # an interrupted run with other params or inputs: start over
    with atomic_dir(out_dir, resume=resume) as tmp:
        if resume:
            (tmp / RUN_KEY).write_text(key)
        t0 = time.perf_counter()
        metrics = build(tmp) or {}
        (tmp / RUN_KEY).unlink(missing_ok=True)
        finish_manifest(tmp, stage, key, params_used, inputs, metrics, compute_seconds=time.perf_counter() - t0)
    # whatever the build left in reference cycles (a model, a replay buffer) goes now, not when the collector
    # happens to run: a flywheel process builds stage after stage, each may load a multi-GB base
    gc.collect()
    m = read_manifest(out_dir)
    m["skipped"] = False
    return m


def input_digests(**dirs: Path | None) -> dict:
    """Output digests of upstream stage dirs (their manifests must exist: never consume half an artifact)."""
    return {name: require_manifest(Path(d), name)["output_digest"] for name, d in dirs.items() if d is not None}


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
