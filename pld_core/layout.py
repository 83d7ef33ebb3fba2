"""Where every artifact lives, the stage graph, and what a base policy is.

- :class:`Layout`: the paths of every stage output under ``flywheel.data_dir``, one place for the data flow.
- :data:`STAGES`: the stage graph, named once. The flows, ``pld stage``, the fault bench and the
  ``dvc.yaml`` check read it from here.
- :class:`BaseRef`: a base policy resolved once (what loads it, and the digest that identifies it in stage
  keys) and handed to every stage that runs it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from pld_core.artifacts import digest_json, read_manifest, require_manifest
from pld_core.errors import PLDError
from pld_core.policies import is_scripted
from pld_core.stage import no_data_reason

OFFLINE_STORE = "offline.zarr"  # collect_offline's output store
PLD_STORE = "pld.zarr"  # collect_pld's output store


@dataclass(frozen=True)
class Layout:
    """Paths of every artifact, one place for the whole data flow."""

    root: Path

    @classmethod
    def of(cls, params, project_root: Path | None = None) -> "Layout":
        root = Path(params.flywheel.data_dir)
        if not root.is_absolute():
            root = Path(project_root or os.getcwd()) / root
        return cls(root)

    @property
    def demos(self) -> Path:
        return self.root / "demos"

    def base(self, version: int) -> Path:
        """The stage dir whose ``pretrained_model`` is base ``v<version>``."""
        return self.root / "base_v0" if version == 0 else self.iteration(version - 1) / "base_next"

    def base_eval(self, version: int) -> Path:
        return self.root / "base_v0_eval" if version == 0 else self.iteration(version - 1) / "eval"

    def iteration(self, k: int) -> Path:
        return self.root / f"iter_{k}"

    def task_dir(self, k: int, suite: str, task: int) -> Path:
        return self.iteration(k) / f"{suite}-{task}"

    def offline(self, k, suite, task) -> Path:
        return self.task_dir(k, suite, task) / "offline"

    def critic_init(self, k, suite, task) -> Path:
        return self.task_dir(k, suite, task) / "critic_init"

    def residual(self, k, suite, task) -> Path:
        return self.task_dir(k, suite, task) / "residual"

    def pld(self, k, suite, task) -> Path:
        # all tasks' PLD data under one folder: convert_dataset (and DVC) depend on that folder
        return self.iteration(k) / "pld" / f"{suite}-{task}"

    def dataset_raw(self, k) -> Path:
        return self.iteration(k) / "pld_dataset_raw"

    def dataset(self, k) -> Path:
        return self.iteration(k) / "pld_dataset"

    def figures(self) -> Path:
        return self.root / "figures"


# ----------------------------------------------------------------------------- the stage graph
@dataclass(frozen=True)
class Stage:
    """One node of the graph. ``scope``: ``bootstrap`` (once, makes base v0), ``task`` (per task of an
    iteration) or ``iteration`` (once per iteration); ``needs``: the stages whose outputs it reads (per-task
    stages: of the same task); ``runs_base``: it runs (or fine-tunes) the iteration's base."""

    name: str
    scope: str
    needs: tuple[str, ...] = ()
    runs_base: bool = False


STAGES: tuple[Stage, ...] = (
    Stage("demos", "bootstrap"),
    Stage("base_v0_dataset_raw", "bootstrap", ("demos",)),
    Stage("base_v0_dataset", "bootstrap", ("base_v0_dataset_raw",)),
    Stage("base_v0", "bootstrap", ("base_v0_dataset",)),
    Stage("evaluate_v0", "bootstrap", ("base_v0",)),
    Stage("collect_offline", "task", runs_base=True),
    Stage("pretrain_critic", "task", ("collect_offline",)),
    Stage("train_residual", "task", ("collect_offline", "pretrain_critic"), runs_base=True),
    Stage("collect_pld", "task", ("train_residual",), runs_base=True),
    Stage("convert_dataset", "iteration", ("collect_pld", "demos")),  # demos: with sft.include_base_data
    Stage("augment_quantiles", "iteration", ("convert_dataset",)),
    Stage("sft", "iteration", ("augment_quantiles",), runs_base=True),
    Stage("evaluate", "iteration", ("sft",)),
)
STAGE = {s.name: s for s in STAGES}
BOOTSTRAP = tuple(s.name for s in STAGES if s.scope == "bootstrap")
PER_TASK = tuple(s.name for s in STAGES if s.scope == "task")
PER_ITERATION = tuple(s.name for s in STAGES if s.scope == "iteration")
ALL_STAGES = tuple(s.name for s in STAGES)


def consumers(name: str) -> tuple[str, ...]:
    """The stages that read ``name``'s output."""
    return tuple(s.name for s in STAGES if name in s.needs)


