"""`lspt-bench serve`: K tuned tasks served from one frozen backbone, mixed in one batch, against the same
images run task by task through the single-task encoders.

    lspt-bench serve                                           # the defaults of the device (DEFAULTS)
    lspt-bench serve --device cpu --tasks 16 --batch-sizes 64 --methods lspt-fused,vpt-deep --repeats 5
                                   # the issue's CPU target: ViT-B/16, 16 tasks x 4 images vs 16 batches of 4

A setting is (dtype, K tasks, batch): "batch" is the number of images per batch, each of the K tasks gets
batch / K of them, so a batch must be a multiple of K (other combinations are skipped and listed). Per
method (LSPT, GaPT, VPT-deep: the methods `MultiTaskEncoder` serves), K single-task encoders are built
on ONE random frozen ViT, each task with its own seed and its own class count (num_classes + t % 3, so
the padded logits are exercised), and a `MultiTaskEncoder` from them:

- "mixed": one no-grad forward of the MultiTaskEncoder on the whole batch, the task ids in a random
  (seeded) order;
- "loop": K no-grad forwards, one per task's single-task encoder on that task's images (already grouped:
  the loop is not charged for gathering them).

Before timing, every setting's mixed logits are checked row by row against the loop's (each row's own
width; -inf past it) to a tolerance of the precision (TOLERANCES): a mismatch is reported in the row
(status "mismatch") and that method is not timed, since timing two different computations tells nothing.
Every mixed and loop callable of a setting, all methods together, is then timed in the interleaved
rounds of `measure.interleaved_rounds`: per-batch latency (median and quartiles), images/s, the
per-round ratio mixed / loop, and LSPT's mixed batch over VPT-deep's, per round, against the cost
model's inference floor Np / (3T) + 2 % (targets.floor_extra), with the verdicts of measure.verdict.
Files: serve.json and serve.csv in --output, rewritten after every setting (an interrupted run keeps
what it measured; Ctrl-C exits with status 130). Bad input stops before measuring with
"lspt-bench serve: error: ..." and status 2; a failed or mismatched row makes the status 1.
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import sys
import time
from pathlib import Path

from ..cli_helpers import (
    UsageError,
    add_model_kwargs_option,
    autocast_context,
    check_output_dir,
    model_kwargs_from_args,
    resolve_device,
)
from . import methods as M
from .env import environment, load_line, load_warning, loadavg
from .measure import Timer, fmt_spread, interleaved_rounds, per_round_ratios, short_error, summarize, verdict
from .options import DEFAULT_MODEL, DTYPES, check_model, parse_list
from .runner import build_vit, is_oom, make_encoder
from .targets import floor_extra, get_summary, put_summary, spread_text

# The bench methods a MultiTaskEncoder serves (lspt-reference: its grouped step in plain PyTorch).
SERVE_METHODS = ("lspt-fused", "lspt-reference", "gapt", "vpt-deep")
# CPU: sized to finish in about 5 minutes on a quiet 2-core machine with ViT-B/16 (5 settings, 6 callables
# each called 4 times; a batch of 16 there is about 3-4 s per forward; K = 64 needs --batch-sizes 64).
DEFAULTS = {
    "cpu": dict(tasks="1,4,16,64", batch_sizes="4,16", dtype="fp32", repeats=3, warmup=1),
    "cuda": dict(tasks="1,4,16,64", batch_sizes="1,4,16,64", dtype="bf16", repeats=10, warmup=3),
}
DEFAULT_METHODS = "lspt-fused,gapt,vpt-deep"
# Largest |mixed - loop| over max(1, max |loop|) accepted: the two runs group rows into GEMMs of different
# sizes, so they round differently; fp32 "ieee" (full fp32 GEMMs), "tf32" / "bf16" (reduced-precision fp32
# GEMMs, a GPU's default), and bf16 / fp16 autocast.
TOLERANCES = {"ieee": 1e-4, "tf32": 5e-3, "bf16": 5e-2, "fp16": 5e-2}
# Mixed no slower than the loop (K > 1; at K = 1 the ratio is the multi-task machinery's own overhead).
MIXED_OVER_LOOP_LIMIT = 1.0
# LSPT-fused mixed over VPT-deep mixed: within the inference floor + 2 % (the single-task slack of serving).
SERVE_SLACK = 0.02
FILES = ("serve.json", "serve.csv")
CPU_TARGET_COMMAND = ("lspt-bench serve --device cpu --tasks 16 --batch-sizes 64 --methods lspt-fused,vpt-deep "
                      "--repeats 5 --output serve-cpu")


def task_widths(num_classes: int, tasks: int) -> list[int]:
    """The class count of each task: num_classes + t % 3 (tasks of different widths, as a server has)."""
    return [num_classes + t % 3 for t in range(tasks)]


def settings(tasks: list[int], batch_sizes: list[int]) -> tuple[list[tuple[int, int]], list[dict]]:
    """The (K, batch) pairs to measure (batch a multiple of K), and the skipped ones with the reason."""
    run, skipped = [], []
    for k in tasks:
        for b in batch_sizes:
            if b % k == 0:
                run.append((k, b))
            else:
                why = "batch < K" if b < k else "batch not a multiple of K"
                skipped.append(dict(tasks=k, batch_size=b, reason=f"{why}: each task gets batch / K images"))
    return run, skipped


def build_parser() -> argparse.ArgumentParser:
    cpu, gpu = DEFAULTS["cpu"], DEFAULTS["cuda"]

    def default(key):
        same = gpu[key] == cpu[key]
        return f"(default: {cpu[key]})" if same else f"(default: {gpu[key]} on a GPU, {cpu[key]} on the CPU)"

    p = argparse.ArgumentParser(
        prog="lspt-bench serve",
        description="K tuned tasks on one frozen timm ViT: one mixed batch through MultiTaskEncoder vs the same "
                    "images task by task through the single-task encoders; per-batch latency and images/s "
                    "(median and quartiles over interleaved rounds), the per-round ratio mixed / loop, and "
                    "LSPT's mixed batch over VPT-deep's against the cost-model floor. The logits of both are "
                    "checked to match before anything is timed.",
        epilog=f"The issue's CPU target (ViT-B/16, 16 tasks x 4 images in one batch vs 16 batches of 4; about 5-6 "
               f"minutes on a quiet 2-core machine): {CPU_TARGET_COMMAND}")
    p.add_argument("--model", default=DEFAULT_MODEL, help="any timm VisionTransformer or Eva name "
                                                          "(default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: %(default)s)")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma-separated subset of {','.join(SERVE_METHODS)} (alias: lspt = lspt-fused) "
                        "(default: %(default)s)")
    p.add_argument("--tasks", default=None, help="K values, comma-separated " + default("tasks"))
    p.add_argument("--batch-sizes", default=None,
                   help="images per batch, comma-separated; each of the K tasks gets batch / K of them, pairs "
                        "with a batch that is not a multiple of K are skipped " + default("batch_sizes"))
    p.add_argument("--num-prompts", type=int, default=10, help="Np of every task (default: %(default)s)")
    p.add_argument("--num-classes", type=int, default=100,
                   help="classes of task 0; task t has num_classes + t %% 3 (default: %(default)s)")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (autocast), comma-separated "
                   + default("dtype"))
    p.add_argument("--repeats", type=int, default=None, help="interleaved timing rounds " + default("repeats"))
    p.add_argument("--warmup", type=int, default=None, help="untimed calls of each callable first, the logits "
                   "check being the first " + default("warmup"))
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    p.add_argument("--img-size", type=int, default=None, help="image size (default: the model's)")
    add_model_kwargs_option(p)
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the backbone, the tasks, the images and their order (default: %(default)s)")
    p.add_argument("--output", default="lspt-bench-serve", help="directory for " + " and ".join(FILES)
                   + " (default: %(default)s)")
    return p


def check_args(args, device: str) -> dict:
    """The run's settings from parsed arguments and DEFAULTS[device kind]; a UsageError naming the option."""
    defaults = DEFAULTS["cuda" if device.startswith("cuda") else "cpu"]
    tasks = parse_list(args.tasks or defaults["tasks"], int, "tasks")
    batch_sizes = parse_list(args.batch_sizes or defaults["batch_sizes"], int, "batch-sizes")
    dtypes = parse_list(args.dtype or defaults["dtype"], str, "dtype")
    methods = [M.canonical(m) for m in parse_list(args.methods, str, "methods")]
    repeats = defaults["repeats"] if args.repeats is None else args.repeats
    warmup = defaults["warmup"] if args.warmup is None else args.warmup
    for name, values, ok, allowed in (
            ("tasks", tasks, lambda v: v >= 1, "an int >= 1"),
            ("batch-sizes", batch_sizes, lambda v: v >= 1, "an int >= 1"),
            ("dtype", dtypes, lambda v: v in DTYPES, f"one of {', '.join(DTYPES)}"),
            ("methods", methods, lambda v: v in SERVE_METHODS,
             f"one of {', '.join(SERVE_METHODS)} (the methods MultiTaskEncoder serves)")):
        bad = [v for v in values if not ok(v)]
        if bad:
            raise UsageError(f"--{name}: {', '.join(map(str, bad))} not allowed: each must be {allowed}")
    for name, value in (("num-prompts", args.num_prompts), ("num-classes", args.num_classes),
                        ("repeats", repeats), ("warmup", warmup), ("threads", args.threads),
                        ("img-size", args.img_size)):
        if value is not None and value < 1:
            raise UsageError(f"--{name} must be >= 1, got {value}")
    if "fp16" in dtypes and not device.startswith("cuda"):
        raise UsageError("--dtype fp16: CPU autocast in fp16 is not supported here; use fp32 or bf16")
    run, skipped = settings(list(dict.fromkeys(tasks)), list(dict.fromkeys(batch_sizes)))
    if not run:
        raise UsageError(f"--tasks {args.tasks or defaults['tasks']} and --batch-sizes "
                         f"{args.batch_sizes or defaults['batch_sizes']}: no batch is a multiple of any K "
                         "(each task gets batch / K images)")
    return dict(settings=run, skipped=skipped, dtypes=list(dict.fromkeys(dtypes)),
                methods=list(dict.fromkeys(methods)), repeats=repeats, warmup=warmup)


