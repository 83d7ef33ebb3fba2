"""`pld`: the command line of the PLD flywheel.

Every user-caused error (a PLDError, or a full disk: OSError ENOSPC) is printed as one line
``error: ...`` and exits with code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import sys
import time
from pathlib import Path

from pld_core.errors import PLDError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")  # slow on 2 busy cores


def parse_tasks(text: str, suite: str) -> list[int]:
    from pld_core.env import check_task, n_tasks

    if text == "all":
        return list(range(n_tasks(suite)))
    try:
        tasks = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise PLDError(f"--tasks '{text}' is not a comma-separated list of task indices. Fix: e.g. --tasks 0,5 or --tasks all") from None
    if not tasks:
        raise PLDError("--tasks is empty. Fix: e.g. --tasks 0,5")
    for t in tasks:
        check_task(suite, t)
    return tasks


# ----------------------------------------------------------------------------- commands
def cmd_demo(args) -> int:
    from pld_core.demos import record_demos

    summary = record_demos(
        out=Path(args.out), suite=args.suite, tasks=parse_tasks(args.tasks, args.suite), episodes=args.episodes,
        mode=args.mode, image_size=args.image_size, max_objects=args.max_objects, noise=args.noise, seed=args.seed,
    )
    print(json.dumps(summary))
    return 0


def cmd_eval(args) -> int:
    from pld_core.evaluation import evaluate, format_report
    from pld_core.policies import make_policy_factory, validate_policy_spec

    validate_policy_spec(args.policy)
    tasks = parse_tasks(args.tasks, args.suite)
    if args.episodes <= 0:
        raise PLDError(f"--episodes must be positive, got {args.episodes}. Fix: pass --episodes 1 or more")
    factory = make_policy_factory(args.policy, mode=args.mode, device=args.device, seed=args.seed)
    report = evaluate(factory, args.suite, tasks, args.episodes, mode=args.mode, max_objects=args.max_objects,
                      image_size=args.image_size, seed=args.seed, show_progress=not args.json)
    report["policy"] = args.policy
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    if args.json:
        print(json.dumps({"tasks": {k: {kk: v[kk] for kk in ("success_rate", "ci95", "episodes")} for k, v in report["tasks"].items()}, "mean": report["mean"]}))
    else:
        print(format_report(report))
    return 0


def cmd_store(args) -> int:
    from pld_core.store import TrajectoryStore

    store = TrajectoryStore.open(args.path)
    store.load()  # validate every step
    print(json.dumps(store.summary(), indent=2))
    return 0


def cmd_bench(args) -> int:
    if args.bench == "expert":
        from pld_core.evaluation import evaluate, format_report
        from pld_core.policies import make_policy_factory

        tasks = parse_tasks(args.tasks, args.suite)
        report = evaluate(make_policy_factory("scripted"), args.suite, tasks, args.episodes)
        report["policy"] = "scripted"
        report["machine"] = f"{os.cpu_count()} cores"
        out = Path(args.out or f"bench/results/scripted-{args.suite}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        print(format_report(report))
        print(json.dumps({"mean": report["mean"], "min_task": min(v["success_rate"] for v in report["tasks"].values()), "seconds": report["seconds"]}))
        return 0
    if args.bench == "specialist":
        from pld_core.config import load_params, parse_overrides
        from bench.specialist import bench_specialist

        params = load_params(args.params, args.profile, parse_overrides(args.set or []))
        out = Path(args.out or f"bench/results/specialist-{args.suite}-{args.task}" + ("" if args.ablation == "none" else f"-{args.ablation}"))
        base = args.base or params.base.path or "data/base_v0/pretrained_model"
        result = bench_specialist(params, args.suite, args.task, args.ablation, out, base=base)
        if args.set:
            result["set"] = list(args.set)  # what this run changed from params.yaml, kept with its numbers
        print(json.dumps(result))
        return 0
    if args.bench == "faults":
        from pld_core.config import load_params, parse_overrides
        from bench.faults import run_faults

        profile = args.profile or "smoke"
        params = load_params(args.params, profile, parse_overrides(args.set or []))
        root = Path(args.root or Path(params.flywheel.data_dir) / "faults")
        out = Path(args.out or "bench/results/faults.json")
        summary = run_faults(params, args.params, profile, args.trials, root, seed=args.seed, out_json=out,
                             reuse_reference=args.reuse_reference,
                             only=[x for x in (args.stages or "").split(",") if x])
        print(json.dumps(summary))
        return 0 if summary["lost"] == 0 else 1
    if args.bench == "sft-control":
        from bench.controls import sft_control

        return _bench_result(sft_control(_params(args), k=args.iteration, log=_stderr), args.out)
    if args.bench == "overhead":
        from bench import perf

        return _bench_result(perf.bench_overhead(args.params, profile=args.profile or "smoke", root=args.root, log=_stderr), args.out)
    if args.bench == "pi05-tiny":
        from bench.pi05 import bench_pi05_tiny

        out = args.out or "bench/results/pi05-tiny.json"
        return _bench_result(bench_pi05_tiny(args.params, profile=args.profile or "pi05-tiny", root=args.root, log=_stderr), out)
    if args.bench == "pi05-load":
        from bench.pi05 import load_comparison

        if not args.ckpt:
            raise PLDError("bench pi05-load: --ckpt is required: a local pi0/pi0.5 pretrained_model dir "
                           "(e.g. data/pi05-tiny/base_v0/pretrained_model)")
        return _bench_result({"ckpt": args.ckpt, **load_comparison(Path(args.ckpt))}, args.out or "bench/results/pi05-load.json")
    if args.bench in ("loop", "replay", "collect"):
        from bench import perf
        from pld_core.config import load_params, parse_overrides

        if args.seconds is not None and args.seconds <= 0:
            raise PLDError(f"--seconds must be positive, got {args.seconds}")
        params = load_params(args.params, args.profile, parse_overrides(args.set or []))
        if args.bench == "loop":
            result = perf.bench_loop(params, seconds=args.seconds or 60.0, suite=args.suite, task=args.task, base=args.base, log=_stderr)
        elif args.bench == "replay":
            result = perf.bench_replay(params, seconds=args.seconds or 20.0, suite=args.suite)
        else:
            result = perf.bench_collect(params, workers=args.workers, episodes=args.episodes, suite=args.suite, task=args.task,
                                             base=args.base, batch_base=args.batch_base, log=_stderr)
        return _bench_result(result, args.out)
    raise PLDError(f"unknown benchmark '{args.bench}'")


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _bench_result(result: dict, out: str | None) -> int:
    """A speed bench's result: the machine added, written to ``out`` when asked, printed as the last line."""
    result["machine"] = f"{os.cpu_count()} cores"
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


