"""lspt-train / lspt-eval on a synthetic dataset with a tiny random ViT (CPU): each stage of a run on its
own (setup, resume, train_one_epoch, validate, save_epoch / save_state), then end to end: it learns, the
fused and reference steps train alike, eval reproduces the log, resume is bit-exact, Ctrl-C exits 130 with
a resumable state, DDP runs on 2 CPU processes, and every bad input is a clear error that loses nothing
already saved."""
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from synth_data import write_dataset

from lspt_kernels import cli_helpers
from lspt_kernels import evaluate as lspt_eval
from lspt_kernels import train as lspt_train
from lspt_kernels.encoders import METHODS

TINY = ["--model", "vit_tiny_patch16_224", "--img-size", "32",
        "--model-kwargs", "patch_size=8", "embed_dim=32", "depth=3", "num_heads=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("synth") / "data", "imagefolder", size=32)


def _args(data, out, *extra, method="lspt", epochs=2):
    warmup = "1" if epochs > 1 else "0"            # the warm-up must end before the run does
    return ["--data", str(data), *TINY, "--method", method, "--epochs", str(epochs), "--warmup-epochs", warmup,
            "--batch-size", "8", "--lr", "2", "--workers", "0", "--device", "cpu", "--output", str(out), *extra]


def _log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def _files(out):
    """Every file of an output dir with its bytes (to show that nothing was changed)."""
    return {p.name: p.read_bytes() for p in Path(out).iterdir() if p.is_file()}


# --- the stages, each on its own ----------------------------------------------------------------------
def _setup(data, out, *extra, **kw):
    return lspt_train.setup(lspt_train.build_parser().parse_args(_args(data, out, *extra, **kw)))


def test_setup_builds_the_run_and_writes_nothing(data, tmp_path):
    run = _setup(data, tmp_path / "out", "--num-prompts", "4")
    assert run.encoder.config()["num_prompts"] == 4 and run.encoder.config()["head_init"] == "official"
    assert run.effective_lr == pytest.approx(2 * 8 / 256) and run.optimizer.param_groups[0]["lr"] == 0.0   # warm-up
    assert run.identity["classes"] == run.record["classes"] == ["blue", "green", "red", "yellow"]
    assert run.record["model_kwargs"] == dict(patch_size=8, embed_dim=32, depth=3, num_heads=2)
    assert (len(run.train_ds), len(run.val_loader.dataset)) == (48, 24) and run.sampler is None
    assert run.model is None and run.start_epoch == 0
    assert list((tmp_path / "out").iterdir()) == []          # checked writable, nothing written yet


def test_resume_stage_restores_the_saved_run(data, finished):
    run = _setup(data, finished, "--limit-train-batches", "1", "--resume", epochs=1)
    lspt_train.resume(run)
    assert run.start_epoch == 1 and [r["epoch"] for r in run.rows] == [1]
    saved = load_file(str(finished / "last.safetensors"))
    for name, t in run.encoder.tuned_state_dict().items():
        assert torch.equal(t, saved[name]), name
    state = torch.load(finished / "resume.pt", weights_only=False)
    assert torch.equal(torch.get_rng_state(), state["rng"][0]["torch"])
    assert run.optimizer.state_dict()["state"].keys() == state["optimizer"]["state"].keys()


def test_resume_stage_seeds_a_new_run(data, tmp_path):
    run = _setup(data, tmp_path / "out", "--seed", "7")
    lspt_train.resume(run)
    assert torch.initial_seed() == 7 and run.start_epoch == 0 and run.rows == []


def test_train_one_epoch_steps_and_reports(data, tmp_path, monkeypatch):
    steps = []
    monkeypatch.setattr(lspt_train, "_on_step", lambda epoch, step, loss: steps.append((epoch, step)))
    run = _setup(data, tmp_path / "out", "--warmup-epochs", "0", "--limit-train-batches", "2")
    lspt_train.resume(run)
    lspt_train.wrap_model(run)
    before = {n: t.clone() for n, t in run.encoder.tuned_state_dict().items()}
    stats = lspt_train.train_one_epoch(run, 0)
    assert steps == [(0, 0), (0, 1)]
    assert set(stats) == {"train_loss", "train_acc", "lr", "images_per_s", "epoch_time_s"}
    assert stats["lr"] == pytest.approx(2 * 8 / 256) and stats["images_per_s"] > 0
    assert math.isfinite(stats["train_loss"]) and stats["train_loss"] > 0
    assert 0 <= stats["train_acc"] <= 100 and run.encoder.training
    changed = [n for n, t in run.encoder.tuned_state_dict().items() if not torch.equal(t, before[n])]
    assert "head.weight" in changed and "prompts" in changed


def test_validate_is_top1_on_the_val_split(data, tmp_path):
    run = _setup(data, tmp_path / "out")
    acc = lspt_train.validate(run)
    assert acc == lspt_eval.evaluate(run.encoder, run.val_loader, run.device)[0]
    assert acc * 24 / 100 == pytest.approx(round(acc * 24 / 100))     # a count out of the 24 val images
    run.rank = 1
    assert lspt_train.validate(run) is None                          # rank 0 alone evaluates


def test_save_epoch_writes_log_and_tuned_files(data, tmp_path, capsys):
    run = _setup(data, tmp_path / "out")
    stats = dict(train_loss=1.5, train_acc=40.0, lr=0.01, images_per_s=100.0, epoch_time_s=1.0)
    lspt_train.save_epoch(run, 1, stats, 50.0)
    lspt_train.save_epoch(run, 2, stats, 25.0)          # lower: best stays at epoch 1
    assert [(r["epoch"], r["val_acc"]) for r in _log(tmp_path / "out")] == [(1, 50.0), (2, 25.0)]
    assert (run.best_acc, run.best_epoch) == (50.0, 1)
    _, last = cli_helpers.train_record(tmp_path / "out" / "last.safetensors")
    _, best = cli_helpers.train_record(tmp_path / "out" / "best.safetensors")
    assert (last["epoch"], last["val_acc"], best["epoch"], best["val_acc"]) == (2, 25.0, 1, 50.0)
    assert last["classes"] == run.spec.classes and last["mean"] == run.record["mean"]
    assert (tmp_path / "out" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "epoch 2/2  train_loss 1.5000" in capsys.readouterr().out
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "out").iterdir())


