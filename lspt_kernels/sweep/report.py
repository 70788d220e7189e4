"""`lspt-sweep report SWEEP`: the paper-style tables of a sweep, from its run folders alone.

Rows are methods; columns are the tasks, then the benchmark means: VTAB-1k's group means (Natural 7,
Specialized 4, Structured 8) and its mean over all tasks, FGVC's mean over its 5 datasets. A task cell is the
mean ± sample std (n - 1) over the seeds of the last-epoch top-1 on the final scored split (test); a mean
column averages the task means. A mean over fewer tasks than its benchmark has is marked (k/n) and never
compared with the paper. Where the backbone and the column match the paper's tables, the published number and
the difference are shown beside it.

Files (SWEEP/report/): report.md, report.csv (one row per method and column), report.json (everything), and
report.png (bars with the std over seeds; the paper's numbers as markers).
"""
from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

from . import state
from .paper import BACKBONES, paper_value
from .plan import Plan, format_number
from .protocols import FGVC_TASKS, VTAB_GROUPS
from .selection import cell_selection

__all__ = ["collect", "write_report", "columns_of", "cell_text"]

FGVC_MEAN, VTAB_MEAN = "FGVC mean", "VTAB mean"


def columns_of(plan: Plan) -> list[dict]:
    """The table's columns in paper order: FGVC tasks and their mean, VTAB tasks group by group each followed by
    its group mean, the VTAB mean, then a user's own tasks. {"name", "kind": task|mean, "tasks": [...] (means),
    "size": the benchmark's task count (means)}."""
    names = [t.name for t in plan.tasks]
    cols: list[dict] = []
    fgvc = [t for t in FGVC_TASKS if t in names]
    if fgvc:
        cols += [dict(name=t, kind="task") for t in fgvc]
        cols.append(dict(name=FGVC_MEAN, kind="mean", tasks=fgvc, size=len(FGVC_TASKS)))
    vtab = []
    for group, tasks in VTAB_GROUPS.items():
        present = [t for t in tasks if t in names]
        if present:
            cols += [dict(name=t, kind="task") for t in present]
            cols.append(dict(name=group, kind="mean", tasks=present, size=len(tasks)))
            vtab += present
    if vtab:
        cols.append(dict(name=VTAB_MEAN, kind="mean", tasks=vtab, size=sum(len(t) for t in VTAB_GROUPS.values())))
    cols += [dict(name=t.name, kind="task") for t in plan.tasks if t.benchmark is None]
    return cols


def _task_cell(plan: Plan, task, method) -> dict:
    grid = plan.grid_runs(task, method)
    chosen, why = cell_selection(grid)
    grid_done = sum(state.marker(r.folder) is not None for r in grid)
    cell = dict(lr=None, wd=None, val_acc=None, grid_done=grid_done, grid_runs=len(grid), seeds=[], accs=[],
                n=0, mean=None, std=None, status=why)
    if chosen is None:
        return cell
    cell.update(lr=chosen.lr, wd=chosen.wd, val_acc=chosen.acc, diverged=chosen.diverged)
    diverged_finals = []
    for run in plan.final_runs(task, method, chosen.lr, chosen.wd):
        m = state.marker(run.folder)
        if m is None:
            continue
        if m["status"] == "diverged":
            diverged_finals.append(run.seed)
            continue
        cell["seeds"].append(run.seed)
        cell["accs"].append(state.last_epoch_acc(run.folder, run.epochs))
    accs = cell["accs"]
    cell.update(n=len(accs), mean=statistics.fmean(accs) if accs else None,
                std=statistics.stdev(accs) if len(accs) > 1 else None, diverged_seeds=diverged_finals,
                status="" if len(accs) == len(plan.protocol.seeds) else
                f"{len(accs)} of {len(plan.protocol.seeds)} final runs finished"
                + (f" ({len(diverged_finals)} diverged)" if diverged_finals else ""))
    return cell


