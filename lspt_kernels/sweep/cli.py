"""`lspt-sweep`: the official hyper-parameter protocol as one resumable command.

    lspt-sweep run --data-root DIR --tasks T1,T2 --methods lspt,gapt --model NAME [--checkpoint FILE]
                   --protocol vpt-vtab|vpt-fgvc|gapt [--lr-grid ..] [--wd-grid ..] [--seeds ..]
                   --output SWEEP [--launcher local|submitit] [--jobs N] [--dry-run] [-- LSPT-TRAIN OPTIONS]
    lspt-sweep report SWEEP [--output DIR]
"""
from __future__ import annotations

import argparse
import importlib.util
import signal
import sys
from pathlib import Path

from ..cli_helpers import UsageError
from .protocols import TASK_SETS, preset_help

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lspt-sweep", description="The official VPT / GaPT hyper-parameter protocol over lspt-train runs, "
        "resumable, on this machine or a SLURM cluster, ending in the paper's tables (docs/sweep.md).")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser(
        "run", formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="lspt-sweep run --data-root DIR --tasks T,.. --methods M,.. --model NAME --protocol P --output SWEEP "
              "[options] [-- lspt-train options]",
        help="plan and run (or continue) a sweep",
        description="Plan every run, then launch lspt-train runs: grid runs per (method, task), then the chosen "
                    "lr / wd with every seed. Running the same command again skips finished runs and resumes "
                    "interrupted ones. Options after -- go to every lspt-train run (e.g. -- --epochs 100 "
                    "--batch-size 64 --num-prompts 10; not --lr / --weight-decay / --seed / --data / --output, "
                    "which the sweep sets).",
        epilog=preset_help() + "\n\ntask shorthands (--tasks): " + ", ".join(TASK_SETS) +
               "\nmethod options: METHOD:KEY=VALUE[:KEY=VALUE] passes --KEY VALUE to that method's runs only, "
               "e.g. lspt:cspc=none:lpc=none (the paper's table 3)\ntest hook: LSPT_SWEEP_TRAINER='CMD' replaces "
               "`python -m lspt_kernels.train` (docs/sweep.md)")
    r.add_argument("--data-root", required=True, help="folder holding one folder per task (VTAB-1k lists, FGVC json "
                   "or image folders)")
    r.add_argument("--tasks", required=True, help="comma-separated task names (standard names find their usual "
                   "folder names, e.g. caltech101 -> vtab-caltech101; any other name is a folder under --data-root)")
    r.add_argument("--methods", required=True, help="comma-separated lspt-train methods, e.g. lspt,gapt,vpt-deep")
    r.add_argument("--model", required=True, help="timm ViT name, e.g. vit_base_patch16_224")
    r.add_argument("--checkpoint", default=None, help="backbone weights (MAE / MoCo v3 file); its format decides "
                   "which of the paper's numbers the report shows")
    r.add_argument("--protocol", required=True, help="vpt-vtab | vpt-fgvc | gapt (see below)")
    r.add_argument("--lr-grid", default=None, help="comma-separated base lrs (batch 256), replacing the preset's")
    r.add_argument("--wd-grid", default=None, help="comma-separated weight decays, replacing the preset's")
    r.add_argument("--seeds", default=None, help="comma-separated seeds, replacing the preset's (the grid runs use "
                   "the first)")
    r.add_argument("--output", required=True, help="the sweep folder (its state: run it again to continue)")
    r.add_argument("--launcher", default="local", choices=("local", "submitit"),
                   help="local: --jobs lspt-train processes on this machine (one per GPU when there are GPUs); "
                        "submitit: SLURM jobs (submitit's local executor where there is no SLURM)")
    r.add_argument("--jobs", type=int, default=None, help="runs at a time (default: local, the number of GPUs or 1; "
                   "submitit, 32)")
    r.add_argument("--timeout-min", type=int, default=24 * 60, help="submitit: time limit of one job (a run that "
                   "hits it is requeued and resumed)")
    r.add_argument("--partition", default=None, help="submitit: SLURM partition")
    r.add_argument("--gpus-per-job", type=int, default=1, help="submitit: GPUs per job")
    r.add_argument("--cpus-per-job", type=int, default=10, help="submitit: CPUs per job (data-loader workers)")
    r.add_argument("--submitit-param", nargs="*", default=[], metavar="KEY=VALUE",
                   help="submitit: more AutoExecutor parameters, e.g. mem_gb=64 slurm_constraint=volta32gb")
    r.add_argument("--dry-run", action="store_true", help="check everything and print the plan; run nothing")
    rep = sub.add_parser("report", help="write the paper-style tables of a sweep (Markdown, CSV, JSON, PNG)")
    rep.add_argument("sweep", help="the sweep folder (lspt-sweep run --output)")
    rep.add_argument("--output", default=None, help="where to write (default SWEEP/report)")
    return p


