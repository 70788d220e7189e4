"""lspt-train / lspt-eval / lspt-viz on segmentation data (tests/synth_seg.py, a tiny random ViT, CPU): the
task and its defaults, the stages, end to end (train a few iterations, eval single- and multi-scale, saved
predictions that score exactly what lspt-eval prints, viz's overlays), resume bit-exact against an
uninterrupted run, DDP on 2 processes, and bad input as clear errors."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from synth_data import write_dataset as write_classification_dataset
from synth_seg import write_dataset

from lspt_kernels import cli_helpers
from lspt_kernels import evaluate as lspt_eval
from lspt_kernels import train as lspt_train
from lspt_kernels import viz as lspt_viz
from lspt_kernels.seg import (
    EvalTransform,
    InferenceConfig,
    IoUAccumulator,
    SegmentationDataset,
    SegmentationModel,
    evaluate,
    load_segmentation_dataset,
)
from lspt_kernels.seg.data import read_label_map

TINY = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "patch_size=8", "embed_dim=32", "depth=3", "num_heads=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("seg") / "data", "generic", 32, {"train": 16, "val": 4})


def _args(data, out, *extra, method="lspt", iters=6):
    return ["--data", str(data), *TINY, "--method", method, "--crop-size", "32", "--head-channels", "8",
            "--iters", str(iters), "--eval-interval", "3", "--batch-size", "4", "--lr", "0.01", "--workers", "0",
            "--device", "cpu", "--output", str(out), *extra]


def _log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def _parse(argv):
    return lspt_train.build_parser().parse_args(argv)


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A finished 6-iteration run, validated after iterations 3 and 6 (left unchanged by the tests)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert lspt_train.main(_args(data, out)) == 0
    return out


# --- the task and its defaults -------------------------------------------------------------------------
def test_segmentation_is_detected_with_the_protocol_defaults(data, tmp_path):
    args = _parse(["--data", str(data), *TINY, "--method", "gapt", "--output", str(tmp_path)])
    assert args.task == "segmentation"
    assert (args.iters, args.eval_interval, args.crop_size, args.batch_size) == (160_000, 16_000, 512, 16)
    assert (args.lr, args.head_lr_mult, args.min_lr, args.poly_power) == (0.001, 10.0, 1e-4, 0.9)
    assert (args.momentum, args.weight_decay, args.head_channels, args.ignore_index) == (0.9, 0.0, 256, 255)
    assert args.epochs is None and args.warmup_epochs is None


def test_classification_keeps_its_defaults(tmp_path):
    root = write_classification_dataset(tmp_path / "cls", "imagefolder", size=32, per_class=1)
    args = _parse(["--data", str(root), *TINY, "--method", "gapt", "--output", str(tmp_path / "o")])
    assert args.task == "classification"
    assert (args.epochs, args.warmup_epochs, args.lr, args.batch_size) == (100, 10, 0.4, 64)
    assert args.iters is None and args.crop_size is None


# --- the stages ----------------------------------------------------------------------------------------
def test_setup_builds_a_segmentation_run_and_writes_nothing(data, tmp_path):
    run = lspt_train.setup(_parse(_args(data, tmp_path / "out", "--seed", "3")))
    assert isinstance(run.module, SegmentationModel) and run.encoder is run.module.encoder
    assert run.module.num_classes == 4 and run.module.channels == 8 and run.scheduler is None
    assert run.encoder.vit.dynamic_img_size and tuple(run.encoder.vit.patch_embed.img_size) == (32, 32)
    encoder, heads = run.optimizer.param_groups
    assert (encoder["base_lr"], heads["base_lr"], encoder["momentum"]) == (0.01, 0.1, 0.9)
    assert run.record["stride"] == 21 and run.record["scale"] == [128, 32] and run.record["reduce_zero_label"] is False
    assert run.identity["task"] == "segmentation" and run.identity["encoder"]["task"] == "segmentation"
    assert run.effective_lr == 0.01                            # not scaled by the batch, as SETR's configs
    assert (len(run.train_ds), len(run.val_ds), run.val_loader, run.sampler) == (16, 4, None, None)
    assert list((tmp_path / "out").iterdir()) == []


def test_a_round_runs_to_the_next_evaluation_iteration(data, tmp_path, monkeypatch):
    steps = []
    monkeypatch.setattr(lspt_train, "_on_step", lambda position, step, loss: steps.append((position, step)))
    run = lspt_train.setup(_parse(_args(data, tmp_path / "out", iters=5)))
    lspt_train.resume(run)
    lspt_train.wrap_model(run)
    assert [run.task.round_end(p) for p in (0, 3, 4)] == [3, 5, 5]
    stats = lspt_train.train_one_epoch(run, 3)                 # iterations 4 and 5 (the last round is short)
    assert steps == [(3, 0), (3, 1)]
    assert stats["lr"] == pytest.approx((0.01 - 1e-4) * (1 - 4 / 5) ** 0.9 + 1e-4)     # iteration 5's poly lr
    assert 0 <= stats["train_acc"] <= 100 and math.isfinite(stats["train_loss"]) and run.module.training


def test_validate_is_lspt_evals_single_scale_miou(data, tmp_path):
    run = lspt_train.setup(_parse(_args(data, tmp_path / "out")))
    val = EvalTransform(run.record["mean"], run.record["std"])
    spec = load_segmentation_dataset(data)
    expected = evaluate(run.module, SegmentationDataset.from_spec(spec, "val", val),
                        InferenceConfig(crop_size=32, stride=21, scale=(128, 32)))
    assert lspt_train.validate(run) == 100 * expected["mIoU"]


# --- end to end ----------------------------------------------------------------------------------------
def test_train_writes_the_log_files_and_heads(finished, capsys):
    rows = _log(finished)
    assert [r["iteration"] for r in rows] == [3, 6]
    assert set(rows[0]) == {"iteration", "train_loss", "train_acc", "val_miou", "lr", "images_per_s", "peak_memory_gb",
                            "time_s"}
    assert rows[-1]["lr"] == pytest.approx((0.01 - 1e-4) * (1 / 6) ** 0.9 + 1e-4)          # iteration 6's
    config = json.loads((finished / "config.json").read_text())
    assert config["task"] == "segmentation" and config["iters"] == 6 and "epochs" not in config
    tensors = load_file(str(finished / "last.safetensors"))
    assert {k.split(".")[0] for k in tensors} == {"encoder", "decode_head", "aux_heads"}
    assert "decode_head.convs.0.1.running_mean" in tensors and "encoder.prompts" in tensors
    _, record = cli_helpers.train_record(finished / "best.safetensors")
    best = max(rows, key=lambda r: r["val_miou"])
    assert (record["iteration"], record["val_miou"]) == (best["iteration"], best["val_miou"])
    assert (finished / "curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("method", ["vpt-shallow", "vpt-deep", "gapt", "adapter", "linear"])
def test_every_method_trains_and_evaluates(data, tmp_path, capsys, method):
    out = tmp_path / method
    assert lspt_train.main(_replace(_args(data, out, method=method, iters=2), "--eval-interval", "2")) == 0
    logged = _log(out)[-1]["val_miou"]
    capsys.readouterr()
    assert lspt_eval.main(["--data", str(data), "--tuned", str(out / "last.safetensors")]) == 0
    assert f": mIoU {logged:.2f}%" in capsys.readouterr().out.splitlines()[0]


def test_eval_single_scale_reproduces_the_logged_miou(data, finished, capsys):
    best = max(_log(finished), key=lambda r: r["val_miou"])
    assert lspt_eval.main(["--data", str(data), "--tuned", str(finished / "best.safetensors")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.match(rf"lspt on \S+ \[val\], single-scale \(4 images; window 32, stride 21, scale \(128, 32\)\): mIoU "
                    rf"{best['val_miou']:.2f}%  aAcc \d+\.\d\d%  mAcc \d+\.\d\d%$", lines[0]), lines[0]
    assert lines[2].split() == ["class", "IoU", "Acc"] and [line.split()[0] for line in lines[3:]] == ["0", "1", "2",
                                                                                                      "3"]


def test_eval_multi_scale_and_saved_predictions_score_what_it_prints(data, finished, tmp_path, capsys):
    """--multi-scale is SETR's MS + flip, and --save-predictions writes label maps named as the images whose
    scores (any tool's: here an accumulator over the PNGs and the annotations) are the printed ones."""
    tuned, pred_dir = finished / "best.safetensors", tmp_path / "pred"
    assert lspt_eval.main(["--data", str(data), "--tuned", str(tuned), "--multi-scale", "--save-predictions",
                           str(pred_dir)]) == 0
    out = capsys.readouterr().out
    printed = float(re.search(r"multi-scale \+ flip .*: mIoU (\d+\.\d\d)%", out).group(1))
    model, _, record = cli_helpers.rebuild_model(tuned)
    spec = load_segmentation_dataset(data)
    val = SegmentationDataset.from_spec(spec, "val", EvalTransform(record["mean"], record["std"]))
    ms = evaluate(model, val, InferenceConfig.multi_scale(crop_size=32, stride=21, scale=(128, 32)))
    assert printed == round(100 * ms["mIoU"], 2)
    assert sorted(p.name for p in pred_dir.iterdir()) == ["000.png", "001.png", "002.png", "003.png"]
    meter = IoUAccumulator(4)
    for image, label in spec.splits["val"]:
        pred = read_label_map(pred_dir / Path(image).name)
        assert pred.shape == read_label_map(label).shape and pred.max() < 4
        meter.update(torch.from_numpy(pred), torch.from_numpy(read_label_map(label)))
    assert meter.compute()["mIoU"] == pytest.approx(ms["mIoU"], abs=1e-12)
    assert f"predictions: 4 PNG label maps in {pred_dir} (the model's class indices 0..3)" in out


def test_ade20k_layout_writes_the_models_class_indices(tmp_path, capsys):
    """reduce_zero_label (ADE20K): the predictions hold the model's classes 0..149, not the files' 1..150;
    named as the images (.jpg -> .png)."""
    root = write_dataset(tmp_path / "ade", "ade20k", 32, {"train": 4, "val": 2})
    out = tmp_path / "run"
    assert lspt_train.main(_args(root, out, "--eval-interval", "1", iters=1)) == 0
    tuned = out / "last.safetensors"
    assert cli_helpers.train_record(tuned)[1]["classes"][:2] == ["wall", "building"]
    assert lspt_eval.main(["--data", str(root), "--tuned", str(tuned), "--save-predictions", str(tmp_path / "p")]) == 0
    assert "reduce_zero_label: class k is label k + 1" in capsys.readouterr().out
    model, _, record = cli_helpers.rebuild_model(tuned)
    spec = load_segmentation_dataset(root, splits=["val"])
    for i, (image, _) in enumerate(spec.splits["val"]):
        saved = read_label_map(tmp_path / "p" / (Path(image).stem + ".png"))
        x = SegmentationDataset.from_spec(spec, "val", EvalTransform(record["mean"], record["std"]))[i]["image"]
        assert np.array_equal(saved, lspt_viz.predict_mask(model, x, InferenceConfig.for_crop(32)).numpy())


def test_viz_overlays_each_files_mask(finished, data, tmp_path, capsys):
    images = [str(data / "images" / "val" / f"00{i}.png") for i in (0, 1)]
    argv = ["--tuned", str(finished / "best.safetensors"), "--tuned", str(finished / "last.safetensors"),
            "--output", str(tmp_path / "viz")]
    assert lspt_viz.main(argv + [a for f in images for a in ("--image", f)]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "viz" / n) for n in
                                               ("000_segmentation.png", "001_segmentation.png", "summary.json")]
    assert (tmp_path / "viz" / "000_segmentation.png").read_bytes()[:4] == b"\x89PNG"
    results = json.loads((tmp_path / "viz" / "summary.json").read_text())["results"]
    assert [(r["label"], Path(r["image"]).name) for r in results] == [
        ("lspt (best)", "000.png"), ("lspt (last)", "000.png"), ("lspt (best)", "001.png"), ("lspt (last)", "001.png")]
    model, _, record = cli_helpers.rebuild_model(finished / "best.safetensors")
    from lspt_kernels.data import open_image
    from lspt_kernels.seg.data import normalize
    mask = lspt_viz.predict_mask(model, normalize(np.array(open_image(images[1])), record["mean"], record["std"]))
    shares = torch.bincount(mask.flatten(), minlength=4).double() / mask.numel()
    assert results[2]["class_shares"] == {str(k): float(shares[k]) for k in range(4) if shares[k] > 0}


