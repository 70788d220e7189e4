"""One run's life under the sweep (launchers.execute_run with the fake trainer): its lock, its done / diverged
markers, resume, and what a failure reports."""
import json
import shlex
import threading
import time
from pathlib import Path

import pytest
from sweep_helpers import FAKE_TRAINER, invocations

from lspt_kernels.sweep import state
from lspt_kernels.sweep.launchers import ATTEMPTS, execute_run
from lspt_kernels.sweep.plan import RunSpec


def _spec(tmp_path, epochs=3, trainer=None, name="run") -> RunSpec:
    folder = tmp_path / name
    argv = ("--data", "/data/caltech101", "--method", "lspt", "--lr", "1.0", "--weight-decay", "0.0", "--seed", "42",
            "--val-split", "val", "--output", str(folder), "--epochs", str(epochs))
    return RunSpec(f"caltech101/lspt/grid/{name}", str(folder), argv, tuple(shlex.split(trainer or FAKE_TRAINER)),
                   epochs, "grid", "caltech101", "lspt", 1.0, 0.0, 42)


def test_a_finished_run_gets_its_marker_and_is_not_run_again(tmp_path):
    spec = _spec(tmp_path)
    out = execute_run(spec)
    assert out["status"] == "finished" and out["epochs"] == 3
    done = json.loads((Path(spec.folder) / state.DONE).read_text())
    assert done["status"] == "finished" and done["val_acc"] == state.last_epoch_acc(spec.folder, 3)
    assert done["wall_s"] > 0 and done["images_per_s"] == 102.0
    again = execute_run(spec)
    assert again["already"] and again["status"] == "finished"
    assert len(invocations(spec.folder)) == 1


def test_a_run_with_resume_state_is_resumed(tmp_path, monkeypatch):
    spec = _spec(tmp_path, epochs=4)
    short = _spec(tmp_path, epochs=2)                     # the same folder, stopped after epoch 2
    execute_run(short)
    (Path(spec.folder) / state.DONE).unlink()
    out = execute_run(spec)
    assert out["status"] == "finished"
    runs = invocations(spec.folder)
    assert [(r["resume"], r["start_epoch"], r["end_epoch"]) for r in runs] == [(False, 0, 2), (True, 2, 4)]
    assert [r["epoch"] for r in state.read_log(spec.folder)] == [1, 2, 3, 4]
    attempts = [json.loads(line) for line in (Path(spec.folder) / ATTEMPTS).read_text().splitlines()]
    assert [a["resume"] for a in attempts] == [False, True]


def test_a_run_stopped_before_its_first_state_starts_afresh(tmp_path):
    spec = _spec(tmp_path)
    folder = Path(spec.folder)
    folder.mkdir()
    (folder / "config.json").write_text("{}")           # lspt-train writes this just before resume.pt
    assert execute_run(spec)["status"] == "finished"
    assert [r["resume"] for r in invocations(folder)] == [False]


def test_a_held_lock_means_busy_and_nothing_starts(tmp_path):
    spec = _spec(tmp_path)
    lock = state.RunLock(spec.folder)
    assert lock.acquire()
    try:
        assert execute_run(spec) == dict(status="busy")
        assert state.is_locked(spec.folder)
    finally:
        lock.release()
    assert not state.is_locked(spec.folder) and invocations(spec.folder) == []


def test_the_lock_is_held_while_the_run_trains(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_EPOCH_S", "0.3")
    spec = _spec(tmp_path)
    t = threading.Thread(target=execute_run, args=(spec,))
    t.start()
    deadline = time.time() + 20
    while not invocations(spec.folder) and not (Path(spec.folder) / "log.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert state.is_locked(spec.folder)
    t.join(30)
    assert not state.is_locked(spec.folder) and state.marker(spec.folder)["status"] == "finished"


def test_a_failed_run_reports_its_last_lines_and_gets_no_marker(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL_ALWAYS", "run")
    spec = _spec(tmp_path)
    out = execute_run(spec)
    assert out["status"] == "failed" and out["rc"] == 1
    assert out["tail"][-1] == "RuntimeError: fake crash for the test"
    assert state.marker(spec.folder) is None
    assert "=== lspt-sweep attempt" in (Path(spec.folder) / state.LOG).read_text()


def test_a_diverged_run_is_marked_diverged(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_DIVERGE", "run")
    spec = _spec(tmp_path)
    out = execute_run(spec)
    assert out["status"] == "diverged" and "the training loss is nan" in out["message"]
    assert state.marker(spec.folder)["status"] == "diverged"


@pytest.mark.parametrize("trainer", ["true", "python -c 'import sys; sys.exit(0)'"])
def test_exit_0_without_every_epoch_logged_is_a_failure(tmp_path, trainer):
    spec = _spec(tmp_path, trainer=trainer)
    out = execute_run(spec)
    assert out["status"] == "failed" and "log.jsonl holds epochs []" in out["tail"][0]
    assert state.marker(spec.folder) is None


def test_log_tail_is_the_latest_attempt(tmp_path):
    (tmp_path / state.LOG).write_text("=== lspt-sweep attempt 1\nold\n=== lspt-sweep attempt 2\nnew 1\nnew 2\n")
    assert state.log_tail(tmp_path) == ["new 1", "new 2"]


@pytest.mark.parametrize("line", [
    "lspt-train: error: the training loss is nan at epoch 3",
    "lspt-train: error: the training loss is -inf at epoch 3",
    "lspt-train: error: the run diverged: the tuned parameters ['head.weight'] hold NaN or inf after epoch 2",
])
def test_both_divergence_messages_of_lspt_train_are_recognised(line):
    from lspt_kernels.sweep.launchers import DIVERGED_MESSAGE
    assert DIVERGED_MESSAGE.search(line)
    assert not DIVERGED_MESSAGE.search("lspt-train: error: cannot read image x.png")
