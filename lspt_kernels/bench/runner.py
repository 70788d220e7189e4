"""Running the models: one train step / one inference batch, the memory pass, the timing pass.

A bench row's model is the method's encoder (task "classification": forward, cross-entropy over random
labels, SGD) or SETR-PUP on its patch grids (task "segmentation": `lspt_kernels.seg.SegmentationModel`
with its auxiliary heads, one iteration of the recipe's `seg.train_step` on random label maps; the
inference batch is one no-grad forward of crops, what each sliding window of the test costs).

A setting (task, model, batch, Np, dtype, gradient checkpointing) is measured in two passes:

1. memory, per method: a fresh model, warm-up train step(s) (torch.compile compiles here), then
   the peak memory over `mem_steps` train steps, the parameter counts, the compile time and a check
   that the logits are finite. On the CPU each method runs in a fresh process (`measure_isolated`)
   so that its peak RSS is its own; on a GPU in this process (max_memory_allocated is per region).
2. time: every method in one process around one shared frozen backbone, in interleaved rounds
   (measure.interleaved_rounds): train rounds, then inference rounds. Each row keeps the time of
   every round, so ratios can be taken round by round.
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import subprocess
import tempfile
from pathlib import Path

from ..cli_helpers import build_backbone
from . import methods as M
from .env import child_command
from .measure import MemoryProbe, Timer, interleaved_rounds, short_error, summarize

# Segmentation: the recipe's schedule length (seg.train_step's poly lr); every timed step is its iteration 0.
SEG_ITERS = 160_000


def build_vit(spec: dict):
    """A fresh random timm ViT of a bench spec (seeded) without a classifier head."""
    return build_backbone(spec["model"], spec.get("img_size"), spec.get("model_kwargs", {}), spec.get("seed", 0))


def make_encoder(method: str, spec: dict, vit=None):
    """The encoder of a bench row for `spec` (default: around a fresh random ViT). Encoders never
    change the frozen backbone, so several can share one."""
    import torch
    if vit is None:
        vit = build_vit(spec)
    torch.manual_seed(spec.get("seed", 0) + 1)
    return M.make_encoder(method, vit, num_prompts=spec["num_prompts"], num_classes=spec["num_classes"],
                          fused_backend=spec.get("fused_backend", "auto"),
                          grad_checkpointing=bool(spec.get("grad_checkpointing")))


def is_segmentation(spec: dict) -> bool:
    return spec.get("task", "classification") == "segmentation"


def make_model(method: str, spec: dict, vit=None):
    """The model of a bench row: the method's encoder (`make_encoder`), or for task "segmentation" a
    `SegmentationModel` around it (SETR-PUP and the auxiliary heads on the default feature blocks,
    spec["num_classes"] classes, spec["head_channels"] wide when given)."""
    encoder = make_encoder(method, spec, vit)
    if not is_segmentation(spec):
        return encoder
    import torch

    from ..seg import SegmentationModel
    torch.manual_seed(spec.get("seed", 0) + 2)
    width = {"channels": spec["head_channels"]} if spec.get("head_channels") else {}
    return SegmentationModel(encoder, spec["num_classes"], **width)


def encoder_of(model, spec: dict):
    """The prompt-tuned encoder of a bench model (the model itself for classification)."""
    return model.encoder if is_segmentation(spec) else model


def parameter_counts(model, spec: dict) -> dict:
    """trainable (the heads of a segmentation model included), backbone (without its classifier),
    total_params_ratio = (backbone + trainable) / backbone as in the paper's tables, and head_params
    (segmentation: the SETR heads' share of trainable; None for classification)."""
    backbone = encoder_of(model, spec).parameter_report()["backbone"]
    trainable = sum(p.numel() for p in model.trainable_parameters())
    heads = (sum(p.numel() for head in model.heads().values() for p in head.parameters())
             if is_segmentation(spec) else None)
    return dict(trainable_params=trainable, backbone_params=backbone, head_params=heads,
                total_params_ratio=(backbone + trainable) / backbone)


def make_step_fns(model, spec: dict, device: str, compiled: bool = False, compile_backend: str = "inductor",
                  compile_mode: str | None = None):
    """(train_step, infer_step, out): one training step and one no-grad forward of a batch of random
    images; `out` holds the last loss and logits.

    Classification: zero_grad, forward, cross-entropy over random labels, backward, SGD(momentum 0.9)
    step over the trainable parameters. Segmentation: `lspt_kernels.seg.train_step` on random label
    maps (main and auxiliary losses, the recipe's SGD with the heads at 10x lr and its poly schedule,
    a GradScaler under fp16), and the main logits at the input size for inference."""
    import torch
    import torch.nn.functional as F
    gen = torch.Generator().manual_seed(spec.get("seed", 0) + 1)
    img = encoder_of(model, spec).vit.patch_embed.img_size
    images = torch.randn(spec["batch_size"], 3, img[0], img[1], generator=gen).to(device)
    label_shape = (spec["batch_size"], img[0], img[1]) if is_segmentation(spec) else (spec["batch_size"],)
    labels = torch.randint(0, spec["num_classes"], label_shape, generator=gen).to(device)
    mode = None if compile_mode in (None, "default") else compile_mode
    run = torch.compile(model, backend=compile_backend, mode=mode) if compiled else model
    # CUDA graphs (reduce-overhead) reuse output buffers: mark where each step begins.
    mark = (getattr(torch.compiler, "cudagraph_mark_step_begin", None)
            if compiled and mode == "reduce-overhead" else None)
    device_type = "cuda" if str(device).startswith("cuda") else "cpu"
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec["dtype"])

    def autocast():
        return contextlib.nullcontext() if low is None else torch.autocast(device_type, dtype=low)

    out = {}

    if is_segmentation(spec):
        from ..seg import build_optimizer
        from ..seg import train_step as seg_train_step
        opt = build_optimizer(model)
        scaler = torch.amp.GradScaler(device_type) if low is torch.float16 else None

        def train_step():
            if mark:
                mark()
            out["loss"] = seg_train_step(run, opt, images, labels, 0, SEG_ITERS, amp_dtype=low,
                                         scaler=scaler)["loss"]
    else:
        opt = torch.optim.SGD(model.trainable_parameters(), lr=0.01, momentum=0.9)

        def train_step():
            if mark:
                mark()
            opt.zero_grad(set_to_none=True)
            with autocast():
                logits = run(images)
            loss = F.cross_entropy(logits.float(), labels)
            loss.backward()
            opt.step()
            out["loss"] = loss.detach()

    def infer_step():
        if mark:
            mark()
        with torch.no_grad(), autocast():
            out["logits"] = run(images)

    return train_step, infer_step, out


