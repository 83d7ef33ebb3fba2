"""``python -m pld_core.train ARGS``: LeRobot's trainer (``lerobot-train ARGS``) with
:func:`pld_core.pi05.patch_lerobot` applied first, so a gemma_300m pi0/pi0.5 builds and loads in the child
process as it does in the flywheel. ``pld_core.sft`` runs it for those policy types."""

from __future__ import annotations

import runpy

from pld_core.pi05 import patch_lerobot

if __name__ == "__main__":
    patch_lerobot()
    runpy.run_module("lerobot.scripts.lerobot_train", run_name="__main__", alter_sys=True)
