"""``pld bench pi05-tiny``'s per-stage table: each stage's peak memory is read from the samples taken while it
computed, stages come in the order they ran, and MLflow's copies of checkpoints are not stages."""

from __future__ import annotations

import calendar
import json
import time

from bench.pi05 import stage_table
from pld_core.artifacts import MANIFEST, finish_manifest


def _stage(dir_, stage: str, finished: float, compute: float, metrics: dict | None = None) -> None:
    dir_.mkdir(parents=True)
    finish_manifest(dir_, stage, key="k", params={}, inputs={}, metrics=metrics or {}, digest_outputs=False, compute_seconds=compute)
    m = json.loads((dir_ / MANIFEST).read_text())
    m["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(finished))
    (dir_ / MANIFEST).write_text(json.dumps(m))


def test_stage_table_peaks_order_and_steps(tmp_path):
    t0 = float(calendar.timegm(time.strptime("2026-01-01T00:00:00Z", "%Y-%m-%dT%H:%M:%SZ")))
    # "a_late" sorts first by path but ran second: [t0+100, t0+200]; "b_early" ran [t0, t0+50]
    _stage(tmp_path / "a_late", "sft", finished=t0 + 200, compute=100.0, metrics={"train_step_s": 45.678})
    _stage(tmp_path / "b_early", "evaluate", finished=t0 + 50, compute=50.0)
    _stage(tmp_path / "mlartifacts" / "1" / "copy", "sft", finished=t0 + 300, compute=1.0)
    gb = 2**30
    samples = [(t0 + 10, 3 * gb), (t0 + 40, 5 * gb), (t0 + 75, 20 * gb),  # 75: between the stages, in neither
               (t0 + 120, 9 * gb), (t0 + 199, 7 * gb)]
    rows = stage_table(tmp_path, samples)
    assert [r["dir"] for r in rows] == ["b_early", "a_late"]
    assert [r["peak_rss_gb"] for r in rows] == [5.0, 9.0]
    assert [r["compute_s"] for r in rows] == [50.0, 100.0]
    assert rows[1]["train_step_s"] == 45.68 and "train_step_s" not in rows[0]


def test_stage_table_a_stage_without_samples_has_no_peak(tmp_path):
    _stage(tmp_path / "s", "convert_dataset", finished=1_000_000.0, compute=2.0)
    assert stage_table(tmp_path, [(10.0, 2**30)])[0]["peak_rss_gb"] is None