def test_save_state_holds_what_resume_needs(data, tmp_path):
    run = _setup(data, tmp_path / "out")
    lspt_train.resume(run)
    run.best_acc, run.best_epoch = 75.0, 3
    lspt_train.save_state(run, 3)
    state = torch.load(tmp_path / "out" / "resume.pt", weights_only=True)
    assert (state["epoch"], state["best_acc"], state["best_epoch"]) == (3, 75.0, 3)
    assert state["identity"] == run.identity and state["settings"]["effective_lr"] == run.effective_lr
    assert set(state["tuned"]) == set(run.encoder.tuned_state_dict()) and len(state["rng"]) == 1
    assert torch.equal(state["rng"][0]["torch"], torch.get_rng_state())


# --- end to end ----------------------------------------------------------------------------------------
def test_lspt_learns_and_eval_reproduces_the_log(data, tmp_path, capsys):
    out = tmp_path / "run"
    # lr 1 for 8 epochs: every seed tried (0, 1, 2, 42) ends at 100% val; a fixed seed here.
    assert lspt_train.main(_args(data, out, "--lr", "1", epochs=8)) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    rows = _log(out)
    assert [r["epoch"] for r in rows] == list(range(1, 9))
    for key in ("epoch", "train_loss", "val_acc", "lr", "images_per_s", "peak_memory_gb"):
        assert all(key in r for r in rows), key
    assert rows[0]["lr"] == 0.0 and rows[1]["lr"] == pytest.approx(1 * 8 / 256)   # warm-up from 0, scaled lr
    best = max(r["val_acc"] for r in rows)
    accs = [r["val_acc"] for r in rows]
    assert accs[0] <= 50.0 and accs[-1] >= 90.0 and best >= 90.0, accs            # 4 classes: chance 25%
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] / 5
    best_epoch = next(r["epoch"] for r in rows if r["val_acc"] == best)
    assert printed[-1].startswith(f"best val accuracy: {best:.2f}% (epoch {best_epoch})")
    for name in ("best.safetensors", "last.safetensors", "resume.pt", "curves.png", "config.json"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["prompt_dropout"] == 0.1 and config["encoder"]["head_init"] == "official"
    assert config["momentum"] == 0.9 and config["weight_decay"] == 0.0
    # The tuned file holds the tuned parameters only, and rebuilds the encoder from its metadata.
    tensors = load_file(str(out / "best.safetensors"))
    assert set(tensors) == {"prompts", "lstm.weight_ih", "lstm.weight_hh", "lstm.bias_ih", "lstm.bias_hh",
                            "head.weight", "head.bias"}
    encoder, cfg, meta = cli_helpers.rebuild_encoder(out / "best.safetensors")
    assert meta["epoch"] == best_epoch and cfg["method"] == "lspt"
    # lspt-eval on the best file: exactly the logged accuracy.
    assert lspt_eval.main(["--data", str(data), "--tuned", str(out / "best.safetensors")]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"top-1 {best:.2f}%" in line, line
    acc, correct, total = _eval_float(data, out / "best.safetensors")
    assert acc == best and total == 24


def _eval_float(data, path, split="val"):
    from lspt_kernels.data import ImageDataset, build_transform, load_dataset
    encoder, cfg, meta = cli_helpers.rebuild_encoder(path)
    spec = load_dataset(data, classes=meta["classes"])
    ds = ImageDataset(spec.splits[split], build_transform(spec.layout, 32, meta["mean"], meta["std"], False))
    loader = torch.utils.data.DataLoader(ds, batch_size=meta["eval_batch_size"])
    return lspt_eval.evaluate(encoder, loader, torch.device("cpu"))


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"lspt"}))
def test_every_method_trains_and_evaluates(data, tmp_path, capsys, method):
    out = tmp_path / method
    assert lspt_train.main(_args(data, out, "--limit-train-batches", "2", method=method, epochs=1)) == 0
    logged = _log(out)[-1]["val_acc"]
    assert lspt_eval.main(["--data", str(data), "--tuned", str(out / "last.safetensors")]) == 0
    assert f"top-1 {logged:.2f}%" in capsys.readouterr().out
    assert load_file(str(out / "last.safetensors"))  # a non-empty set of tuned tensors


