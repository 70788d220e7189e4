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
from lspt_kernels.bench import runner
from lspt_kernels.bench.targets import FLOOR_TARGET, TARGET_TIME_SLACK

TINY = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--model-kwargs", "depth=2",
        "--batch-size", "1", "--repeats", "3", "--warmup", "1", "--num-prompts", "3", "--num-classes", "5"]


def _check_files(out, methods):
    data = json.loads((out / "bench.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert list(rows) == methods
    meta = data["meta"]
    for key in ("device_name", "torch", "timm", "triton", "command", "fused_backend"):
        assert key in meta
    assert meta["command"].startswith(("lspt-bench ", "python -m lspt_kernels.bench "))
    assert "--repeats 3" in meta["command"]
    for r in rows.values():
        assert r["status"] == "ok", r
        for key in ("train_s", "infer_s"):
            assert math.isfinite(r[key]) and r[key] > 0
            # median and quartiles over the interleaved rounds, every round kept
            assert r[f"{key}_q1"] <= r[key] <= r[f"{key}_q3"] and r[f"{key}_min"] <= r[f"{key}_q1"]
            assert len(r[f"{key}_all"]) == r[f"{key}_n"] == meta["repeats"]
        assert r["peak_memory_gb"] is not None and math.isfinite(r["peak_memory_gb"])
        assert r["trainable_params"] > 0 and r["total_params_ratio"] >= 1.0
        assert r["logits_shape"] == [1, 5] and r["logits_finite"]
    with open(out / "bench.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["method"] for t in table] == methods
    assert all(t["torch"] == torch.__version__ and t["command"] for t in table)
    assert all(float(t["train_s_q1"]) <= float(t["train_s"]) <= float(t["train_s_q3"]) for t in table)
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
    steps = len(methods) + 1                     # one memory process per method, then the timing pass
    for i in range(1, steps + 1):
        assert f"[{i}/{steps}] " in proc.stdout
    assert f"[{steps}/{steps}] timing 3 methods" in proc.stdout
    assert "Max Memory (GB)" in proc.stdout and "Training Time per Batch (s)" in proc.stdout
    assert "over VPT-Deep (per round): train" in proc.stdout and "Np/(2T)" in proc.stdout
    assert "machine load at start" in proc.stdout and "machine load at the end" in proc.stdout
    assert "interleaved rounds" in proc.stdout
    data, rows = _check_files(out, methods)
    assert data["meta"]["isolation"] == "subprocess per method"
    # Ratios to GaPT per round; LSPT's extra parameters over VPT-deep are exactly the LSTM cell's 8 D^2 + 8 D.
    assert rows["gapt"]["train_s_vs_gapt"] == pytest.approx(1.0)
    assert rows["gapt"]["train_s_vs_gapt_q1"] == pytest.approx(1.0) == rows["gapt"]["train_s_vs_gapt_q3"]
    ratios = sorted(a / b for a, b in zip(rows["lspt-fused"]["train_s_all"], rows["gapt"]["train_s_all"]))
    assert rows["lspt-fused"]["train_s_vs_gapt"] == pytest.approx(ratios[1])
    D = 192
    assert rows["lspt-fused"]["trainable_params"] - rows["vpt-deep"]["trainable_params"] == 8 * D * D + 8 * D
    assert rows["lspt-fused"]["floor_train_extra"] == pytest.approx(3 / (2 * (1 + 3 + 4)))
    assert rows["lspt-fused"]["backend"] == data["meta"]["fused_backend"]
    targets = {t["target"]: t for t in data["targets"]}
    assert "LSPT-fused peak memory <= GaPT x 1.01" in targets
    assert all(t["verdict"] in ("met", "missed", "inconclusive") for t in data["targets"])


def test_cli_all_methods_in_process(tmp_path, capsys):
    """main() with every method (the compiled row on aot_eager to keep it quick), in this process."""
    out = tmp_path / "out"
    rc = B.main([*TINY, "--device", "cpu", "--in-process", "--compile-backend", "aot_eager", "--output", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    data, rows = _check_files(out, B.bench_methods())
    assert rows["lspt-compile"]["compiled"] and rows["lspt-compile"]["compile_s"] >= 0
    assert rows["lspt-reference"]["backend"] == "reference"
    assert "compile time" in text and "3 interleaved rounds" in text


def test_cli_oom_is_reported_and_the_run_goes_on(tmp_path, capsys, monkeypatch):
    real = runner.make_encoder

    def build(method, spec, vit=None):
        if method == "gapt":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(method, spec, vit)

    monkeypatch.setattr(runner, "make_encoder", build)
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

    monkeypatch.setattr(runner.subprocess, "run", killed)
    spec = dict(model="vit_tiny_patch16_224", batch_size=4096, num_prompts=10, dtype="fp32", device="cpu")
    row = B.measure_isolated("gapt", spec)
    assert row["status"] == "oom" and "out of memory" in row["error"] and row["method"] == "gapt"
    text = B.format_table([row])
    assert "OOM" in text


@pytest.mark.parametrize("args, message", [
    (["--model", "vit_base_patch16_2244"], "--model 'vit_base_patch16_2244': unknown timm model; did you mean"),
    (["--model", "resnet18"], "'resnet18' is a timm.models.resnet.ResNet, not a timm VisionTransformer"),
    (["--methods", "lspt-fast,gapt"], "--methods: lspt-fast not allowed"),
    (["--compile-mode", "reduce-overhead", "--device", "cpu"], "--compile-mode reduce-overhead uses CUDA graphs"),
    (["--dtype", "int8"], "--dtype: int8 not allowed"),
    (["--batch-size", "0"], "--batch-size: 0 not allowed"),
    (["--batch-size", "four"], "--batch-size: 'four' is not a valid int"),
    (["--model-kwargs", "depth"], "--model-kwargs expects KEY=VALUE"),
    (["--model-arg", "depth"], "--model-arg expects KEY=VALUE"),          # the hidden alias names itself
    (["--device", "tpu"], "--device: expected cpu, cuda or cuda:N, got 'tpu'"),
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
    assert f"--output {blocker / 'out'} is not writable" in err


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
    assert rc == 2 and f"--output {ro} is not writable" in capsys.readouterr().err


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


def test_help_has_no_doubled_defaults_and_every_option_has_help(capsys):
    """'(default: ...)' once per option, --seed explained, and the --model-arg alias hidden."""
    import re
    with pytest.raises(SystemExit):
        B.main(["--help"])
    text = capsys.readouterr().out
    blocks = re.split(r"\n  (?=-)", text.split("options:", 1)[1])
    for block in blocks:
        assert block.count("(default") <= 1, block
        assert "default: None" not in block, block
    seed = next(b for b in blocks if b.startswith("--seed"))
    assert "seed of the random" in seed
    assert "lspt-bench step" in text and "gpu-suite" in text
    assert "--model-kwargs" in text and "--model-arg" not in text


def test_methods_come_from_the_encoder_table(tmp_path, capsys, monkeypatch):
    """A method added to lspt_kernels.encoders.METHODS is benchmarked without a change here, built
    through build_encoder."""
    from lspt_kernels import encoders
    built = []

    def toy(vit, **kw):
        built.append(kw)
        return encoders.VPTEncoder(vit, deep=False, **kw)

    monkeypatch.setitem(encoders.METHODS, "toy", toy)
    assert "toy" in B.bench_methods()
    assert [m for m in B.bench_methods() if m.startswith("lspt")] == ["lspt-reference", "lspt-fused", "lspt-compile"]
    assert all(m in B.bench_methods() for m in encoders.METHODS if m != "lspt")
    out = tmp_path / "out"
    rc = B.main([*TINY, "--device", "cpu", "--in-process", "--methods", "toy,gapt,lspt", "--no-plot",
                 "--output", str(out)])
    assert rc == 0, capsys.readouterr()
    rows = {r["method"]: r for r in json.loads((out / "bench.json").read_text())["rows"]}
    assert list(rows) == ["toy", "gapt", "lspt-fused"]          # "lspt" is the alias of lspt-fused
    assert rows["toy"]["status"] == "ok" and built and built[0]["num_prompts"] == 3


def _decoy(tmp_path):
    """A directory holding a folder named lspt_kernels that must never be imported."""
    marker = tmp_path / "decoy-imported"
    pkg = tmp_path / "cwd" / "lspt_kernels"
    (pkg / "bench").mkdir(parents=True)
    code = f"open({str(marker)!r}, 'w').write('imported')\nraise SystemExit('decoy lspt_kernels imported')\n"
    (pkg / "__init__.py").write_text(code)
    (pkg / "bench" / "__init__.py").write_text(code)
    return tmp_path / "cwd", marker


def test_child_processes_ignore_a_package_in_the_working_directory(tmp_path, monkeypatch):
    """The workers import the parent's package, not ./lspt_kernels."""
    cwd, marker = _decoy(tmp_path)
    monkeypatch.chdir(cwd)
    proc = subprocess.run(B.child_command(["--help"]), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "usage: lspt-bench" in proc.stdout and not marker.exists()
    # why: python -m from this directory would run the decoy
    old = subprocess.run([sys.executable, "-m", "lspt_kernels.bench", "--help"], capture_output=True, text=True,
                         timeout=120, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert old.returncode != 0 and marker.exists()


def test_cli_run_from_a_directory_with_a_decoy_package(tmp_path):
    """The whole command, one fresh process per method, started in a directory holding a decoy."""
    import lspt_kernels
    cwd, marker = _decoy(tmp_path)
    real = os.path.dirname(os.path.dirname(lspt_kernels.__file__))
    boot = (f"import sys; sys.path.insert(0, {real!r}); from lspt_kernels.bench import main; "
            "sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", boot, *TINY, "--device", "cpu", "--methods", "linear",
                           "--no-plot", "--output", str(tmp_path / "out")],
                          cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not marker.exists()
    row = json.loads((tmp_path / "out" / "bench.json").read_text())["rows"][0]
    assert row["status"] == "ok" and row["peak_memory_gb"] is not None


@pytest.fixture
def checkpointing_calls(monkeypatch):
    """The `enable` argument of every PromptEncoder.set_grad_checkpointing call made in the test."""
    from lspt_kernels.encoders import PromptEncoder
    calls, real = [], PromptEncoder.set_grad_checkpointing

    def recording(self, enable=True, **kw):
        calls.append(enable)
        return real(self, enable, **kw)

    monkeypatch.setattr(PromptEncoder, "set_grad_checkpointing", recording)
    return calls


def test_grad_checkpointing_option(tmp_path, capsys, checkpointing_calls):
    """--grad-checkpointing both: every setting with and without it, the encoder's
    set_grad_checkpointing(True) called; the gradient-checkpointing memory/time targets evaluated."""
    calls = checkpointing_calls
    out = tmp_path / "out"
    rc = B.main([*TINY, "--device", "cpu", "--in-process", "--grad-checkpointing", "both", "--no-plot",
                 "--methods", "gapt,lspt-fused", "--output", str(out)])
    assert rc == 0, capsys.readouterr()
    data = json.loads((out / "bench.json").read_text())
    assert [(r["method"], r["grad_checkpointing"]) for r in data["rows"]] == [
        ("gapt", False), ("lspt-fused", False), ("gapt", True), ("lspt-fused", True)]
    # the time target always (both have rounds); the memory one needs a non-zero tiny-model RSS figure
    assert any(t["target"].startswith("grad checkpointing: lspt-fused train time") for t in data["targets"])
    assert calls and all(calls)


# ------------------------------------------------------------------------------------------------
# --task segmentation
# ------------------------------------------------------------------------------------------------
SEG_TINY = ["--task", "segmentation", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--model-kwargs",
            "patch_size=8", "embed_dim=32", "depth=3", "num_heads=2", "--head-channels", "8", "--batch-size", "2",
            "--repeats", "3", "--warmup", "1", "--num-prompts", "3", "--num-classes", "5", "--device", "cpu"]
SEG_METHODS = ["vpt-deep", "gapt", "lspt-fused"]


def _seg_spec(**over):
    spec = dict(task="segmentation", model="vit_tiny_patch16_224", img_size=32, head_channels=8, batch_size=2,
                model_kwargs=dict(patch_size=8, embed_dim=32, depth=3, num_heads=2, dynamic_img_size=True),
                num_prompts=3, num_classes=5, dtype="fp32", device="cpu", seed=0, fused_backend="auto")
    return dict(spec, **over)


def test_cli_segmentation_tiny_run(tmp_path, capsys):
    """--task segmentation: the default methods (VPT-deep, GaPT, LSPT-fused), each row the segmentation step
    (logits at the crop size, the heads among the trainable parameters), ratios to GaPT per round."""
    out = tmp_path / "out"
    rc = B.main([*SEG_TINY, "--in-process", "--output", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    data = json.loads((out / "bench.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert list(rows) == SEG_METHODS
    meta = data["meta"]
    assert meta["task"] == "segmentation" and meta["feature_blocks"] == [0, 1, 2] and meta["num_classes"] == 5
    assert meta["model_kwargs"]["dynamic_img_size"] is True        # built as segmentation training builds it
    D = 32
    for r in rows.values():
        assert r["status"] == "ok" and r["task"] == "segmentation", r
        assert r["logits_shape"] == [2, 5, 32, 32] and r["logits_finite"] and math.isfinite(r["loss"])
        assert r["tokens"] == 1 + 3 + 16 and r["img_size"] == 32 and r["head_channels"] == 8
        assert 0 < r["head_params"] < r["trainable_params"]
        for key in ("train_s", "infer_s"):
            assert len(r[f"{key}_all"]) == r[f"{key}_n"] == 3 and r[f"{key}_q1"] <= r[key] <= r[f"{key}_q3"]
    assert len({r["head_params"] for r in rows.values()}) == 1     # the same heads on every method
    assert rows["lspt-fused"]["trainable_params"] - rows["vpt-deep"]["trainable_params"] == 8 * D * D + 8 * D
    ratios = sorted(a / b for a, b in zip(rows["lspt-fused"]["train_s_all"], rows["gapt"]["train_s_all"]))
    assert rows["lspt-fused"]["train_s_vs_gapt"] == pytest.approx(ratios[1])
    assert "segmentation step (SETR-PUP heads), vit_tiny_patch16_224, 32 px crops, batch 2, Np 3" in text
    assert "T = 20 tokens" in text and "Trainable includes the heads'" in text
    with open(out / "bench.csv") as f:
        assert {t["task"] for t in csv.DictReader(f)} == {"segmentation"}
    targets = {t["target"]: t for t in data["targets"]}
    assert FLOOR_TARGET in targets
    assert all(t["task"] == "segmentation" for t in data["targets"])


def test_segmentation_targets_on_the_cpu():
    """Segmentation rows get the CPU memory target and the VPT-deep floor target, the latter marked as the
    backbone's floor (loose for a step that also runs the heads)."""
    def row(method, train, mem):
        return dict(method=method, task="segmentation", model="m", batch_size=1, num_prompts=100, dtype="fp32",
                    device="cpu", status="ok", peak_memory_gb=mem, tokens=1125, train_s_all=[train] * 3,
                    train_s=train, backend="cpu" if method == "lspt-fused" else None)
    rows = [row("vpt-deep", 1.0, 2.8), row("gapt", 1.0, 2.8), row("lspt-fused", 1.05, 2.9)]
    B.add_comparisons(rows)
    targets = {t["target"]: t for t in B.evaluate_targets(rows)}
    floor = targets[FLOOR_TARGET]
    assert floor["limit"] == pytest.approx(1 + 100 / 2250 + TARGET_TIME_SLACK) and floor["verdict"] == "met"
    assert "the heads' time lowers" in floor["detail"]
    assert targets["LSPT-fused peak memory <= GaPT x 1.01"]["verdict"] == "missed"       # 2.9 / 2.8
    assert {t["task"] for t in targets.values()} == {"segmentation"}


def test_segmentation_memory_in_a_fresh_process():
    """The CPU memory pass of a segmentation row in its own process (the worker), as the command runs it."""
    row = B.measure_isolated("lspt-fused", _seg_spec(warmup=1, mem_steps=1))
    assert row["status"] == "ok", row
    assert row["task"] == "segmentation" and row["logits_shape"] == [2, 5, 32, 32]
    assert row["peak_memory_gb"] is not None and math.isfinite(row["peak_memory_gb"])


@pytest.mark.parametrize("device, expected", [
    ("cpu", dict(batch_sizes=[1], prompts=[100], dtypes=["fp32"], repeats=3)),
    ("cuda", dict(batch_sizes=[16], prompts=[100], dtypes=["fp32", "bf16"], repeats=10)),
])
def test_segmentation_defaults(device, expected):
    """The paper's appendix A.1 setting: 512 px crops, Np 100, 150 classes, VPT-deep / GaPT / LSPT-fused;
    batch 16 (the recipe's) on a GPU, a CPU-sized run on the CPU. Classification keeps its own."""
    from lspt_kernels.bench.cli import build_parser, check_args
    a = check_args(build_parser().parse_args(["--task", "segmentation"]), device)
    assert {k: a[k] for k in expected} == expected
    assert a["img_size"] == 512 and a["num_classes"] == 150 and a["methods"] == SEG_METHODS
    cls = check_args(build_parser().parse_args([]), device)
    assert cls["img_size"] is None and cls["num_classes"] == 200 and cls["methods"] == B.bench_methods()


def test_segmentation_grad_checkpointing(tmp_path, capsys, checkpointing_calls):
    """--grad-checkpointing both with --task segmentation: the encoders run checkpointed, the step computes
    the same loss, and each checkpointed row gets its memory and time over the plain run (no
    classification-calibrated target)."""
    calls = checkpointing_calls
    out = tmp_path / "out"
    rc = B.main([*SEG_TINY, "--in-process", "--grad-checkpointing", "both", "--no-plot", "--methods", "gapt,lspt",
                 "--output", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    data = json.loads((out / "bench.json").read_text())
    rows = {(r["method"], r["grad_checkpointing"]): r for r in data["rows"]}
    assert list(rows) == [("gapt", False), ("lspt-fused", False), ("gapt", True), ("lspt-fused", True)]
    assert calls and all(calls)
    for m in ("gapt", "lspt-fused"):
        on, off = rows[(m, True)], rows[(m, False)]
        assert on["loss"] == pytest.approx(off["loss"], rel=1e-5)
        assert on["train_s_vs_plain"] == pytest.approx(on["train_s"] / off["train_s"])
        assert "train_s_vs_plain" not in off
    assert "with gradient checkpointing, over its plain run: peak memory" in text
    assert not any(t["target"].startswith("grad checkpointing") for t in data["targets"])


def test_rows_of_two_tasks_are_never_compared():
    """Rows of the same model, batch, Np and dtype but another task are another setting; the paper's GPU
    targets (classification, Np 10, bf16) are not applied to segmentation rows."""
    def row(method, task, train):
        return dict(method=method, task=task, model="m", batch_size=1, num_prompts=10, dtype="bf16",
                    device="cuda", status="ok", peak_memory_gb=1.0, tokens=207, train_s_all=[train] * 3,
                    infer_s_all=[train] * 3, **{"train_s": train, "infer_s": train})
    rows = [row(m, t, v) for t in ("classification", "segmentation") for m, v in (("gapt", 1.0), ("lspt-fused", 2.0))]
    rows[1]["train_s_all"] = [2.0, 2.0, 2.0]
    rows[3]["train_s_all"] = rows[3]["infer_s_all"] = [4.0, 4.0, 4.0]
    rows[3]["train_s"] = rows[3]["infer_s"] = 4.0
    B.add_comparisons(rows)
    assert rows[1]["train_s_vs_gapt"] == pytest.approx(2.0) and rows[3]["train_s_vs_gapt"] == pytest.approx(4.0)
    targets = B.evaluate_targets(rows)
    gpu = [t for t in targets if t["target"].startswith("GPU:")]
    assert gpu and {t["task"] for t in gpu} == {"classification"}
    table = B.format_table(rows)
    assert table.count("Method ") == 2 and "segmentation step (SETR-PUP heads), m" in table


@pytest.mark.parametrize("args, message", [
    (["--task", "segmentation", "--model", "vit_tiny_patch16_224", "--model-kwargs", "depth=2"],
     "--task segmentation needs a ViT of at least 3 blocks"),
    (["--head-channels", "8"], "--head-channels 8: needs --task segmentation"),
    (["--task", "segmentation", "--head-channels", "0"], "--head-channels 0: needs --task segmentation and a value"),
    (["--task", "segmentation", "--img-size", "0"], "--img-size must be >= 1"),
])
def test_cli_segmentation_bad_input(tmp_path, capsys, args, message):
    rc = B.main([*args, "--device", "cpu", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("lspt-bench: error: ") and message in err, err
    assert not (tmp_path / "out" / "bench.json").exists()


def test_gpu_suite_plans_the_segmentation_step(tmp_path, capsys):
    """gpu-suite's segmentation part: its own cap and output folder, and a command that lspt-bench accepts
    as the paper's appendix A.1 setting on a GPU (checked here without one)."""
    from lspt_kernels.bench import gpu_suite
    from lspt_kernels.bench.cli import build_parser, check_args
    part = next(p for p in gpu_suite.plan(tmp_path) if p["name"] == "segmentation")
    assert gpu_suite.PART_CAPS["segmentation"] > 0
    assert part["files"] == ["segmentation/bench.json", "segmentation/bench.csv", "segmentation/bench.png"]
    argv = part["argv"][5:]                                     # after the child interpreter's boot arguments
    args = build_parser().parse_args(argv)
    a = check_args(args, "cuda")
    assert args.task == "segmentation" and args.device == "cuda" and args.output == str(tmp_path / "segmentation")
    assert a["img_size"] == 512 and a["prompts"] == [100] and a["batch_sizes"] == [16]
    assert a["dtypes"] == ["fp32", "bf16"] and a["methods"] == SEG_METHODS
    assert B.main(["gpu-suite", "--output", str(tmp_path), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert f"- segmentation (at most {gpu_suite.PART_CAPS['segmentation']} s)" in text
    assert "--task segmentation" in text and str(tmp_path / "segmentation") in text


def test_checkpointed_rows_over_their_plain_run():
    """A checkpointed row's peak memory over its plain run's, and its train time as the ratio of the
    medians of the two timing passes, the spread from their quartiles."""
    def row(ckpt, mem, times):
        return dict(method="lspt-fused", task="segmentation", model="m", batch_size=1, num_prompts=10,
                    dtype="fp32", grad_checkpointing=ckpt, device="cpu", status="ok", peak_memory_gb=mem,
                    **{"train_s": times[1], "train_s_q1": times[0], "train_s_q3": times[2], "train_s_min": times[0],
                       "train_s_max": times[2], "train_s_n": 3})
    off, on = row(False, 2.0, [1.0, 2.0, 3.0]), row(True, 1.5, [3.0, 3.0, 6.0])
    B.add_comparisons([off, on])
    assert on["peak_memory_gb_vs_plain"] == pytest.approx(0.75)
    assert on["train_s_vs_plain"] == pytest.approx(1.5)
    assert (on["train_s_vs_plain_q1"], on["train_s_vs_plain_q3"]) == (pytest.approx(1.0), pytest.approx(6.0))
    assert "peak_memory_gb_vs_plain" not in off
    assert "over its plain run: peak memory 0.750x, train time 1.500 [1.000-6.000]x" in B.format_table([off, on])
