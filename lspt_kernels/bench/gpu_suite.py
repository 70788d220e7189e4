"""`lspt-bench gpu-suite --output DIR`: everything only a GPU can show, in one command.

    lspt-bench gpu-suite --output DIR [--dry-run] [--budget-s 540] [--with-compile]

Parts, each a fresh process importing this package (never code from the working directory), each
with its share of the time budget (a part that runs out is stopped and reported; the next part
still runs):

1. the GPU tests (a repository checkout only): Triton and CUDA parity with the reference step in
   fp32/fp16/bf16, odd shapes, gradcheck - tests/test_cuda_gpu.py and the triton/cuda cases of
   tests/test_step.py, as a JUnit report;
2. the step microbenchmark (`lspt-bench step --device cuda`) in fp32 (every backend against eager
   and torch.compile, with the roofline floor and the host overhead) and bf16 (against eager);
3. the paper's setting (`lspt-bench --device cuda`: ViT-B/16, batch 64, Np 10 and 100, fp32 and
   bf16 autocast) for every method of the encoder table. The lspt-compile row is left out unless
   --with-compile: compiling ViT-B/16 for four settings alone takes most of the budget;
4. a summary of every target with its verdict (met / missed / inconclusive) and of the tests.

Files in DIR (7): gpu-suite.log, bench.json, bench.csv, bench.png, step.json, gpu-tests.xml,
summary.json. Without a GPU the command exits with status 2 (--dry-run prints the plan anywhere).
Commit DIR as bench/results/<device>/; summary.json holds the command line and the device.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from .env import child_command, package_root

FILES = ("gpu-suite.log", "bench.json", "bench.csv", "bench.png", "step.json", "gpu-tests.xml", "summary.json")
GPU_TEST_FILES = ("tests/test_cuda_gpu.py", "tests/test_step.py")
GPU_TEST_FILTER = "cuda or triton"
# Share of the budget each part may use at most (seconds); what a part leaves goes to the next.
PART_CAPS = dict(tests=180, step=150, table=330, segmentation=120)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lspt-bench gpu-suite",
                                description="Everything only a GPU can show, in one command: the GPU tests, the "
                                            "step microbenchmark, the paper-setting table and a summary of every "
                                            "target. Writes at most 7 files into --output.")
    p.add_argument("--output", required=True, help="directory for the suite's files (created)")
    p.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="wall-clock budget of the whole suite in seconds (default: %(default)s)")
    p.add_argument("--with-compile", action="store_true",
                   help="also time the lspt-compile row in the paper-setting table (several minutes more)")
    return p


def plan(out: Path, with_compile: bool = False) -> list[dict]:
    """The parts: name, argv, working directory, cap (s), the files they produce."""
    from .methods import bench_methods
    root = Path(package_root())
    parts = []
    tests = [f for f in GPU_TEST_FILES if (root / f).exists()]
    if tests:
        parts.append(dict(name="tests", cwd=str(root), files=["gpu-tests.xml"],
                          argv=[sys.executable, "-m", "pytest", *tests, "-k", GPU_TEST_FILTER, "-q", "-rs",
                                "-p", "no:cacheprovider", f"--junitxml={out / 'gpu-tests.xml'}"]))
    else:
        parts.append(dict(name="tests", skipped=f"no tests/ beside the package at {root} (not a repository checkout)"))
    # bf16: without the torch.compile row and the host-overhead table (both already in the fp32 run;
    # compiling the reference step for every shape and grad mode again would cost a minute).
    parts.append(dict(name="step", files=["step.json"], dtypes=["float32", "bfloat16"], argv=[
        child_command(["step", "--device", "cuda", "--dtype", "float32", "--json", "{tmp}/step-float32.json"]),
        child_command(["step", "--device", "cuda", "--dtype", "bfloat16", "--backends", "eager", "triton", "cuda",
                       "--no-host-overhead", "--json", "{tmp}/step-bfloat16.json"])]))
    methods = [m for m in bench_methods() if with_compile or m != "lspt-compile"]
    parts.append(dict(name="table", files=["bench.json", "bench.csv", "bench.png"],
                      argv=child_command(["--device", "cuda", "--batch-size", "64", "--num-prompts", "10,100",
                                          "--dtype", "fp32,bf16", "--methods", ",".join(methods),
                                          "--output", str(out)])))
    # The segmentation step in the paper's appendix A.1 setting (ViT-B/16, 512 px crops, Np 100: 1125 tokens;
    # batch 16, the recipe's, on one GPU), 5 rounds to fit its cap; its own bench files in DIR/segmentation/.
    parts.append(dict(name="segmentation", files=["segmentation/bench.json", "segmentation/bench.csv",
                                                  "segmentation/bench.png"],
                      argv=child_command(["--task", "segmentation", "--device", "cuda", "--batch-size", "16",
                                          "--num-prompts", "100", "--img-size", "512", "--dtype", "fp32,bf16",
                                          "--methods", "vpt-deep,gapt,lspt-fused", "--repeats", "5",
                                          "--output", str(out / "segmentation")])))
    return parts


def _describe(parts: list[dict]) -> str:
    lines = []
    for p in parts:
        if p.get("skipped"):
            lines.append(f"- {p['name']}: not run: {p['skipped']}")
            continue
        cmds = p["argv"] if isinstance(p["argv"][0], list) else [p["argv"]]
        lines.append(f"- {p['name']} (at most {PART_CAPS[p['name']]} s) -> {', '.join(p['files'])}")
        for c in cmds:
            shown = c[:2] + ["-c", "<start lspt-bench from this package>"] + c[5:] if c[1:2] == ["-I"] else c
            lines.append("    " + shlex.join(shown) + (f"   (cwd {p['cwd']})" if p.get("cwd") else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    out = Path(args.output).expanduser()
    if args.budget_s <= 0:
        print("lspt-bench gpu-suite: error: --budget-s must be > 0", file=sys.stderr)
        return 2
    parts = plan(out, args.with_compile)
    if args.dry_run:
        print(f"lspt-bench gpu-suite would run, within {args.budget_s:.0f} s, writing {len(FILES)} files into "
              f"{out} ({', '.join(FILES)}):")
        print(_describe(parts))
        print("- summary: every target of bench.json and step.json with its verdict, and the test counts -> "
              "summary.json; everything printed -> gpu-suite.log")
        return 0
    import torch
    if not torch.cuda.is_available():
        print("lspt-bench gpu-suite: error: no CUDA GPU is visible to torch "
              f"({torch.__version__}, CUDA build {torch.version.cuda}): this suite measures what only a GPU can "
              "show. Use --dry-run to see what it would run; on the CPU run `lspt-bench` and `lspt-bench step`.",
              file=sys.stderr)
        return 2
    try:
        out.mkdir(parents=True, exist_ok=True)
        log = open(out / "gpu-suite.log", "w")
    except OSError as exc:
        print(f"lspt-bench gpu-suite: error: cannot write to --output {str(out)!r}: {exc}", file=sys.stderr)
        return 2
    with log:
        return _run(parts, out, log, args, argv, torch)


def _run(parts, out: Path, log, args, argv, torch) -> int:
    from .env import command_line, device_name, load_line, loadavg

    def say(text: str) -> None:
        print(text, flush=True)
        log.write(text + "\n")
        log.flush()

    t0 = time.perf_counter()
    deadline = t0 + args.budget_s
    command = command_line(argv, sub="gpu-suite")
    say(f"{command}\ndevice: {device_name('cuda')}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
        f"{load_line(loadavg(), 'at start')}")
    say("plan:\n" + _describe(parts))
    status: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="lspt-gpu-suite-") as tmp:
        for i, part in enumerate(parts):
            if part.get("skipped"):
                status[part["name"]] = f"not run: {part['skipped']}"
                say(f"\n== {part['name']}: {status[part['name']]}")
                continue
            cmds = part["argv"] if isinstance(part["argv"][0], list) else [part["argv"]]
            # Later parts keep at least their minimum; this one gets its cap or what is left.
            later = sum(min(60, PART_CAPS[p["name"]]) for p in parts[i + 1:] if not p.get("skipped"))
            budget = max(10.0, min(PART_CAPS[part["name"]], deadline - time.perf_counter() - later))
            say(f"\n== {part['name']} (budget {budget:.0f} s)")
            part_end = time.perf_counter() + budget
            results = []
            for c in cmds:
                c = [a.replace("{tmp}", tmp) for a in c]
                results.append(_run_logged(c, part.get("cwd"), max(5.0, part_end - time.perf_counter()), say))
            status[part["name"]] = ("ok" if all(r == 0 for r in results) else
                                    "timed out" if "timeout" in results else f"exit status {results}")
            if part["name"] == "step":
                merged = dict(runs=[])
                for d in part["dtypes"]:
                    f = Path(tmp) / f"step-{d}.json"
                    if f.exists():
                        merged["runs"].append(json.loads(f.read_text()))
                (out / "step.json").write_text(json.dumps(merged, indent=1, default=str))
    summary = summarize_dir(out, status, command)
    summary["wall_s"] = time.perf_counter() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    say("\n" + format_summary(summary))
    say(f"\ntotal wall time {summary['wall_s']:.0f} s (budget {args.budget_s:.0f} s); "
        f"{load_line(loadavg(), 'at the end')}")
    return 0 if all(v == "ok" or v.startswith("not run") for v in status.values()) else 1


def _run_logged(cmd: list[str], cwd, timeout: float, say) -> int | str:
    """Run cmd, its output into the log line by line; 'timeout' when it ran past `timeout` s."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # Its own process group, so that a stop also ends its children (compile workers).
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    lines: queue.Queue = queue.Queue()

    def read():                 # a thread: a blocking readline cannot then hold up the time limit
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    end = time.perf_counter() + timeout
    while True:
        left = end - time.perf_counter()
        if left <= 0:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            say(f"-- stopped after {timeout:.0f} s (its budget)")
            return "timeout"
        try:
            line = lines.get(timeout=min(left, 1.0))
        except queue.Empty:
            # exited, but a child of it may still hold the pipe open: stop waiting for its end
            if proc.poll() is not None and not reader.is_alive():
                break
            if proc.poll() is not None:
                reader.join(timeout=2.0)
                while not lines.empty():
                    item = lines.get()
                    if item is not None:
                        say(item.rstrip("\n"))
                break
            continue
        if line is None:
            break
        say(line.rstrip("\n"))
    return proc.wait()


