"""The PLD specialist's trainer for ``residual.mode``: one entry point for the stages and the benchmarks."""

from __future__ import annotations

from pld_core.actor_learner import AsyncSpecialistTrainer
from pld_core.trainer import SpecialistTrainer


def make_trainer(params, *args, **kwargs) -> SpecialistTrainer:
    """The trainer of ``residual.mode``: :class:`SpecialistTrainer` (sync, one process) or
    :class:`~pld_core.actor_learner.AsyncSpecialistTrainer` (async: a learner process beside the simulator)."""
    if params.residual.mode == "async":
        return AsyncSpecialistTrainer(params, *args, **kwargs)
    return SpecialistTrainer(params, *args, **kwargs)