def _launcher(args, plan, ns_device):
    from .launchers import LocalLauncher, SubmititLauncher, visible_gpus
    if args.launcher == "local":
        gpus = visible_gpus(ns_device)
        jobs = args.jobs or max(1, len(gpus))
        note = (f"{jobs} at a time on GPU(s) {', '.join(gpus)}" if gpus else f"{jobs} at a time on the CPU")
        if gpus and jobs > len(gpus):
            note += f" ({jobs} jobs share {len(gpus)} GPU(s))"
        return LocalLauncher(jobs, gpus), jobs, note
    from ..cli_helpers import parse_model_kwargs
    params = dict(timeout_min=args.timeout_min, gpus_per_node=args.gpus_per_job, cpus_per_task=args.cpus_per_job,
                  nodes=1, tasks_per_node=1, name="lspt-sweep")
    if args.partition:
        params["slurm_partition"] = args.partition
    params.update(parse_model_kwargs(args.submitit_param, "--submitit-param"))
    launcher = SubmititLauncher(plan.root / "submitit", params)
    jobs = args.jobs or 32
    return launcher, jobs, f"{jobs} at a time through submitit ({launcher.cluster})"


def _describe(plan) -> list[str]:
    from . import state
    from .plan import format_number
    grid, final = plan.size()
    pr = plan.protocol
    lines = [f"plan: {len(plan.methods)} method(s) {', '.join(m.label for m in plan.methods)} x {len(plan.tasks)} "
             f"task(s) {', '.join(f'{t.name} ({t.layout})' for t in plan.tasks)}",
             f"  grid: lr {', '.join(map(format_number, pr.lrs))} x wd {', '.join(map(format_number, pr.wds))}, seed "
             f"{pr.seeds[0]}: {grid} runs; final: the chosen lr / wd x seeds {', '.join(map(str, pr.seeds))}: "
             f"{final} runs; {plan.epochs} epochs each",
             "  workload: {:,} training images, {:,} evaluated (the scored split after every epoch); time = "
             "training / (train img/s) + evaluated / (eval img/s)".format(*plan.workload()),
             f"  {plan.paper_note}"]
    runs = [r for t, m in plan.cells() for r in plan.grid_runs(t, m)]
    finished = sum(state.marker(r.folder) is not None for r in runs)
    resumable = sum(state.marker(r.folder) is None and (Path(r.folder) / "resume.pt").is_file() for r in runs)
    if finished or resumable:
        lines.append(f"  grid runs already finished: {finished}, to resume: {resumable}")
    return lines


def _run(args, train_args: list[str]) -> int:
    from .driver import StatusLine, run_sweep
    from .plan import build_plan, claim_folder
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UsageError("--tasks: give at least one task")
    if args.jobs is not None and args.jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {args.jobs}")
    plan = build_plan(args.output, args.data_root, tasks, args.methods, args.model, args.checkpoint, args.protocol,
                      args.lr_grid, args.wd_grid, args.seeds, train_args)
    if args.dry_run:
        print("\n".join(_describe(plan)))
        print("dry run: nothing was written")
        return 0
    if args.launcher == "submitit" and importlib.util.find_spec("submitit") is None:
        raise UsageError("--launcher submitit needs submitit: pip install 'lspt-kernels[sweep]' (or pip install "
                         "submitit)")
    claim_folder(plan)
    launcher, jobs, note = _launcher(args, plan, plan.device)
    print("\n".join(_describe(plan)) + f"\n  running {note}; state in {plan.root}", flush=True)
    return run_sweep(plan, launcher, jobs, StatusLine(sys.stderr))


def _report(args) -> int:
    from .plan import load_plan
    from .report import write_report
    plan = load_plan(args.sweep)
    result = write_report(plan, args.output)
    print(result["paths"]["md"].read_text(), end="")
    print("written: " + ", ".join(str(p) for p in result["paths"].values()))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, train_args = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    if args.command == "report" and train_args:
        build_parser().error("report takes no options after --")
    # A termination request stops the sweep like Ctrl-C: every run keeps its last finished epoch.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return _run(args, train_args) if args.command == "run" else _report(args)
    except UsageError as exc:
        print(f"lspt-sweep: error: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