def _junit_counts(path: Path) -> dict | None:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    keys = ("tests", "failures", "errors", "skipped")
    return {k: sum(int(s.get(k, 0)) for s in suites) for k in keys}


def summarize_dir(out: Path, status: dict, command: str) -> dict:
    """Every target of DIR/bench.json and DIR/step.json, and the GPU tests' counts."""
    summary = dict(command=command, parts=status, targets=[], tests=_junit_counts(out / "gpu-tests.xml"))
    try:
        bench = json.loads((out / "bench.json").read_text())
        summary["device_name"] = bench["meta"].get("device_name")
        for t in bench.get("targets", []):
            summary["targets"].append(dict(source="table", **t))
    except (OSError, ValueError, KeyError):
        pass
    try:
        for run in json.loads((out / "step.json").read_text()).get("runs", []):
            summary.setdefault("device_name", run.get("meta", {}).get("device_name"))
            for t in run.get("targets", []):
                summary["targets"].append(dict(source="step", **t))
    except (OSError, ValueError):
        pass
    return summary


def format_summary(summary: dict) -> str:
    lines = ["== summary", "parts: " + ", ".join(f"{k} {v}" for k, v in summary["parts"].items())]
    tests = summary.get("tests")
    lines.append("GPU tests: " + ("no report" if not tests else
                                 f"{tests['tests']} run, {tests['failures']} failed, {tests['errors']} errors, "
                                 f"{tests['skipped']} skipped"))
    counts: dict[str, int] = {}
    for t in summary["targets"]:
        counts[t["verdict"]] = counts.get(t["verdict"], 0) + 1
        where = (f"{t.get('backend')}, B{t.get('batch')} Np{t.get('num_prompts')} {t.get('dtype')}"
                 if t["source"] == "step" else f"B{t.get('batch_size')} Np{t.get('num_prompts')} {t.get('dtype')}")
        med = t.get("median")
        val = t.get("detail") or ("n/a" if med is None else f"{med:.3f} [{t['q1']:.3f}-{t['q3']:.3f}]")
        lines.append(f"  [{t['verdict']}] {t['target']} ({where}): {val}")
    lines.append("targets: " + (", ".join(f"{n} {v}" for v, n in sorted(counts.items())) or "none measured"))
    return "\n".join(lines)
