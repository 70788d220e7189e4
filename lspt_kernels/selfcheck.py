"""Fused kernels that check themselves before anyone relies on them.

The first time a process is about to run a fused backend in a configuration, `ensure` runs the
step the caller hands it (the registered op, forward and backward, as training runs it) once on a
tiny problem of exactly that configuration and compares every output with the eager step
(lspt_kernels/eager.py) against an fp64 evaluation. If the kernel disagrees beyond tolerance or
fails to launch, the next backend of FALLBACK that passes its own check is used, with ONE warning
that says why. No user on an untested GPU gets silently wrong numbers from a kernel nobody ran there.

The configuration (`StepCase`, the cache key) is everything that selects another kernel path: the
backend, the device, the dtypes of tokens, cell and weights (so torch.autocast's fp32 tokens with a
16-bit GEMM are their own case), the width D, the number of prefix tokens k, gate-bias rows shared
(Np, 4D) or per image (B, Np, 4D, prompt dropout), the token layout (contiguous, strided and
16-byte aligned, or unaligned: the CUDA kernels' scalar path) and the fp32 matmul precision of the
device (a later switch to TF32 must not run an unchecked Triton configuration), and whether the
step is the grouped one (multi-task inference, ops.grouped_step: its own kernels, checked forward
only on batches of several groups, one of them empty, of odd sizes, against the eager grouped step).

Which backends are checked: the GPU ones ("cuda", "triton") on CUDA tensors by default; with
LSPT_SELFCHECK=all also the C++ CPU one and Triton's CPU interpreter (a test tool, TRITON_INTERPRET=1),
which is how the tests exercise the mechanism without a GPU.

    LSPT_SELFCHECK=0          no check (also "off", "false", "no")
    LSPT_SELFCHECK=strict     a failed check is an error instead of a fallback (also "error")
    LSPT_SELFCHECK=all        check every fused backend, the C++ CPU one included; combine as "all,strict"

Tolerance (per output, against the fp64 evaluation): within rtol x the output's largest magnitude, or
within 2x the error of the eager step at the same precision (flash-attention's rule). rtol by the
GEMM dtype: fp64 1e-9, fp32 1e-4 (5e-3 with TF32, 5e-2 with bf16 GEMMs), fp16 1e-2, bf16 5e-2: loose
for rounding, tight for a wrong kernel (a bad index or a wrong gate is off by O(1)). On a GPU a
second problem with 2048 prompt rows reaches the GEMM configurations for large batches.

Where the check runs: never inside a trace or a graph capture. The recorded choice of a case is
looked up first, so a backend that failed once is never baked into a compiled or captured graph.
ops.resolve_backend is marked `torch.compiler.assume_constant_result`, so under torch.compile
Dynamo calls it (and this check) as plain Python at trace time and keeps only the chosen name; under
make_fx / torch.export the check runs with the tracing modes switched off; inside a CUDA graph
capture, where nothing may synchronize, an unchecked backend is replaced by the eager step for that
capture (one warning: run one forward before capturing). The check never touches the global RNG,
runs with gradients on even under no_grad / inference_mode, and ignores the caller's autocast and
saved-tensor hooks (gradient checkpointing).
"""
from __future__ import annotations

import os
import threading
import warnings
from typing import Callable, NamedTuple

import torch

from . import backends
from .eager import grouped_step_eager, step_eager
from .precision import float32_matmul_precision

CHECKED_BY_DEFAULT = ("cuda", "triton")
# Where a backend that fails its check falls back to, in order (the first that passes its own check).
FALLBACK = {"cuda": ("triton", "eager"), "triton": ("eager",), "cpu": ("eager",)}
RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
RTOL_FP32_GEMM = {"tf32": 5e-3, "bf16": 5e-2}      # fp32 GEMMs the precision setting lets run lower
LAYOUTS = ("contiguous", "strided", "unaligned")
OUTPUTS = ("hidden", "new_cell", "grad_tokens", "grad_cell", "grad_gate_bias", "grad_weight_hh")

# A step under check: (tokens, cell, gate_bias, weight_hh, num_prefix_tokens, backend, save_gates)
# -> (hidden, new_cell), differentiable; for a grouped case (tokens, cell, gate_bias, weight_hh,
# offsets, num_prefix_tokens, backend) -> (hidden, new_cell), forward only. ops passes its op.
Step = Callable[..., tuple]


