"""Fused kernels that check themselves before anyone relies on them.

The first time a process uses a fused backend for a (backend, device, dtype, width), `check_backend`
runs the PUBLIC `lspt_step(..., backend=name)` once on a tiny problem, forward and backward (all nine
results: hidden, new cell and the seven input gradients), and compares it with the eager step
(`backend="eager"`). If the kernel disagrees beyond tolerance or fails to launch, `ensure` (which
`ops.resolve_backend` calls) falls back to the next backend with ONE warning that says why. No user on
an untested GPU gets silently wrong numbers from a kernel nobody ran there.

Which backends are checked: the GPU ones ("cuda", "triton") on CUDA tensors by default; with
LSPT_SELFCHECK=all also the C++ CPU one and Triton's CPU interpreter (a test tool, TRITON_INTERPRET=1),
which is how the tests exercise the mechanism without a GPU.

    LSPT_SELFCHECK=0          no check (also "off", "false", "no")
    LSPT_SELFCHECK=strict     a failed check is an error instead of a fallback (also "error")
    LSPT_SELFCHECK=all        check every fused backend, the C++ CPU one included; combine as "all,strict"

Tolerance (per output, against an fp64 evaluation of the same inputs): within rtol(dtype) x the output's
largest magnitude, or within 2x the error of the eager step at the same precision (flash-attention's
rule, as tests/test_step.py). rtol: fp64 1e-9, fp32 1e-4 (5e-3 where the user allows TF32 GEMMs),
fp16 1e-2, bf16 5e-2: loose for rounding, tight for a wrong kernel (a bad index or a wrong gate is off
by O(1)). Low-precision weights are checked in both layouts the encoders use: every tensor in that dtype,
and torch.autocast's (fp32 tokens and cell, low-precision GEMM). On a GPU a second problem with 2048
prompt rows reaches the GEMM configurations for large batches.

The check never touches the global RNG (its inputs come from a private generator) and runs with
gradients on even under torch.no_grad / inference_mode. It is skipped while torch.compile traces (it
would be traced into the graph; run the model once eagerly to check it) and CUDA graph captures (run
once before capturing); inside torch.func transforms `ops.resolve_backend` picks the eager step
before asking for a check.
"""
from __future__ import annotations

import os
import threading
import warnings

import torch

__all__ = ["check_backend", "ensure", "settings", "reset", "CHECKED_BY_DEFAULT"]

CHECKED_BY_DEFAULT = ("cuda", "triton")
# Where a backend that fails its check falls back to, in order (the first that passes its own check).
FALLBACK = {"cuda": ("triton", "eager"), "triton": ("eager",), "cpu": ("eager",)}
RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
RTOL_TF32 = 5e-3    # fp32 when torch.set_float32_matmul_precision("high"/"medium") lets GEMMs use TF32
OUTPUTS = ("hidden", "new_cell", "grad_tokens", "grad_cell", "grad_prompt", "grad_weight_ih",
           "grad_weight_hh", "grad_bias_ih", "grad_bias_hh")

_results: dict[tuple, tuple[bool, str]] = {}      # (backend, device, dtype, width) -> (ok, reason)
_chosen: dict[tuple, str] = {}                    # same key -> the backend used instead
_lock = threading.RLock()
_state = threading.local()                        # .active: a check is running on this thread


def settings() -> dict:
    """LSPT_SELFCHECK parsed: {"enabled", "strict", "all"}."""
    raw = os.environ.get("LSPT_SELFCHECK", "1").strip().lower()
    words = set(raw.replace(",", " ").split())
    off = raw in ("0", "off", "false", "no")
    return dict(enabled=not off, strict=bool(words & {"strict", "error"}), all="all" in words)


def reset() -> None:
    """Forget every result (tests; or after changing LSPT_SELFCHECK in a running process)."""
    with _lock:
        _results.clear()
        _chosen.clear()