# ------------------------------------------------------------------------------------------------
# The models and the inputs of a setting
# ------------------------------------------------------------------------------------------------
def randomize_task(encoder, seed: int) -> None:
    """Move every tuned parameter of `encoder` off its initial value by a seeded random amount (about a
    tenth of its typical size), so that tasks differ everywhere: GaPT's gates and temperatures start equal
    in every encoder, and an equal (or zero) parameter would leave the per-task path untested."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in encoder.trainable_parameters():
            scale = 0.1 * (float(p.abs().mean()) + 0.1)
            p.add_(torch.randn(p.shape, generator=gen).to(p) * scale)


def build_tasks(method: str, spec: dict, vit, tasks: int):
    """K single-task encoders of `method` on the one `vit` (task t: seed spec["seed"] + 1000 (t + 1),
    task_widths classes, randomize_task) in eval mode, and the MultiTaskEncoder made from them."""
    from ..multitask import MultiTaskEncoder
    encoders = []
    for t, width in enumerate(task_widths(spec["num_classes"], tasks)):
        seed = spec["seed"] + 1000 * (t + 1)
        enc = make_encoder(method, dict(spec, seed=seed, num_classes=width), vit=vit).to(spec["device"])
        randomize_task(enc, seed)
        encoders.append(enc.eval())
    backend = ({"backend": "eager"} if method == "lspt-reference"
               else {"backend": spec["fused_backend"]} if M.is_fused(method) else {})
    mt = MultiTaskEncoder.from_encoders(encoders, names=[f"task{t}" for t in range(tasks)], **backend)
    return encoders, mt.eval()


def make_inputs(spec: dict, tasks: int, batch: int, img_size: tuple[int, int]) -> dict:
    """The batch's images, its task ids (batch / K rows per task, in a seeded random order), and per task
    the indices of its rows and its images in that order (what the loop runs)."""
    import torch
    gen = torch.Generator().manual_seed(spec["seed"] + 7919 * tasks + batch)
    images = torch.randn(batch, 3, *img_size, generator=gen)
    task_ids = torch.arange(tasks).repeat_interleave(batch // tasks)[torch.randperm(batch, generator=gen)]
    rows = [torch.nonzero(task_ids == t).flatten() for t in range(tasks)]
    device = spec["device"]
    return dict(images=images.to(device), task_ids=task_ids.to(device), rows=rows,
                task_images=[images[r].contiguous().to(device) for r in rows])


def tolerance(dtype: str, device: str) -> float:
    """The mismatch tolerance of a setting (TOLERANCES): the autocast dtype's, else the fp32 GEMMs'."""
    from ..precision import float32_matmul_precision
    if dtype != "fp32":
        return TOLERANCES[dtype]
    return TOLERANCES.get(float32_matmul_precision("cuda" if device.startswith("cuda") else "cpu"),
                          TOLERANCES["bf16"])


def compare_logits(mixed, loop: list, rows: list, widths: list[int]) -> float:
    """The largest |mixed - loop| over max(1, max |loop|), each mixed row against its task's output at its
    own width; inf when a row's padding is not -inf or an output is not finite."""
    import torch
    worst = 0.0
    for t, (out, r) in enumerate(zip(loop, rows)):
        mine = mixed[r.to(mixed.device)].float()
        out = out.float()
        width = widths[t]
        if mine.shape[1] > width and not bool(torch.all(mine[:, width:] == float("-inf"))):
            return float("inf")
        mine = mine[:, :width]
        if mine.shape != out.shape or not (bool(torch.isfinite(out).all()) and bool(torch.isfinite(mine).all())):
            return float("inf")
        scale = max(1.0, float(out.abs().max()))
        worst = max(worst, float((mine - out).abs().max()) / scale)
    return worst


