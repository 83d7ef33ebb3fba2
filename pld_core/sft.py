"""Distill, part 2: supervised fine-tuning of the base on the PLD dataset, with LeRobot's trainer.

``sft(...)`` runs ``lerobot.scripts.lerobot_train`` (the ``lerobot-train`` entry point) in a child
process and returns ``<out_dir>/pretrained_model``, a standard LeRobot checkpoint that
``<Policy>.from_pretrained`` + ``make_pre_post_processors(pretrained_path=...)`` load (and so
``pld_core.base_policy.BasePolicy``): it is base version K+1.

Why a child process: a crash (or an out-of-memory kill) of the trainer cannot take the pipeline
with it, the trainer's global state (logging, seeds, accelerate) stays out of ours, and a killed
run leaves ``checkpoints/last`` behind, from which the next call resumes with LeRobot's own
``--config_path=.../train_config.json --resume=true`` (data order, optimizer and scheduler state
included). Work happens in ``<out_dir.parent>/.tmp-<name>/`` and the result is renamed into place
only when complete; an older ``out_dir`` is replaced only then.

Two ways to start (``init``):

* a checkpoint directory (or hub id): fine-tune the CURRENT base, LeRobot's ``--policy.path``.
  Its config (architecture, chunking, normalization modes) is kept; ``lr`` overrides
  ``optimizer_lr`` when given.
* a policy config dict, e.g. ``{"type": "act", "dim_model": 128, ...}``: a new base trained from
  scratch (how the embedded default bootstraps base v0 from scripted demonstrations). For ACT
  ``pretrained_backbone_weights`` defaults to None here (no download; state-only anyway).

Normalization when fine-tuning from a checkpoint (``norm_stats``). LeRobot's trainer, given
``--policy.path`` without ``--resume``, re-fits the checkpoint's normalizer and unnormalizer to the
new dataset (it passes ``dataset.meta.stats`` as processor overrides). For distillation that is
the wrong default: the weights were learned in the base's normalized space, so new statistics
shift every input and output of the network before the first gradient step, and a PLD dataset (only
successes, possibly only some tasks) has narrower statistics than the data the base was trained
on. Default ``norm_stats="base"`` therefore keeps the base's statistics: the trainer reads the
dataset through a view (symlinks to the dataset's files) whose ``meta/stats.json`` carries the
base checkpoint's own normalizer statistics, so the fine-tune starts exactly at the base policy
and every base version shares one normalization (as openpi reuses a base model's norm stats when
fine-tuning). ``norm_stats="dataset"`` gives LeRobot's behaviour (re-fit to the dataset; with
quantile normalization the dataset then needs q01/q99: run ``augment_quantiles`` first). A resumed
run always uses the statistics saved in its checkpoint, as LeRobot does.

LoRA (``lora={"r": 32, ...}``). LeRobot 0.6.1 trains PEFT adapters through ``--peft.*``
(``method_type``, ``r``, ``lora_alpha``, ``target_modules``, ``full_training_modules``,
``init_type``), needs the ``peft`` package (``pip install "lerobot[peft]==0.6.1"``; not in this
project's default install) and a pretrained ``init`` (LeRobot refuses PEFT from scratch). pi0, pi0.5,
smolvla, wall_x and molmoact2 define default target modules; for other types (ACT, diffusion, ...)
``target_modules`` must be given. Anything else raises PLDError before training. The trainer saves
only the adapter; ``sft`` merges it into the base weights (``merge_and_unload``) so the output is a
full checkpoint again, with the adapter kept in ``pretrained_model/lora_adapter/``.

pi0.5 (the GPU path; at full size 19 GB and minutes per chunk on a CPU; profile ``pi05-tiny`` runs a random gemma_300m
one here, through ``python -m pld_core.train``, see ``pld_core/pi05.py``): run the flywheel in ``images``
mode (its inputs are ``observation.images.image`` / ``image2`` + ``observation.state`` + the
task text); pi0.5 normalizes state and action with QUANTILES, so the dataset must carry q01/q99
(``augment_quantiles``) whenever the statistics come from the dataset (``norm_stats="dataset"`` or
a config ``init``); its tokenizer (``google/paligemma-3b-pt-224``) must be in the local HF cache
when offline; the PLD paper fine-tunes it with LoRA rank 32: ``lora={"r": 32, "lora_alpha": 32}``
with ``init`` = the pi0.5 checkpoint and ``device="cuda"`` (default lr 2.5e-5 with cosine decay).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from pld_core.base_policy import PI_TYPES, read_checkpoint_config, require_device, resolve_checkpoint
from pld_core.artifacts import replace_dir
from pld_core.errors import PLDError
from pld_core.lora import check_merge_space, lora_options, merge_lora

log = logging.getLogger(__name__)

NORM_STATS_MODES = ("base", "dataset")
QUANTILE_MODES = {"QUANTILES": ("q01", "q99"), "QUANTILE10": ("q10", "q90")}
TRAIN_MODULE = "lerobot.scripts.lerobot_train"
PATCHED_TRAIN_MODULE = "pld_core.train"  # the same trainer, for pi0/pi0.5 with pld_core.pi05.patch_lerobot applied


# --------------------------------------------------------------------------------- helpers
def _cli_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v)
    return str(v)


def _dataset_info(root: Path) -> dict:
    info_path = root / "meta" / "info.json"
    if not info_path.is_file():
        raise PLDError(f"SFT dataset {root}: {info_path} is missing, so it is not a LeRobotDataset. "
                       "Fix: build it with pld_core.dataset.convert_stores")
    return json.loads(info_path.read_text())


def _dataset_digest(root: Path) -> str:
    """Cheap identity of a dataset's content: every file's path, size and mtime."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def checkpoint_norm_stats(ckpt: Path) -> dict[str, dict]:
    """The normalizer (and unnormalizer) statistics saved with a LeRobot checkpoint."""
    from safetensors.numpy import load_file

    ckpt = Path(ckpt)
    stats: dict[str, dict] = {}
    for pipe_file, step_name in (("policy_postprocessor.json", "unnormalizer_processor"),
                                 ("policy_preprocessor.json", "normalizer_processor")):
        pipe = _load_json(ckpt / pipe_file)
        for step in pipe.get("steps", []):
            if step.get("registry_name") == step_name and step.get("state_file"):
                for flat, arr in load_file(str(ckpt / step["state_file"])).items():
                    feature, stat = flat.rsplit(".", 1)
                    stats.setdefault(feature, {})[stat] = arr
    return stats


