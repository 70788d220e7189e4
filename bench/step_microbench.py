"""Microbenchmark of one LSPT step (lspt_kernels.lspt_step) at ViT-B/16 sizes.

    python bench/step_microbench.py [--batch 8 64] [--num-prompts 10 100] [--repeats N]
                                    [--device cpu|cuda] [--dtype float32|bfloat16|float16]
                                    [--backends eager compile cpu ...] [--threads N]
                                    [--clock wall|thread] [--json rows.json]

Times the forward and forward+backward of: the reference step in eager mode ("eager", the baseline
of every ratio), the reference step under torch.compile ("compile"), and the fused backends that run
on the device ("cpu" on the CPU; "triton" and "cuda" on a GPU). Each figure is set against its floor
from METHOD.md's cost model: FLOPs (forward 8*B*Np*D^2 + 8*Np*D^2, backward about twice that) over
the peak GEMM rate, plus bytes (one read of the patch tokens for the mean; in backward the B*T*D
grad_tokens write) over the copy bandwidth. Both peaks are measured on this machine (a large mm and a
large copy) and printed. The GPU backends recompute the gates in backward (they save only
Xhat_SP), which is one forward GEMM more than this floor counts; the cpu backend saves the activated
gates instead (ops.SAVES_GATES). `lspt_step` computes the gate bias rows (P W_ih^T + biases) per call,
as eager does; inside the encoder that GEMM runs once per forward for all steps.

CPU: time.perf_counter medians after warm-up, the backends timed round-robin (a shared machine's
load then lands on all of them alike); `--threads 1 --clock thread` times CPU time of the one
thread instead, which other processes' load does not inflate. GPU: triton.testing.do_bench (CUDA
events) medians. A backend that fails (e.g. an inductor compile error) is reported, not fatal.
`run()` returns the rows as dicts so a pytest-benchmark suite can reuse the cases.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from lspt_kernels import ops  # noqa: E402
from lspt_kernels.ops import lspt_step, step_reference  # noqa: E402

VIT_B16 = dict(num_patches=196, dim=768, num_prefix_tokens=1)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------------------------
# Inputs and the timed callables
# ------------------------------------------------------------------------------------------------
def make_inputs(batch: int, num_prompts: int, *, num_patches: int = 196, dim: int = 768,
                num_prefix_tokens: int = 1, device="cpu", dtype=torch.float32, seed: int = 0):
    """tokens (B,T,D), cell (B,Np,D), prompt (Np,D) and nn.LSTMCell-initialised weights, all
    requiring grad (in LSPT training every one of them receives a gradient)."""
    g = torch.Generator().manual_seed(seed)
    T = num_prefix_tokens + num_prompts + num_patches
    bound = dim ** -0.5

    def t(*shape, scale=1.0, uniform=False):
        x = (torch.rand(*shape, generator=g) * 2 - 1) * bound if uniform else torch.randn(*shape, generator=g) * scale
        return x.to(device=device, dtype=dtype).requires_grad_()

    tokens, cell, prompt = t(batch, T, dim), t(batch, num_prompts, dim), t(num_prompts, dim, scale=0.1)
    weights = [t(4 * dim, dim, uniform=True), t(4 * dim, dim, uniform=True),
               t(4 * dim, uniform=True), t(4 * dim, uniform=True)]
    return (tokens, cell, prompt, *weights)


def _step(backend: str) -> Callable:
    if backend == "eager":
        return lambda *a, k: step_reference(*a, num_prefix_tokens=k)
    if backend == "compile":
        compiled = torch.compile(step_reference, dynamic=False)
        return lambda *a, k: compiled(*a, num_prefix_tokens=k)
    return lambda *a, k: lspt_step(*a, num_prefix_tokens=k, backend=backend)


def make_callables(backend: str, inputs, num_prefix_tokens: int = 1):
    """(forward, forward_backward) closures for one backend on fixed inputs."""
    step = _step(backend)
    tokens = inputs[0]
    B, T, D = tokens.shape
    n_p = inputs[2].shape[0]
    gh = torch.randn(B, n_p, D, generator=torch.Generator().manual_seed(1)).to(tokens)
    gc = torch.randn(B, n_p, D, generator=torch.Generator().manual_seed(2)).to(inputs[1])

    def forward():
        with torch.no_grad():
            return step(*inputs, k=num_prefix_tokens)

    def forward_backward():
        hidden, cell = step(*inputs, k=num_prefix_tokens)
        return torch.autograd.grad((hidden, cell), inputs, (gh, gc))

    return forward, forward_backward


# ------------------------------------------------------------------------------------------------
# Timing and peaks
# ------------------------------------------------------------------------------------------------
def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable, device: str, repeats: int, warmup: int = 2,
            clock: Callable[[], float] = time.perf_counter) -> float:
    """Median seconds of fn() (`clock` on the CPU)."""
    if device == "cuda":
        try:
            import triton.testing
            return triton.testing.do_bench(fn, warmup=25, rep=max(100, 10 * repeats),
                                           return_mode="median") / 1e3
        except ImportError:
            for _ in range(warmup):
                fn()
            times = []
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            return statistics.median(times)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times)


def measure_peaks(device: str, dtype: torch.dtype, repeats: int = 5,
                  clock: Callable[[], float] = time.perf_counter) -> dict:
    """Achievable GEMM FLOP/s (a large mm in `dtype`) and copy bandwidth on this machine:
    the best of `repeats` runs (a peak, so the fastest run, not the median)."""
    # On the CPU a large GEMM of the step's own K and N (D=768, 4D=3072), with the right operand
    # transposed as F.linear passes a weight: on CPUs without bf16/fp16 matrix units, low-precision
    # GEMMs in other layouts (or square ones) take a reference kernel ~20x slower.
    m, kd, n = (8192, 8192, 8192) if device != "cpu" else (4096, 768, 3072)
    a = torch.randn(m, kd, device=device).to(dtype)
    b = torch.randn(n, kd, device=device).to(dtype).t()  # a weight as F.linear uses it
    out = torch.empty(m, n, device=device, dtype=dtype)
    t_mm = min(time_fn(lambda: torch.mm(a, b, out=out), device, 1, warmup=1 if i == 0 else 0, clock=clock)
               for i in range(repeats))
    numel = (64 if device == "cpu" else 512) * 2 ** 20
    src = torch.empty(numel, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    t_copy = min(time_fn(lambda: dst.copy_(src), device, 1, warmup=1 if i == 0 else 0, clock=clock)
                 for i in range(repeats))
    return dict(flops_per_s=2 * m * kd * n / t_mm, bytes_per_s=2 * src.nbytes / t_copy,
                how=f"torch.mm {m}x{kd} @ {kd}x{n} {str(dtype).replace('torch.', '')}; "
                    f"copy of {src.nbytes / 2**20:.0f} MiB fp32 (read + write)")


def floors(B: int, n_p: int, N: int, D: int, k: int, elt: int, peaks: dict) -> tuple[float, float]:
    """Cost-model floors (seconds) of the forward and the forward+backward."""
    flops_fwd = 8 * B * n_p * D * D + 8 * n_p * D * D
    bytes_fwd = B * N * D * elt                    # one read of the patch tokens (the mean)
    bytes_bwd = B * (k + n_p + N) * D * elt        # the grad_tokens write
    fwd = flops_fwd / peaks["flops_per_s"] + bytes_fwd / peaks["bytes_per_s"]
    fwd_bwd = 3 * flops_fwd / peaks["flops_per_s"] + (bytes_fwd + bytes_bwd) / peaks["bytes_per_s"]
    return fwd, fwd_bwd


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def default_backends(device: str) -> list[str]:
    return ["eager", "compile", "cpu"] if device == "cpu" else ["eager", "compile", "triton", "cuda"]


def _interleaved_cpu_times(callables: dict[str, Callable], repeats: int, warmup: int = 2,
                           clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds per callable, timed round-robin so that load from other processes on a
    shared machine lands on every backend alike (the ratios stay meaningful)."""
    for fn in callables.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in callables}
    for _ in range(repeats):
        for name, fn in callables.items():
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def run(batches=(8, 64), num_prompts=(10, 100), *, device: str = "cpu", dtype=torch.float32,
        repeats: int = 10, backends: list[str] | None = None, num_patches: int = 196,
        dim: int = 768, num_prefix_tokens: int = 1, peaks: dict | None = None,
        clock: str = "wall") -> list[dict]:
    """One row per (batch, num_prompts, backend): times (ms), ratios to eager, cost-model floors.

    clock="thread" (CPU, one intra-op thread only) times with time.thread_time: the CPU time of the
    timing thread, which waiting for other processes' load does not inflate."""
    if clock == "thread" and (device != "cpu" or torch.get_num_threads() != 1):
        raise ValueError("clock='thread' needs device='cpu' and torch.set_num_threads(1)")
    cpu_clock = time.thread_time if clock == "thread" else time.perf_counter
    backends = backends or default_backends(device)
    peaks = peaks or measure_peaks(device, dtype, clock=cpu_clock)
    try:  # one compiled graph per shape and grad mode
        torch._dynamo.config.recompile_limit = 64
    except AttributeError:
        torch._dynamo.config.cache_size_limit = 64
    rows = []
    for B in batches:
        for n_p in num_prompts:
            inputs = make_inputs(B, n_p, num_patches=num_patches, dim=dim,
                                 num_prefix_tokens=num_prefix_tokens, device=device, dtype=dtype)
            floor_fwd, floor_fb = floors(B, n_p, num_patches, dim, num_prefix_tokens,
                                         inputs[0].element_size(), peaks)
            base = dict(device=device, dtype=str(dtype).replace("torch.", ""), batch=B,
                        num_prompts=n_p, num_patches=num_patches, dim=dim,
                        num_prefix_tokens=num_prefix_tokens,
                        floor_fwd_ms=floor_fwd * 1e3, floor_fwd_bwd_ms=floor_fb * 1e3)
            runnable, skipped = {}, {}
            for backend in backends:
                why = None if backend in ("eager", "compile") else ops.unavailable_reason(backend)
                if why is None and backend == "triton" and device != "cuda":
                    why = "Triton needs a GPU (the interpreter is not worth timing)"
                if why is None and backend == "cuda" and device != "cuda":
                    why = "needs CUDA tensors"
                if why is None and backend == "cpu" and device != "cpu":
                    why = "needs CPU tensors"
                if why is None:
                    fwd, fwd_bwd = make_callables(backend, inputs, num_prefix_tokens)
                    try:  # also the warm-up (and torch.compile's compilation)
                        fwd(), fwd_bwd()
                        _sync(device)
                    except Exception as exc:  # noqa: BLE001 - report it, time the others
                        why = f"failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}"
                    else:
                        runnable[backend] = (fwd, fwd_bwd)
                if why is not None:
                    skipped[backend] = why
            if device == "cpu":
                t_fwd = _interleaved_cpu_times({b: c[0] for b, c in runnable.items()}, repeats, clock=cpu_clock)
                t_fb = _interleaved_cpu_times({b: c[1] for b, c in runnable.items()}, repeats, clock=cpu_clock)
            else:
                t_fwd = {b: time_fn(c[0], device, repeats) for b, c in runnable.items()}
                t_fb = {b: time_fn(c[1], device, repeats) for b, c in runnable.items()}
            for backend in backends:
                row = dict(base, backend=backend)
                if backend in skipped:
                    rows.append({**row, "skipped": skipped[backend]})
                    continue
                f, fb = t_fwd[backend] * 1e3, t_fb[backend] * 1e3
                ef, efb = (t_fwd["eager"] * 1e3, t_fb["eager"] * 1e3) if "eager" in t_fwd else (None, None)
                row.update(fwd_ms=f, fwd_bwd_ms=fb,
                           fwd_speedup=ef / f if ef else float("nan"),
                           fwd_bwd_speedup=efb / fb if efb else float("nan"),
                           fwd_of_floor=floor_fwd * 1e3 / f, fwd_bwd_of_floor=floor_fb * 1e3 / fb)
                rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    head = (f"{'B':>3} {'Np':>4} {'backend':>8} | {'fwd ms':>9} {'x eager':>7} {'floor%':>6} | "
            f"{'fwd+bwd ms':>10} {'x eager':>7} {'floor%':>6} | {'floor fwd':>9} {'floor f+b':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        pre = f"{r['batch']:>3} {r['num_prompts']:>4} {r['backend']:>8} | "
        if "skipped" in r:
            lines.append(pre + f"skipped: {r['skipped']}")
            continue
        lines.append(pre + f"{r['fwd_ms']:9.2f} {r['fwd_speedup']:6.2f}x {100 * r['fwd_of_floor']:5.0f}% | "
                     f"{r['fwd_bwd_ms']:10.2f} {r['fwd_bwd_speedup']:6.2f}x {100 * r['fwd_bwd_of_floor']:5.0f}% | "
                     f"{r['floor_fwd_ms']:9.2f} {r['floor_fwd_bwd_ms']:9.2f}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[8, 64])
    p.add_argument("--num-prompts", type=int, nargs="+", default=[10, 100])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--backends", nargs="+", default=None,
                   help="subset of eager compile cpu triton cuda (default: all for the device)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--clock", choices=["wall", "thread"], default="wall",
                   help="CPU only: 'thread' = time.thread_time with --threads 1 (immune to other load)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread" and (args.device != "cpu" or torch.get_num_threads() != 1):
        p.error("--clock thread needs --device cpu --threads 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")

    dtype = DTYPES[args.dtype]
    peaks = measure_peaks(args.device, dtype, clock=time.thread_time if args.clock == "thread" else time.perf_counter)
    name = torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or platform.machine())
    print(f"device: {args.device} ({name}); torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"{os.cpu_count()} CPUs; dtype {args.dtype}")
    print(f"peaks measured here: {peaks['flops_per_s'] / 1e9:.0f} GFLOP/s, {peaks['bytes_per_s'] / 1e9:.1f} GB/s "
          f"({peaks['how']})")
    print(f"shape: ViT-B/16 N={VIT_B16['num_patches']} D={VIT_B16['dim']} k={VIT_B16['num_prefix_tokens']}; "
          f"floor = cost-model FLOPs / peak + bytes / bandwidth; floor% = floor / time")
    how = ("triton.testing.do_bench medians" if args.device == "cuda" else
           f"{'time.thread_time' if args.clock == 'thread' else 'time.perf_counter'} medians, round-robin")
    print(f"timing: {how} of {args.repeats} after warm-up; load average before: {_loadavg()}\n")
    rows = run(args.batch, args.num_prompts, device=args.device, dtype=dtype, repeats=args.repeats,
               backends=args.backends, peaks=peaks, clock=args.clock, **VIT_B16)
    print(format_table(rows))
    print(f"\nload average after: {_loadavg()}")
    if args.json:
        args.json.write_text(json.dumps(dict(peaks=peaks, rows=rows), indent=1))
    return rows


if __name__ == "__main__":
    main()
