"""The layers import in one direction only, read from the source (every import statement, also those inside functions).

    pld_core   the algorithm and its adapters: imports nothing from the layers above
    tasks      the stages: import pld_core, never each other
    flows      the Prefect wiring (and call_stage): pld_core, tasks
    bench      the benchmark harnesses: pld_core, tasks, flows, by their public names only
    pld_app    the command line and its reports: everything below

and pld_core has no import cycle. A planted ``from tasks.collect_pld import hybrid_episode`` in
``pld_core/trainer.py`` turns the first test red, naming the file, the line and the rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ORDER = ["pld_core", "tasks", "flows", "bench", "pld_app"]
LAYER = {name: i for i, name in enumerate(ORDER)}


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names imported from it) for every absolute import of a project package."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [a.name for a in node.names]
            out.append((node.lineno, node.module, names))
            # `from pld_core import lineage` imports the module pld_core.lineage
            out += [(node.lineno, f"{node.module}.{n}", []) for n in names if (ROOT / node.module.replace(".", "/") / f"{n}.py").exists()]
    return [(line, mod, names) for line, mod, names in out if mod.split(".")[0] in LAYER]


def sources() -> list[Path]:
    return sorted(p for pkg in ORDER for p in (ROOT / pkg).rglob("*.py"))


def violations() -> list[str]:
    bad = []
    for path in sources():
        rel = path.relative_to(ROOT)
        layer = rel.parts[0]
        own = ".".join(rel.with_suffix("").parts)
        for line, mod, names in imports(path):
            target = mod.split(".")[0]
            where = f"{rel}:{line} imports {mod}"
            if LAYER[target] > LAYER[layer]:
                bad.append(f"{where}: {layer} may not import {target} (layers: {' < '.join(ORDER)})")
            if layer == "tasks" and target == "tasks" and mod not in ("tasks", own):
                bad.append(f"{where}: stages do not import each other (share through pld_core)")
            if target != layer and any(n.startswith("_") for n in names):
                bad.append(f"{where}: {[n for n in names if n.startswith('_')]} is private to {target}")
    return bad


def test_every_import_points_down_the_layers():
    assert violations() == []


def test_pld_core_has_no_import_cycle():
    graph: dict[str, set[str]] = {}
    for path in (ROOT / "pld_core").glob("*.py"):
        mod = f"pld_core.{path.stem}"
        graph[mod] = {m for _, m, _ in imports(path) if m.startswith("pld_core.") and m != mod and m.count(".") == 1}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        if node in stack:
            cycles.append(" -> ".join(stack[stack.index(node):] + [node]))
            return
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, stack + [node])

    for mod in sorted(graph):
        visit(mod, [])
    assert cycles == []


def test_the_checker_sees_a_wrong_direction_import(tmp_path):
    """The rule fires on a planted import in each forbidden direction (guards the checker itself)."""
    planted = {
        "pld_core/trainer.py": "from tasks.collect_pld import hybrid_episode\n",
        "tasks/sft.py": "def f():\n    from tasks import evaluate\n",
        "flows/stages.py": "import pld_app.cli\n",
        "bench/perf.py": "from flows.flywheel import _result\n",
    }
    for rel, text in planted.items():
        f = tmp_path / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    for pkg in ORDER:
        (tmp_path / pkg).mkdir(exist_ok=True)
    (tmp_path / "tasks" / "evaluate.py").write_text("")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        found = violations()
    finally:
        ROOT = saved
    assert len(found) == 4, found
    assert any("pld_core/trainer.py:1 imports tasks.collect_pld: pld_core may not import tasks" in v for v in found)
    assert any("tasks/sft.py:2 imports tasks" in v and "each other" in v for v in found)
    assert any("flows/stages.py:1 imports pld_app.cli" in v for v in found)
    assert any("['_result'] is private to flows" in v for v in found)


def test_dvc_yaml_is_the_stage_graph():
    """dvc.yaml is what `pld pipeline` writes for the default flywheel.iterations, and what that writes is the graph
    of pld_core.layout.STAGES unrolled over iterations: the bootstrap stages once; per iteration k one stage per node
    (per-task ones as foreach over env.tasks) that runs ``pld stage <name> --iteration k``, writes the dir the Layout
    gives and depends on exactly the outputs of the stages it needs (in iteration k; bootstrap ones once) and, where
    it runs the base, on base vk: base_v0's output for k = 0, iteration k-1's sft output after. Drift either way (a
    stage added to one, a dependency dropped, an iteration reading the wrong base) fails."""
    from types import SimpleNamespace

    import yaml

    from pld_core.config import load_params
    from pld_core.dvcutil import pipeline_iterations, pipeline_yaml
    from pld_core.layout import STAGES, Layout, output_dir

    iterations = load_params(ROOT / "params.yaml").flywheel.iterations
    assert (ROOT / "dvc.yaml").read_text() == pipeline_yaml(iterations), "dvc.yaml is stale: run `pld pipeline`"
    assert pipeline_iterations(ROOT / "dvc.yaml") == iterations

    n = 3
    dvc = yaml.safe_load(pipeline_yaml(n))["stages"]
    boot = [s.name for s in STAGES if s.scope == "bootstrap"]
    assert list(dvc) == boot + [f"{s.name}_it{k}" for k in range(n) for s in STAGES if s.scope != "bootstrap"]
    layout, params = Layout(Path("data")), SimpleNamespace(env=SimpleNamespace(suite="${env.suite}"))

    def out(name: str, k: int) -> str:
        return str(output_dir(name, layout, params, k, "${item}"))

    owners = {}
    for k in range(n):
        for s in STAGES:
            kk = 0 if s.scope == "bootstrap" else k
            owners[out(s.name, kk)] = (s.name, kk)
            if s.scope == "task" and Path(out(s.name, kk)).name.startswith("$"):  # the folder holding every task's output
                owners[str(Path(out(s.name, kk)).parent)] = (s.name, kk)
    for k in range(n):
        for s in STAGES:
            if s.scope == "bootstrap" and k > 0:
                continue
            kk = 0 if s.scope == "bootstrap" else k
            spec = dvc[s.name if s.scope == "bootstrap" else f"{s.name}_it{k}"]
            if s.scope == "task":
                assert spec["foreach"] == "${env.tasks}", s.name
                spec = spec["do"]
            by_scope = {"bootstrap": "", "iteration": f" --iteration {k}", "task": f" --iteration {k} --task ${{item}}"}
            assert spec["cmd"] == f"pld stage {s.name}{by_scope[s.scope]}"
            assert spec["outs"] == [out(s.name, kk)], s.name
            wanted = {(m, 0 if m in boot else kk) for m in s.needs}
            if s.runs_base:
                wanted.add(("base_v0", 0) if k == 0 else ("sft", k - 1))
            assert {owners[d] for d in spec.get("deps", [])} == wanted, (s.name, k)


def test_every_file_function_the_design_names_exists():
    """docs/design.md maps the method to ``file:function``; each named file defines that function, class or method."""
    import re

    refs = re.findall(r"`([\w/]+\.py):([\w.]+)`", (ROOT / "docs" / "design.md").read_text())
    assert len(refs) >= 20
    missing = []
    for rel, name in refs:
        tree = ast.parse((ROOT / rel).read_text())
        scope = tree.body
        for part in name.split("."):
            node = next((n for n in scope if getattr(n, "name", None) == part or
                         any(getattr(t, "id", None) == part for t in getattr(n, "targets", [getattr(n, "target", None)]))), None)
            if node is None:
                missing.append(f"{rel}:{name}")
                break
            scope = getattr(node, "body", [])
    assert missing == []
