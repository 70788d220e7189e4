"""`lspt-sweep report` on crafted sweep folders: mean ± std over seeds, the chosen lr / wd, benchmark means, the
paper's numbers side by side where backbone and column match, and the four files."""
import csv
import io
import json
import statistics
from pathlib import Path

import pytest

from lspt_kernels.sweep import state
from lspt_kernels.sweep.cli import main
from lspt_kernels.sweep.plan import MethodSpec, Plan, TaskSpec, claim_folder
from lspt_kernels.sweep.protocols import FGVC_TASKS, PRESETS, Protocol
from lspt_kernels.sweep.report import collect

EPOCHS = 2


def _plan(root, backbone="mocov3", model="vit_base_patch16_224") -> Plan:
    base = PRESETS["vpt-fgvc"]
    protocol = Protocol(base.name, (1.0, 2.0), (0.0,), (42, 44, 82), base.splits, base.source)
    tasks = [TaskSpec(t, f"/data/{t}", "fgvc", "fgvc", None) for t in FGVC_TASKS]
    tasks += [TaskSpec("caltech101", "/data/caltech101", "vtab", "vtab", "Natural"),
              TaskSpec("my_scans", "/data/my_scans", "imagefolder", None, None)]
    methods = [MethodSpec("lspt", "lspt"), MethodSpec("gapt", "gapt"),
               MethodSpec("lspt:cspc=none", "lspt", {"cspc": "none"})]
    return Plan(Path(root), protocol, tasks, methods, model, "/ckpt/backbone.pth", ["--epochs", str(EPOCHS)], EPOCHS,
                backbone, backbone, "paper: test", trainer=("true",))


def _finish(run, acc, status="finished"):
    folder = Path(run.folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [dict(epoch=e, val_acc=acc + 10.0 * (e < EPOCHS), images_per_s=50.0, epoch_time_s=1.0)
            for e in range(1, EPOCHS + 1)]                         # the best epoch is not the last
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    state.write_marker(folder, status, dict(val_acc=acc, wall_s=30.0, train_s=2.0, images_per_s=50.0))


def _fill(plan, finals: dict, skip=()):
    """Grid: lr 2 scores 60 %, lr 1 scores 50 % (so lr 2 is chosen); final runs: the given accuracies per seed."""
    for task, method in plan.cells():
        if (task.name, method.label) in skip:
            continue
        for run in plan.grid_runs(task, method):
            _finish(run, 60.0 if run.lr == 2.0 else 50.0)
        accs = finals.get((task.name, method.label), [70.0, 71.0, 72.0])
        for run, acc in zip(plan.final_runs(task, method, 2.0, 0.0), accs):
            _finish(run, acc)


@pytest.fixture
def sweep(tmp_path):
    plan = _plan(tmp_path / "sweep")
    claim_folder(plan)
    _fill(plan, {("cub", "lspt"): [80.0, 82.0, 84.0], ("dogs", "gapt"): [60.0, 61.0]},
          skip={("my_scans", "gapt")})
    return plan


def test_task_cells_are_mean_and_sample_std_over_seeds_at_the_chosen_point(sweep):
    rows = collect(sweep)["rows"]
    cub = rows["lspt"]["cub"]
    assert (cub["lr"], cub["wd"], cub["val_acc"]) == (2.0, 0.0, 60.0)
    assert cub["accs"] == [80.0, 82.0, 84.0] and cub["mean"] == 82.0 and cub["std"] == pytest.approx(2.0)
    assert cub["status"] == ""
    dogs = rows["gapt"]["dogs"]                          # one of its three final runs has not finished
    assert dogs["n"] == 2 and dogs["status"] == "2 of 3 final runs finished"
    scans = rows["gapt"]["my_scans"]                     # its grid has not run at all
    assert scans["mean"] is None and scans["status"] == "2 of 2 grid runs not finished"


def test_benchmark_means_and_the_paper_side_by_side(sweep):
    data = collect(sweep)
    cols = [c["name"] for c in data["columns"]]
    assert cols == [*FGVC_TASKS, "FGVC mean", "caltech101", "Natural", "VTAB mean", "my_scans"]
    lspt = data["rows"]["lspt"]
    fgvc_mean = statistics.fmean([82.0] + [71.0] * 4)
    assert lspt["FGVC mean"]["mean"] == pytest.approx(fgvc_mean) and lspt["FGVC mean"]["complete"]
    assert lspt["FGVC mean"]["paper"] == 84.18 and lspt["FGVC mean"]["diff"] == pytest.approx(fgvc_mean - 84.18)
    assert (lspt["cub"]["paper"], lspt["cub"]["paper_source"]) == (84.29, "LSPT paper, table 1")
    assert lspt["cub"]["diff"] == pytest.approx(82.0 - 84.29)
    natural = lspt["Natural"]                             # 1 of its 7 tasks: shown, never compared
    assert (natural["mean"], natural["tasks"], natural["size"], natural["paper"]) == (71.0, 1, 7, None)
    assert lspt["caltech101"]["paper"] is None            # the paper gives VTAB group means only
    ablation = data["rows"]["lspt:cspc=none"]["cub"]
    assert (ablation["paper"], ablation["paper_source"]) == (78.12, "LSPT paper, table 3")


def test_no_paper_numbers_for_another_backbone(tmp_path):
    plan = _plan(tmp_path / "s", backbone=None)
    _fill(plan, {})
    data = collect(plan)
    assert all(cell["paper"] is None for row in data["rows"].values() for cell in row.values())


def test_report_files(sweep, capsys):
    assert main(["report", str(sweep.root)]) == 0
    printed = capsys.readouterr().out
    out = sweep.root / "report"
    md = (out / "report.md").read_text()
    assert printed.startswith(md) and "written: " in printed
    assert "| lspt | 82.00 ± 2.00 |" in md and "| gapt |" in md
    assert "82.00 ± 2.00 / 84.29 (-2.29)" in md                     # side by side with the difference
    assert "61.00 (2 seeds)" not in md and "60.50 ± 0.71 (2 seeds)" in md
    assert "71.00 (1/7)" in md and "lr 2, wd 0 (60.00)" in md
    assert "Sources: LSPT paper, table 1; LSPT paper, table 3." in md
    rows = list(csv.DictReader(io.StringIO((out / "report.csv").read_text())))
    assert len(rows) == 3 * 10
    cub = next(r for r in rows if r["method"] == "lspt" and r["column"] == "cub")
    assert (cub["mean"], cub["std"], cub["n"], cub["lr"], cub["paper"], cub["difference"]) == \
        ("82", "2", "3", "2", "84.29", "-2.29")
    data = json.loads((out / "report.json").read_text())
    assert data["rows"]["lspt"]["cub"]["accs"] == [80.0, 82.0, 84.0] and data["compute"]["runs"] > 0
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_of_a_folder_that_is_no_sweep(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "not a sweep folder (no plan.json)" in capsys.readouterr().err