def _key(name: str, device: torch.device, dtype: torch.dtype, width: int) -> tuple:
    return (name, str(torch.device(device)), dtype, int(width))


def check_backend(name: str, device, dtype: torch.dtype, *, width: int = 32,
                  num_prefix_tokens: int = 1) -> tuple[bool, str]:
    """(ok, reason): does `lspt_step(..., backend=name)` agree with the eager step on a tiny problem of
    width `width` on `device` in `dtype`, forward and backward? Cached per (name, device, dtype, width)
    for the life of the process; reason is "" when ok."""
    device = torch.device(device)
    key = _key(name, device, dtype, width)
    with _lock:
        if key in _results:
            return _results[key]
        _state.active = True
        try:
            reason = _run(name, device, dtype, width, num_prefix_tokens)
        except Exception as exc:  # a kernel that fails to compile or launch fails its check
            reason = f"it raised {type(exc).__name__}: {str(exc).strip()[:300]}"
        finally:
            _state.active = False
        _results[key] = (reason is None, reason or "")
        return _results[key]


def ensure(backend: str, device: torch.device, dtype: torch.dtype | None, width: int | None) -> str:
    """The backend to use for `backend` on `device`/`dtype`: itself if it passes (or is not checked),
    else the first fallback that passes, with one warning; an error under LSPT_SELFCHECK=strict."""
    if dtype is None or backend == "eager" or getattr(_state, "active", False):
        return backend
    cfg = settings()
    on_gpu = backend in CHECKED_BY_DEFAULT and torch.device(device).type == "cuda"
    if not cfg["enabled"] or not (on_gpu or cfg["all"]):
        return backend
    if torch.compiler.is_compiling() or _capturing(device):
        return backend
    width = width or 32
    key = _key(backend, device, dtype, width)
    with _lock:
        if key in _chosen:
            return _chosen[key]
        ok, reason = check_backend(backend, device, dtype, width=width)
        if ok:
            _chosen[key] = backend
            return backend
        where = f"{torch.device(device)} with {str(dtype).replace('torch.', '')} (width {width})"
        if cfg["strict"]:
            raise RuntimeError(f"lspt_kernels self-check: the {backend!r} step kernels disagree with the eager "
                               f"step on {where}: {reason} (LSPT_SELFCHECK=strict; unset it to fall back)")
        chosen = _first_passing_fallback(backend, device, dtype, width)
        _chosen[key] = chosen
    warnings.warn(f"lspt_kernels: the {backend!r} step kernels failed their self-check on {where}: {reason}; "
                  f"using the {chosen!r} step instead (LSPT_SELFCHECK=0 skips the check, =strict makes this "
                  "an error)", RuntimeWarning, stacklevel=4)
    return chosen


def _first_passing_fallback(backend: str, device, dtype, width: int) -> str:
    from . import ops
    for name in FALLBACK.get(backend, ("eager",)):
        if name == "eager":
            return name
        runs_here = torch.device(device).type == "cuda"
        # a fallback is checked like any backend
        if runs_here and ops._load_backend(name) is not None and check_backend(name, device, dtype, width=width)[0]:
            return name
    return "eager"


def _capturing(device) -> bool:
    """Inside a CUDA graph capture nothing may synchronize, and the check reads its errors back."""
    return torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing()


# ----------------------------------------------------------------------------------------------
# The check itself.
# ----------------------------------------------------------------------------------------------
def _problems(device: torch.device) -> list[tuple[int, int, int]]:
    """(B, Np, N): a tiny one, odd sizes; on a GPU also 2048 prompt rows (large-batch GEMM tiles)."""
    return [(2, 3, 5)] + ([(8, 256, 4)] if device.type == "cuda" else [])


def _layouts(dtype: torch.dtype) -> list[str]:
    return ["plain", "autocast"] if dtype in (torch.float16, torch.bfloat16) else ["plain"]


