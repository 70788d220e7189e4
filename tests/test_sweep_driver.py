"""The sweep's loop with the fake trainer (fast): it runs every run once, skips finished runs on a rerun, resumes
interrupted ones after Ctrl-C, never runs one twice at once, retries a failure once, and shows its progress."""
import io
import json
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from sweep_helpers import FAKE_TRAINER, invocations, make_root, run_folders, snapshot, start_cli, sweep_args

from lspt_kernels.sweep import state
from lspt_kernels.sweep.cli import main
from lspt_kernels.sweep.driver import Progress, StatusLine
from lspt_kernels.sweep.plan import TRAINER_ENV, build_plan, claim_folder

EPOCHS = ["--", "--epochs", "3"]
RUNS = 2 * 2 * 2 + 2 * 2 * 2            # grid: methods x tasks x lr (1 wd); final: methods x tasks x seeds


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_root(tmp_path_factory.mktemp("vtab"), "vtab", {"caltech101": 0, "dtd": 1})


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setenv(TRAINER_ENV, FAKE_TRAINER)
    for knob in ("FAKE_EPOCH_S", "FAKE_FAIL_ONCE", "FAKE_FAIL_ALWAYS", "FAKE_DIVERGE"):
        monkeypatch.delenv(knob, raising=False)
    return monkeypatch


def _all_invocations(sweep):
    return {str(f.relative_to(sweep)): invocations(f) for f in run_folders(sweep)}


def test_every_run_once_and_a_rerun_skips_finished_runs(data, tmp_path, fake, capsys):
    out = tmp_path / "sweep"
    assert main(sweep_args(data, out, "--jobs", "2", *EPOCHS)) == 0
    first = capsys.readouterr().err
    runs = _all_invocations(out)
    assert len(runs) == RUNS and all(len(v) == 1 for v in runs.values())
    assert "all 16 runs finished" in first and first.count("\nchosen ") + first.startswith("chosen ") == 4
    selection = json.loads((out / "runs" / "caltech101" / "lspt" / "selection.json").read_text())
    assert selection["lr"] in (0.5, 2.0) and len(selection["grid"]) == 2
    before = snapshot(run_folders(out))
    assert main(sweep_args(data, out, "--jobs", "2", *EPOCHS)) == 0
    again = capsys.readouterr().err
    assert "start " not in again and "resume " not in again
    assert snapshot(run_folders(out)) == before


def test_a_failed_run_is_retried_once(data, tmp_path, fake, capsys):
    fake.setenv("FAKE_FAIL_ONCE", "caltech101/lspt/grid/lr0.5")
    out = tmp_path / "sweep"
    assert main(sweep_args(data, out, *EPOCHS)) == 0
    err = capsys.readouterr().err
    assert "FAILED caltech101/lspt/grid/lr0.5_wd0_seed42 (exit 1); trying it once more" in err
    assert "RuntimeError: fake crash for the test" in err
    assert [r["rc"] for r in invocations(out / "runs/caltech101/lspt/grid/lr0.5_wd0_seed42")] == [1, 0]


def test_a_run_that_fails_twice_is_given_up_and_its_cell_waits(data, tmp_path, fake, capsys):
    fake.setenv("FAKE_FAIL_ALWAYS", "caltech101/lspt/grid/lr0.5")
    out = tmp_path / "sweep"
    assert main(sweep_args(data, out, *EPOCHS)) == 1
    err = capsys.readouterr().err
    assert "failed again" not in err and "FAILED caltech101/lspt/grid/lr0.5_wd0_seed42 again (exit 1)" in err
    assert "no final runs for caltech101/lspt: 1 of 2 grid runs not finished" in err
    assert len(invocations(out / "runs/caltech101/lspt/grid/lr0.5_wd0_seed42")) == 2     # tried twice, no more
    assert not (out / "runs/caltech101/lspt/final").exists()
    assert len(list(out.glob("runs/*/*/final/*/" + state.DONE))) == 3 * 2                # the other cells finished
    fake.delenv("FAKE_FAIL_ALWAYS")
    assert main(sweep_args(data, out, *EPOCHS)) == 0                                     # fixed: a rerun completes
    assert len(list(out.glob("runs/*/*/final/*/" + state.DONE))) == 4 * 2


