"""What people look at: the lineage table, the lineage picture, success per task over base versions,
each iteration's specialist curves, end-effector paths of base rollouts vs PLD episodes (the paper's
Figure 10 view), and ``versions.json`` (every version's record, :mod:`pld_core.versions`)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np

from pld_core import lineage
from pld_core.config import Params


def _client(params: Params):
    m = params.mlflow
    return lineage.setup(m.tracking_uri, m.experiment, m.artifact_dir)


def _layout(params: Params):
    from pld_core.layout import Layout

    return Layout.of(params)


def eval_reports(params: Params) -> dict[int, dict]:
    """Evaluation reports of every base version found under the data dir."""
    layout, out = _layout(params), {}
    for v in range(1000):
        if v > 0 and not layout.iteration(v - 1).exists():
            break
        f = layout.base_eval(v) / "eval.json"
        if f.exists():
            out[v] = json.loads(f.read_text())
    return out


def lineage_rows(params: Params) -> list[dict]:
    rows = lineage.lineage(_client(params), params.mlflow.model_name)
    reports = eval_reports(params)
    for r in rows:
        rep = reports.get(r["version"])
        r["ci95"] = rep["mean_ci95"] if rep else None
        r["per_task"] = {k: v["success_rate"] for k, v in rep["tasks"].items()} if rep else {}
        r["episodes_per_task"] = next(iter(rep["tasks"].values()))["episodes"] if rep and rep["tasks"] else None
    return rows


def print_lineage(params: Params) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = lineage_rows(params)
    table = Table(title=f"MLflow registered model '{params.mlflow.model_name}'")
    for col in ("version", "parent", "success", "95% CI", "episodes/task", "PLD dataset", "specialists", "per task", "no PLD data"):
        table.add_column(col)
    for r in rows:
        ci = f"[{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]" if r["ci95"] else "-"
        per = " ".join(f"{k.split('/')[-1]}:{v:.2f}" for k, v in r["per_task"].items())
        table.add_row(f"v{r['version']}", "-" if r["parent"] is None else f"v{r['parent']}",
                      "-" if r["success_rate"] is None else f"{r['success_rate']:.3f}", ci, str(r["episodes_per_task"] or "-"),
                      r["dataset_digest"] or "-", str(len(r["specialist_runs"])), per,
                      " ".join(k.split("/")[-1] for k in r.get("tasks_without_data") or {}) or "-")
    Console(width=160).print(table)


def write_lineage_picture(params: Params, out: str | None = None) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = lineage_rows(params)
    if not rows:
        return None
    path = Path(out) if out else _layout(params).figures() / "lineage.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(max(4, 2.4 * len(rows)), 2.8))
    for i, r in enumerate(rows):
        rate = r["success_rate"]
        ax.add_patch(plt.Rectangle((i * 2, 0), 1.4, 1, fc=plt.cm.RdYlGn(rate if rate is not None else 0.5), ec="k"))
        txt = f"base v{r['version']}\n" + ("" if rate is None else f"success {rate:.2f}\n") + (f"data {r['dataset_digest'][:8]}" if r["dataset_digest"] else "scripted demos")
        ax.text(i * 2 + 0.7, 0.5, txt, ha="center", va="center", fontsize=8)
        if r["parent"] is not None:
            ax.annotate("", xy=(i * 2, 0.5), xytext=(i * 2 - 0.6, 0.5), arrowprops=dict(arrowstyle="->"))
            ax.text(i * 2 - 0.3, 0.62, f"PLD\n{len(r['specialist_runs'])} spec.", ha="center", fontsize=6)
    ax.set_xlim(-0.2, 2 * len(rows) - 0.4)
    ax.set_ylim(-0.1, 1.1)
    ax.axis("off")
    ax.set_title(f"lineage of '{params.mlflow.model_name}'")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _eef_sources(params: Params, layout) -> tuple[int, dict[str, tuple[Path, str]]]:
    """The newest iteration's stores for the end-effector picture of the first task."""
    suite, task = params.env.suite, params.env.tasks[0]
    k = 0
    while layout.iteration(k + 1).exists():
        k += 1
    return k, {
        "base rollouts (offline)": (layout.offline(k, suite, task) / "offline.zarr", "tab:blue"),
        "specialist rollouts": (layout.pld(k, suite, task) / "specialist_rollouts.zarr", "tab:orange"),
        "PLD episodes": (layout.pld(k, suite, task) / "pld.zarr", "tab:green"),
    }


def _figures_key(params: Params, layout, reports: dict, versions: dict) -> str:
    """What the pictures are drawn from: the evaluation reports, the version records and the stores' stage manifests."""
    from pld_core.artifacts import digest_json, read_manifest

    _, sources = _eef_sources(params, layout)
    stores = {label: ((read_manifest(path.parent) or {}).get("output_digest") if path.exists() else None)
              for label, (path, _) in sources.items()}
    return digest_json({"reports": reports, "versions": versions, "stores": stores, "suite": params.env.suite,
                        "tasks": params.env.tasks})


