"""lspt-sweep's plan: which runs, with which lspt-train options, in which folders; every bad input is a clear error
before anything runs (nothing written)."""
import json
import sys

import pytest
import torch
from sweep_helpers import FAKE_TRAINER, make_root, sweep_args

from lspt_kernels.cli_helpers import UsageError
from lspt_kernels.sweep import plan as P
from lspt_kernels.sweep.cli import main


@pytest.fixture(scope="module")
def vtab_root(tmp_path_factory):
    return make_root(tmp_path_factory.mktemp("vtab"), "vtab", {"caltech101": 0, "vtab-dtd": 1})


@pytest.fixture(scope="module")
def fgvc_root(tmp_path_factory):
    return make_root(tmp_path_factory.mktemp("fgvc"), "fgvc", {"CUB_200_2011": 2, "my_birds": 3})


def _plan(root, out, tasks=("caltech101", "dtd"), methods="lspt,gapt", protocol="vpt-vtab", lr="0.5,2",
          wd="0,0.001", seeds="42,44", train_args=("--epochs", "3"), checkpoint=None, model="vit_tiny_patch16_224"):
    return P.build_plan(out, root, list(tasks), methods, model, checkpoint, protocol, lr, wd, seeds,
                        list(train_args))


def _opt(argv, name):
    return argv[argv.index(name) + 1]


def test_plan_has_every_grid_run_then_the_final_runs(vtab_root, tmp_path):
    plan = _plan(vtab_root, tmp_path / "sweep")
    assert plan.size() == (2 * 2 * 2 * 2, 2 * 2 * 2)          # methods x tasks x lr x wd; methods x tasks x seeds
    assert [t.name for t in plan.tasks] == ["caltech101", "dtd"] and plan.tasks[1].folder.endswith("vtab-dtd")
    task, method = plan.tasks[0], plan.methods[0]
    grid = plan.grid_runs(task, method)
    assert [(r.lr, r.wd, r.seed) for r in grid] == [(0.5, 0.0, 42), (0.5, 0.001, 42), (2.0, 0.0, 42), (2.0, 0.001, 42)]
    run = grid[1]
    assert run.run_id == "caltech101/lspt/grid/lr0.5_wd0.001_seed42"
    assert run.folder == str(tmp_path / "sweep" / "runs" / run.run_id)
    argv = list(run.argv)
    assert (_opt(argv, "--train-split"), _opt(argv, "--val-split"), _opt(argv, "--layout")) == ("train", "val", "vtab")
    assert (float(_opt(argv, "--lr")), float(_opt(argv, "--weight-decay")), _opt(argv, "--seed")) == (0.5, 0.001, "42")
    assert _opt(argv, "--output") == run.folder and argv[-2:] == ["--epochs", "3"] and run.epochs == 3
    finals = plan.final_runs(task, method, 2.0, 0.0)
    assert [r.seed for r in finals] == [42, 44]
    final = list(finals[0].argv)
    assert (_opt(final, "--train-split"), _opt(final, "--val-split")) == ("trainval", "test")
    assert not (tmp_path / "sweep").exists()                  # planning writes nothing


def test_fgvc_protocol_and_a_users_own_task(fgvc_root, tmp_path):
    plan = _plan(fgvc_root, tmp_path / "s", tasks=("cub", "my_birds"), protocol="vpt-fgvc")
    assert [(t.name, t.benchmark, t.group) for t in plan.tasks] == [("cub", "fgvc", None), ("my_birds", None, None)]
    final = list(plan.final_runs(plan.tasks[0], plan.methods[0], 1.0, 0.0)[0].argv)
    splits = (_opt(final, "--train-split"), _opt(final, "--val-split"), _opt(final, "--layout"))
    assert splits == ("train", "test", "fgvc")


def test_method_options_go_to_that_methods_runs_only(vtab_root, tmp_path):
    plan = _plan(vtab_root, tmp_path / "s", methods="lspt,lspt:cspc=none:lpc=none,vpt-deep")
    ablation = plan.methods[1]
    assert (ablation.method, ablation.options, ablation.folder) == ("lspt", {"cspc": "none", "lpc": "none"},
                                                                  "lspt+cspc=none+lpc=none")
    argv = list(plan.grid_runs(plan.tasks[0], ablation)[0].argv)
    assert _opt(argv, "--cspc") == "none" and _opt(argv, "--lpc") == "none"
    assert "--cspc" not in plan.grid_runs(plan.tasks[0], plan.methods[0])[0].argv


