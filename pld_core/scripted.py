"""Scripted pick-and-place expert from privileged object poses: the stand-in for teleoperation.

It reads the target object's and the container's collision boxes from the simulator and drives the
default OSC delta-pose controller through waypoints: above the grasp point, down, close, lift,
over the container, down, open. Tasks it solves: every LIBERO-Object task ("pick up the X and place
it in the basket") and the LIBERO-Spatial tasks ("pick up the black bowl ... and place it on the
plate"): both are "move obj_of_interest[0] onto/into obj_of_interest[1]".

The grasp point of a long object moves along its long axis away from its nearest neighbours, so
the fingers do not hit a neighbouring object (a centred grasp of the cream cheese hits the can
next to it).
"""

from __future__ import annotations

import mujoco
import numpy as np

from pld_core.env import LiberoEnv
from pld_core.errors import PLDError

SUPPORTED_SUITES = ("libero_object", "libero_spatial")
GAIN = 10.0  # proportional gain, action units per metre (OSC_POSE: action 1 ~ 5 cm per step)


def _collision_boxes(model, data, prefix: str) -> np.ndarray:
    """World-frame corners (n, 3) of every collision geom of the object named ``prefix``."""
    corners = []
    for g in range(model.ngeom):
        name = mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_GEOM, g) or ""
        if not name.startswith(prefix + "_") or model.geom_contype[g] == 0:
            continue
        # geom_aabb holds the geom's local bounding box (centre, half sizes)
        c, h = model.geom_aabb[g, :3], model.geom_aabb[g, 3:]
        signs = np.array(np.meshgrid([-1, 1], [-1, 1], [-1, 1])).reshape(3, -1).T
        local = c + signs * h
        corners.append(local @ data.geom_xmat[g].reshape(3, 3).T + data.geom_xpos[g])
    if not corners:
        raise PLDError(f"scripted expert: no collision geoms found for object '{prefix}'")
    return np.concatenate(corners)


class ScriptedExpert:
    """A closed-loop waypoint controller. ``reset(env)`` after each ``env.reset``; ``act(obs)`` per step."""

    def __init__(self, noise: float = 0.0, seed: int = 0):
        self.noise = noise
        self.rng = np.random.default_rng(seed)
        self.env: LiberoEnv | None = None

    def reset(self, env: LiberoEnv) -> None:
        if env.suite not in SUPPORTED_SUITES:
            raise PLDError(f"the scripted expert supports {SUPPORTED_SUITES}, not '{env.suite}'. Fix: use one of those suites, or a checkpoint policy")
        self.env = env
        m, d = env.sim.model._model, env.sim.data._data
        self.target, self.container = env.objects[0], env.objects[1]
        tgt = _collision_boxes(m, d, self.target)
        lo, hi = tgt.min(0), tgt.max(0)
        centre = (lo + hi) / 2
        size = hi - lo
        grasp_xy = centre[:2].copy()
        long_axis = int(np.argmax(size[:2]))
        if size[long_axis] > 1.6 * size[1 - long_axis] and size[long_axis] > 0.06:
            # long object lying down: grasp off-centre, away from the nearest other object
            others = [n for n in env.inner.objects_dict if n != self.target]
            pos = np.array([_collision_boxes(m, d, n).mean(0)[:2] for n in others])
            direction = np.zeros(2)
            direction[long_axis] = 1.0
            near = pos[np.argmin(np.linalg.norm(pos - centre[:2], axis=1))]
            if (near - centre[:2]) @ direction > 0:
                direction = -direction
            grasp_xy = centre[:2] + direction * 0.22 * size[long_axis]
        # grasp the top part of tall objects, the middle of short ones
        grasp_z = max(lo[2] + 0.5 * size[2], hi[2] - 0.035)
        self.grasp = np.array([*grasp_xy, grasp_z])
        cont = _collision_boxes(m, d, self.container)
        clo, chi = cont.min(0), cont.max(0)
        self.place_xy = (clo[:2] + chi[:2]) / 2
        # carry height: clear the container rim with the object hanging below the fingers
        self.carry_z = max(chi[2], hi[2]) + 0.10 + max(0.0, grasp_z - lo[2])
        self.release_z = chi[2] + 0.03 + max(0.0, grasp_z - lo[2])
        self.phase, self.count = "above", 0

    def _move(self, eef: np.ndarray, target: np.ndarray, gripper: float) -> np.ndarray:
        a = np.zeros(7, dtype=np.float32)
        a[:3] = np.clip(GAIN * (target - eef), -1.0, 1.0)  # P-control, saturating at 5 cm/step
        a[6] = gripper
        return a

    def act(self, obs: dict | None = None) -> np.ndarray:
        raw = self.env.raw_obs
        eef = np.asarray(raw["robot0_eef_pos"])
        hover = np.array([*self.grasp[:2], self.grasp[2] + 0.08])
        self.count += 1
        p = self.phase
        if p == "above":
            a = self._move(eef, hover, -1.0)
            if np.linalg.norm(eef[:2] - hover[:2]) < 0.01 and abs(eef[2] - hover[2]) < 0.02:
                self.phase, self.count = "descend", 0
        elif p == "descend":
            a = self._move(eef, self.grasp, -1.0)
            # close as soon as the fingers are around the grasp point: a function of the observation,
            # not of a hidden timer, so a policy cloned from these demos can tell when to close
            if (np.linalg.norm(eef[:2] - self.grasp[:2]) < 0.015 and abs(eef[2] - self.grasp[2]) < 0.015) or self.count > 60:
                self.phase, self.count = "close", 0
        elif p == "close":
            a = self._move(eef, self.grasp, 1.0)
            if self.count >= 12:
                self.phase, self.count = "lift", 0
        elif p == "lift":
            a = self._move(eef, np.array([*eef[:2], self.carry_z]), 1.0)
            if eef[2] > self.carry_z - 0.02 or self.count > 40:
                self.phase, self.count = "carry", 0
        elif p == "carry":
            a = self._move(eef, np.array([*self.place_xy, self.carry_z]), 1.0)
            if np.linalg.norm(eef[:2] - self.place_xy) < 0.015 or self.count > 80:
                self.phase, self.count = "lower", 0
        elif p == "lower":
            # aim below the release height so the arm crosses it at speed: few "still lowering"
            # frames lie next to the "open" frames, and a cloned policy sees a sharp switch
            a = self._move(eef, np.array([*self.place_xy, self.release_z - 0.04]), 1.0)
            if eef[2] < self.release_z or self.count > 40:
                self.phase, self.count = "release", 0
        elif p == "release":
            # hold still and open until the fingers are observably open (not a hidden timer)
            a = self._move(eef, eef, -1.0)
            fingers = self.env.raw_obs["robot0_gripper_qpos"]
            if fingers[0] - fingers[1] > 0.075 or self.count > 20:
                self.phase, self.count = "retreat", 0
        else:  # retreat upwards, open
            a = self._move(eef, np.array([*self.place_xy, self.release_z + 0.1]), -1.0)
        a = np.clip(a, -1.0, 1.0)
        # DART-style demonstrations: the executed action is perturbed, the label stays the clean
        # expert action, so a policy cloned from them sees (and learns to leave) off-path states.
        self.last_label = a.copy()
        if self.noise > 0:
            a = a.copy()
            a[:3] += self.noise * self.rng.standard_normal(3).astype(np.float32)
        return np.clip(a, -1.0, 1.0)
