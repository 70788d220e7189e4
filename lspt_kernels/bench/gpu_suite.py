"""`lspt-bench gpu-suite --output DIR`: everything only a GPU can show, in one command.

    lspt-bench gpu-suite --output DIR [--dry-run] [--budget-s 540] [--parts tests,sanitizer,...]
                         [--with-compile]

Parts, each a fresh process importing this package (never code from the working directory), each
with its share of the time budget (a part that runs out is stopped and reported; the next part
still runs):

1. tests: the GPU tests (a repository checkout only): Triton and CUDA parity with the eager step in
   fp32/fp16/bf16, odd shapes, ViT-B's width D = 768 with 2048 prompt rows (shared and per-image
   gate-bias rows), gradcheck - tests/test_cuda_gpu.py and the triton/cuda cases of
   tests/test_step.py, as a JUnit report;
2. sanitizer: `compute-sanitizer --tool memcheck` over the cuda and the triton step, forward and
   backward, at the paper's shape (ViT-B/16, batch 64, Np 10, bf16) and two odd ones (JUnit);
3. step: the step microbenchmark (`lspt-bench step --device cuda`) in fp32 (every backend against
   eager and torch.compile, with the roofline floor and the host overhead) and bf16 (against eager);
4. compiled: LSPT-fused and GaPT encoders (ViT-B/16, batch 64, Np 10, bf16) eager, under
   torch.compile and mode="reduce-overhead" (`lspt-bench step --tables compiled`): whether eager
   LSPT is host-bound shows at once (its rows go into step.json);
5. table: the paper's setting (`lspt-bench --device cuda`: ViT-B/16, batch 64, Np 10 and 100, fp32 and
   bf16 autocast) for every method of the encoder table. The lspt-compile row is left out unless
   --with-compile: compiling ViT-B/16 for four settings alone takes most of the budget;
6. segmentation: the segmentation step in the paper's appendix A.1 setting (its files in DIR/segmentation/);
7. serve: `lspt-bench serve --device cuda`: K = 64, 16, 4, 1 tasks mixed in one batch of 1 to 64 images
   against the same images task by task, for LSPT-fused, GaPT and VPT-deep in bf16 (its files in DIR/serve/;
   the K = 64 and 16 settings first, where small per-task batches show what mixing buys);
8. a summary of every target with its verdict (met / missed / inconclusive) and of the tests.

--parts runs a subset (e.g. two commands of a few minutes each); a later run into the same DIR
keeps what the earlier one measured and summarises everything in DIR. Files in DIR (8):
gpu-suite.log (appended), bench.json, bench.csv, bench.png, step.json, gpu-tests.xml,
sanitizer.xml, summary.json. Without a GPU the command exits with status 2 (--dry-run prints the
plan anywhere). Commit DIR as bench/results/<device>/; summary.json holds the command lines and the
device.
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

FILES = ("gpu-suite.log", "bench.json", "bench.csv", "bench.png", "step.json", "gpu-tests.xml", "sanitizer.xml",
         "summary.json")
GPU_TEST_FILES = ("tests/test_cuda_gpu.py", "tests/test_step.py", "tests/test_grouped_step.py")
GPU_TEST_FILTER = "(cuda or triton) and not compute_sanitizer"
SANITIZER_FILTER = "compute_sanitizer and memcheck"
PARTS = ("tests", "sanitizer", "step", "compiled", "table", "segmentation", "serve")
# Share of the budget each part may use at most (seconds); what a part leaves goes to the next.
PART_CAPS = dict(tests=150, sanitizer=120, step=120, compiled=180, table=300, segmentation=120, serve=150)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lspt-bench gpu-suite",
                                description="Everything only a GPU can show, in one command: the GPU tests, "
                                            "compute-sanitizer, the step microbenchmark, compiled encoders, the "
                                            "paper-setting table and a summary of every target. Writes at most "
                                            f"{len(FILES)} files into --output.")
    p.add_argument("--output", required=True, help="directory for the suite's files (created)")
    p.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="wall-clock budget of the whole suite in seconds (default: %(default)s)")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated subset of {','.join(PARTS)}, run in that order (default: all)")
    p.add_argument("--with-compile", action="store_true",
                   help="also time the lspt-compile row in the paper-setting table (several minutes more)")
    return p


def _pytest_part(name: str, root: Path, filter_: str, report: Path, files: list[str]) -> dict:
    tests = [f for f in GPU_TEST_FILES if (root / f).exists()]
    if not tests:
        return dict(name=name, skipped=f"no tests/ beside the package at {root} (not a repository checkout)")
    if name == "sanitizer":
        tests = [t for t in tests if t.endswith("test_cuda_gpu.py")]
    return dict(name=name, cwd=str(root), files=files,
                argv=[sys.executable, "-m", "pytest", *tests, "-k", filter_, "-q", "-rs", "-p", "no:cacheprovider",
                      f"--junitxml={report}"])


def plan(out: Path, with_compile: bool = False, parts=PARTS) -> list[dict]:
    """The parts: name, argv, working directory, cap (s), the files they produce."""
    from .methods import bench_methods
    root = Path(package_root())
    plans = dict(
        tests=lambda: _pytest_part("tests", root, GPU_TEST_FILTER, out / "gpu-tests.xml", ["gpu-tests.xml"]),
        sanitizer=lambda: _pytest_part("sanitizer", root, SANITIZER_FILTER, out / "sanitizer.xml", ["sanitizer.xml"]),
        # bf16: without the torch.compile row and the host table (both in the fp32 run already;
        # compiling the eager step for every shape and grad mode again would cost a minute).
        step=lambda: dict(name="step", files=["step.json"], json=["step-float32.json", "step-bfloat16.json"], argv=[
            child_command(["step", "--device", "cuda", "--dtype", "float32", "--tables", "steps,host",
                           "--json", "{tmp}/step-float32.json"]),
            child_command(["step", "--device", "cuda", "--dtype", "bfloat16", "--tables", "steps",
                           "--backends", "eager", "triton", "cuda", "--json", "{tmp}/step-bfloat16.json"])]),
        compiled=lambda: dict(name="compiled", files=["step.json"], json=["compiled.json"], argv=[
            child_command(["step", "--device", "cuda", "--dtype", "bfloat16", "--tables", "compiled", "--batch", "64",
                           "--num-prompts", "10", "--repeats", "10", "--warmup", "3",
                           "--json", "{tmp}/compiled.json"])]),
        table=lambda: dict(name="table", files=["bench.json", "bench.csv", "bench.png"], argv=child_command(
            ["--device", "cuda", "--batch-size", "64", "--num-prompts", "10,100", "--dtype", "fp32,bf16",
             "--methods", ",".join(m for m in bench_methods() if with_compile or m != "lspt-compile"),
             "--output", str(out)])),
        # The segmentation step in the paper's appendix A.1 setting (ViT-B/16, 512 px crops, Np 100: 1125
        # tokens; batch 16, the recipe's, on one GPU), 5 rounds to fit its cap; its bench files in DIR/segmentation/.
        segmentation=lambda: dict(name="segmentation", files=["segmentation/bench.json", "segmentation/bench.csv",
                                                              "segmentation/bench.png"], argv=child_command(
            ["--task", "segmentation", "--device", "cuda", "--batch-size", "16", "--num-prompts", "100",
             "--img-size", "512", "--dtype", "fp32,bf16", "--methods", "vpt-deep,gapt,lspt-fused", "--repeats", "5",
             "--output", str(out / "segmentation")])),
        # Multi-task serving: 10 (K, batch) settings x 3 methods, mixed and loop, 10 rounds each (about a
        # minute on an H100-class GPU); every setting is written as it is measured, so a cut keeps the rest.
        serve=lambda: dict(name="serve", files=["serve/serve.json", "serve/serve.csv"], argv=child_command(
            ["serve", "--device", "cuda", "--tasks", "64,16,4,1", "--batch-sizes", "1,4,16,64", "--dtype", "bf16",
             "--methods", "lspt-fused,gapt,vpt-deep", "--repeats", "10", "--warmup", "3",
             "--output", str(out / "serve")])),
    )
    return [plans[name]() for name in parts]


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


def _parse(argv: list[str]):
    args = build_parser().parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in args.parts if p not in PARTS]
    if bad or not args.parts:
        return args, f"--parts: unknown {', '.join(bad) or '(none given)'} (choose from {', '.join(PARTS)})"
    if args.budget_s <= 0:
        return args, "--budget-s must be > 0"
    return args, None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, error = _parse(argv)
    if error:
        print(f"lspt-bench gpu-suite: error: {error}", file=sys.stderr)
        return 2
    out = Path(args.output).expanduser()
    parts = plan(out, args.with_compile, args.parts)
    if args.dry_run:
        print(f"lspt-bench gpu-suite would run, within {args.budget_s:.0f} s, writing {len(FILES)} files into "
              f"{out} ({', '.join(FILES)}):")
        print(_describe(parts))
        print("- summary: every target of bench.json, step.json and serve/serve.json with its verdict, the compiled "
              "encoders and the test counts -> summary.json; everything printed -> gpu-suite.log")
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
        log = open(out / "gpu-suite.log", "a")
    except OSError as exc:
        print(f"lspt-bench gpu-suite: error: cannot write to --output {str(out)!r}: {exc}", file=sys.stderr)
        return 2
    with log:
        return _run(parts, out, log, args, argv, torch)


def _merge_step_json(out: Path, part: str, runs: list[dict]) -> None:
    """step.json holds the runs of the step and compiled parts; a part's new runs replace its old ones."""
    try:
        old = json.loads((out / "step.json").read_text()).get("runs", [])
    except (OSError, ValueError):
        old = []
    merged = [r for r in old if r.get("part") != part] + [dict(r, part=part) for r in runs]
    (out / "step.json").write_text(json.dumps(dict(runs=merged), indent=1, default=str))


