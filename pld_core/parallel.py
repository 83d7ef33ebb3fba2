"""Several LIBERO simulators at once: worker processes that play episodes, results in job order.

:class:`EpisodePool` runs ``fn(env, policy, *args)`` for a stream of jobs ``(task, args)``. With
``workers=1`` it plays them in this process, one after the other, when the caller asks for the
next result (what the stages always did). With ``workers=W > 1`` it starts W processes; each
builds its own :class:`~pld_core.env.LiberoEnv` (one task at a time) and its own policy from the
picklable ``make_policy(env)``, and takes the next job when it is free. Results come back in
job order, so a caller that stops early (``collect_offline`` after ``offline.successes``
successes) keeps exactly the episodes the serial loop would have kept; the few episodes played
ahead are dropped.

Results equal the serial ones because an episode depends only on its task, initial state, seed
and policy: :class:`LiberoEnv` resets everything between episodes, and the scripted base draws its
noise per episode (:class:`pld_core.policies.EpisodeSeededExpert`). A LeRobot base is loaded once
per worker; deterministic policies (ACT without its VAE at inference, like every base here) give
the same actions in every process. Each worker runs torch on one thread.

Processes start with the ``spawn`` method (fork after MuJoCo, torch and threads is unsafe), without
re-running the parent's ``__main__`` (a test driver script has no ``if __name__ == "__main__"``
guard), and die with their parent (Linux ``PR_SET_PDEATHSIG``): a SIGKILLed stage leaves no
orphan simulator behind.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import pickle
import queue
import signal
import sys
import traceback
import types
from typing import Any, Callable, Iterable, Iterator

from pld_core.env import EnvSpec
from pld_core.errors import PLDError

POLL_S = 1.0


# ----------------------------------------------------------------------------- process helpers
@contextlib.contextmanager
def _no_main_reimport():
    """While starting a spawn child, hide ``__main__`` so the child does not import it again."""
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")  # no __file__, __spec__ None
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


def spawn_context():
    return mp.get_context("spawn")


@contextlib.contextmanager
def _allow_children():
    """Let a daemonic process (a Dask worker runs stages in one) start children.

    multiprocessing forbids it because a daemonic process is killed without cleanup, which would
    orphan its children; ours die with their parent (:func:`child_setup`), so that cannot happen.
    """
    config = mp.current_process()._config
    daemon = config.get("daemon")
    if daemon:
        config["daemon"] = False
    try:
        yield
    finally:
        if daemon:
            config["daemon"] = daemon


def start_process(target: Callable, args: tuple, name: str):
    """A daemon ``spawn`` process running ``target(*args)`` (module-level, picklable)."""
    proc = spawn_context().Process(target=target, args=args, name=name, daemon=True)
    with _no_main_reimport(), _allow_children():
        proc.start()
    return proc


def child_setup(parent_pid: int, threads: int = 1) -> None:
    """First thing in a child: die with the parent, one thread for torch/BLAS."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before prctl
        os._exit(1)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def parent_alive(parent_pid: int) -> bool:
    return os.getppid() == parent_pid


# ----------------------------------------------------------------------------- the worker
class _Worker:
    """One env (the current job's task) and its policy; a new task replaces both."""

    def __init__(self, env_spec: EnvSpec, make_policy: Callable, max_steps: int | None = None):
        self.env_spec, self.make_policy, self.max_steps = env_spec, make_policy, max_steps
        self.task: int | None = None
        self.env = self.policy = None

    def run(self, fn: Callable, task: int, args: tuple):
        if task != self.task:
            self.close()
            spec = EnvSpec(self.env_spec.suite, int(task), self.env_spec.mode, self.env_spec.image_size, self.env_spec.max_objects)
            self.env = spec.make(self.max_steps)
            self.policy = self.make_policy(self.env)
            self.task = task
            if "torch" in sys.modules:
                sys.modules["torch"].set_num_threads(1)
        return fn(self.env, self.policy, *args)

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
        self.env = self.policy = self.task = None


def _worker_main(env_spec, make_policy, max_steps, jobs, results, parent_pid, served=None) -> None:
    child_setup(parent_pid)
    if served is not None:  # (spec, pipe): the pool's process serves that base (pld_core.base_server)
        from pld_core.base_server import install_remote

        install_remote(*served)
    worker = _Worker(env_spec, make_policy, max_steps)
    while True:
        try:
            job = jobs.get(timeout=POLL_S)
        except queue.Empty:
            if not parent_alive(parent_pid):
                return
            continue
        if job is None:
            break
        idx, fn, task, args = job
        try:
            results.put((idx, True, worker.run(fn, task, args)))
        except PLDError as e:  # a user error: the parent raises it as such (one line, exit 2)
            results.put((idx, False, ("pld", str(e))))
        except BaseException:  # noqa: BLE001  (the parent re-raises it with the traceback)
            results.put((idx, False, ("crash", traceback.format_exc())))
    worker.close()


class WorkerError(RuntimeError):
    pass