def _compile_cache_counters() -> dict:
    """Inductor / AOTAutograd cache hits and misses so far (warm caches make compiling much faster)."""
    try:
        from torch._dynamo.utils import counters
        return {"fxgraph_cache_hit": counters["inductor"].get("fxgraph_cache_hit", 0),
                "fxgraph_cache_miss": counters["inductor"].get("fxgraph_cache_miss", 0),
                "autograd_cache_hit": counters["aot_autograd"].get("autograd_cache_hit", 0),
                "autograd_cache_miss": counters["aot_autograd"].get("autograd_cache_miss", 0)}
    except Exception:
        return {}


def is_oom(exc: BaseException) -> bool:
    import torch
    if isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return "out of memory" in text.lower() or "can't allocate memory" in text or "DefaultCPUAllocator" in text


def base_row(method: str, spec: dict) -> dict:
    row = dict(method=method, label=M.label(method), task=spec.get("task", "classification"), model=spec["model"],
               device=spec["device"], dtype=spec["dtype"], batch_size=spec["batch_size"],
               num_prompts=spec["num_prompts"], grad_checkpointing=bool(spec.get("grad_checkpointing")), status="ok",
               error=None, backend=None, compiled=method == "lspt-compile",
               compile_backend=spec.get("compile_backend") if method == "lspt-compile" else None,
               compile_mode=spec.get("compile_mode") if method == "lspt-compile" else None)
    if M.is_fused(method):
        row["backend"] = spec.get("fused_backend")
        if spec.get("fused_note"):
            row["note"] = spec["fused_note"]
    elif method == "lspt-reference":
        row["backend"] = "reference"
    return row


def measure_memory(method: str, spec: dict) -> dict:
    """The memory pass for one method in this process: its row (status "ok" / "oom" / "error")."""
    import torch
    if is_segmentation(spec):
        from .. import seg  # noqa: F401  - imported before the memory baseline, as timm and the backend
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = spec["device"]
    is_cuda = str(device).startswith("cuda")
    row = base_row(method, spec)
    row["threads"] = torch.get_num_threads()
    timer = Timer(device)
    state = {}
    try:
        if is_cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        probe = MemoryProbe(device)
        model = make_model(method, spec).to(device)
        state["model"] = model
        enc = encoder_of(model, spec)
        k, n = enc.num_prefix_tokens, enc.vit.patch_embed.num_patches
        row.update(parameter_counts(model, spec), tokens=k + getattr(enc, "num_prompts", 0) + n,
                   img_size=enc.vit.patch_embed.img_size[0], depth=enc.depth, embed_dim=enc.embed_dim,
                   head_channels=model.channels if is_segmentation(spec) else None)
        train_step, infer_step, out = make_step_fns(model, spec, device, compiled=row["compiled"],
                                                    compile_backend=spec.get("compile_backend", "inductor"),
                                                    compile_mode=spec.get("compile_mode"))
        state["fns"] = (train_step, infer_step, out)
        model.train()
        first_train = timer(train_step)                    # compiles the training graph if compiled
        for _ in range(max(0, spec.get("warmup", 1) - 1)):
            timer(train_step)
        gc.collect()
        probe.start()
        steady_train = min(timer(train_step) for _ in range(max(1, spec.get("mem_steps", 1))))
        row.update(probe.stop())
        loss = float(out["loss"])
        model.eval()
        first_infer = timer(infer_step)                    # compiles the inference graph if compiled
        steady_infer = timer(infer_step) if row["compiled"] else None   # only for the compile time
        logits = out["logits"]
        row.update(loss=loss, logits_shape=list(logits.shape), logits_finite=bool(torch.isfinite(logits).all()))
        if row["compiled"]:
            row["compile_s"] = max(0.0, first_train - steady_train) + max(0.0, first_infer - steady_infer)
            row["compile_cache"] = _compile_cache_counters()
        if not (math.isfinite(loss) and row["logits_finite"]):
            row["note"] = (row.get("note", "") + "; " if row.get("note") else "") + "non-finite loss or logits"
    except Exception as exc:  # reported in the row; the run goes on with the next method
        row["status"] = "oom" if is_oom(exc) else "error"
        row["error"] = short_error(exc, 500)
        exc.__traceback__ = None
    finally:
        state.clear()
        gc.collect()
        if row["compiled"]:
            with contextlib.suppress(Exception):
                torch._dynamo.reset()
        if is_cuda:
            torch.cuda.empty_cache()
    return row