def collect(plan: Plan) -> dict:
    """Everything the tables show, read from the run folders."""
    columns = columns_of(plan)
    tasks = {t.name: t for t in plan.tasks}
    rows = {}
    for method in plan.methods:
        row = {}
        for col in columns:
            if col["kind"] == "task":
                row[col["name"]] = _task_cell(plan, tasks[col["name"]], method)
        for col in columns:
            if col["kind"] == "mean":
                means = [row[t]["mean"] for t in col["tasks"] if row[t]["mean"] is not None]
                row[col["name"]] = dict(mean=statistics.fmean(means) if means else None, tasks=len(means),
                                        size=col["size"], complete=len(means) == col["size"])
        for col in columns:
            cell = row[col["name"]]
            complete = cell.get("complete", True) and cell["mean"] is not None
            found = paper_value(plan.paper_backbone, method.method, method.options, col["name"]) if complete else None
            cell["paper"], cell["paper_source"] = found if found else (None, None)
            cell["diff"] = cell["mean"] - cell["paper"] if found else None
        rows[method.label] = row
    return dict(sweep=str(plan.root), protocol=plan.protocol.to_dict(), protocol_source=plan.protocol.source,
                model=plan.model, checkpoint=plan.checkpoint, backbone=plan.backbone,
                paper_backbone=plan.paper_backbone, paper_note=plan.paper_note, epochs=plan.epochs,
                train_args=plan.train_args, columns=columns, rows=rows, compute=_compute(plan))


def _compute(plan: Plan) -> dict:
    """What the finished runs cost, from their markers (wall time per run, all attempts) and logs."""
    wall = train = 0.0
    runs = 0
    speed: dict[str, list[float]] = {}
    devices = set()
    for task, method in plan.cells():
        grid = plan.grid_runs(task, method)
        chosen, _ = cell_selection(grid)
        finals = plan.final_runs(task, method, chosen.lr, chosen.wd) if chosen else []
        for run in grid + finals:
            m = state.marker(run.folder)
            if m is None:
                continue
            runs += 1
            wall += m.get("wall_s", 0.0)
            train += m.get("train_s", 0.0)
            if m.get("images_per_s"):
                speed.setdefault(method.label, []).append(m["images_per_s"])
            cfg = Path(run.folder) / "config.json"
            if cfg.is_file():
                devices.add(str(json.loads(cfg.read_text()).get("device")))
    return dict(runs=runs, wall_hours=wall / 3600, train_hours=train / 3600, devices=sorted(devices),
                images_per_s={k: statistics.median(v) for k, v in speed.items()})


def cell_text(cell: dict, with_paper: bool = False) -> str:
    if cell.get("mean") is None:
        return "—"
    if "size" in cell:                                       # a mean column
        text = f"{cell['mean']:.2f}" + ("" if cell["complete"] else f" ({cell['tasks']}/{cell['size']})")
    else:
        text = f"{cell['mean']:.2f}" + (f" ± {cell['std']:.2f}" if cell["std"] is not None else "")
        if cell["status"]:
            text += f" ({cell['n']} seed{'s' if cell['n'] != 1 else ''})"
    if with_paper and cell.get("paper") is not None:
        text += f" / {cell['paper']:.2f} ({cell['diff']:+.2f})"
    return text


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _markdown(data: dict) -> str:
    cols = [c["name"] for c in data["columns"]]
    pr = data["protocol"]
    grid = (f"lr {', '.join(map(format_number, pr['lrs']))} x wd {', '.join(map(format_number, pr['wds']))}, grid "
            f"seed {pr['seeds'][0]}, final seeds {', '.join(map(str, pr['seeds']))}")
    out = [f"# lspt-sweep report: {data['sweep']}", "",
           f"Protocol {pr['name']}: {grid}; {data['epochs']} epochs; model {data['model']}, checkpoint "
           f"{data['checkpoint'] or 'none (random backbone)'}"
           + (f" ({BACKBONES.get(data['backbone'], data['backbone'])})" if data["backbone"] else "") + ".",
           f"Options passed to every run: {' '.join(data['train_args']) or 'none'}.", "",
           "## Top-1 (%) on the final scored split, last epoch: mean ± std over seeds", "",
           _table(["method", *cols], [[m, *(cell_text(row[c]) for c in cols)] for m, row in data["rows"].items()])]
    paper_cols = [c for c in cols if any(row[c].get("paper") is not None for row in data["rows"].values())]
    out += ["", "## Side by side with the paper: ours / paper (difference)", "", data["paper_note"] + "."]
    if paper_cols:
        out += [""]
        out.append(_table(["method", *paper_cols], [[m, *(cell_text(row[c], True) if row[c].get("paper") is not None
                                                          else "—" for c in paper_cols)]
                                                    for m, row in data["rows"].items()]))
        sources = sorted({row[c]["paper_source"] for row in data["rows"].values() for c in paper_cols
                          if row[c].get("paper_source")})
        out += ["", "Sources: " + "; ".join(sources) + "."]
    elif data["paper_backbone"] is not None:
        out.append("\nNo column matches the paper's tables (complete benchmark means or FGVC tasks, with a matching "
                   "backbone and method).")
    task_cols = [c["name"] for c in data["columns"] if c["kind"] == "task"]
    out += ["", "## Chosen lr / weight decay (last-epoch top-1 on the selection split)", "",
            _table(["method", *task_cols],
                   [[m, *(_choice(row[c]) for c in task_cols)] for m, row in data["rows"].items()])]
    comp = data["compute"]
    speeds = ", ".join(f"{k} {v:.1f}" for k, v in comp["images_per_s"].items()) or "—"
    out += ["", "## Compute", "",
            f"{comp['runs']} finished runs: {comp['wall_hours']:.3f} h of run wall time in all (every attempt, "
            f"start-up and evaluation included), {comp['train_hours']:.3f} h of it training; median training "
            f"images/s per run: {speeds}; device(s): {', '.join(comp['devices']) or '—'}."]
    return "\n".join(out) + "\n"