class EpisodePool:
    """``imap(fn, jobs)``: ``fn(env, policy, *args)`` for jobs ``(task, args)``, results in job order.

    ``fn`` must be a module-level function and ``make_policy`` picklable when ``workers > 1``.
    Use as a context manager (closing stops the workers; results not yet asked for are dropped).

    ``serve_base``: the base's :class:`~pld_core.policies.PolicyFactory`; with ``workers > 1`` and a
    LeRobot checkpoint that allows it, the base is loaded once, here, and its calls are batched across
    the workers (:mod:`pld_core.base_server`); ``base_batch_sizes`` then records each forward pass's batch.
    """

    def __init__(self, env_spec: EnvSpec, make_policy: Callable, workers: int = 1, max_steps: int | None = None,
                 serve_base=None, log: Callable[[str], None] | None = None):
        self.env_spec, self.make_policy, self.max_steps = env_spec, make_policy, max_steps
        self.serve_base, self.log = serve_base, log
        self._server = None
        self.workers = max(1, int(workers))
        if self.workers > 1:
            try:
                pickle.dumps(make_policy)
            except Exception:  # noqa: BLE001  (a closure policy factory: play the episodes here)
                self.workers = 1
        self._local: _Worker | None = None
        self._procs: list = []
        self._in_flight = 0

    def __enter__(self) -> "EpisodePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        ctx = spawn_context()
        self._jobs, self._results = ctx.Queue(), ctx.Queue()
        pipes = self._start_base_server(ctx)
        for i in range(self.workers):
            served = (self.serve_base.spec, pipes[i]) if pipes else None
            self._procs.append(start_process(_worker_main, (self.env_spec, self.make_policy, self.max_steps, self._jobs,
                                                            self._results, os.getpid(), served), name=f"pld-sim-{i}"))
        for end in pipes or []:
            end.close()  # the worker holds it now; the server sees EOF when that worker is gone

    def _start_base_server(self, ctx) -> list | None:
        """Load the served base here and start its batching thread; the workers' pipe ends (None: not served)."""
        from pld_core.policies import is_scripted

        f = self.serve_base
        if f is None or is_scripted(f.spec):
            return None
        from pld_core.base_policy import BasePolicy
        from pld_core.base_server import BaseServer, unbatchable
        from pld_core.env import env_state_dim

        e = self.env_spec
        base = BasePolicy.load(f.spec, obs_mode=f.mode, env_state_dim=env_state_dim(e.suite, e.max_objects), device=f.device)
        why = unbatchable(base)
        if why is not None:
            (self.log or logging.getLogger(__name__).warning)(f"base {f.spec}: loaded per worker, not served in batches ({why})")
            return None
        ours, theirs = zip(*(ctx.Pipe() for _ in range(self.workers)))
        self._server = BaseServer(base, list(ours)).start()
        return list(theirs)

    @property
    def base_batch_sizes(self) -> list[int]:
        return list(self._server.batch_sizes) if self._server is not None else []

    def imap(self, fn: Callable, jobs: Iterable[tuple[int, tuple]]) -> Iterator[Any]:
        if self.workers == 1:
            self._local = self._local or _Worker(self.env_spec, self.make_policy, self.max_steps)
            for task, args in jobs:
                yield self._local.run(fn, task, args)
            return
        if not self._procs:
            self._start()
        jobs = iter(jobs)
        window = 2 * self.workers  # jobs queued or running: workers never wait for the next one
        done: dict[int, Any] = {}
        submitted = wanted = 0
        exhausted = False
        while True:
            while not exhausted and submitted - wanted < window:
                try:
                    task, args = next(jobs)
                except StopIteration:
                    exhausted = True
                    break
                self._jobs.put((submitted, fn, task, args))
                submitted += 1
                self._in_flight += 1
            if wanted == submitted and exhausted:
                return
            while wanted not in done:
                try:
                    idx, ok, value = self._results.get(timeout=POLL_S)
                except queue.Empty:
                    if self._server is not None and self._server.error is not None:
                        raise WorkerError(f"the base server stopped: {self._server.error!r}") from self._server.error
                    dead = [p for p in self._procs if not p.is_alive()]
                    if dead:
                        raise WorkerError(f"simulator worker {dead[0].name} died (exit code {dead[0].exitcode})") from None
                    continue
                self._in_flight -= 1
                if not ok:
                    kind, text = value
                    if kind == "pld":
                        raise PLDError(text)
                    raise WorkerError(f"simulator worker failed on job {idx}:\n{text}")
                done[idx] = value
            value = done.pop(wanted)
            wanted += 1
            yield value

    def close(self) -> None:
        if self._local is not None:
            self._local.close()
            self._local = None
        if not self._procs:
            return
        if self._in_flight:  # episodes played ahead of an early stop: not worth waiting for
            for p in self._procs:
                p.terminate()
        else:
            for _ in self._procs:
                self._jobs.put(None)
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        self._jobs.cancel_join_thread()
        self._results.cancel_join_thread()
        self._procs = []
        self._in_flight = 0
        if self._server is not None:
            self._server.stop()  # its pipes hit EOF once the workers are gone


# ----------------------------------------------------------------------------- episode functions
def record_episode(env, policy, init_state: int, seed: int, gamma: float):
    """(success, length, Episode) of one recorded rollout (collect_offline)."""
    from pld_core.rollout import run_episode

    return run_episode(env, policy, init_state, seed=seed, record=True, gamma=gamma)


def outcome_episode(env, policy, init_state: int, seed: int):
    """(success, length) of one rollout (evaluation)."""
    from pld_core.rollout import run_episode

    ok, length, _ = run_episode(env, policy, init_state=init_state, seed=seed)
    return ok, length
