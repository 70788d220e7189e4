"""Running the encoders: one train step / one inference batch, the memory pass, the timing pass.

A setting (model, batch, Np, dtype, gradient checkpointing) is measured in two passes:

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

from . import methods as M
from .env import child_command
from .measure import MemoryProbe, Timer, interleaved_rounds, short_error, summarize


def build_vit(spec: dict):
    """A fresh random timm ViT (seeded) without a classifier head."""
    import timm
    import torch
    torch.manual_seed(spec.get("seed", 0))
    kwargs = dict(pretrained=False, **spec.get("model_kwargs", {}), num_classes=0)
    if spec.get("img_size") is not None:
        kwargs["img_size"] = spec["img_size"]
    return timm.create_model(spec["model"], **kwargs)


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


def make_step_fns(model, spec: dict, device: str, compiled: bool = False, compile_backend: str = "inductor",
                  compile_mode: str | None = None):
    """(train_step, infer_step, out): one training step (zero_grad, forward, cross-entropy over random
    labels, backward, SGD(momentum 0.9) step over the trainable parameters) and one no-grad forward;
    `out` holds the last loss and logits."""
    import torch
    import torch.nn.functional as F
    gen = torch.Generator().manual_seed(spec.get("seed", 0) + 1)
    img = model.vit.patch_embed.img_size
    images = torch.randn(spec["batch_size"], 3, img[0], img[1], generator=gen).to(device)
    labels = torch.randint(0, spec["num_classes"], (spec["batch_size"],), generator=gen).to(device)
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.01, momentum=0.9)
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
    row = dict(method=method, label=M.label(method), model=spec["model"], device=spec["device"],
               dtype=spec["dtype"], batch_size=spec["batch_size"], num_prompts=spec["num_prompts"],
               grad_checkpointing=bool(spec.get("grad_checkpointing")), status="ok", error=None, backend=None,
               compiled=method == "lspt-compile",
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
        model = make_encoder(method, spec).to(device)
        state["model"] = model
        rep = model.parameter_report()
        k, n = model.num_prefix_tokens, model.vit.patch_embed.num_patches
        row.update(trainable_params=rep["trainable"], backbone_params=rep["backbone"],
                   total_params_ratio=rep["total_params_ratio"],
                   tokens=k + getattr(model, "num_prompts", 0) + n,
                   img_size=model.vit.patch_embed.img_size[0], depth=model.depth, embed_dim=model.embed_dim)
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
                model = make_encoder(m, spec, vit=vit).to(device)
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
