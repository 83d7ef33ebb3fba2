"""Overlapped acting and learning (``residual.mode: async``): a SERL-style actor and learner.

The actor (this process, :class:`AsyncSpecialistTrainer`) plays exactly the episodes of the
synchronous loop (:meth:`pld_core.trainer.SpecialistTrainer._episode`: warm-up episodes with the
base alone, probing steps that are never stored, the xi schedule, periodic evaluation and
checkpoints) with its own copy of the residual actor. The learner (a ``spawn`` process running
:func:`learner_main`) owns the online replay and the SAC networks and optimizers:

- transitions    the actor sends its replay writes (episode start, transition, episode end;
                 probing steps have none) through a queue, a few steps at a time and at every
                 episode end, with its counters; the learner applies them in order to its :class:`ReplayBuffer`, so it
                 holds every stored transition exactly once;
- updates        RLPD batches (``offline_fraction`` offline, the rest online) and
                 ``ResidualSAC.update`` (``sac.critic_actor_ratio`` critic updates per actor
                 update), as in sync. The learner may make at most ``residual.updates_per_step``
                 updates per env step at which the sync loop would have updated (warm-up over,
                 ``residual.learning_starts`` env steps taken): it never starts earlier nor runs
                 ahead of the data; when it is slower than the simulator it lags, and the run's
                 ``updates_per_env_step`` says how far;
- weights        after every actor update the learner writes the actor's weights into shared
                 memory with a version number; every ``residual.sync_every`` env steps (and before
                 every evaluation) the actor loads the newest version. The observation encoder is
                 fixed for the run, so nothing else needs to travel;
- checkpoints    at the usual episode boundary the actor asks the learner (through the same queue,
                 so after every transition sent so far) to write ``sac.safetensors`` (networks,
                 optimizers, the learner's torch RNG) + ``replay.npz`` + ``learner.json`` (its
                 numpy RNG, update count) into the checkpoint dir, then writes its own torch RNG and
                 ``state.json`` (counters) last. Resume loads both sides from there;
- the end        the actor sends ``stop``; the learner answers with its final networks, which the
                 actor evaluates and saves as the specialist.

Both processes run torch on ``residual.torch_threads`` (1) threads; the learner runs at niceness
``residual.learner_nice`` so that on a busy CPU the actor (the critical path) keeps its share. The learner dies with the
actor (``PR_SET_PDEATHSIG``, and it checks its parent): a SIGKILLed run leaves no orphan, and
rerunning it resumes from the last checkpoint. Async runs are not bit-reproducible (which weights
the actor has at a step depends on the learner's speed); ``residual.mode: sync`` is.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import queue
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pld_core.errors import PLDError
from pld_core.features import ACT_DIM
from pld_core.parallel import child_setup, parent_alive, spawn_context, start_process
from pld_core.learner import SAC_FILE, Learner
from pld_core.replay import ReplayBuffer
from pld_core.sac import ResidualSAC, SACConfig
from pld_core.trainer import SpecialistTrainer

POLL_S = 0.5
REPLY_TIMEOUT_S = 600.0
METRICS_EVERY = 50  # learner updates between metric reports to the actor
FLUSH_EVERY = 4  # env steps per message to the learner (fewer wake-ups of the queue's feeder thread)


class SharedActor:
    """The residual actor's weights in shared memory, with a version (the learner's update count)."""

    def __init__(self, template: torch.nn.Module, ctx):
        self.layout = [(k, tuple(v.shape)) for k, v in template.state_dict().items()]
        self.size = sum(int(np.prod(shape)) for _, shape in self.layout)
        self.buf = ctx.RawArray(ctypes.c_float, self.size)
        self.version = ctx.RawValue(ctypes.c_longlong, -1)  # -1: nothing published yet
        self.grad_steps = ctx.RawValue(ctypes.c_longlong, 0)
        self.received = ctx.RawValue(ctypes.c_longlong, 0)  # transitions the learner has stored
        self.lock = ctx.Lock()
        self._view = None

    def __getstate__(self):
        return {**self.__dict__, "_view": None}

    @property
    def view(self) -> np.ndarray:
        if self._view is None:
            self._view = np.frombuffer(self.buf, dtype=np.float32)
        return self._view

    def publish(self, module: torch.nn.Module, version: int) -> None:
        flat = torch.cat([v.detach().reshape(-1) for v in module.state_dict().values()]).numpy()
        with self.lock:
            self.view[:] = flat
            self.version.value = int(version)

    def load_into(self, module: torch.nn.Module) -> int:
        """Copy the newest weights into ``module``; returns their version."""
        with self.lock:
            flat = self.view.copy()
            version = int(self.version.value)
        state, o = {}, 0
        for name, shape in self.layout:
            n = int(np.prod(shape))
            state[name] = torch.from_numpy(flat[o:o + n].reshape(shape))
            o += n
        module.load_state_dict(state)
        return version


# ----------------------------------------------------------------------------- the learner process
def _to_numpy(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def _to_torch(state: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}


def learner_main(cfg: dict, sac_state: dict, offline_state: dict | None, shared: SharedActor, inbox, outbox, parent_pid: int) -> None:
    try:
        child_setup(parent_pid, threads=cfg["torch_threads"] or 1)
        torch.set_num_threads(cfg["torch_threads"] or 1)
        if cfg.get("nice"):
            os.nice(int(cfg["nice"]))  # a busy CPU goes to the actor first: env steps are the critical path
        _Learner(cfg, sac_state, offline_state, shared, inbox, outbox, parent_pid).loop()
    except BaseException:  # noqa: BLE001  (reported to the actor, which raises it)
        outbox.put(("error", traceback.format_exc()))


class _Learner:
    def __init__(self, cfg, sac_state, offline_state, shared: SharedActor, inbox, outbox, parent_pid):
        self.cfg, self.shared, self.inbox, self.outbox, self.parent_pid = cfg, shared, inbox, outbox, parent_pid
        self.sac = ResidualSAC(cfg["obs_dim"], ACT_DIM, SACConfig(**cfg["sac"]), device=cfg["device"])
        self.sac.load_state_dict(_to_torch(sac_state))
        self.online = ReplayBuffer(cfg["capacity"], cfg["obs_dim"], ACT_DIM, cfg["gamma"])
        self.offline = None
        if offline_state is not None:
            self.offline = ReplayBuffer(int(offline_state["capacity"]), cfg["obs_dim"], ACT_DIM, cfg["gamma"])
            self.offline.load_state_dict(offline_state)
        self.rng = np.random.default_rng([cfg["seed"], 1])
        torch.manual_seed(cfg["seed"] + 1)
        self.learner = Learner(self.sac, self.online, self.offline, self.rng, cfg["batch_size"], cfg["offline_fraction"])
        self.grad_steps = 0
        self.received = 0
        self.budget = 0  # updates allowed so far: updates_per_step x train steps reported by the actor
        self.env_steps = 0
        self.xi = cfg["sac"]["xi"]
        self.first_update_env_steps: int | None = None
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        if cfg.get("resume_dir"):
            self._resume(Path(cfg["resume_dir"]))
        shared.grad_steps.value = self.grad_steps
        shared.received.value = self.received
        shared.publish(self.sac.actor, self.grad_steps)

    def _resume(self, ckpt: Path) -> None:
        self.learner.load(ckpt)
        info = json.loads((ckpt / "learner.json").read_text())
        self.rng.bit_generator.state = info["np_rng"]
        self.grad_steps, self.received = int(info["grad_steps"]), int(info["received"])
        self.first_update_env_steps = info.get("first_update_env_steps")

    # ------------------------------------------------------------------ messages
    def _apply(self, ops: list) -> None:
        for op in ops:
            if op[0] == "t":
                self.online.add_step(*op[1:])
                self.received += 1
            elif op[0] == "s":
                self.online.start_episode(op[1], op[2])
            else:
                self.online.end_episode()
        self.shared.received.value = self.received

    def _info(self) -> dict:
        return {"pid": os.getpid(), "grad_steps": self.grad_steps, "received": self.received, "online_transitions": len(self.online),
                "first_update_env_steps": self.first_update_env_steps, "env_steps_seen": self.env_steps}

    def _checkpoint(self, path: Path) -> None:
        self.learner.save(path)
        (path / "learner.json").write_text(json.dumps({**self._info(), "np_rng": self.rng.bit_generator.state}))

    def _handle(self, msg) -> bool:
        """Apply one message; False when told to stop."""
        kind = msg[0]
        if kind == "data":
            _, ops, self.env_steps, train_steps, self.xi = msg
            self._apply(ops)
            self.budget = self.cfg["updates_per_step"] * train_steps
        elif kind == "checkpoint":
            self._checkpoint(Path(msg[1]))
            self._report_metrics()
            self.outbox.put(("checkpointed", self._info()))
        elif kind == "stop":
            self._report_metrics()
            state = _to_numpy({k: v for k, v in self.sac.state_dict().items()})
            replay = self.online.state_dict() if msg[1] else None
            self.outbox.put(("final", state, replay, self._info()))
            return False
        return True

    # ------------------------------------------------------------------ updates
    def _update(self) -> None:
        self.sac.xi = self.xi
        metrics = self.learner.update(self.grad_steps)
        if self.first_update_env_steps is None:
            self.first_update_env_steps = self.env_steps
        self.grad_steps += 1
        self.shared.grad_steps.value = self.grad_steps
        if self.grad_steps % self.sac.cfg.critic_actor_ratio == 0:  # the actor just changed
            self.shared.publish(self.sac.actor, self.grad_steps)
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1
        if self.grad_steps % METRICS_EVERY == 0:
            self._report_metrics()

    def _report_metrics(self) -> None:
        if self.counts:
            self.outbox.put(("metrics", self.sums, self.counts))
            self.sums, self.counts = {}, {}

    def _can_update(self) -> bool:
        return self.grad_steps < self.budget and self.learner.has_data()

    def loop(self) -> None:
        while True:
            idle = not self._can_update()
            try:  # every message waiting is applied before the next update
                msg = self.inbox.get(timeout=POLL_S) if idle else self.inbox.get_nowait()
            except queue.Empty:
                if idle:
                    if not parent_alive(self.parent_pid):
                        return
                    continue
                msg = None
            if msg is not None:
                if not self._handle(msg):
                    return
                continue
            self._update()


# ----------------------------------------------------------------------------- the actor side
class AsyncSpecialistTrainer(SpecialistTrainer):
    """``residual.mode: async``: this process acts, a learner process learns (see the module docstring)."""

    mode = "async"
    _shared: SharedActor | None = None
    _grad_steps_local = 0

    def __init__(self, *args, fetch_replay: bool = False, **kwargs):
        self.fetch_replay = fetch_replay  # copy the learner's online replay back at the end (tests)
        self._proc = None
        self._resume_dir: Path | None = None
        self._ops: list = []
        self._unflushed = 0
        self._last_pull = 0
        self.actor_version = -1
        self.sync_log: list[tuple[int, int]] = []  # (env steps, actor version loaded) at every pull
        self.learner_info: dict = {}
        super().__init__(*args, **kwargs)
        self.sync_every = self.rp.sync_every

    # ------------------------------------------------------------------ counters the learner owns
    _frozen_grad_steps: int | None = None  # the learner's count at the checkpoint being written

    @property
    def grad_steps(self) -> int:
        if self._frozen_grad_steps is not None:
            return self._frozen_grad_steps
        return int(self._shared.grad_steps.value) if self._shared is not None else self._grad_steps_local

    @grad_steps.setter
    def grad_steps(self, value: int) -> None:
        self._grad_steps_local = int(value)

    @property
    def online_transitions(self) -> int:
        if self.online is not None:
            return len(self.online)
        return self.stored_transitions

    # ------------------------------------------------------------------ learner lifecycle
    def start(self) -> None:
        if self._proc is not None:
            return
        ctx = spawn_context()
        self._shared = SharedActor(self.sac.actor, ctx)
        self._shared.grad_steps.value = self._grad_steps_local
        self._inbox, self._outbox = ctx.Queue(), ctx.Queue()
        rp, sp = self.rp, self.params.sac
        cfg = {
            "obs_dim": self.encoder.dim, "sac": dataclasses.asdict(sp.to_sac_config(use_base=self.use_base)), "device": str(self.device),
            "capacity": rp.replay_capacity, "gamma": sp.gamma, "seed": rp.seed, "batch_size": sp.batch_size,
            "offline_fraction": rp.offline_fraction, "updates_per_step": rp.updates_per_step,
            "torch_threads": rp.torch_threads, "resume_dir": str(self._resume_dir) if self._resume_dir else None,
            "nice": rp.learner_nice,
        }
        offline_state = dict(self.offline.state_dict()) if self.use_offline else None
        self._proc = start_process(learner_main, (cfg, _to_numpy(self.sac.state_dict()), offline_state, self._shared,
                                                  self._inbox, self._outbox, os.getpid()), name="pld-learner")
        self._last_pull = self.env_steps

    def _check_learner(self) -> None:
        if self._proc is not None and not self._proc.is_alive():
            self._drain()
            raise RuntimeError(f"the residual learner process died (exit code {self._proc.exitcode}); see the error above")

    def _drain(self, want: str | None = None, timeout: float = REPLY_TIMEOUT_S):
        """Handle the learner's messages (metrics, errors); with ``want``, block until that reply."""
        deadline = time.time() + timeout
        while True:
            try:
                msg = self._outbox.get(timeout=POLL_S) if want else self._outbox.get_nowait()
            except queue.Empty:
                if want is None:
                    return None
                if not self._proc.is_alive():
                    raise RuntimeError(f"the residual learner process died (exit code {self._proc.exitcode}) before answering '{want}'")
                if time.time() > deadline:
                    raise RuntimeError(f"the residual learner did not answer '{want}' within {timeout:.0f} s")
                continue
            kind = msg[0]
            if kind == "error":
                raise RuntimeError(f"the residual learner failed:\n{msg[1]}")
            if kind == "metrics":
                for k, v in msg[1].items():
                    self._update_sums[k] = self._update_sums.get(k, 0.0) + v
                    self._update_counts[k] = self._update_counts.get(k, 0) + msg[2][k]
                continue
            if kind == want:
                return msg

    def stop(self) -> None:
        """Send the rest, get the learner's final networks (and replay, with ``fetch_replay``), end it."""
        if self._proc is None:
            return
        self._flush()
        self._inbox.put(("stop", self.fetch_replay))
        _, state, replay, info = self._drain("final")
        self.sac.load_state_dict(_to_torch(state))
        self.learner_info = info
        self.grad_steps = info["grad_steps"]
        if replay is not None:
            self.online = ReplayBuffer(self.rp.replay_capacity, self.encoder.dim, ACT_DIM, self.params.sac.gamma)
            self.online.load_state_dict(replay)
        self._proc.join(timeout=30)
        self.close()

    def close(self) -> None:
        if self._shared is not None:
            self._grad_steps_local = int(self._shared.grad_steps.value)
        if self._proc is not None:
            if self._proc.is_alive():
                self._proc.terminate()
            self._proc.join(timeout=10)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
            for q in (self._inbox, self._outbox):
                q.cancel_join_thread()
                q.close()
        self._proc = None
        self._shared = None

    # ------------------------------------------------------------------ the episode's hooks
    def _replay_start(self, x, a_b) -> None:
        self._ops.append(("s", x, a_b))

    def _replay_step(self, action, reward, done, next_x, next_a_b) -> None:
        self._ops.append(("t", np.asarray(action, dtype=np.float32), float(reward), float(done), next_x, next_a_b))

    def _replay_end(self) -> None:
        self._ops.append(("e",))
        self._flush()
        self._drain()
        self._check_learner()

    def _flush(self) -> None:
        if self._proc is None:
            return
        self._inbox.put(("data", self._ops, self.env_steps, self.train_steps, self.current_xi()))
        self._ops = []
        self._unflushed = 0

    def _after_step(self, warmup: bool) -> None:
        if self._training(warmup):
            self.train_steps += 1
            self.sac.xi = self.current_xi()  # as sync does before its updates (the evaluations use it)
        self._unflushed += 1  # counted in steps, not writes: probing steps raise the update budget too
        if self._unflushed >= FLUSH_EVERY:
            self._flush()
        if self.env_steps - self._last_pull >= self.sync_every:
            self._pull()

    def _pull(self) -> None:
        """Load the learner's newest actor weights (if newer than ours)."""
        if self._shared is None:
            return
        self._last_pull = self.env_steps
        if int(self._shared.version.value) != self.actor_version:
            self.actor_version = self._shared.load_into(self.sac.actor)
        self.sync_log.append((self.env_steps, self.actor_version))

    def _update(self) -> None:  # never called: the learner updates
        raise AssertionError("the async trainer does not update in the actor process")

    def _evaluate(self, episodes: int, final: bool = False) -> dict:
        self._pull()
        return super()._evaluate(episodes, final=final)

    # ------------------------------------------------------------------ checkpoint / resume
    def _save_learner(self, tmp: Path) -> None:
        if self._proc is None:  # not started (e.g. a checkpoint before run): only the networks
            state = self.sac.state_dict()
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / SAC_FILE))
            return
        self._flush()
        self._inbox.put(("checkpoint", str(tmp)))
        _, info = self._drain("checkpointed")
        self._frozen_grad_steps = int(info["grad_steps"])  # state.json records the count the learner saved
        save_file({"rng.torch": torch.get_rng_state()}, str(tmp / "actor_rng.safetensors"))

    def checkpoint(self) -> Path:
        try:
            return super().checkpoint()
        finally:
            self._frozen_grad_steps = None

    def _load_learner(self, ckpt: Path, counters: dict) -> None:
        if counters.get("mode") != "async" or not (ckpt / "learner.json").is_file():
            raise PLDError(f"{ckpt}: not an async checkpoint. Fix: delete {ckpt.parent} to start over, or set residual.mode: sync")
        state = load_file(str(ckpt / SAC_FILE))
        state.pop("rng.torch", None)  # the learner's
        self.sac.load_state_dict(state)
        actor_rng = load_file(str(ckpt / "actor_rng.safetensors")).get("rng.torch")
        if actor_rng is not None:
            torch.set_rng_state(actor_rng)
        self._resume_dir = ckpt  # the learner loads its replay, RNGs and counters from here
