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

The segmentation step (`lspt-bench --task segmentation`: SETR-PUP heads on VPT-deep, GaPT and
LSPT-fused) runs here too, at full size in that command's default setting for the device (its first
batch size and dtype), tiny on a 3-block ViT with 8-channel heads; its extra_info has suite
"segmentation" (plot_results.py leaves it out of the encoder table).
"""
import math
import time

import pytest
import torch

from lspt_kernels import bench as B

METHODS = B.bench_methods()
SEG_METHODS = ("vpt-deep", "gapt", "lspt-fused")


def _spec(cfg, method, batch_size, num_prompts, dtype):
    backend, note = B.fused_backend(cfg["device"])
    return dict(model=cfg["model"], model_kwargs=cfg["model_kwargs"], img_size=None, batch_size=batch_size,
                num_prompts=num_prompts, dtype=dtype, device=cfg["device"], num_classes=cfg["num_classes"],
                seed=0, fused_backend=backend, fused_note=note, compile_backend=cfg["compile_backend"],
                method=method)


def _seg_spec(cfg, method):
    """`lspt-bench --task segmentation`'s default setting on this device (full size), or a tiny one."""
    if cfg["size"] == "full":
        d = B.DEFAULTS["segmentation"][cfg["device"]]
        spec = _spec(cfg, method, int(d["batch_size"].split(",")[0]), int(d["num_prompts"].split(",")[0]),
                     d["dtype"].split(",")[0])
        return dict(spec, task="segmentation", model_kwargs=dict(cfg["model_kwargs"], dynamic_img_size=True),
                    img_size=d["img_size"], num_classes=d["num_classes"], head_channels=None)
    spec = _spec(cfg, method, cfg["batch_sizes"][0], cfg["num_prompts"][0], "fp32")
    return dict(spec, task="segmentation", model_kwargs=dict(cfg["model_kwargs"], depth=3, dynamic_img_size=True),
                head_channels=8)


_sync = B.sync


def _run(benchmark, cfg, spec, kind):
    method, batch_size, num_prompts, dtype = spec["method"], spec["batch_size"], spec["num_prompts"], spec["dtype"]
    seg = spec.get("task") == "segmentation"
    device = cfg["device"]
    compiled = method == "lspt-compile"
    torch._dynamo.reset()
    probe = B.MemoryProbe(device)
    model = B.make_model(method, spec).to(device)
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

    counts = B.parameter_counts(model, spec)
    enc = B.encoder_of(model, spec)
    k, n = enc.num_prefix_tokens, enc.vit.patch_embed.num_patches
    suite = "segmentation" if seg else "encoder"
    benchmark.group = f"{suite}-{kind} B{batch_size} Np{num_prompts} {dtype}"
    benchmark.extra_info.update(
        suite=suite, kind=kind, method=method, label=B.label(method), model=cfg["model"],
        batch_size=batch_size, num_prompts=num_prompts, dtype=dtype, device=device,
        device_name=B.device_name(device), tokens=k + num_prompts + n, img_size=enc.vit.patch_embed.img_size[0],
        backend=spec["fused_backend"] if method in ("lspt-fused", "lspt-compile") else
        ("reference" if method == "lspt-reference" else None),
        fused_note=spec["fused_note"] if method in ("lspt-fused", "lspt-compile") else None,
        compiled=compiled, compile_backend=cfg["compile_backend"] if compiled else None,
        compile_s=max(0.0, first_s - once_s) if compiled else None,
        trainable_params=counts["trainable_params"], head_params=counts["head_params"],
        total_params_ratio=counts["total_params_ratio"],
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
        size = tuple(enc.vit.patch_embed.img_size) if seg else ()
        assert tuple(logits.shape) == (batch_size, spec["num_classes"], *size), tuple(logits.shape)
        assert torch.isfinite(logits.float()).all()
    if device.startswith("cuda"):
        assert memory["peak_memory_gb"] > 0


@pytest.mark.parametrize("method", METHODS)
def test_encoder_train_step(benchmark, cfg, method, batch_size, num_prompts, dtype):
    """forward, cross-entropy, backward and SGD(momentum) step over the trainable parameters."""
    _run(benchmark, cfg, _spec(cfg, method, batch_size, num_prompts, dtype), "train")


@pytest.mark.parametrize("method", METHODS)
def test_encoder_inference(benchmark, cfg, method, batch_size, num_prompts, dtype):
    """A no-grad forward of one batch."""
    _run(benchmark, cfg, _spec(cfg, method, batch_size, num_prompts, dtype), "infer")


@pytest.mark.parametrize("kind", ["train", "infer"])
@pytest.mark.parametrize("method", SEG_METHODS)
def test_segmentation_step(benchmark, cfg, method, kind):
    """One iteration of the segmentation recipe (main and auxiliary heads) / one no-grad forward of crops."""
    _run(benchmark, cfg, _seg_spec(cfg, method), kind)
