"""The sweep's loop: submit grid runs, choose each cell's lr / wd once its grid is complete, submit its final
runs, retry a failed run once, show progress. Everything it knows is read back from the run folders, so it
can be stopped at any point and started again.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

from . import state
from .plan import Plan, RunSpec, format_number
from .selection import cell_selection

__all__ = ["StatusLine", "Progress", "run_sweep", "RETRIES"]

RETRIES = 1               # a failed run is tried again this many times per invocation


class StatusLine:
    """One line that updates in place on a terminal; plain lines (one per event, then the status) otherwise."""

    def __init__(self, stream=None, tty: bool | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.text = ""

    def _clear(self) -> None:
        if self.tty and self.text:
            self.stream.write("\r\x1b[K")

    def event(self, line: str) -> None:
        """A line that stays (a run started / finished / failed)."""
        self._clear()
        self.stream.write(line + "\n")
        if self.tty and self.text:
            self.stream.write(self.text)
        self.stream.flush()

    def update(self, text: str) -> None:
        if text == self.text:
            return
        if self.tty:
            width = shutil.get_terminal_size((120, 20)).columns - 1
            self.stream.write("\r\x1b[K" + text[:width])
        else:
            self.stream.write(text + "\n")
        self.text = text
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.text:
            self.stream.write("\n")
            self.stream.flush()
        self.text = ""


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


@dataclass
class Progress:
    """The counts the status line shows."""
    total: int
    done: set = field(default_factory=set)
    diverged: int = 0
    failed: dict = field(default_factory=dict)        # run_id -> outcome (given up this invocation)
    walls: list = field(default_factory=list)         # wall seconds of finished runs (for the ETA)

    def line(self, running: int, elsewhere: int, jobs: int) -> str:
        left = self.total - len(self.done) - running - elsewhere - len(self.failed)
        eta = "-"
        if self.walls and left + running > 0:
            eta = _duration(sum(self.walls) / len(self.walls) * (left + running) / max(1, jobs))
        parts = [f"{len(self.done)}/{self.total} done" + (f" ({self.diverged} diverged)" if self.diverged else ""),
                 f"{running} running" + (f" (+{elsewhere} elsewhere)" if elsewhere else ""),
                 f"{len(self.failed)} failed", f"{left} left", f"ETA {eta}"]
        return "sweep: " + ", ".join(parts)


def _write_selection(runs: list[RunSpec], chosen) -> None:
    folder = Path(runs[0].folder).parent.parent
    grid = [dict(lr=r.lr, wd=r.wd, acc=state.last_epoch_acc(r.folder, r.epochs)) for r in runs]
    data = dict(lr=chosen.lr, wd=chosen.wd, val_acc=chosen.acc, diverged=chosen.diverged, grid=grid,
                rule="best last-epoch top-1 on the selection split; ties: smaller lr, then larger wd")
    text = json.dumps(data, indent=2)
    path = folder / "selection.json"
    if path.is_file() and path.read_text() == text:
        return
    tmp = folder / "selection.json.tmp"
    tmp.write_text(text)
    os.replace(tmp, path)


class _Sweep:
    """The loop's state; one instance per `lspt-sweep run`."""

    def __init__(self, plan: Plan, launcher, jobs: int, status: StatusLine):
        self.plan, self.launcher, self.jobs, self.status = plan, launcher, jobs, status
        self.grid = {(t.name, m.label): (t, m, plan.grid_runs(t, m)) for t, m in plan.cells()}
        self.finals: dict = {}
        self.progress = Progress(sum(plan.size()))
        self.queue: deque[RunSpec] = deque()
        self.inflight: dict[str, tuple] = {}
        self.elsewhere: dict[str, RunSpec] = {}
        self.failures: Counter = Counter()
        for _, _, runs in self.grid.values():
            for run in runs:
                self.enqueue(run)

    def enqueue(self, run: RunSpec) -> None:
        m = state.marker(run.folder)
        if m is None:
            self.queue.append(run)
            return
        self.progress.done.add(run.run_id)
        self.progress.diverged += m["status"] == "diverged"
        if "wall_s" in m:
            self.progress.walls.append(m["wall_s"])

    def promote(self) -> None:
        """Plan the final runs of every cell whose grid is complete."""
        for key, (task, method, runs) in self.grid.items():
            if key in self.finals:
                continue
            chosen, _ = cell_selection(runs)
            if chosen is None:
                continue
            _write_selection(runs, chosen)
            self.finals[key] = self.plan.final_runs(task, method, chosen.lr, chosen.wd)
            self.status.event(f"chosen {task.name}/{method.label}: lr {format_number(chosen.lr)}, wd "
                              f"{format_number(chosen.wd)} (last-epoch val top-1 {chosen.acc:.2f}%)")
            for run in self.finals[key]:
                self.enqueue(run)

    def submit(self) -> None:
        while len(self.inflight) < self.jobs and self.queue:
            run = self.queue.popleft()
            if state.marker(run.folder) is not None:        # finished meanwhile by another sweep process
                self.enqueue(run)
                continue
            if state.is_locked(run.folder):
                self.elsewhere[run.run_id] = run
                self.status.event(f"busy  {run.run_id}: another process runs it; waiting for it")
                continue
            verb = "resume" if (Path(run.folder) / "resume.pt").is_file() else "start "
            self.inflight[run.run_id] = (self.launcher.submit(run), run)
            self.status.event(f"{verb} {run.run_id}")

    def collect(self) -> None:
        for run_id, (handle, run) in list(self.inflight.items()):
            if handle.done():
                del self.inflight[run_id]
                self.handle(run, handle.result())
        for run_id, run in list(self.elsewhere.items()):
            if not state.is_locked(run.folder):
                del self.elsewhere[run_id]
                self.enqueue(run)

    def handle(self, run: RunSpec, out: dict) -> None:
        status = out["status"]
        if status in ("finished", "diverged"):
            if status == "diverged":
                self.status.event(f"diverged {run.run_id}: {out.get('message', '')}")
            else:
                self.status.event(f"done  {run.run_id}: last-epoch top-1 {out['val_acc']:.2f}% "
                                  f"({_duration(out.get('wall_s', 0.0))})")
            self.enqueue(run)
        elif status == "busy":
            self.elsewhere[run.run_id] = run
        elif status in ("failed", "interrupted"):       # interrupted by someone else than this sweep's Ctrl-C
            if status == "interrupted":
                out = dict(out, tail=[f"lspt-train was stopped from outside the sweep (exit {out.get('rc')})"])
            self.failures[run.run_id] += 1
            tail = "\n".join("    " + line for line in out.get("tail", [])[-12:])
            if self.failures[run.run_id] <= RETRIES:
                self.status.event(f"FAILED {run.run_id} (exit {out.get('rc')}); trying it once more. Last lines of "
                                  f"{run.folder}/{state.LOG}:\n{tail}")
                self.queue.append(run)
            else:
                self.progress.failed[run.run_id] = out
                self.status.event(f"FAILED {run.run_id} again (exit {out.get('rc')}); giving up on it in this "
                                  f"sweep. Last lines of {run.folder}/{state.LOG}:\n{tail}")

    def idle(self) -> bool:
        return not self.inflight and not self.queue and not self.elsewhere

    def refresh(self) -> None:
        self.status.update(self.progress.line(len(self.inflight), len(self.elsewhere), self.jobs))