# --- resume ---------------------------------------------------------------------------------------------
def test_resume_after_ctrl_c_is_bit_exact(data, finished, tmp_path, monkeypatch, capsys):
    """Interrupted in its second round (iterations 4-6), resumed: the same parameters, BatchNorm statistics and
    log as the uninterrupted run; the crops come from a worker process in both."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert lspt_train.main(_args(data, full, "--workers", "1")) == 0

    def interrupt(position, step, loss):
        if position == 3 and step == 1:
            raise KeyboardInterrupt
    monkeypatch.setattr(lspt_train, "_on_step", interrupt)
    assert lspt_train.main(_args(data, cut, "--workers", "1")) == 130
    err = capsys.readouterr().err
    assert "interrupted in iterations 4-6" in err and "state after iteration 3" in err and "--resume" in err
    monkeypatch.setattr(lspt_train, "_on_step", None)
    assert lspt_train.main(_args(data, cut, "--workers", "1", "--resume")) == 0
    assert "resuming" in capsys.readouterr().out
    a, b = load_file(str(full / "last.safetensors")), load_file(str(cut / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in ("images_per_s", "peak_memory_gb", "time_s")} for r in rows]
    assert strip(_log(full)) == strip(_log(cut))


def test_resume_with_another_eval_interval_continues_at_the_saved_iteration(data, finished, tmp_path, capsys):
    import shutil
    out = shutil.copytree(finished, tmp_path / "run")
    argv = _args(data, out, "--resume", iters=8)
    argv[argv.index("--eval-interval") + 1] = "4"
    assert lspt_train.main(argv) == 0
    assert "changed settings iters 6 -> 8, eval_interval 3 -> 4" in capsys.readouterr().err
    assert [r["iteration"] for r in _log(out)] == [3, 6, 8]


def test_grad_checkpointing_trains_to_the_same_tensors(data, finished, tmp_path):
    """--grad-checkpointing recomputes the blocks in backward: memory, not results, changes."""
    assert lspt_train.main(_args(data, tmp_path / "gc", "--grad-checkpointing")) == 0
    a, b = load_file(str(finished / "last.safetensors")), load_file(str(tmp_path / "gc" / "last.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_ddp_two_cpu_processes(data, tmp_path):
    """torchrun, 2 processes (gloo): each trains its half of every batch (BatchNorm per process on the CPU),
    both validate half the images with rank 0's statistics, and the file evaluates to the logged mIoU."""
    out = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "lspt_kernels.train", *_args(data, out, iters=4)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    port_lost = ("Address already in use", "EADDRINUSE", "DistNetworkError", "RendezvousConnectionError")
    if res.returncode != 0 and any(p in res.stdout + res.stderr for p in port_lost):   # see test_train's DDP test
        import shutil
        shutil.rmtree(out, ignore_errors=True)
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("best val mIoU") == 1
    rows = _log(out)
    assert [r["iteration"] for r in rows] == [3, 4] and json.loads((out / "config.json").read_text())["world_size"] == 2
    model, _, record = cli_helpers.rebuild_model(out / "last.safetensors")
    val = SegmentationDataset.from_spec(load_segmentation_dataset(data), "val",
                                        EvalTransform(record["mean"], record["std"]))
    assert 100 * evaluate(model, val, InferenceConfig.for_crop(32))["mIoU"] == rows[-1]["val_miou"]