def callables(encoders: list, mt, inputs: dict, spec: dict, dtype: str) -> tuple:
    """(mixed, loop): one no-grad forward of the mixed batch, and K no-grad forwards task by task; each
    returns its logits (a tensor; a list of K tensors)."""
    import torch
    device = torch.device(spec["device"])
    amp = "none" if dtype == "fp32" else dtype
    images, task_ids, task_images = inputs["images"], inputs["task_ids"], inputs["task_images"]

    def mixed():
        with torch.no_grad(), autocast_context(device, amp):
            return mt(images, task_ids)

    def loop():
        with torch.no_grad(), autocast_context(device, amp):
            return [enc(x) for enc, x in zip(encoders, task_images)]

    return mixed, loop


# ------------------------------------------------------------------------------------------------
# Measuring a setting
# ------------------------------------------------------------------------------------------------
def base_row(method: str, spec: dict, dtype: str, tasks: int, batch: int) -> dict:
    return dict(method=method, label=M.label(method), status="ok", error=None, model=spec["model"],
                img_size=spec["img_size_px"], tokens=spec["tokens"], num_prompts=spec["num_prompts"],
                num_classes=f"{min(task_widths(spec['num_classes'], tasks))}-"
                            f"{max(task_widths(spec['num_classes'], tasks))}",
                tasks=tasks, batch_size=batch, per_task_batch=batch // tasks, dtype=dtype, device=spec["device"],
                backend=("eager" if method == "lspt-reference" else spec["fused_backend"] if M.is_fused(method)
                         else None),
                repeats=spec["repeats"], warmup=spec["warmup"], threads=spec["threads"])


