"""`lspt-bench` (lspt_kernels.bench): a tiny run end to end, its files, and its bad-input messages."""
import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from lspt_kernels import bench as B

TINY = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--model-arg", "depth=2",
        "--batch-size", "1", "--repeats", "1", "--warmup", "1", "--num-prompts", "3", "--num-classes", "5"]


def _check_files(out, methods):
    data = json.loads((out / "bench.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert list(rows) == methods
    meta = data["meta"]
    for key in ("device_name", "torch", "timm", "triton", "command", "fused_backend"):
        assert key in meta
    assert meta["command"].startswith(("lspt-bench ", "python -m lspt_kernels.bench ")) and "--repeats 1" in meta["command"]
    for r in rows.values():
        assert r["status"] == "ok", r
        for key in ("train_s", "infer_s"):
            assert math.isfinite(r[key]) and r[key] > 0
        assert r["peak_memory_gb"] is not None and math.isfinite(r["peak_memory_gb"])
        assert r["trainable_params"] > 0 and r["total_params_ratio"] >= 1.0
        assert r["logits_shape"] == [1, 5] and r["logits_finite"]
    with open(out / "bench.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["method"] for t in table] == methods
    assert all(t["torch"] == torch.__version__ and t["command"] for t in table)
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return data, rows


def test_cli_tiny_run_in_fresh_processes(tmp_path):
    """The console entry point as users run it: one fresh process per method (CPU peak RSS)."""
    methods = ["vpt-deep", "gapt", "lspt-fused"]
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "lspt_kernels.bench", *TINY, "--device", "cpu",
                           "--methods", ",".join(methods), "--output", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for i, m in enumerate(methods, 1):
        assert f"[{i}/{len(methods)}] " in proc.stdout
    assert "Max Memory (GB)" in proc.stdout and "Training Time per Batch (s)" in proc.stdout
    assert "over VPT-Deep: train" in proc.stdout and "Np/(2T)" in proc.stdout
    data, rows = _check_files(out, methods)
    assert data["meta"]["isolation"] == "subprocess per method"
    # Ratios to GaPT; LSPT's extra parameters over VPT-deep are exactly the LSTM cell's 8 D^2 + 8 D.
    assert rows["gapt"]["train_s_vs_gapt"] == pytest.approx(1.0)
    D = 192
    assert rows["lspt-fused"]["trainable_params"] - rows["vpt-deep"]["trainable_params"] == 8 * D * D + 8 * D
    assert rows["lspt-fused"]["floor_train_extra"] == pytest.approx(3 / (2 * (1 + 3 + 4)))
    assert rows["lspt-fused"]["backend"] == data["meta"]["fused_backend"]
    assert {t["target"] for t in data["targets"]} >= {"LSPT-fused peak memory <= GaPT x 1.02"}


def test_cli_all_methods_in_process(tmp_path, capsys):
    """main() with every method (the compiled row on aot_eager to keep it quick), in this process."""
    out = tmp_path / "out"
    rc = B.main([*TINY, "--device", "cpu", "--in-process", "--compile-backend", "aot_eager", "--interleave",
                 "--output", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    data, rows = _check_files(out, list(B.METHODS))
    assert rows["lspt-compile"]["compiled"] and rows["lspt-compile"]["compile_s"] >= 0
    assert rows["lspt-reference"]["backend"] == "reference"
    assert "compile time" in text and "[interleaved] done" in text
    # --interleave: every method timed again, alternating, and the time targets use those times
    for r in rows.values():
        assert len(r["train_s_interleaved_all"]) == 1 and math.isfinite(r["train_s_interleaved"])
        assert r["infer_s_interleaved"] > 0
    timed = [t for t in data["targets"] if "timing" in t]
    assert timed and all(t["timing"] == "train_s_interleaved" for t in timed)


def test_cli_oom_is_reported_and_the_run_goes_on(tmp_path, capsys, monkeypatch):
    real = B.build_encoder

    def build(method, spec):
        if method == "gapt":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(method, spec)

    monkeypatch.setattr(B, "build_encoder", build)
    out = tmp_path / "out"
    rc = B.main([*TINY, "--device", "cpu", "--in-process", "--methods", "linear,gapt,vpt-deep", "--output", str(out)])
    cap = capsys.readouterr()
    assert rc == 1
    assert "OOM" in cap.out and "out of memory" in cap.out
    assert "GaPT" in cap.err and "OOM" in cap.err
    rows = {r["method"]: r for r in json.loads((out / "bench.json").read_text())["rows"]}
    assert rows["gapt"]["status"] == "oom" and "OutOfMemoryError" in rows["gapt"]["error"]
    assert rows["linear"]["status"] == rows["vpt-deep"]["status"] == "ok"     # kept, and went on
    assert (out / "bench.png").exists()


def test_a_killed_measuring_process_is_reported_as_oom(monkeypatch):
    """The CPU OOM killer ends the fresh process of a method: its row says so, nothing else breaks."""
    def killed(cmd, **kw):
        return subprocess.CompletedProcess(cmd, -9, stdout="Killed\n")

    monkeypatch.setattr(B.subprocess, "run", killed)
    spec = dict(model="vit_tiny_patch16_224", batch_size=4096, num_prompts=10, dtype="fp32", device="cpu")
    row = B.measure_isolated("gapt", spec)
    assert row["status"] == "oom" and "out of memory" in row["error"] and row["method"] == "gapt"
    text = B.format_table([row])
    assert "OOM" in text


@pytest.mark.parametrize("args, message", [
    (["--model", "vit_base_patch16_2244"], "unknown timm model 'vit_base_patch16_2244'; did you mean"),
    (["--model", "resnet18"], "'resnet18' is a timm.models.resnet.ResNet, not a timm VisionTransformer"),
    (["--methods", "lspt,gapt"], "--methods: lspt not allowed"),
    (["--dtype", "int8"], "--dtype: int8 not allowed"),
    (["--batch-size", "0"], "--batch-size: 0 not allowed"),
    (["--batch-size", "four"], "--batch-size: 'four' is not a valid int"),
    (["--model-arg", "depth"], "--model-arg must be KEY=VALUE"),
])
def test_cli_bad_input(tmp_path, capsys, args, message):
    rc = B.main([*args, "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("lspt-bench: error: ") and message in err, err
    assert not (tmp_path / "out" / "bench.json").exists()


def test_cli_unwritable_output_dir(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    rc = B.main([*TINY, "--output", str(blocker / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "cannot write to output directory" in err and str(blocker / "out") in err and "--output" in err


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True,
                    reason="root can write to a read-only directory")
def test_cli_read_only_output_dir(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        rc = B.main([*TINY, "--output", str(ro)])
    finally:
        ro.chmod(0o700)
    assert rc == 2 and "cannot write to output directory" in capsys.readouterr().err


def test_cli_no_cuda_device(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    rc = B.main(["--device", "cuda"])
    assert rc == 2 and "no CUDA device is visible" in capsys.readouterr().err


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        B.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--model", "--batch-size", "--num-prompts", "--dtype", "--device", "--methods", "--repeats",
                "--output"):
        assert opt in text
