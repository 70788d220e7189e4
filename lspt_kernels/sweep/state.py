"""A run's folder as the sweep reads it: markers, the per-run lock, lspt-train's log.

The folder is lspt-train's --output (config.json, log.jsonl, resume.pt, last/best.safetensors, curves.png)
plus the sweep's own files, all named sweep.*:
    sweep.lock            flock'ed by whoever runs it (the lock is inherited by the lspt-train process and
                          released by the OS when both are gone, so a killed sweep never leaves a stale lock)
    sweep.done.json       written only after lspt-train exited 0 and its log has every epoch
    sweep.diverged.json   lspt-train stopped on a non-finite loss: finished, but never chosen
    sweep.log             the output of every attempt, each after a header line
"""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

__all__ = ["LOCK", "DONE", "DIVERGED", "LOG", "RunLock", "read_log", "last_epoch_acc", "marker", "write_marker",
           "is_locked", "clear_partial", "log_tail", "TRAIN_OUTPUTS"]

LOCK, DONE, DIVERGED, LOG = "sweep.lock", "sweep.done.json", "sweep.diverged.json", "sweep.log"
# What lspt-train writes into --output (docs/training.md, "Output directory").
TRAIN_OUTPUTS = ("config.json", "log.jsonl", "resume.pt", "last.safetensors", "best.safetensors", "curves.png")


class RunLock:
    """An exclusive, non-blocking flock on RUN/sweep.lock. `fd` is handed to the lspt-train process
    (subprocess pass_fds), so the lock lives as long as the run does, whoever dies first."""

    def __init__(self, folder):
        self.path = Path(folder) / LOCK
        self.fd: int | None = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)           # closing the last descriptor of the open file releases the flock
            self.fd = None


def is_locked(folder) -> bool:
    """Whether some process (this one included, through another descriptor) runs it now."""
    if not (Path(folder) / LOCK).exists():
        return False
    lock = RunLock(folder)
    if lock.acquire():
        lock.release()
        return False
    return True


def read_log(folder) -> list[dict]:
    """lspt-train's log.jsonl rows (one per finished epoch); [] when there is none."""
    path = Path(folder) / "log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_epoch_acc(folder, epochs: int) -> float | None:
    """The scored split's top-1 at the last epoch (`epochs`), as the protocol uses it; None before it exists.
    Not the best epoch: the official selection reads the last (tune_vtab.py:56-57)."""
    rows = read_log(folder)
    return next((float(r["val_acc"]) for r in rows if r.get("epoch") == epochs), None)


def marker(folder) -> dict | None:
    """The run's final state: {"status": "finished" | "diverged", ...}, or None while it has none."""
    for name in (DONE, DIVERGED):
        path = Path(folder) / name
        if path.is_file():
            return json.loads(path.read_text())
    return None


def write_marker(folder, status: str, info: dict) -> None:
    path = Path(folder) / (DONE if status == "finished" else DIVERGED)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(dict(status=status, **info), indent=2))
    os.replace(tmp, path)


def clear_partial(folder) -> list[str]:
    """Remove lspt-train's files from a run that has no resume state (it was stopped between writing its
    config and its first state, which holds no training): the run then starts cleanly. Returns what went."""
    folder = Path(folder)
    gone = []
    for name in TRAIN_OUTPUTS:
        for path in (folder / name, folder / (name + ".tmp")):
            if path.exists():
                path.unlink()
                gone.append(path.name)
    return gone


def log_tail(folder, lines: int = 15) -> list[str]:
    """The last lines of the run's latest attempt in sweep.log."""
    path = Path(folder) / LOG
    if not path.is_file():
        return []
    text = path.read_text(errors="replace").splitlines()
    start = max((i for i, line in enumerate(text) if line.startswith("=== lspt-sweep attempt")), default=-1)
    return text[start + 1:][-lines:]
