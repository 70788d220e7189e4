"""lspt-bench: benchmarks of lspt_kernels, one job per module.

- cli: the `lspt-bench` command (the paper's table C.4 for every method; `--task segmentation` for the
  segmentation step) and its subcommands
- step: `lspt-bench step`, the fused-step microbenchmark
- serve: `lspt-bench serve`, K tasks in one mixed batch (MultiTaskEncoder) vs task by task
- options: the options the commands share (lists, dtypes, the model's shape)
- gpu_suite: `lspt-bench gpu-suite`, everything only a GPU can show, in one command
- measure: the one timer and sync, interleaved rounds, spreads and verdicts, memory probes
- methods: bench method names -> encoders (through lspt_kernels.encoders.build_encoder)
- runner: building and running the models, encoders or segmentation models (memory pass, interleaved
  timing pass, worker processes)
- targets: per-round ratios and the targets' verdicts
- report: the table, JSON/CSV and the PNG
- env: the machine (device, versions, load) and how child processes are started

The names below are the public helpers the pytest-benchmark suites in bench/ use.
"""
from .cli import DEFAULTS, main
from .env import child_command, device_name, environment, loadavg
from .measure import MemoryProbe, Timer, interleaved_rounds, per_round_ratios, summarize, sync, verdict
from .methods import bench_methods, fused_backend, label, short_reason
from .report import format_table, plot_rows, row_label, write_results
from .runner import (
    build_vit,
    encoder_of,
    make_encoder,
    make_model,
    make_step_fns,
    measure_isolated,
    measure_memory,
    parameter_counts,
    time_interleaved,
)
from .targets import add_comparisons, evaluate_targets

__all__ = ["main", "DEFAULTS", "child_command", "device_name", "environment", "loadavg",
           "MemoryProbe", "Timer", "interleaved_rounds", "per_round_ratios", "summarize", "sync", "verdict",
           "bench_methods", "fused_backend", "label", "short_reason", "format_table", "plot_rows", "row_label",
           "write_results", "build_vit", "make_encoder", "make_model", "encoder_of", "parameter_counts",
           "make_step_fns", "measure_isolated", "measure_memory", "time_interleaved", "add_comparisons",
           "evaluate_targets"]
