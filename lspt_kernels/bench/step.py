"""`lspt-bench step`: what LSPT's step costs, per backend: the op at ViT-B/16 sizes, its host cost, and
the host cost of one LSPT block inside the encoder; whole encoders under torch.compile on a GPU.

    lspt-bench step [--tables steps,host,encoder-host[,compiled]] [--batch 8 64] [--num-prompts 10 100]
                    [--repeats N] [--warmup N] [--device cpu|cuda] [--dtype float32|bfloat16|float16]
                    [--backends eager compile cpu ...] [--threads N] [--clock wall|thread]
                    [--json rows.json]

Table 'steps': the forward (no grad) and forward+backward of the eager step ("eager",
`lspt_step(..., backend="eager")`, the baseline of every ratio), the same under torch.compile
("compile"), and the fused backends that run on the device ("cpu" on the CPU; "triton" and "cuda"
on a GPU), all through the public `lspt_step`. Protocol (lspt_kernels.bench.measure): the backends
run in interleaved rounds, one call each per round (on a GPU, or for calls shorter than a few
milliseconds, one sample is several back-to-back calls between two clock reads); each figure is
the median over the rounds with its quartiles; the speed-up over eager is taken round by round.
Each figure is set against its floor from the cost model: FLOPs (forward 8*B*Np*D^2 + 8*Np*D^2,
backward about twice that) over the peak GEMM rate, plus bytes (one read of the patch tokens for the
mean; in backward the B*T*D grad_tokens write) over the copy bandwidth; both peaks are measured on
this machine (a large mm and a large copy, best of several) and printed.

Table 'host': the op's cost per call on tiny tensors (B 1, Np 1, N 4, D 8), one CPU thread,
forward+backward and no-grad forward in microseconds, through `lspt_step` and as the encoder calls
it per block. Table 'encoder-host' (lspt_kernels.bench.host): what a user pays per LSPT block in the
encoder beyond VPT-deep, per-forward set-up included, in microseconds and F.linear units. Table
'compiled' (lspt_kernels.bench.compiled): LSPT-fused and GaPT, eager / torch.compile /
mode="reduce-overhead", train and inference, LSPT / GaPT per round.

Targets: CPU - the fused forward+backward no slower than eager; GPU - the fused forward+backward
>= 3x eager and within 1.5x (cuda) / 2x (triton) of its floor; encoder host cost <= 2.0 F.linear
units per block forward+backward, <= 0.5 under no_grad. Verdicts met / missed / inconclusive (the
spread straddles the limit). A backend that fails (e.g. an inductor compile error) is reported, not
fatal.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

from .env import environment, load_line, load_warning, loadavg
from .measure import Timer, interleaved_rounds, per_round_ratios, short_error, summarize, sync, verdict
from .targets import get_summary, put_summary

VIT_B16 = dict(num_patches=196, dim=768, num_prefix_tokens=1)
HOST_OVERHEAD = dict(batch=1, num_prompts=1, num_patches=4, dim=8, num_prefix_tokens=1)
DTYPES = ("float32", "bfloat16", "float16")
STEP_TARGETS = dict(cpu_speedup=1.0, gpu_speedup=3.0, floor=dict(cuda=1.5, triton=2.0))
# One sample lasts at least this long (several calls when one is shorter): clock and launch
# overheads stay below a few per cent of what is measured.
MIN_SAMPLE_S = dict(cpu=0.005, cuda=0.002)


def _torch_dtype(name: str):
    import torch
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
            "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


# ------------------------------------------------------------------------------------------------
# Inputs and the timed callables
# ------------------------------------------------------------------------------------------------
def make_inputs(batch: int, num_prompts: int, *, num_patches: int = 196, dim: int = 768,
                num_prefix_tokens: int = 1, device="cpu", dtype=None, seed: int = 0):
    """tokens (B,T,D), cell (B,Np,D), prompt (Np,D) and nn.LSTMCell-initialised weights, all
    requiring grad (in LSPT training every one of them receives a gradient)."""
    import torch
    dtype = dtype or torch.float32
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


def step_fn(backend: str) -> Callable:
    """The step of a benchmark backend name: "eager" (the plain-PyTorch step), "compile" (it under
    torch.compile), or a fused backend of lspt_step."""
    import torch

    from ..ops import lspt_step
    if backend in ("eager", "reference"):
        return lambda *a, k: lspt_step(*a, num_prefix_tokens=k, backend="eager")
    if backend == "compile":
        def eager(*a, k):
            return lspt_step(*a, num_prefix_tokens=k, backend="eager")
        return torch.compile(eager, dynamic=False)
    return lambda *a, k: lspt_step(*a, num_prefix_tokens=k, backend=backend)


def make_callables(backend: str, inputs, num_prefix_tokens: int = 1, api: str = "lspt_step"):
    """(forward, forward_backward) closures for one backend on fixed inputs. api="lspt_step": the
    public op, validated per call; api="encoder": what LSPTEncoder runs per block, `ops.fused_step`
    on gate-bias rows computed beforehand (its checks, backend resolution and W_ih GEMM run once per
    forward, not per step)."""
    import torch
    if api == "encoder":
        from ..eager import gate_bias_rows
        from ..ops import fused_step
        tokens, cell, prompt, w_ih, w_hh, b_ih, b_hh = inputs
        with torch.no_grad():
            gate_bias = gate_bias_rows(prompt, w_ih, b_ih, b_hh)
        inputs = (tokens, cell, gate_bias.requires_grad_(), w_hh)
        name = "eager" if backend == "reference" else backend
        step = lambda *a, k: fused_step(*a, k, name, torch.is_grad_enabled())  # noqa: E731
    else:
        step = step_fn(backend)
    tokens = inputs[0]
    B, T, D = tokens.shape
    n_p = inputs[1].shape[1]
    gh = torch.randn(B, n_p, D, generator=torch.Generator().manual_seed(1)).to(tokens)
    gc = torch.randn(B, n_p, D, generator=torch.Generator().manual_seed(2)).to(inputs[1])

    def forward():
        with torch.no_grad():
            return step(*inputs, k=num_prefix_tokens)

    def forward_backward():
        hidden, cell = step(*inputs, k=num_prefix_tokens)
        return torch.autograd.grad((hidden, cell), inputs, (gh, gc))

    return forward, forward_backward


def default_backends(device: str) -> list[str]:
    return ["eager", "compile", "cpu"] if str(device) == "cpu" else ["eager", "compile", "triton", "cuda"]


def unavailable(backend: str, device: str) -> str | None:
    """Why `backend` cannot be timed on `device` (None when it can)."""
    from ..backends import unavailable_reason
    if backend in ("eager", "compile"):
        return None
    if backend not in ("cpu", "triton", "cuda"):
        return "unknown backend (choose from eager, compile, cpu, triton, cuda)"
    why = unavailable_reason(backend)
    if why:
        from .methods import short_reason
        return short_reason(why)
    if backend == "triton" and device != "cuda":
        return "Triton needs a GPU (the interpreter is not worth timing)"
    if backend == "cuda" and device != "cuda":
        return "needs CUDA tensors"
    if backend == "cpu" and device != "cpu":
        return "needs CPU tensors"
    return None


# ------------------------------------------------------------------------------------------------
# Peaks and floors
# ------------------------------------------------------------------------------------------------
def measure_peaks(device: str, dtype, repeats: int = 5, clock: Callable[[], float] = time.perf_counter) -> dict:
    """Achievable GEMM FLOP/s (a large mm in `dtype`) and copy bandwidth on this machine: the best
    of `repeats` samples (a peak, so the fastest, not the median)."""
    import torch
    # On the CPU a large GEMM of the step's own K and N (D=768, 4D=3072), with the right operand
    # transposed as F.linear passes a weight: on CPUs without bf16/fp16 matrix units, low-precision
    # GEMMs in other layouts (or square ones) take a reference kernel ~20x slower.
    m, kd, n = (8192, 8192, 8192) if device != "cpu" else (4096, 768, 3072)
    a = torch.randn(m, kd, device=device).to(dtype)
    b = torch.randn(n, kd, device=device).to(dtype).t()
    out = torch.empty(m, n, device=device, dtype=dtype)
    timer = Timer(device, clock)
    mm = lambda: torch.mm(a, b, out=out)  # noqa: E731
    mm()
    t_mm = min(timer(mm) for _ in range(repeats))
    numel = (64 if device == "cpu" else 512) * 2 ** 20
    src = torch.empty(numel, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    cp = lambda: dst.copy_(src)  # noqa: E731
    cp()
    t_copy = min(timer(cp) for _ in range(repeats))
    return dict(flops_per_s=2 * m * kd * n / t_mm, bytes_per_s=2 * src.nbytes / t_copy,
                how=f"torch.mm {m}x{kd} @ {kd}x{n} {str(dtype).replace('torch.', '')}; "
                    f"copy of {src.nbytes / 2**20:.0f} MiB fp32 (read + write); best of {repeats}")


def floors(B: int, n_p: int, N: int, D: int, k: int, elt: int, peaks: dict) -> tuple[float, float]:
    """Cost-model floors (seconds) of the forward and the forward+backward."""
    flops_fwd = 8 * B * n_p * D * D + 8 * n_p * D * D
    bytes_fwd = B * N * D * elt                    # one read of the patch tokens (the mean)
    bytes_bwd = B * (k + n_p + N) * D * elt        # the grad_tokens write
    fwd = flops_fwd / peaks["flops_per_s"] + bytes_fwd / peaks["bytes_per_s"]
    fwd_bwd = 3 * flops_fwd / peaks["flops_per_s"] + (bytes_fwd + bytes_bwd) / peaks["bytes_per_s"]
    return fwd, fwd_bwd



def _time_backends(backends: list[str], inputs, device: str, repeats: int, warmup: int, timer: Timer,
                   k: int, min_sample_s: float, api: str = "lspt_step") -> tuple[dict, dict, dict]:
    """{direction: {backend: [seconds per call per round]}}, {backend: why skipped}, {backend: inner}."""
    runnable, skipped = {}, {}
    for backend in backends:
        why = unavailable(backend, device)
        if why is None and api == "encoder" and backend == "compile":
            why = "not an encoder step (the encoder compiles as a whole)"
        if why is None:
            fwd, fwd_bwd = make_callables(backend, inputs, k, api)
            try:                          # also compiles "compile" (both graphs)
                fwd(), fwd_bwd()
                sync(device)
            except Exception as exc:  # noqa: BLE001 - report it, time the others
                why = f"failed: {short_error(exc, 160)}"
            else:
                runnable[backend] = (fwd, fwd_bwd)
        if why is not None:
            skipped[backend] = why
    times, inner = {}, {}
    for i, direction in enumerate(("fwd", "fwd_bwd")):
        fns = {b: c[i] for b, c in runnable.items()}
        inn = {b: timer.calibrate(f, min_sample_s) for b, f in fns.items()}
        inner.update({f"{b}:{direction}": v for b, v in inn.items()})
        t, errors = interleaved_rounds(fns, repeats, warmup, timer, inner=inn)
        for b, err in errors.items():
            skipped[b] = f"failed: {err}"
        times[direction] = t
    return times, skipped, inner


def run(batches=(8, 64), num_prompts=(10, 100), *, device: str = "cpu", dtype=None, repeats: int = 10,
        warmup: int = 2, backends: list[str] | None = None, num_patches: int = 196, dim: int = 768,
        num_prefix_tokens: int = 1, peaks: dict | None = None, clock: str = "wall") -> list[dict]:
    """One row per (batch, num_prompts, backend): times (ms) median and quartiles over interleaved
    rounds, per-round speed-ups over eager, cost-model floors.

    clock="thread" (CPU, one intra-op thread only) times with time.thread_time: the CPU time of the
    timing thread, which waiting for other processes' load does not inflate."""
    import torch
    dtype = dtype or torch.float32
    if clock == "thread" and (device != "cpu" or torch.get_num_threads() != 1):
        raise ValueError("clock='thread' needs device='cpu' and torch.set_num_threads(1)")
    timer = Timer(device, time.thread_time if clock == "thread" else time.perf_counter)
    backends = backends or default_backends(device)
    peaks = peaks or measure_peaks(device, dtype, clock=timer.clock)
    _raise_recompile_limit()
    rows = []
    for B in batches:
        for n_p in num_prompts:
            inputs = make_inputs(B, n_p, num_patches=num_patches, dim=dim, num_prefix_tokens=num_prefix_tokens,
                                 device=device, dtype=dtype)
            floor_fwd, floor_fb = floors(B, n_p, num_patches, dim, num_prefix_tokens, inputs[0].element_size(), peaks)
            base = dict(device=device, dtype=str(dtype).replace("torch.", ""), batch=B, num_prompts=n_p,
                        num_patches=num_patches, dim=dim, num_prefix_tokens=num_prefix_tokens,
                        floor_fwd_ms=floor_fwd * 1e3, floor_fwd_bwd_ms=floor_fb * 1e3)
            min_sample = MIN_SAMPLE_S["cuda" if device == "cuda" else "cpu"]
            times, skipped, inner = _time_backends(backends, inputs, device, repeats, warmup, timer,
                                                   num_prefix_tokens, min_sample)
            for backend in backends:
                row = dict(base, backend=backend)
                if backend in skipped:
                    rows.append({**row, "skipped": skipped[backend]})
                    continue
                for direction, floor in (("fwd", floor_fwd), ("fwd_bwd", floor_fb)):
                    ts = times[direction].get(backend)
                    put_summary(row, f"{direction}_ms", summarize(ts), 1e3)
                    row[f"{direction}_ms_all"] = [t * 1e3 for t in ts]
                    row[f"{direction}_inner"] = inner.get(f"{backend}:{direction}", 1)
                    eager = times[direction].get("eager")
                    if eager:
                        put_summary(row, f"{direction}_speedup", summarize(per_round_ratios(eager, ts)))
                    put_summary(row, f"{direction}_of_floor", summarize([t / floor for t in ts]))
                rows.append(row)
    return rows