@pytest.mark.parametrize("dropout", ["0", "0.1"])
def test_convergence_parity_fused_vs_reference(data, tmp_path, monkeypatch, dropout):
    """Liger-style: the same 20 steps with the fused C++ step and with the PyTorch reference step give the
    same loss curve and the same final tuned parameters (fp32 tolerance), without and with the recipe's
    prompt dropout (the fused path draws the same per-image masks in the same order)."""
    from lspt_kernels.backends import unavailable_reason
    if unavailable_reason("cpu") is not None:
        pytest.fail(f"the C++ CPU backend does not load: {unavailable_reason('cpu')}")
    runs = {}
    for backend in ("cpu", "reference"):
        losses = []
        monkeypatch.setattr(lspt_train, "_on_step", lambda e, s, loss: losses.append(loss.item()))
        out = tmp_path / backend
        assert lspt_train.main(_args(data, out, "--backend", backend, "--prompt-dropout", dropout,
                                     "--limit-train-batches", "5", epochs=4)) == 0
        runs[backend] = (losses, load_file(str(out / "last.safetensors")))
    (fused, fused_params), (ref, ref_params) = runs["cpu"], runs["reference"]
    assert len(fused) == len(ref) == 20
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(ref), rtol=1e-5, atol=1e-5)
    rows = _log(tmp_path / "cpu")
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]        # it was training, not standing still
    for name in ref_params:
        torch.testing.assert_close(fused_params[name], ref_params[name], rtol=1e-5, atol=1e-5, msg=name)


def test_resume_after_ctrl_c_is_bit_exact(data, tmp_path, monkeypatch, capsys):
    args = ["--workers", "1"]                            # augmentation in a worker process too
    full = tmp_path / "full"
    assert lspt_train.main(_args(data, full, *args, epochs=2)) == 0

    cut = tmp_path / "cut"

    def interrupt(epoch, step, loss):
        if epoch == 1 and step == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(lspt_train, "_on_step", interrupt)
    assert lspt_train.main(_args(data, cut, *args, epochs=2)) == 130
    err = capsys.readouterr().err
    assert "interrupted in epoch 2" in err and "after epoch 1" in err and "--resume" in err
    assert [r["epoch"] for r in _log(cut)] == [1]
    assert torch.load(cut / "resume.pt", weights_only=False)["epoch"] == 1
    monkeypatch.setattr(lspt_train, "_on_step", None)
    assert lspt_train.main(_args(data, cut, *args, "--resume", epochs=2)) == 0
    a, b = load_file(str(full / "last.safetensors")), load_file(str(cut / "last.safetensors"))
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    timing = ("images_per_s", "peak_memory_gb", "epoch_time_s")

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in timing} for r in rows]

    assert strip(_log(full)) == strip(_log(cut))