def output_dir(name: str, layout: Layout, params, k: int = 0, task: int | None = None) -> Path:
    s = params.env.suite
    return {
        "demos": lambda: layout.demos,
        "base_v0_dataset_raw": lambda: layout.root / "demos_dataset_raw",
        "base_v0_dataset": lambda: layout.root / "demos_dataset",
        "base_v0": lambda: layout.base(0),
        "evaluate_v0": lambda: layout.base_eval(0),
        "collect_offline": lambda: layout.offline(k, s, task),
        "pretrain_critic": lambda: layout.critic_init(k, s, task),
        "train_residual": lambda: layout.residual(k, s, task),
        "collect_pld": lambda: layout.pld(k, s, task),
        "convert_dataset": lambda: layout.dataset_raw(k),
        "augment_quantiles": lambda: layout.dataset(k),
        "sft": lambda: layout.base(k + 1),
        "evaluate": lambda: layout.base_eval(k + 1),
    }[name]()


def check_suite_task(params, task: int) -> None:
    if task not in params.env.tasks:
        raise PLDError(f"task {task} is not in env.tasks {params.env.tasks} of params.yaml. Fix: add it to env.tasks or pick one of them")


def env_key(params, task: int) -> dict:
    """The env settings a per-task stage depends on (not the whole ``env.tasks`` list)."""
    e = params.env
    return {"suite": e.suite, "task": int(task), "mode": e.mode, "image_size": e.image_size, "max_objects": e.max_objects}


def tasks_without_data(params, layout: Layout, k: int) -> dict[int, str]:
    """Iteration ``k``'s tasks whose PLD stage recorded no data, with the reason (every PLD stage must have finished)."""
    s = params.env.suite
    out = {}
    for t in params.env.tasks:
        reason = no_data_reason(require_manifest(layout.pld(k, s, t), f"PLD data of {s} task {t} (stage collect_pld)"))
        if reason:
            out[t] = reason
    return out


def pld_dirs_with_data(params, layout: Layout, k: int) -> list[Path]:
    """The PLD stage dirs that convert_dataset distills; PLDError (the iteration stops) when no task has data."""
    s = params.env.suite
    missing = tasks_without_data(params, layout, k)
    if len(missing) == len(params.env.tasks):
        detail = "; ".join(f"task {t}: {r}" for t, r in missing.items())
        raise PLDError(f"iteration {k}: no task has PLD data, nothing to distill ({s} {detail}). "
                       "Fix: a base that sometimes succeeds on some task, or larger offline.max_episodes / collect.max_episodes")
    return [layout.pld(k, s, t) for t in params.env.tasks if t not in missing]


# ----------------------------------------------------------------------------- the base
@dataclass(frozen=True)
class BaseRef:
    """A base policy: ``spec`` is what loads it (a LeRobot ``pretrained_model`` dir, a hub id, or
    ``scripted[:...]``), ``digest`` what identifies it in stage keys: its content, not its path (a data dir
    that moves, or a DVC checkout elsewhere, keeps its keys)."""

    spec: str
    digest: str

    @classmethod
    def of(cls, spec: str) -> "BaseRef":
        """Identify a spec. A directory made by a stage (it or one of its two parents holds a manifest) is its
        manifest's output digest; another directory the digest of its JSON files' bytes and every file's name
        and size (hashing multi-GB weights on every run would be slow); a scripted spec or hub id itself."""
        spec = str(spec)
        path = Path(spec)
        if is_scripted(spec) or not path.exists():
            return cls(spec, digest_json({"spec": spec}))
        path = path.resolve()
        for d in (path, path.parent, path.parent.parent):
            m = read_manifest(d) if d.is_dir() else None
            if m and m.get("output_digest"):
                return cls(str(path), m["output_digest"])
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f"{f.relative_to(path)}:{f.stat().st_size}".encode())
            if f.suffix == ".json":
                h.update(f.read_bytes())
        return cls(str(path), h.hexdigest()[:16])

    def identity(self) -> dict:
        """What a manifest records as the base input."""
        return {"spec": self.spec, "digest": self.digest}


def base_ref(params, layout: Layout, version: int) -> BaseRef:
    """Base ``v<version>``: v0 is ``base.path`` when set (a user's checkpoint, hub id or scripted controller),
    else the bootstrap's trained policy; vK+1 is iteration K's SFT output."""
    if version == 0 and params.base.path:
        return BaseRef.of(params.base.path)
    d = layout.base(version)
    manifest = require_manifest(d, f"base v{version}")
    return BaseRef(str(d / "pretrained_model"), manifest["output_digest"])


def open_offline(offline_dir: Path, params):
    """collect_offline's manifest and store, checked against ``params.env.suite`` and for episodes."""
    from pld_core.store import TrajectoryStore

    offline_dir = Path(offline_dir)
    manifest = require_manifest(offline_dir, "offline store (stage collect_offline)")
    store = TrajectoryStore.open(offline_dir / OFFLINE_STORE)
    if store.attrs["suite"] != params.env.suite:
        raise PLDError(f"{offline_dir / OFFLINE_STORE}: suite '{store.attrs['suite']}' but env.suite is '{params.env.suite}'. "
                       "Fix: rerun collect_offline for this suite or set env.suite")
    if store.n_episodes == 0:
        raise PLDError(f"{offline_dir / OFFLINE_STORE}: no episodes. Fix: rerun collect_offline with a larger offline.max_episodes")
    return manifest, store