def test_a_diverged_grid_run_is_finished_but_never_chosen(data, tmp_path, fake, capsys):
    fake.setenv("FAKE_DIVERGE", "grid/lr2")
    out = tmp_path / "sweep"
    assert main(sweep_args(data, out, *EPOCHS)) == 0
    err = capsys.readouterr().err
    assert "diverged caltech101/lspt/grid/lr2_wd0_seed42: lspt-train: error: the training loss is nan" in err
    finals = sorted(p.parent.name for p in out.glob("runs/*/*/final/*/" + state.DONE))
    assert finals == ["lr0.5_wd0_seed42"] * 4 + ["lr0.5_wd0_seed44"] * 4
    assert all(len(v) == 1 for v in _all_invocations(out).values())                     # not retried


def test_a_run_locked_by_another_process_is_waited_for_not_run_twice(data, tmp_path, fake, capsys):
    out = tmp_path / "sweep"
    claim_folder(build_plan(out, data, ["caltech101", "dtd"], "lspt,gapt", "vit_tiny_patch16_224", None, "vpt-vtab",
                            "0.5,2", "0", "42,44", EPOCHS[1:]))      # the sweep's folder, as `run` makes it
    held = out / "runs/dtd/gapt/grid/lr2_wd0_seed42"
    lock = state.RunLock(held)
    assert lock.acquire()
    released = []
    timer = threading.Timer(1.5, lambda: (released.append(time.time()), lock.release()))
    timer.start()
    try:
        assert main(sweep_args(data, out, "--jobs", "2", *EPOCHS)) == 0
    finally:
        timer.join()
    assert "busy  dtd/gapt/grid/lr2_wd0_seed42: another process runs it" in capsys.readouterr().err
    attempts = [json.loads(line) for line in (held / "sweep.attempts.jsonl").read_text().splitlines()]
    assert len(attempts) == 1 and attempts[0]["start"] >= released[0]


def _wait(predicate, timeout=60.0):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


SLOW_RUN = "caltech101/gapt/grid/lr2_wd0_seed42"      # 2 s per epoch: surely mid-way when the test stops the sweep


def _mid_sweep(out):
    """Some runs finished, and the slow run in the middle of its epochs."""
    done = list(out.glob("runs/*/*/*/*/" + state.DONE))
    return len(done) >= 3 and len(state.read_log(out / "runs" / SLOW_RUN)) >= 1


def test_ctrl_c_then_the_same_command_completes_without_training_anything_twice(data, tmp_path):
    args = sweep_args(data, tmp_path / "cut", "--jobs", "2", "--", "--epochs", "4")
    proc = start_cli(args, LSPT_SWEEP_TRAINER=FAKE_TRAINER, FAKE_EPOCH_S="0.15", FAKE_SLOW=SLOW_RUN)
    try:
        _wait(lambda: _mid_sweep(tmp_path / "cut"))
        proc.send_signal(signal.SIGINT)
        printed, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, printed
    assert "interrupted: stopping" in printed and "run the same command again" in printed
    finished = [p.parent for p in (tmp_path / "cut").glob("runs/*/*/*/*/" + state.DONE)]
    interrupted = [f for f in run_folders(tmp_path / "cut") if (f / "resume.pt").exists() and f not in finished]
    assert finished and tmp_path / "cut" / "runs" / SLOW_RUN in interrupted
    before = snapshot(finished)
    again = start_cli(args, LSPT_SWEEP_TRAINER=FAKE_TRAINER)
    printed, _ = again.communicate(timeout=120)
    assert again.returncode == 0, printed
    assert snapshot(finished) == before                             # finished runs: not a byte touched
    for folder in run_folders(tmp_path / "cut"):
        calls = [c for c in invocations(folder) if c["start_epoch"] is not None]
        assert [c["resume"] for c in calls] == [False] + [True] * (len(calls) - 1), folder
        trained = sum((c["end_epoch"] or c["start_epoch"]) - c["start_epoch"] for c in calls)
        assert trained == 4, (folder, calls)                        # every epoch trained exactly once
    assert any(len(invocations(f)) == 2 for f in interrupted)
    whole = start_cli(sweep_args(data, tmp_path / "whole", "--jobs", "2", "--", "--epochs", "4"),
                      LSPT_SWEEP_TRAINER=FAKE_TRAINER)
    assert whole.wait(timeout=120) == 0
    for sweep in ("cut", "whole"):
        assert main(["report", str(tmp_path / sweep)]) == 0
    assert (tmp_path / "cut/report/report.csv").read_text() == (tmp_path / "whole/report/report.csv").read_text()