@pytest.mark.parametrize("kwargs, words", [
    (dict(tasks=("caltech101", "nonexistent_task")), ["--tasks nonexistent_task", "unknown task", "no folder"]),
    (dict(tasks=("caltech101", "cifar")), ["--tasks cifar", "no folder", "cifar100"]),
    (dict(lr="0.5,-1"), ["--lr-grid", "> 0", "-1"]),
    (dict(lr="0.5,0"), ["--lr-grid", "> 0"]),
    (dict(wd="0,-0.1"), ["--wd-grid", ">= 0"]),
    (dict(lr="0.5,abc"), ["--lr-grid", "'abc'", "not a number"]),
    (dict(seeds="42,42"), ["--seeds", "twice"]),
    (dict(lr="0.5,nan"), ["--lr-grid", "finite"]),
    (dict(methods="lspt,nonsense"), ["--methods", "nonsense", "gapt"]),
    (dict(methods="lspt:cspc"), ["--methods lspt:cspc", "KEY=VALUE"]),
    (dict(methods="lspt:bogus_option=1"), ["--methods lspt:bogus_option=1", "bogus_option", "not an lspt-train"]),
    (dict(protocol="vpt-imagenet"), ["--protocol", "vpt-vtab"]),
    (dict(train_args=("--lr", "3")), ["--lr is set by --lr-grid", "after --"]),
    (dict(train_args=("--seed", "1")), ["--seed is set by --seeds"]),
    (dict(train_args=("--resume",)), ["--resume is set by the sweep"]),
    (dict(train_args=("--outp", "x")), ["--output is set by --output"]),            # argparse's abbreviations too
    (dict(train_args=("--no-such-option",)), ["after --", "unrecognized arguments: --no-such-option"]),
    (dict(train_args=("--cspc", "kmeans")), ["--cspc (the options after --) applies to lspt only, not gapt",
                                             "lspt:cspc=kmeans"]),
    (dict(train_args=("--num-prompts", "5"), methods="lspt,linear"), ["--num-prompts", "linear has no prompts"]),
    (dict(checkpoint="/no/such/file.pth"), ["--checkpoint /no/such/file.pth", "no such file"]),
    (dict(checkpoint=__file__), ["--checkpoint", "not a PyTorch checkpoint"]),
])
def test_bad_input_is_refused_before_anything_runs(vtab_root, tmp_path, kwargs, words):
    with pytest.raises(UsageError) as err:
        _plan(vtab_root, tmp_path / "s", **kwargs)
    for word in words:
        assert word in str(err.value), (word, str(err.value))
    assert not (tmp_path / "s").exists()


def test_task_folder_without_the_split_files_is_refused(tmp_path):
    root = make_root(tmp_path / "data", "vtab", {"caltech101": 0, "dtd": 1})
    (root / "dtd" / "train800val200.txt").unlink()
    with pytest.raises(UsageError) as err:
        _plan(root, tmp_path / "s")
    text = str(err.value)
    assert "--tasks dtd" in text and "vpt-vtab" in text and "missing: trainval (train800val200.txt)" in text
    (root / "dtd" / "train800.txt").rename(root / "dtd" / "other.txt")
    (root / "dtd" / "val200.txt").unlink()
    (root / "dtd" / "test.txt").unlink()
    with pytest.raises(UsageError, match="--tasks dtd .*matches none of the layouts"):
        _plan(root, tmp_path / "s")


