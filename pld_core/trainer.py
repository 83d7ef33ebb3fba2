"""The PLD specialist ("Probe" stage): a residual SAC actor on top of a frozen base policy.

One task, one specialist. The loop reads top to bottom in :meth:`SpecialistTrainer._episode`:

- warm-up             the first ``residual.warmup_episodes`` episodes act with the base only
                      (executed = base action) and go into the online buffer;
- base-policy probing every later episode starts with ``n_probe ~ U{0, .., probe_max_fraction *
                      T_max}`` base-only steps that are *never* stored (the residual learns from the
                      states the base actually reaches);
- residual steps      executed a = clip(a_b + xi * delta), delta ~ pi(. | s, a_b), stored with the
                      base action at the next state (the TD target bootstraps the combined policy);
- xi schedule         xi ramps linearly from ``residual.xi_start`` to ``sac.xi`` over the first
                      ``residual.xi_warmup_steps`` env steps after the warm-up episodes;
- updates             ``residual.updates_per_step`` SAC updates per env step once the warm-up is over
                      and ``learning_starts`` env steps were taken, each on an RLPD batch
                      (``offline_fraction`` offline, the rest online); critic:actor = ``sac.critic_actor_ratio``.

Observations for the residual and the critic come from an encoder (:mod:`pld_core.encoders`), fitted
on the offline store and fixed for the run.

``residual.stop_at`` (e.g. 0.95) ends training early: a periodic evaluation at or above it triggers
a full one (``final_eval_episodes`` initial states); when that passes too it is the final evaluation
and the actor it evaluated is the one saved. ``steps_to_95`` counts full evaluations only.

``residual.mode``: ``sync`` is this class (one process, the updates in line after every env step,
bit-identical under ``residual.seed``); ``async`` (the default) is
:class:`pld_core.actor_learner.AsyncSpecialistTrainer`: the same episodes, with the replay and the updates in a
learner process beside this one. Both update through :class:`pld_core.learner.Learner`.

Checkpoints (``checkpoints/step_<N>/``, at the first episode boundary after every ``residual.checkpoint_every``
env steps): the learner's files (:meth:`Learner.save`) and ``state.json`` (counters, numpy RNG, curve, episode
log) written last; a killed run resumes from the newest complete one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from pld_core.encoders import StateEncoder
from pld_core.errors import PLDError
from pld_core.features import ACT_DIM
from pld_core.learner import Learner
from pld_core.replay import ReplayBuffer
from pld_core.evaluation import eval_outcomes, plot_curve, steps_to_threshold
from pld_core.lineage import log_metrics, mlflow_artifacts
from pld_core.residual_policy import ResidualPolicy, save_residual
from pld_core.rollout import prefixed_steps
from pld_core.sac import ResidualSAC
from pld_core.stats import success_summary

CHECKPOINTS = "checkpoints"


# ----------------------------------------------------------------------------- schedules, buffers
def xi_schedule(step: int, xi_start: float, xi_end: float, warmup_steps: int) -> float:
    """Residual scale: linear from ``xi_start`` to ``xi_end`` over ``warmup_steps`` steps, then flat."""
    if warmup_steps <= 0:
        return float(xi_end)
    frac = min(1.0, max(0.0, step / warmup_steps))
    return float(xi_start + (xi_end - xi_start) * frac)


def final_eval_episodes(params) -> int:
    """Episodes of the specialist's last evaluation: residual.final_eval_episodes, else evaluate.episodes."""
    return params.residual.final_eval_episodes or params.evaluate.episodes



# ----------------------------------------------------------------------------- trainer
class _Exploring:
    """The trainer's policy for :func:`pld_core.rollout.prefixed_steps`: its base, and the residual sampled with
    exploration noise at the current xi."""

    def __init__(self, trainer: "SpecialistTrainer"):
        self.trainer = trainer

    def reset(self, env) -> None:
        if self.trainer.use_base:
            self.trainer.base.reset(env)

    def base_act(self, obs: dict) -> np.ndarray:
        return self.trainer._base_act(obs)

    def residual_action(self, obs: dict, base_action: np.ndarray) -> np.ndarray:
        tr = self.trainer
        tr.sac.xi = tr.current_xi()
        return tr.sac.act(tr._encode(obs), base_action, deterministic=False).astype(np.float32)