def test_two_sweeps_on_one_folder_run_each_run_once(data, tmp_path):
    args = sweep_args(data, tmp_path / "s", "--jobs", "2", *EPOCHS)
    env = dict(LSPT_SWEEP_TRAINER=FAKE_TRAINER, FAKE_EPOCH_S="0.1")
    first = start_cli(args, **env)
    try:
        _wait(lambda: (tmp_path / "s" / "plan.json").exists())
        second = start_cli(args, **env)
        outs = [p.communicate(timeout=120)[0] for p in (first, second)]
    finally:
        first.kill()
    assert first.returncode == 0 and second.returncode == 0, outs
    runs = _all_invocations(tmp_path / "s")
    assert len(runs) == RUNS and all(len(v) == 1 for v in runs.values()), runs


def test_status_line_updates_in_place_on_a_terminal():
    tty = io.StringIO()
    line = StatusLine(tty, tty=True)
    line.update("sweep: 1/4 done")
    line.event("done  a/b/grid/x")
    line.update("sweep: 2/4 done")
    line.close()
    text = tty.getvalue()
    assert text == ("\r\x1b[Ksweep: 1/4 done" "\r\x1b[Kdone  a/b/grid/x\nsweep: 1/4 done" "\r\x1b[Ksweep: 2/4 done\n")
    plain = io.StringIO()
    line = StatusLine(plain, tty=False)
    line.update("sweep: 1/4 done")
    line.event("done  a/b/grid/x")
    line.update("sweep: 2/4 done")
    line.close()
    assert plain.getvalue() == "sweep: 1/4 done\ndone  a/b/grid/x\nsweep: 2/4 done\n"


def test_progress_line_counts_and_eta():
    p = Progress(total=10, done={"a", "b", "c", "d"}, diverged=1, failed={"x": {}}, walls=[60.0, 120.0])
    assert p.line(running=2, elsewhere=1, jobs=2) == ("sweep: 4/10 done (1 diverged), 2 running (+1 elsewhere), "
                                                      "1 failed, 2 left, ETA 3m00s")
    assert Progress(total=3).line(0, 0, 1).endswith("3 left, ETA -")


def test_sweep_output_is_plain_lines_when_not_a_terminal(data, tmp_path, fake, capsys):
    assert main(sweep_args(data, tmp_path / "s", *EPOCHS)) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err
    assert "sweep: 16/16 done, 0 running, 0 failed, 0 left, ETA -" in err.splitlines()


@pytest.mark.parametrize("jobs", ["0", "-1"])
def test_jobs_must_be_positive(data, tmp_path, fake, capsys, jobs):
    assert main(sweep_args(data, tmp_path / "s", "--jobs", jobs, *EPOCHS)) == 2
    assert "--jobs must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_dry_run_writes_nothing(data, tmp_path, fake, capsys):
    assert main(sweep_args(data, tmp_path / "s", "--dry-run", *EPOCHS)) == 0
    printed = capsys.readouterr().out
    assert "8 runs; final" in printed and "dry run: nothing was written" in printed
    assert not Path(tmp_path / "s").exists()


def test_a_run_stopped_from_outside_counts_as_a_failure(data, tmp_path, fake, capsys):
    """Exit 130 without the sweep's own Ctrl-C (someone signalled lspt-train): retried once, then reported."""
    fake.setenv(TRAINER_ENV, f"{sys.executable} -c 'import sys; sys.exit(130)'")
    assert main(sweep_args(data, tmp_path / "s", *EPOCHS, tasks="dtd", methods="gapt", lr_grid="1", seeds="42")) == 1
    err = capsys.readouterr().err
    assert "lspt-train was stopped from outside the sweep (exit 130)" in err and "again (exit 130)" in err