def worker(spec_path: str, out_path: str) -> int:
    """The child process of `measure_isolated` (lspt-bench --_worker SPEC OUT)."""
    spec = json.loads(Path(spec_path).read_text())
    import timm  # noqa: F401  - imported before the baseline RSS, like the parent
    import torch
    if M.is_fused(spec["method"]) and spec.get("fused_backend") not in (None, "reference", "eager"):
        from ..backends import resolve
        resolve(spec["fused_backend"], torch.device(spec["device"]))   # loaded before the baseline
    row = measure_memory(spec["method"], spec)
    Path(out_path).write_text(json.dumps(row))
    return 0


def measure_isolated(method: str, spec: dict) -> dict:
    """`measure_memory` in a fresh Python process (so its peak RSS is this method's alone)."""
    spec = dict(spec, method=method)
    with tempfile.TemporaryDirectory(prefix="lspt-bench-") as tmp:
        out_path, spec_path = os.path.join(tmp, "row.json"), os.path.join(tmp, "spec.json")
        Path(spec_path).write_text(json.dumps(spec))
        proc = subprocess.run(child_command(["--_worker", spec_path, out_path]), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        if proc.returncode == 0 and os.path.exists(out_path):
            return json.loads(Path(out_path).read_text())
    row = base_row(method, spec)
    tail = " | ".join(proc.stdout.strip().splitlines()[-3:])
    if proc.returncode in (-9, 137):
        row.update(status="oom", error="the measuring process was killed (SIGKILL): most likely out of "
                                       f"memory. {tail}".strip())
    else:
        row.update(status="error", error=f"the measuring process exited with status {proc.returncode}: {tail}"[:800])
    return row


def time_interleaved(methods: list[str], spec: dict, progress=None) -> dict[str, dict]:
    """The timing pass: {method: {train_s_all, infer_s_all, train (summary), infer (summary)}} or
    {method: {timing_error}} for a method that failed. All encoders share one frozen backbone."""
    import torch
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = spec["device"]
    timer = Timer(device)
    out: dict[str, dict] = {}
    models, train_fns, infer_fns = {}, {}, {}
    try:
        vit = build_vit(spec).to(device)
        for m in methods:
            try:
                model = make_model(m, spec, vit=vit).to(device)
                tr, inf, _ = make_step_fns(model, spec, device, compiled=m == "lspt-compile",
                                           compile_backend=spec.get("compile_backend", "inductor"),
                                           compile_mode=spec.get("compile_mode"))
            except Exception as exc:  # noqa: BLE001
                out[m] = dict(timing_error=short_error(exc))
                continue
            models[m] = model

            def _train(model=model, tr=tr):
                model.train()
                tr()

            def _infer(model=model, inf=inf):
                model.eval()
                inf()

            train_fns[m], infer_fns[m] = _train, _infer
        for kind, fns in (("train", train_fns), ("infer", infer_fns)):
            fns = {m: f for m, f in fns.items() if "timing_error" not in out.get(m, {})}
            say = (lambda text, kind=kind: progress(f"{kind} {text}")) if progress else None
            times, errors = interleaved_rounds(fns, spec["repeats"], spec.get("warmup", 1), timer, progress=say)
            for m, err in errors.items():
                out[m] = dict(timing_error=f"{kind}: {err}")
            for m, ts in times.items():
                if "timing_error" not in out.get(m, {}):
                    out.setdefault(m, {})[f"{kind}_s_all"] = ts
                    out[m][kind] = summarize(ts)
    finally:
        models.clear()
        train_fns.clear()
        infer_fns.clear()
        gc.collect()
        with contextlib.suppress(Exception):
            torch._dynamo.reset()
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()
    return out
