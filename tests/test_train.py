"""lspt-train / lspt-eval end to end on a synthetic dataset with a tiny random ViT (CPU): it learns, the
fused and reference steps train alike, eval reproduces the log, resume is bit-exact, Ctrl-C exits 130 with
a resumable state, DDP runs on 2 CPU processes, and every bad input of issue 11 is a clear error that loses
nothing already saved."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from synth_data import write_dataset

from lspt_kernels import evaluate as lspt_eval
from lspt_kernels import train as lspt_train
from lspt_kernels.encoders import METHODS

TINY = ["--model", "vit_tiny_patch16_224", "--img-size", "32",
        "--model-kwargs", "patch_size=8", "embed_dim=32", "depth=3", "num_heads=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("synth") / "data", "imagefolder", size=32)


def _args(data, out, *extra, method="lspt", epochs=2):
    return ["--data", str(data), *TINY, "--method", method, "--epochs", str(epochs), "--warmup-epochs", "1",
            "--batch-size", "8", "--lr", "2", "--workers", "0", "--device", "cpu", "--output", str(out), *extra]


def _log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def _files(out):
    """Every file of an output dir with its bytes (to show that nothing was changed)."""
    return {p.name: p.read_bytes() for p in Path(out).iterdir() if p.is_file()}


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
    encoder, cfg, meta = lspt_eval.rebuild_encoder(out / "best.safetensors")
    assert meta["epoch"] == best_epoch and cfg["method"] == "lspt"
    # lspt-eval on the best file: exactly the logged accuracy.
    assert lspt_eval.main(["--data", str(data), "--tuned", str(out / "best.safetensors")]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"top-1 {best:.2f}%" in line, line
    acc, correct, total = _eval_float(data, out / "best.safetensors")
    assert acc == best and total == 24


def _eval_float(data, path, split="val"):
    from lspt_kernels.data import ImageDataset, build_transform, load_dataset
    encoder, cfg, meta = lspt_eval.rebuild_encoder(path)
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
    import re
    assert re.search(pattern, err), err
    return err


def test_bad_data_dirs(data, tmp_path, capsys):
    _fails(capsys, _args(tmp_path / "missing", tmp_path / "o1"), "--data .*missing: no such directory")
    (tmp_path / "empty").mkdir()
    _fails(capsys, _args(tmp_path / "empty", tmp_path / "o2"), "--data .*empty is empty")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "notes.txt").write_text("x")
    _fails(capsys, _args(tmp_path / "odd", tmp_path / "o3"), "matches none of the layouts")
    vt = write_dataset(tmp_path / "vtab", "vtab", size=32, per_class=2)
    (vt / "val200.txt").write_text("images/val_red_000.png 9\n")
    _fails(capsys, _args(vt, tmp_path / "o4"), "val200.txt:1: label 9 is a class the train split lacks")
    (vt / "val200.txt").write_text("images/val_red_000.png -3\n")
    _fails(capsys, _args(vt, tmp_path / "o5"), "val200.txt:1: label -3 is out of range")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))     # nothing created for bad data


def test_unreadable_image_named_and_state_kept(data, tmp_path, capsys):
    import shutil
    root = shutil.copytree(data, tmp_path / "data")
    bad = sorted((root / "train" / "green").iterdir())[0]
    bad.write_bytes(b"\x89PNG broken")
    _fails(capsys, _args(root, tmp_path / "out"), f"cannot read image {bad}")
    assert torch.load(tmp_path / "out" / "resume.pt", weights_only=False)["epoch"] == 0   # resumable


def test_output_dir_of_another_run_and_resume_mismatch(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert lspt_train.main(_args(data, out, "--limit-train-batches", "1", epochs=1)) == 0
    capsys.readouterr()
    before = _files(out)
    _fails(capsys, _args(data, out, method="gapt"), "already holds a run .* pass --resume")
    _fails(capsys, _args(data, out, "--resume", method="gapt"), "different run; method: saved 'lspt', now 'gapt'")
    other = list(TINY)
    other[other.index("embed_dim=32")] = "embed_dim=48"
    argv = _args(data, out, "--resume")
    argv[argv.index(TINY[0]):argv.index(TINY[0]) + len(TINY)] = other
    _fails(capsys, argv, "different run; model_kwargs")
    # A dataset with another number of classes.
    fewer = write_dataset(tmp_path / "three", "imagefolder", size=32, per_class=2)
    import shutil
    for split in ("train", "val", "test"):
        shutil.rmtree(fewer / split / "yellow")
    _fails(capsys, _args(fewer, out, "--resume"), "different run; num_classes: saved 4, now 3")
    _fails(capsys, _args(data, tmp_path / "fresh", "--resume"), "holds no resume state")
    assert _files(out) == before


def test_unwritable_output(data, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    _fails(capsys, _args(data, tmp_path / "afile" / "out"), "--output .*afile/out is not writable")
    _fails(capsys, _args(data, tmp_path / "afile"), "--output .*afile exists and is not a directory")
    if os.geteuid() == 0:
        return      # root writes into a read-only directory; the NotADirectory case above covers the path
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        _fails(capsys, _args(data, ro / "out"), "--output .*ro/out is not writable")
    finally:
        ro.chmod(0o700)


def test_amp_and_device_errors(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(lspt_eval, "cpu_supports_bf16", lambda: False)
    _fails(capsys, _args(data, tmp_path / "o", "--amp", "bf16"), "--amp bf16: this CPU has no native bf16")
    _fails(capsys, _args(data, tmp_path / "o", "--amp", "fp16"), "--amp fp16 needs a GPU")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = _args(data, tmp_path / "o")
    argv[argv.index("--device") + 1] = "cuda"
    _fails(capsys, argv, "--device cuda: no CUDA GPU is available")
    assert not (tmp_path / "o").exists()


def test_option_errors(data, tmp_path, capsys):
    _fails(capsys, _args(data, tmp_path / "o", "--gate-init", "3"), "--gate-init applies to gapt only")
    _fails(capsys, _args(data, tmp_path / "o", "--cspc", "median"), "cspc must be one of")
    _fails(capsys, _args(data, tmp_path / "o", "--batch-size", "0"), "--batch-size must be >= 1")
    _fails(capsys, _args(data, tmp_path / "o", "--checkpoint", str(tmp_path / "none.pth")),
           "--checkpoint .*no such file")
    _fails(capsys, _args(data, tmp_path / "o", "--val-split", "test2"), "split 'test2' not found")
    argv = _args(data, tmp_path / "o")
    argv[argv.index("vit_tiny_patch16_224")] = "vit_nonexistent_model"
    _fails(capsys, argv, "--model 'vit_nonexistent_model'")
    assert not (tmp_path / "o").exists()


def test_help_lists_the_recipe_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        lspt_train.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    import re
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


def test_backbone_checkpoint_is_used_and_recorded(data, tmp_path, capsys):
    """--checkpoint loads the backbone through from_timm; the tuned file records it, so lspt-eval rebuilds the
    same backbone; ImageNet normalisation is used with a checkpoint."""
    from lspt_kernels.evaluate import build_backbone
    vit = build_backbone("vit_tiny_patch16_224", 32, dict(patch_size=8, embed_dim=32, depth=3, num_heads=2), seed=7)
    ckpt = tmp_path / "backbone.pth"
    torch.save({"model": vit.state_dict()}, ckpt)                     # MAE-style {'model': ...}
    out = tmp_path / "out"
    assert lspt_train.main(_args(data, out, "--checkpoint", str(ckpt), "--limit-train-batches", "2", epochs=1)) == 0
    assert "randomly initialised" not in capsys.readouterr().out
    encoder, _, meta = lspt_eval.rebuild_encoder(out / "last.safetensors")
    assert meta["checkpoint"] == str(ckpt.resolve()) and meta["mean"] == [0.485, 0.456, 0.406]
    torch.testing.assert_close(encoder.vit.pos_embed, vit.pos_embed, rtol=0, atol=0)   # not the seed-42 init
    acc, _, _ = _eval_float(data, out / "last.safetensors")
    assert acc == _log(out)[-1]["val_acc"]


def test_bf16_autocast_on_a_cpu_that_has_it(data, tmp_path, capsys):
    if not lspt_eval.cpu_supports_bf16():
        pytest.skip("this CPU has no native bf16 (the refusal is tested in test_amp_and_device_errors)")
    out = tmp_path / "bf16"
    assert lspt_train.main(_args(data, out, "--amp", "bf16", "--prompt-dropout", "0", "--limit-train-batches", "2",
                                 epochs=2)) == 0
    rows = _log(out)
    assert all(math.isfinite(r["train_loss"]) for r in rows)
    assert lspt_eval.rebuild_encoder(out / "last.safetensors")[2]["amp"] == "bf16"
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


def test_eval_bad_input(data, tmp_path, capsys):
    def fails(argv, pattern):
        import re
        assert lspt_eval.main(argv) == 2
        err = capsys.readouterr().err
        assert "lspt-eval: error:" in err and re.search(pattern, err), err
    fails(["--data", str(data), "--tuned", str(tmp_path / "none.safetensors")],
          "--tuned .*none.safetensors: no such file")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    fails(["--data", str(data), "--tuned", str(tmp_path / "junk.safetensors")], "is not a safetensors file")
    out = tmp_path / "run"
    assert lspt_train.main(_args(data, out, "--limit-train-batches", "1", method="linear", epochs=1)) == 0
    tuned = str(out / "last.safetensors")
    fails(["--data", str(data), "--tuned", tuned, "--split", "holdout"], "--split 'holdout'.*has no such split")
    fails(["--data", str(tmp_path / "nodata"), "--tuned", tuned], "no such directory")
    # A file from encoder.save_tuned alone names no backbone: --model is needed.
    encoder, _, _ = lspt_eval.rebuild_encoder(tuned)
    encoder.save_tuned(tmp_path / "plain.safetensors")
    fails(["--data", str(data), "--tuned", str(tmp_path / "plain.safetensors")], "does not name its backbone.*--model")


def test_grad_checkpointing_flag(data, tmp_path, capsys):
    """--grad-checkpointing trains to the same parameters as without it (recomputation changes memory, not
    results); with encoders that lack set_grad_checkpointing the flag is a clear error."""
    from lspt_kernels.encoders import PromptEncoder
    argv = lambda out, *x: _args(data, out, "--limit-train-batches", "2", *x, epochs=2)  # noqa: E731
    if not hasattr(PromptEncoder, "set_grad_checkpointing"):
        _fails(capsys, argv(tmp_path / "gc", "--grad-checkpointing"), "no set_grad_checkpointing")
        return
    assert lspt_train.main(argv(tmp_path / "plain")) == 0
    assert lspt_train.main(argv(tmp_path / "gc", "--grad-checkpointing")) == 0
    a, b = load_file(str(tmp_path / "plain" / "last.safetensors")), load_file(str(tmp_path / "gc" / "last.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-6, msg=name)
    assert json.loads((tmp_path / "gc" / "config.json").read_text())["grad_checkpointing"] is True
