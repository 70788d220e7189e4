"""The host time LSPT's step costs per block inside the encoder, as a user pays it.

    (LSPT train step - VPT-deep train step) / (depth - 1)

on a tiny 12-block ViT (D 16, 16 px images of 8 px patches: 4 patches, Np 1, batch 1), where the
backbone's arithmetic is negligible, so what remains is host work: Python, dispatch, autograd,
allocations; also under no_grad. It is reported in microseconds and in units of one F.linear
forward+backward (x (6, 16) @ W^T + b with the gradients of W and b, the cost of any small layer)
timed in the same rounds, so a slower or busier machine moves both alike. One intra-op thread,
thread CPU time (time.thread_time: other processes' load does not count). The figure is a small
difference of two large times (an LSPT and a VPT-deep step), so the rounds interleave single calls:
within a round every callable runs once in turn, `inner` times over, each call timed on its own, and
the per-block figure is taken round by round. Targets: <= 2.0 units forward+backward, <= 0.5 under
no_grad.

`lspt-bench step` prints it beside the isolated op's host rows (which leave out the encoder's
per-forward set-up: the backend resolution, the input checks, the hoisted gate-bias GEMM).
"""
from __future__ import annotations

import time

from .measure import per_round_ratios, short_error, summarize, verdict
from .targets import get_summary, put_summary

ENCODER_HOST = dict(depth=12, dim=16, heads=1, img=16, patch=8, num_prompts=1, batch=1)
TARGETS = dict(fwd_bwd=2.0, fwd=0.5)          # F.linear units per LSPT block
DEFAULT_BACKENDS = ("cpu", "eager")
LINEAR_CALLS = 20


def _vit():
    import timm
    import torch
    s = ENCODER_HOST
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=s["img"],
                             patch_size=s["patch"], embed_dim=s["dim"], depth=s["depth"], num_heads=s["heads"])


