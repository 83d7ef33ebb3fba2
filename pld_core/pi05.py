"""pi0.5 (and pi0) through LeRobot at any size, offline: what a base of that family needs beyond LeRobot 0.6.1.

* :func:`patch_lerobot`: LeRobot accepts ``paligemma_variant: gemma_300m`` but builds PaliGemma's image projector
  to 2048 features (the gemma_2b width) whatever the variant, so a gemma_300m VLM (width 1024) fails at its first
  forward pass, where image and text embeddings are concatenated. The patch sizes the projector to the language
  model's width. For ``gemma_2b`` (every released pi0.5 checkpoint) the two are equal and nothing changes. It is
  applied wherever this project builds such a policy: loading a base, building one, the trainer's child process
  (``python -m pld_core.train``), merging a LoRA adapter.
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
    """Size PaliGemma's image projector to its language model's width (idempotent; see the module doc)."""
    try:
        from lerobot.policies import pi_gemma
    except ImportError:  # LeRobot without the pi extra: there is no pi0/pi0.5 to patch
        return
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