def build_models(methods: list[str], spec: dict, vit, tasks: int) -> dict:
    """{method: (encoders, MultiTaskEncoder)}, or {method: "status: message"} for a method that could not be
    built (e.g. out of memory at K = 64)."""
    models = {}
    for m in methods:
        try:
            models[m] = build_tasks(m, spec, vit, tasks)
        except Exception as exc:  # noqa: BLE001 - reported in the method's rows, the others go on
            models[m] = f"{'oom' if is_oom(exc) else 'error'}: building: {short_error(exc, 500)}"
    return models


def check_method(row: dict, built, inputs: dict, spec: dict, tol: float):
    """The mixed and loop callables of one method once the logits are checked to match; None (and the
    row's status and error set) when they cannot be built, fail, or differ."""
    if isinstance(built, str):
        status, _, error = built.partition(": ")
        row.update(status=status, error=error)
        return None
    encoders, mt = built
    mixed, loop = callables(encoders, mt, inputs, spec, row["dtype"])
    try:
        err = compare_logits(mixed(), loop(), inputs["rows"], task_widths(spec["num_classes"], row["tasks"]))
    except Exception as exc:  # noqa: BLE001
        row.update(status="oom" if is_oom(exc) else "error", error=short_error(exc, 500))
        return None
    row.update(max_error=err, tolerance=tol)
    if not err <= tol:
        row.update(status="mismatch", error=f"mixed and loop logits differ: {err:.3g} > {tol:g} (largest "
                                            "|mixed - loop| / max(1, max |loop|), padding -inf); not timed")
        return None
    return mixed, loop


