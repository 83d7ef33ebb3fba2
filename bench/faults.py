"""Fault injection: SIGKILL every stage at a random moment, rerun it, and check nothing was lost.

``pld bench faults --trials N``. The harness

1. runs every stage of one iteration (bootstrap + iteration 0) of a profile (``smoke`` by default)
   once, each as its own ``pld stage`` process, into ``<root>/ref``: the run that was never killed;
2. for trial ``i`` picks stage ``i mod n_stages``, copies the reference's upstream artifacts into
   ``<root>/trial_<i>``, starts the stage, SIGKILLs its process group at a uniformly random moment of
   its reference wall time, and then checks
   - *visibility*: the stage's output dir either does not exist or is complete (its manifest is there
     and the files' digest equals the one the manifest records): a half-written artifact is never
     visible under its final name;
   - *refusal*: while the output is incomplete, the downstream stage refuses to start (exit 2,
     naming the missing artifact) instead of reading part of it;
   - *recovery*: rerunning the same command finishes (exit 0; it resumes where the stage supports it);
   - *equivalence*: the recovered output equals the never-killed one: the manifest key (params and
     input digests) always; trajectory stores array by array, datasets' statistics and frames,
     evaluation results, and checkpoints' tensor names/shapes (values too where the stage is
     deterministic under its seed).

A trial is *lost* when any check fails. The last line printed is
``{"trials": N, "survived": S, "lost": L}``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pld_core.artifacts import MANIFEST, digest_path, read_manifest
from pld_core.config import Params
from pld_core.errors import PLDError
from pld_core.layout import PER_TASK, Layout, consumers, output_dir



@dataclass
class Step:
    name: str
    task: int | None = None

    @property
    def label(self) -> str:
        return self.name if self.task is None else f"{self.name}[{self.task}]"


@dataclass
class Trial:
    index: int
    step: str
    kill_after_s: float
    killed: bool = False
    output_state: str = ""  # absent | complete | HALF-WRITTEN
    refusal: str = "n/a"
    recovered: bool = False
    equal: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def survived(self) -> bool:
        return not self.problems


def plan(params: Params) -> list[Step]:
    """The stages of the bootstrap and of iteration 0, in the order the flywheel runs them."""
    boot = ("base_v0", "evaluate_v0") if params.base.path else ("demos", "base_v0_dataset_raw", "base_v0_dataset", "base_v0", "evaluate_v0")
    steps = [Step(n) for n in boot]
    for t in params.env.tasks:
        steps += [Step(n, t) for n in PER_TASK]
    steps += [Step(n) for n in ("convert_dataset", "augment_quantiles", "sft", "evaluate")]
    return steps


class Harness:
    def __init__(self, params: Params, params_path: str, profile: str | None, root: Path, seed: int = 0, log=print,
                 only: list[str] | None = None):
        self.params, self.params_path, self.profile = params, params_path, profile
        self.root = Path(root)
        self.rng = random.Random(seed)
        self.log = log
        self.steps = plan(params)
        names = [s.name for s in self.steps]
        for n in only or []:
            if n not in names:
                raise PLDError(f"bench faults: stage '{n}' is not run by this profile (its stages: {names}). Fix: pick from those")
        # trials cycle over the selected stages; the reference runs everything up to the last of them
        self.targets = [s for s in self.steps if not only or s.name in only]
        self.steps = self.steps[: self.steps.index(self.targets[-1]) + 1]
        # nothing reads evaluate_v0's report: the reference skips it unless it is a target
        self.steps = [s for s in self.steps if s.name != "evaluate_v0" or s in self.targets]
        self.ref_times: dict[str, float] = {}

    # ------------------------------------------------------------------ commands
    def _cmd(self, step: Step, data_dir: Path) -> list[str]:
        cmd = [sys.executable, "-m", "pld_app.cli", "stage", step.name, "--params", self.params_path,
               "--set", f"flywheel.data_dir={data_dir}",
               "--set", f"mlflow.tracking_uri=sqlite:///{data_dir}/mlflow.db",
               "--set", f"mlflow.artifact_dir={data_dir}/mlartifacts"]
        if self.profile:
            cmd += ["--profile", self.profile]
        if step.task is not None:
            cmd += ["--task", str(step.task)]
        return cmd

    def _run(self, step: Step, data_dir: Path, timeout: float = 3600) -> subprocess.CompletedProcess:
        return subprocess.run(self._cmd(step, data_dir), capture_output=True, text=True, timeout=timeout, env=_env())

    def _out(self, step: Step, data_dir: Path) -> Path:
        return output_dir(step.name, Layout(Path(data_dir)), self.params, 0, step.task)

    # ------------------------------------------------------------------ reference
    def reference(self, reuse: bool = False) -> None:
        ref = self.root / "ref"
        times = self.root / "ref_times.json"
        if reuse and times.exists() and all(_output_state(self._out(s, ref)) == "complete" for s in self.steps):
            self.ref_times = json.loads(times.read_text())
            return
        shutil.rmtree(ref, ignore_errors=True)
        for step in self.steps:
            t0 = time.time()
            r = self._run(step, ref)
            self.ref_times[step.label] = time.time() - t0
            if r.returncode != 0:
                raise RuntimeError(f"reference run of {step.label} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
            self.log(f"reference {step.label:24s} {self.ref_times[step.label]:6.1f} s")
        times.write_text(json.dumps(self.ref_times))

    # ------------------------------------------------------------------ one trial
    def trial(self, index: int) -> Trial:
        step = self.targets[index % len(self.targets)]
        data = self.root / f"trial_{index}"
        shutil.rmtree(data, ignore_errors=True)
        ref = self.root / "ref"
        out_ref, out = self._out(step, ref), self._out(step, data)
        # upstream artifacts: everything the reference made before this stage
        for s in self.steps[: self.steps.index(step)]:
            src, dst = self._out(s, ref), self._out(s, data)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(src, dst, symlinks=True)
        kill_after = self.rng.uniform(0.05, 0.95) * self.ref_times[step.label]
        t = Trial(index, step.label, round(kill_after, 2))

        proc = subprocess.Popen(self._cmd(step, data), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env=_env(), start_new_session=True)
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the stage and any trainer subprocess it started
            proc.wait()
            t.killed = True
        # the LeRobot trainer may be in its own group: make sure no orphan keeps writing
        _kill_orphans(data)

        # visibility: complete or absent, never half-written under the final name
        t.output_state = _output_state(out)
        if t.output_state == "HALF-WRITTEN":
            t.problems.append(f"{out} is visible without a complete manifest/digest")

        # refusal: the consumer must not read an incomplete output
        consumer = next(iter(consumers(step.name)), None)  # a stage that reads the output (the refusal check runs it)
        if t.output_state == "absent" and consumer and not (step.name == "base_v0" and self.params.base.path):
            cstep = Step(consumer, step.task if consumer in PER_TASK else None)
            r = self._run(cstep, data, timeout=600)
            if r.returncode == 2 and str(out) in r.stderr:
                t.refusal = "refused"
            else:
                t.refusal = f"exit {r.returncode}"
                t.problems.append(f"consumer {cstep.label} did not refuse the incomplete {out} (exit {r.returncode}): {r.stderr[-400:]}")
            if _output_state(self._out(cstep, data)) != "absent":
                t.problems.append(f"consumer {cstep.label} wrote an output from an incomplete input")

        # recovery
        r = self._run(step, data)
        t.recovered = r.returncode == 0
        if not t.recovered:
            t.problems.append(f"rerun failed (exit {r.returncode}): {r.stderr[-600:]}")
            return t
        if _output_state(out) != "complete":
            t.problems.append(f"rerun left {out} {_output_state(out)}")
            return t
        # equivalence with the never-killed run
        try:
            t.equal = compare(step.name, out_ref, out)
        except AssertionError as e:
            t.problems.append(f"differs from the never-killed run: {e}")
        return t


# ---------------------------------------------------------------------- checks
def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _kill_orphans(data_dir: Path) -> None:
    """SIGKILL any process whose command line mentions the trial's data dir (e.g. a trainer subprocess)."""
    me = os.getpid()
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == me:
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(data_dir) in cmd:
            try:
                os.kill(int(p.name), signal.SIGKILL)
            except OSError:
                pass