class StepCase(NamedTuple):
    """One configuration of the LSPT step's kernels (the cache key, with the backend)."""
    device: str
    tokens_dtype: torch.dtype
    cell_dtype: torch.dtype
    weight_dtype: torch.dtype
    width: int
    num_prefix_tokens: int
    per_image_rows: bool
    layout: str
    precision: str
    grouped: bool = False

    def describe(self) -> str:
        dt = lambda d: str(d).replace("torch.", "")  # noqa: E731
        dtypes = dt(self.weight_dtype) if self.tokens_dtype == self.cell_dtype == self.weight_dtype else \
            f"tokens {dt(self.tokens_dtype)}, cell {dt(self.cell_dtype)}, weights {dt(self.weight_dtype)}"
        grouped = "grouped step, " if self.grouped else ""
        return (f"{self.device} with {dtypes} ({grouped}D={self.width}, k={self.num_prefix_tokens}, "
                f"{'per-image' if self.per_image_rows else 'shared'} gate-bias rows, {self.layout} tokens, "
                f"fp32 matmul precision {self.precision})")


_results: dict[tuple, tuple[bool, str]] = {}      # (backend, case) -> (ok, reason)
_chosen: dict[tuple, str] = {}                    # same key -> the backend used
_warned_capture: set[tuple] = set()
_lock = threading.RLock()
_settings_cache: dict[str, dict] = {}


def settings() -> dict:
    """LSPT_SELFCHECK parsed: {"enabled", "strict", "all"}."""
    raw = os.environ.get("LSPT_SELFCHECK", "1")
    parsed = _settings_cache.get(raw)
    if parsed is None:
        text = raw.strip().lower()
        words = set(text.replace(",", " ").split())
        parsed = dict(enabled=text not in ("0", "off", "false", "no"), strict=bool(words & {"strict", "error"}),
                      all="all" in words)
        _settings_cache[raw] = parsed
    return parsed


def reset() -> None:
    """Forget every result (tests; or after changing LSPT_SELFCHECK in a running process)."""
    with _lock:
        _results.clear()
        _chosen.clear()
        _warned_capture.clear()