def measure_setting(models: dict, spec: dict, dtype: str, tasks: int, batch: int, progress=None) -> list[dict]:
    """One (dtype, K, batch) setting: every method's row, its mixed and loop callables checked, then all
    of them timed in the same interleaved rounds."""
    inputs = make_inputs(spec, tasks, batch, spec["img_hw"])
    tol = tolerance(dtype, spec["device"])
    rows, fns = {}, {}
    for m, built in models.items():
        row = rows[m] = base_row(m, spec, dtype, tasks, batch)
        pair = check_method(row, built, inputs, spec, tol)
        if pair is not None:
            fns[f"{m}:mixed"], fns[f"{m}:loop"] = pair
    if fns:
        # The check ran every callable once already: it is the first of the warm-up calls.
        times, errors = interleaved_rounds(fns, spec["repeats"], spec["warmup"] - 1, Timer(spec["device"]),
                                           progress=progress)
        for m, row in rows.items():
            failed = [f"{kind}: {errors[f'{m}:{kind}']}" for kind in ("mixed", "loop") if f"{m}:{kind}" in errors]
            if failed:
                row.update(status="oom" if "OutOfMemory" in failed[0] else "error", error="; ".join(failed))
            if row["status"] != "ok":
                continue
            for kind in ("mixed", "loop"):
                ts = times[f"{m}:{kind}"]
                row[f"{kind}_ms_all"] = [t * 1e3 for t in ts]
                put_summary(row, f"{kind}_ms", summarize(ts), 1e3)
                put_summary(row, f"{kind}_images_per_s", summarize([batch / t for t in ts]))
            put_summary(row, "mixed_over_loop", summarize(per_round_ratios(times[f"{m}:mixed"], times[f"{m}:loop"])))
    add_ratios_to_vpt_deep(list(rows.values()))
    return list(rows.values())


def add_ratios_to_vpt_deep(rows: list[dict]) -> None:
    """Within one setting: each LSPT row's mixed and loop times over VPT-deep's, per round, with the
    cost model's inference floor Np / (3T)."""
    vpt = next((r for r in rows if r["method"] == "vpt-deep" and r["status"] == "ok"), None)
    for r in rows:
        if not r["method"].startswith("lspt") or r["status"] != "ok":
            continue
        r["floor_infer_extra"] = floor_extra(r["num_prompts"], r["tokens"], "infer")
        if vpt is not None:
            for kind in ("mixed", "loop"):
                put_summary(r, f"{kind}_vs_vpt_deep",
                            summarize(per_round_ratios(r[f"{kind}_ms_all"], vpt[f"{kind}_ms_all"])))


