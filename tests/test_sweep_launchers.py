"""The local pool's placement of runs (one per GPU, CPU threads split) and the environment runs get."""
import os
from pathlib import Path

import pytest
import torch

import lspt_kernels
from lspt_kernels.sweep import launchers


@pytest.mark.parametrize("device, count, visible, expected", [
    (None, 0, None, []),
    (None, 2, None, ["0", "1"]),
    ("cuda", 2, "3,5", ["3", "5"]),
    ("cpu", 2, None, []),                      # -- --device cpu keeps runs off the GPUs
])
def test_visible_gpus(monkeypatch, device, count, visible, expected):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert launchers.visible_gpus(device) == expected


def test_local_slots_go_round_robin_over_the_gpus():
    pool = launchers.LocalLauncher(3, ["3", "5"])
    try:
        assert [pool.env_for(slot) for slot in range(3)] == [{"CUDA_VISIBLE_DEVICES": g} for g in ("3", "5", "3")]
    finally:
        pool.close()


def test_cpu_jobs_split_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    pool = launchers.LocalLauncher(2, [])
    try:
        assert pool.env_for(0) == {"OMP_NUM_THREADS": "4"}
        monkeypatch.setenv("OMP_NUM_THREADS", "1")                  # the user's setting wins
        assert pool.env_for(1) == {}
    finally:
        pool.close()


def test_runs_import_this_package_first(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = launchers.child_env({"X": "1"})
    root = str(Path(lspt_kernels.__file__).resolve().parent.parent)
    assert env["PYTHONPATH"].split(os.pathsep) == [root, "/elsewhere"] and env["X"] == "1"


def test_submitit_parameters_are_checked(tmp_path):
    pytest.importorskip("submitit", reason="submitit is not installed (pip install 'lspt-kernels[sweep]')")
    from lspt_kernels.cli_helpers import UsageError
    with pytest.raises(UsageError, match="--submitit-param"):
        launchers.SubmititLauncher(tmp_path / "submitit", {"no_such_parameter": 1}, cluster="local")
