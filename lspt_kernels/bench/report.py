"""The table, the files (JSON, CSV) and the plot (bars with error bars) of an lspt-bench run.

Times are printed as `median [q1-q3]` over the interleaved rounds; ratios to GaPT are per-round
ratios, median and quartiles. min and max of every figure are in the JSON and the CSV.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from . import methods as M
from .measure import fmt_spread
from .targets import evaluate_targets, get_summary, group_by_setting


def row_label(r: dict) -> str:
    label = r.get("label") or M.label(r["method"])
    if M.is_fused(r["method"]) and r.get("backend"):
        label = label.replace("fused", f"fused: {r['backend']}" if r["backend"] not in ("reference", "eager")
                              else "fused: NONE, ran reference")
    return label


def setting_label(r: dict) -> str:
    return f"B{r['batch_size']} Np{r['num_prompts']} {r['dtype']}" + (" ckpt" if r.get("grad_checkpointing") else "")


def _fmt_count(n) -> str:
    if n is None:
        return "-"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(n)


def _fmt_ratio(r: dict, key: str) -> str:
    s = get_summary(r, f"{key}_vs_gapt")
    if s is None:
        return ""
    if s["n"] == 1:
        return f" ({s['median']:.3f}x)"
    return f" ({s['median']:.3f}x [{s['q1']:.3f}-{s['q3']:.3f}])"


def _setting_header(setting: tuple, group: list[dict], meta: dict | None) -> str:
    """The line above a setting's block: what was run, T, the device, how the figures were taken."""
    model, batch, n_p, dtype, ckpt, task = setting
    seg = task == "segmentation"
    img = next((r.get("img_size") for r in group if r.get("img_size")), None)
    heads = next((r.get("head_params") for r in group if r.get("head_params")), None)
    T = max((r.get("tokens") or 0 for r in group), default=0)
    dev = (meta or {}).get("device_name") or group[0].get("device_name") or group[0].get("device")
    rounds = max((r.get("train_s_n") or 0 for r in group), default=0)
    inter = any(r.get("train_s_all") for r in group)      # rows of lspt-bench, not of pytest-benchmark
    return (f"{'segmentation step (SETR-PUP heads), ' if seg else ''}{model}, {img or '?'} px"
            f"{' crops' if seg else ''}, batch {batch}, Np {n_p}, {dtype}{', gradient checkpointing' if ckpt else ''}, "
            f"T = {T or '?'} tokens, on {dev}; "
            + (f"Trainable includes the heads' {_fmt_count(heads)}; " if seg and heads else "")
            + f"times: median [quartiles] over {rounds} {'interleaved ' if inter else ''}rounds; ratios to GaPT"
            f"{' (per round)' if inter else ' (of the medians)'} in parentheses")


def format_table(rows: list[dict], meta: dict | None = None) -> str:
    """The paper's table C.4 layout, one block per setting; times median [q1-q3] over the rounds,
    ratios to GaPT (per round) in parentheses."""
    lines = []
    width = max([len("Method")] + [len(row_label(r)) for r in rows])
    cols = (("Max Memory (GB)", 22), ("Training Time per Batch (s)", 46), ("Inference Time per Batch (s)", 46))
    head = (f"{'Method':<{width}} {'Total Params':>12} {'Trainable':>10} "
            + " ".join(f"{name:>{w}}" for name, w in cols))
    for setting, group in group_by_setting(rows).items():
        group = list(group.values())
        seg = setting[5] == "segmentation"
        lines.append(_setting_header(setting, group, meta))
        lines.append(head)
        lines.append("-" * len(head))
        notes = []
        for r in group:
            label = row_label(r)
            if r.get("status") != "ok":
                lines.append(f"{label:<{width}} {r.get('status', 'error').upper()}: {r.get('error')}")
                continue
            ratio = r.get("total_params_ratio")
            mem = r.get("peak_memory_gb")
            mem_txt = "-" if mem is None else f"{mem:.{3 if mem < 10 else 2}f}" + _fmt_ratio(r, "peak_memory_gb")
            lines.append(f"{label:<{width}} {(f'{ratio:.3f}x' if ratio else '-'):>12} "
                         f"{_fmt_count(r.get('trainable_params')):>10} {mem_txt:>{cols[0][1]}} "
                         f"{fmt_spread(get_summary(r, 'train_s')) + _fmt_ratio(r, 'train_s'):>{cols[1][1]}} "
                         f"{fmt_spread(get_summary(r, 'infer_s')) + _fmt_ratio(r, 'infer_s'):>{cols[2][1]}}")
            if r.get("compile_s") is not None:
                cache = r.get("compile_cache") or {}
                hits = cache.get("fxgraph_cache_hit", 0) + cache.get("autograd_cache_hit", 0)
                notes.append(f"  {label}: compile time {r['compile_s']:.1f} s"
                             + (f" (compile caches: {hits} hits)" if hits else "")
                             + " (first train + first inference call minus steady state)"
                             + ("; its memory includes the compiler's resident state"
                                if not str(r["device"]).startswith("cuda") else ""))
            if r.get("note") and f"  {r['note']}" not in notes:
                notes.append(f"  {r['note']}")
            if r.get("timing_error"):
                notes.append(f"  {label}: timing failed: {r['timing_error']}")
            mem, tr = get_summary(r, "peak_memory_gb_vs_plain"), get_summary(r, "train_s_vs_plain")
            if mem or tr:
                notes.append(f"  {label} with gradient checkpointing, over its plain run: peak memory "
                             + (f"{mem['median']:.3f}x" if mem else "-") + ", train time "
                             + (fmt_spread(tr, 3) + "x" if tr else "-") + " (separate timing passes)")
        for r in group:
            tr, inf = get_summary(r, "train_vs_vpt_deep"), get_summary(r, "infer_vs_vpt_deep")
            if r.get("status") == "ok" and tr and not r.get("compiled"):
                pct = lambda s: (f"{100 * (s['median'] - 1):+.1f}%" + ("" if s["n"] == 1 else  # noqa: E731
                                 f" [{100 * (s['q1'] - 1):+.1f}% .. {100 * (s['q3'] - 1):+.1f}%]"))
                notes.append(f"  {row_label(r)} over VPT-Deep (per round): train {pct(tr)} (cost-model floor "
                             f"Np/(2T) = {100 * r['floor_train_extra']:.1f}%)"
                             + (f", inference {pct(inf)} (floor Np/(3T) = {100 * r['floor_infer_extra']:.1f}%)"
                                if inf else "") + ("; floors of the backbone alone, the heads' time lowers the "
                                                   "step's" if seg else ""))
        lines.extend(notes)
        lines.append("")
    if rows and not any(r["method"] == "gapt" and r.get("status") == "ok" for r in rows):
        lines.append("(no GaPT row: ratios to GaPT omitted)")
    return "\n".join(lines).rstrip() + "\n"


