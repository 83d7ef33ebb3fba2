"""The fault-injection harness (`pld bench faults`): its checks can fail, and a real kill-and-rerun survives."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pld_core.artifacts import atomic_dir, finish_manifest
from bench.faults import _output_state, compare
from pld_core.store import TrajectoryStore

from builders import make_episode

ROOT = Path(__file__).resolve().parent.parent


def _stage_with_store(out: Path, value: float, key: str = "k") -> Path:
    with atomic_dir(out) as tmp:
        s = TrajectoryStore.create(tmp / "s.zarr", {"obs_state": (8,), "obs_env_state": (4,)}, suite="libero_object", task_names=["a"])
        s.append([make_episode(5, value=value)])
        finish_manifest(tmp, "collect_offline", key, {}, {}, {})
    return out


def test_output_state_sees_half_written_and_tampered_outputs(tmp_path):
    assert _output_state(tmp_path / "nothing") == "absent"
    d = _stage_with_store(tmp_path / "a", 1.0)
    assert _output_state(d) == "complete"
    (d / "manifest.json").unlink()  # a final dir without its manifest: what a non-atomic writer leaves
    assert _output_state(d) == "HALF-WRITTEN"
    d = _stage_with_store(tmp_path / "b", 1.0)
    (d / "extra.bin").write_bytes(b"x")  # files changed after the manifest was written
    assert _output_state(d) == "HALF-WRITTEN"


def test_compare_detects_different_contents_and_keys(tmp_path):
    a = _stage_with_store(tmp_path / "a", 1.0)
    assert compare("collect_offline", a, _stage_with_store(tmp_path / "same", 1.0)) == "identical"
    with pytest.raises(AssertionError, match="differs"):
        compare("collect_offline", a, _stage_with_store(tmp_path / "other", 2.0))
    with pytest.raises(AssertionError, match="manifest key"):
        compare("collect_offline", a, _stage_with_store(tmp_path / "key", 1.0, key="other"))


def test_bench_faults_kills_and_recovers_a_real_stage(tmp_path):
    """SIGKILL `pld stage collect_offline` (smoke profile) twice at random moments; both trials survive."""
    out = tmp_path / "faults.json"
    r = subprocess.run([sys.executable, "-m", "pld_app.cli", "bench", "faults", "--trials", "2", "--stages", "collect_offline",
                        "--root", str(tmp_path / "f"), "--out", str(out), "--seed", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"trials": 2, "survived": 2, "lost": 0}
    report = json.loads(out.read_text())
    assert [t["step"] for t in report["results"]] == ["collect_offline[0]"] * 2
    for t in report["results"]:
        assert t["recovered"] and t["equal"] in ("identical", "stores equal")
        if t["killed"] and t["output_state"] == "absent":
            assert t["refusal"] == "refused"  # pretrain_critic would not read the half-collected store
    shutil.rmtree(tmp_path / "f", ignore_errors=True)
