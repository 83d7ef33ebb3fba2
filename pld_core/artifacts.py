"""Crash-safe stage outputs: build in a temp dir, rename into place, write the manifest last.

Every stage output is a directory holding ``manifest.json``. The manifest records the stage,
its key (a digest of the params it read and of its inputs' digests), the digest of its own
output files, the code version and the stage's metrics. A stage whose manifest key matches is
skipped; a directory without a manifest is incomplete and is never consumed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from pld_core.errors import PLDError

MANIFEST = "manifest.json"


def digest_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()[:16]


def digest_json(obj) -> str:
    return digest_bytes(json.dumps(obj, sort_keys=True, default=str).encode())


def digest_path(path: Path, exclude: tuple[str, ...] = (MANIFEST,)) -> str:
    """Content digest of a file or a directory tree (names and bytes, sorted)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and p.name not in exclude)
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def code_version() -> str:
    root = Path(__file__).resolve().parent.parent
    with contextlib.suppress(Exception):
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    return "unknown"


def read_manifest(out_dir: Path) -> dict | None:
    f = Path(out_dir) / MANIFEST
    if not f.exists():
        return None
    try:
        return json.loads(f.read_text())
    except (json.JSONDecodeError, OSError) as e:
        raise PLDError(f"{f}: unreadable manifest ({e}). Fix: delete {out_dir} to rebuild that stage") from None


def require_manifest(out_dir: Path, what: str) -> dict:
    m = read_manifest(out_dir)
    if m is None:
        raise PLDError(f"{out_dir}: {what} is missing or incomplete (no {MANIFEST}). Fix: run the stage that makes it first")
    return m


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def is_fresh(out_dir: Path, key: str) -> bool:
    m = read_manifest(out_dir)
    return m is not None and m.get("key") == key


def tmp_dir_for(final: Path) -> Path:
    return final.parent / f".tmp-{final.name}"


@contextlib.contextmanager
def atomic_dir(final: Path, resume: bool = False):
    """Yield a temp directory that becomes ``final`` on success.

    With ``resume=True`` an existing temp dir of an interrupted attempt is kept (the stage
    resumes from its checkpoints inside it); otherwise it is cleared. On an exception the temp
    dir is kept for resuming if ``resume`` else removed.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir_for(final)
    if tmp.exists() and not resume:
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
    except BaseException:
        if not resume:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)


def replace_dir(new: Path, dest: Path) -> None:
    """Put the complete directory ``new`` at ``dest``; an old ``dest`` goes only after that (and comes back if
    the move fails), so ``dest`` is always either the old or the new complete directory."""
    new, dest = Path(new), Path(dest)
    old = None
    if dest.exists():
        old = dest.parent / f".old-{dest.name}-{os.getpid()}-{time.time_ns()}"
        os.replace(dest, old)
    try:
        os.replace(new, dest)
    except BaseException:
        if old is not None and not dest.exists():
            os.replace(old, dest)  # put the old one back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def finish_manifest(out_dir: Path, stage: str, key: str, params: dict, inputs: dict, metrics: dict, digest_outputs: bool = True,
                    compute_seconds: float | None = None) -> dict:
    """Write ``manifest.json`` last. ``compute_seconds``: the stage's own work (building its outputs),
    which ``pld bench overhead`` sets against the flywheel's wall time."""
    manifest = {
        "stage": stage,
        "key": key,
        "params": params,
        "inputs": inputs,
        "metrics": metrics,
        "output_digest": digest_path(out_dir) if digest_outputs else None,
        "code_version": code_version(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "compute_seconds": None if compute_seconds is None else round(float(compute_seconds), 3),
        "built_by": {"host": socket.gethostname(), "pid": os.getpid()},  # which worker (Dask, Ray, the flow itself) built it
    }
    write_json_atomic(Path(out_dir) / MANIFEST, manifest)
    return manifest