def _params(args):
    from pld_core.config import load_params, parse_overrides

    return load_params(args.params, args.profile, parse_overrides(args.set or []))


def cmd_stage(args) -> int:
    from flows.stages import call_stage

    params = _params(args)
    m = call_stage(args.name, params, k=args.iteration, task=args.task, force=args.force)
    print(json.dumps({"stage": args.name, "skipped": m.get("skipped"), "output_digest": m.get("output_digest"), "metrics": m.get("metrics")}, default=str))
    return 0


def cmd_flywheel(args) -> int:
    from flows.api import prefect_api

    t0 = time.time()
    with prefect_api() as api_ready:  # its start-up (a subprocess) overlaps the imports and MLflow set-up below
        params = _params(args)
        from pld_app.job import run_flywheel
        from pld_app.report import print_lineage
        from pld_core.layout import Layout

        layout = Layout.of(params)
        run_flywheel(params, args.iterations, before_flows=api_ready)
    print_lineage(params)
    print(f"flywheel finished in {time.time() - t0:.0f} s; artifacts under {layout.root}")
    return 0


def cmd_lineage(args) -> int:
    from pld_app.report import lineage_rows, print_lineage, write_lineage_picture

    params = _params(args)
    if args.versions:
        from pld_core.layout import Layout
        from pld_core.versions import versions_report

        print(json.dumps(versions_report(params, Layout.of(params)), indent=1))
        return 0
    if args.json:
        rows = lineage_rows(params)
        print(json.dumps([{k: r[k] for k in ("version", "parent", "dataset_digest", "success_rate", "per_task", "tasks_without_data")}
                          for r in rows]))
        return 0
    print_lineage(params)
    path = write_lineage_picture(params, args.out)
    if path:
        print(f"picture: {path}")
    return 0


def cmd_params(args) -> int:
    import yaml

    params = _params(args)
    raw = params.model_dump()
    raw["profile"] = "default"
    print(f"# params.yaml resolved from profile '{params.profile}' of {args.params}")
    print(yaml.safe_dump(raw, sort_keys=False), end="")
    return 0


