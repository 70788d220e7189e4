"""Comparisons between the rows of one setting (per-round ratios) and the targets' verdicts.

Ratios of times are taken round by round (method / GaPT in the same interleaved round) and then
summarised, so a slow-down of the whole machine during the run cancels. A target's verdict is
`measure.verdict`: met, missed, or inconclusive when the ratio's spread (quartiles over the rounds)
straddles the threshold.
"""
from __future__ import annotations

from .measure import per_round_ratios, summarize, verdict

TARGET_TIME_SLACK = 0.01           # CPU: LSPT-fused train <= VPT-deep x (1 + Np/(2T) + 1 %)
FLOOR_TARGET = f"LSPT-fused train step <= VPT-deep x (1 + Np/(2T) + {100 * TARGET_TIME_SLACK:g}%)"
TARGET_MEMORY_CPU = 1.01           # CPU: LSPT-fused peak memory <= GaPT x 1.01
# GPU, the paper's setting (batch 64, Np 10, bf16): LSPT-fused / GaPT (the paper: 1.009 / 1.010 / 1.001)
GPU_TARGETS = dict(train_s=1.00, peak_memory_gb=1.005, infer_s=1.00)
GPU_SETTING = dict(num_prompts=10, dtype="bf16")
CKPT_MEMORY, CKPT_TIME = 0.4, 1.4  # gradient checkpointing: memory <= 0.4x, time <= 1.4x of the plain run
# Segmentation: the cost model's floor is the backbone's; the heads add time the LSPT step does not touch.
SEG_FLOOR_NOTE = " (the backbone's floor: the heads' time lowers the whole step's floor, so this limit is loose)"

STATS = ("q1", "q3", "min", "max", "n")


def floor_extra(num_prompts: int, tokens: int, kind: str = "train") -> float:
    """docs/method.md's cost model: LSPT's least extra time over VPT-deep at the same Np, as a share of the
    backbone's, T = k + Np + N tokens. "train": Np / (2T) (the W_hh product forward and backward over a
    frozen block's forward and backward); "infer": Np / (3T) (forward only: 8 B Np D^2 over a block's
    24 B T D^2)."""
    if kind not in ("train", "infer"):
        raise ValueError(f"kind must be 'train' or 'infer', got {kind!r}")
    return num_prompts / ((2 if kind == "train" else 3) * tokens)


def put_summary(row: dict, key: str, s: dict | None, scale: float = 1.0) -> None:
    """row[key] = median, row[key_q1] ... row[key_n] (flat, for the CSV); `scale` converts the values'
    unit (e.g. 1e3 for seconds to milliseconds), not the count."""
    if s is None:
        return
    row[key] = s["median"] * scale
    for k in STATS:
        row[f"{key}_{k}"] = s[k] if k == "n" else s[k] * scale


def get_summary(row: dict, key: str) -> dict | None:
    if row.get(key) is None:
        return None
    if row.get(f"{key}_n") is None:               # a single value (e.g. memory)
        v = row[key]
        return dict(median=v, q1=v, q3=v, min=v, max=v, n=1)
    return dict(median=row[key], **{k: row[f"{key}_{k}"] for k in STATS})


def setting_key(r: dict) -> tuple:
    """(model, batch_size, num_prompts, dtype, grad_checkpointing, task): the rows compared with each other."""
    return (r["model"], r["batch_size"], r["num_prompts"], r["dtype"], bool(r.get("grad_checkpointing")),
            r.get("task", "classification"))


