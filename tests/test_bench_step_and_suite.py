"""`lspt-bench step` (the fused-step microbenchmark) and `lspt-bench gpu-suite` without a GPU."""
import json
import sys

import pytest
import torch

from lspt_kernels import bench as B
from lspt_kernels.bench import gpu_suite, step


def test_step_cli_writes_spreads_speedups_host_overhead_and_verdicts(tmp_path, capsys):
    out = tmp_path / "step.json"
    rc = B.main(["step", "--batch", "2", "--num-prompts", "3", "--repeats", "3", "--warmup", "1",
                 "--backends", "eager", "cpu", "--threads", "1", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "machine load at start" in text and "host overhead per call" in text
    data = json.loads(out.read_text())
    assert data["meta"]["command"].endswith("step --batch 2 --num-prompts 3 --repeats 3 --warmup 1 --backends "
                                            "eager cpu --threads 1 --json " + str(out))
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


def test_step_bad_input_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        step.main(["--backends", "fast"])
    assert exc.value.code == 2 and "--backends: unknown fast" in capsys.readouterr().err


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
    for part in ("tests", "step", "table"):
        assert f"- {part} (at most" in text
    assert "pytest tests/test_cuda_gpu.py tests/test_step.py -k 'cuda or triton'" in text
    assert "--batch-size 64 --num-prompts 10,100 --dtype fp32,bf16" in text and "--dtype bfloat16" in text
    assert len(gpu_suite.FILES) <= 8 and all(f in text for f in gpu_suite.FILES)
    assert not (tmp_path / "gpu").exists()          # a dry run writes nothing


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

    def fake_plan(out_dir, with_compile=False):
        table = ("import json, pathlib; d = pathlib.Path(%r); "
                 "d.joinpath('bench.json').write_text(json.dumps(dict(meta=dict(device_name='Fake GPU'), rows=[], "
                 "targets=[dict(target='GPU: LSPT-fused / GaPT train time <= 1', verdict='inconclusive', "
                 "batch_size=64, num_prompts=10, dtype='bf16', detail='1.002x [0.99x .. 1.01x]')]))); "
                 "print('table done')" % str(out_dir))
        junit = ('<testsuites><testsuite tests="5" failures="1" errors="0" skipped="1"/></testsuites>')
        return [dict(name="tests", files=["gpu-tests.xml"], argv=[sys.executable, "-c",
                     f"open({str(out_dir / 'gpu-tests.xml')!r}, 'w').write({junit!r}); print('5 tests')"]),
                dict(name="step", files=["step.json"], dtypes=["float32"],
                     argv=[[sys.executable, "-c", "import time; print('step starts', flush=True); time.sleep(60)"]]),
                dict(name="table", files=["bench.json"], argv=[sys.executable, "-c", table])]

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
