"""Distill, part 1: trajectory stores -> one LeRobotDataset (v3), plus quantile statistics.

The PLD stores hold successful hybrid episodes (PLD's "Learn"); the SFT stage wants them as
a LeRobotDataset that LeRobot's own trainer and loaders read unchanged. The feature names are
those of LeRobot's LIBERO datasets (see ``pld_core.features``): ``observation.state``,
``observation.environment_state``, ``observation.images.image`` / ``image2`` (stored as ``image``
features, ``use_videos=False``: no video codec needed, exact pixels) and ``action``, which is the
store's ``label_action`` (the base action during probing, the executed action after takeover).

Everything here runs offline. Nothing is pushed anywhere unless :func:`push_to_hub` is called.

Atomicity: :func:`convert_stores` builds the dataset in ``<out_root.parent>/.tmp-<name>-<pid>``
and renames it into place only when LeRobot has finalized it; an existing ``out_root`` is swapped
out only after the new one is complete. :func:`augment_quantiles` writes ``meta/stats.json``
through a temporary file and ``os.replace``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from pld_core.artifacts import replace_dir
from pld_core.errors import PLDError
from pld_core.features import ACT_DIM, ACTION_FEATURE, FPS, OBS_FEATURES, STATE_DIM

log = logging.getLogger(__name__)

QUANTILE_KEYS = ("q01", "q10", "q50", "q90", "q99")
ROBOT_TYPE = "panda"  # LIBERO's robot; only metadata for LeRobot
IMAGE_WRITER_THREADS = 4  # PNG encoding off the main thread (LeRobot's AsyncImageWriter)
STATE_NAMES = ["eef_x", "eef_y", "eef_z", "eef_axis_angle_x", "eef_axis_angle_y", "eef_axis_angle_z",
               "gripper_qpos_left", "gripper_qpos_right"]
ACTION_NAMES = ["x", "y", "z", "roll", "pitch", "yaw", "gripper"]
# store array -> LeRobot feature, for the two cameras
IMAGE_ARRAYS = {store: lr for store, lr, is_img in OBS_FEATURES.values() if is_img}
STATE_ARRAYS = {store: lr for store, lr, is_img in OBS_FEATURES.values() if not is_img}


# --------------------------------------------------------------------------------- helpers
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale_tmp(parent: Path, name: str) -> None:
    """Remove ``.tmp-<name>-<pid>`` left by a killed conversion (its pid is gone)."""
    for p in parent.glob(f".tmp-{name}-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def lerobot_features(obs_shapes: dict[str, tuple[int, ...]], use_images: bool) -> dict[str, dict]:
    """LeRobot feature spec for stores with these observation shapes."""
    state_dim = int(obs_shapes["obs_state"][0])
    env_dim = int(obs_shapes["obs_env_state"][0])
    feats: dict[str, dict] = {
        STATE_ARRAYS["obs_state"]: {
            "dtype": "float32", "shape": (state_dim,),
            "names": STATE_NAMES if state_dim == STATE_DIM else [f"state_{i}" for i in range(state_dim)],
        },
        STATE_ARRAYS["obs_env_state"]: {
            "dtype": "float32", "shape": (env_dim,), "names": [f"env_{i}" for i in range(env_dim)],
        },
    }
    if use_images:
        for store_key, lr_key in IMAGE_ARRAYS.items():
            h, w, c = (int(x) for x in obs_shapes[store_key])
            feats[lr_key] = {"dtype": "image", "shape": (h, w, c), "names": ["height", "width", "channels"]}
    feats[ACTION_FEATURE] = {"dtype": "float32", "shape": (ACT_DIM,), "names": ACTION_NAMES}
    return feats


def _store_plan(store_paths: list[Path], use_images: bool | None, label_key: str):
    """Open every store, check they agree, decide on images. Returns (stores, obs_shapes, use_images)."""
    from pld_core.store import STEP_ARRAYS, TrajectoryStore

    if not store_paths:
        raise PLDError("convert_stores: no trajectory store given. Fix: pass at least one .zarr store path")
    if label_key not in STEP_ARRAYS or STEP_ARRAYS[label_key] != "float32" or label_key in ("reward", "mc_return"):
        raise PLDError(f"convert_stores: label_key '{label_key}' is not an action array of the store. "
                       "Fix: use 'label_action' (the SFT label), 'action' or 'base_action'")
    stores = [TrajectoryStore.open(p) for p in store_paths]
    shapes = [{k: tuple(v) for k, v in s.attrs["obs_shapes"].items()} for s in stores]
    has_images = [all(k in sh for k in IMAGE_ARRAYS) for sh in shapes]
    if use_images is None:
        use_images = all(has_images)
        if any(has_images) and not use_images:
            log.warning("some stores have images and some not: converting without images")
    elif use_images:
        for s, ok in zip(stores, has_images):
            if not ok:
                raise PLDError(f"trajectory store {s.path}: use_images=True but it has no "
                               f"{' / '.join(IMAGE_ARRAYS)} arrays. Fix: collect it in images mode, or "
                               "convert with use_images=False")
    used = list(STATE_ARRAYS) + (list(IMAGE_ARRAYS) if use_images else [])
    ref = shapes[0]
    for s, sh in zip(stores[1:], shapes[1:]):
        for name in used:
            if sh[name] != ref[name]:
                raise PLDError(f"trajectory stores {stores[0].path} and {s.path} disagree on array "
                               f"'data/{name}': per-step shape {ref[name]} vs {sh[name]}. Fix: convert "
                               "stores collected with the same observation mode and suite together")
    if ref["obs_state"] != (STATE_DIM,):
        raise PLDError(f"trajectory store {stores[0].path}: 'data/obs_state' has shape {ref['obs_state']}, "
                       f"expected ({STATE_DIM},) (LeRobot LIBERO observation.state). Fix: recollect")
    return stores, ref, use_images


# --------------------------------------------------------------------------------- convert
def convert_stores(
    store_paths: list[Path],
    out_root: Path,
    repo_id: str,
    use_images: bool | None = None,
    label_key: str = "label_action",
    only_successful: bool = True,
) -> Path:
    """Convert trajectory stores into one LeRobotDataset v3 at ``out_root``; returns ``out_root``.

    ``use_images``: None = images when every store has both cameras; True = require them;
    False = state features only. ``action`` is the store's ``label_key`` array. Each frame's
    ``task`` is the language instruction ``task_names[task_index]`` of its own store.
    """
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    store_paths = [Path(p) for p in store_paths]
    out_root = Path(out_root)
    stores, obs_shapes, use_images = _store_plan(store_paths, use_images, label_key)
    features = lerobot_features(obs_shapes, use_images)

    out_root.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(out_root.parent, out_root.name)
    tmp = out_root.parent / f".tmp-{out_root.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    n_eps = 0
    ds = None
    try:
        ds = LeRobotDataset.create(repo_id=repo_id, fps=FPS, features=features, root=tmp,
                                   robot_type=ROBOT_TYPE, use_videos=False,
                                   image_writer_threads=IMAGE_WRITER_THREADS if use_images else 0)
        for store in stores:
            task_names = list(store.attrs["task_names"])
            # low-dim arrays in RAM (validated by the store); images one episode at a time
            low = store.load(list(STATE_ARRAYS) + [label_key])
            table = store.episode_table()
            ends = store.episode_ends
            starts = np.concatenate([[0], ends[:-1]])
            for i, row in table.iterrows():
                if only_successful and not bool(row.success):
                    continue
                s, e = int(starts[i]), int(ends[i])
                task = task_names[int(row.task_index)]
                images = {st: np.asarray(store.data[st][s:e]) for st in IMAGE_ARRAYS} if use_images else {}
                for t in range(s, e):
                    frame = {lr: np.asarray(low[st][t], dtype=np.float32) for st, lr in STATE_ARRAYS.items()}
                    for st, lr in (IMAGE_ARRAYS.items() if use_images else ()):
                        frame[lr] = images[st][t - s]
                    frame[ACTION_FEATURE] = np.asarray(low[label_key][t], dtype=np.float32)
                    frame["task"] = task
                    ds.add_frame(frame)
                ds.save_episode()
                n_eps += 1
        ds.finalize()
        if n_eps == 0:
            raise PLDError(f"convert_stores: no {'successful ' if only_successful else ''}episode in "
                           f"{[str(p) for p in store_paths]}. Fix: collect successful episodes first "
                           "(or pass only_successful=False)")
        with open(tmp / "meta" / "pld_sources.json", "w") as f:  # lineage, read by nobody in LeRobot
            json.dump({"stores": [str(p) for p in store_paths], "label_key": label_key,
                       "only_successful": only_successful, "use_images": use_images,
                       "episodes": n_eps}, f, indent=2)
        replace_dir(tmp, out_root)
    except BaseException:
        if ds is not None:  # else LeRobot's writer finalizes on garbage collection, into tmp
            with contextlib.suppress(Exception):
                ds.finalize()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_root


# --------------------------------------------------------------------------------- quantiles
def _exact_numeric_stats(ds, keys: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """Whole-dataset stats of the low-dim features from every frame (not an average of episodes)."""
    from lerobot.datasets.compute_stats import get_feature_stats

    out = {}
    cols = ds.hf_dataset.with_format(None).select_columns(keys)
    for key in keys:
        data = np.asarray(cols[key], dtype=np.float64)
        out[key] = get_feature_stats(data, axis=0, keepdims=data.ndim == 1)
    return out


MIN_STD = 1e-2


def floor_spread(ft_stats: dict, min_std: float = MIN_STD) -> None:
    """Give near-constant features a minimum spread, in place.

    A feature that never moves in the data (the basket's height while it rests) has std 0, and
    LeRobot's normalizer divides by ``std + 1e-8``: at run time a 1e-6 m nudge of the basket becomes
    an input of 100 and the policy's actions go wild exactly when the object touches the basket.
    Flooring std (and the quantile/min-max ranges) at ``min_std`` keeps such inputs near 0.
    """
    std = np.asarray(ft_stats["std"], dtype=np.float64)
    ft_stats["std"] = np.maximum(std, min_std)
    for lo_key, hi_key in (("min", "max"), ("q01", "q99"), ("q10", "q90")):
        if lo_key in ft_stats and hi_key in ft_stats:
            lo, hi = np.asarray(ft_stats[lo_key], np.float64), np.asarray(ft_stats[hi_key], np.float64)
            mid, half = (lo + hi) / 2, np.maximum((hi - lo) / 2, min_std)
            ft_stats[lo_key], ft_stats[hi_key] = mid - half, mid + half


def augment_quantiles(root: Path, repo_id: str | None = None, min_std: float = MIN_STD) -> dict:
    """Compute q01/q10/q50/q90/q99 for every feature and write them to ``root/meta/stats.json``.

    Uses LeRobot's ``compute_quantile_stats_for_dataset`` (per episode, then aggregated) and
    ``write_stats``; never the hub-pushing CLI. LeRobot aggregates quantiles as the count-weighted
    mean of per-episode quantiles, which is wrong for features that are constant within an episode
    (the task one-hot in ``observation.environment_state``: its q99 becomes the task's share of
    frames instead of 1). For the low-dimensional features we therefore replace those by quantiles
    over all frames, computed with the same LeRobot estimator; images keep LeRobot's numbers.
    """
    from lerobot.datasets.io_utils import load_stats, write_stats
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from lerobot.scripts.augment_dataset_quantile_stats import compute_quantile_stats_for_dataset

    root = Path(root)
    info_path = root / "meta" / "info.json"
    if not info_path.is_file():
        raise PLDError(f"LeRobot dataset {root}: {info_path} is missing. Fix: point at a dataset made by "
                       "convert_stores (a LeRobotDataset v3 root)")
    repo_id = repo_id or f"local/{root.name}"
    try:
        ds = LeRobotDataset(repo_id, root=root)
    except Exception as e:
        raise PLDError(f"LeRobot dataset {root} cannot be loaded ({type(e).__name__}: {e}). "
                       "Fix: reconvert it with convert_stores") from e
    stats = compute_quantile_stats_for_dataset(ds)
    numeric = [k for k, ft in ds.features.items()
               if ft["dtype"] in ("float32", "float64") and k in stats]
    stats.update(_exact_numeric_stats(ds, numeric))
    for key in numeric:
        if key.startswith("observation.") or key == ACTION_FEATURE:
            floor_spread(stats[key], min_std)
    old = load_stats(root) or {}
    for key, ft_stats in old.items():  # keep features LeRobot's augmenter skips
        stats.setdefault(key, ft_stats)

    # write_stats writes in place; go through a temp dir + os.replace so a crash leaves the old file
    stats_path = root / "meta" / "stats.json"
    staging = root / "meta" / f".stats-staging-{os.getpid()}"
    staging.mkdir(exist_ok=True)
    try:
        (staging / "meta").mkdir(exist_ok=True)
        write_stats(stats, staging)
        os.replace(staging / "meta" / "stats.json", stats_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    written = json.loads(stats_path.read_text())
    for key in (ACTION_FEATURE, STATE_ARRAYS["obs_state"]):
        for q in ("q01", "q99"):
            if key not in written or q not in written[key]:
                raise PLDError(f"LeRobot dataset {root}: meta/stats.json lacks '{key}.{q}' after "
                               "augmenting. Fix: check the dataset has the feature, then rerun")
    summary = {
        "root": str(root),
        "episodes": int(ds.num_episodes),
        "frames": int(ds.num_frames),
        "features": {k: {q: written[k][q] for q in ("q01", "q99")} for k in (ACTION_FEATURE, STATE_ARRAYS["obs_state"])},
        "quantile_features": sorted(k for k, v in written.items() if "q01" in v),
    }
    return summary


# --------------------------------------------------------------------------------- hub
def push_to_hub(root_or_dir: Path, repo_id: str, kind: str, private: bool | None = None,
                timeout_s: float = 10.0) -> str:
    """Upload a dataset root (``kind="dataset"``) or a pretrained_model dir (``kind="model"``).

    Authentication comes from ``HF_TOKEN`` or ``hf auth login`` only. The hub is probed first
    with a short timeout, so an offline machine fails in seconds with a PLDError.
    Returns the repo URL.
    """
    import huggingface_hub
    from huggingface_hub import HfApi, constants

    root = Path(root_or_dir)
    if kind not in ("dataset", "model"):
        raise PLDError(f"push_to_hub: kind '{kind}' unknown. Fix: use 'dataset' or 'model'")
    if not root.is_dir():
        raise PLDError(f"push_to_hub: {root} is not a directory. Fix: point at a dataset root or a pretrained_model dir")
    marker = root / ("meta/info.json" if kind == "dataset" else "config.json")
    if not marker.is_file():
        raise PLDError(f"push_to_hub: {marker} is missing, so {root} is not a LeRobot {kind}. "
                       "Fix: point at the right directory")
    if constants.HF_HUB_OFFLINE:
        raise PLDError(f"push_to_hub {root} -> {repo_id}: HF_HUB_OFFLINE is set, the hub cannot be reached. "
                       "Fix: unset HF_HUB_OFFLINE on a machine with network access")
    endpoint = constants.ENDPOINT
    try:  # fast reachability probe: the upload calls retry for much longer
        import requests

        requests.head(endpoint, timeout=timeout_s, allow_redirects=False)
    except Exception as e:
        raise PLDError(f"push_to_hub {root} -> {repo_id}: hub endpoint {endpoint} unreachable "
                       f"({type(e).__name__}). Fix: check the network / HF_ENDPOINT, then rerun") from e
    api = HfApi()
    try:
        if huggingface_hub.get_token() is None:
            raise PLDError(f"push_to_hub {root} -> {repo_id}: no token. Fix: set HF_TOKEN or run `hf auth login`")
        api.create_repo(repo_id, repo_type=kind, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, repo_type=kind, folder_path=str(root),
                          ignore_patterns=["images/", ".*"])
    except PLDError:
        raise
    except Exception as e:
        raise PLDError(f"push_to_hub {root} -> {repo_id} failed ({type(e).__name__}: {e}). "
                       "Fix: check the token's write access and the repo id") from e
    return f"{endpoint}/{'datasets/' if kind == 'dataset' else ''}{repo_id}"
