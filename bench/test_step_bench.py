"""Fused-step suite: one LSPT step (lspt_kernels.lspt_step), forward and forward+backward, per backend.

The cases are `lspt-bench step`'s (lspt_kernels.bench.step: make_inputs / make_callables): "eager" is the
pure-PyTorch reference step (the baseline), "compile" the reference step under torch.compile, and
the fused backends of the device ("cpu"; "triton" and "cuda" on a GPU). Full size: ViT-B/16 widths
(N 196, D 768); tiny (CI): N 16, D 32, and "compile" uses the aot_eager backend, "triton" the
interpreter on a machine without a GPU. extra_info holds the cost-model floor of the case
(docs/method.md's cost model: FLOPs over the measured peak) and the peak memory of one call (GPU:
max_memory_allocated over the call minus what was allocated before it; CPU: peak RSS increase).
"""
import functools
import math

import pytest
import torch

from lspt_kernels import backends
from lspt_kernels import bench as B
from lspt_kernels.bench import step as SM

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(scope="module")
def peaks(cfg):
    if cfg["size"] == "tiny":              # floors are only informative at full size
        return dict(flops_per_s=1e12, bytes_per_s=1e11, how="nominal (tiny size)")
    return SM.measure_peaks(cfg["device"], torch.float32)


_sync = B.sync


@pytest.mark.parametrize("direction", ["fwd", "fwd_bwd"])
def test_step(benchmark, cfg, peaks, step_backend, direction, batch_size, num_prompts, dtype, monkeypatch):
    """step_backend: parametrised by conftest.step_backends (the microbenchmark's, per device)."""
    device, backend = cfg["device"], step_backend
    if backend in ("cpu", "cuda", "triton"):
        why = backends.unavailable_reason(backend)
        if why:
            pytest.skip(f"backend {backend!r} unavailable here: {B.short_reason(why)}")
    if dtype == "bf16" and backend == "triton" and device == "cpu":
        pytest.skip("the Triton interpreter has no bf16 arithmetic")
    dims = cfg["step_dims"]
    inputs = SM.make_inputs(batch_size, num_prompts, device=device, dtype=DTYPES[dtype], **dims)
    if backend == "compile" and cfg["compile_backend"] != "inductor":
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=cfg["compile_backend"]))
    torch._dynamo.reset()
    forward, forward_backward = SM.make_callables(backend, inputs)
    fn = forward if direction == "fwd" else forward_backward

    result = fn()                                   # warm-up (compiles "compile")
    _sync(device)
    probe = B.MemoryProbe(device)
    probe.start()
    fn()
    memory = probe.stop()
    floor_fwd, floor_fb = SM.floors(batch_size, num_prompts, dims["num_patches"], dims["dim"], 1,
                                    inputs[0].element_size(), peaks)
    benchmark.group = f"step-{direction} B{batch_size} Np{num_prompts} {dtype}"
    benchmark.extra_info.update(
        suite="step", direction=direction, backend=backend, batch_size=batch_size, num_prompts=num_prompts,
        dtype=dtype, device=device, device_name=B.device_name(device), size=cfg["size"],
        floor_s=floor_fwd if direction == "fwd" else floor_fb, peaks=peaks["how"],
        compile_backend=cfg["compile_backend"] if backend == "compile" else None,
        peak_memory_gb=memory["step_memory_gb"], memory_kind=memory["memory_kind"].replace(
            "peak RSS - RSS before the model was built", "peak RSS increase over one call"))

    def timed():
        fn()
        _sync(device)

    benchmark.pedantic(timed, setup=lambda: _sync(device), rounds=max(cfg["rounds"], 5 if cfg["size"] == "full" else 1),
                       warmup_rounds=max(0, cfg["warmup"] - 1), iterations=1)

    # Sane results in every mode: finite outputs of the right shapes.
    B_, T, D = inputs[0].shape
    if direction == "fwd":
        hidden, cell = result
        assert tuple(hidden.shape) == (B_, num_prompts, D) and tuple(cell.shape) == (B_, num_prompts, D)
        assert torch.isfinite(hidden.float()).all() and torch.isfinite(cell.float()).all()
    else:
        assert len(result) == len(inputs)
        for g, x in zip(result, inputs):
            assert g.shape == x.shape and torch.isfinite(g.float()).all()
    assert memory["peak_memory_gb"] is None or math.isfinite(memory["peak_memory_gb"])
