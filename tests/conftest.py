"""The smoke flywheel run three ways, each once per test session, as a user runs it: on a Dask cluster started
with `dask scheduler` and `dask worker`, on a Ray cluster started with `ray start --head`, and as a scheduled
deployment on a `prefect server` (`pld serve`, sequential task runner). The three use the same params, so their
stage outputs must agree digest for digest (tests/test_clusters.py)."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Each test process (one per pytest-xdist worker) keeps its Prefect state to itself: the temporary Prefect servers
# the flywheels start write their database under PREFECT_HOME, and two of them on one sqlite file would lock each
# other out. A user's own Prefect settings (profile, server) stay out of the tests.
_PREFECT_HOME = tempfile.mkdtemp(prefix="pld-test-prefect-")
atexit.register(shutil.rmtree, _PREFECT_HOME, ignore_errors=True)
os.environ["PREFECT_HOME"] = _PREFECT_HOME
for _var in ("PREFECT_API_URL", "PREFECT_PROFILE", "PREFECT_PROFILES_PATH"):
    os.environ.pop(_var, None)

# the session fixtures below: a test that uses one runs on the worker that built it (pytest-xdist --dist loadgroup)
_RUNS = {"dask_cluster", "smoke_run", "ray_run", "prefect_server", "served", "served_run"}

# What the long pieces cost, in seconds on two busy cores (`make test --durations`): the longest start first, so
# that no worker is left running one of them alone at the end. A test's cost is its `cost` mark plus the fixtures
# it builds; a group's is its tests' sum, each fixture counted once. Unlisted tests count as 1 s.
FIXTURE_COST = {"smoke_run": 450, "served_run": 450, "ray_run": 300, "run": 300}  # `run`: test_image_encoder's


_NOT_GROUPED = ("pytest-xdist did not group the tests (--dist loadgroup): it does not support pytest {}. "
                "Fix: pip install -e '.[test]' (pytest < 9)")


def pytest_configure(config):
    if config.getoption("dist", "no") == "loadgroup" and int(pytest.__version__.split(".")[0]) >= 9:
        raise pytest.UsageError(_NOT_GROUPED.format(pytest.__version__))


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test` runs two workers), tests that share a built fixture go to one worker:
    the smoke runs and servers above to one, each module's module-scoped fixtures to one. The rest spread.
    The marks go on before xdist's own hook reads them into the node ids (it appends ``@group``); where it did
    not (a pytest it does not support), every worker would build every smoke run: stop instead."""
    for item in items:
        fixtures = getattr(item, "_fixtureinfo", None)
        defs = fixtures.name2fixturedefs if fixtures else {}
        if _RUNS & set(defs):
            item.add_marker(pytest.mark.xdist_group("runs"))
        elif any(d[-1].scope in ("module", "package", "class") for d in defs.values()):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    yield
    items[:] = longest_first(items)
    if config.getoption("loadgroup", False) and any("@" not in item.nodeid for item in items if item.get_closest_marker("xdist_group")):
        raise pytest.UsageError(_NOT_GROUPED.format(pytest.__version__))


def item_scope(item) -> str:
    """The unit pytest-xdist's loadgroup hands to one worker: the test's group, or the test alone."""
    mark = item.get_closest_marker("xdist_group")
    return f"@{mark.args[0] if mark.args else mark.kwargs.get('name', 'default')}" if mark else item.nodeid


def item_cost(item) -> tuple[float, set[str]]:
    """A test's own cost (its `cost` mark) and the costed fixtures it uses."""
    mark = item.get_closest_marker("cost")
    fixtures = getattr(item, "_fixtureinfo", None)
    names = set(fixtures.name2fixturedefs) & set(FIXTURE_COST) if fixtures else set()
    if "run" in names and item.module.__name__.rpartition(".")[2] != "test_image_encoder":
        names.discard("run")
    return (float(mark.args[0]) if mark else 1.0), names


def longest_first(items: list) -> list:
    """The tests in order of their scope's cost, the costliest scope first; within a scope, and between scopes of
    equal cost, collection order. With `--no-loadscope-reorder` xdist hands out scopes in this order."""
    own: dict[str, float] = {}
    fixtures: dict[str, set[str]] = {}
    first: dict[str, int] = {}
    for i, item in enumerate(items):
        scope = item_scope(item)
        cost, names = item_cost(item)
        own[scope] = own.get(scope, 0.0) + cost
        fixtures.setdefault(scope, set()).update(names)
        first.setdefault(scope, i)
    total = {s: own[s] + sum(FIXTURE_COST[f] for f in fixtures[s]) for s in own}
    return sorted(items, key=lambda it: (-total[item_scope(it)], first[item_scope(it)]))


from harness import (TWO_TASKS, VENV_BIN, env, free_port, pld, process, smoke_overrides, trigger,  # noqa: E402
                     wait_deployment, wait_final, wait_http, wait_port)


