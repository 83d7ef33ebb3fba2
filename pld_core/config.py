"""``params.yaml``: the single source of every knob, validated into typed sections.

The top-level sections are the ``default`` profile. ``profiles.<name>`` holds overrides that are
deep-merged on top (``smoke``: one task, tiny budgets; ``pi05-libero``: the GPU user's pi0.5 run).
Every error names the file, the key and the fix.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pld_core.errors import PLDError
from pld_core.sac import SACConfig

_SAC = SACConfig()  # the SAC defaults live in SACConfig; SACParams adds the bounds


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)
    # fields added after stage keys existed: left out of ``section_dict`` (hence out of every stage
    # key, manifest and logged parameter) while unset, so data built before them keeps its keys
    UNSET_OMITTED: ClassVar[tuple[str, ...]] = ()

    def key_dict(self) -> dict:
        d = self.model_dump()
        for name in self.UNSET_OMITTED:
            if d.get(name) is None:
                d.pop(name, None)
        return d


class EnvParams(Section):
    suite: str = "libero_object"
    tasks: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4], min_length=1)
    mode: Literal["state", "images"] = "state"
    image_size: int = Field(128, gt=0)
    max_objects: int = Field(3, ge=1)


class DemoParams(Section):
    episodes_per_task: int = Field(20, gt=0)
    noise: float = Field(0.0, ge=0.0)
    seed: int = Field(0, ge=0)


class BaseParams(Section):
    """Base v0: a checkpoint/hub id to start from, or a LeRobot policy config trained on demos."""

    path: str | None = None
    policy: dict[str, Any] = Field(default_factory=lambda: {"type": "act"})
    # 0: base v0 is the policy at initialisation, with the demos' normalization statistics: a plumbing check of a
    # base too large to train here (a random pi0.5, profile pi05-tiny)
    steps: int = Field(2000, ge=0)
    # the tokenizer of base v0's processor, for policies that tokenize the instruction (pi0, pi0.5, smolvla):
    # null: the one LeRobot names (a hub id, e.g. google/paligemma-3b-pt-224); a local dir or hub id; or
    # "stand-in": a word-level tokenizer built from the suite's instructions (a random base only; nothing fetched)
    tokenizer: str | None = None
    batch_size: int = Field(64, gt=0)
    lr: float | None = Field(None, gt=0)


class OfflineParams(Section):
    successes: int = Field(20, gt=0)
    max_episodes: int = Field(200, gt=0)
    seed: int = Field(0, ge=0)  # seeds the base policy and the rollouts of collect_offline


class CalQLParams(Section):
    steps: int = Field(2000, ge=0)
    cql_alpha: float = Field(5.0, ge=0)
    n_actions: int = Field(10, gt=0)


class SACParams(Section):
    """``sac:`` in params.yaml: the fields of :class:`pld_core.sac.SACConfig`, whose defaults (the paper's) are
    used here; this class adds only the bounds a value must respect."""

    batch_size: int = Field(_SAC.batch_size, gt=0)
    gamma: float = Field(_SAC.gamma, gt=0, le=1)
    lr: float = Field(_SAC.lr, gt=0)
    weight_decay: float = Field(_SAC.weight_decay, ge=0)
    grad_clip: float = Field(_SAC.grad_clip, gt=0)
    tau: float = Field(_SAC.tau, gt=0, le=1)
    critic_actor_ratio: int = Field(_SAC.critic_actor_ratio, ge=1)
    init_temperature: float = Field(_SAC.init_temperature, gt=0)
    target_entropy: float | None = _SAC.target_entropy
    xi: float = Field(_SAC.xi, ge=0, le=1)
    hidden: int = Field(_SAC.hidden, gt=0)
    layers: int = Field(_SAC.layers, ge=1)
    n_q: int = Field(_SAC.n_q, ge=2)
    critic_dropout: float = Field(_SAC.critic_dropout, ge=0, lt=1)
    otf_samples: int = Field(_SAC.otf_samples, ge=1)
    reward_bias: float = _SAC.reward_bias
    n_step: int = Field(_SAC.n_step, ge=1, le=1000)
    target_bounds: list[float] | None = None  # [lo, hi]; SACConfig holds it as a tuple
    residual_l2: float = Field(_SAC.residual_l2, ge=0)
    backup_entropy: bool = _SAC.backup_entropy
    residual_dims: list[int] | None = None  # action dims the residual may change (None: all 7); a tuple in SACConfig
    xi_gripper: float | None = Field(_SAC.xi_gripper, gt=0, le=2)
    UNSET_OMITTED: ClassVar[tuple[str, ...]] = ("xi_gripper",)

    @field_validator("residual_dims")
    @classmethod
    def _dims(cls, v):
        if v is not None and (not v or len(set(v)) != len(v) or any(not 0 <= d < 7 for d in v)):
            raise ValueError("must be distinct action dims in 0..6 (xyz 0-2, rotation 3-5, gripper 6), or null for all")
        return v

    @field_validator("target_bounds")
    @classmethod
    def _bounds(cls, v):
        if v is not None and (len(v) != 2 or not v[0] < v[1]):
            raise ValueError("must be [lo, hi] with lo < hi (the returns the reward can give, e.g. [0, 1]), or null")
        return v

    def to_sac_config(self, use_base: bool = True) -> SACConfig:
        d = self.model_dump()
        d["target_bounds"] = tuple(d["target_bounds"]) if d["target_bounds"] is not None else None
        d["residual_dims"] = tuple(d["residual_dims"]) if d["residual_dims"] is not None else None
        return SACConfig(**d, use_base=use_base)


class ResidualParams(Section):
    env_steps: int = Field(20000, gt=0)
    replay_capacity: int = Field(250_000, gt=0)
    warmup_episodes: int = Field(10, ge=0)
    probe_max_fraction: float = Field(0.3, ge=0, le=1)
    xi_start: float = Field(0.1, ge=0, le=1)
    xi_warmup_steps: int = Field(5000, ge=0)
    updates_per_step: int = Field(1, ge=1)
    learning_starts: int = Field(1000, ge=0)
    checkpoint_every: int = Field(5000, gt=0)
    eval_every: int = Field(5000, gt=0)
    eval_episodes: int = Field(20, gt=0)
    final_eval_episodes: int | None = Field(None, gt=0)  # the specialist's last evaluation (None: evaluate.episodes)
    # stop early once the specialist is good enough: a periodic eval at or above this success rate triggers a
    # full one (final_eval_episodes initial states); if that one is too, training ends there and it is the final
    stop_at: float | None = Field(None, gt=0, le=1)
    ablation: Literal["none", "no_base", "no_offline", "no_calql", "no_probe"] = "none"
    seed: int = Field(0, ge=0)
    encoder: Literal["state", "image"] = "state"  # residual/critic input; image: frozen ResNet-18 latents of both cameras (env.mode: images)
    image_encoder_weights: str | None = None  # encoder image: a safetensors ResNet-18 state_dict; null = fixed random init
    UNSET_OMITTED: ClassVar[tuple[str, ...]] = ("stop_at", "image_encoder_weights")
    offline_fraction: float = Field(0.5, ge=0, le=1)  # share of each batch from the offline buffer (RLPD: 0.5)
    torch_threads: int | None = Field(1, ge=1)  # CPU threads for torch (1 is fastest for these small nets); null = torch default
    # sync: one process, updates between env steps (bit-reproducible under the seed);
    # async: a learner process beside the actor (SERL-style), env steps at the simulator's speed
    mode: Literal["sync", "async"] = "async"
    sync_every: int = Field(50, ge=1)  # async: the actor loads the learner's newest actor weights every N env steps
    learner_nice: int = Field(5, ge=0, le=19)  # async: the learner's CPU niceness (the actor, on the critical path, wins a busy CPU)


class CollectParams(Section):
    episodes_per_task: int = Field(50, gt=0)
    max_episodes: int = Field(200, gt=0)
    alpha: float = Field(0.6, ge=0, le=1)


class SFTParams(Section):
    steps: int = Field(1000, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float | None = Field(None, gt=0)
    lora: dict[str, Any] | None = None
    include_base_data: bool = True


class EvalParams(Section):
    episodes: int = Field(50, gt=0)


class FlywheelParams(Section):
    iterations: int = Field(2, gt=0)
    # stop before `iterations` once a version's mean success (evaluate) reaches it; null: run them all
    target_success: float | None = Field(None, gt=0, le=1)
    data_dir: str = "data"
    task_runner: Literal["threads", "dask", "ray", "sequential"] = "sequential"
    max_workers: int = Field(1, gt=0)
    seed: int = Field(0, ge=0)
    # simulators run at once (worker processes) by collect_offline, collect_pld and evaluate; 1 = in-process.
    # Results do not depend on it (every episode is a function of its task, initial state and seed).
    collect_workers: int = Field(2, ge=1)
    # a plumbing check, not training: collect_offline and collect_pld keep failed episodes too, so every stage
    # runs on non-empty input from a base that never succeeds (a random pi0.5, a base distilled for 20 steps).
    # The success rates stay the true ones; what the specialists and the SFT learn from such data means nothing.
    keep_failures: bool = False
    # with collect_workers > 1: load a LeRobot base once, in the stage's process, and batch its calls
    # across the simulators (pld_core/base_server.py) instead of one copy per worker
    batch_base: bool = False


class MLflowParams(Section):
    tracking_uri: str = "sqlite:///data/mlflow.db"
    artifact_dir: str = "data/mlartifacts"
    experiment: str = "pld-flywheel"
    model_name: str = "pld-base"


class HubParams(Section):
    push: bool = False
    dataset_repo: str | None = None
    model_repo: str | None = None


class Params(Section):
    profile: str = "default"
    device: str = "cpu"
    # the tasks and base v0
    env: EnvParams = EnvParams()
    demo: DemoParams = DemoParams()
    base: BaseParams = BaseParams()
    # probe and learn: per task, a residual specialist on the frozen base
    offline: OfflineParams = OfflineParams()
    calql: CalQLParams = CalQLParams()
    sac: SACParams = SACParams()
    residual: ResidualParams = ResidualParams()
    # distill: hybrid rollouts into the next base, evaluated
    collect: CollectParams = CollectParams()
    sft: SFTParams = SFTParams()
    evaluate: EvalParams = EvalParams()
    # the run: loop, lineage, publishing
    flywheel: FlywheelParams = FlywheelParams()
    mlflow: MLflowParams = MLflowParams()
    hub: HubParams = HubParams()

    @model_validator(mode="after")
    def _check(self):
        if len(set(self.env.tasks)) != len(self.env.tasks):
            raise ValueError("env.tasks has duplicates")
        if any(t < 0 for t in self.env.tasks):
            raise ValueError("env.tasks must be non-negative task indices")
        return self

    def section_dict(self, name: str) -> dict:
        return getattr(self, name).key_dict()


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "policy":
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_params(path: str | Path = "params.yaml", profile: str | None = None, overrides: dict | None = None) -> Params:
    """Read ``params.yaml``, apply ``profiles.<profile>`` and ``overrides``, validate."""
    path = Path(path)
    if not path.exists():
        raise PLDError(f"{path}: params file not found. Fix: run from the project root or pass --params PATH")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise PLDError(f"{path}: not valid YAML ({e}). Fix: correct the syntax") from None
    if not isinstance(raw, dict):
        raise PLDError(f"{path}: top level must be a mapping of sections. Fix: see the README's params section")
    profiles = raw.pop("profiles", {}) or {}
    profile = profile or raw.get("profile", "default")
    if profile != "default":
        if profile not in profiles:
            raise PLDError(f"{path}: profile '{profile}' not found under 'profiles'. Fix: use one of {['default', *profiles]}")
        raw = _deep_merge(raw, profiles[profile])
    raw["profile"] = profile
    if overrides:
        raw = _deep_merge(raw, overrides)
    return validate_params(raw, source=str(path))


def validate_params(raw: dict, source: str = "params.yaml") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            fix = f"remove or rename the unknown key '{key}'"
        else:
            fix = f"set '{key}' to a valid value ({err['msg']})"
        more = f" (and {len(e.errors()) - 1} more problems)" if len(e.errors()) > 1 else ""
        raise PLDError(f"{source}: key '{key}' is invalid: {err['msg']} (got {err.get('input')!r}){more}. Fix: {fix}") from None


def parse_overrides(items: list[str]) -> dict:
    """``["sac.batch_size=64", "env.tasks=[0,1]"]`` -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise PLDError(f"override '{item}' is not KEY=VALUE. Fix: write e.g. --set sac.batch_size=64")
        key, value = item.split("=", 1)
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value)
    return out