def _output_state(out: Path) -> str:
    if not out.exists():
        return "absent"
    m = read_manifest(out)
    if m is None or m.get("output_digest") != digest_path(out):
        return "HALF-WRITTEN"
    return "complete"


def _stores(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*.zarr") if p.is_dir())


def _compare_stores(a: Path, b: Path) -> str:
    from pld_core.store import TrajectoryStore

    sa, sb = _stores(a), _stores(b)
    assert [p.relative_to(a) for p in sa] == [p.relative_to(b) for p in sb], f"stores {sa} vs {sb}"
    for pa, pb in zip(sa, sb):
        x, y = TrajectoryStore.open(pa), TrajectoryStore.open(pb)  # validates: only committed episodes
        assert np.array_equal(x.episode_ends, y.episode_ends), f"{pb}: episode boundaries differ"
        xa, ya = x.load(), y.load()
        assert sorted(xa) == sorted(ya), f"{pb}: arrays {sorted(ya)} vs {sorted(xa)}"
        for k in xa:
            assert np.array_equal(xa[k], ya[k], equal_nan=True), f"{pb}: array '{k}' differs"
        ta, tb = x.episode_table(), y.episode_table()
        assert ta.equals(tb), f"{pb}: episode table differs"
    return "stores equal"


def _compare_tensors(a: Path, b: Path) -> str:
    from safetensors.numpy import load_file

    # the final weights; intermediate checkpoints/ (named by the step they were taken at) may differ
    fa = sorted(p.relative_to(a) for p in a.rglob("*.safetensors") if "checkpoints" not in p.relative_to(a).parts)
    fb = sorted(p.relative_to(b) for p in b.rglob("*.safetensors") if "checkpoints" not in p.relative_to(b).parts)
    assert fa == fb, f"checkpoint files {fb} vs {fa}"
    assert fa, f"{b}: no safetensors checkpoint"
    exact = True
    for rel in fa:
        x, y = load_file(a / rel), load_file(b / rel)
        assert sorted(x) == sorted(y), f"{rel}: tensor names differ"
        for k in x:
            assert x[k].shape == y[k].shape, f"{rel}:{k} shape {y[k].shape} vs {x[k].shape}"
            assert np.isfinite(y[k]).all() if y[k].dtype.kind == "f" else True, f"{rel}:{k} not finite"
            exact &= np.array_equal(x[k], y[k])
    return "tensors equal" if exact else "tensor names/shapes equal"


def compare(stage: str, a: Path, b: Path) -> str:
    """How the recovered output ``b`` matches the reference ``a``; AssertionError if it does not."""
    ma, mb = read_manifest(a), read_manifest(b)
    assert ma["key"] == mb["key"], f"manifest key {mb['key']} vs {ma['key']} (other params or inputs)"
    if mb["output_digest"] == ma["output_digest"]:
        return "identical"
    if _stores(a):
        return _compare_stores(a, b)
    if stage in ("evaluate", "evaluate_v0"):
        ra, rb = json.loads((a / "eval.json").read_text()), json.loads((b / "eval.json").read_text())
        for k, v in ra["tasks"].items():
            assert rb["tasks"][k]["successes"] == v["successes"] if "successes" in v else rb["tasks"][k]["success_rate"] == v["success_rate"], f"eval {k} differs"
        return "results equal"
    if stage in ("convert_dataset", "augment_quantiles", "base_v0_dataset_raw", "base_v0_dataset"):
        import pandas as pd

        for rel in sorted(p.relative_to(a) for p in a.rglob("*.parquet")):
            assert pd.read_parquet(a / rel).equals(pd.read_parquet(b / rel)), f"{rel} differs"
        sa, sb = a / "meta" / "stats.json", b / "meta" / "stats.json"
        if sa.exists():
            assert json.loads(sa.read_text()) == json.loads(sb.read_text()), "meta/stats.json differs"
        return "frames and stats equal"
    if any(a.rglob("*.safetensors")):
        return _compare_tensors(a, b)
    files_a = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file() and p.name != MANIFEST)
    files_b = sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file() and p.name != MANIFEST)
    assert files_a == files_b, f"files {files_b} vs {files_a}"
    return "same files"


