"""Turn pytest-benchmark JSON (`pytest bench/ --benchmark-only --benchmark-json out.json`) into the
`lspt-bench` plot and table.

    python bench/plot_results.py out.json [-o DIR]

Writes DIR/encoders.png (grouped bars of max memory, train and inference time per method, as
`lspt-bench` draws them) and, when the step suite ran, DIR/step.png (forward+backward and forward
time and peak memory per backend), and prints the encoder rows in the paper's table layout with the
ratios to GaPT. DIR defaults to the JSON file's folder.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from lspt_kernels import bench as B  # noqa: E402

STEP_PANELS = (("fwd_bwd_s", "forward+backward (s)"), ("fwd_s", "forward (s)"),
               ("peak_memory_gb", "peak memory of fwd+bwd (GB)"))


def _put_stats(row: dict, key: str, stats: dict) -> None:
    """The median and pytest-benchmark's quartiles, min and max (the error bars of the plot)."""
    row[key] = stats.get("median")
    for k in ("q1", "q3", "min", "max"):
        if stats.get(k) is not None:
            row[f"{key}_{k}"] = stats[k]
    if stats.get("rounds") is not None:
        row[f"{key}_n"] = stats["rounds"]


def rows_from_benchmark_json(data: dict | str | Path) -> tuple[list[dict], list[dict]]:
    """(encoder rows, step rows) from pytest-benchmark JSON (a dict or a path): one encoder row per
    (method, setting) with train_s/infer_s = the medians, memory from the train benchmark; one step
    row per (backend, setting) with fwd_s/fwd_bwd_s."""
    if not isinstance(data, dict):
        data = json.loads(Path(data).read_text())
    enc: dict[tuple, dict] = {}
    step: dict[tuple, dict] = {}
    for b in data.get("benchmarks", []):
        info, stats = b.get("extra_info", {}), b.get("stats") or {}
        if info.get("suite") == "encoder":
            key = (info["method"], info["model"], info["batch_size"], info["num_prompts"], info["dtype"])
            row = enc.setdefault(key, dict(method=info["method"], label=info.get("label"), model=info["model"],
                                           batch_size=info["batch_size"], num_prompts=info["num_prompts"],
                                           dtype=info["dtype"], device=info.get("device", "cpu"),
                                           status="ok", backend=info.get("backend"),
                                           compiled=info.get("compiled", False)))
            for k in ("tokens", "img_size", "trainable_params", "total_params_ratio", "device_name",
                      "compile_backend", "note"):
                if info.get(k) is not None:
                    row.setdefault(k, info[k])
            if info.get("fused_note"):
                row["note"] = info["fused_note"]
            if info["kind"] == "train":
                _put_stats(row, "train_s", stats)
                row["peak_memory_gb"] = info.get("peak_memory_gb")
                row["memory_kind"] = info.get("memory_kind")
                if info.get("compile_s") is not None:
                    row["compile_s"] = info["compile_s"]
            else:
                _put_stats(row, "infer_s", stats)
        elif info.get("suite") == "step":
            key = (info["backend"], info["batch_size"], info["num_prompts"], info["dtype"])
            row = step.setdefault(key, dict(method=info["backend"], batch_size=info["batch_size"],
                                            num_prompts=info["num_prompts"], dtype=info["dtype"],
                                            status="ok", device=info.get("device")))
            _put_stats(row, f"{info['direction']}_s", stats)
            row[f"{info['direction']}_floor_s"] = info.get("floor_s")
            if info["direction"] == "fwd_bwd":
                row["peak_memory_gb"] = info.get("peak_memory_gb")
    enc_rows = list(enc.values())
    for r in enc_rows:                      # a method whose train or inference did not run
        r.setdefault("train_s", None)
        r.setdefault("infer_s", None)
    B.add_comparisons([r for r in enc_rows if r["train_s"] is not None and r["infer_s"] is not None])
    return enc_rows, list(step.values())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", type=Path, help="pytest-benchmark --benchmark-json output")
    p.add_argument("-o", "--output", type=Path, default=None, help="folder for the PNGs (default: the JSON's)")
    args = p.parse_args(argv)
    try:
        data = json.loads(args.json.read_text())
    except (OSError, ValueError) as exc:
        p.error(f"cannot read {args.json}: {exc}")
    out = args.output or args.json.parent
    out.mkdir(parents=True, exist_ok=True)
    enc, step = rows_from_benchmark_json(data)
    if not enc and not step:
        p.error(f"{args.json} holds no lspt bench/ results (was it written by `pytest bench/ --benchmark-json`?)")
    machine = data.get("machine_info", {})
    if enc:
        print(B.format_table(enc), end="")
        path = B.plot_rows(enc, out / "encoders.png", title=f"{enc[0]['model']} on "
                           f"{enc[0].get('device_name') or machine.get('cpu', {}).get('brand_raw', '')}")
        print(f"wrote {path}")
    if step:
        path = B.plot_rows(step, out / "step.png", title="one LSPT step per backend", panels=STEP_PANELS)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
