"""lspt-sweep's presets and task names (as the official scripts and data preparations have them) and the paper's
numbers it carries."""
import statistics

import pytest

from lspt_kernels.sweep import paper
from lspt_kernels.sweep.cli import build_parser
from lspt_kernels.sweep.protocols import FGVC_TASKS, PRESETS, SPLITS, TASK_SETS, VTAB_GROUPS, standard_task


def test_presets_are_the_official_grids():
    vtab, fgvc, gapt = PRESETS["vpt-vtab"], PRESETS["vpt-fgvc"], PRESETS["gapt"]
    assert vtab.lrs == (5.0, 2.5, 1.0, 50.0, 25.0, 10.0, 0.5, 0.25, 0.1, 0.05)
    assert vtab.wds == fgvc.wds == (0.01, 0.001, 0.0001, 0.0)
    assert vtab.seeds == fgvc.seeds == (42, 44, 82, 100, 800)
    assert fgvc.lrs == tuple(lr for lr in vtab.lrs if lr != 0.05)
    assert sorted(gapt.lrs) == [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0] and gapt.wds == (0.0,) and gapt.seeds == (42,)


@pytest.mark.parametrize("name, layout, select, final", [
    ("vpt-vtab", "vtab", ("train", "val"), ("trainval", "test")),
    ("vpt-fgvc", "fgvc", ("train", "val"), ("train", "test")),
    ("gapt", "vtab", ("train", "val"), ("trainval", "test")),
    ("gapt", "fgvc", ("train", "val"), ("train", "test")),
    ("gapt", "imagefolder", ("train", "val"), ("train", "test")),
])
def test_split_pairs(name, layout, select, final):
    assert PRESETS[name].split_pairs(layout) == dict(select=select, final=final)
    assert set(SPLITS) == {"vtab", "fgvc"}


def test_run_help_prints_each_preset_with_its_source(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    text = capsys.readouterr().out
    for p in PRESETS.values():
        assert f"{p.name}: lr" in text
    assert "tune_vtab.py" in text and "tune_fgvc.py" in text and "run.sh" in text and "batch / 256" in text


def test_vtab_has_the_standard_19_tasks_in_3_groups():
    assert [len(v) for v in VTAB_GROUPS.values()] == [7, 4, 8]
    assert len(set(TASK_SETS["vtab"])) == 19 and len(FGVC_TASKS) == 5


@pytest.mark.parametrize("given, name, group, folder", [
    ("caltech101", "caltech101", "Natural", "vtab-caltech101"),        # VPT's DATA.NAME spelling as a folder
    ("cifar100", "cifar", "Natural", "cifar"),                           # NOAH's script name -> its folder name
    ("dsprites_loc", "dsprites_loc", "Structured", "dsprites_loc"),
    ("CUB", "cub", None, "cub_200_2011"),
    ("StanfordCars", "cars", None, "stanfordcars"),
    ("my_scans", "my_scans", None, "my_scans"),                          # a user's own task: no group
])
def test_standard_task_names_and_folders(given, name, group, folder):
    task = standard_task(given)
    assert (task.name, task.group) == (name, group) and folder in task.folder_names


def test_paper_means_agree_with_the_paper_tasks():
    """The copied numbers are consistent with themselves: FGVC's mean is the mean of its 5 datasets, VTAB's the
    task-weighted (7 / 4 / 8) mean of its groups, as the paper's tables have them (to their rounding)."""
    for backbone, methods in paper.PAPER.items():
        for method, cols in methods.items():
            if "cub" in cols:
                mean = statistics.fmean(cols[t][0] for t in FGVC_TASKS)
                assert abs(mean - cols["FGVC mean"][0]) <= 0.011, (backbone, method)
            if "Natural" in cols:
                weighted = sum(cols[g][0] * len(ts) for g, ts in VTAB_GROUPS.items()) / 19
                assert abs(weighted - cols["VTAB mean"][0]) <= 0.011, (backbone, method)


@pytest.mark.parametrize("backbone, method, options, column, expected", [
    ("mae", "lspt", {}, "cub", (73.86, "LSPT paper, table 1")),
    ("mocov3", "gapt", {}, "Structured", (49.10, "LSPT paper, table 2")),
    ("mocov3", "lspt", {"cspc": "none"}, "cub", (78.12, "LSPT paper, table 3")),
    ("mocov3", "lspt", {"cspc": "none", "lpc": "none"}, "Natural", (67.34, "LSPT paper, table 3")),
    ("mae", "lspt", {"cspc": "none"}, "cub", None),                    # table 3 is MoCo v3 only
    ("mocov3", "lspt", {"lstm_layers": "2"}, "cub", None),             # no published number for this variant
    ("mae", "linear", {}, "cub", None),                                # table 1 has no linear row
    ("other", "lspt", {}, "cub", None),
    ("mocov3", "lspt", {}, "caltech101", None),                        # the paper gives VTAB group means only
])
def test_paper_value(backbone, method, options, column, expected):
    assert paper.paper_value(backbone, method, options, column) == expected
