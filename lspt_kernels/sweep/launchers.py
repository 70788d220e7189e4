"""How one run is executed, and the two pools that execute many: local processes (a thread pool, each thread
waiting on one lspt-train subprocess, pinned to one GPU when there are GPUs) and submitit (SLURM, or its local
executor where there is no SLURM). Both hand back objects with done() / result(); the driver decides what
runs when.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from pathlib import Path

from ..cli_helpers import UsageError
from .plan import RunSpec
from .state import LOG, RunLock, clear_partial, log_tail, marker, read_log, write_marker

__all__ = ["execute_run", "LocalLauncher", "SubmititLauncher", "TrainJob", "visible_gpus", "child_env", "ATTEMPTS",
           "DIVERGED_MESSAGE"]

ATTEMPTS = "sweep.attempts.jsonl"
# lspt-train's error when the loss stops being finite (train.py raises FloatingPointError, exits 2).
DIVERGED_MESSAGE = re.compile(r"the training loss is (nan|-?inf)\b|the run diverged")


def _package_root() -> str:
    import lspt_kernels
    return str(Path(lspt_kernels.__file__).resolve().parent.parent)


def child_env(extra: dict | None) -> dict:
    """This environment, with this process's lspt_kernels first on the path: the run's working directory is
    its own folder, so `python -m` cannot pick up another checkout from where the sweep was started."""
    env = dict(os.environ, **(extra or {}))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_package_root(), env.get("PYTHONPATH", "")) if p)
    return env


def _attempts(folder: Path) -> list[dict]:
    path = folder / ATTEMPTS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def execute_run(spec: RunSpec, env: dict | None = None, on_start=None, stop: threading.Event | None = None) -> dict:
    """Run one lspt-train run to its end, under its lock. Returns {"status": ...}:
    finished / diverged (a marker was written), failed (with "rc" and "tail"), interrupted (stopped by the
    sweep or Ctrl-C; its resume state is kept), busy (another process holds its lock); a run that already had its
    marker returns the marker (with already=True).

    A folder with lspt-train's resume.pt is continued with --resume; one without it starts afresh (its partial
    files, which hold no training, are removed first)."""
    folder = Path(spec.folder)
    lock = RunLock(folder)
    if not lock.acquire():
        return dict(status="busy")
    try:
        done = marker(folder)
        if done is not None:
            return dict(done, already=True)
        resume = (folder / "resume.pt").is_file()
        if not resume:
            clear_partial(folder)
        argv = [*spec.trainer, *spec.argv, *(["--resume"] if resume else [])]
        start = time.time()
        with open(folder / LOG, "a") as log:
            log.write(f"=== lspt-sweep attempt {time.strftime('%Y-%m-%d %H:%M:%S')} "
                      f"({'resume' if resume else 'start'}): {shlex.join(argv)}\n")
            log.flush()
            # Its own session: a Ctrl-C on the terminal reaches the sweep only, which then stops each run once.
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=folder,
                                    env=child_env(env), pass_fds=(lock.fd,), start_new_session=True)
            if on_start is not None:
                on_start(proc)
            rc = proc.wait()
        end = time.time()
        with open(folder / ATTEMPTS, "a") as f:
            f.write(json.dumps(dict(start=start, end=end, rc=rc, resume=resume)) + "\n")
        return _outcome(spec, folder, rc, interrupted=stop is not None and stop.is_set())
    finally:
        lock.release()


def _outcome(spec: RunSpec, folder: Path, rc: int, interrupted: bool) -> dict:
    rows = read_log(folder)
    wall = sum(a["end"] - a["start"] for a in _attempts(folder))
    if rc == 0:
        epochs = [r.get("epoch") for r in rows]
        if epochs != list(range(1, spec.epochs + 1)):
            shown = f"{epochs[:5]}{' ...' if len(epochs) > 5 else ''}"
            return dict(status="failed", rc=rc, tail=[f"lspt-train exited 0 but {folder}/log.jsonl holds epochs "
                                                     f"{shown}, not 1..{spec.epochs}"])
        info = dict(val_acc=float(rows[-1]["val_acc"]), epochs=spec.epochs, wall_s=wall,
                    train_s=sum(float(r.get("epoch_time_s", 0.0)) for r in rows),
                    images_per_s=sorted(float(r.get("images_per_s", 0.0)) for r in rows)[len(rows) // 2])
        write_marker(folder, "finished", info)
        return dict(status="finished", **info)
    if interrupted or rc in (130, -signal.SIGINT):
        return dict(status="interrupted", rc=rc)
    tail = log_tail(folder)
    hit = next((line for line in reversed(tail) if DIVERGED_MESSAGE.search(line)), None)
    if hit is not None:
        info = dict(message=hit.strip(), epochs_done=len(rows), wall_s=wall)
        write_marker(folder, "diverged", info)
        return dict(status="diverged", **info)
    return dict(status="failed", rc=rc, tail=tail)


def visible_gpus(device: str | None) -> list[str]:
    """The GPU ids a local sweep spreads its runs over (CUDA_VISIBLE_DEVICES values); [] for CPU runs."""
    if device is not None and device.startswith("cpu"):
        return []
    import torch
    count = torch.cuda.device_count()
    if count == 0:
        return []
    listed = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    return (listed or [str(i) for i in range(count)])[:count]


class LocalLauncher:
    """N runs at a time on this machine: slot k runs on GPU k mod (number of GPUs), or on the CPU with
    (cores / N) threads each when there is no GPU."""
    name = "local"

    def __init__(self, jobs: int, gpus: list[str]):
        self.jobs, self.gpus = jobs, gpus
        self.pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="lspt-sweep")
        self.free = list(range(jobs))
        self.lock = threading.Lock()
        self.procs: dict[str, subprocess.Popen] = {}
        self.stop = threading.Event()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.threads = max(1, cores // jobs)

    def submit(self, spec: RunSpec):
        return self.pool.submit(self._run, spec)

    def wait(self, handles: list, timeout: float) -> None:
        """Until one of them is done, or `timeout` seconds."""
        if handles:
            wait_futures(handles, timeout=timeout, return_when=FIRST_COMPLETED)
        else:
            time.sleep(timeout)

    def env_for(self, slot: int) -> dict:
        """The environment variables of a run in this slot: its GPU, or its share of the CPU threads."""
        if self.gpus:
            return {"CUDA_VISIBLE_DEVICES": self.gpus[slot % len(self.gpus)]}
        if self.jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
            return {"OMP_NUM_THREADS": str(self.threads)}
        return {}

    def _started(self, run_id: str, proc: subprocess.Popen) -> None:
        with self.lock:
            self.procs[run_id] = proc
        if self.stop.is_set():             # stopped while it was starting
            proc.send_signal(signal.SIGINT)

    def _run(self, spec: RunSpec) -> dict:
        if self.stop.is_set():
            return dict(status="interrupted", rc=None)
        with self.lock:
            slot = self.free.pop(0)
        try:
            return execute_run(spec, self.env_for(slot), lambda p: self._started(spec.run_id, p), self.stop)
        finally:
            with self.lock:
                self.procs.pop(spec.run_id, None)
                self.free.append(slot)

    def interrupt(self) -> str:
        """Ctrl-C: each running lspt-train gets one SIGINT (it keeps its last epoch's state and exits)."""
        self.stop.set()
        with self.lock:
            procs = list(self.procs.values())
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        return f"stopping {len(procs)} running lspt-train process(es); each keeps its last finished epoch"

    def kill(self) -> None:
        with self.lock:
            procs = list(self.procs.values())
        for p in procs:
            if p.poll() is None:
                p.kill()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class TrainJob:
    """What a submitit job calls: one run. `checkpoint` makes it requeue-able: on a SLURM timeout or preemption
    submitit calls it and requeues the job, which then resumes the run."""

    def __call__(self, spec: RunSpec) -> dict:
        return execute_run(spec)

    def checkpoint(self, spec: RunSpec):
        import submitit
        return submitit.helpers.DelayedSubmission(self, spec)


class _JobHandle:
    def __init__(self, job):
        self.job = job

    def done(self) -> bool:
        return self.job.done()

    def result(self) -> dict:
        try:
            return self.job.result()
        except Exception as exc:          # submitit's FailedJobError / UncompletedJobError carry the job's stderr
            return dict(status="failed", rc=None, tail=[f"submitit job {self.job.job_id}: {type(exc).__name__}"]
                        + str(exc).splitlines()[-12:])


class SubmititLauncher:
    """Runs through submitit's AutoExecutor: SLURM where `sbatch` exists, else its local executor. Job logs go to
    SWEEP/submitit/. Parameters are AutoExecutor's (timeout_min, gpus_per_node, slurm_partition, ...)."""
    name = "submitit"

    def __init__(self, folder, params: dict, cluster: str | None = None):
        try:
            import submitit
        except ImportError:
            raise UsageError("--launcher submitit needs submitit: pip install 'lspt-kernels[sweep]' "
                             "(or pip install submitit)") from None
        self.executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
        try:
            self.executor.update_parameters(**params)
        except (TypeError, ValueError, AssertionError, NameError) as exc:     # submitit's ways of saying "unknown"
            raise UsageError(f"--submitit-param: {' '.join(str(exc).split())}") from None
        self.cluster = self.executor.cluster
        self.jobs: list = []

    def submit(self, spec: RunSpec):
        job = self.executor.submit(TrainJob(), spec)
        self.jobs.append(job)
        return _JobHandle(job)

    def wait(self, handles: list, timeout: float) -> None:
        # On a cluster, done() reads the scheduler's state (which submitit's watcher rate-limits itself); a
        # second between looks is plenty.
        time.sleep(max(timeout, 1.0))

    def interrupt(self) -> str:
        if self.cluster == "local":
            for job in self.jobs:
                if not job.done():
                    job.cancel()             # the local executor forwards a SIGINT to the job
            return "stopping the local submitit jobs"
        running = sum(not j.done() for j in self.jobs)
        return (f"{running} submitted job(s) keep running on {self.cluster} (each holds its run's lock); the same "
                "command waits for them, or cancel them with the cluster's tools (scancel)")

    def kill(self) -> None:
        pass

    def close(self) -> None:
        pass