def _specialist_curves(params: Params, layout, n_iterations: int, fig_dir: Path) -> Path | None:
    """Each specialist's evaluation curve (success vs env steps), one panel per iteration."""
    import matplotlib.pyplot as plt

    suite = params.env.suite
    curves = {}
    for k in range(n_iterations):
        for t in params.env.tasks:
            f = layout.residual(k, suite, t) / "curve.json"
            if f.is_file():
                curves.setdefault(k, {})[t] = json.loads(f.read_text())["points"]
    if not curves:
        return None
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.4), squeeze=False, sharey=True)
    for ax, (k, per_task) in zip(axes[0], sorted(curves.items())):
        for t, pts in per_task.items():
            ax.plot([p["env_steps"] for p in pts], [p["success_rate"] for p in pts], marker="o", ms=3, label=f"task {t}")
        ax.set_title(f"iteration {k}: specialists on base v{k}", fontsize=9)
        ax.set_xlabel("env steps")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("success (base + residual)")
    fig.tight_layout()
    p = fig_dir / "specialist_curves.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p


def write_figures(params: Params) -> list[Path]:
    """Success per task over base versions, and end-effector paths for the first task; logged to MLflow.
    Skipped (nothing redrawn or re-logged) when the reports and stores they are drawn from are unchanged."""
    from pld_core.artifacts import write_json_atomic

    from pld_core.versions import versions_report

    layout = _layout(params)
    fig_dir = layout.figures()
    reports = eval_reports(params)
    records = versions_report(params, layout)
    key = _figures_key(params, layout, reports, records)
    index = fig_dir / "figures.json"
    with contextlib.suppress(OSError, ValueError):
        done = json.loads(index.read_text())
        if done.get("key") == key and all((fig_dir / f).is_file() for f in done.get("files", [])):
            return [fig_dir / f for f in done["files"]]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if reports:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        versions = sorted(reports)
        keys = list(reports[versions[0]]["tasks"])
        for key_ in keys:
            ys = [reports[v]["tasks"].get(key_, {}).get("success_rate", np.nan) for v in versions]
            ax.plot(versions, ys, marker="o", label=key_)
        means = [reports[v]["mean"] for v in versions]
        lo = [reports[v]["mean_ci95"][0] for v in versions]
        hi = [reports[v]["mean_ci95"][1] for v in versions]
        ax.plot(versions, means, "k-", lw=2.5, label="mean")
        ax.fill_between(versions, lo, hi, color="k", alpha=0.12, label="mean 95% CI")
        ax.set_xticks(versions, [f"v{v}" for v in versions])
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("base version")
        ax.set_ylabel("success rate")
        ax.legend(fontsize=7, loc="lower right")
        ax.set_title("success per task over base versions")
        fig.tight_layout()
        p = fig_dir / "success_over_versions.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written.append(p)
    p = _specialist_curves(params, layout, len(records["versions"]), fig_dir)
    if p:
        written.append(p)
    p = _eef_paths(params, layout, fig_dir)
    if p:
        written.append(p)
    if records["versions"]:
        write_json_atomic(fig_dir / "versions.json", records)
        written.append(fig_dir / "versions.json")
    try:
        client = _client(params)
        runs = client.search_runs([client.get_experiment_by_name(params.mlflow.experiment).experiment_id],
                                  "tags.`pld.iteration` != 'bootstrap'", order_by=["attributes.start_time DESC"], max_results=1)
        if runs:
            for f in written:
                client.log_artifact(runs[0].info.run_id, str(f), "figures")
    except Exception:
        pass  # figures are on disk either way
    write_json_atomic(index, {"key": key, "files": [f.name for f in written]})
    return written


def _eef_paths(params: Params, layout, fig_dir: Path) -> Path | None:
    import matplotlib.pyplot as plt

    from pld_core.store import TrajectoryStore

    suite, task = params.env.suite, params.env.tasks[0]
    k, sources = _eef_sources(params, layout)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    drawn = False
    for label, (path, color) in sources.items():
        if not path.exists():
            continue
        try:
            eps = TrajectoryStore.open(path).episodes(["obs_state"])[:20]
        except Exception:
            continue
        for i, ep in enumerate(eps):
            xyz = ep.steps["obs_state"][:, :3]
            axes[0].plot(xyz[:, 0], xyz[:, 1], color=color, alpha=0.5, lw=1, label=label if i == 0 else None)
            axes[1].plot(xyz[:, 0], xyz[:, 2], color=color, alpha=0.5, lw=1, label=label if i == 0 else None)
            if ep.t_base > 0:
                axes[0].plot(*xyz[min(ep.t_base, len(xyz) - 1), :2], "k.", ms=4)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    axes[0].set_xlabel("x (m)"), axes[0].set_ylabel("y (m)"), axes[0].set_title("top view")
    axes[1].set_xlabel("x (m)"), axes[1].set_ylabel("z (m)"), axes[1].set_title("side view")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"end-effector paths, {suite} task {task}, iteration {k} (dots: residual takes over)")
    fig.tight_layout()
    p = fig_dir / f"eef_paths_{suite}-{task}.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p
