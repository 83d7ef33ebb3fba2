"""One base policy for several simulator workers, its calls batched across them.

Without this, each worker process of an :class:`~pld_core.parallel.EpisodePool` loads its own copy
of a LeRobot base and runs it on one observation at a time: W copies of the weights (for pi0.5,
W x 3B parameters on one GPU) and W small forward passes where one batched pass would do.

With ``EpisodePool(..., serve_base=spec)``, the pool's process loads the base once and runs a
:class:`BaseServer` thread; each worker gets a pipe and a :class:`RemoteBase` in place of its own
copy (every :class:`~pld_core.policies.PolicyFactory` for that spec in the worker returns it, so
a base under a residual specialist is served too). A worker asks for a new action chunk only when
its queue is empty (every ``n_action_steps`` steps, as LeRobot's ``select_action`` does); the
server takes the requests that are waiting, waits up to ``gather_s`` for the other workers'
requests, and answers them all with one ``predict_action_chunk`` call on the stacked batch.

The actions are those ``select_action`` gives for the same observations: the first
``n_action_steps`` of the predicted chunk, post-processed (un-normalised) one by one, clipped to
[-1, 1] as :meth:`BasePolicy.act` does. That holds for chunking policies without observation
history or temporal ensembling (ACT, pi0, pi0.5, SmolVLA); :func:`unbatchable` names what rules a
checkpoint out, and the pool then loads it per worker as before.
"""

from __future__ import annotations

import threading
import time
import traceback
from multiprocessing import connection
from typing import Any

import numpy as np

from pld_core.errors import PLDError
from pld_core.features import ACT_DIM

_REMOTE: dict[str, Any] = {}  # spec -> connection, in a worker process


def unbatchable(base) -> str | None:
    """Why a loaded :class:`~pld_core.base_policy.BasePolicy` cannot be served in batches (None: it can)."""
    policy, cfg = base.policy, base.policy.config
    if not callable(getattr(policy, "predict_action_chunk", None)):
        return f"'{cfg.type}' has no predict_action_chunk"
    if getattr(cfg, "temporal_ensemble_coeff", None) is not None:
        return "temporal ensembling mixes chunks across steps"
    if int(getattr(cfg, "n_obs_steps", 1) or 1) > 1:
        return f"it conditions on {cfg.n_obs_steps} past observations"
    return None


def install_remote(spec: str, conn) -> None:
    """In a worker: serve ``spec`` through ``conn`` instead of loading it."""
    _REMOTE[spec] = conn


def remote_for(spec: str) -> "RemoteBase | None":
    conn = _REMOTE.get(spec)
    return None if conn is None else RemoteBase(conn)


class RemoteBase:
    """The rollout protocol (``reset(env)``, ``act(obs)``) of a base that lives in the pool's process."""

    def __init__(self, conn):
        self.conn = conn
        self.queue: list[np.ndarray] = []
        self.task = ""
        self.n_model_calls = 0

    def reset(self, env) -> None:
        self.queue = []
        self.task = str(env.language)

    def act(self, obs: dict) -> np.ndarray:
        if not self.queue:
            self.conn.send((self.task, {k: np.asarray(v) for k, v in obs.items()}))
            ok, value = self.conn.recv()
            if not ok:
                kind, text = value
                raise PLDError(text) if kind == "pld" else RuntimeError(text)
            self.queue = list(value)
            self.n_model_calls += 1
        return self.queue.pop(0)


class BaseServer:
    """A thread answering :class:`RemoteBase` requests from several pipes, batched."""

    def __init__(self, base, conns: list, gather_s: float = 0.005):
        self.base, self.gather_s = base, float(gather_s)
        self.conns = list(conns)
        self.batch_sizes: list[int] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="pld-base-server", daemon=True)

    def start(self) -> "BaseServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _receive(self, ready, pending: dict) -> None:
        for c in ready:
            try:
                pending[c] = c.recv()
            except (EOFError, OSError):  # that worker is gone
                self.conns.remove(c)

    def _serve(self) -> None:
        try:
            while not self._stop.is_set() and self.conns:
                pending: dict = {}
                self._receive(connection.wait(self.conns, timeout=0.2), pending)
                deadline = time.monotonic() + self.gather_s
                while pending and len(pending) < len(self.conns):  # the others may be a step away
                    left = deadline - time.monotonic()
                    rest = [c for c in self.conns if c not in pending]
                    if left <= 0 or not rest:
                        break
                    self._receive(connection.wait(rest, timeout=left), pending)
                if pending:
                    self._answer(pending)
        except BaseException as e:  # noqa: BLE001  (reported to the workers, then re-raised by the pool)
            self.error = e

    def _answer(self, pending: dict) -> None:
        conns = list(pending)
        try:
            chunks = self.predict([pending[c][0] for c in conns], [pending[c][1] for c in conns])
        except PLDError as e:  # a user error (the observation does not fit the checkpoint): one line
            for c in conns:
                c.send((False, ("pld", str(e))))
            return
        except Exception:  # noqa: BLE001  (the workers re-raise it with this traceback)
            for c in conns:
                c.send((False, ("crash", "the base server failed:\n" + traceback.format_exc())))
            return
        self.batch_sizes.append(len(conns))
        for c, chunk in zip(conns, chunks):
            c.send((True, chunk))

    def predict(self, tasks: list[str], observations: list[dict]) -> np.ndarray:
        """(B, n_action_steps, 7) executed actions for B (task, observation) pairs, in one forward pass."""
        import torch

        base = self.base
        rows = [base.build_batch(obs) for obs in observations]
        batch: dict[str, Any] = {k: torch.cat([r[k] for r in rows]) for k in rows[0] if k != "task"}
        batch["task"] = list(tasks)  # each row's own instruction
        with torch.inference_mode():
            chunk = base.policy.predict_action_chunk(base.preprocessor(batch))[:, :base.n_action_steps]
            b, n, d = chunk.shape
            actions = base.postprocessor(chunk.reshape(b * n, d))
        a = actions.detach().to("cpu", torch.float32).numpy().reshape(b, n, -1)
        if a.shape[-1] != ACT_DIM:
            raise PLDError(f"base policy {base.checkpoint_path} returned actions of width {a.shape[-1]}, expected {ACT_DIM}")
        base.n_model_calls += 1
        return np.clip(a, -1.0, 1.0)