def _target(name: str, r: dict, s: dict | None, limit: float, detail: str) -> dict:
    out = dict(target=name, method=r["method"], tasks=r["tasks"], batch_size=r["batch_size"], dtype=r["dtype"],
               num_prompts=r["num_prompts"], verdict=verdict(s, limit), limit=limit, detail=detail)
    if s is not None:
        out.update(median=s["median"], q1=s["q1"], q3=s["q3"], min=s["min"], max=s["max"], n=s["n"])
    return out


def serve_targets(rows: list[dict]) -> list[dict]:
    """The issue's targets, per row and setting: the mixed batch no slower than the loop (K > 1), and
    LSPT-fused's mixed batch over VPT-deep's within the inference floor Np / (3T) + 2 %."""
    out = []
    for r in rows:
        if r["status"] != "ok":
            continue
        s = get_summary(r, "mixed_over_loop")
        if r["tasks"] > 1 and s is not None:
            out.append(_target(f"mixed batch no slower than the task-by-task loop (mixed / loop <= "
                               f"{MIXED_OVER_LOOP_LIMIT:g})", r, s, MIXED_OVER_LOOP_LIMIT,
                               f"{M.label(r['method'])}: mixed / loop {fmt_spread(s, 3)}"))
        s = get_summary(r, "mixed_vs_vpt_deep")
        if r["method"] == "lspt-fused" and s is not None:
            limit = 1 + r["floor_infer_extra"] + SERVE_SLACK
            out.append(_target(f"LSPT-fused mixed batch <= VPT-deep mixed x (1 + Np/(3T) + {100 * SERVE_SLACK:g}%)",
                               r, s, limit,
                               f"{spread_text(s, pct=True, rounds=False)} over VPT-deep; floor "
                               f"{100 * r['floor_infer_extra']:.1f}% + {100 * SERVE_SLACK:.0f}% = "
                               f"{100 * (limit - 1):.1f}%"))
    return out


# ------------------------------------------------------------------------------------------------
# The table and the files
# ------------------------------------------------------------------------------------------------
CSV_FIELDS = (("method", "label", "status", "error", "model", "img_size", "tokens", "num_prompts", "num_classes",
               "tasks", "batch_size", "per_task_batch", "dtype", "device", "device_name", "backend", "max_error",
               "tolerance")
              + tuple(f"{key}{part}" for key in ("mixed_ms", "loop_ms", "mixed_images_per_s", "loop_images_per_s",
                                                 "mixed_over_loop", "mixed_vs_vpt_deep", "loop_vs_vpt_deep")
                      for part in ("", "_q1", "_q3", "_min", "_max", "_n"))
              + ("floor_infer_extra", "repeats", "warmup", "threads", "torch", "triton", "timm", "command", "time"))


