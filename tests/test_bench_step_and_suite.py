"""`lspt-bench step` (the fused step, its host cost alone and per block inside the encoder, compiled
encoders) and `lspt-bench gpu-suite` without a GPU."""
import json
import sys

import pytest
import torch

from lspt_kernels import backends
from lspt_kernels import bench as B
from lspt_kernels.bench import compiled, gpu_suite, host, step


def test_step_cli_writes_spreads_speedups_host_overhead_and_verdicts(tmp_path, capsys):
    out = tmp_path / "step.json"
    rc = B.main(["step", "--tables", "steps,host", "--batch", "2", "--num-prompts", "3", "--repeats", "3",
                 "--warmup", "1", "--backends", "eager", "cpu", "--threads", "1", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "machine load at start" in text and "host overhead per call" in text
    data = json.loads(out.read_text())
    assert data["meta"]["command"].endswith("step --tables steps,host --batch 2 --num-prompts 3 --repeats 3 "
                                            "--warmup 1 --backends eager cpu --threads 1 --json " + str(out))
    rows = {r["backend"]: r for r in data["rows"]}
    assert set(rows) == {"eager", "cpu"}
    for r in rows.values():
        if "skipped" in r:
            continue
        for key in ("fwd_ms", "fwd_bwd_ms"):
            assert r[f"{key}_q1"] <= r[key] <= r[f"{key}_q3"] and len(r[f"{key}_all"]) == 3
        assert r["fwd_bwd_speedup_n"] == 3 and r["fwd_bwd_of_floor"] > 0
    assert rows["eager"]["fwd_bwd_speedup"] == pytest.approx(1.0)
    over = {(r["api"], r["backend"]): r for r in data["host_overhead"]}
    for api in ("encoder", "lspt_step"):
        r = over[(api, "eager")]
        assert r["fwd_bwd_us"] > 0 and r["fwd_us"] > 0 and r["threads"] == 1
    assert set(over) == {(api, b) for api in ("encoder", "lspt_step") for b in ("eager", "cpu")}
    assert torch.get_num_threads() == 1            # --threads 1 kept; host_overhead restored what it found
    if "skipped" not in rows["cpu"]:
        (t,) = [t for t in data["targets"] if t["backend"] == "cpu"]
        assert t["verdict"] in ("met", "missed", "inconclusive") and t["n"] == 3


@pytest.mark.parametrize("argv, message", [
    (["--backends", "fast"], "--backends: unknown fast"),
    (["--tables", "steps,speed"], "--tables: unknown speed"),
    (["--tables", "compiled"], "--tables compiled needs --device cuda"),
])
def test_step_bad_input_is_an_argparse_error(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        step.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_encoder_host_rows_and_verdicts():
    """The encoder-level host table: per LSPT block beyond VPT-deep, in us and F.linear units, with the
    spread over the rounds, forward+backward and no_grad; targets only for the fused backends."""
    if backends.unavailable_reason("cpu"):
        pytest.skip(f"cpu backend unavailable: {backends.unavailable_reason('cpu')}")
    threads = torch.get_num_threads()
    rows = host.encoder_host_overhead(("cpu", "eager"), repeats=3, warmup=1, inner=2)
    assert torch.get_num_threads() == threads                  # one thread while timing, then restored
    assert [r["backend"] for r in rows] == ["cpu", "eager"]
    for r in rows:
        for key in ("fwd_bwd_us", "fwd_us", "fwd_bwd_units", "fwd_units", "linear_us"):
            assert r[f"{key}_q1"] <= r[key] <= r[f"{key}_q3"] and r[f"{key}_n"] == 3, (key, r)
        assert r["linear_us"] > 0
        assert r["fwd_bwd_units"] == pytest.approx(r["fwd_bwd_us"] / r["linear_us"], rel=0.6)
    targets = host.evaluate_targets(rows)
    assert [(t["backend"], t["limit"]) for t in targets] == [("cpu", 2.0), ("cpu", 0.5)]
    assert all(t["verdict"] in ("met", "missed", "inconclusive") for t in targets)
    assert "one F.linear forward+backward" in host.format_table(rows)


def test_interleaved_calls_alternate_single_calls():
    order = []
    times, errors = host.interleaved_calls({"a": lambda: order.append("a"), "b": lambda: order.append("b"),
                                            "bad": lambda: 1 / 0}, rounds=2, inner=2)
    assert order == ["a", "b", "b", "a", "a", "b", "a", "b"]    # one call each in turn, the order rotating
    assert set(times) == {"a", "b"} and len(times["a"]) == 2 and "ZeroDivisionError" in errors["bad"]


def _tiny_compiled(modes, compile_backend="aot_eager"):
    return compiled.run("cpu", model="vit_tiny_patch16_224", batch=2, num_prompts=3, dtype="fp32", repeats=2,
                        warmup=1, modes=modes, compile_backend=compile_backend, img_size=32,
                        model_kwargs=dict(patch_size=8, embed_dim=32, depth=2, num_heads=2))


def test_compiled_encoder_rows_eager():
    """The compiled-encoders table's rows and LSPT / GaPT ratios (eager mode only: no compile time)."""
    rows = _tiny_compiled(("eager",))
    assert [(r["method"], r["mode"]) for r in rows] == [("lspt-fused", "eager"), ("gapt", "eager")]
    lspt = rows[0]
    assert lspt["train_ms"] > 0 and lspt["train_ms_over_gapt_n"] == 2 and lspt["first_call_s"] > 0
    assert "x GaPT" in compiled.format_table(rows)
    with pytest.raises(ValueError, match="reduce-overhead.*needs device='cuda'"):
        compiled.run("cpu", modes=("reduce-overhead",))


@pytest.mark.slow
def test_compiled_encoder_rows_compiled():
    rows = _tiny_compiled(("eager", "default"))
    assert all("skipped" not in r for r in rows), rows
    assert {r["mode"] for r in rows if r.get("train_ms_over_gapt")} == {"eager", "default"}


def test_step_compile_backend_under_aot_eager(monkeypatch):
    """step.run with the torch.compile row at a tiny size (aot_eager: no C++ compile in CI)."""
    import functools
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    rows = step.run([2], [3], repeats=2, warmup=1, backends=["eager", "compile"], num_patches=4, dim=8,
                    peaks=dict(flops_per_s=1e12, bytes_per_s=1e11, how="nominal"))
    assert [r["backend"] for r in rows] == ["eager", "compile"]
    assert all("skipped" not in r and r["fwd_ms"] > 0 for r in rows), rows


def test_gpu_suite_dry_run_prints_the_plan(tmp_path, capsys):
    rc = B.main(["gpu-suite", "--output", str(tmp_path / "gpu"), "--dry-run"])
    text = capsys.readouterr().out
    assert rc == 0
    for part in gpu_suite.PARTS:
        assert f"- {part} (at most" in text
    assert ("pytest tests/test_cuda_gpu.py tests/test_step.py tests/test_grouped_step.py "
            "-k '(cuda or triton) and not compute_sanitizer'") in text
    assert "pytest tests/test_cuda_gpu.py -k 'compute_sanitizer and memcheck'" in text
    assert "--tables compiled --batch 64 --num-prompts 10" in text
    assert "--batch-size 64 --num-prompts 10,100 --dtype fp32,bf16" in text and "--dtype bfloat16" in text
    assert len(gpu_suite.FILES) <= 8 and all(f in text for f in gpu_suite.FILES)
    assert not (tmp_path / "gpu").exists()          # a dry run writes nothing


def test_gpu_suite_plan_holds_the_new_gpu_cases():
    """The GPU parts select the D = 768 many-row cases, both backends' sanitizer runs at the paper's
    shape, and the compiled encoders (tests of the plan: the suite itself needs a GPU)."""
    from pathlib import Path

    import test_cuda_gpu
    parts = {p["name"]: p for p in gpu_suite.plan(Path("/tmp/x"))}
    names = [n for n in dir(test_cuda_gpu) if n.startswith("test_")]
    selected = [n for n in names if "compute_sanitizer" not in n]
    assert "test_vit_b_width_with_many_rows" in selected and "test_step_under_compute_sanitizer" in names
    assert (64, 10, 196, 768, 1) == tuple(eval(test_cuda_gpu.SANITIZED_STEP.split("for B, Np, N, D, k, dt in [(")[1]
                                                .split(", torch.")[0]))
    argv = parts["sanitizer"]["argv"]
    assert argv[argv.index("-k") + 1] == "compute_sanitizer and memcheck"
    step_args = parts["compiled"]["argv"][0]
    assert step_args[step_args.index("--tables") + 1] == "compiled" and set(compiled.MODES) == {
        "eager", "default", "reduce-overhead"} and set(compiled.METHODS) == {"lspt-fused", "gapt"}


def test_gpu_suite_refuses_unknown_parts(tmp_path, capsys):
    assert B.main(["gpu-suite", "--output", str(tmp_path), "--parts", "tests,warp", "--dry-run"]) == 2
    assert "--parts: unknown warp" in capsys.readouterr().err
    assert B.main(["gpu-suite", "--output", str(tmp_path), "--parts", "compiled", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "- compiled (at most" in out and "- tests (at most" not in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_gpu_suite_without_a_gpu_exits_2(tmp_path, capsys):
    rc = B.main(["gpu-suite", "--output", str(tmp_path / "gpu")])
    err = capsys.readouterr().err
    assert rc == 2 and "no CUDA GPU is visible" in err and "--dry-run" in err
    assert not (tmp_path / "gpu").exists()


def test_gpu_suite_runs_its_parts_within_budget_and_summarises(tmp_path, capsys, monkeypatch):
    """The orchestration on the CPU with stand-in parts: logging, a part stopped at its budget, the
    summary of targets and test counts, at most 8 files."""
    out = tmp_path / "gpu"

    def fake_plan(out_dir, with_compile=False, parts=gpu_suite.PARTS):
        table = ("import json, pathlib; d = pathlib.Path(%r); "
                 "d.joinpath('bench.json').write_text(json.dumps(dict(meta=dict(device_name='Fake GPU'), rows=[], "
                 "targets=[dict(target='GPU: LSPT-fused / GaPT train time <= 1', verdict='inconclusive', "
                 "batch_size=64, num_prompts=10, dtype='bf16', detail='1.002x [0.99x .. 1.01x]')]))); "
                 "print('table done')" % str(out_dir))
        junit = ('<testsuites><testsuite tests="5" failures="1" errors="0" skipped="1"/></testsuites>')
        return [dict(name="tests", files=["gpu-tests.xml"], argv=[sys.executable, "-c",
                     f"open({str(out_dir / 'gpu-tests.xml')!r}, 'w').write({junit!r}); print('5 tests')"]),
                dict(name="step", files=["step.json"], json=["step-float32.json"],
                     argv=[[sys.executable, "-c", "import time; print('step starts', flush=True); time.sleep(60)"]]),
                dict(name="table", files=["bench.json"], argv=[sys.executable, "-c", table])][:len(parts)]

    monkeypatch.setattr(gpu_suite, "plan", fake_plan)
    monkeypatch.setattr(gpu_suite, "PART_CAPS", dict(tests=30, step=2, table=30))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(B.env, "device_name", lambda device: "Fake GPU")
    rc = B.main(["gpu-suite", "--output", str(out), "--budget-s", "60"])
    text = capsys.readouterr().out
    assert rc == 1                                   # the step part ran past its budget
    assert "5 tests" in text and "step starts" in text and "stopped after" in text and "table done" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["parts"] == {"tests": "ok", "step": "timed out", "table": "ok"}
    assert summary["tests"] == dict(tests=5, failures=1, errors=0, skipped=1)
    assert [t["verdict"] for t in summary["targets"]] == ["inconclusive"]
    assert "[inconclusive] GPU: LSPT-fused / GaPT train time" in (out / "gpu-suite.log").read_text()
    assert len(list(out.iterdir())) <= 8
    # A second run of one part into the same directory keeps what the first measured.
    assert B.main(["gpu-suite", "--output", str(out), "--budget-s", "60", "--parts", "tests"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["parts"] == {"tests": "ok", "step": "timed out", "table": "ok"}
    assert [t["verdict"] for t in summary["targets"]] == ["inconclusive"]
    assert (out / "gpu-suite.log").read_text().count("gpu-suite --output") == 2     # appended