def token_layout(tokens: torch.Tensor) -> str:
    """"contiguous", "strided" (16-byte aligned offset and strides) or "unaligned": the layouts the
    kernels treat differently (the CUDA kernels' vector loads, Triton's alignment specialisation).
    While Dynamo traces, the storage offset is not readable: a compiled graph's tokens (a block's
    output there) are taken as aligned, their strides still decide."""
    vec = max(1, 16 // tokens.element_size())
    offset = 0 if torch.compiler.is_compiling() else tokens.storage_offset()
    aligned = offset % vec == 0 and all(s % vec == 0 for s in tokens.stride()[:-1])
    if not aligned:
        return "unaligned"
    return "contiguous" if tokens.is_contiguous() else "strided"


def make_case(backend: str, device: torch.device, tokens_dtype, cell_dtype, weight_dtype, width: int,
              num_prefix_tokens: int, per_image_rows: bool, layout: str, *, grouped: bool = False) -> StepCase:
    """The case of a call of `backend` on `device`, with the fp32 matmul precision its GEMMs follow
    now (cuBLAS' for the GPU kernels, Triton's interpreter included; oneDNN's for "cpu")."""
    gemm_device = "cuda" if backend in ("cuda", "triton") else device.type
    return StepCase(str(device), tokens_dtype, cell_dtype, weight_dtype, int(width), int(num_prefix_tokens),
                    bool(per_image_rows or grouped), layout, float32_matmul_precision(gemm_device), bool(grouped))


def checked_by_default(backend: str, device: torch.device) -> bool:
    return backend in CHECKED_BY_DEFAULT and device.type == "cuda"


def ensure(backend: str, case: StepCase, step: Step) -> str:
    """The backend to use for `backend` in `case`: itself if it passes (or is not checked), else the
    first fallback that passes, with one warning; an error under LSPT_SELFCHECK=strict."""
    key = (backend, case)
    chosen = _chosen.get(key)
    if chosen is not None:          # first, also inside a trace or a capture: a failure stays a failure
        return chosen
    cfg = settings()
    device = torch.device(case.device)
    if backend == "eager" or not cfg["enabled"] or not (checked_by_default(backend, device) or cfg["all"]):
        return backend
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return _capturing(backend, case)
    with _lock:
        if key in _chosen:
            return _chosen[key]
        ok, reason = check_backend(backend, case, step)
        if ok:
            _chosen[key] = backend
            return backend
        if cfg["strict"]:
            raise RuntimeError(f"lspt_kernels self-check: the {backend!r} step kernels disagree with the eager "
                               f"step on {case.describe()}: {reason} (LSPT_SELFCHECK=strict; unset it to fall back)")
        chosen = _first_passing_fallback(backend, case, step)
        _chosen[key] = chosen
    warnings.warn(f"lspt_kernels: the {backend!r} step kernels failed their self-check on {case.describe()}: "
                  f"{reason}; using the {chosen!r} step instead (LSPT_SELFCHECK=0 skips the check, =strict makes "
                  "this an error)", RuntimeWarning, stacklevel=4)
    return chosen


def _capturing(backend: str, case: StepCase) -> str:
    """Inside a CUDA graph capture nothing may synchronize, and the check reads its errors back."""
    if (backend, case) not in _warned_capture:
        _warned_capture.add((backend, case))
        warnings.warn(f"lspt_kernels: the {backend!r} step was not yet checked on {case.describe()} and a CUDA "
                      "graph is being captured, where the check cannot run: this capture uses the eager step; run "
                      "one forward before capturing", RuntimeWarning, stacklevel=4)
    return "eager"


def _first_passing_fallback(backend: str, case: StepCase, step: Step) -> str:
    device = torch.device(case.device)
    for name in FALLBACK.get(backend, ("eager",)):
        if name == "eager":
            return name
        if backends.device_mismatch(name, device) is None and backends.load(name) \
                and check_backend(name, case, step)[0]:
            _chosen[(name, case)] = name
            return name
    return "eager"


def check_backend(backend: str, case: StepCase, step: Step) -> tuple[bool, str]:
    """(ok, reason): does `step(..., backend)` agree with the eager step in `case`, forward (with and
    without saved gates) and backward? Cached per (backend, case) for the life of the process."""
    key = (backend, case)
    with _lock:
        if key in _results:
            return _results[key]
        try:
            reason = _run(backend, case, step)
        except Exception as exc:  # a kernel that fails to compile or launch fails its check
            reason = f"it raised {type(exc).__name__}: {str(exc).strip()[:300]}"
        _results[key] = (reason is None, reason or "")
        return _results[key]


# ----------------------------------------------------------------------------------------------
# The check itself.
# ----------------------------------------------------------------------------------------------
def _problems(device: torch.device) -> list[tuple[int, int, int]]:
    """(B, Np, N): a tiny one, odd sizes; on a GPU also 2048 prompt rows (large-batch GEMM tiles)."""
    return [(2, 3, 5)] + ([(8, 256, 4)] if device.type == "cuda" else [])


def _run(backend: str, case: StepCase, step: Step) -> str | None:
    from torch.utils._python_dispatch import _disable_current_modes
    # Real tensors with autograd on, whatever the caller's state: no make_fx / export / user dispatch
    # mode sees the check, no_grad / inference_mode / autocast do not apply, and a checkpointed
    # block's saved-tensor hooks do not capture the check's own forward and backward.
    with _disable_current_modes(), torch.inference_mode(False), torch.enable_grad(), \
            torch.autocast(torch.device(case.device).type, enabled=False), \
            torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        if case.grouped:
            for sizes, n_p, N in _grouped_problems(torch.device(case.device)):
                bad = _compare_grouped(backend, case, step, sizes, n_p, N)
                if bad is not None:
                    return f"{bad} (group sizes {sizes}, Np={n_p}, N={N})"
            return None
        for B, n_p, N in _problems(torch.device(case.device)):
            bad = _compare(backend, case, step, B, n_p, N)
            if bad is not None:
                return f"{bad} (B={B}, Np={n_p}, N={N})"
    return None


def _inputs(case: StepCase, B: int, n_p: int, N: int, seed: int = 0):
    """fp64 CPU leaves (tokens, cell, gate_bias, weight_hh) and upstream gradients, from a private
    generator; gates of order 1 so no nonlinearity saturates."""
    g = torch.Generator().manual_seed(seed)
    D, k = case.width, case.num_prefix_tokens
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g, dtype=torch.float64) * scale  # noqa: E731
    rows = (B, n_p, 4 * D) if case.per_image_rows else (n_p, 4 * D)
    leaves = (r(B, k + n_p + N, D), r(B, n_p, D), r(*rows, scale=0.5), r(4 * D, D, scale=D ** -0.5))
    return leaves, (r(B, n_p, D), r(B, n_p, D))