def _choice(cell: dict) -> str:
    if cell["lr"] is None:
        return f"— ({cell['status']})" if cell["status"] else "—"
    return f"lr {format_number(cell['lr'])}, wd {format_number(cell['wd'])} ({cell['val_acc']:.2f})"


def _csv(data: dict) -> str:
    buf = io.StringIO()
    fields = ["method", "column", "kind", "mean", "std", "n", "lr", "wd", "selection_top1", "paper", "difference",
              "paper_source", "status"]
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    kinds = {c["name"]: c["kind"] for c in data["columns"]}
    for method, row in data["rows"].items():
        for col, cell in row.items():
            mean_col = kinds[col] == "mean"
            w.writerow(dict(method=method, column=col, kind=kinds[col], mean=_num(cell["mean"]),
                            std=_num(cell.get("std")), n=cell["tasks"] if mean_col else cell["n"],
                            lr=_num(cell.get("lr")), wd=_num(cell.get("wd")), selection_top1=_num(cell.get("val_acc")),
                            paper=_num(cell.get("paper")), difference=_num(cell.get("diff")),
                            paper_source=cell.get("paper_source") or "",
                            status=("" if cell["complete"] else f"{cell['tasks']} of {cell['size']} tasks")
                            if mean_col else cell["status"]))
    return buf.getvalue()


def _num(x) -> str:
    return "" if x is None else f"{x:.4f}".rstrip("0").rstrip(".") if isinstance(x, float) else str(x)


def _plot(data: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = [c["name"] for c in data["columns"]]
    methods = list(data["rows"])
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(cols) * max(1, len(methods)) ** 0.5 + 2), 4))
    for i, m in enumerate(methods):
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(cols))]
        cells = [data["rows"][m][c] for c in cols]
        ys = [c["mean"] if c["mean"] is not None else 0.0 for c in cells]
        bars = ax.bar(xs, ys, width, label=m)
        spread = [(x, y, c["std"]) for x, y, c in zip(xs, ys, cells) if c.get("std") is not None]
        if spread:
            sx, sy, se = zip(*spread)
            ax.errorbar(sx, sy, yerr=se, fmt="none", ecolor="black", capsize=2, linewidth=1)
        paper = [(x, c["paper"]) for x, c in zip(xs, cells) if c.get("paper") is not None]
        if paper:
            ax.scatter(*zip(*paper), marker="D", s=22, color=bars.patches[0].get_facecolor(), edgecolors="black",
                       zorder=3, label=f"{m} (paper)")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{data['model']}: last-epoch top-1, mean ± std over seeds", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncols=2)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def write_report(plan: Plan, out_dir=None) -> dict:
    """Write report.md / .csv / .json / .png into `out_dir` (default SWEEP/report); returns the collected data
    and the paths."""
    out = Path(out_dir) if out_dir is not None else plan.root / "report"
    out.mkdir(parents=True, exist_ok=True)
    data = collect(plan)
    paths = {k: out / f"report.{k}" for k in ("md", "csv", "json", "png")}
    paths["md"].write_text(_markdown(data))
    paths["csv"].write_text(_csv(data))
    paths["json"].write_text(json.dumps(data, indent=2))
    _plot(data, paths["png"])
    return dict(data=data, paths=paths)