def _callables(backends) -> tuple[dict, dict]:
    """{name: callable}: per backend an LSPT train step and no-grad forward, VPT-deep's, the F.linear
    unit; and {backend: why it is skipped}."""
    import torch
    import torch.nn.functional as F

    from ..backends import unavailable_reason
    from ..encoders import LSPTEncoder, VPTEncoder
    s = ENCODER_HOST
    vit = _vit()
    images = torch.randn(s["batch"], 3, s["img"], s["img"], generator=torch.Generator().manual_seed(1))

    def train(enc):
        params = enc.trainable_parameters()
        return lambda: torch.autograd.grad(enc(images).sum(), params)

    def no_grad(enc):
        def f():
            with torch.no_grad():
                enc(images)
        return f

    vpt = VPTEncoder(vit, s["num_prompts"], 2)
    fns = {"vpt:fwd_bwd": train(vpt), "vpt:fwd": no_grad(vpt)}
    skipped = {}
    for backend in backends:
        why = None if backend == "eager" else unavailable_reason(backend)
        if why:
            skipped[backend] = why
            continue
        lspt = LSPTEncoder(vit, s["num_prompts"], 2, backend=backend)
        fns[f"{backend}:fwd_bwd"], fns[f"{backend}:fwd"] = train(lspt), no_grad(lspt)
    g = torch.Generator().manual_seed(2)
    tokens = 1 + s["num_prompts"] + (s["img"] // s["patch"]) ** 2
    x = torch.randn(s["batch"] * tokens, s["dim"], generator=g)
    w = torch.randn(s["dim"], s["dim"], generator=g).requires_grad_()
    b = torch.randn(s["dim"], generator=g).requires_grad_()
    grad_out = torch.randn(s["batch"] * tokens, s["dim"], generator=g)

    def linear():               # LINEAR_CALLS back to back: the unit is a warm call, not a cold one
        for _ in range(LINEAR_CALLS):
            torch.autograd.grad(F.linear(x, w, b), (w, b), grad_out)

    fns["linear"] = linear
    return fns, skipped


def interleaved_calls(fns: dict, rounds: int, inner: int, clock=time.thread_time) -> tuple[dict, dict]:
    """({name: [seconds per call, one per round]}, {name: error}): in each round every callable runs
    once in turn (the order rotating), `inner` times over; a callable that raises is dropped."""
    names, errors = list(fns), {}
    acc = {n: [] for n in names}
    for r in range(rounds):
        total = dict.fromkeys(names, 0.0)
        for j in range(inner):
            shift = (r * inner + j) % len(names)
            for name in names[shift:] + names[:shift]:
                if name in errors:
                    continue
                try:
                    t0 = clock()
                    fns[name]()
                    total[name] += clock() - t0
                except Exception as exc:  # noqa: BLE001 - reported in its row
                    errors[name] = short_error(exc)
        for name in names:
            if name not in errors:
                acc[name].append(total[name] / inner)
    return {n: v for n, v in acc.items() if n not in errors}, errors


def encoder_host_overhead(backends=DEFAULT_BACKENDS, repeats: int = 15, warmup: int = 3,
                          inner: int = 10) -> list[dict]:
    """One row per backend: microseconds and F.linear units per LSPT block beyond VPT-deep, forward+
    backward and no_grad, median [quartiles] over `repeats` rounds of `inner` interleaved calls."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fns, skipped = _callables(backends)
        for f in fns.values():                   # lazy loads, self-checks, first-call allocations
            for _ in range(warmup):
                f()
        times, errors = interleaved_calls(fns, repeats, inner)
    finally:
        torch.set_num_threads(threads)
    steps = ENCODER_HOST["depth"] - 1
    unit = [t / LINEAR_CALLS for t in times["linear"]] if "linear" in times else None
    rows = []
    for backend in backends:
        row = dict(backend=backend, shape="ViT depth 12, D 16, 4 patches, Np 1, B 1, fp32", threads=1,
                   clock="thread_time", rounds=repeats, inner=inner)
        why = skipped.get(backend) or errors.get(f"{backend}:fwd_bwd") or errors.get(f"{backend}:fwd")
        if why or not unit:
            rows.append(dict(row, skipped=why or f"the F.linear unit failed: {errors.get('linear')}"))
            continue
        for direction in ("fwd_bwd", "fwd"):
            per_block = [(a - b) / steps for a, b in zip(times[f"{backend}:{direction}"], times[f"vpt:{direction}"])]
            put_summary(row, f"{direction}_us", summarize([v * 1e6 for v in per_block]))
            put_summary(row, f"{direction}_units", summarize(per_round_ratios(per_block, unit)))
        put_summary(row, "linear_us", summarize([v * 1e6 for v in unit]))
        rows.append(row)
    return rows




def evaluate_targets(rows: list[dict]) -> list[dict]:
    """The fused backends' per-block cost against TARGETS (met / missed / inconclusive)."""
    out = []
    for r in rows:
        if r.get("skipped") or r["backend"] == "eager":
            continue
        for direction, what in (("fwd_bwd", "forward+backward"), ("fwd", "no_grad forward")):
            s = get_summary(r, f"{direction}_units")
            limit = TARGETS[direction]
            out.append(dict(backend=r["backend"], target=f"encoder host cost per LSPT block beyond VPT-deep, {what} "
                            f"<= {limit:g} F.linear units", limit=limit, verdict=verdict(s, limit),
                            **({} if s is None else {k: s[k] for k in ("median", "q1", "q3", "min", "max", "n")})))
    return out


def _spread(r: dict, key: str, fmt: str) -> str:
    if r.get(key) is None:
        return "-"
    return f"{r[key]:{fmt}} [{r[f'{key}_q1']:{fmt}}-{r[f'{key}_q3']:{fmt}}]"


def format_table(rows: list[dict]) -> str:
    lines = ["host cost per LSPT block inside the encoder, beyond VPT-deep ((LSPT - VPT-deep) / 11 blocks; "
             "ViT depth 12, D 16, 4 patches, Np 1, B 1; one thread, thread CPU time): median [quartiles]; "
             "units: one F.linear forward+backward timed in the same rounds",
             f"{'backend':>8} | {'fwd+bwd us':>22} {'units':>18} | {'no-grad us':>22} {'units':>18} | "
             f"{'F.linear us':>20}"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['backend']:>8} | skipped: {r['skipped']}")
            continue
        lines.append(f"{r['backend']:>8} | {_spread(r, 'fwd_bwd_us', '.1f'):>22} "
                     f"{_spread(r, 'fwd_bwd_units', '.2f'):>18} | {_spread(r, 'fwd_us', '.1f'):>22} "
                     f"{_spread(r, 'fwd_units', '.2f'):>18} | {_spread(r, 'linear_us', '.1f'):>20}")
    lines.append(f"  targets: <= {TARGETS['fwd_bwd']:g} units forward+backward, <= {TARGETS['fwd']:g} under no_grad")
    return "\n".join(lines)
