"""Host overhead of one LSPT step (issue 14): tiny tensors, so what is timed is dispatch, autograd
bookkeeping and Python, not arithmetic.

    python bench/step_overhead.py [--backends eager cpu] [--rounds 30] [--inner 50] [--threads 1]

Rows, per backend:
- "encoder step fwd+bwd" / "encoder step no_grad fwd": `ops.fused_step` with precomputed gate-bias
  rows, which is what LSPTEncoder runs per block (the gate GEMM, checks and backend resolution run
  once per forward, outside the step);
- "lspt_step fwd+bwd" / "lspt_step no_grad fwd": the public `lspt_step`, which validates and computes
  the gate bias rows on every call.
Every case runs once per round, in the same order (interleaved rounds); each round times `--inner`
calls. Reported: median and the 10-90 % spread over rounds, in microseconds per step. Targets
(issue 14, this CPU, one thread): encoder step fwd+bwd <= 120 us, no_grad fwd <= 40 us.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from lspt_kernels import ops  # noqa: E402

TINY = dict(B=2, Np=2, N=4, D=8, k=1)


def _inputs(device: str):
    B, n_p, N, D, k = (TINY[n] for n in ("B", "Np", "N", "D", "k"))
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g).to(device).requires_grad_()

    tokens, cell, prompt = t(B, k + n_p + N, D), t(B, n_p, D), t(n_p, D)
    w_ih, w_hh, b_ih, b_hh = t(4 * D, D), t(4 * D, D), t(4 * D), t(4 * D)
    with torch.no_grad():
        gate_bias = ops.gate_bias_rows(prompt, w_ih, b_ih, b_hh)
    return dict(tokens=tokens, cell=cell, prompt=prompt, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh,
                gate_bias=gate_bias.requires_grad_(), k=k)


def cases(backend: str, x: dict) -> dict:
    """name -> zero-argument callable for one backend."""
    k = x["k"]
    ones = None

    def backward(h, c):
        nonlocal ones
        if ones is None:
            ones = (torch.ones_like(h), torch.ones_like(c))
        torch.autograd.backward((h, c), ones)

    def enc_fb():
        backward(*ops.fused_step(x["tokens"], x["cell"], x["gate_bias"], x["w_hh"], k, backend))

    def enc_f():
        with torch.no_grad():
            ops.fused_step(x["tokens"], x["cell"], x["gate_bias"], x["w_hh"], k, backend, False)

    def pub(grad):
        def run():
            with torch.set_grad_enabled(grad):
                out = ops.lspt_step(x["tokens"], x["cell"], x["prompt"], x["w_ih"], x["w_hh"], x["b_ih"],
                                    x["b_hh"], num_prefix_tokens=k, backend=backend)
            if grad:
                backward(*out)
        return run

    return {"encoder step fwd+bwd": enc_fb, "encoder step no_grad fwd": enc_f,
            "lspt_step fwd+bwd": pub(True), "lspt_step no_grad fwd": pub(False)}


def run(backends, rounds: int = 30, inner: int = 50, device: str = "cpu") -> list[dict]:
    x = _inputs(device)
    table = {(b, name): fn for b in backends for name, fn in cases(b, x).items()}
    for fn in table.values():          # warm-up: lazy loads, allocator, autograd caches
        for _ in range(20):
            fn()
    times = {key: [] for key in table}
    for _ in range(rounds):
        for key, fn in table.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[key].append((time.perf_counter() - t0) / inner * 1e6)
    rows = []
    for (backend, name), ts in times.items():
        q = statistics.quantiles(ts, n=10, method="inclusive")
        rows.append(dict(backend=backend, case=name, median_us=statistics.median(ts), p10_us=q[0],
                         p90_us=q[-1], rounds=rounds, inner=inner, threads=torch.get_num_threads()))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", nargs="+", default=["eager", "cpu"])
    p.add_argument("--rounds", type=int, default=30, help="interleaved rounds (default: %(default)s)")
    p.add_argument("--inner", type=int, default=50, help="calls timed per round (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: %(default)s)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for row in run(args.backends, args.rounds, args.inner):
        print(f"{row['backend']:>6}  {row['case']:<26} {row['median_us']:8.1f} us  "
              f"(p10 {row['p10_us']:.1f}, p90 {row['p90_us']:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