def _check_dataset_for_checkpoint(root: Path, info: dict, ckpt: Path, raw: dict) -> None:
    feats = info.get("features", {})
    wanted = {**(raw.get("input_features") or {}), **(raw.get("output_features") or {})}
    for key, ft in wanted.items():
        if key not in feats:
            raise PLDError(f"SFT dataset {root} has no feature '{key}', which checkpoint {ckpt} takes. "
                           "Fix: convert the stores in the observation mode the base was trained in")
        shape, ds_shape = tuple(ft.get("shape", ())), tuple(feats[key]["shape"])
        if feats[key]["dtype"] in ("image", "video"):
            ds_shape = (ds_shape[-1], *ds_shape[:-1])  # dataset HWC, policy CHW
            ok = ds_shape[0] == shape[0] if shape else True
        else:
            ok = ds_shape == shape
        if not ok:
            raise PLDError(f"SFT dataset {root}: feature '{key}' has shape {ds_shape}, checkpoint {ckpt} "
                           f"expects {shape}. Fix: convert stores from the same suite / observation mode")


def _check_quantiles(root: Path, norm_map: dict, feature_types: dict[str, str]) -> None:
    """Quantile normalization needs the quantiles in the statistics it is fitted to."""
    stats = _load_json(root / "meta" / "stats.json")
    for key, ftype in feature_types.items():
        mode = str(norm_map.get(ftype, "")).split(".")[-1].upper()
        for q in QUANTILE_MODES.get(mode, ()):
            if q not in stats.get(key, {}):
                raise PLDError(f"SFT dataset {root}: meta/stats.json lacks '{key}.{q}', which {mode} "
                               "normalization needs. Fix: run pld_core.dataset.augment_quantiles on it first")