@pytest.fixture(scope="session")
def dask_cluster(tmp_path_factory):
    """`dask scheduler` plus one `dask worker` process (one thread), as on a user's machines."""
    tmp = tmp_path_factory.mktemp("dask")
    port = free_port()
    with process([str(VENV_BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                 tmp / "scheduler.log") as sched:
        wait_port(port, 120, sched, tmp / "scheduler.log")
        address = f"tcp://127.0.0.1:{port}"
        with process([str(VENV_BIN / "dask"), "worker", address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard",
                      "--local-directory", str(tmp / "worker")], tmp / "worker.log") as worker:
            t0 = time.time()
            while "Registered to" not in (tmp / "worker.log").read_text():
                assert worker.poll() is None and time.time() - t0 < 120, (tmp / "worker.log").read_text()[-3000:]
                time.sleep(0.5)
            yield address, worker


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, dask_cluster):
    """The smoke flywheel on two tasks through Prefect on that Dask cluster (PLD_DASK_ADDRESS)."""
    address, worker = dask_cluster
    tmp = tmp_path_factory.mktemp("flywheel")
    t0 = time.time()
    r = pld("flywheel", *smoke_overrides(tmp), *TWO_TASKS, extra_env={"PLD_DASK_ADDRESS": address})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return tmp, r, time.time() - t0


@pytest.fixture(scope="session")
def ray_run(tmp_path_factory):
    """The same flywheel on a local Ray cluster (`ray start --head`, PLD_RAY_ADDRESS)."""
    pytest.importorskip("prefect_ray", reason="the ray extra: pip install -e '.[ray]' (make test installs it)")
    tmp = tmp_path_factory.mktemp("ray")
    # Ray's sockets live under its temp dir (<dir>/session_<time>_<pid>/sockets/plasma_store), and a Unix socket's
    # path must fit in 107 bytes: a pytest-xdist worker's tmp path is too deep, so a short dir, linked from tmp
    short = Path(tempfile.mkdtemp(prefix="pld-ray-"))
    (tmp / "ray-tmp").symlink_to(short)
    port = free_port()
    ray = str(VENV_BIN / "ray")
    renv = env(RAY_USAGE_STATS_ENABLED="0")
    start = [ray, "start", "--head", "--port", str(port), "--num-cpus", "1", "--include-dashboard", "false",
             "--disable-usage-stats", "--temp-dir", str(short)]
    import subprocess

    up = subprocess.run(start, capture_output=True, text=True, env=renv, timeout=300)
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    try:
        t0 = time.time()
        r = pld("flywheel", *smoke_overrides(tmp, runner="ray"), *TWO_TASKS,
                extra_env={"PLD_RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_USAGE_STATS_ENABLED": "0"})
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        yield tmp, r, time.time() - t0
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, env=renv, timeout=120)
        shutil.rmtree(short, ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """`prefect server start` on 127.0.0.1 with its own PREFECT_HOME and a free port (the UI on)."""
    tmp = tmp_path_factory.mktemp("prefect")
    port = free_port()
    penv = env(PREFECT_HOME=str(tmp / "home"), PREFECT_API_URL=f"http://127.0.0.1:{port}/api", PREFECT_UI_ENABLED="true",
               PREFECT_RUNNER_POLL_FREQUENCY="2")
    penv.pop("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", None)
    with process([str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                 tmp / "server.log", environ=penv) as proc:
        wait_http(f"http://127.0.0.1:{port}/api/health", 240, proc, tmp / "server.log")
        yield {"url": f"http://127.0.0.1:{port}", "api": f"http://127.0.0.1:{port}/api", "env": penv, "tmp": tmp}


def write_params(dest: Path, *overrides: str) -> None:
    """A project's params.yaml: the smoke profile with ``overrides``, resolved (`pld params`)."""
    r = pld("params", *overrides)
    assert r.returncode == 0, r.stderr
    dest.write_text(r.stdout)


@pytest.fixture(scope="session")
def served(prefect_server, tmp_path_factory):
    """A project directory served as a scheduled deployment (`pld serve --cron`), with the worker running."""
    proj = tmp_path_factory.mktemp("scheduled")
    write_params(proj / "params.yaml", *smoke_overrides(proj, runner="sequential"), *TWO_TASKS)
    empty = proj / "not_a_checkpoint"
    empty.mkdir()
    broken = proj / "broken"
    write_params(proj / "broken.yaml", *smoke_overrides(broken, runner="sequential"), *TWO_TASKS, "--set", f"base.path={empty}")
    cmd = [sys.executable, "-m", "pld_app.cli", "serve", "--cron", "0 3 * * *", "--params", "params.yaml", "--profile", "default"]
    with process(cmd, proj / "serve.log", cwd=proj, environ=prefect_server["env"]) as proc:
        deployment = wait_deployment(prefect_server, proc, proj / "serve.log")
        yield {**prefect_server, "proj": proj, "deployment": deployment, "serve": proc, "log": proj / "serve.log"}


@pytest.fixture(scope="session")
def served_run(served):
    """One scheduled run triggered as a user triggers it (`prefect deployment run`), to completion."""
    t0 = time.time()
    run_id = trigger(served)
    run = wait_final(served, run_id, timeout=1500)
    assert run["state_type"] == "COMPLETED", json.dumps(run)[:3000] + served["log"].read_text()[-5000:]
    return served["proj"], run, time.time() - t0