def test_cli_errors_name_the_option_and_write_nothing(vtab_root, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(sweep_args(vtab_root, out, tasks="caltech101,unknown_one")) == 2
    err = capsys.readouterr().err
    assert err.startswith("lspt-sweep: error: --tasks unknown_one: unknown task") and not out.exists()


def test_an_output_of_another_sweep_is_refused(vtab_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(P.TRAINER_ENV, FAKE_TRAINER)
    out = tmp_path / "s"
    assert main(sweep_args(vtab_root, out, "--", "--epochs", "1", lr_grid="1", seeds="42")) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(sweep_args(vtab_root, out, "--", "--epochs", "2", lr_grid="1", seeds="42")) == 2
    err = capsys.readouterr().err
    assert "holds another sweep" in err and 'train_args: saved ["--epochs", "1"], now ["--epochs", "2"]' in err
    assert main(sweep_args(vtab_root, out, "--", "--epochs", "1", lr_grid="1,2", seeds="42")) == 2
    assert "protocol: saved" in capsys.readouterr().err
    assert before == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_a_non_empty_folder_that_is_no_sweep_is_refused(vtab_root, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    plan = _plan(vtab_root, out)
    with pytest.raises(UsageError, match="not empty and holds no sweep"):
        P.claim_folder(plan)
    assert P.claim_folder(_plan(vtab_root, tmp_path / "new")) is True
    assert P.claim_folder(_plan(vtab_root, tmp_path / "new")) is False
    assert P.load_plan(tmp_path / "new").identity() == _plan(vtab_root, tmp_path / "new").identity()


@pytest.mark.parametrize("content, kind", [
    ({"model": {"pos_embed": torch.zeros(1)}}, "mae"),
    ({"state_dict": {"module.base_encoder.pos_embed": torch.zeros(1)}}, "mocov3"),
    ({"pos_embed": torch.zeros(1)}, "other"),
])
def test_backbone_kind_from_the_checkpoint_file(vtab_root, tmp_path, content, kind):
    ckpt = tmp_path / "backbone.pth"
    torch.save(content, ckpt)
    assert P.detect_backbone(str(ckpt)) == kind
    plan = _plan(vtab_root, tmp_path / "s", checkpoint=str(ckpt), model="vit_base_patch16_224", train_args=())
    assert plan.backbone == kind and plan.paper_backbone == (kind if kind != "other" else None)
    tiny = _plan(vtab_root, tmp_path / "s", checkpoint=str(ckpt))           # the paper's tables are ViT-B/16
    assert tiny.paper_backbone is None
    assert ("vit_base_patch16_224" if kind != "other" else "MAE / MoCo v3") in tiny.paper_note


def test_trainer_command_default_and_hook(monkeypatch):
    monkeypatch.delenv(P.TRAINER_ENV, raising=False)
    assert P.trainer_command() == (sys.executable, "-m", "lspt_kernels.train")
    monkeypatch.setenv(P.TRAINER_ENV, "python3 'my trainer.py' --flag")
    assert P.trainer_command() == ("python3", "my trainer.py", "--flag")


def test_format_number_is_exact():
    assert [P.format_number(x) for x in (5.0, 0.0001, 50.0, 0.25, 1e-5)] == ["5", "0.0001", "50", "0.25", "1e-05"]
    assert float(P.format_number(0.1234567891)) == 0.1234567891


def test_plan_json_holds_the_identity(vtab_root, tmp_path):
    plan = _plan(vtab_root, tmp_path / "s")
    P.claim_folder(plan)
    saved = json.loads((tmp_path / "s" / "plan.json").read_text())
    assert saved["identity"]["methods"] == ["lspt", "gapt"] and saved["identity"]["train_args"] == ["--epochs", "3"]
    assert saved["identity"]["protocol"]["lrs"] == [0.5, 2.0] and saved["epochs"] == 3


def test_workload_counts_the_images_every_run_trains_and_evaluates(vtab_root, tmp_path):
    plan = _plan(vtab_root, tmp_path / "s")             # 2 methods, 2 tasks, 2 x 2 grid points, 2 seeds, 3 epochs
    sizes = plan.tasks[0].sizes
    assert sizes == {"train": 16, "val": 12, "trainval": 28, "test": 12}
    per_task_train = 4 * 3 * 16 + 2 * 3 * 28
    per_task_eval = 4 * 3 * 12 + 2 * 3 * 12
    assert plan.workload() == (2 * 2 * per_task_train, 2 * 2 * per_task_eval)
