"""pi0.5 (and pi0) through LeRobot at any size, offline: what a base of that family needs beyond LeRobot 0.6.1.

* :func:`patch_lerobot`: LeRobot accepts ``paligemma_variant: gemma_300m`` but builds PaliGemma's image projector
  to 2048 features (the gemma_2b width) whatever the variant, so a gemma_300m VLM (width 1024) fails at its first
  forward pass, where image and text embeddings are concatenated. The patch sizes the projector to the language
  model's width. For ``gemma_2b`` (every released pi0.5 checkpoint) the two are equal and nothing changes. It is
  applied wherever this project builds such a policy: loading a base, building one, the trainer's child process
  (``python -m pld_core.train``), merging a LoRA adapter. It also gives pi0, pi0.5 and pi0-FAST a streaming
  ``from_pretrained`` (:func:`load_streaming`) for checkpoints whose tensor names are the model's own.
* :func:`stand_in_tokenizer`: a word-level tokenizer built from the suite's instructions and the prompt pi0.5 writes
  (``Task: ..., State: <256 bins>;\\nAction: ``), saved as a local directory. A randomly initialised pi0.5 has
  never seen PaliGemma's tokenizer, so any tokenizer with ids below PaliGemma's vocabulary serves it, and nothing
  is fetched from the hub. A user with the hub uses the real one (``base.tokenizer: google/paligemma-3b-pt-224``).
* :func:`local_tokenizer`: while active, LeRobot's tokenizer step loads ``path`` instead of the name a policy's
  processor factory hard-codes, and saves ``path`` in the processor's JSON, so the checkpoint loads it again.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

PALIGEMMA_VOCAB = 257152
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>"]
PROMPT_WORDS = ["Task", "State", "Action", ",", ":", ";", "."]


def patch_lerobot() -> None:
    """Size PaliGemma's image projector to its language model's width, and load pi-family checkpoints by
    streaming (idempotent; see the module doc)."""
    try:
        from lerobot.policies import pi_gemma
    except ImportError:  # LeRobot without the pi extra: there is no pi0/pi0.5 to patch
        return
    _stream_pi_loads()
    cls = pi_gemma.PaliGemmaForConditionalGenerationWithPiGemma
    if getattr(cls, "_pld_projector_width", False):
        return
    original = cls.__init__

    def __init__(self, config, *args, **kwargs):
        vision, text = config.vision_config, config.text_config
        if vision.projection_dim != text.hidden_size:
            vision.projection_dim = text.hidden_size
        original(self, config, *args, **kwargs)

    cls.__init__ = __init__
    cls._pld_projector_width = True


PI_POLICY_CLASSES = (("lerobot.policies.pi05.modeling_pi05", "PI05Policy"), ("lerobot.policies.pi0.modeling_pi0", "PI0Policy"),
                     ("lerobot.policies.pi0_fast.modeling_pi0_fast", "PI0FastPolicy"))


def _stream_pi_loads() -> None:
    import importlib

    for module, name in PI_POLICY_CLASSES:
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        if "_pld_streaming" in cls.__dict__:
            continue
        original = cls.from_pretrained.__func__

        def from_pretrained(cls, pretrained_name_or_path, *, config=None, _original=original, **kwargs):
            model = load_streaming(cls, pretrained_name_or_path, config, **kwargs)
            return model if model is not None else _original(cls, pretrained_name_or_path, config=config, **kwargs)

        cls.from_pretrained = classmethod(from_pretrained)
        cls._pld_streaming = True
        cls._pld_lerobot_from_pretrained = classmethod(original)  # LeRobot's own, for comparisons


HUB_ARGS = ("force_download", "resume_download", "proxies", "token", "cache_dir", "local_files_only", "revision", "strict")


def load_streaming(cls, path, config=None, **kwargs):
    """A pi-family policy from a local checkpoint, built without random initialisation and filled tensor by tensor
    from ``model.safetensors``; ``None`` where that does not apply (a hub id, or tensor names that need LeRobot's
    OpenPI remapping), and the caller takes LeRobot's own ``from_pretrained``.

    LeRobot's own path initialises every weight at random (about a minute for a 2 B model on two CPU cores), then
    reads the whole file into a second state dict beside the model before copying it in: twice the model's memory
    at the peak. Here the peak is the model plus its largest tensor. Every tensor the model keeps is read from the
    file (tied tensors once, through any of their names); anything else refuses the fast path."""
    import torch
    from safetensors import safe_open
    from transformers.initialization import no_init_weights

    ckpt = Path(str(path))
    weights = ckpt / "model.safetensors"
    if not weights.is_file():
        return None
    if config is None:
        from lerobot.configs.policies import PreTrainedConfig

        config = PreTrainedConfig.from_pretrained(ckpt)
    with safe_open(str(weights), framework="pt") as f:
        names = set(f.keys())
    with no_init_weights():
        model = cls(config, **{k: v for k, v in kwargs.items() if k not in HUB_ARGS})
    state = model.state_dict()
    if names - set(state):
        return None
    by_storage: dict[int, set[str]] = {}
    for k, t in state.items():
        by_storage.setdefault(t.untyped_storage().data_ptr(), set()).add(k)
    if any(not (group & names) for group in by_storage.values()):
        return None  # a tensor the file does not hold under any of its names
    with torch.no_grad(), safe_open(str(weights), framework="pt", device="cpu") as f:
        for k in names:
            state[k].copy_(f.get_tensor(k))
    model._pld_streamed = True
    return model


def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def stand_in_tokenizer(texts: list[str], out_dir: Path) -> Path:
    """A word-level tokenizer over ``texts``, the prompt's words and the 256 state bins, saved at ``out_dir``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {w for t in texts for w in _words(t.replace("_", " "))}
    words |= {w for t in PROMPT_WORDS for w in _words(t)} | {str(i) for i in range(256)}
    vocab = {tok: i for i, tok in enumerate(SPECIAL + sorted(words))}
    assert len(vocab) < PALIGEMMA_VOCAB
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return out_dir


@contextmanager
def local_tokenizer(path: str | Path | None):
    """Within the block, LeRobot tokenizer steps built by name load ``path`` (a local dir or hub id) instead."""
    if path is None:
        yield
        return
    from lerobot.processor.tokenizer_processor import TokenizerProcessorStep

    original = TokenizerProcessorStep.__post_init__

    def __post_init__(self):
        if self.tokenizer is None:
            self.tokenizer_name = str(path)
        original(self)

    TokenizerProcessorStep.__post_init__ = __post_init__
    try:
        yield
    finally:
        TokenizerProcessorStep.__post_init__ = original
