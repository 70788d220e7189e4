"""Whole encoders under torch.compile: LSPT-fused and GaPT, eager, compile "default" and
mode="reduce-overhead" (CUDA graphs), one train step and one inference batch each, timed in
interleaved rounds (lspt-bench step --compiled-encoders; a part of lspt-bench gpu-suite).

What it shows: whether eager LSPT is host-bound. LSPT's extra device work over GaPT is a few per cent
of the backbone's (docs/method.md, "Cost model"); the per-block host time of the step is not, at
modest batch sizes. If LSPT-fused / GaPT is well above 1 in eager mode but close to 1 compiled
(mode="reduce-overhead" removes the host work altogether), the gap is host time, not kernels.
"""
from __future__ import annotations

import time

from .measure import Timer, interleaved_rounds, per_round_ratios, short_error, summarize
from .targets import put_summary

MODES = ("eager", "default", "reduce-overhead")
METHODS = ("lspt-fused", "gapt")


def run(device: str = "cuda", *, model: str = "vit_base_patch16_224", batch: int = 64, num_prompts: int = 10,
        dtype: str = "bf16", repeats: int = 10, warmup: int = 3, modes=MODES, methods=METHODS,
        compile_backend: str = "inductor", model_kwargs: dict | None = None, img_size: int | None = None) -> list[dict]:
    """One row per (method, mode): train and inference ms (median [quartiles] over the rounds), the
    first call's seconds (compile time for compiled modes), and LSPT / GaPT per round in that mode."""
    from . import runner
    if "reduce-overhead" in modes and not str(device).startswith("cuda"):
        raise ValueError("mode='reduce-overhead' uses CUDA graphs: it needs device='cuda'")
    spec = dict(model=model, batch_size=batch, num_prompts=num_prompts, dtype=dtype, num_classes=100, seed=0,
                device=device, fused_backend="auto", model_kwargs=dict(model_kwargs or {}), img_size=img_size)
    vit = runner.build_vit(spec).to(device)
    timer = Timer(device)
    fns, rows, first = {}, {}, {}
    for method in methods:
        for mode in modes:
            name = f"{method}:{mode}"
            row = dict(method=method, mode=mode, model=model, batch_size=batch, num_prompts=num_prompts,
                       dtype=dtype, device=device)
            rows[name] = row
            try:
                enc = runner.make_encoder(method, spec, vit).to(device)
                train, infer, _ = runner.make_step_fns(enc, spec, device, compiled=mode != "eager",
                                                       compile_backend=compile_backend, compile_mode=mode)
                t0 = time.perf_counter()
                train(), infer()
                timer(lambda: None)            # a synchronisation
                first[name] = time.perf_counter() - t0
                fns[name] = (train, infer)
            except Exception as exc:  # noqa: BLE001 - a failing mode is reported, the others measured
                row["skipped"] = f"failed: {short_error(exc, 200)}"
    for i, key in enumerate(("train_ms", "infer_ms")):
        live = {n: f[i] for n, f in fns.items()}
        times, errors = interleaved_rounds(live, repeats, warmup, timer)
        for name, err in errors.items():
            rows[name]["skipped"] = f"failed: {err}"
        for name, ts in times.items():
            put_summary(rows[name], key, summarize(ts), 1e3)
            rows[name][f"{key}_all"] = [t * 1e3 for t in ts]
    for name, row in rows.items():
        row["first_call_s"] = first.get(name)
    for mode in modes:
        lspt, gapt = rows.get(f"lspt-fused:{mode}"), rows.get(f"gapt:{mode}")
        if lspt and gapt and "skipped" not in lspt and "skipped" not in gapt:
            for key in ("train_ms", "infer_ms"):
                ratios = per_round_ratios(lspt[f"{key}_all"], gapt[f"{key}_all"])
                put_summary(lspt, f"{key}_over_gapt", summarize(ratios))
    return list(rows.values())



def _spread(r: dict, key: str, fmt: str) -> str:
    if r.get(key) is None:
        return "-"
    return f"{r[key]:{fmt}} [{r[f'{key}_q1']:{fmt}}-{r[f'{key}_q3']:{fmt}}]"


def format_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    r0 = rows[0]
    lines = [f"whole encoders, {r0['model']} B {r0['batch_size']} Np {r0['num_prompts']} {r0['dtype']}: eager and "
             "torch.compile; median [quartiles] over interleaved rounds; x GaPT per round",
             f"{'method':>11} {'mode':>16} | {'train ms':>24} {'x GaPT':>20} | {'infer ms':>24} {'x GaPT':>20} | "
             f"{'first call s':>12}"]
    for r in rows:
        pre = f"{r['method']:>11} {r['mode']:>16} | "
        if "skipped" in r:
            lines.append(pre + f"skipped: {r['skipped']}")
            continue
        first = "-" if r.get("first_call_s") is None else f"{r['first_call_s']:.1f}"
        lines.append(pre + f"{_spread(r, 'train_ms', '.2f'):>24} {_spread(r, 'train_ms_over_gapt', '.3f'):>20} | "
                     f"{_spread(r, 'infer_ms', '.2f'):>24} {_spread(r, 'infer_ms_over_gapt', '.3f'):>20} | "
                     f"{first:>12}")
    return "\n".join(lines)
