"""`lspt-bench serve` (lspt_kernels.bench.serve): a tiny run end to end, the logits check that guards the
timing, bad input, an interrupted run, and its part of the GPU suite."""
import csv
import json
from pathlib import Path

import pytest
import torch

from lspt_kernels import bench as B
from lspt_kernels.bench import gpu_suite, serve

TINY = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--model-kwargs", "depth=2", "--device", "cpu",
        "--num-prompts", "3", "--num-classes", "5", "--repeats", "3", "--warmup", "1", "--threads", "1"]
METHODS = ["lspt-fused", "gapt", "vpt-deep"]


def _run(tmp_path, *extra):
    out = tmp_path / "serve"
    rc = B.main(["serve", *TINY, "--methods", ",".join(METHODS), "--output", str(out), *extra])
    data = json.loads((out / "serve.json").read_text()) if (out / "serve.json").exists() else None
    return rc, out, data


def test_serve_tiny_run_writes_rows_ratios_and_targets(tmp_path, capsys):
    rc, out, data = _run(tmp_path, "--tasks", "1,2,4", "--batch-sizes", "4,6")
    text = capsys.readouterr().out
    assert rc == 0, text
    settings = [(1, 4), (1, 6), (2, 4), (2, 6), (4, 4)]                  # (4, 6): 6 is not a multiple of 4
    rows = data["rows"]
    assert [(r["tasks"], r["batch_size"], r["method"]) for r in rows] == [(k, b, m) for k, b in settings
                                                                         for m in METHODS]
    assert data["meta"]["skipped"] == [dict(tasks=4, batch_size=6, reason="batch not a multiple of K: each task "
                                                                          "gets batch / K images")]
    assert data["meta"]["command"].endswith("serve " + " ".join(TINY) + " --methods " + ",".join(METHODS)
                                            + f" --output {out} --tasks 1,2,4 --batch-sizes 4,6")
    T = 1 + 3 + 4                                   # class token, Np, 2 x 2 patches
    by = {(r["tasks"], r["batch_size"], r["method"]): r for r in rows}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["per_task_batch"] == r["batch_size"] // r["tasks"] and r["tokens"] == T
        assert 0 <= r["max_error"] <= r["tolerance"] == serve.TOLERANCES["ieee"]
        for kind in ("mixed", "loop"):
            ms = r[f"{kind}_ms_all"]
            assert len(ms) == r[f"{kind}_ms_n"] == 3 and r[f"{kind}_ms_q1"] <= r[f"{kind}_ms"] <= r[f"{kind}_ms_q3"]
            # images/s from the same rounds: batch over the median time (3 rounds: the median round)
            assert r[f"{kind}_images_per_s"] == pytest.approx(r["batch_size"] * 1e3 / r[f"{kind}_ms"])
        ratios = sorted(a / b for a, b in zip(r["mixed_ms_all"], r["loop_ms_all"]))
        assert r["mixed_over_loop"] == pytest.approx(ratios[1])
    for k, b in settings:
        lspt, vpt = by[(k, b, "lspt-fused")], by[(k, b, "vpt-deep")]
        assert lspt["floor_infer_extra"] == pytest.approx(3 / (3 * T))
        ratios = sorted(a / v for a, v in zip(lspt["mixed_ms_all"], vpt["mixed_ms_all"]))
        assert lspt["mixed_vs_vpt_deep"] == pytest.approx(ratios[1])
        assert "mixed_vs_vpt_deep" not in by[(k, b, "gapt")]
    targets = data["targets"]
    loop_targets = [t for t in targets if t["target"].startswith("mixed batch no slower")]
    assert sorted((t["tasks"], t["batch_size"], t["method"]) for t in loop_targets) == sorted(
        (k, b, m) for k, b in settings if k > 1 for m in METHODS)
    floor_targets = [t for t in targets if t["target"].startswith("LSPT-fused mixed batch")]
    assert [(t["tasks"], t["batch_size"]) for t in floor_targets] == settings
    assert all(t["limit"] == pytest.approx(1 + 1 / T + 0.02) for t in floor_targets)
    assert all(t["verdict"] in ("met", "missed", "inconclusive") and t["n"] == 3 for t in targets)
    with open(out / "serve.csv") as f:
        table = list(csv.DictReader(f))
    assert [(int(t["tasks"]), int(t["batch_size"]), t["method"]) for t in table] == list(by)
    assert all(t["torch"] == torch.__version__ and float(t["mixed_ms"]) > 0 for t in table)
    assert "mixed/loop" in text and "skipped (K, batch): (4, 6)" in text and "machine load at the end" in text