def test_ddp_two_cpu_processes(data, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "lspt_kernels.train", *_args(data, out, epochs=2)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    # --standalone picks a free port and binds it again later; on a busy machine another process can take
    # it in between. That (and only that) is retried once.
    port_lost = ("Address already in use", "EADDRINUSE", "DistNetworkError", "RendezvousConnectionError")
    if res.returncode != 0 and any(p in res.stdout + res.stderr for p in port_lost):
        import shutil
        shutil.rmtree(out, ignore_errors=True)
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("best val accuracy") == 1          # rank 0 prints
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and config["effective_lr"] == pytest.approx(2 * 8 / 256)
    rows = _log(out)
    assert [r["epoch"] for r in rows] == [1, 2] and all(r["train_loss"] > 0 for r in rows)
    state = torch.load(out / "resume.pt", weights_only=False)
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    # The run moved the parameters (epoch 2 has lr > 0), and its file evaluates to the logged accuracy.
    acc, _, _ = _eval_float(data, out / "last.safetensors")
    assert acc == rows[-1]["val_acc"]


# --- bad input: a clear error naming the problem; nothing already saved is lost ----------------------
def _fails(capsys, argv, pattern):
    assert lspt_train.main(argv) == 2
    err = capsys.readouterr().err
    assert "lspt-train: error:" in err
    assert re.search(pattern, err), err
    return err


def _empty(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def _odd(tmp_path):
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "notes.txt").write_text("x")
    return tmp_path / "odd"


def _vtab_val(line):
    def make(tmp_path):
        vt = write_dataset(tmp_path / "vtab", "vtab", size=32, per_class=2)
        (vt / "val200.txt").write_text(line)
        return vt
    return make


BAD_DATA = {        # case: (makes the --data folder in tmp_path, the error's pattern)
    "missing": (lambda tmp_path: tmp_path / "missing", "--data .*missing: no such directory"),
    "empty": (_empty, "--data .*empty is empty"),
    "no-layout": (_odd, "matches none of the layouts"),
    "unknown-class": (_vtab_val("images/val_red_000.png 9\n"),
                      "val200.txt:1: label 9 is a class the train split lacks"),
    "negative-label": (_vtab_val("images/val_red_000.png -3\n"), "val200.txt:1: label -3 is out of range"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_dir_is_named_and_nothing_is_created(tmp_path, capsys, case):
    make, pattern = BAD_DATA[case]
    _fails(capsys, _args(make(tmp_path), tmp_path / "out"), pattern)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("workers", ["0", "2"])
def test_unreadable_image_named_in_one_line_and_state_kept(data, tmp_path, capsys, workers):
    from lspt_kernels.data import DataError, open_image
    root = shutil.copytree(data, tmp_path / "data")
    bad = sorted((root / "train" / "green").iterdir())[0]
    bad.write_bytes(b"\x89PNG broken")
    err = _fails(capsys, _args(root, tmp_path / "out", "--workers", workers), f"cannot read image {bad}")
    with pytest.raises(DataError) as direct:
        open_image(bad)
    # The same one line with data-loader workers as without (not the worker's traceback).
    assert err[err.index("lspt-train: error: "):].strip() == f"lspt-train: error: {direct.value}"
    assert torch.load(tmp_path / "out" / "resume.pt", weights_only=False)["epoch"] == 0   # resumable


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """The output directory of a finished one-epoch lspt run (left unchanged by the tests that use it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert lspt_train.main(_args(data, out, "--limit-train-batches", "1", epochs=1)) == 0
    return out


def _other_model(argv):
    other = list(TINY)
    other[other.index("embed_dim=32")] = "embed_dim=48"
    argv[argv.index(TINY[0]):argv.index(TINY[0]) + len(TINY)] = other
    return argv


def _three_classes(data, tmp_path):
    fewer = write_dataset(tmp_path / "three", "imagefolder", size=32, per_class=2)
    for split in ("train", "val", "test"):
        shutil.rmtree(fewer / split / "yellow")
    return fewer


OTHER_RUNS = {        # case: (the command line, given the data, the finished run's folder and tmp_path; pattern)
    "new-run-over-a-run": (lambda data, out, tmp: _args(data, out, method="gapt"),
                           "already holds a run .* pass --resume"),
    "other-seed-of-a-random-backbone": (lambda data, out, tmp: _args(data, out, "--resume", "--seed", "7"),
                                        "different run; backbone_seed: saved 42, now 7; backbone_sha256: saved "),
    "other-method": (lambda data, out, tmp: _args(data, out, "--resume", method="gapt"),
                     "different run; method: saved 'lspt', now 'gapt'"),
    "other-model-kwargs": (lambda data, out, tmp: _other_model(_args(data, out, "--resume")),
                           "different run; model_kwargs"),
    "other-classes": (lambda data, out, tmp: _args(_three_classes(data, tmp), out, "--resume"),
                      "different run; num_classes: saved 4, now 3"),
}


@pytest.mark.parametrize("case", list(OTHER_RUNS))
def test_another_run_in_output_is_refused_and_kept(data, finished, tmp_path, capsys, case):
    argv, pattern = OTHER_RUNS[case]
    before = _files(finished)
    _fails(capsys, argv(data, finished, tmp_path), pattern)
    assert _files(finished) == before


def test_resume_without_saved_state(data, tmp_path, capsys):
    _fails(capsys, _args(data, tmp_path / "fresh", "--resume"), "holds no resume state")


@pytest.mark.parametrize("output, pattern", [("afile/out", "--output .*afile/out is not writable"),
                                             ("afile", "--output .*afile exists and is not a directory")])
def test_unwritable_output(data, tmp_path, capsys, output, pattern):
    (tmp_path / "afile").write_text("x")
    _fails(capsys, _args(data, tmp_path / output), pattern)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into a read-only directory")
def test_read_only_output(data, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        _fails(capsys, _args(data, ro / "out"), "--output .*ro/out is not writable")
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("amp, pattern", [("bf16", "--amp bf16: this CPU has no native bf16"),
                                          ("fp16", "--amp fp16 needs a GPU")])
def test_amp_errors(data, tmp_path, capsys, monkeypatch, amp, pattern):
    monkeypatch.setattr(cli_helpers, "cpu_supports_bf16", lambda: False)
    _fails(capsys, _args(data, tmp_path / "o", "--amp", amp), pattern)
    assert not (tmp_path / "o").exists()


def test_device_without_a_gpu(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = _args(data, tmp_path / "o")
    argv[argv.index("--device") + 1] = "cuda"
    _fails(capsys, argv, "--device cuda: no CUDA GPU is available")
    assert not (tmp_path / "o").exists()


def _unknown_model(data, out):
    argv = _args(data, out)
    argv[argv.index("vit_tiny_patch16_224")] = "vit_nonexistent_model"
    return argv


BAD_OPTIONS = {        # case: (the command line, given the data, the output folder and tmp_path; pattern)
    "option-of-another-method": (lambda data, out, tmp: _args(data, out, "--gate-init", "3"),
                                 "--gate-init applies to gapt only"),
    "bad-cspc": (lambda data, out, tmp: _args(data, out, "--cspc", "median"), "cspc must be one of"),
    "zero-batch": (lambda data, out, tmp: _args(data, out, "--batch-size", "0"), "--batch-size must be >= 1"),
    "missing-checkpoint": (lambda data, out, tmp: _args(data, out, "--checkpoint", str(tmp / "none.pth")),
                           "--checkpoint .*no such file"),
    "missing-split": (lambda data, out, tmp: _args(data, out, "--val-split", "test2"), "split 'test2' not found"),
    "unknown-model": (lambda data, out, tmp: _unknown_model(data, out), "--model 'vit_nonexistent_model'"),
    "model-kwargs-not-key-value": (lambda data, out, tmp: _args(data, out, "--model-kwargs", "depth"),
                                   "--model-kwargs expects KEY=VALUE"),
    "lr-nan": (lambda data, out, tmp: _args(data, out, "--lr", "nan"), "--lr must be a finite number > 0, got nan"),
    "lr-inf": (lambda data, out, tmp: _args(data, out, "--lr", "inf"), "--lr must be a finite number > 0, got inf"),
    "weight-decay-nan": (lambda data, out, tmp: _args(data, out, "--weight-decay", "nan"),
                         "--weight-decay must be a finite number >= 0, got nan"),
    "momentum-nan": (lambda data, out, tmp: _args(data, out, "--momentum", "nan"),
                     "--momentum must be a finite number >= 0 and < 1, got nan"),
    "momentum-negative": (lambda data, out, tmp: _args(data, out, "--momentum", "-0.5"),
                          "--momentum must be a finite number >= 0 and < 1, got -0.5"),
    "gate-init-inf": (lambda data, out, tmp: _args(data, out, "--gate-init", "inf", method="gapt"),
                      "--gate-init must be a finite number, got inf"),
    "negative-seed": (lambda data, out, tmp: _args(data, out, "--seed", "-1"), "--seed must be >= 0 and < 2147483648"),
    "default-warmup-longer-than-the-run": (lambda data, out, tmp: _args(data, out, "--warmup-epochs", "10", epochs=1),
                                           r"--warmup-epochs 10 must be less than --epochs 1: .* never train at"),
    "warmup-longer-than-the-run": (lambda data, out, tmp: _args(data, out, "--warmup-epochs", "5", epochs=3),
                                   "--warmup-epochs 5 must be less than --epochs 3"),
    "image-smaller-than-a-patch": (lambda data, out, tmp: _args(data, out, "--img-size", "4"),
                                   r"--img-size 4: smaller than the \(8, 8\) patch of --model 'vit_tiny_patch16_224'"),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_option_errors(data, tmp_path, capsys, case):
    argv, pattern = BAD_OPTIONS[case]
    _fails(capsys, argv(data, tmp_path / "o", tmp_path), pattern)
    assert not (tmp_path / "o").exists()


def test_help_lists_the_recipe_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        lspt_train.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    flat = " ".join(text.split())
    for option, default in (("--prompt-dropout", "0.1"), ("--head-init", "official"), ("--momentum", "0.9"),
                            ("--weight-decay", "0.0"), ("--epochs", "100"), ("--warmup-epochs", "10"),
                            ("--amp", "auto")):
        pattern = re.escape(option) + r" [A-Z_{},a-z]+ .*?\(default: " + re.escape(default) + r"\)"
        assert re.search(pattern, flat), option
    for option in ("--resume", "--grad-checkpointing", "--compile", "--limit-train-batches", "--layout"):
        assert option in text, option
    with pytest.raises(SystemExit):
        lspt_eval.main(["--help"])
    assert "--tuned" in capsys.readouterr().out


def test_warmup_cosine_matches_the_official_schedule():
    f = lspt_train.warmup_cosine(2, 10)
    assert [f(e) for e in (0, 1, 2)] == [0.0, 0.5, 1.0]
    assert f(6) == pytest.approx(0.5) and f(10) == 0.0
    assert lspt_train.warmup_cosine(0, 4)(0) == 1.0


@pytest.mark.parametrize("layout", ["vtab", "fgvc"])
def test_vtab_and_fgvc_layouts_train_and_evaluate(tmp_path, capsys, layout):
    root = write_dataset(tmp_path / layout, layout, size=32, per_class={"train": 4, "val": 3, "test": 3})
    out = tmp_path / "out"
    assert lspt_train.main(_args(root, out, "--limit-train-batches", "1", epochs=1)) == 0
    assert f"layout {layout}" in capsys.readouterr().out
    logged = _log(out)[-1]["val_acc"]
    for split in ("val", "test"):
        assert lspt_eval.main(["--data", str(root), "--tuned", str(out / "last.safetensors"), "--split", split]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert f"[val]: top-1 {logged:.2f}%" in lines[0] and "/12)" in lines[0] and "[test]" in lines[1]
    # A copy of the data that keeps only the test list: lspt-eval reads only the split it evaluates.
    only_test = shutil.copytree(root, tmp_path / "only-test")
    others = {"vtab": ("train800.txt", "val200.txt", "train800val200.txt"), "fgvc": ("train.json", "val.json")}
    for name in others[layout]:
        (only_test / name).unlink()
    assert lspt_eval.main(["--data", str(only_test), "--tuned", str(out / "last.safetensors"), "--split", "test"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == lines[1].replace(str(root), str(only_test))


def test_backbone_checkpoint_is_used_and_recorded(data, tmp_path, capsys):
    """--checkpoint loads the backbone through from_timm; the tuned file records it, so lspt-eval rebuilds the
    same backbone; ImageNet normalisation is used with a checkpoint."""
    from lspt_kernels.cli_helpers import build_backbone
    vit = build_backbone("vit_tiny_patch16_224", 32, dict(patch_size=8, embed_dim=32, depth=3, num_heads=2), seed=7)
    ckpt = tmp_path / "backbone.pth"
    torch.save({"model": vit.state_dict()}, ckpt)                     # MAE-style {'model': ...}
    out = tmp_path / "out"
    assert lspt_train.main(_args(data, out, "--checkpoint", str(ckpt), "--limit-train-batches", "2", epochs=1)) == 0
    assert "randomly initialised" not in capsys.readouterr().out
    encoder, _, meta = cli_helpers.rebuild_encoder(out / "last.safetensors")
    assert meta["checkpoint"] == str(ckpt.resolve()) and meta["mean"] == [0.485, 0.456, 0.406]
    torch.testing.assert_close(encoder.vit.pos_embed, vit.pos_embed, rtol=0, atol=0)   # not the seed-42 init
    acc, _, _ = _eval_float(data, out / "last.safetensors")
    assert acc == _log(out)[-1]["val_acc"]


def test_bf16_autocast_on_a_cpu_that_has_it(data, tmp_path, capsys):
    if not cli_helpers.cpu_supports_bf16():
        pytest.skip("this CPU has no native bf16 (the refusal is tested in test_amp_and_device_errors)")
    out = tmp_path / "bf16"
    assert lspt_train.main(_args(data, out, "--amp", "bf16", "--prompt-dropout", "0", "--limit-train-batches", "2",
                                 epochs=2)) == 0
    rows = _log(out)
    assert all(math.isfinite(r["train_loss"]) for r in rows)
    assert cli_helpers.rebuild_encoder(out / "last.safetensors")[2]["amp"] == "bf16"
    assert lspt_eval.main(["--data", str(data), "--tuned", str(out / "last.safetensors")]) == 0
    assert f"top-1 {rows[-1]['val_acc']:.2f}%" in capsys.readouterr().out


def test_resume_with_more_epochs_follows_the_new_schedule(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert lspt_train.main(_args(data, out, "--limit-train-batches", "1", epochs=2)) == 0
    assert lspt_train.main(_args(data, out, "--limit-train-batches", "1", "--resume", epochs=4)) == 0
    assert "changed settings epochs 2 -> 4" in capsys.readouterr().err
    rows = _log(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    f = lspt_train.warmup_cosine(1, 4)
    assert [r["lr"] for r in rows[2:]] == pytest.approx([2 * 8 / 256 * f(2), 2 * 8 / 256 * f(3)])
    assert rows[2]["lr"] > 0


def _junk_file(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    return ["--tuned", str(tmp_path / "junk.safetensors")]


def _plain_file(tmp_path, tuned):
    """A file from encoder.save_tuned alone: it names no backbone."""
    encoder, _, _ = cli_helpers.rebuild_encoder(tuned)
    encoder.save_tuned(tmp_path / "plain.safetensors")
    return ["--tuned", str(tmp_path / "plain.safetensors")]


def _edited(tmp_path, tuned, **change):
    """A copy of a tuned file whose lspt-train record has `change` applied."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(tuned, "pt") as f:
        meta = f.metadata()
    meta["lspt_train"] = json.dumps(dict(json.loads(meta["lspt_train"]), **change))
    save_file(load_file(tuned), str(tmp_path / "edited.safetensors"), metadata=meta)
    return ["--tuned", str(tmp_path / "edited.safetensors")]


BAD_EVAL = {        # case: (arguments after --data, given tmp_path and the finished run's tuned file; pattern)
    "missing-file": (lambda tmp, tuned: ["--tuned", str(tmp / "none.safetensors")],
                     "--tuned .*none.safetensors: no such file"),
    "not-safetensors": (lambda tmp, tuned: _junk_file(tmp), "is not a safetensors file"),
    "missing-split": (lambda tmp, tuned: ["--tuned", tuned, "--split", "holdout"],
                      "--split 'holdout'.*has no such split"),
    "no-backbone-named": (lambda tmp, tuned: _plain_file(tmp, tuned), "does not name its backbone.*--model"),
    "classes-not-a-list": (lambda tmp, tuned: _edited(tmp, tuned, classes=5),
                           r"its 'lspt_train' metadata entry 'classes' must be a non-empty list of class names, got 5"),
    "batch-size-as-text": (lambda tmp, tuned: _edited(tmp, tuned, eval_batch_size="64"),
                           r"its 'lspt_train' metadata entry 'eval_batch_size' must be an int >= 1, got \"64\""),
    "unknown-entry": (lambda tmp, tuned: _edited(tmp, tuned, colour="red"),
                      r"its 'lspt_train' metadata has entries this version does not know: \['colour'\]"),
    "zero-batch-size": (lambda tmp, tuned: ["--tuned", tuned, "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
}


@pytest.mark.parametrize("case", list(BAD_EVAL))
def test_eval_bad_input(data, finished, tmp_path, capsys, case):
    argv, pattern = BAD_EVAL[case]
    assert lspt_eval.main(["--data", str(data), *argv(tmp_path, str(finished / "last.safetensors"))]) == 2
    err = capsys.readouterr().err
    assert "lspt-eval: error:" in err and re.search(pattern, err), err


def test_eval_missing_data_dir(finished, tmp_path, capsys):
    assert lspt_eval.main(["--data", str(tmp_path / "nodata"), "--tuned", str(finished / "last.safetensors")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_grad_checkpointing_flag(data, tmp_path, capsys):
    """--grad-checkpointing trains to the same parameters as without it (recomputation changes memory, not
    results)."""
    argv = lambda out, *x: _args(data, out, "--limit-train-batches", "2", *x, epochs=2)  # noqa: E731
    assert lspt_train.main(argv(tmp_path / "plain")) == 0
    assert lspt_train.main(argv(tmp_path / "gc", "--grad-checkpointing")) == 0
    a, b = load_file(str(tmp_path / "plain" / "last.safetensors")), load_file(str(tmp_path / "gc" / "last.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-6, msg=name)
    assert json.loads((tmp_path / "gc" / "config.json").read_text())["grad_checkpointing"] is True


def test_boolean_option_refuses_other_words(data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        lspt_train.main(_args(data, tmp_path / "o", "--shared-lstm", "maybe"))
    assert exc.value.code == 2
    assert "argument --shared-lstm: expected true or false (or 1/0, yes/no), got 'maybe'" in capsys.readouterr().err
    assert _setup(data, tmp_path / "o", "--shared-lstm", "no").encoder.shared_lstm is False


@pytest.mark.parametrize("world, batch, pattern", [
    (2, "64", r"--batch-size 64 over 2 processes is 32 images per process and step, but the 48 train images give "
              r"each process 24: no full batch .*; use --batch-size <= 48"),
    (64, "64", "the train split has 48 image\\(s\\), fewer than the 64 processes"),
])
def test_processes_without_a_full_batch_are_a_usage_error(data, tmp_path, capsys, monkeypatch, world, batch, pattern):
    monkeypatch.setattr(lspt_train, "_setup_distributed", lambda device: (0, world, torch.device("cpu")))
    _fails(capsys, _args(data, tmp_path / "o", "--batch-size", batch), pattern)
    assert not (tmp_path / "o").exists()


# --- the output folder and its files under what users do to them --------------------------------------
def _copy_run(finished, tmp_path, keep=None):
    """A copy of the finished run's folder (only the files in `keep`, when given)."""
    out = shutil.copytree(finished, tmp_path / "run")
    for f in out.iterdir():
        if keep is not None and f.name not in keep:
            f.unlink()
    return out


@pytest.mark.parametrize("name", ["best.safetensors", "last.safetensors"])
def test_tuned_files_alone_are_a_run_not_overwritten(data, finished, tmp_path, capsys, name):
    out = _copy_run(finished, tmp_path, keep={name})
    before = _files(out)
    _fails(capsys, _args(data, out), rf"--output .*run already holds a run \({name}\): pass --resume")
    assert _files(out) == before


def test_a_second_run_on_a_held_folder_is_refused_naming_the_holder(data, finished, tmp_path, capsys):
    out = _copy_run(finished, tmp_path)
    before = _files(out)
    code = ("import sys; from lspt_kernels.cli_helpers import OutputLock\n"
            f"with OutputLock({str(out)!r}):\n    print('held', flush=True); sys.stdin.read()")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        _fails(capsys, _args(data, out, "--resume", epochs=2), rf"--output .*run is in use by another run \(pid "
                                                                rf"{holder.pid} on .*\): wait until it ends")
    finally:
        holder.communicate("", timeout=60)
    assert _files(out) == before


def test_non_finite_parameters_are_never_saved(data, tmp_path, capsys, monkeypatch):
    """Parameters that turn NaN within an epoch (a divergence the loss check has not seen yet) stop the run
    before anything of that epoch is written: no NaN file, no NaN model's 25 % as the "best" accuracy."""
    one_epoch = lspt_train.train_one_epoch

    def diverging(run, epoch):
        stats = one_epoch(run, epoch)
        with torch.no_grad():
            run.encoder.head.weight[0, 0] = float("nan")
        return stats
    monkeypatch.setattr(lspt_train, "train_one_epoch", diverging)
    out = tmp_path / "out"
    _fails(capsys, _args(data, out, "--limit-train-batches", "1", epochs=1),
           r"the run diverged: the tuned parameters \['head.weight'\] hold NaN or inf after epoch 1; nothing of "
           "that epoch was saved")
    assert not (out / "best.safetensors").exists() and not (out / "last.safetensors").exists()
    assert torch.load(out / "resume.pt", weights_only=True)["epoch"] == 0


def _state_file(make):
    def write(path):
        torch.save(make(), path)
    return write


def _truncated_state(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGED_STATES = {        # case: how resume.pt is damaged (given its path) -> the error's pattern
    "random-bytes": (lambda p: p.write_bytes(os.urandom(2000)), "cannot be read"),
    "truncated": (_truncated_state, "cannot be read"),
    "empty": (lambda p: p.write_bytes(b""), "cannot be read"),
    "a-dict-without-its-entries": (_state_file(lambda: {"epoch": 1}), "is not a resume state of lspt-train"),
    "not-a-dict": (_state_file(lambda: [1, 2]), r"is not a resume state of lspt-train .* got list"),
    "entries-of-the-wrong-type": (lambda p: torch.save(dict(torch.load(p, weights_only=True), tuned=[1]), p),
                                  r"holds entries of the wrong type: \['tuned'\]"),
}


@pytest.mark.parametrize("case", list(DAMAGED_STATES))
def test_damaged_resume_state_is_one_clear_error(data, finished, tmp_path, capsys, case):
    damage, pattern = DAMAGED_STATES[case]
    out = _copy_run(finished, tmp_path)
    damage(out / "resume.pt")
    err = _fails(capsys, _args(data, out, "--resume", epochs=2), rf"--resume: \S*run/resume.pt {pattern}")
    assert "the file is damaged" in err and "start the run again in another --output" in err


def test_damaged_log_line_is_named(data, finished, tmp_path, capsys):
    out = _copy_run(finished, tmp_path)
    (out / "log.jsonl").write_text((out / "log.jsonl").read_text() + "{garbage\n")
    _fails(capsys, _args(data, out, "--resume", epochs=2), r"--resume: \S*run/log.jsonl:2 is not a log row .*delete "
                                                           "that line")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux) to fill a disk")
@pytest.mark.parametrize("name", ["resume.pt", "last.safetensors", "log.jsonl"])
def test_full_disk_is_named_and_the_last_state_kept(data, finished, tmp_path, capsys, name):
    """Each file is written to NAME.tmp, then renamed: that temporary file is made a link to /dev/full,
    where every write fails with ENOSPC, as on a full disk."""
    out = _copy_run(finished, tmp_path)
    (out / f"{name}.tmp").symlink_to("/dev/full")
    assert lspt_train.main(_args(data, out, "--resume", "--limit-train-batches", "1", epochs=2)) == 1
    err = capsys.readouterr().err
    assert f"lspt-train: error: no space left on the device writing {out / name}" in err, err
    assert not (out / f"{name}.tmp").exists() and not (out / f"{name}.tmp").is_symlink()
    assert torch.load(out / "resume.pt", weights_only=True)["epoch"] == 1            # the last good state
    assert load_file(str(out / "last.safetensors")) and len(_log(out)) >= 1
    assert lspt_train.main(_args(data, out, "--resume", "--limit-train-batches", "1", epochs=2)) == 0   # continues


# --- lspt-eval on other data and another backbone ---------------------------------------------------
def test_eval_reads_only_the_split_it_evaluates(data, finished, tmp_path, capsys):
    root = shutil.copytree(data, tmp_path / "data")
    shutil.copytree(root / "train" / "red", root / "train" / "purple")          # an extra class, in train only
    assert lspt_eval.main(["--data", str(root), "--tuned", str(finished / "last.safetensors")]) == 0
    assert f"top-1 {_log(finished)[-1]['val_acc']:.2f}%" in capsys.readouterr().out


def test_eval_names_another_backbone(data, finished, tmp_path, capsys):
    from lspt_kernels.cli_helpers import build_backbone
    tuned = str(finished / "last.safetensors")
    kw = dict(patch_size=8, embed_dim=32, depth=3, num_heads=2)
    for name, seed in (("same.pth", 42), ("other.pth", 8)):      # the run's random backbone (seed 42), another
        torch.save({"state_dict": build_backbone("vit_tiny_patch16_224", 32, kw, seed).state_dict()}, tmp_path / name)
    assert lspt_eval.main(["--data", str(data), "--tuned", tuned, "--checkpoint", str(tmp_path / "same.pth")]) == 0
    assert "warning" not in capsys.readouterr().err                  # the same weights, from a file
    assert lspt_eval.main(["--data", str(data), "--tuned", tuned, "--checkpoint", str(tmp_path / "other.pth")]) == 0
    err = capsys.readouterr().err
    assert re.search(r"lspt-eval: warning: the backbone is not the one the tuned file was trained on: --checkpoint "
                     r"\S*other.pth \(lspt-train recorded None\); its weights \(sha256 \w+\) are not the ones the "
                     r"file was tuned on \(\w+\)", err), err
