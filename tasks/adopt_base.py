"""Stage `base_v0` when ``base.path`` is set: base v0 is the user's checkpoint, hub id or scripted controller.
Nothing is trained; the stage records which base the flywheel starts from (``base.json``)."""

from __future__ import annotations

import json
from pathlib import Path

from pld_core.config import Params
from pld_core.stage import run_stage


def run(params: Params, out_dir: Path, force: bool = False) -> dict:
    def build(tmp: Path) -> dict:
        (tmp / "base.json").write_text(json.dumps({"spec": params.base.path}))
        return {"adopted": params.base.path}

    return run_stage("base_v0", out_dir, {"base_path": params.base.path}, {}, build, force=force)
