"""The protocol's choice of lr / weight decay, on crafted grid results and crafted run folders."""
import json
from pathlib import Path

import pytest

from lspt_kernels.sweep import state
from lspt_kernels.sweep.plan import RunSpec
from lspt_kernels.sweep.selection import GridPoint, cell_selection, select


@pytest.mark.parametrize("points, chosen", [
    ([(1.0, 0.0, 80.0), (0.5, 0.0, 80.0), (2.0, 0.0, 70.0)], (0.5, 0.0)),      # a tie goes to the smaller lr
    ([(0.5, 0.0, 80.0), (0.5, 0.01, 80.0), (0.5, 0.001, 79.0)], (0.5, 0.01)),  # same lr: the larger wd
    ([(50.0, 0.0, 90.0), (0.1, 0.0, 89.99)], (50.0, 0.0)),                      # the best wins over a small lr
    ([(5.0, 0.0, None), (0.1, 0.0, 30.0)], (0.1, 0.0)),                         # a diverged run is never chosen
])
def test_select(points, chosen):
    best = select([GridPoint(*p) for p in points])
    assert (best.lr, best.wd) == chosen
    assert best.diverged == sum(p[2] is None for p in points)


def test_select_when_every_run_diverged():
    assert select([GridPoint(1.0, 0.0, None), GridPoint(2.0, 0.0, None)]) is None


def _run(tmp_path, lr, wd, epochs=3) -> RunSpec:
    folder = tmp_path / f"lr{lr}_wd{wd}"
    folder.mkdir()
    return RunSpec(f"t/m/grid/lr{lr}_wd{wd}", str(folder), (), ("true",), epochs, "grid", "t", "m", lr, wd, 42)


def _finish(run: RunSpec, accs):
    rows = [dict(epoch=i + 1, val_acc=a) for i, a in enumerate(accs)]
    (Path(run.folder) / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    state.write_marker(run.folder, "finished", dict(val_acc=accs[-1]))


def test_the_last_epoch_counts_not_the_best(tmp_path):
    peaky, steady = _run(tmp_path, 1.0, 0.0), _run(tmp_path, 2.0, 0.0)
    _finish(peaky, [50.0, 95.0, 60.0])          # best epoch 95 %, last epoch 60 %
    _finish(steady, [50.0, 70.0, 70.0])
    chosen, why = cell_selection([peaky, steady])
    assert (chosen.lr, chosen.acc, why) == (2.0, 70.0, "")


def test_nothing_is_chosen_before_every_grid_run_finished(tmp_path):
    a, b, c = _run(tmp_path, 1.0, 0.0), _run(tmp_path, 2.0, 0.0), _run(tmp_path, 5.0, 0.0)
    _finish(a, [10.0, 20.0, 30.0])
    state.write_marker(c.folder, "diverged", dict(message="the training loss is nan"))
    (tmp_path / "lr2.0_wd0.0" / "log.jsonl").write_text(json.dumps(dict(epoch=1, val_acc=99.0)) + "\n")
    assert cell_selection([a, b, c]) == (None, "1 of 3 grid runs not finished")
    _finish(b, [99.0, 10.0, 5.0])
    chosen, _ = cell_selection([a, b, c])
    assert (chosen.lr, chosen.acc, chosen.diverged) == (1.0, 30.0, 1)
