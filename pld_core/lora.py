"""LoRA for the SFT stage: the options LeRobot's trainer takes (``--peft.*``), and merging a trained adapter back
into its base so that the next base version is a full checkpoint that loads like any other."""

from __future__ import annotations

import shutil
from pathlib import Path

from pld_core.base_policy import PI_TYPES
from pld_core.errors import PLDError

LORA_KEYS = {"r", "lora_alpha", "target_modules", "full_training_modules", "method_type", "init_type"}


def lora_options(lora: dict, init_is_ckpt: bool, policy_type: str) -> dict:
    """``sft.lora`` checked and turned into LeRobot's ``--peft.*`` options (one clear error per problem)."""
    unknown = set(lora) - LORA_KEYS
    if unknown:
        raise PLDError(f"sft lora: unknown keys {sorted(unknown)}. Fix: use some of {sorted(LORA_KEYS)} "
                       "(LeRobot's --peft.* options)")
    try:
        import peft  # noqa: F401
    except ImportError:
        raise PLDError("sft lora: LoRA through LeRobot needs the 'peft' package, which is not installed. "
                       'Fix: pip install "lerobot[peft]==0.6.1", or pass lora=None for full fine-tuning') from None
    if not init_is_ckpt:
        raise PLDError("sft lora: LoRA needs a pretrained init checkpoint (LeRobot refuses PEFT from scratch). "
                       "Fix: pass init=<checkpoint dir>, or lora=None")
    if not lora.get("target_modules"):
        from lerobot.policies.factory import get_policy_class
        from lerobot.policies.pretrained import PreTrainedPolicy

        cls = get_policy_class(policy_type)
        if cls._get_default_peft_targets is PreTrainedPolicy._get_default_peft_targets:
            raise PLDError(f"sft lora: LoRA is unsupported for policy type '{policy_type}' without explicit "
                           "target modules (LeRobot defines none for it). Fix: pass lora['target_modules'] "
                           "(e.g. a regex of its Linear layers), or lora=None")
    return {"method_type": "LORA", **lora}


MERGE_SPACE_MARGIN = 256 * 2**20  # bytes beyond the weights: processors, configs, the adapter


def check_merge_space(base_dir: Path, out_dir: Path, what: str = "sft lora") -> int:
    """Refuse, before any work, a merge that the disk cannot hold: merging writes a full checkpoint as large as the
    base's ``model.safetensors`` (7.8 GB for a gemma_300m pi0.5) under ``out_dir``. Returns the bytes needed."""
    weights = Path(base_dir) / "model.safetensors"
    need = (weights.stat().st_size if weights.is_file() else 0) + MERGE_SPACE_MARGIN
    where = Path(out_dir)
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < need:
        raise PLDError(f"{what}: merging the adapter writes a full checkpoint of {need / 1e9:.1f} GB (the size of "
                       f"{weights}) under {where}, which has {free / 1e9:.1f} GB free. Fix: free disk space there, "
                       "or put the data dir on a larger disk")
    return need


def merge_lora(adapter_dir: Path, base_dir: Path, out_dir: Path, device: str = "cpu") -> Path:
    """Merge a LeRobot PEFT adapter into its base weights: a full pretrained_model dir at out_dir."""
    from lerobot.configs import PreTrainedConfig
    from lerobot.policies.factory import get_policy_class
    from peft import PeftModel

    check_merge_space(base_dir, out_dir, "merge_lora")
    config = PreTrainedConfig.from_pretrained(base_dir)
    config.device = device
    if config.type in PI_TYPES:
        from pld_core.pi05 import patch_lerobot

        patch_lerobot()
    base = get_policy_class(config.type).from_pretrained(base_dir, config=config)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.config.use_peft = False
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir)
    for f in adapter_dir.iterdir():  # processors (normalizer stats) + train_config.json
        if f.name.startswith("policy_") or f.name == "train_config.json":
            shutil.copy2(f, out_dir / f.name)
    shutil.copytree(adapter_dir, out_dir / "lora_adapter")
    return out_dir