def _feature_types(info: dict) -> dict[str, str]:
    from lerobot.utils.feature_utils import dataset_to_policy_features

    return {k: ft.type.name for k, ft in dataset_to_policy_features(info["features"]).items()}


def _make_view(dataset_root: Path, view: Path, base_stats: dict) -> None:
    """A dataset root whose files are the dataset's, except meta/stats.json (base statistics)."""
    from lerobot.datasets.io_utils import load_stats, write_stats

    if view.exists():
        shutil.rmtree(view)
    view.mkdir(parents=True)
    for entry in dataset_root.iterdir():
        if entry.name != "meta":
            (view / entry.name).symlink_to(entry.resolve())
    (view / "meta").mkdir()
    for entry in (dataset_root / "meta").iterdir():
        if entry.name != "stats.json":
            (view / "meta" / entry.name).symlink_to(entry.resolve())
    stats = load_stats(dataset_root) or {}
    stats.update(base_stats)  # per feature: the base's statistics win
    write_stats(stats, view)


def _last_step(train_dir: Path) -> int | None:
    state = _load_json(train_dir / "checkpoints" / "last" / "training_state" / "training_step.json")
    cfg = train_dir / "checkpoints" / "last" / "pretrained_model" / "train_config.json"
    return int(state["step"]) if "step" in state and cfg.is_file() else None


def _parse_log(text: str) -> dict:
    losses = re.findall(r"\bloss:([-\d.eE+]+)", text)
    step_s = [float(u) + float(d) for u, d in re.findall(r"updt_s:([\d.]+) data_s:([\d.]+)", text)]
    return {"final_loss": float(losses[-1]) if losses else None,
            "train_step_s": sum(step_s) / len(step_s) if step_s else None}


def _run(cmd: list[str], log_path: Path, timeout_s: float | None, env: dict) -> int:
    with open(log_path, "a") as logf:
        logf.write(f"\n$ {' '.join(cmd)}\n")
        logf.flush()
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
        try:
            return proc.wait(timeout=timeout_s)
        except BaseException:  # timeout, KeyboardInterrupt: stop the trainer and its data workers
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
            raise


def _tail(path: Path, n: int = 25) -> str:
    lines = [ln for ln in path.read_text(errors="replace").splitlines()
             if ln.strip() and "libtorchcodec" not in ln and "FFmpeg" not in ln]
    return "\n".join(lines[-n:])


