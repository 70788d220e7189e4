"""`lspt-bench`: training and inference cost of LSPT against GaPT, VPT and the linear probe.

    lspt-bench                                  # the embedded default (DEFAULTS below)
    lspt-bench --model vit_small_patch16_224 --batch-size 8 --num-prompts 10,100 --output out/
    lspt-bench step [...]                       # the fused-step microbenchmark (lspt_kernels.bench.step)
    lspt-bench serve [...]                      # K tasks in one mixed batch vs task by task (bench.serve)
    lspt-bench gpu-suite --output DIR           # everything only a GPU can show (gpu_suite)
    python -m lspt_kernels.bench --help

The paper's table C.4 (max memory, train time per batch, inference time per batch) for every method
on one frozen timm ViT with random weights, plus the trainable parameters and "Total Params".
`--task segmentation` measures the segmentation step instead (SETR-PUP and its auxiliary heads on the
patch grids, one iteration of lspt_kernels.seg's recipe; inference: one no-grad forward of a batch of
crops), by default in the paper's appendix A.1 setting: 512 px crops, Np 100 (1125 tokens per image),
150 classes, VPT-deep, GaPT and LSPT-fused.
Memory: one fresh process per method on the CPU (peak RSS), per method in this process on a GPU
(max_memory_allocated). Time: all methods in one process around a shared backbone, in interleaved
rounds; every time is the median over the rounds with its quartiles, every ratio to GaPT is taken
round by round. Targets get the verdict met / missed / inconclusive. Files: bench.json, bench.csv,
bench.png (rewritten after every step, so an interrupted run keeps what it measured). Bad input stops
before measuring with "lspt-bench: error: ..." and status 2; a method that fails is reported in its
row and the run goes on (status 1 at the end); Ctrl-C keeps what was measured (status 130).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..cli_helpers import (
    UsageError,
    add_model_kwargs_option,
    check_output_dir,
    model_kwargs_from_args,
    resolve_device,
)
from . import methods as M
from .env import environment, load_line, load_warning, loadavg
from .options import DEFAULT_MODEL, DTYPES, check_model, parse_list
from .report import format_table, row_label, write_results
from .runner import measure_isolated, measure_memory, time_interleaved, worker
from .targets import add_comparisons, evaluate_targets, format_targets, put_summary

TASKS = ("classification", "segmentation")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# The embedded default runs, per task and device (img_size None: the model's own).
# Classification, the paper's table C.4. GPU: its setting (batch 64, Np 10 and 100, fp32 and bf16
# autocast); CPU: sized to finish in about 5 minutes on a quiet 2-core machine.
# Segmentation, the paper's appendix A.1 setting: ViT-B/16 on 512 px crops with Np 100 (T = 1125
# tokens), ADE20K's 150 classes, the methods of its table. GPU: batch 16, the recipe's batch on one
# GPU, fp32 and bf16; CPU: batch 1 and 3 rounds, about 5 minutes on a quiet 2-core machine (one
# train step of ViT-B/16 there is about 11 s).
_CLS = dict(img_size=None, num_classes=200, methods="all")
_SEG = dict(img_size=512, num_classes=150, methods="vpt-deep,gapt,lspt-fused", num_prompts="100")
DEFAULTS = {
    "classification": {
        "cpu": dict(_CLS, batch_size="4", num_prompts="10", dtype="fp32", repeats=5, warmup=1),
        "cuda": dict(_CLS, batch_size="64", num_prompts="10,100", dtype="fp32,bf16", repeats=10, warmup=3),
    },
    "segmentation": {
        "cpu": dict(_SEG, batch_size="1", dtype="fp32", repeats=3, warmup=1),
        "cuda": dict(_SEG, batch_size="16", dtype="fp32,bf16", repeats=10, warmup=3),
    },
}


def _default_help(key: str) -> str:
    """'(default: GPU on a GPU, CPU on the CPU; segmentation: GPU / CPU)', the segmentation part only
    where it differs."""
    (cg, cc), (sg, sc) = ((DEFAULTS[t]["cuda"][key], DEFAULTS[t]["cpu"][key]) for t in TASKS)
    text = f"{cg} on a GPU, {cc} on the CPU" if cg != cc else f"{cc}"
    if (sg, sc) != (cg, cc):
        text += f"; --task segmentation: {sg} / {sc}" if sg != sc else f"; --task segmentation: {sc}"
    return f"(default: {text})"


def build_parser() -> argparse.ArgumentParser:
    cpu = DEFAULTS["classification"]["cpu"]
    p = argparse.ArgumentParser(
        prog="lspt-bench",
        description="Max memory, train and inference time per batch of LSPT vs GaPT, VPT and the linear "
                    "probe on a frozen timm ViT with random weights (the paper's table C.4), timed in "
                    "interleaved rounds (median and quartiles). With no arguments: ViT-B/16 at 224 px; on a "
                    "GPU the paper's setting (batch 64, Np 10 and 100, fp32 and bf16 autocast), on the CPU "
                    f"batch {cpu['batch_size']}, Np {cpu['num_prompts']}, fp32. --task segmentation: the "
                    "segmentation step (SETR-PUP heads) at 512 px and Np 100 for VPT-deep, GaPT and LSPT-fused.",
        epilog="Subcommands: 'lspt-bench step --help' (the fused-step microbenchmark), "
               "'lspt-bench serve --help' (multi-task serving: K tasks in one mixed batch vs task by task), "
               "'lspt-bench gpu-suite --help' (the one-command GPU suite).")
    p.add_argument("--task", default="classification", choices=TASKS,
                   help="classification: the encoder with a linear head (table C.4); segmentation: SETR-PUP and "
                        "its two auxiliary heads on the patch grids, one iteration of the segmentation recipe "
                        "per train step, one no-grad forward of a batch of crops per inference "
                        "(default: %(default)s)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="any timm VisionTransformer or Eva name, e.g. vit_base_patch16_dinov3 (default: %(default)s)")
    p.add_argument("--batch-size", default=None, help="batch size(s), comma-separated " + _default_help("batch_size"))
    p.add_argument("--num-prompts", default=None, help="Np value(s), comma-separated " + _default_help("num_prompts"))
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (autocast), comma-separated "
                   + _default_help("dtype"))
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: %(default)s)")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of " + ",".join(M.bench_methods())
                   + ", or all (aliases: lspt = lspt-fused, lspt-eager = lspt-reference) " + _default_help("methods"))
    p.add_argument("--repeats", type=int, default=None, help="interleaved timing rounds " + _default_help("repeats"))
    p.add_argument("--warmup", type=int, default=None, help="untimed calls of each method first "
                   + _default_help("warmup"))
    p.add_argument("--mem-steps", type=int, default=1,
                   help="train steps over which peak memory is taken, after the warm-up (default: %(default)s)")
    p.add_argument("--img-size", type=int, default=None,
                   help="image (segmentation: crop) size (default: the model's; --task segmentation: "
                        f"{DEFAULTS['segmentation']['cpu']['img_size']}, the backbone built for it with "
                        "dynamic_img_size=True as for segmentation training)")
    add_model_kwargs_option(p, alias=True)
    p.add_argument("--num-classes", type=int, default=None, help="classes of the linear head (segmentation: of the "
                   "heads) " + _default_help("num_classes"))
    p.add_argument("--head-channels", type=int, default=None,
                   help="--task segmentation: conv width of the SETR heads (default: SETR's 256)")
    p.add_argument("--grad-checkpointing", nargs="?", const="on", default="off", choices=("off", "on", "both"),
                   help="run the encoders with gradient checkpointing (encoder.set_grad_checkpointing): "
                        "'on' (the bare flag), 'off', or 'both' to report every setting with and without it "
                        "(default: %(default)s)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the lspt-compile row (default: %(default)s)")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                   help="torch.compile mode of the lspt-compile row; reduce-overhead (CUDA graphs) needs a GPU "
                        "(default: %(default)s)")
    p.add_argument("--output", default="lspt-bench-results",
                   help="directory for bench.json, bench.csv, bench.png (default: %(default)s)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--in-process", action="store_true",
                   help="CPU: take the memory pass in this process instead of a fresh subprocess per method "
                        "(faster; the peak RSS then includes what earlier methods left behind)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (torch.set_num_threads; default: torch's, one per core)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random backbone, prompts, images and labels (default: %(default)s)")
    # Timing is always interleaved; --interleave is accepted (and ignored) so scripts that pass it still run.
    p.add_argument("--interleave", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else list(argv)
    if args_list[:1] == ["--_worker"]:
        return worker(args_list[1], args_list[2])
    if args_list[:1] == ["step"]:
        from .step import main as step_main
        return step_main(args_list[1:])
    if args_list[:1] == ["serve"]:
        from .serve import main as serve_main
        return serve_main(args_list[1:])
    if args_list[:1] == ["gpu-suite"]:
        from .gpu_suite import main as suite_main
        return suite_main(args_list[1:])
    args = build_parser().parse_args(args_list)
    try:
        return run(args, args_list)
    except UsageError as exc:
        print(f"lspt-bench: error: {exc}", file=sys.stderr)
        return 2


def check_args(args, device: str) -> dict:
    """The run's settings from parsed arguments, what they leave out from DEFAULTS[task][device]
    ("cuda" or "cpu"); a UsageError naming the option for bad input."""
    defaults = DEFAULTS[args.task]["cuda" if device.startswith("cuda") else "cpu"]
    batch_sizes = parse_list(args.batch_size or defaults["batch_size"], int, "batch-size")
    prompts = parse_list(args.num_prompts or defaults["num_prompts"], int, "num-prompts")
    dtypes = parse_list(args.dtype or defaults["dtype"], str, "dtype")
    repeats = defaults["repeats"] if args.repeats is None else args.repeats
    warmup = defaults["warmup"] if args.warmup is None else args.warmup
    known = M.bench_methods()
    methods_text = args.methods or defaults["methods"]
    methods = (list(known) if methods_text.strip() == "all"
               else [M.canonical(m) for m in parse_list(methods_text, str, "methods")])
    num_classes = defaults["num_classes"] if args.num_classes is None else args.num_classes
    img_size = defaults["img_size"] if args.img_size is None else args.img_size
    for name, values, ok in (("batch-size", batch_sizes, lambda v: v >= 1), ("num-prompts", prompts, lambda v: v >= 1),
                             ("dtype", dtypes, lambda v: v in DTYPES), ("methods", methods, lambda v: v in known)):
        bad = [v for v in values if not ok(v)]
        if bad:
            allowed = {"dtype": f"one of {', '.join(DTYPES)}", "methods": f"one of {', '.join(known)}"}.get(
                name, "an int >= 1")
            raise UsageError(f"--{name}: {', '.join(map(str, bad))} not allowed: each must be {allowed}")
    methods = list(dict.fromkeys(methods))
    if repeats < 1 or warmup < 1:
        raise UsageError("--repeats and --warmup must be >= 1 (the first run of a compiled model compiles it)")
    if args.mem_steps < 1:
        raise UsageError("--mem-steps must be >= 1")
    if num_classes < 1:
        raise UsageError("--num-classes must be >= 1")
    if img_size is not None and img_size < 1:
        raise UsageError("--img-size must be >= 1")
    if args.head_channels is not None and (args.task != "segmentation" or args.head_channels < 1):
        raise UsageError(f"--head-channels {args.head_channels}: needs --task segmentation and a value >= 1")
    if args.threads is not None and args.threads < 1:
        raise UsageError("--threads must be >= 1")
    if args.compile_mode == "reduce-overhead" and not device.startswith("cuda"):
        raise UsageError("--compile-mode reduce-overhead uses CUDA graphs and needs a GPU (--device cuda)")
    ckpt = {"off": [False], "on": [True], "both": [False, True]}[args.grad_checkpointing]
    return dict(batch_sizes=batch_sizes, prompts=prompts, dtypes=dtypes, repeats=repeats, warmup=warmup,
                methods=methods, ckpt=ckpt, num_classes=num_classes, img_size=img_size)


def _meta(args, argv: list[str], a: dict, device: str, shape: dict, model_kwargs: dict, isolated: bool) -> dict:
    """The run's record (bench.json's "meta"): the machine, the command and every setting."""
    backend, note = M.fused_backend(device)
    is_cuda = device.startswith("cuda")
    meta = environment(device, argv)
    meta.update(task=args.task, model=args.model, model_kwargs=model_kwargs,
                img_size=a["img_size"] or shape["img_size"], depth=shape["depth"], embed_dim=shape["embed_dim"],
                batch_sizes=a["batch_sizes"], num_prompts=a["prompts"], dtypes=a["dtypes"], methods=a["methods"],
                repeats=a["repeats"], warmup=a["warmup"], mem_steps=args.mem_steps, fused_backend=backend,
                fused_note=note, num_classes=a["num_classes"], grad_checkpointing=args.grad_checkpointing,
                compile_backend=args.compile_backend, compile_mode=args.compile_mode,
                optimizer="SGD(lr=0.01, momentum=0.9)", loss="cross-entropy, random labels",
                timing=("interleaved rounds in one process, shared frozen backbone, every method once per round "
                        "(order rotated each round); median and quartiles over the rounds; ratios per round"),
                isolation="subprocess per method" if isolated else "in-process",
                memory=("torch.cuda.max_memory_allocated over the measured train step(s) (reset first)" if is_cuda
                        else "peak RSS (VmHWM, reset after warm-up) during the measured train step(s) minus the "
                             "process's RSS before the ViT was built (after imports and backend load)"))
    if args.task == "segmentation":
        meta.update(feature_blocks=shape["feature_blocks"], head_channels=args.head_channels,
                    heads=("SETR-PUP on the last feature block, an auxiliary head on each other one "
                           "(lspt_kernels.seg.SegmentationModel's defaults); 'Trainable' includes them"),
                    optimizer=("lspt_kernels.seg.train_step at iteration 0: SGD momentum 0.9, lr 0.001, heads 10x, "
                               "poly schedule; a GradScaler under fp16"),
                    loss="cross-entropy of the main and auxiliary heads (weighted), random label maps",
                    inference="one no-grad forward of the batch of crops in eval mode (one sliding window of the "
                              "test per image): the main head's logits at the crop size")
    return meta


def _measure_setting(spec: dict, methods: list[str], meta: dict, isolated: bool, rows: list[dict], counter: dict,
                     save) -> None:
    """One setting: the memory pass of every method (a row each, appended to `rows` as it is measured),
    then the interleaved timing pass over the methods that ran."""
    where = f"B{spec['batch_size']}, Np {spec['num_prompts']}, {spec['dtype']}" + (
        ", grad checkpointing" if spec["grad_checkpointing"] else "")
    group = []
    for m in methods:
        counter["step"] += 1
        t0 = time.perf_counter()
        row = measure_isolated(m, spec) if isolated else measure_memory(m, spec)
        row.update(repeats=spec["repeats"], warmup=spec["warmup"], device_name=meta["device_name"],
                   memory_wall_s=time.perf_counter() - t0)
        rows.append(row)
        group.append(row)
        print(_progress(counter["step"], counter["total"], row, where), flush=True)
        save()
    ok = [r["method"] for r in group if r.get("status") == "ok"]
    counter["step"] += 1
    if not ok:
        return
    t0 = time.perf_counter()
    head = f"[{counter['step']}/{counter['total']}]"
    print(f"{head} timing {len(ok)} methods ({where}) in {spec['repeats']} interleaved rounds ...", flush=True)
    found = time_interleaved(ok, spec, progress=lambda text: print(f"    {text}", flush=True))
    for r in group:
        t = found.get(r["method"], {})
        if t.get("timing_error"):
            r.update(status="error", error=f"timing: {t['timing_error']}", timing_error=t["timing_error"])
        for kind in ("train", "infer"):
            if t.get(kind):
                put_summary(r, f"{kind}_s", t[kind])
                r[f"{kind}_s_all"] = t[f"{kind}_s_all"]
    print(f"{head} timed [{time.perf_counter() - t0:.1f} s]", flush=True)
    save()


def _report(rows: list[dict], meta: dict, outdir: Path, plot: bool, interrupted: bool) -> int:
    """The table, the targets and the files at the end of a run; the exit status."""
    print()
    print(format_table(rows, meta), end="")
    targets = evaluate_targets(rows)
    if targets:
        print("Targets (met / missed / inconclusive: the ratio's quartiles straddle the limit):")
        print(format_targets(targets), end="")
    try:
        paths = write_results(rows, meta, outdir, plot=plot)
        print("wrote " + ", ".join(str(p) for p in paths))
    except Exception as exc:
        print(f"lspt-bench: error: cannot write the results to {outdir}: {type(exc).__name__}: {exc}; "
              "the rows as JSON follow on stdout", file=sys.stderr)
        print(json.dumps(dict(meta=meta, rows=rows), default=str))
        return 1
    print(f"total wall time {meta['wall_s']:.1f} s; {load_line(meta['loadavg_end'], 'at the end')}")
    if meta["load_warning"]:
        print(f"lspt-bench: warning: {meta['load_warning']}", file=sys.stderr)
    if interrupted:
        return 130
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        print("lspt-bench: " + "; ".join(f"{row_label(r)} (B{r['batch_size']} Np{r['num_prompts']} {r['dtype']}): "
                                         f"{r.get('status', 'error').upper()}" for r in failed)
              + " - reported in the rows above; the other rows are complete", file=sys.stderr)
        return 1
    return 0


def run(args, argv: list[str]) -> int:
    """The `lspt-bench` run of parsed arguments: checks, then every setting (memory pass, timing pass), the
    files rewritten after every step; the exit status (0, 1 when a method failed, 130 on Ctrl-C)."""
    t_start = time.perf_counter()
    load_start = loadavg()
    import torch
    device = str(resolve_device(args.device))
    a = check_args(args, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_kwargs = model_kwargs_from_args(args)
    if args.task == "segmentation":      # as segmentation training builds it (other sizes resample the grid)
        model_kwargs = {"dynamic_img_size": True, **model_kwargs}
    shape = check_model(args.model, a["img_size"], model_kwargs, args.task)
    outdir = check_output_dir(args.output)
    isolated = not device.startswith("cuda") and not args.in_process
    meta = _meta(args, argv, a, device, shape, model_kwargs, isolated)
    meta["loadavg_start"] = load_start
    backend, note = meta["fused_backend"], meta["fused_note"]
    task = "segmentation step (SETR-PUP) on " if args.task == "segmentation" else ""
    print(f"lspt-bench: {task}{args.model} ({meta['img_size']} px) on {meta['device_name']}; torch {meta['torch']}, "
          f"timm {meta['timm']}, triton {meta['triton']}; fused backend: {backend}"
          + (f" ({note})" if note else ""), flush=True)
    print(f"lspt-bench: {load_line(load_start, 'at start')}", flush=True)
    if note:
        print(f"lspt-bench: warning: {note}; the 'fused' rows run the reference step", file=sys.stderr, flush=True)

    settings = [(b, n, d, c) for c in a["ckpt"] for d in a["dtypes"] for n in a["prompts"] for b in a["batch_sizes"]]
    counter = dict(step=0, total=len(settings) * (len(a["methods"]) + 1))
    rows: list[dict] = []

    def save():
        add_comparisons(rows)
        try:                                       # keep what is measured so far on disk
            write_results(rows, meta, outdir, plot=False)
        except OSError as exc:
            print(f"lspt-bench: warning: cannot write results to {outdir}: {exc}", file=sys.stderr)

    interrupted = False
    try:
        for b, n, d, c in settings:
            spec = dict(task=args.task, model=args.model, model_kwargs=model_kwargs, img_size=a["img_size"],
                        batch_size=b, num_prompts=n, dtype=d, device=device, repeats=a["repeats"], warmup=a["warmup"],
                        mem_steps=args.mem_steps, num_classes=a["num_classes"], seed=args.seed,
                        fused_backend=backend, fused_note=note, compile_backend=args.compile_backend,
                        compile_mode=args.compile_mode, threads=args.threads, grad_checkpointing=c,
                        head_channels=args.head_channels)
            _measure_setting(spec, a["methods"], meta, isolated, rows, counter, save)
    except KeyboardInterrupt:
        interrupted = True
        meta["interrupted"] = f"after {counter['step']} of {counter['total']} steps"
        print(f"\nlspt-bench: interrupted after {counter['step']} of {counter['total']} steps; keeping what was "
              "measured", file=sys.stderr, flush=True)
    add_comparisons(rows)
    meta["wall_s"] = time.perf_counter() - t_start
    meta["loadavg_end"] = loadavg()
    meta["load_warning"] = load_warning(load_start, meta["loadavg_end"])
    return _report(rows, meta, outdir, not args.no_plot, interrupted)


def _progress(i: int, total: int, r: dict, where: str) -> str:
    head = f"[{i}/{total}] {row_label(r)} ({where}) memory"
    if r.get("status") != "ok":
        return f"{head}: {r.get('status', 'error').upper()}: {r.get('error')} [{r.get('memory_wall_s', 0):.1f} s]"
    mem = r.get("peak_memory_gb")
    extra = f", compile {r['compile_s']:.1f} s" if r.get("compile_s") is not None else ""
    return f"{head}: {'-' if mem is None else f'{mem:.3f} GB'}{extra} [{r.get('memory_wall_s', 0):.1f} s]"


if __name__ == "__main__":
    sys.exit(main())