def _run(name, device, dtype, width, k) -> str | None:
    for B, n_p, N in _problems(device):
        for layout in _layouts(dtype):
            bad = _compare(name, device, dtype, layout, B, n_p, N, width, k)
            if bad is not None:
                return f"{bad} (B={B}, Np={n_p}, N={N}, D={width}, {layout} layout)"
    return None


def _inputs(B, n_p, N, D, k, seed=0):
    """fp64 CPU leaves (tokens, cell, prompt, w_ih, w_hh, b_ih, b_hh) and upstream gradients, from a
    private generator; gates of order 1 so no nonlinearity saturates."""
    g = torch.Generator().manual_seed(seed)
    std = D ** -0.5
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g, dtype=torch.float64) * scale  # noqa: E731
    leaves = (r(B, k + n_p + N, D), r(B, n_p, D), r(n_p, D, scale=0.5), r(4 * D, D, scale=std),
              r(4 * D, D, scale=std), r(4 * D, scale=std), r(4 * D, scale=std))
    upstream = (r(B, n_p, D), r(B, n_p, D))
    return leaves, upstream


def _evaluate(step, leaves, upstream):
    leaves = [t.detach().requires_grad_() for t in leaves]
    hidden, new_cell = step(*leaves)
    grads = torch.autograd.grad((hidden, new_cell), leaves, (upstream[0].to(hidden.dtype),
                                                            upstream[1].to(new_cell.dtype)))
    return [hidden, new_cell, *grads]


def _compare(name, device, dtype, layout, B, n_p, N, D, k) -> str | None:
    # Normal tensors with autograd on, whatever the caller's mode (no_grad, inference_mode, autocast),
    # and plain saved tensors: the first call may come from inside a checkpointed block, whose
    # saved-tensor hooks must not capture the check's own forward and backward.
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False), \
            torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        return _compare_outputs(name, device, dtype, layout, B, n_p, N, D, k)


def _compare_outputs(name, device, dtype, layout, B, n_p, N, D, k) -> str | None:
    from .ops import lspt_step, step_reference

    leaves64, upstream64 = _inputs(B, n_p, N, D, k)
    leaves64, upstream64 = [t.to(device) for t in leaves64], [t.to(device) for t in upstream64]
    if layout == "plain":
        leaves = [t.to(device, dtype) for t in leaves64]
    else:  # torch.autocast: fp32 tensors, the GEMM in `dtype`, the cell carried in fp32
        leaves = [t.to(device, torch.float32) for t in leaves64]
    upstream = [t.to(device) for t in upstream64]

    def fused(tokens, cell, *params):
        with torch.autocast(device.type, dtype=dtype, enabled=layout == "autocast"):
            return lspt_step(tokens, cell, *params, num_prefix_tokens=k, backend=name)

    def eager(tokens, cell, *params):   # what lspt_step hands the kernels, through the eager step
        if layout == "autocast":
            params = [p.to(dtype) for p in params]
        return step_reference(tokens, cell, *params, num_prefix_tokens=k)

    got = _evaluate(fused, leaves, upstream)
    want = _evaluate(eager, leaves, upstream)
    truth = _evaluate(lambda *a: step_reference(*a, num_prefix_tokens=k), leaves64, upstream64)
    rtol = RTOL.get(dtype, 5e-2)
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        rtol = RTOL_TF32
    for out, g, w, t in zip(OUTPUTS, got, want, truth):
        if g.shape != t.shape:
            return f"{out} has shape {tuple(g.shape)}, expected {tuple(t.shape)}"
        g, w, t = g.detach().double().cpu(), w.detach().double().cpu(), t.detach().cpu()
        if not torch.isfinite(g).all():
            return f"{out} is not finite where the eager step is"
        err = (g - t).abs().max().item()
        ref_err = (w - t).abs().max().item()
        bound = max(rtol * t.abs().max().item(), 2 * ref_err, 1e-12)
        if err > bound:
            return (f"{out} is off by {err:.3g} (allowed {bound:.3g}; the eager step at the same "
                    f"precision is off by {ref_err:.3g})")
    return None