def host_overhead(device: str = "cpu", backends: list[str] | None = None, repeats: int = 10,
                  warmup: int = 3) -> list[dict]:
    """Per-call cost on tiny tensors (what the step costs beyond its arithmetic: checks, dispatch,
    autograd, launches), with one CPU thread: microseconds per forward+backward and no-grad forward,
    for the public `lspt_step` (api "lspt_step") and for the step the encoder runs per block
    (api "encoder", the figure issue 14's targets are about)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _raise_recompile_limit()
        s = HOST_OVERHEAD
        inputs = make_inputs(s["batch"], s["num_prompts"], num_patches=s["num_patches"], dim=s["dim"],
                             num_prefix_tokens=s["num_prefix_tokens"], device=device)
        backends = backends or default_backends(device)
        rows = []
        for api in ("encoder", "lspt_step"):
            times, skipped, inner = _time_backends(backends, inputs, device, repeats, warmup, Timer(device),
                                                   s["num_prefix_tokens"], 0.02, api)
            for backend in backends:
                row = dict(api=api, backend=backend, device=device, threads=1, shape="B1 Np1 N4 D8 fp32")
                if backend in skipped:
                    rows.append({**row, "skipped": skipped[backend]})
                    continue
                for direction in ("fwd_bwd", "fwd"):
                    put_summary(row, f"{direction}_us", summarize(times[direction][backend]), 1e6)
                    row[f"{direction}_inner"] = inner.get(f"{backend}:{direction}", 1)
                rows.append(row)
        return rows
    finally:
        torch.set_num_threads(threads)


def _raise_recompile_limit() -> None:
    import torch
    with contextlib.suppress(AttributeError):   # one compiled graph per shape and grad mode
        if hasattr(torch._dynamo.config, "recompile_limit"):
            torch._dynamo.config.recompile_limit = 64
        else:
            torch._dynamo.config.cache_size_limit = 64


def evaluate_step_targets(rows: list[dict]) -> list[dict]:
    """CPU: fused fwd+bwd no slower than eager. GPU: >= 3x eager and within 1.5x (cuda) / 2x
    (triton) of the floor."""
    out = []
    for r in rows:
        if r.get("skipped") or r["backend"] in ("eager", "compile", "reference"):
            continue
        setting = dict(backend=r["backend"], batch=r["batch"], num_prompts=r["num_prompts"], dtype=r["dtype"])
        sp = get_summary(r, "fwd_bwd_speedup")
        if r["device"] == "cpu":
            limit = STEP_TARGETS["cpu_speedup"]
            out.append(dict(setting, target="fused forward+backward no slower than eager (speed-up >= 1)",
                            limit=limit, verdict=verdict(sp, limit, higher_is_better=True), **_stats(sp)))
        else:
            limit = STEP_TARGETS["gpu_speedup"]
            out.append(dict(setting, target=f"fused forward+backward >= {limit:g}x eager", limit=limit,
                            verdict=verdict(sp, limit, higher_is_better=True), **_stats(sp)))
            if r["backend"] in STEP_TARGETS["floor"]:
                limit = STEP_TARGETS["floor"][r["backend"]]
                # time / floor per round (the floor is a constant of the shape)
                s = summarize([t / r["floor_fwd_bwd_ms"] for t in r["fwd_bwd_ms_all"]])
                out.append(dict(setting, target=f"fused forward+backward within {limit:g}x of its roofline floor",
                                limit=limit, verdict=verdict(s, limit), **_stats(s)))
    return out



def _stats(s: dict | None) -> dict:
    return {} if s is None else dict(median=s["median"], q1=s["q1"], q3=s["q3"], min=s["min"], max=s["max"], n=s["n"])


def _spread(r: dict, key: str, fmt: str) -> str:
    if r.get(key) is None:
        return "-"
    return f"{r[key]:{fmt}} [{r[f'{key}_q1']:{fmt}}-{r[f'{key}_q3']:{fmt}}]"


def format_table(rows: list[dict]) -> str:
    head = (f"{'B':>3} {'Np':>4} {'backend':>8} | {'fwd ms':>24} {'x eager':>20} {'time/floor':>7} | "
            f"{'fwd+bwd ms':>24} {'x eager':>20} {'time/floor':>7} | {'floor fwd':>9} {'floor f+b':>9}")
    lines = ["times: median [quartiles] over the interleaved rounds; x eager: per-round speed-up; "
             "time/floor: median time over the cost-model floor", head, "-" * len(head)]
    for r in rows:
        pre = f"{r['batch']:>3} {r['num_prompts']:>4} {r['backend']:>8} | "
        if "skipped" in r:
            lines.append(pre + f"skipped: {r['skipped']}")
            continue
        lines.append(pre + f"{_spread(r, 'fwd_ms', '.3f'):>24} {_spread(r, 'fwd_speedup', '.2f'):>20} "
                     f"{r['fwd_of_floor']:>7.2f}x | {_spread(r, 'fwd_bwd_ms', '.3f'):>24} "
                     f"{_spread(r, 'fwd_bwd_speedup', '.2f'):>20} {r['fwd_bwd_of_floor']:>7.2f}x | "
                     f"{r['floor_fwd_ms']:9.3f} {r['floor_fwd_bwd_ms']:9.3f}")
    return "\n".join(lines)


def format_host_overhead(rows: list[dict]) -> str:
    s = HOST_OVERHEAD
    lines = [f"host overhead per call, tiny tensors (B {s['batch']}, Np {s['num_prompts']}, N {s['num_patches']}, "
             f"D {s['dim']}, fp32), one thread: median [quartiles] us",
             f"{'api':>9} | {'backend':>8} | {'fwd+bwd us':>26} | {'no-grad fwd us':>26}"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['api']:>9} | {r['backend']:>8} | skipped: {r['skipped']}")
            continue
        lines.append(f"{r['api']:>9} | {r['backend']:>8} | {_spread(r, 'fwd_bwd_us', '.1f'):>26} | "
                     f"{_spread(r, 'fwd_us', '.1f'):>26}")
    lines.append("  api 'encoder': the step LSPTEncoder runs per block (checks and the W_ih GEMM once per forward); "
                 "'lspt_step': the public op, validated per call")
    return "\n".join(lines)


TABLES = ("steps", "host", "encoder-host", "compiled")
DEFAULT_TABLES = ("steps", "host", "encoder-host")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lspt-bench step",
                                description="The fused LSPT step per backend at ViT-B/16 sizes, against eager and "
                                            "torch.compile, with the cost-model floor; the host cost of the op and "
                                            "of one LSPT block inside the encoder; whole encoders compiled. "
                                            "Interleaved rounds, median and quartiles.")
    p.add_argument("--tables", default=",".join(DEFAULT_TABLES),
                   help="comma-separated subset of " + ",".join(TABLES) + ": 'steps' the step per backend at "
                        "ViT-B/16 sizes; 'host' the op's host cost on tiny tensors; 'encoder-host' the host cost "
                        "per LSPT block inside the encoder (F.linear units); 'compiled' LSPT-fused and GaPT "
                        "encoders eager / torch.compile / reduce-overhead (GPU; minutes of compiling) "
                        "(default: %(default)s)")
    p.add_argument("--batch", type=int, nargs="+", default=[8, 64], help="batch sizes (default: 8 64)")
    p.add_argument("--num-prompts", type=int, nargs="+", default=[10, 100], help="Np values (default: 10 100)")
    p.add_argument("--repeats", type=int, default=10, help="interleaved rounds (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls of each backend first (default: %(default)s)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="(default: %(default)s)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="(default: %(default)s)")
    p.add_argument("--backends", nargs="+", default=None,
                   help="subset of eager compile cpu triton cuda (default: all for the device)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--clock", choices=["wall", "thread"], default="wall",
                   help="CPU only: 'thread' = time.thread_time with --threads 1 (immune to other load; "
                        "default: %(default)s)")
    p.add_argument("--json", type=Path, default=None, help="also write meta, peaks, rows and targets here")
    return p


def _parse_args(argv: list[str]):
    import torch
    p = build_parser()
    args = p.parse_args(argv)
    args.tables = [t.strip() for t in args.tables.split(",") if t.strip()]
    bad = [t for t in args.tables if t not in TABLES]
    if bad or not args.tables:
        p.error(f"--tables: unknown {', '.join(bad) or '(none given)'} (choose from {', '.join(TABLES)})")
    if args.repeats < 1 or args.warmup < 1:
        p.error("--repeats and --warmup must be >= 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread" and (args.device != "cpu" or torch.get_num_threads() != 1):
        p.error("--clock thread needs --device cpu --threads 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    if "compiled" in args.tables and args.device != "cuda":
        p.error("--tables compiled needs --device cuda (mode='reduce-overhead' is CUDA graphs)")
    if any(v < 1 for v in args.batch + args.num_prompts):
        p.error("--batch and --num-prompts values must be >= 1")
    known = {"eager", "compile", "cpu", "triton", "cuda", "reference"}
    bad = [b for b in args.backends or [] if b not in known]
    if bad:
        p.error(f"--backends: unknown {', '.join(bad)} (choose from eager, compile, cpu, triton, cuda)")
    return args


def _step_tables(args) -> dict:
    """The 'steps' and 'host' tables: {peaks, rows, host_overhead}."""
    out = dict(peaks=None, rows=[], host_overhead=[])
    if "steps" in args.tables:
        dtype = _torch_dtype(args.dtype)
        clock = time.thread_time if args.clock == "thread" else time.perf_counter
        peaks = out["peaks"] = measure_peaks(args.device, dtype, clock=clock)
        print(f"peaks measured here: {peaks['flops_per_s'] / 1e9:.0f} GFLOP/s, {peaks['bytes_per_s'] / 1e9:.1f} "
              f"GB/s ({peaks['how']})")
        print(f"shape: ViT-B/16 N={VIT_B16['num_patches']} D={VIT_B16['dim']} k={VIT_B16['num_prefix_tokens']}; "
              f"{args.repeats} interleaved rounds after {args.warmup} warm-up calls\n", flush=True)
        out["rows"] = run(args.batch, args.num_prompts, device=args.device, dtype=dtype, repeats=args.repeats,
                          warmup=args.warmup, backends=args.backends, peaks=peaks, clock=args.clock, **VIT_B16)
        print(format_table(out["rows"]), flush=True)
    if "host" in args.tables:
        out["host_overhead"] = host_overhead(args.device, args.backends, repeats=args.repeats)
        print("\n" + format_host_overhead(out["host_overhead"]), flush=True)
    return out


def _encoder_tables(args) -> dict:
    """The 'encoder-host' and 'compiled' tables: {encoder_host, compiled}."""
    from . import compiled, host
    out = dict(encoder_host=[], compiled=[])
    if "encoder-host" in args.tables:
        # the encoder's backends on the CPU (the host cost is the question; "compile" is a whole-model mode)
        wanted = [b for b in args.backends or host.DEFAULT_BACKENDS if b in ("cpu", "eager", "reference")]
        names = list(dict.fromkeys("eager" if b == "reference" else b for b in wanted)) or list(host.DEFAULT_BACKENDS)
        out["encoder_host"] = host.encoder_host_overhead(names, repeats=args.repeats, warmup=args.warmup)
        print("\n" + host.format_table(out["encoder_host"]), flush=True)
    if "compiled" in args.tables:
        out["compiled"] = compiled.run(args.device, batch=max(args.batch), num_prompts=min(args.num_prompts),
                                       dtype={"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[args.dtype],
                                       repeats=args.repeats, warmup=args.warmup)
        print("\n" + compiled.format_table(out["compiled"]), flush=True)
    return out


def _print_targets(targets: list[dict]) -> None:
    if not targets:
        return
    print("\nTargets (met / missed / inconclusive: the quartiles straddle the limit):")
    for t in targets:
        where = (f"{t['backend']}, B{t['batch']} Np{t['num_prompts']} {t['dtype']}" if "batch" in t
                 else t["backend"])
        print(f"  [{t['verdict']}] {t['target']} ({where}): "
              + ("n/a" if t.get("median") is None else
                 f"{t['median']:.2f} [{t['q1']:.2f}-{t['q3']:.2f}] over {t['n']} rounds"))


def main(argv: list[str] | None = None) -> int:
    import torch

    from . import host
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parse_args(argv)
    load_start = loadavg()
    meta = environment(args.device, argv, sub="step")
    meta.update(loadavg_start=load_start, repeats=args.repeats, warmup=args.warmup, clock=args.clock,
                shape=VIT_B16, tables=args.tables,
                timing="interleaved rounds; median and quartiles; per-round speed-ups")
    print(f"device: {args.device} ({meta['device_name']}); torch {torch.__version__}; threads "
          f"{torch.get_num_threads()}; {os.cpu_count()} CPUs; dtype {args.dtype}")
    print(load_line(load_start, "at start"), flush=True)
    results = {**_step_tables(args), **_encoder_tables(args)}
    targets = evaluate_step_targets(results["rows"]) + host.evaluate_targets(results["encoder_host"])
    _print_targets(targets)
    meta["loadavg_end"] = loadavg()
    meta["load_warning"] = load_warning(load_start, meta["loadavg_end"])
    print("\n" + load_line(meta["loadavg_end"], "at the end"))
    if meta["load_warning"]:
        print(f"warning: {meta['load_warning']}", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(meta=meta, **results, targets=targets), indent=1, default=str))
        print(f"wrote {args.json}")
    return 0