def cmd_repro(args) -> int:
    from pld_core.config import load_params
    from pld_core.dvcutil import dvc_repro, pipeline_iterations, require_dvc_repo, require_pipeline

    root = Path.cwd()
    require_dvc_repo(root)
    require_pipeline(root)
    params = _params(args)  # a bad params.yaml fails here, before DVC runs any stage
    top = load_params(args.params)
    n = pipeline_iterations(root / "dvc.yaml")
    if n is not None and n != top.flywheel.iterations:
        raise PLDError(f"{root / 'dvc.yaml'}: its stages build {n} iteration(s), {args.params} has flywheel.iterations "
                       f"{top.flywheel.iterations}. Fix: `pld pipeline` (rewrites dvc.yaml for flywheel.iterations), then rerun")
    if params.model_dump(exclude={"profile"}) != top.model_dump(exclude={"profile"}):
        resolve = f"pld params --params {args.params}" + (f" --profile {args.profile}" if args.profile else "")
        resolve += "".join(f" --set {item}" for item in args.set or [])
        raise PLDError(f"{args.params}: dvc.yaml's stages read its top level, which differs from what "
                       f"--profile/--set resolve to. Fix: write the resolved params into {args.params} first "
                       f"(`{resolve} > resolved.yaml && mv resolved.yaml {args.params}`), "
                       "then run `pld repro` without --profile/--set")
    return dvc_repro(root, args.targets)


def cmd_pipeline(args) -> int:
    from pld_core.artifacts import write_text_atomic
    from pld_core.dvcutil import pipeline_yaml

    params = _params(args)
    text = pipeline_yaml(params.flywheel.iterations)
    if args.stdout:
        print(text, end="")
        return 0
    write_text_atomic(Path(args.out), text)
    print(f"{args.out}: {params.flywheel.iterations} iteration(s)")
    return 0


