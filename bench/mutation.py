"""Mutation testing of the algorithm's core: how many small code changes the fast unit tests catch.

    python bench/mutation.py [--out bench/results/mutation-core.json]

Runs mutmut (``pip install mutmut``; configured in pyproject's ``[tool.mutmut]``: the files it instruments and
the tests run against each mutant) in a scratch copy of the working tree, so the checkout is never touched.
The mutants run are those named by ``CORE``: every function of the SAC, Cal-QL, network and replay modules,
and the loops PLD adds around them: the prefixed rollout (the base alone, then base + residual), the
specialist's training episode on it (warm-up, base-policy probing, exploration) and collect_pld's hybrid episode.
Each mutant is one small edit (an operator, a constant, a dropped argument, a string); it is *killed*
when a test fails on it and *survives* otherwise. Survivors listed in ``bench/mutation-equivalent.json``
(mutant name -> why no test can tell it apart: e.g. a log-metric's name) are equivalent and leave the
score's denominator.

Writes the JSON result: counts, score = killed / (killed + survived non-equivalent), seconds, and every
surviving mutant with its diff.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENT = ROOT / "bench" / "mutation-equivalent.json"
# mutmut names a mutant <module>.x_<function>__mutmut_<n> or <module>.xǁ<Class>ǁ<method>__mutmut_<n>
CORE = ["pld_core.sac.*", "pld_core.calql.*", "pld_core.networks.*", "pld_core.replay.*",
        "pld_core.rollout.x_prefixed_steps__mutmut_*", "pld_core.trainer.xǁSpecialistTrainerǁ_episode__mutmut_*",
        "pld_core.trainer.xǁ_Exploringǁ*", "pld_core.trainer.xǁSpecialistTrainerǁ_encode__mutmut_*",
        "tasks.collect_pld.x_hybrid_episode__mutmut_*"]


def _mutmut(args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "mutmut"
    return subprocess.run([str(exe), *args], cwd=cwd, text=True, capture_output=True, **kw)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "mutation-core.json"))
    ap.add_argument("--keep", action="store_true", help="keep the scratch copy (its mutants/ dir) and print its path")
    ap.add_argument("--only", nargs="+", metavar="PATTERN",
                    help="run only these mutant-name patterns (e.g. 'tasks.collect_pld.*'), not all of CORE")
    args = ap.parse_args()
    core = args.only or CORE
    if shutil.which("mutmut", path=str(Path(sys.executable).parent)) is None:
        print("error: mutmut is not installed in this environment. Fix: .venv/bin/pip install mutmut", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="pld-mutation-"))
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, text=True, capture_output=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (work / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, work / f)
    t0 = time.time()
    run = _mutmut(["run", *core], work)
    seconds = time.time() - t0
    listing = _mutmut(["results", "--all", "true"], work).stdout
    status: dict[str, str] = {}
    for line in listing.splitlines():
        name, sep, state = line.strip().rpartition(": ")
        if sep and any(fnmatch.fnmatch(name, pat) for pat in core):
            status[name] = state
    if not status:
        print(f"error: mutmut produced no results (exit {run.returncode}):\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}", file=sys.stderr)
        return 2
    equivalent = json.loads(EQUIVALENT.read_text()) if EQUIVALENT.exists() else {}
    survivors = []
    for name, state in sorted(status.items()):
        if state == "survived":
            diff = _mutmut(["show", name], work).stdout
            survivors.append({"mutant": name, "equivalent": equivalent.get(name), "diff": diff[diff.find("@@"):].strip()})
    killed = sum(s == "killed" for s in status.values())
    live = [s for s in survivors if not s["equivalent"]]
    result = {
        "command": "python bench/mutation.py",
        "mutated": core, "seconds": round(seconds, 1),
        "mutants": len(status), "killed": killed, "survived": len(survivors), "equivalent": len(survivors) - len(live),
        "other": {k: sum(s == k for s in status.values()) for k in sorted(set(status.values()) - {"killed", "survived"})},
        "score": round(killed / max(1, killed + len(live)), 4),
        "survivors": survivors,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{killed} killed, {len(live)} survived, {result['equivalent']} equivalent of {len(status)} mutants in "
          f"{seconds:.0f} s: score {result['score']:.3f} -> {args.out}")
    if args.keep:
        print(f"scratch copy: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