def _spread_fields(key: str) -> tuple[str, ...]:
    return (key, f"{key}_q1", f"{key}_q3", f"{key}_min", f"{key}_max")


CSV_FIELDS = (("method", "label", "status", "error", "task", "model", "img_size", "tokens", "batch_size",
               "num_prompts", "dtype", "grad_checkpointing", "device", "device_name", "backend", "compiled",
               "compile_backend", "compile_mode", "trainable_params", "head_params", "head_channels", "backbone_params",
               "total_params_ratio", "peak_memory_gb",
               "peak_memory_gb_vs_gapt", "step_memory_gb", "memory_kind")
              + _spread_fields("train_s") + ("train_s_n",) + _spread_fields("train_s_vs_gapt")
              + _spread_fields("infer_s") + _spread_fields("infer_s_vs_gapt")
              + _spread_fields("train_vs_vpt_deep") + _spread_fields("infer_vs_vpt_deep")
              + ("peak_memory_gb_vs_plain",) + _spread_fields("train_s_vs_plain")
              + ("floor_train_extra", "floor_infer_extra", "compile_s", "timing_error", "repeats", "warmup",
                 "threads", "note", "torch", "triton", "timm", "python", "loadavg_start", "loadavg_end",
                 "command", "time"))


def write_results(rows: list[dict], meta: dict, outdir: Path, plot: bool = True) -> list[Path]:
    """bench.json (meta, rows, targets), bench.csv and (plot=True) bench.png under outdir."""
    outdir = Path(outdir)
    targets = evaluate_targets(rows)
    paths = []
    js = outdir / "bench.json"
    js.write_text(json.dumps(dict(meta=meta, rows=rows, targets=targets), indent=2, default=str) + "\n")
    paths.append(js)
    cs = outdir / "bench.csv"
    with open(cs, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**{k: meta.get(k) for k in ("device_name", "torch", "triton", "timm", "python", "command",
                                                       "time", "repeats", "warmup", "loadavg_start",
                                                       "loadavg_end")}, **r})
    paths.append(cs)
    if plot:
        png = outdir / "bench.png"
        task = "segmentation step, " if meta.get("task") == "segmentation" else ""
        plot_rows(rows, png, title=f"{task}{meta.get('model', '')} on {meta.get('device_name', '')}")
        paths.append(png)
    return paths


PANELS = (("peak_memory_gb", "max memory (GB)"), ("train_s", "train time / batch (s)"),
          ("infer_s", "inference time / batch (s)"))


def plot_rows(rows: list[dict], path, title: str = "", panels=PANELS) -> Path:
    """Grouped bars per method, one bar per setting, error bars from q1 to q3 where a figure has
    rounds (`KEY_q1` / `KEY_q3` in the row).

    `panels` is a sequence of (row key, axis title); rows need "method", "batch_size",
    "num_prompts", "dtype" and those keys (None or missing: no bar)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status", "ok") == "ok"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    settings = list(dict.fromkeys(setting_label(r) for r in ok)) or ["-"]
    fig, axes = plt.subplots(1, len(panels), figsize=(max(10, 0.6 * len(methods) * len(panels) + 2), 5))
    axes = list(axes) if len(panels) > 1 else [axes]
    labels = [row_label(next(r for r in rows if r["method"] == m)) for m in methods]
    width = 0.8 / max(1, len(settings))
    for ax, (key, name) in zip(axes, panels):
        for j, s in enumerate(settings):
            xs, ys, lo, hi = [], [], [], []
            for i, m in enumerate(methods):
                r = next((r for r in ok if r["method"] == m and setting_label(r) == s), None)
                if r is not None and r.get(key) is not None:
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(r[key])
                    lo.append(max(0.0, r[key] - r.get(f"{key}_q1", r[key])))
                    hi.append(max(0.0, r.get(f"{key}_q3", r[key]) - r[key]))
            bars = ax.bar(xs, ys, width=width, label=s, yerr=[lo, hi] if any(lo) or any(hi) else None,
                          capsize=2, error_kw=dict(elinewidth=0.8))
            if len(settings) <= 2:
                ax.bar_label(bars, fmt="%.3g", fontsize=6, padding=1)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
        ax.set_title(name)
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.18)                     # headroom for the bar labels and the legend
    axes[0].legend(fontsize=7)
    fig.text(0.99, 0.01, "bars: median; error bars: quartiles over the rounds", ha="right", fontsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