def run_sweep(plan: Plan, launcher, jobs: int, status: StatusLine | None = None, poll_s: float = 0.5) -> int:
    """Run the sweep to its end: 0 when every run finished, 1 when some failed twice (or a cell cannot be
    chosen), 130 on Ctrl-C (every finished epoch is kept; the same command continues)."""
    status = status or StatusLine()
    sweep = _Sweep(plan, launcher, jobs, status)
    try:
        while True:
            sweep.promote()
            sweep.submit()
            sweep.refresh()
            if sweep.idle():
                break
            launcher.wait([handle for handle, _ in sweep.inflight.values()], poll_s)
            sweep.collect()
    except KeyboardInterrupt:
        status.event(f"\nlspt-sweep: interrupted: {launcher.interrupt()}")
        _drain(sweep, launcher, status)
        status.close()
        status.event("lspt-sweep: stopped; every finished run and epoch is kept: run the same command again to "
                     "continue (finished runs are skipped, interrupted ones resumed)")
        return 130
    finally:
        launcher.close()
    status.close()
    return _summary(sweep, status)


def _drain(sweep: _Sweep, launcher, status: StatusLine, patience_s: float = 120.0) -> None:
    """After Ctrl-C: wait for the running local runs to save and exit (a second Ctrl-C, or `patience_s`, kills
    them: only their current epoch is lost)."""
    if getattr(launcher, "name", "") != "local":
        return
    deadline = time.time() + patience_s
    try:
        while sweep.inflight and time.time() < deadline:
            time.sleep(0.2)
            for run_id, (handle, run) in list(sweep.inflight.items()):
                if handle.done():
                    del sweep.inflight[run_id]
                    out = handle.result()
                    if out["status"] in ("finished", "diverged"):
                        sweep.handle(run, out)
    except KeyboardInterrupt:
        pass
    if sweep.inflight:
        launcher.kill()


def _summary(sweep: _Sweep, status: StatusLine) -> int:
    blocked = []
    for key, (task, method, runs) in sweep.grid.items():
        if key not in sweep.finals:
            _, why = cell_selection(runs)
            blocked.append(f"{task.name}/{method.label}: {why}")
    failed = sweep.progress.failed
    if not failed and not blocked:
        status.event(f"lspt-sweep: all {sweep.progress.total} runs finished; `lspt-sweep report {sweep.plan.root}` "
                     "writes the tables")
        return 0
    for run_id in failed:
        status.event(f"lspt-sweep: failed: {run_id} (see {sweep.plan.root / 'runs' / run_id / state.LOG})")
    for line in blocked:
        status.event(f"lspt-sweep: no final runs for {line}")
    status.event("lspt-sweep: fix the cause and run the same command again: finished runs are skipped")
    return 1
