"""`pld repro`: ``dvc repro`` of dvc.yaml, after checking that it can run at all.

DVC needs an initialised repository (a ``.dvc/`` directory here or in a parent, as DVC itself
looks for it) and ``dvc.yaml``; its stages run ``pld stage ...``, which read the top level of
params.yaml. Every check fails before DVC starts, so a failed check creates nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from pld_core.errors import PLDError


def require_dvc_repo(root: str | Path) -> Path:
    """The DVC repository root at or above ``root``; PLDError if there is none."""
    root = Path(root).resolve()
    for d in (root, *root.parents):
        if (d / ".dvc").is_dir():
            return d
    raise PLDError(f"{root}: not a DVC repository (no .dvc/ here or in a parent directory). "
                   f"Fix: run `dvc init` in {root} (`dvc init --no-scm` outside a Git repository), then rerun")


def require_pipeline(root: str | Path) -> Path:
    path = Path(root).resolve() / "dvc.yaml"
    if not path.is_file():
        raise PLDError(f"{path}: no DVC pipeline here. Fix: run `pld repro` from the project root, where dvc.yaml is")
    return path


def dvc_repro(root: str | Path, targets: list[str]) -> int:
    """Run ``dvc repro [targets]`` in ``root`` with this interpreter's bin dir first on PATH (so the
    stages' ``pld`` is this installation's)."""
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    dvc = shutil.which("dvc", path=env["PATH"])
    if dvc is None:
        raise PLDError("the `dvc` command is not installed. Fix: pip install dvc (it is a dependency of pld-flywheel)")
    return subprocess.run([dvc, "repro", *targets], cwd=str(root), env=env).returncode