def format_table(rows: list[dict], meta: dict) -> str:
    """One line per row: latency and images/s (median [quartiles]), mixed / loop and LSPT / VPT-deep per
    round."""
    head = (f"{'dtype':>5} {'K':>3} {'batch':>5} {'/task':>5} {'method':<17} | {'mixed ms':>24} {'loop ms':>24} | "
            f"{'mixed img/s':>11} {'loop img/s':>10} | {'mixed/loop':>20} | {'mixed over VPT-deep':>26}")
    lines = [f"{meta['model']}, {meta['img_size']} px, Np {meta['num_prompts']}, T = {meta['tokens']} tokens, on "
             f"{meta['device_name']}; latency per batch: median [quartiles] over {meta['repeats']} interleaved "
             "rounds; ratios per round; /task: images per task", head, "-" * len(head)]
    for r in rows:
        pre = f"{r['dtype']:>5} {r['tasks']:>3} {r['batch_size']:>5} {r['per_task_batch']:>5} {r['label']:<17} | "
        if r["status"] != "ok":
            lines.append(pre + f"{r['status'].upper()}: {r['error']}")
            continue
        vs = get_summary(r, "mixed_vs_vpt_deep")
        over = f"{spread_text(vs, pct=True, rounds=False)} (floor {100 * r['floor_infer_extra']:.1f}%)" if vs else ""
        spread = {key: fmt_spread(get_summary(r, key), digits) for key, digits in
                  (("mixed_ms", 2), ("loop_ms", 2), ("mixed_over_loop", 3))}
        lines.append(pre + f"{spread['mixed_ms']:>24} {spread['loop_ms']:>24} | {r['mixed_images_per_s']:>11.1f} "
                     f"{r['loop_images_per_s']:>10.1f} | {spread['mixed_over_loop']:>20} | {over:>26}")
    if meta.get("skipped"):
        lines.append("skipped (K, batch): " + ", ".join(f"({s['tasks']}, {s['batch_size']})" for s in meta["skipped"])
                     + ": the batch is not a multiple of K")
    return "\n".join(lines) + "\n"


def write_results(rows: list[dict], meta: dict, targets: list[dict], outdir: Path) -> list[Path]:
    """serve.json (meta, rows, targets) and serve.csv under outdir."""
    js, cs = (Path(outdir) / name for name in FILES)
    js.write_text(json.dumps(dict(meta=meta, rows=rows, targets=targets), indent=1, default=str) + "\n")
    with open(cs, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**{k: meta.get(k) for k in ("device_name", "torch", "triton", "timm", "command", "time")},
                        **r})
    return [js, cs]


def format_targets(targets: list[dict]) -> str:
    return "".join(f"  [{t['verdict']}] {t['target']} (K{t['tasks']} B{t['batch_size']} {t['dtype']}): "
                   f"{t['detail']}\n" for t in targets)


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        return run(args, argv)
    except UsageError as exc:
        print(f"lspt-bench serve: error: {exc}", file=sys.stderr)
        return 2