def _in_layout(values: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as tokens in `layout` (stride(-1) == 1 always)."""
    B, T, D = values.shape
    if layout == "contiguous":
        return values.contiguous()
    if layout == "strided":              # (T, B, D) storage: batch stride D, token stride B*D
        return values.transpose(0, 1).contiguous().transpose(0, 1)
    buf = values.new_zeros(B * T * D + 1)   # one element off: no vector access lines up
    out = buf[1:].view(B, T, D)
    out.copy_(values)
    return out


def _evaluate(step, leaves, upstream, layout):
    leaves = [t.detach().requires_grad_() for t in leaves]
    tokens = _in_layout(leaves[0], layout)
    hidden, new_cell = step(tokens, *leaves[1:])
    grads = torch.autograd.grad((hidden, new_cell), leaves,
                                (upstream[0].to(hidden.dtype), upstream[1].to(new_cell.dtype)))
    return [hidden, new_cell, *grads]


def _rtol(case: StepCase) -> float:
    if case.weight_dtype == torch.float32 and case.precision in RTOL_FP32_GEMM:
        return RTOL_FP32_GEMM[case.precision]
    return RTOL.get(case.weight_dtype, 5e-2)


def _off_by(name: str, g: torch.Tensor, w: torch.Tensor, t: torch.Tensor, rtol: float) -> str | None:
    """Why output `name` fails (g: the backend, w: eager at the same precision, t: fp64 eager), or None."""
    if g.shape != t.shape:
        return f"{name} has shape {tuple(g.shape)}, expected {tuple(t.shape)}"
    g, w, t = g.detach().double().cpu(), w.detach().double().cpu(), t.detach().cpu()
    if not torch.isfinite(g).all():
        return f"{name} is not finite where the eager step is"
    err = (g - t).abs().max().item() if t.numel() else 0.0
    ref_err = (w - t).abs().max().item() if t.numel() else 0.0
    bound = max(rtol * (t.abs().max().item() if t.numel() else 0.0), 2 * ref_err, 1e-12)
    if err > bound:
        return (f"{name} is off by {err:.3g} (allowed {bound:.3g}; the eager step at the same "
                f"precision is off by {ref_err:.3g})")
    return None


def _grouped_problems(device: torch.device) -> list[tuple[tuple[int, ...], int, int]]:
    """(group sizes, Np, N): four groups, the second empty, odd sizes; on a GPU also 2048 prompt rows."""
    return [((2, 0, 3, 1), 3, 5)] + ([((5, 0, 3), 256, 4)] if device.type == "cuda" else [])


def _compare_grouped(backend: str, case: StepCase, step: Step, sizes, n_p: int, N: int) -> str | None:
    device, k, D = torch.device(case.device), case.num_prefix_tokens, case.width
    B, G = sum(sizes), len(sizes)
    g = torch.Generator().manual_seed(0)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g, dtype=torch.float64) * scale  # noqa: E731
    leaves64 = [r(B, k + n_p + N, D).to(device), r(B, n_p, D).to(device), r(B, n_p, 4 * D, scale=0.5).to(device),
                r(G, 4 * D, D, scale=D ** -0.5).to(device)]
    offsets = torch.tensor([0, *sizes], device=device).cumsum(0)
    dtypes = (case.tokens_dtype, case.cell_dtype, case.weight_dtype, case.weight_dtype)
    leaves = [t.to(dt) for t, dt in zip(leaves64, dtypes)]
    leaves[0] = _in_layout(leaves[0], case.layout)
    with torch.no_grad():
        got = step(*leaves, offsets, k, backend)
        want = grouped_step_eager(*leaves, offsets, k)
        truth = grouped_step_eager(*leaves64, offsets, k)
    rtol = _rtol(case)
    for name, gt, w, t in zip(("hidden", "new_cell"), got, want, truth):
        bad = _off_by(name, gt, w, t, rtol)
        if bad is not None:
            return bad
    return None


def _compare(backend: str, case: StepCase, step: Step, B: int, n_p: int, N: int) -> str | None:
    device, k = torch.device(case.device), case.num_prefix_tokens
    leaves64, upstream64 = _inputs(case, B, n_p, N)
    leaves64 = [t.to(device) for t in leaves64]
    upstream = [t.to(device) for t in upstream64]
    dtypes = (case.tokens_dtype, case.cell_dtype, case.weight_dtype, case.weight_dtype)
    leaves = [t.to(dt) for t, dt in zip(leaves64, dtypes)]

    got = _evaluate(lambda *a: step(*a, k, backend, True), leaves, upstream, case.layout)
    want = _evaluate(lambda *a: step_eager(*a, k), leaves, upstream, case.layout)
    truth = _evaluate(lambda *a: step_eager(*a, k), leaves64, upstream, "contiguous")
    with torch.no_grad():       # the inference forward (no gates saved) is its own kernel path
        tokens = _in_layout(leaves[0], case.layout)
        got_nograd = step(tokens, *leaves[1:], k, backend, False)
    rtol = _rtol(case)
    for name, g, w, t in zip(OUTPUTS + ("hidden (no grad)", "new_cell (no grad)"), got + list(got_nograd),
                             want + want[:2], truth + truth[:2]):
        bad = _off_by(name, g, w, t, rtol)
        if bad is not None:
            return bad
    return None