def _previous_status(out: Path) -> dict:
    try:
        return dict(json.loads((out / "summary.json").read_text()).get("parts", {}))
    except (OSError, ValueError):
        return {}


def _run(parts, out: Path, log, args, argv, torch) -> int:
    from .env import command_line, device_name, load_line, loadavg

    def say(text: str) -> None:
        print(text, flush=True)
        log.write(text + "\n")
        log.flush()

    t0 = time.perf_counter()
    deadline = t0 + args.budget_s
    command = command_line(argv, sub="gpu-suite")
    say(f"\n{command}\ndevice: {device_name('cuda')}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
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
            if part.get("json"):
                runs = [json.loads((Path(tmp) / f).read_text()) for f in part["json"] if (Path(tmp) / f).exists()]
                _merge_step_json(out, part["name"], runs)
    summary = summarize_dir(out, {**_previous_status(out), **status}, command)
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
    """Every target of DIR/bench.json, DIR/step.json and DIR/serve/serve.json, the compiled encoders' LSPT /
    GaPT ratios, and the counts of the GPU tests and the sanitizer runs."""
    summary = dict(command=command, parts=status, targets=[], compiled=[],
                   tests=_junit_counts(out / "gpu-tests.xml"), sanitizer=_junit_counts(out / "sanitizer.xml"))
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
            for r in run.get("compiled", []):
                if r.get("method") == "lspt-fused" and r.get("train_ms_over_gapt") is not None:
                    summary["compiled"].append({k: r.get(k) for k in ("mode", "train_ms_over_gapt",
                                                                       "train_ms_over_gapt_q1", "train_ms_over_gapt_q3",
                                                                       "infer_ms_over_gapt")})
    except (OSError, ValueError):
        pass
    try:
        for t in json.loads((out / "serve" / "serve.json").read_text()).get("targets", []):
            summary["targets"].append(dict(source="serve", **t))
    except (OSError, ValueError):
        pass
    return summary


def _counts(name: str, c: dict | None) -> str:
    return f"{name}: " + ("no report" if not c else f"{c['tests']} run, {c['failures']} failed, {c['errors']} "
                                                    f"errors, {c['skipped']} skipped")


def format_summary(summary: dict) -> str:
    lines = ["== summary", "parts: " + ", ".join(f"{k} {v}" for k, v in summary["parts"].items()),
             _counts("GPU tests", summary.get("tests")), _counts("compute-sanitizer", summary.get("sanitizer"))]
    for c in summary.get("compiled", []):
        lines.append(f"  compiled encoders, {c['mode']}: LSPT-fused / GaPT train {c['train_ms_over_gapt']:.3f} "
                     f"[{c['train_ms_over_gapt_q1']:.3f}-{c['train_ms_over_gapt_q3']:.3f}], inference "
                     + ("-" if c.get("infer_ms_over_gapt") is None else f"{c['infer_ms_over_gapt']:.3f}"))
    counts: dict[str, int] = {}
    for t in summary["targets"]:
        counts[t["verdict"]] = counts.get(t["verdict"], 0) + 1
        if t["source"] == "table":
            where = f"B{t.get('batch_size')} Np{t.get('num_prompts')} {t.get('dtype')}"
        elif t["source"] == "serve":
            where = f"{t.get('method')}, K{t.get('tasks')} B{t.get('batch_size')} {t.get('dtype')}"
        elif "batch" in t:
            where = f"{t.get('backend')}, B{t.get('batch')} Np{t.get('num_prompts')} {t.get('dtype')}"
        else:
            where = t.get("backend")
        med = t.get("median")
        val = t.get("detail") or ("n/a" if med is None else f"{med:.3f} [{t['q1']:.3f}-{t['q3']:.3f}]")
        lines.append(f"  [{t['verdict']}] {t['target']} ({where}): {val}")
    lines.append("targets: " + (", ".join(f"{n} {v}" for v, n in sorted(counts.items())) or "none measured"))
    return "\n".join(lines)
