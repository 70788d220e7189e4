"""Encoder suite: one training step and one inference batch per method (the paper's table C.4).

Each benchmark builds the method's encoder around a fresh random timm ViT, runs the step once
(compiling it for the torch.compile row), measures peak memory over one more step, then times it
with benchmark.pedantic. GPU timing is synchronised: every timed call ends with
torch.cuda.synchronize() and starts after one (pedantic's setup). extra_info holds the method, the
setting, the backend actually used, the parameter counts and the peak memory (see
lspt_kernels.bench.MemoryProbe: GPU max_memory_allocated; CPU peak RSS of this pytest process minus
its RSS before the model was built - the `lspt-bench` command isolates each method in a fresh process
instead). The methods are `lspt_kernels.bench.bench_methods()` (the encoder table plus the LSPT
variants). pytest-benchmark times one benchmark after another, not interleaved: for comparisons
between methods on a shared machine use `lspt-bench`. bench/plot_results.py turns --benchmark-json
output into the lspt-bench plot and table.
"""
import math
import time

import pytest
import torch

from lspt_kernels import bench as B

METHODS = B.bench_methods()


def _spec(cfg, method, batch_size, num_prompts, dtype):
    backend, note = B.fused_backend(cfg["device"])
    return dict(model=cfg["model"], model_kwargs=cfg["model_kwargs"], img_size=None, batch_size=batch_size,
                num_prompts=num_prompts, dtype=dtype, device=cfg["device"], num_classes=cfg["num_classes"],
                seed=0, fused_backend=backend, fused_note=note, compile_backend=cfg["compile_backend"],
                method=method)


_sync = B.sync


def _run(benchmark, cfg, method, batch_size, num_prompts, dtype, kind):
    spec = _spec(cfg, method, batch_size, num_prompts, dtype)
    device = cfg["device"]
    compiled = method == "lspt-compile"
    torch._dynamo.reset()
    probe = B.MemoryProbe(device)
    model = B.make_encoder(method, spec).to(device)
    train_step, infer_step, out = B.make_step_fns(model, spec, device, compiled=compiled,
                                                  compile_backend=cfg["compile_backend"])
    step = train_step if kind == "train" else infer_step
    model.train(kind == "train")

    t0 = time.perf_counter()
    step()                                      # warm-up; compiles the compiled row
    _sync(device)
    first_s = time.perf_counter() - t0
    probe.start()
    t0 = time.perf_counter()
    step()
    _sync(device)
    once_s = time.perf_counter() - t0
    memory = probe.stop()

    rep = model.parameter_report()
    k, n = model.num_prefix_tokens, model.vit.patch_embed.num_patches
    benchmark.group = f"encoder-{kind} B{batch_size} Np{num_prompts} {dtype}"
    benchmark.extra_info.update(
        suite="encoder", kind=kind, method=method, label=B.label(method), model=cfg["model"],
        batch_size=batch_size, num_prompts=num_prompts, dtype=dtype, device=device,
        device_name=B.device_name(device), tokens=k + num_prompts + n, img_size=model.vit.patch_embed.img_size[0],
        backend=spec["fused_backend"] if method in ("lspt-fused", "lspt-compile") else
        ("reference" if method == "lspt-reference" else None),
        fused_note=spec["fused_note"] if method in ("lspt-fused", "lspt-compile") else None,
        compiled=compiled, compile_backend=cfg["compile_backend"] if compiled else None,
        compile_s=max(0.0, first_s - once_s) if compiled else None,
        trainable_params=rep["trainable"], total_params_ratio=rep["total_params_ratio"],
        torch=torch.__version__, size=cfg["size"], **memory)

    def timed():
        step()
        _sync(device)

    benchmark.pedantic(timed, setup=lambda: _sync(device), rounds=cfg["rounds"],
                       warmup_rounds=max(0, cfg["warmup"] - 1), iterations=1)

    # The result must be sane in every mode (CI runs this once, untimed, at the tiny size).
    assert math.isfinite(first_s) and math.isfinite(once_s) and once_s > 0
    if kind == "train":
        assert math.isfinite(float(out["loss"])), f"{method}: non-finite loss"
        grads = [p.grad for p in model.trainable_parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), f"{method}: missing/non-finite grads"
    else:
        logits = out["logits"]
        assert tuple(logits.shape) == (batch_size, cfg["num_classes"]), tuple(logits.shape)
        assert torch.isfinite(logits.float()).all()
    if device.startswith("cuda"):
        assert memory["peak_memory_gb"] > 0


@pytest.mark.parametrize("method", METHODS)
def test_encoder_train_step(benchmark, cfg, method, batch_size, num_prompts, dtype):
    """forward, cross-entropy, backward and SGD(momentum) step over the trainable parameters."""
    _run(benchmark, cfg, method, batch_size, num_prompts, dtype, "train")


@pytest.mark.parametrize("method", METHODS)
def test_encoder_inference(benchmark, cfg, method, batch_size, num_prompts, dtype):
    """A no-grad forward of one batch."""
    _run(benchmark, cfg, method, batch_size, num_prompts, dtype, "infer")