def group_by_setting(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault(setting_key(r), {})[r["method"]] = r
    return groups


def _ok(r) -> bool:
    return bool(r) and r.get("status") == "ok"


def _ratio_summary(r: dict, base: dict, key: str) -> dict | None:
    """Per-round ratios r[key] / base[key] when both have rounds, else the ratio of the values."""
    a, b = r.get(f"{key}_all"), base.get(f"{key}_all")
    if a and b:
        return summarize(per_round_ratios(a, b))
    if r.get(key) is not None and base.get(key):
        return _single(r[key] / base[key])
    return None


def _single(v: float) -> dict:
    return dict(median=v, q1=v, q3=v, min=v, max=v, n=1)


def _across_passes(a: dict, b: dict) -> dict:
    """a / b for the summaries of two separate timing passes (no common rounds): the ratio of the
    medians, its spread from the quartiles."""
    return dict(median=a["median"] / b["median"], q1=a["q1"] / b["q3"], q3=a["q3"] / b["q1"],
                min=a["min"] / b["max"], max=a["max"] / b["min"], n=min(a["n"], b["n"]))


def plain_setting(setting: tuple) -> tuple:
    """The setting without gradient checkpointing."""
    return setting[:4] + (False,) + setting[5:]


def add_comparisons(rows: list[dict]) -> None:
    """Ratios to GaPT (same setting, per round), LSPT's extra time over VPT-deep with the floor, and a
    checkpointed row's peak memory and train time over its plain run (`*_vs_plain`)."""
    groups = group_by_setting(rows)
    for setting, group in groups.items():
        plain = groups.get(plain_setting(setting), {}) if setting[4] else {}
        for m, on in group.items():
            off = plain.get(m)
            if not (_ok(on) and _ok(off)):
                continue
            if on.get("peak_memory_gb") and off.get("peak_memory_gb"):
                put_summary(on, "peak_memory_gb_vs_plain", _single(on["peak_memory_gb"] / off["peak_memory_gb"]))
            a, b = get_summary(on, "train_s"), get_summary(off, "train_s")
            if a and b:
                put_summary(on, "train_s_vs_plain", _across_passes(a, b))
    for group in groups.values():
        gapt, vpt = group.get("gapt"), group.get("vpt-deep")
        for r in group.values():
            if not _ok(r):
                continue
            if _ok(gapt):
                for key in ("peak_memory_gb", "train_s", "infer_s"):
                    put_summary(r, f"{key}_vs_gapt", _ratio_summary(r, gapt, key))
            if r["method"].startswith("lspt") and r.get("tokens"):
                T, n_p = r["tokens"], r["num_prompts"]
                r["floor_train_extra"] = floor_extra(n_p, T, "train")
                r["floor_infer_extra"] = floor_extra(n_p, T, "infer")
                if _ok(vpt):
                    for key in ("train_s", "infer_s"):
                        s = _ratio_summary(r, vpt, key)
                        if s is not None:
                            put_summary(r, f"{key.split('_')[0]}_vs_vpt_deep", s)


def _target(name: str, setting: tuple, s: dict | None, limit: float, detail: str, higher_is_better=False,
            min_rounds: int | None = None, **extra) -> dict:
    model, batch, n_p, dtype, ckpt, task = setting
    v = verdict(s, limit, higher_is_better, **({} if min_rounds is None else dict(min_rounds=min_rounds)))
    out = dict(target=name, task=task, model=model, batch_size=batch, num_prompts=n_p, dtype=dtype,
               grad_checkpointing=ckpt, verdict=v, limit=limit, detail=detail, **extra)
    if s is not None:
        out.update(median=s["median"], **{k: s[k] for k in STATS})
    return out


def spread_text(s: dict | None, pct: bool = False, rounds: bool = True) -> str:
    """A ratio's median [quartiles], as x (1.012x) or, pct, as a change (+1.2%); rounds: with its count."""
    if not s:
        return "n/a"
    f = (lambda v: f"{100 * (v - 1):+.1f}%") if pct else (lambda v: f"{v:.3f}x")  # noqa: E731
    if s["n"] == 1:
        return f(s["median"])
    return f(s["median"]) + f" [{f(s['q1'])} .. {f(s['q3'])}]" + (f" over {s['n']} rounds" if rounds else "")


def evaluate_targets(rows: list[dict]) -> list[dict]:
    """The project's targets (README, "Benchmarks"), per setting, from the rows (verdicts met / missed /
    inconclusive)."""
    out = []
    groups = group_by_setting(rows)
    for setting, g in groups.items():
        fused, ref, vpt, gapt = (g.get(m) for m in ("lspt-fused", "lspt-reference", "vpt-deep", "gapt"))
        if not _ok(fused):
            continue
        on_gpu = str(fused.get("device", "")).startswith("cuda")
        seg = setting[5] == "segmentation"
        extra = dict(fused_backend=fused.get("backend"))
        note = " [no fused backend here: the 'fused' row ran the reference step]" if fused.get("backend") in (
            "reference", "eager") else ""
        if _ok(vpt) and fused.get("floor_train_extra") is not None:
            s = _ratio_summary(fused, vpt, "train_s")
            limit = 1 + fused["floor_train_extra"] + TARGET_TIME_SLACK
            out.append(_target(FLOOR_TARGET, setting, s, limit,
                               f"{spread_text(s, pct=True)} over VPT-deep; "
                               f"floor {100 * fused['floor_train_extra']:.1f}%"
                               f" + {100 * TARGET_TIME_SLACK:g}% = {100 * (limit - 1):.1f}%"
                               + (SEG_FLOOR_NOTE if seg else "") + note,
                               **extra))
        if _ok(ref):
            s = _ratio_summary(fused, ref, "train_s")
            out.append(_target("LSPT-fused train step <= LSPT-reference", setting, s, 1.0,
                               f"fused / reference {spread_text(s)}" + note, **extra))
        if not _ok(gapt):
            continue
        paper = not seg and all(setting[i] == GPU_SETTING[k] for i, k in ((2, "num_prompts"), (3, "dtype")))
        if on_gpu and paper:
            for key, limit in GPU_TARGETS.items():
                s = _ratio_summary(fused, gapt, key)
                what = {"train_s": "train time", "peak_memory_gb": "peak memory", "infer_s": "inference time"}[key]
                out.append(_target(f"GPU: LSPT-fused / GaPT {what} <= {limit:g}", setting, s, limit,
                                   f"{spread_text(s)} (paper: "
                                   f"{dict(train_s=1.009, peak_memory_gb=1.010, infer_s=1.001)[key]})" + note,
                                   min_rounds=1 if key == "peak_memory_gb" else None, **extra))
        elif not on_gpu:
            s = _ratio_summary(fused, gapt, "peak_memory_gb")
            if s is not None:
                out.append(_target(f"LSPT-fused peak memory <= GaPT x {TARGET_MEMORY_CPU:g}", setting, s,
                                   TARGET_MEMORY_CPU, f"{fused['peak_memory_gb']:.3f} GB vs GaPT "
                                   f"{gapt['peak_memory_gb']:.3f} GB ({spread_text(s, pct=True)}; one "
                                   "measurement each)" + note, min_rounds=1, **extra))
    # Gradient checkpointing, classification: the same setting measured with and without it. (A
    # segmentation step's memory is mostly its heads', which checkpointing the blocks does not touch: its
    # ratios are in the table, without a target.)
    for setting, g in groups.items():
        on, off = g.get("lspt-fused"), groups.get(plain_setting(setting), {}).get("lspt-fused")
        if not (setting[4] and setting[5] == "classification" and _ok(on) and _ok(off)):
            continue
        s = get_summary(on, "peak_memory_gb_vs_plain")
        if s is not None:
            out.append(_target(f"grad checkpointing: lspt-fused peak memory <= {CKPT_MEMORY:g}x of the plain run",
                               setting, s, CKPT_MEMORY, f"{s['median']:.3f}x ({on['peak_memory_gb']:.3f} vs "
                               f"{off['peak_memory_gb']:.3f} GB)", min_rounds=1))
        s = get_summary(on, "train_s_vs_plain")
        if s is not None:
            out.append(_target(f"grad checkpointing: lspt-fused train time <= {CKPT_TIME:g}x of the plain run",
                               setting, s, CKPT_TIME, f"{spread_text(s)} (separate timing passes)"))
    return out


def format_targets(targets: list[dict]) -> str:
    lines = []
    for t in targets:
        ck = " ckpt" if t.get("grad_checkpointing") else ""
        lines.append(f"  [{t['verdict']}] {t['target']} (B{t['batch_size']} Np{t['num_prompts']} {t['dtype']}{ck}): "
                     f"{t['detail']}")
    return "\n".join(lines) + ("\n" if lines else "")