def cmd_serve(args) -> int:
    from pld_app.scheduled import serve

    serve(args.cron, profile=args.profile, params_path=args.params, name=args.name)
    return 0


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pld", description="PLD flywheel: Probe, Learn, Distill on LIBERO")
    sub = p.add_subparsers(dest="command", required=True)

    def env_args(sp, tasks_default="0"):
        sp.add_argument("--suite", default="libero_object")
        sp.add_argument("--tasks", default=tasks_default, help="comma-separated task indices, or 'all'")
        sp.add_argument("--mode", default="state", choices=["state", "images"])
        sp.add_argument("--image-size", type=int, default=128)
        sp.add_argument("--max-objects", type=int, default=3)
        sp.add_argument("--seed", type=int, default=0)

    d = sub.add_parser("demo", help="record scripted demonstrations into a trajectory store (resumable)")
    env_args(d)
    d.add_argument("--episodes", type=int, default=10, help="successful episodes per task")
    d.add_argument("--noise", type=float, default=0.0)
    d.add_argument("--out", required=True, help="store path, e.g. data/demos.zarr")
    d.set_defaults(func=cmd_demo)

    e = sub.add_parser("eval", help="success rate per task on fixed initial states, with 95%% Wilson intervals")
    env_args(e)
    e.add_argument("--policy", required=True, help="'scripted', 'scripted:noise=X', a LeRobot checkpoint dir or a hub id")
    e.add_argument("--episodes", type=int, default=10)
    e.add_argument("--device", default="cpu")
    e.add_argument("--json", action="store_true")
    e.add_argument("--out", help="also write the full report here")
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("store", help="validate a trajectory store and print its summary")
    s.add_argument("path")
    s.set_defaults(func=cmd_store)

    b = sub.add_parser("bench", help="benchmarks (see bench/README.md)")
    b.add_argument("bench", choices=["expert", "specialist", "faults", "loop", "replay", "collect", "overhead", "sft-control",
                                          "pi05-tiny", "pi05-load"])
    b.add_argument("--suite", default="libero_object")
    b.add_argument("--tasks", default="all")
    b.add_argument("--task", type=int, default=0)
    b.add_argument("--episodes", type=int, default=50)
    b.add_argument("--ablation", default="none", choices=["none", "no_base", "no_offline", "no_calql", "no_probe"])
    b.add_argument("--params", default="params.yaml")
    b.add_argument("--profile", default=None)
    b.add_argument("--set", action="append", help="override a param: --set residual.env_steps=50000")
    b.add_argument("--base", default=None, help="base policy for `specialist` (default: base.path or data/base_v0/pretrained_model); "
                   "for `loop`/`collect` (default: scripted:noise=0.6)")
    b.add_argument("--ckpt", help="`pi05-load`: a local pi-family pretrained_model dir")
    b.add_argument("--out")
    b.add_argument("--trials", type=int, default=20, help="`faults`: kill-and-rerun trials (stages round-robin)")
    b.add_argument("--root", default=None, help="`faults`: scratch dir (default <data_dir>/faults); `overhead`: (default data/bench_overhead, wiped); `pi05-tiny`: (default data/bench_pi05_tiny, wiped)")
    b.add_argument("--seed", type=int, default=0, help="`faults`: seed of the kill moments")
    b.add_argument("--seconds", type=float, default=None,
                   help="`loop`: seconds per measurement (default 60); `replay`: in all (default 20)")
    b.add_argument("--workers", type=int, default=2, help="`collect`: simulator worker processes (compared with 1)")
    b.add_argument("--batch-base", action="store_true", help="`collect`: the workers share one LeRobot base, its calls batched")
    b.add_argument("--iteration", type=int, default=0, help="`sft-control`: the iteration whose SFT is controlled")
    b.add_argument("--stages", default=None, help="`faults`: comma-separated stages to kill (default: all of the profile's)")
    b.add_argument("--reuse-reference", action="store_true", help="`faults`: keep a complete never-killed run from a previous call")
    b.set_defaults(func=cmd_bench)
    def params_args(sp):
        sp.add_argument("--params", default="params.yaml")
        sp.add_argument("--profile", default=None, help="a profile under `profiles:` in params.yaml (default: the top level)")
        sp.add_argument("--set", action="append", help="override a param, e.g. --set sac.batch_size=64 (repeatable)")

    st = sub.add_parser("stage", help="run one pipeline stage (what dvc.yaml calls)")
    st.add_argument("name")
    st.add_argument("--iteration", type=int, default=0)
    st.add_argument("--task", type=int, default=None)
    st.add_argument("--force", action="store_true", help="rebuild even if the manifest is up to date")
    params_args(st)
    st.set_defaults(func=cmd_stage)

    fw = sub.add_parser("flywheel", help="run the flywheel (bootstrap + iterations) as Prefect flow runs")
    fw.add_argument("--iterations", type=int, default=None)
    params_args(fw)
    fw.set_defaults(func=cmd_flywheel)

    li = sub.add_parser("lineage", help="the registered base versions (MLflow) as a table and a picture")
    li.add_argument("--json", action="store_true")
    li.add_argument("--versions", action="store_true",
                    help="every version's record from the data dir as JSON: success per task with 95%% CIs, per task "
                         "what its iteration did (offline successes, specialist before/after, PLD episodes kept), seconds per stage")
    li.add_argument("--out", default=None, help="picture path (default <data_dir>/figures/lineage.png)")
    params_args(li)
    li.set_defaults(func=cmd_lineage)

    pa_ = sub.add_parser("params", help="print params.yaml resolved for a profile (validated), e.g. for dvc repro")
    params_args(pa_)
    pa_.set_defaults(func=cmd_params)

    rp = sub.add_parser("repro", help="`dvc repro` of dvc.yaml, after checking the DVC repository and params.yaml")
    rp.add_argument("targets", nargs="*", help="dvc.yaml stages to reproduce (default: all)")
    params_args(rp)
    rp.set_defaults(func=cmd_repro)

    pp = sub.add_parser("pipeline", help="write dvc.yaml from the stage graph for flywheel.iterations iterations")
    pp.add_argument("--out", default="dvc.yaml")
    pp.add_argument("--stdout", action="store_true", help="print it instead")
    params_args(pp)
    pp.set_defaults(func=cmd_pipeline)

    se = sub.add_parser("serve", help="a scheduled deployment of the flywheel on a Prefect server")
    se.add_argument("--cron", required=True, help='e.g. "0 2 * * *" (02:00 every day)')
    se.add_argument("--name", default="pld-flywheel")
    params_args(se)
    se.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except PLDError as e:
        print(f"error: {e}", file=sys.stderr)
        return PLDError.EXIT_CODE
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        print(f"error: {_no_space_message(e, args)}", file=sys.stderr)
        return PLDError.EXIT_CODE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _no_space_message(e: OSError, args) -> str:
    """A full disk is the user's to fix: name the file (or the output being written) and the fix.
    Writers leave nothing half-written behind (atomic dirs, stores committed episode by episode)."""
    target = getattr(args, "out", None)
    if not target and hasattr(args, "params"):
        with contextlib.suppress(Exception):
            target = _params(args).flywheel.data_dir
    where = e.filename or target or "an output file"
    writing = f" while writing {target}" if target and e.filename else ""
    return (f"{where}: no space left on device{writing}. Fix: free space on that filesystem, or point "
            "flywheel.data_dir (or --out) elsewhere; a rerun keeps what was completed")


def entry() -> None:
    """The `pld` console script: `main()`, then the exit handlers (atexit, weakref finalizers, log
    handlers) as at any exit, and then no module-by-module interpreter teardown, which costs 1.5-2 s
    with torch, Prefect and MLflow loaded. Only for a whole process: `main()` is what tests call."""
    import atexit
    import logging

    code = main()
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