def run_faults(params: Params, params_path: str, profile: str | None, trials: int, root: Path, seed: int = 0,
               out_json: Path | None = None, reuse_reference: bool = False, only: list[str] | None = None) -> dict:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True, width=170)
    h = Harness(params, params_path, profile, root, seed=seed, log=lambda s: console.print(s), only=only)
    t0 = time.time()
    h.reference(reuse=reuse_reference)
    results = []
    for i in range(trials):
        tr = h.trial(i)
        results.append(tr)
        console.print(f"trial {i:3d} {tr.step:24s} kill@{tr.kill_after_s:6.2f}s killed={tr.killed!s:5s} "
                      f"output={tr.output_state:8s} consumer={tr.refusal:8s} recovered={tr.recovered!s:5s} "
                      f"{tr.equal or ''} {'OK' if tr.survived else 'LOST: ' + '; '.join(tr.problems)}")
        shutil.rmtree(root / f"trial_{i}", ignore_errors=True)
    table = Table(title=f"fault injection: {trials} trials, profile {profile or 'default'}")
    for col in ("trial", "stage", "kill at (s)", "output after kill", "consumer", "recovered", "vs never-killed", "result"):
        table.add_column(col)
    for tr in results:
        table.add_row(str(tr.index), tr.step, f"{tr.kill_after_s:.1f}", tr.output_state, tr.refusal, str(tr.recovered),
                      tr.equal, "survived" if tr.survived else "LOST")
    console.print(table)
    survived = sum(tr.survived for tr in results)
    summary = {"trials": trials, "survived": survived, "lost": trials - survived}
    if out_json:
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps({**summary, "seconds": round(time.time() - t0), "reference_s": h.ref_times,
                                        "results": [tr.__dict__ | {"survived": tr.survived} for tr in results]}, indent=2, default=str))
    return summary
