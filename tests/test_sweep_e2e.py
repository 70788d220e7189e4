"""lspt-sweep end to end with the real lspt-train on a tiny ViT (slow: minutes), and through submitit's local
executor. Their fast siblings (the same logic with the fake trainer) are in test_sweep_driver.py, and the
submitit one below."""
import json
import signal
import time

import pytest
from sweep_helpers import FAKE_TRAINER, TINY_TRAIN, make_root, run_folders, snapshot, start_cli, sweep_args

from lspt_kernels.sweep import state
from lspt_kernels.sweep.cli import main
from lspt_kernels.sweep.plan import TRAINER_ENV

EPOCHS = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_root(tmp_path_factory.mktemp("vtab"), "vtab", {"caltech101": 0, "dtd": 1})


def _attempts(folder):
    path = folder / "sweep.attempts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _wait(predicate, timeout):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.slow
def test_real_sweep_interrupted_and_rerun_equals_an_uninterrupted_one(data, tmp_path):
    """2 methods x 2 tasks x 2 lr x 1 wd, 2 seeds, --jobs 2, real lspt-train runs: SIGINT in the middle, the same
    command again, and the report is the one of an uninterrupted sweep; no finished run is touched and no epoch
    is trained twice (lspt-train's --resume is bit-exact on the CPU)."""
    train = ["--", *TINY_TRAIN, "--epochs", str(EPOCHS)]
    cut = sweep_args(data, tmp_path / "cut", "--jobs", "2", *train)
    proc = start_cli(cut)
    try:
        def middle():
            done = list((tmp_path / "cut").glob("runs/*/*/*/*/" + state.DONE))
            partial = [f for f in run_folders(tmp_path / "cut")
                       if not (f / state.DONE).exists() and len(state.read_log(f)) >= 1]
            return len(done) >= 2 and partial
        _wait(middle, 600)
        proc.send_signal(signal.SIGINT)
        printed, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130, printed[-3000:]
    finished = [p.parent for p in (tmp_path / "cut").glob("runs/*/*/*/*/" + state.DONE)]
    before = snapshot(finished)
    again = start_cli(cut)
    printed, _ = again.communicate(timeout=900)
    assert again.returncode == 0, printed[-3000:]
    assert snapshot(finished) == before
    folders = run_folders(tmp_path / "cut")
    assert len(folders) == 16
    resumed = 0
    for folder in folders:
        # lspt-train prints "epoch k/E ..." once an epoch is trained: over every attempt, each epoch once.
        printed_epochs = [line.split()[1] for line in (folder / state.LOG).read_text().splitlines()
                          if line.startswith("epoch ")]
        assert printed_epochs == [f"{k}/{EPOCHS}" for k in range(1, EPOCHS + 1)], folder
        assert [r["epoch"] for r in state.read_log(folder)] == list(range(1, EPOCHS + 1))
        resumed += any(a["resume"] for a in _attempts(folder))
    assert resumed >= 1                                 # some run was stopped mid-way and continued
    whole = start_cli(sweep_args(data, tmp_path / "whole", "--jobs", "2", *train))
    printed, _ = whole.communicate(timeout=900)
    assert whole.returncode == 0, printed[-3000:]
    for sweep in ("cut", "whole"):
        assert main(["report", str(tmp_path / sweep)]) == 0
    assert (tmp_path / "cut/report/report.csv").read_text() == (tmp_path / "whole/report/report.csv").read_text()
    md = (tmp_path / "cut/report/report.md").read_text()
    assert "| lspt | " in md and "| gapt | " in md and "(2/7)" in md


def _submitit_sweep(data, out, *train, lr_grid="0.5,2", **env):
    pytest.importorskip("submitit", reason="submitit is not installed (pip install 'lspt-kernels[sweep]')")
    proc = start_cli(sweep_args(data, out, "--launcher", "submitit", "--jobs", "2", "--timeout-min", "30", *train,
                                tasks="caltech101", methods="lspt", lr_grid=lr_grid, seeds="42"), **env)
    printed, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, printed[-3000:]
    assert "through submitit (local)" in printed
    return printed


def test_submitit_local_executor_runs_the_sweep(data, tmp_path):
    """The fast sibling: one grid run and one final run, each a submitit job running the fake trainer (a job
    still starts a Python process that imports torch, so this takes seconds)."""
    out = tmp_path / "s"
    _submitit_sweep(data, out, "--", "--epochs", "2", lr_grid="1", LSPT_SWEEP_TRAINER=FAKE_TRAINER)
    assert len(list(out.glob("runs/*/*/*/*/" + state.DONE))) == 2
    assert list((out / "submitit").glob("*_result.pkl"))                    # the runs went through submitit


@pytest.mark.slow
def test_submitit_local_executor_runs_the_real_sweep(data, tmp_path):
    out = tmp_path / "s"
    _submitit_sweep(data, out, "--", *TINY_TRAIN, "--epochs", "2")
    assert len(list(out.glob("runs/*/*/*/*/" + state.DONE))) == 3
    assert main(["report", str(out)]) == 0


def test_trainer_hook_reaches_the_runs(data, tmp_path, monkeypatch):
    """LSPT_SWEEP_TRAINER is what every run executes (here the fake: it leaves its own record)."""
    monkeypatch.setenv(TRAINER_ENV, FAKE_TRAINER)
    out = tmp_path / "s"
    assert main(sweep_args(data, out, "--", "--epochs", "1", tasks="dtd", methods="gapt", lr_grid="1",
                           seeds="42")) == 0
    assert all((f / "fake_invocations.jsonl").is_file() for f in run_folders(out))
