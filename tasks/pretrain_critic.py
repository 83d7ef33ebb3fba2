"""Stage ``pretrain_critic``: Cal-QL warm start of the double-Q critic on the offline store (PLD "Probe").

Loads the offline successes into a replay buffer (observations through the specialist's state
encoder, normalised with the store's mean/std), then runs ``calql.steps`` steps of
:func:`pld_core.calql.calql_pretrain` (TD loss + cql_alpha * the conservative term with policy
Q values lower-bounded by the Monte-Carlo return; LayerNorm double Q). Policy actions use the
final residual scale ``sac.xi`` and the base (also for ``residual.ablation: no_base``, which then
only reuses the critic: one critic_init serves every ablation).

Output ``<out>/``: ``critic.safetensors`` (ResidualSAC state: critic, target, actor, temperature,
optimizer moments, plus the encoder stats), ``config.json``, ``loss.json`` + ``loss.png`` (the
loss curve), ``manifest.json`` (last). train_residual loads the critic and its target.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from pld_core.calql import CalQLConfig, calql_pretrain
from pld_core.config import Params
from pld_core.features import ACT_DIM
from pld_core.encoders import encoder_weights_identity
from pld_core.layout import open_offline
from pld_core.sac import ResidualSAC
from pld_core.encoders import check_encoder, make_encoder
from pld_core.learner import offline_buffer_from_store, set_torch_threads
from pld_core.stage import input_digests, record_no_data, run_stage

STAGE = "pretrain_critic"
WEIGHTS = "critic.safetensors"
CONFIG = "config.json"


def stage_params(params: Params) -> dict:
    """The params the stage reads (its key, with the offline store's digest)."""
    return {"calql": params.section_dict("calql"), "sac": params.section_dict("sac"), "encoder": params.residual.encoder,
            "seed": params.residual.seed,
            **({"image_encoder_weights": encoder_weights_identity(params)} if params.residual.encoder == "image" else {})}


def _plot_loss(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=110)
    for k in ("calql_loss", "critic_td_loss", "cql_conservative"):
        pts = [(h["step"], h[k]) for h in history if k in h]
        if pts:
            ax.plot(*zip(*pts), label=k)
    ax.set_xlabel("gradient step")
    ax.set_yscale("symlog")
    ax.set_title("Cal-QL critic warm start", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(params: Params, out_dir: Path, offline_dir: Path, force: bool = False, show_progress: bool = True) -> dict:
    """Cal-QL pretraining on ``offline_dir``'s store; returns the manifest of ``out_dir``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from pld_core.lineage import log_metrics

    check_encoder(params.residual.encoder, params.env.mode)
    used = stage_params(params)
    recorded = record_no_data(STAGE, out_dir, used, ("offline", offline_dir, "offline store (stage collect_offline)"), force=force)
    if recorded:
        return recorded
    _, store = open_offline(offline_dir, params)

    def build(work: Path) -> dict:
        set_torch_threads(params.residual.torch_threads)
        t0 = time.time()
        encoder = make_encoder(params, store)
        offline = offline_buffer_from_store(store, encoder, params.sac.gamma)
        torch.manual_seed(params.residual.seed)
        rng = np.random.default_rng(params.residual.seed)
        sac = ResidualSAC(encoder.dim, ACT_DIM, params.sac.to_sac_config(use_base=True), device=params.device)
        sac.xi = params.sac.xi
        cq = params.calql
        cfg = CalQLConfig(cql_alpha=cq.cql_alpha, n_actions=cq.n_actions)
        log_every = max(1, cq.steps // 200)
        columns = [TextColumn("[bold]Cal-QL"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                   TextColumn("{task.fields[info]}")]
        with Progress(*columns, disable=not show_progress) as progress:
            bar = progress.add_task("calql", total=cq.steps, info="")

            def callback(step: int, m: dict) -> None:
                progress.advance(bar)
                if step % log_every == 0 or step == cq.steps - 1:
                    progress.update(bar, info=f"loss {m['calql_loss']:.3g}")
                    log_metrics({f"calql/{k}": v for k, v in m.items() if k != "step"}, step)

            history = calql_pretrain(sac, offline, cq.steps, cfg, rng, callback)
        state = sac.state_dict()
        state.update(encoder.tensors())
        save_file({k: v.contiguous() for k, v in state.items()}, str(work / WEIGHTS))
        config = {"obs_dim": encoder.dim, "act_dim": ACT_DIM, "xi": sac.xi, "sac": dataclasses.asdict(sac.cfg),
                  "calql": dataclasses.asdict(cfg), "steps": cq.steps, "offline_transitions": len(offline)}
        (work / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
        logged = [h for h in history if int(h["step"]) % log_every == 0 or int(h["step"]) == cq.steps - 1]
        (work / "loss.json").write_text(json.dumps(logged))
        _plot_loss(logged, work / "loss.png")
        last = history[-1] if history else {}
        return {
            "steps": cq.steps, "offline_transitions": len(offline),
            "final_calql_loss": last.get("calql_loss"), "final_td_loss": last.get("critic_td_loss"),
            "final_q_data": last.get("q_data"), "seconds": round(time.time() - t0, 1),
            "seconds_per_step": round((time.time() - t0) / max(cq.steps, 1), 4),
        }

    return run_stage(STAGE, out_dir, used, input_digests(offline=offline_dir), build, force=force)
