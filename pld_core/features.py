"""One table from the environment's observation keys to the store's arrays and LeRobot's features.

The names on the LeRobot side are those of LeRobot's LIBERO datasets (HuggingFaceVLA/libero):
`observation.state` is the 8-dim proprioception (eef pos, eef axis-angle, gripper qpos),
`observation.images.image` the agentview camera and `observation.images.image2` the wrist camera,
both flipped 180 degrees from MuJoCo's raw render. `observation.environment_state` carries the
privileged object poses and the task one-hot of `state` mode.
"""

# env obs key -> (store array, LeRobot feature key, is_image)
OBS_FEATURES: dict[str, tuple[str, str, bool]] = {
    "state": ("obs_state", "observation.state", False),
    "env_state": ("obs_env_state", "observation.environment_state", False),
    "image": ("obs_image", "observation.images.image", True),
    "wrist_image": ("obs_wrist_image", "observation.images.image2", True),
}
ACTION_FEATURE = "action"
STATE_DIM = 8
ACT_DIM = 7
GRIPPER_DIM = 6  # the gripper command (robosuite: its sign opens or closes)
FPS = 20  # LIBERO's control frequency


def env_keys_for_mode(mode: str) -> list[str]:
    return ["state", "env_state"] + (["image", "wrist_image"] if mode == "images" else [])


def lerobot_key(env_key: str) -> str:
    return OBS_FEATURES[env_key][1]


def store_key(env_key: str) -> str:
    return OBS_FEATURES[env_key][0]


def env_key_for_lerobot(feature: str) -> str | None:
    for env_key, (_, lr_key, _) in OBS_FEATURES.items():
        if lr_key == feature:
            return env_key
    return None