def test_sync_batchnorm_on_gpus_only():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    assert lspt_train.sync_batchnorm(model, torch.device("cpu")) is model and type(model[1]) is torch.nn.BatchNorm2d
    weight = model[1].weight
    synced = lspt_train.sync_batchnorm(model, torch.device("cuda", 0))
    assert type(synced[1]) is torch.nn.SyncBatchNorm and synced[1].weight is weight      # the optimizer's tensors


# --- bad input ----------------------------------------------------------------------------------------
def _fails(capsys, argv, pattern, code=2):
    assert lspt_train.main(argv) == code
    err = capsys.readouterr().err
    assert "lspt-train: error:" in err and re.search(pattern, err), err


def _classification_data(tmp_path):
    return write_classification_dataset(tmp_path / "cls", "imagefolder", size=32, per_class=1)


def _replace(argv, option, value):
    argv[argv.index(option) + 1] = value
    return argv


BAD_OPTIONS = {        # case: (the command line, given the data, the output folder and tmp_path; pattern)
    "zero-iterations": (lambda d, o, t: _args(d, o, iters=0), "--iters must be >= 1, got 0"),
    "negative-eval-interval": (lambda d, o, t: _replace(_args(d, o), "--eval-interval", "-3"),
                               "--eval-interval must be >= 1, got -3"),
    "crop-nan-lr": (lambda d, o, t: _replace(_args(d, o), "--lr", "nan"), "--lr must be a finite number > 0, got nan"),
    "min-lr-above-lr": (lambda d, o, t: _args(d, o, "--min-lr", "0.05"),
                        r"--min-lr 0.05 must not exceed the lowest starting lr 0.01 \(--lr 0.01"),
    "head-lr-mult-zero": (lambda d, o, t: _args(d, o, "--head-lr-mult", "0"), "--head-lr-mult must be a finite "
                                                                                  "number > 0, got 0.0"),
    "fixed-size-backbone": (lambda d, o, t: _args(d, o, "--model-kwargs", "dynamic_img_size=False"),
                            "segmentation needs dynamic_img_size=True"),
    "two-block-vit": (lambda d, o, t: _args(d, o, "--model-kwargs", "depth=2"),
                      r"--model 'vit_tiny_patch16_224' has 2 block\(s\): .* at least 3 blocks"),
    "wrong-layout": (lambda d, o, t: _args(d, o, "--layout", "ade20k"), "is not a ade20k dataset"),
    "forced-on-classification-data": (lambda d, o, t: _args(_classification_data(t), o, "--task", "segmentation"),
                                      r"--data \S+cls is not a segmentation dataset"),
    "ignore-index-is-a-class": (lambda d, o, t: _args(d, o, "--num-classes", "4", "--ignore-index", "2"),
                                "ignore_index 2 is one of the 4 classes"),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_option_errors(data, tmp_path, capsys, case):
    argv, pattern = BAD_OPTIONS[case]
    _fails(capsys, argv(data, tmp_path / "o", tmp_path), pattern)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra, pattern", [
    (["--epochs", "5"], r"--epochs applies to --task classification only; this run is --task segmentation"),
    (["--img-size", "64"], r"--img-size applies to --task classification only.*--crop-size sets the backbone's size"),
    (["--limit-train-batches", "2"], "--limit-train-batches applies to --task classification only"),
    (["--task", "classification"], "--iters, --eval-interval, --crop-size, --head-channels apply to --task "
                                   "segmentation only; this run is --task classification"),
    (["--reduce-zero-label", "maybe"], "argument --reduce-zero-label: expected true or false"),
    (["--data", "{broken}"], r"--data \S+broken has an images/ or annotations/ folder but no segmentation layout"),
])
def test_parse_errors(data, tmp_path, capsys, extra, pattern):
    (tmp_path / "broken" / "images" / "train").mkdir(parents=True)               # no annotations/
    extra = [e.format(broken=tmp_path / "broken") for e in extra]
    with pytest.raises(SystemExit) as exc:
        lspt_train.main(_args(data, tmp_path / "o", *extra))
    assert exc.value.code == 2 and re.search(pattern, capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_a_label_outside_the_classes_is_named(tmp_path, capsys):
    """--num-classes 3 with labels up to 3: the first sample with one stops the run, naming its file."""
    root = write_dataset(tmp_path / "d", "generic", 32, {"train": 4, "val": 2})
    _fails(capsys, _args(root, tmp_path / "o", "--num-classes", "3"),
           r"annotations/train/\d+\.png: label values \[3\] are not classes: with 3 classes")


def test_a_non_finite_loss_stops_before_the_update(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(SegmentationModel, "loss", lambda self, outputs, labels: outputs[0].sum() * float("nan"))
    out = tmp_path / "out"
    _fails(capsys, _args(data, out), rf"the training loss is nan at iteration 1: lower --lr \(the last good state is "
                                     rf"in {out}\)")
    assert torch.load(out / "resume.pt", weights_only=True)["epoch"] == 0 and not (out / "last.safetensors").exists()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux) to fill a disk")
def test_full_disk_writing_a_segmentation_file(data, finished, tmp_path, capsys):
    import shutil
    out = shutil.copytree(finished, tmp_path / "run")
    (out / "last.safetensors.tmp").symlink_to("/dev/full")
    _fails(capsys, _args(data, out, "--resume", iters=9), f"no space left on the device writing {out}/last.safetensors",
           code=1)
    assert load_file(str(out / "last.safetensors"))                 # its previous version
    assert lspt_train.main(_args(data, out, "--resume", iters=9)) == 0


def _classification_file(tmp_path):
    root = _classification_data(tmp_path)
    out = tmp_path / "cls-run"
    argv = ["--data", str(root), *TINY, "--img-size", "32", "--method", "lspt", "--epochs", "1", "--warmup-epochs",
            "0", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--output", str(out)]
    assert lspt_train.main(argv) == 0
    return root, out / "last.safetensors"


def test_eval_and_viz_refuse_mixing_the_tasks(data, finished, tmp_path, capsys):
    cls_data, cls_file = _classification_file(tmp_path)
    seg_file = finished / "last.safetensors"
    capsys.readouterr()
    cases = [
        (lspt_eval, ["--data", str(cls_data), "--tuned", str(cls_file), "--multi-scale"],
         "--multi-scale applies to segmentation files; --tuned .* is a classification file"),
        (lspt_eval, ["--data", str(cls_data), "--tuned", str(seg_file)],
         r"--tuned \S+ is a segmentation file, but --data \S+ is not a segmentation dataset"),
        (lspt_eval, ["--data", str(data), "--tuned", str(cls_file)],
         r"--data \S+ is a segmentation dataset, but --tuned \S+ is a classification file"),
        (lspt_eval, ["--data", str(data), "--tuned", str(seg_file), "--batch-size", "8"],
         "--batch-size applies to classification files"),
        (lspt_eval, ["--data", str(data), "--tuned", str(seg_file), "--split", "test"],
         "--split 'test'.* no such split"),
        (lspt_viz, ["--tuned", str(seg_file), "--tuned", str(cls_file), "--image", "x.png", "--output", str(tmp_path)],
         r"mix segmentation and classification files"),
        (lspt_viz, ["--tuned", str(seg_file), "--image", "x.png", "--output", str(tmp_path), "--kind", "attention"],
         "--kind and --from choose the per-block maps of classification files"),
    ]
    for tool, argv, pattern in cases:
        assert tool.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert re.search(pattern, err), (argv, err)


def test_the_cli_recipe_learns_the_synthetic_set(tmp_path, capsys):
    """40 iterations of batch 8 (lr 0.01, heads 0.1): mIoU well above chance (a constant background scores
    about 16 % here), every class learnt."""
    root = write_dataset(tmp_path / "d", "generic", 32, {"train": 32, "val": 8})
    out = tmp_path / "run"
    argv = _replace(_replace(_args(root, out, iters=40), "--eval-interval", "20"), "--batch-size", "8")
    assert lspt_train.main(argv) == 0
    assert _log(out)[-1]["val_miou"] > 40, _log(out)
    capsys.readouterr()
    assert lspt_eval.main(["--data", str(root), "--tuned", str(out / "last.safetensors")]) == 0
    ious = [line.split()[1] for line in capsys.readouterr().out.splitlines()[3:7]]
    assert all(float(v) > 20 for v in ious), ious