def test_tasks_are_built_on_one_backbone_and_differ_everywhere():
    """Every task's encoder wraps the same ViT object, and each tuned parameter differs between tasks
    (GaPT's gates and temperatures start equal in every encoder: randomize_task moves them)."""
    from lspt_kernels.bench.runner import build_vit
    spec = dict(model="vit_tiny_patch16_224", img_size=32, model_kwargs=dict(depth=3), seed=0, num_prompts=2,
                num_classes=4, device="cpu", fused_backend="eager")
    vit = build_vit(spec)
    for method in ("gapt", "lspt-fused"):
        encoders, mt = serve.build_tasks(method, spec, vit, 3)
        assert all(e.vit is vit for e in encoders) and mt.num_classes == [4, 5, 6] == serve.task_widths(4, 3)
        first, second = (dict(e.named_parameters()) for e in encoders[:2])
        for name, p in first.items():
            if p.requires_grad and name != "head.weight" and name != "head.bias":
                assert not torch.equal(p, second[name]), (method, name)


def test_compare_logits_finds_a_difference_a_bad_padding_and_non_finite_values():
    loop = [torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0, 5.0], [6.0, 7.0, 8.0]])]
    rows = [torch.tensor([1]), torch.tensor([2, 0])]
    inf = float("-inf")
    mixed = torch.tensor([[6.0, 7.0, 8.0], [1.0, 2.0, inf], [3.0, 4.0, 5.0]])
    assert serve.compare_logits(mixed, loop, rows, [2, 3]) == 0.0
    off = mixed.clone()
    off[0, 1] += 0.08                                          # relative to max(1, max |loop|) = 8
    assert serve.compare_logits(off, loop, rows, [2, 3]) == pytest.approx(0.01)
    bad = mixed.clone()
    bad[1, 2] = 0.0                                            # padding past the row's width must stay -inf
    assert serve.compare_logits(bad, loop, rows, [2, 3]) == float("inf")
    nan = [loop[0], loop[1] * float("nan")]
    assert serve.compare_logits(mixed, nan, rows, [2, 3]) == float("inf")


def test_a_mismatch_is_reported_and_not_timed(tmp_path, capsys, monkeypatch):
    """A benchmark comparing two different computations is worthless: GaPT's mixed logits off by 1 %
    are refused before any timing, the other methods still run, the exit status is 1."""
    real = serve.callables

    def off_for_gapt(encoders, mt, inputs, spec, dtype):
        mixed, loop = real(encoders, mt, inputs, spec, dtype)
        return ((lambda: mixed() * 1.01 + 0.01) if mt.method == "gapt" else mixed), loop

    monkeypatch.setattr(serve, "callables", off_for_gapt)
    rc, out, data = _run(tmp_path, "--tasks", "2", "--batch-sizes", "4")
    captured = capsys.readouterr()
    assert rc == 1 and "GaPT (K2 B4 fp32): MISMATCH" in captured.err
    rows = {r["method"]: r for r in data["rows"]}
    assert rows["gapt"]["status"] == "mismatch" and "differ" in rows["gapt"]["error"]
    assert rows["gapt"]["max_error"] > rows["gapt"]["tolerance"] and "mixed_ms" not in rows["gapt"]
    assert rows["lspt-fused"]["status"] == rows["vpt-deep"]["status"] == "ok"
    assert "mixed_vs_vpt_deep" in rows["lspt-fused"]
    assert {t["method"] for t in data["targets"]} == {"lspt-fused", "vpt-deep"}