# --------------------------------------------------------------------------------- sft
def sft(
    dataset_root: Path,
    repo_id: str,
    out_dir: Path,
    init: Path | str | dict,
    steps: int,
    batch_size: int,
    lr: float | None = None,
    seed: int = 1000,
    num_workers: int = 0,
    lora: dict | None = None,
    device: str = "cpu",
    log_freq: int = 100,
    save_freq: int | None = None,
    norm_stats: str = "base",
    timeout_s: float | None = None,
    num_threads: int | None = None,
) -> Path:
    """Train with LeRobot's trainer and return ``out_dir/pretrained_model`` (see the module doc).

    ``save_freq``: checkpoint period in steps (default ``max(steps // 5, 100)``; the last step is
    always saved); a rerun after a crash or ``timeout_s`` resumes from the newest checkpoint.
    ``num_threads``: CPU threads of the trainer (OMP/MKL); small models on shared cores train
    many times faster with 1 than with an oversubscribed default.
    ``log_freq``: trainer log period in steps, capped at ``steps`` so that a run shorter than
    one period still reports its loss and step time.
    """
    dataset_root, out_dir = Path(dataset_root).resolve(), Path(out_dir).resolve()
    if steps <= 0 or batch_size <= 0:
        raise PLDError(f"sft: steps ({steps}) and batch_size ({batch_size}) must be positive. Fix: params.yaml sft section")
    if norm_stats not in NORM_STATS_MODES:
        raise PLDError(f"sft: norm_stats '{norm_stats}' unknown. Fix: use one of {NORM_STATS_MODES}")
    require_device(device, "sft")
    info = _dataset_info(dataset_root)
    ftypes = _feature_types(info)
    save_freq = save_freq or max(steps // 5, 100)

    # ---- what to start from
    policy_args: list[str] = []
    base_stats = None
    if isinstance(init, dict):
        from lerobot.policies.factory import make_policy_config

        pcfg = dict(init)
        ptype = pcfg.pop("type", None)
        if not ptype:
            raise PLDError("sft init: the policy config dict has no 'type'. Fix: e.g. {'type': 'act', ...}")
        if ptype == "act":
            pcfg.setdefault("pretrained_backbone_weights", None)  # no torchvision download
        try:
            cfg_obj = make_policy_config(ptype, **pcfg)
        except (TypeError, ValueError) as e:
            raise PLDError(f"sft init: policy config {init} is invalid for type '{ptype}' ({e}). "
                           "Fix: use the field names of LeRobot's config class for that type") from e
        norm_map = {k: str(v) for k, v in cfg_obj.normalization_mapping.items()}
        policy_args = [f"--policy.type={ptype}"] + [f"--policy.{k}={_cli_value(v)}" for k, v in pcfg.items()]
        init_desc: str | dict = dict(init)
        if lr is not None:
            if not hasattr(cfg_obj, "optimizer_lr"):
                raise PLDError(f"sft: lr given but policy type '{ptype}' has no optimizer_lr. Fix: lr=None")
            policy_args.append(f"--policy.optimizer_lr={lr}")
        _check_quantiles(dataset_root, norm_map, ftypes)
    else:
        ckpt = resolve_checkpoint(init)
        raw = read_checkpoint_config(ckpt)
        ptype = raw["type"]
        _check_dataset_for_checkpoint(dataset_root, info, ckpt, raw)
        policy_args = [f"--policy.path={ckpt}"]
        init_desc = str(ckpt)
        if lr is not None:
            if "optimizer_lr" not in raw:
                raise PLDError(f"sft: lr given but checkpoint {ckpt} ({ptype}) has no optimizer_lr. Fix: lr=None")
            policy_args.append(f"--policy.optimizer_lr={lr}")
        if norm_stats == "base":
            base_stats = checkpoint_norm_stats(ckpt)
            if not base_stats:
                raise PLDError(f"sft: checkpoint {ckpt} has no normalizer statistics in its processor files. "
                               "Fix: use norm_stats='dataset'")
        else:
            _check_quantiles(dataset_root, raw.get("normalization_mapping") or {}, ftypes)
    peft_args: list[str] = []
    if lora:
        peft = lora_options(lora, not isinstance(init, dict), ptype)
        check_merge_space(ckpt, out_dir)  # before training, not after it
        peft_args = [f"--peft.{k}={_cli_value(v)}" for k, v in peft.items()]

    request = {"dataset_root": str(dataset_root), "dataset_frames": info.get("total_frames"),
               "dataset_digest": _dataset_digest(dataset_root),
               "repo_id": repo_id, "init": init_desc, "batch_size": batch_size, "lr": lr, "seed": seed,
               "lora": lora, "device": device, "norm_stats": norm_stats}

    # ---- work dir: resume a previous attempt with the same request, else start clean
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".tmp-{out_dir.name}"
    train_dir, log_path = tmp / "train", tmp / "train.log"
    lock = _lock(out_dir)
    try:
        prev = _load_json(tmp / "request.json")
        last = _last_step(train_dir) if prev == request else None
        if last is not None and last > steps:
            last = None  # cannot go back: start over
        if last is None:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            (tmp / "request.json").write_text(json.dumps(request, indent=2))
        data_root = dataset_root
        if base_stats is not None:
            data_root = tmp / "dataset_view"
            if last is None:
                _make_view(dataset_root, data_root, base_stats)

        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.setdefault("WANDB_MODE", "disabled")
        if num_threads:
            env |= {"OMP_NUM_THREADS": str(num_threads), "MKL_NUM_THREADS": str(num_threads)}
        module = PATCHED_TRAIN_MODULE if ptype in PI_TYPES else TRAIN_MODULE
        common = [f"--steps={steps}", f"--save_freq={save_freq}", f"--log_freq={min(log_freq, steps)}"]
        if last is None:
            cmd = [sys.executable, "-m", module,
                   f"--dataset.repo_id={repo_id}", f"--dataset.root={data_root}",
                   *policy_args, f"--policy.device={device}", "--policy.push_to_hub=false",
                   f"--batch_size={batch_size}", f"--num_workers={num_workers}", f"--seed={seed}",
                   f"--output_dir={train_dir}", "--wandb.enable=false", "--env_eval_freq=0",
                   *common, *peft_args]
        else:
            cfg_path = train_dir / "checkpoints" / "last" / "pretrained_model" / "train_config.json"
            cmd = [sys.executable, "-m", module, f"--config_path={cfg_path}", "--resume=true", *common]
            log.info("sft: resuming %s from step %d of %d", train_dir, last, steps)

        t0 = time.time()
        if last is None or last < steps:
            try:
                rc = _run(cmd, log_path, timeout_s, env)
            except subprocess.TimeoutExpired:
                got = _last_step(train_dir)
                raise PLDError(f"sft: training timed out after {timeout_s} s (last checkpoint: step {got}); "
                               f"log {log_path}. Fix: rerun the same call to resume, or raise timeout_s") from None
            if rc != 0:
                got = _last_step(train_dir)
                raise PLDError(f"sft: lerobot-train failed (exit {rc}); log {log_path}:\n{_tail(log_path)}\n"
                               f"Fix: read the error above; rerunning the same call "
                               f"{'resumes from step ' + str(got) if got else 'starts over'}")
        wall = time.time() - t0
        got = _last_step(train_dir)
        if got != steps:
            raise PLDError(f"sft: training ended at step {got}, expected {steps}; log {log_path}. Fix: rerun to resume")
        return _publish(tmp, train_dir, out_dir, request, steps, last, wall, log_path, lora,
                        None if isinstance(init, dict) else Path(init_desc), device, dataset_root)
    finally:
        _unlock(lock)


def _publish(tmp: Path, train_dir: Path, out_dir: Path, request: dict, steps: int, resumed_from: int | None,
             wall: float, log_path: Path, lora: dict | None, base_ckpt: Path | None, device: str,
             dataset_root: Path) -> Path:
    """Move the last checkpoint's pretrained_model into place, with sft_info.json beside it."""
    stage = tmp / "publish"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    src = train_dir / "checkpoints" / "last" / "pretrained_model"
    if lora:
        merge_lora(src, base_ckpt, stage / "pretrained_model", device=device)
    else:
        os.replace(src.resolve(), stage / "pretrained_model")
    tc_path = stage / "pretrained_model" / "train_config.json"
    tc = _load_json(tc_path)
    if tc:  # point the lineage at the real dataset and output, not at the deleted work dir
        tc.setdefault("dataset", {})["root"] = str(dataset_root)
        tc["output_dir"] = str(out_dir)
        tc_path.write_text(json.dumps(tc, indent=4))
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    parsed = _parse_log(text)
    info = {**request, "steps": steps, "resumed_from_step": resumed_from, "wall_s": round(wall, 2),
            **parsed, "train_steps_per_s": (1.0 / parsed["train_step_s"]) if parsed["train_step_s"] else None}
    (stage / "sft_info.json").write_text(json.dumps(info, indent=2))
    if log_path.exists():
        shutil.copy2(log_path, stage / "train.log")
    replace_dir(stage, out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / "pretrained_model"


def init_policy(dataset_root: Path, policy: dict, out_dir: Path, tokenizer: str | Path | None = None,
                tokenizer_as: str | Path | None = None, device: str = "cpu") -> Path:
    """A LeRobot checkpoint of ``policy`` (a config dict) at initialisation, with the dataset's features and
    normalization statistics: ``out_dir/pretrained_model``. No training: base v0 with ``base.steps: 0``, for a base
    too large to train here (a random pi0.5). ``tokenizer``: what the processor's tokenizer step loads instead of
    the name LeRobot hard-codes (a local dir or hub id); ``tokenizer_as``: the path saved in the processor's JSON
    instead, where the tokenizer will live once ``out_dir`` is moved into place."""
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata
    from lerobot.policies.factory import make_policy, make_policy_config, make_pre_post_processors

    from pld_core.pi05 import local_tokenizer, patch_lerobot

    dataset_root, out_dir = Path(dataset_root), Path(out_dir)
    info = _dataset_info(dataset_root)
    pcfg = dict(policy)
    ptype = pcfg.pop("type", None)
    if not ptype:
        raise PLDError("base policy config has no 'type'. Fix: params.yaml base.policy.type, e.g. pi05")
    if ptype in PI_TYPES:
        patch_lerobot()
    try:
        cfg = make_policy_config(ptype, **{k: tuple(v) if isinstance(v, list) else v for k, v in pcfg.items()}, device=device)
    except (TypeError, ValueError) as e:
        raise PLDError(f"base policy config {policy} is invalid for type '{ptype}' ({e}). "
                       "Fix: use the field names of LeRobot's config class for that type (params.yaml base.policy)") from e
    _check_quantiles(dataset_root, {k: str(v) for k, v in cfg.normalization_mapping.items()}, _feature_types(info))
    meta = LeRobotDatasetMetadata(info.get("repo_id", "local/pld"), root=dataset_root)
    model = make_policy(cfg, ds_meta=meta)
    try:
        with local_tokenizer(tokenizer):
            pre, post = make_pre_post_processors(cfg, dataset_stats=meta.stats)
    except OSError as e:
        raise PLDError(f"base policy '{ptype}': its processor's tokenizer cannot be loaded ({e}). Fix: params.yaml "
                       "base.tokenizer: a local tokenizer dir, or 'stand-in' (a random base only)") from e
    ckpt = out_dir / "pretrained_model"
    ckpt.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(ckpt)
    pre.save_pretrained(ckpt)
    post.save_pretrained(ckpt)
    if tokenizer_as is not None:  # the processor names the tokenizer where it will be found
        pre_file = ckpt / "policy_preprocessor.json"
        pipe = json.loads(pre_file.read_text())
        for step in pipe.get("steps", []):
            if step.get("config", {}).get("tokenizer_name") is not None:
                step["config"]["tokenizer_name"] = str(tokenizer_as)
        pre_file.write_text(json.dumps(pipe, indent=4))
    return ckpt


def _lock(out_dir: Path):
    import fcntl

    f = open(out_dir.parent / f".lock-{out_dir.name}", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise PLDError(f"sft: another process is training into {out_dir}. Fix: wait for it, or use another out_dir") from None
    return f


def _unlock(f) -> None:
    import fcntl

    Path(f.name).unlink(missing_ok=True)  # leave no litter beside the artifact (DVC hashes dirs)
    fcntl.flock(f, fcntl.LOCK_UN)
    f.close()
