"""Helpers of the lspt-sweep tests: tiny benchmark-layout data roots, the fake trainer, the CLI in a subprocess."""
import json
import os
import subprocess
import sys
from pathlib import Path

from synth_data import write_dataset

TESTS = Path(__file__).resolve().parent
FAKE_TRAINER = f"{sys.executable} {TESTS / 'fake_lspt_train.py'}"
# A tiny ViT for the runs that really train (options after --).
TINY_TRAIN = ["--img-size", "32", "--model-kwargs", "patch_size=8", "embed_dim=32", "depth=2", "num_heads=2",
              "--workers", "0", "--warmup-epochs", "0", "--batch-size", "16", "--device", "cpu"]


def make_root(root, layout: str, folders: dict) -> Path:
    """A --data-root with one tiny synthetic task per folder (folder name -> seed of its images); layout "vtab"
    writes VTAB-1k lists (train800.txt ...), "fgvc" the FGVC json files."""
    root = Path(root)
    for folder, seed in folders.items():
        write_dataset(root / folder, layout, size=32, per_class={"train": 4, "val": 3, "test": 3}, seed=seed)
    return root


def sweep_args(data_root, output, *extra, tasks="caltech101,dtd", methods="lspt,gapt", protocol="vpt-vtab",
               lr_grid="0.5,2", wd_grid="0", seeds="42,44"):
    """`lspt-sweep run` options; `extra` may hold `--` and lspt-train options."""
    args = ["run", "--data-root", str(data_root), "--tasks", tasks, "--methods", methods, "--model",
            "vit_tiny_patch16_224", "--protocol", protocol, "--output", str(output)]
    for opt, value in (("--lr-grid", lr_grid), ("--wd-grid", wd_grid), ("--seeds", seeds)):
        if value is not None:
            args += [opt, value]
    return args + list(extra)


def cli_env(**env) -> dict:
    """The environment of a `python -m lspt_kernels.sweep.cli` subprocess: this test session's import path."""
    path = os.pathsep.join(p for p in sys.path if p)
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", **env)


def cli_command(args) -> list[str]:
    return [sys.executable, "-m", "lspt_kernels.sweep.cli", *map(str, args)]


def invocations(folder) -> list[dict]:
    """The fake trainer's record of every time it was started on this run."""
    path = Path(folder) / "fake_invocations.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def run_folders(sweep) -> list[Path]:
    return sorted(p.parent for p in Path(sweep).glob("runs/*/*/*/*/sweep.lock"))


def snapshot(folders) -> dict:
    """Every file of these run folders with its bytes and mtime (to show a rerun left them untouched)."""
    return {str(f): (f.read_bytes(), f.stat().st_mtime_ns) for d in folders for f in sorted(Path(d).iterdir())
            if f.is_file()}


def start_cli(args, **env) -> subprocess.Popen:
    return subprocess.Popen(cli_command(args), env=cli_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