def test_an_interrupted_run_keeps_what_it_measured(tmp_path, capsys, monkeypatch):
    real, calls = serve.measure_setting, []

    def once_then_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(serve, "measure_setting", once_then_ctrl_c)
    rc, out, data = _run(tmp_path, "--tasks", "1,2", "--batch-sizes", "2")
    assert rc == 130 and "interrupted after 2 of 2 settings" in capsys.readouterr().err
    assert [(r["tasks"], r["method"]) for r in data["rows"]] == [(1, m) for m in METHODS]
    assert data["meta"]["interrupted"] == "after 2 of 2 settings"


@pytest.mark.parametrize("argv, message", [
    (["--methods", "lspt-fused,adapter"], "--methods: adapter not allowed: each must be one of lspt-fused"),
    (["--methods", "lspt-compile"], "--methods: lspt-compile not allowed"),
    (["--tasks", "0,4"], "--tasks: 0 not allowed: each must be an int >= 1"),
    (["--tasks", "four"], "--tasks: 'four' is not a valid int"),
    (["--batch-sizes", "-1"], "--batch-sizes: -1 not allowed"),
    (["--tasks", "4", "--batch-sizes", "2,6"], "no batch is a multiple of any K"),
    (["--dtype", "fp8"], "--dtype: fp8 not allowed"),
    (["--dtype", "fp16"], "--dtype fp16: CPU autocast in fp16 is not supported"),
    (["--num-prompts", "0"], "--num-prompts must be >= 1"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--model", "vit_nonexistent_patch16"], "--model 'vit_nonexistent_patch16': unknown timm model"),
    (["--device", "tpu"], "--device: expected cpu, cuda or cuda:N"),
])
def test_bad_input_stops_before_measuring(tmp_path, capsys, argv, message):
    out = tmp_path / "never"
    rc = B.main(["serve", *TINY, "--output", str(out), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("lspt-bench serve: error: ") and message in err, err
    assert not out.exists()


def test_settings_pair_every_k_with_the_batches_it_divides():
    run, skipped = serve.settings([1, 4, 16, 64], [1, 4, 16, 64])
    assert run == [(1, 1), (1, 4), (1, 16), (1, 64), (4, 4), (4, 16), (4, 64), (16, 16), (16, 64), (64, 64)]
    assert [(s["tasks"], s["batch_size"]) for s in skipped] == [(4, 1), (16, 1), (16, 4), (64, 1), (64, 4), (64, 16)]
    assert all(s["reason"].startswith("batch < K") for s in skipped)
    assert serve.settings([3], [4, 6])[1][0]["reason"].startswith("batch not a multiple of K")


def test_gpu_suite_plans_the_serve_part_and_summarises_its_targets(tmp_path, capsys):
    assert B.main(["gpu-suite", "--output", str(tmp_path / "gpu"), "--dry-run", "--parts", "serve"]) == 0
    text = capsys.readouterr().out
    assert f"- serve (at most {gpu_suite.PART_CAPS['serve']} s) -> serve/serve.json, serve/serve.csv" in text
    assert ("serve --device cuda --tasks 64,16,4,1 --batch-sizes 1,4,16,64 --dtype bf16 --methods "
            "lspt-fused,gapt,vpt-deep") in text
    (tmp_path / "serve").mkdir()
    target = dict(target="mixed batch no slower than the task-by-task loop (mixed / loop <= 1)", method="gapt",
                  tasks=16, batch_size=64, dtype="bf16", verdict="met", detail="GaPT: mixed / loop 0.2")
    (tmp_path / "serve" / "serve.json").write_text(json.dumps(dict(meta={}, rows=[], targets=[target])))
    summary = gpu_suite.summarize_dir(Path(tmp_path), {"serve": "ok"}, "lspt-bench gpu-suite")
    assert [t["source"] for t in summary["targets"]] == ["serve"]
    assert "[met] mixed batch no slower than the task-by-task loop (mixed / loop <= 1) (gapt, K16 B64 bf16)" in (
        gpu_suite.format_summary(summary))