def _prepare(args, argv: list[str]) -> tuple[dict, dict, dict, Path]:
    """(settings, spec, meta, output directory) of a command line, every check done before measuring."""
    import torch
    device = str(resolve_device(args.device))
    a = check_args(args, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_kwargs = model_kwargs_from_args(args)
    shape = check_model(args.model, args.img_size, model_kwargs)
    outdir = check_output_dir(args.output)
    backend, note = M.fused_backend(device)
    tokens = shape["prefix"] + args.num_prompts + shape["num_patches"]
    spec = dict(model=args.model, model_kwargs=model_kwargs, img_size=args.img_size, img_size_px=shape["img_size"],
                num_prompts=args.num_prompts, num_classes=args.num_classes, device=device, seed=args.seed,
                fused_backend=backend, fused_note=note, repeats=a["repeats"], warmup=a["warmup"],
                threads=torch.get_num_threads(), tokens=tokens)
    meta = environment(device, argv, sub="serve")
    meta.update(model=args.model, model_kwargs=model_kwargs, img_size=shape["img_size"], depth=shape["depth"],
                embed_dim=shape["embed_dim"], tokens=tokens, num_prompts=args.num_prompts,
                num_classes=args.num_classes, methods=a["methods"], dtypes=a["dtypes"], repeats=a["repeats"],
                warmup=a["warmup"], settings=[dict(tasks=k, batch_size=b) for k, b in a["settings"]],
                skipped=a["skipped"], fused_backend=backend, fused_note=note, seed=args.seed,
                mixed="one no-grad forward of MultiTaskEncoder on the batch, task ids in a seeded random order",
                loop="K no-grad forwards of the single-task encoders, each on its task's images (grouped beforehand)",
                timing="all mixed and loop callables of a setting in interleaved rounds (order rotated each round); "
                       "median and quartiles over the rounds; ratios per round")
    return a, spec, meta, outdir


def run(args, argv: list[str]) -> int:
    """The serve run: every K (its models built once), every dtype and batch of it; the files rewritten
    after every setting; the exit status (0, 1 when a row failed or mismatched, 130 on Ctrl-C)."""
    import torch
    t_start, load_start = time.perf_counter(), loadavg()
    a, spec, meta, outdir = _prepare(args, argv)
    meta["loadavg_start"] = load_start
    print(f"lspt-bench serve: {args.model} ({meta['img_size']} px, T = {meta['tokens']}) on {meta['device_name']}; "
          f"torch {meta['torch']}, triton {meta['triton']}; fused backend: {spec['fused_backend']}"
          + (f" ({spec['fused_note']})" if spec["fused_note"] else ""), flush=True)
    print(f"lspt-bench serve: {load_line(load_start, 'at start')}", flush=True)
    rows: list[dict] = []
    total, done = len(a["settings"]) * len(a["dtypes"]), 0

    def save():
        try:                                       # keep what is measured so far on disk
            write_results(rows, meta, serve_targets(rows), outdir)
        except OSError as exc:
            print(f"lspt-bench serve: warning: cannot write results to {outdir}: {exc}", file=sys.stderr)

    try:
        vit = build_vit(spec).to(spec["device"])
        spec["img_hw"] = tuple(vit.patch_embed.img_size)
        for k in dict.fromkeys(k for k, _ in a["settings"]):
            models = build_models(a["methods"], spec, vit, k)
            for dtype in a["dtypes"]:
                for b in (b for kk, b in a["settings"] if kk == k):
                    done += 1
                    head = f"[{done}/{total}] K {k}, batch {b} ({b // k} per task), {dtype}"
                    print(f"{head}: checking the logits, then {spec['repeats']} interleaved rounds ...", flush=True)
                    t0 = time.perf_counter()
                    new = measure_setting(models, spec, dtype, k, b, progress=lambda t: print(f"    {t}", flush=True))
                    for r in new:
                        r["device_name"] = meta["device_name"]
                    rows.extend(new)
                    print(f"{head}: done [{time.perf_counter() - t0:.1f} s]", flush=True)
                    save()
            models.clear()
            gc.collect()
            if spec["device"].startswith("cuda"):
                torch.cuda.empty_cache()
    except KeyboardInterrupt:
        meta["interrupted"] = f"after {done} of {total} settings"
        print(f"\nlspt-bench serve: interrupted after {done} of {total} settings; keeping what was measured",
              file=sys.stderr, flush=True)
    meta.update(wall_s=time.perf_counter() - t_start, loadavg_end=loadavg())
    meta["load_warning"] = load_warning(load_start, meta["loadavg_end"])
    return _report(rows, meta, outdir)


def _report(rows: list[dict], meta: dict, outdir: Path) -> int:
    print("\n" + format_table(rows, meta), end="")
    targets = serve_targets(rows)
    if targets:
        print("Targets (met / missed / inconclusive: the ratio's quartiles straddle the limit):")
        print(format_targets(targets), end="")
    try:
        paths = write_results(rows, meta, targets, outdir)
        print("wrote " + ", ".join(str(p) for p in paths))
    except OSError as exc:
        print(f"lspt-bench serve: error: cannot write the results to {outdir}: {exc}", file=sys.stderr)
        return 1
    print(f"total wall time {meta['wall_s']:.1f} s; {load_line(meta['loadavg_end'], 'at the end')}")
    if meta["load_warning"]:
        print(f"lspt-bench serve: warning: {meta['load_warning']}", file=sys.stderr)
    if meta.get("interrupted"):
        return 130
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        print("lspt-bench serve: " + "; ".join(f"{r['label']} (K{r['tasks']} B{r['batch_size']} {r['dtype']}): "
                                               f"{r['status'].upper()}" for r in failed)
              + " - reported in the rows above", file=sys.stderr)
        return 1
    return 0
