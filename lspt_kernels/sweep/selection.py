"""The protocol's choice of learning rate and weight decay for one (method, task) cell.

The best top-1 on the selection split at the LAST epoch of each grid run (not its best epoch), as the
official find_best_lrwd (KMnP/vpt tune_vtab.py:48-79) reads `epoch_{len - 1}`. Ties go to the smaller lr
("for stability", tune_vtab.py:68); at the same lr, to the larger weight decay (the official code leaves that
tie to file-system order; the more regularised run is this project's choice). A run that diverged (lspt-train
stopped on a non-finite loss) is never chosen: the official trainer stops too and find_best_lrwd skips runs
without results (tune_vtab.py:59-61).
"""
from __future__ import annotations

from dataclasses import dataclass

from . import state
from .plan import RunSpec

__all__ = ["GridPoint", "Selection", "select", "cell_selection"]


@dataclass(frozen=True)
class GridPoint:
    lr: float
    wd: float
    acc: float | None            # last-epoch top-1 on the selection split; None: diverged


@dataclass(frozen=True)
class Selection:
    lr: float
    wd: float
    acc: float                   # its last-epoch selection top-1
    diverged: int                # grid runs that diverged


def select(points: list[GridPoint]) -> Selection | None:
    """The chosen point, or None when every run diverged."""
    scored = [p for p in points if p.acc is not None]
    if not scored:
        return None
    best = max(scored, key=lambda p: (p.acc, -p.lr, p.wd))
    return Selection(best.lr, best.wd, best.acc, len(points) - len(scored))


def cell_selection(runs: list[RunSpec]) -> tuple[Selection | None, str]:
    """(selection, "") once every grid run of the cell has its marker; (None, why) otherwise."""
    points, waiting = [], 0
    for run in runs:
        m = state.marker(run.folder)
        if m is None:
            waiting += 1
            continue
        acc = state.last_epoch_acc(run.folder, run.epochs) if m["status"] == "finished" else None
        if m["status"] == "finished" and acc is None:
            return None, f"{run.run_id}: marked finished but its log has no epoch {run.epochs}"
        points.append(GridPoint(run.lr, run.wd, acc))
    if waiting:
        return None, f"{waiting} of {len(runs)} grid runs not finished"
    chosen = select(points)
    if chosen is None:
        return None, f"all {len(runs)} grid runs diverged"
    return chosen, ""
