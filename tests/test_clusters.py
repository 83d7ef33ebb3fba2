"""The same smoke flywheel on three task runners gives the same outputs: sequential (the scheduled run on the
Prefect server), a Dask cluster of `dask scheduler` + `dask worker` processes, and a Ray cluster from `ray start
--head`. The specialist trains in one process (residual.mode sync), so every stage is a function of its inputs
and the three data dirs must agree stage by stage, file by file: their content, once each data dir's own path
and the wall-clock seconds some outputs record are taken out (harness.content_digests). On the clusters every
stage ran in a worker process, not in the flow's."""

from __future__ import annotations

from harness import built_by, content_digests


def _digests(run) -> dict:
    return content_digests(run[0] / "data", run[0])


def _differences(a: dict, b: dict) -> dict:
    """{stage: {file: (digest here, digest there)}} for every file that differs."""
    out = {}
    for stage in sorted(set(a) | set(b)):
        x, y = a.get(stage, {}), b.get(stage, {})
        diff = {f: (x.get(f), y.get(f)) for f in sorted(set(x) | set(y)) if x.get(f) != y.get(f)}
        if diff:
            out[stage] = diff
    return out


def test_dask_and_sequential_build_the_same_outputs(smoke_run, served_run):
    sequential = _digests(served_run)
    # base v0 (adopted), its evaluation, 4 stages x 2 tasks, convert, quantiles, sft, evaluate
    assert len(sequential) == 14 and sum(map(len, sequential.values())) > 100
    assert _differences(_digests(smoke_run), sequential) == {}


def test_ray_builds_the_same_outputs_in_its_worker_processes(ray_run, served_run):
    tmp, r, _ = ray_run
    assert _differences(_digests(ray_run), _digests(served_run)) == {}
    # Ray names each worker's log after its process id (session_*/logs/worker-<id>-<job>-<pid>.out)
    workers = {int(p.stem.rsplit("-", 1)[1]) for p in (tmp / "ray-tmp").glob("session_*/logs/worker-*.out")}
    pids = {by["pid"] for by in built_by(tmp / "data").values()}
    assert r.pid not in pids and pids <= workers, (r.pid, pids, workers)