class SpecialistTrainer:
    """Residual SAC on one task; see the module docstring. Construct, then :meth:`run`.

    ``env`` is a :class:`pld_core.env.LiberoEnv` (or anything with its interface), ``base`` a
    policy with ``reset(env)``/``act(obs)`` (ignored under ``ablation: no_base``), ``offline`` the
    offline buffer (normalised by ``encoder``), ``work_dir`` where checkpoints live.
    """

    def __init__(self, params, env, base, encoder: StateEncoder, offline: ReplayBuffer, work_dir: Path,
                 key: str = "", critic_state: dict[str, torch.Tensor] | None = None, meta: dict | None = None,
                 show_progress: bool = True):
        rp = params.residual
        self.params, self.rp = params, rp
        self.env, self.encoder, self.offline = env, encoder, offline
        self.work_dir = Path(work_dir)
        self.key, self.meta = key, dict(meta or {})
        self.show_progress = show_progress
        self.ablation = rp.ablation
        self.use_base = rp.ablation != "no_base"
        self.use_offline = rp.ablation != "no_offline"
        self.use_probe = rp.ablation != "no_probe" and self.use_base
        self.base = base if self.use_base else None
        if self.use_base and base is None:
            raise PLDError("train_residual: no base policy given. Fix: pass the base spec (or use residual.ablation: no_base)")
        if self.use_offline and len(offline) == 0:
            raise PLDError("train_residual: the offline buffer holds no transitions. Fix: rerun collect_offline with more offline.max_episodes")
        self.device = torch.device(params.device)
        torch.manual_seed(rp.seed)  # before the networks: their initialisation is part of the run
        self.sac = ResidualSAC(encoder.dim, ACT_DIM, params.sac.to_sac_config(use_base=self.use_base), device=self.device)
        if critic_state is not None:
            self._load_critic(critic_state)
        # the online replay lives where the updates happen: here (sync) or in the learner process (async)
        self.online = ReplayBuffer(rp.replay_capacity, encoder.dim, ACT_DIM, params.sac.gamma) if self.mode == "sync" else None
        self.rng = np.random.default_rng(rp.seed)
        self.learner = Learner(self.sac, self.online, offline if self.use_offline else None, self.rng,
                               params.sac.batch_size, rp.offline_fraction) if self.mode == "sync" else None
        self.probe_max = int(rp.probe_max_fraction * env.max_steps)
        # counters (all saved in checkpoints)
        self.env_steps = 0  # every env step of training episodes (warm-up, probing, residual)
        self.rl_steps = 0  # env steps after the warm-up episodes (drives the xi schedule)
        self.episodes = 0
        self.grad_steps = 0
        self.train_steps = 0  # env steps after which the sync loop updates (warm-up over, learning_starts reached)
        self.stored_transitions = 0  # transitions sent to the online replay (probing steps excluded)
        self.next_eval = rp.eval_every
        self.next_ckpt = rp.checkpoint_every
        self.curve: list[dict] = []
        self.episode_log: list[dict] = []
        self.resumed_from: list[int] = []
        self.eval_seconds = 0.0  # this process's time in evaluation (excluded from env_steps_per_s)
        self._update_sums: dict[str, float] = {}
        self._update_counts: dict[str, int] = {}
        self.sac.xi = self.current_xi()

    # ------------------------------------------------------------------ setup
    def _load_critic(self, state: dict[str, torch.Tensor]) -> None:
        """Cal-QL warm start: the critic and its target; the actor stays zero-init (= the base)."""
        for prefix, module in (("critic", self.sac.critic), ("critic_target", self.sac.critic_target)):
            sub = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
            try:
                module.load_state_dict(sub, strict=True)
            except RuntimeError as e:
                raise PLDError(f"critic_init does not match sac.hidden/layers/n_q or the observation size: {str(e)[:300]}. "
                               "Fix: rerun pretrain_critic with the same params") from None

    def current_xi(self) -> float:
        return xi_schedule(self.rl_steps, self.rp.xi_start, self.params.sac.xi, self.rp.xi_warmup_steps)

    # ------------------------------------------------------------------ loop
    def run(self) -> dict:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        rp = self.rp
        self._maybe_resume()
        t0 = time.time()
        steps0 = self.env_steps
        self.start()
        try:
            if not self.curve:
                self._evaluate(rp.eval_episodes)
            columns = [TextColumn(f"[bold]specialist ({self.mode})"), BarColumn(), MofNCompleteColumn(), TextColumn("env steps"),
                       TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
            with Progress(*columns, disable=not self.show_progress) as progress:
                bar = progress.add_task("train", total=rp.env_steps, completed=self.env_steps, info="")
                early = None  # the full evaluation that ended training early (residual.stop_at)
                while self.env_steps < rp.env_steps and early is None:
                    self._episode()
                    if self.env_steps >= self.next_eval:
                        if self.env_steps < rp.env_steps:
                            early = self._periodic_eval()
                        self.next_eval = (self.env_steps // rp.eval_every + 1) * rp.eval_every
                    if self.env_steps >= self.next_ckpt and early is None:
                        self.checkpoint()
                        self.next_ckpt = (self.env_steps // rp.checkpoint_every + 1) * rp.checkpoint_every
                    last = self.curve[-1]["success_rate"] if self.curve else float("nan")
                    progress.update(bar, completed=min(self.env_steps, rp.env_steps),
                                    info=f"ep {self.episodes} xi {self.sac.xi:.2f} eval {last:.2f} updates {self.grad_steps}")
            train_seconds = time.time() - t0 - self.eval_seconds
            # the actor that passed the early-stop evaluation is the result; the learner kept training meanwhile
            evaluated = {k: v.detach().clone() for k, v in self.sac.actor.state_dict().items()} if early is not None else None
            self.stop()  # async: the learner's final networks replace the actor's copy
            if evaluated is not None:
                self.sac.actor.load_state_dict(evaluated)
        finally:
            self.close()
        if early is not None:
            early["final"] = True
            final = early
        else:
            final = self._evaluate(final_eval_episodes(self.params), final=True)
        return {
            "env_steps": self.env_steps,
            "episodes": self.episodes,
            "grad_steps": self.grad_steps,
            "mode": self.mode,
            "updates_per_env_step": round(self.grad_steps / max(1, self.env_steps), 3),
            "steps_to_95": steps_to_threshold(self.curve, min_episodes=final_eval_episodes(self.params)),
            "stopped_early": early is not None,
            "final_success_rate": final["success_rate"],
            "ci95": final["ci95"],
            "base_success_rate": self.curve[0]["success_rate"],
            "train_success_rate": self._train_success_rate(),
            "resumed_from": self.resumed_from,
            "env_steps_per_s": round((self.env_steps - steps0) / max(train_seconds, 1e-9), 2),
            "train_seconds": round(train_seconds, 1),
            "xi": self.sac.xi,
            "ablation": self.ablation,
        }

    def _periodic_eval(self) -> dict | None:
        """The eval every ``eval_every`` steps; with ``stop_at``, a pass triggers the full evaluation.

        Returns the full evaluation's point when it passes too (training ends), else None.
        """
        rp = self.rp
        point = self._evaluate(rp.eval_episodes)
        if rp.stop_at is None or point["success_rate"] < rp.stop_at - 1e-9:
            return None
        n_full = final_eval_episodes(self.params)
        full = point if point["episodes"] >= n_full else self._evaluate(n_full)
        return full if full["success_rate"] >= rp.stop_at - 1e-9 else None

    def _train_success_rate(self, last: int = 50) -> float | None:
        eps = [e for e in self.episode_log if not e["warmup"]][-last:]
        return sum(e["success"] for e in eps) / len(eps) if eps else None

    def _training(self, warmup: bool) -> bool:
        """Would the synchronous loop update after this env step? (both modes use this rule)"""
        return (not warmup and self.env_steps >= self.rp.learning_starts
                and (self.online_transitions > 0 or (self.use_offline and len(self.offline) > 0)))

    # ------------------------------------------------------------------ hooks (the async trainer overrides them)
    mode = "sync"
    deadline: float | None = None  # time.time() after which the current episode is cut (benchmarks only)

    @property
    def online_transitions(self) -> int:
        return len(self.online)

    def start(self) -> None:
        """Before the first episode (async: start the learner)."""

    def stop(self) -> None:
        """After the last episode, before the final evaluation (async: fetch the learner's networks)."""

    def close(self) -> None:
        """Always called at the end of :meth:`run`, also on errors (async: end the learner process)."""

    def _replay_start(self, x: np.ndarray, a_b: np.ndarray) -> None:
        self.online.start_episode(x, a_b)

    def _replay_step(self, action, reward: float, done: float, next_x: np.ndarray, next_a_b: np.ndarray) -> None:
        self.online.add_step(action, reward, done, next_x, next_a_b)

    def _replay_end(self) -> None:
        self.online.end_episode()

    def _after_step(self, warmup: bool) -> None:
        """Sync: ``updates_per_step`` SAC updates right after the env step, once training started."""
        if self._training(warmup):
            self.train_steps += 1
            self.sac.xi = self.current_xi()
            for _ in range(self.rp.updates_per_step):
                self._update()

    def _episode(self) -> dict:
        """One training episode: warm-up (base only) or probing (base only, not stored) + residual."""
        rp, env = self.rp, self.env
        warmup = self.episodes < rp.warmup_episodes
        init_state = int(self.rng.integers(env.n_init_states))
        seed = rp.seed * 1_000_003 + self.episodes
        n_probe = int(self.rng.integers(0, self.probe_max + 1)) if (self.use_probe and not warmup) else 0
        # the base alone for the probe prefix (all of a warm-up episode), then base + residual with exploration
        prefix = (math.inf if warmup else n_probe) if self.use_base else 0
        self._x = None  # (observation, its encoding): encoded once, for the residual and for the replay
        t = stored = 0
        success = False
        for s in prefixed_steps(env, _Exploring(self), init_state, seed, prefix):
            t += 1
            self.env_steps += 1
            if not warmup:
                self.rl_steps += 1
            probing = s.t < n_probe
            if not probing and stored == 0:
                self._replay_start(self._encode(s.obs), s.base_action)
            next_x = self._encode(s.next_obs)
            if not probing:  # probing steps never enter the replay
                self._replay_step(s.action, s.reward, float(s.terminated), next_x, s.next_base_action)
                stored += 1
                self.stored_transitions += 1
            self._after_step(warmup)
            self._x = (s.next_obs, next_x)
            success = bool(s.terminated)
            if self.deadline is not None and time.time() >= self.deadline:
                break
        self._replay_end()
        self.episodes += 1
        entry = {"episode": self.episodes - 1, "init_state": init_state, "seed": seed, "warmup": warmup,
                 "probe_steps": min(n_probe, t), "stored_steps": stored, "length": t, "success": success,
                 "env_steps": self.env_steps, "xi": round(self.sac.xi, 4)}
        self.episode_log.append(entry)
        self._log_episode(entry)
        return entry

    def _base_act(self, obs: dict) -> np.ndarray:
        if not self.use_base:
            return np.zeros(ACT_DIM, dtype=np.float32)
        return np.asarray(self.base.act(obs), dtype=np.float32)

    def _encode(self, obs: dict) -> np.ndarray:
        if self._x is not None and self._x[0] is obs:
            return self._x[1]
        self._x = (obs, self.encoder(obs))
        return self._x[1]

    def _update(self) -> None:
        metrics = self.learner.update(self.grad_steps)
        self.grad_steps += 1
        for k, v in metrics.items():
            self._update_sums[k] = self._update_sums.get(k, 0.0) + v
            self._update_counts[k] = self._update_counts.get(k, 0) + 1

    def _log_episode(self, entry: dict) -> None:
        metrics = {f"train/{k}": float(entry[k]) for k in ("success", "length", "probe_steps", "stored_steps", "xi")}
        metrics.update({f"train/{k}": s / self._update_counts[k] for k, s in self._update_sums.items()})
        metrics["train/grad_steps"] = self.grad_steps
        metrics["train/online_transitions"] = self.online_transitions
        self._update_sums, self._update_counts = {}, {}
        log_metrics(metrics, self.env_steps)

    # ------------------------------------------------------------------ evaluation
    def policy(self, deterministic: bool = True) -> ResidualPolicy:
        return ResidualPolicy(self.sac, self.encoder, base=self.base, deterministic=deterministic, xi=self.sac.xi)

    def _evaluate(self, episodes: int, final: bool = False) -> dict:
        """Base + residual (deterministic) on initial states 0..episodes-1 (wrapping), fixed seeds."""
        policy = self.policy(deterministic=True)
        t0 = time.time()
        self.sac.actor.eval()
        outcomes = eval_outcomes(self.env, policy, episodes)
        self.sac.actor.train()
        s = success_summary(outcomes)
        point = {"env_steps": self.env_steps, "success_rate": s["success_rate"], "ci95": s["ci95"],
                 "episodes": episodes, "xi": round(self.sac.xi, 4), "final": final, "seconds": round(time.time() - t0, 1)}
        self.curve.append(point)
        self.eval_seconds += time.time() - t0
        log_metrics({"eval/success_rate": s["success_rate"], "eval/ci95_low": s["ci95"][0], "eval/ci95_high": s["ci95"][1]}, self.env_steps)
        return point

    # ------------------------------------------------------------------ checkpoint / resume
    @property
    def checkpoint_dir(self) -> Path:
        return self.work_dir / CHECKPOINTS

    def checkpoint(self) -> Path:
        """Write ``checkpoints/step_<N>/`` atomically (temp dir, then rename); keep only the newest."""
        root = self.checkpoint_dir
        root.mkdir(parents=True, exist_ok=True)
        name = f"step_{self.env_steps:09d}"
        tmp = root / f".tmp-{name}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        self._save_learner(tmp)
        counters = {
            "key": self.key, "mode": self.mode,
            "env_steps": self.env_steps, "rl_steps": self.rl_steps, "episodes": self.episodes,
            "grad_steps": self.grad_steps, "next_eval": self.next_eval, "next_ckpt": self.next_ckpt,
            "train_steps": self.train_steps, "stored_transitions": self.stored_transitions,
            "xi": self.sac.xi, "np_rng": self.rng.bit_generator.state,
            "curve": self.curve, "episode_log": self.episode_log, "resumed_from": self.resumed_from,
        }
        with open(tmp / "state.json", "w") as fh:  # written last: a step dir with state.json is complete
            json.dump(counters, fh)
            fh.flush()
            os.fsync(fh.fileno())
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in root.glob("step_*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def _save_learner(self, tmp: Path) -> None:
        self.learner.save(tmp)

    def _load_learner(self, ckpt: Path, counters: dict) -> None:
        self.learner.load(ckpt)

    def latest_checkpoint(self) -> Path | None:
        root = self.checkpoint_dir
        if not root.is_dir():
            return None
        done = sorted(p for p in root.glob("step_*") if (p / "state.json").is_file())
        return done[-1] if done else None

    def _maybe_resume(self) -> None:
        ckpt = self.latest_checkpoint()
        if ckpt is None:
            return
        try:
            counters = json.loads((ckpt / "state.json").read_text())
        except (json.JSONDecodeError, OSError) as e:
            raise PLDError(f"{ckpt}/state.json unreadable ({e}). Fix: delete {ckpt} to resume from an older checkpoint or restart") from None
        if self.key and counters.get("key") != self.key:
            # checkpoints of a run with other params/inputs: not ours to resume
            shutil.rmtree(self.checkpoint_dir)
            return
        self._load_learner(ckpt, counters)
        for k in ("env_steps", "rl_steps", "episodes", "grad_steps", "next_eval", "next_ckpt"):
            setattr(self, k, int(counters[k]))
        self.train_steps = int(counters.get("train_steps", self.grad_steps // max(1, self.rp.updates_per_step)))
        self.stored_transitions = int(counters.get("stored_transitions", self.online_transitions if self.online is not None else 0))
        self.rng.bit_generator.state = counters["np_rng"]
        self.curve = counters["curve"]
        self.episode_log = counters["episode_log"]
        self.resumed_from = [*counters.get("resumed_from", []), self.env_steps]
        self.sac.xi = float(counters["xi"])

    # ------------------------------------------------------------------ outputs
    def save_outputs(self, out_dir: Path, summary: dict) -> None:
        """Final specialist + curve.json + curve.png + train_log.json into ``out_dir``."""
        out_dir = Path(out_dir)
        save_residual(out_dir, self.sac, self.encoder, self.meta)
        curve = {"points": self.curve, **{k: summary.get(k) for k in ("steps_to_95", "final_success_rate", "ci95", "env_steps", "ablation")},
                 **{k: self.meta.get(k) for k in ("suite", "task", "base")}}
        (out_dir / "curve.json").write_text(json.dumps(curve, indent=2))
        title = f"{self.meta.get('suite', '')}/{self.meta.get('task', '')} specialist ({self.ablation})"
        plot_curve(self.curve, out_dir / "curve.png", title)
        (out_dir / "train_log.json").write_text(json.dumps(self.episode_log))
        mlflow_artifacts([out_dir / "curve.png", out_dir / "curve.json"], artifact_path="specialist")
