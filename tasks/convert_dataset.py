"""Stage `convert_dataset`: successful PLD episodes of all tasks (plus, optionally, the data the base
was made from) into one LeRobotDataset v3 whose features match the base."""

from __future__ import annotations

from pathlib import Path

from pld_core.config import Params
from pld_core.dataset import convert_stores
from pld_core.layout import PLD_STORE
from pld_core.stage import input_digests, run_stage


def run(params: Params, out_dir: Path, pld_dirs: list[Path], extra_dirs: list[Path] | None = None, repo_id: str = "local/pld", force: bool = False) -> dict:
    """``pld_dirs``: collect_pld outputs (``pld.zarr`` inside); ``extra_dirs``: e.g. the demos stage."""
    extra_dirs = list(extra_dirs or [])
    inputs = input_digests(**{f"pld_{i}": d for i, d in enumerate(pld_dirs)}, **{f"extra_{i}": d for i, d in enumerate(extra_dirs)})
    used = {"env_mode": params.env.mode, "repo_id": repo_id}
    keep_failures = params.flywheel.keep_failures
    if keep_failures:  # only when set: the keys of data dirs made without it stay valid
        used["keep_failures"] = True

    def build(tmp: Path) -> dict:
        stores = [Path(d) / PLD_STORE for d in pld_dirs] + [next(Path(d).glob("*.zarr")) for d in extra_dirs]
        root = tmp / "dataset"
        convert_stores(stores, root, repo_id=repo_id, use_images=params.env.mode == "images", label_key="label_action",
                       only_successful=not keep_failures)
        import json

        info = json.loads((root / "meta" / "info.json").read_text())
        return {"episodes": info["total_episodes"], "frames": info["total_frames"], "stores": [str(s) for s in stores]}

    return run_stage("convert_dataset", out_dir, used, inputs, build, force=force)
