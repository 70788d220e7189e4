"""`lspt-bench`: training and inference cost of LSPT against GaPT, VPT and the linear probe.

The paper's table C.4 (max memory, train time per batch, inference time per batch), measured side by
side in one run for every method on one frozen timm ViT with random weights, plus the trainable
parameters and the "Total Params" ratio, and LSPT's extra train time over VPT-deep next to the floor
of METHOD.md's cost model (Np / (2 T)).

    lspt-bench                                   # the embedded default (see DEFAULTS)
    lspt-bench --model vit_small_patch16_224 --batch-size 8 --num-prompts 10,100 --output out/
    python -m lspt_kernels.bench --help

What is measured, per method and setting (model, batch, Np, dtype):

- train time per batch: `zero_grad; forward; cross-entropy over random labels; backward;
  SGD(momentum 0.9).step` over `model.trainable_parameters()`; inference time per batch: a
  `torch.no_grad()` forward. Medians of `--repeats` runs after `--warmup` runs. On a GPU each run is
  timed with CUDA events (and synchronised); on the CPU with time.perf_counter.
- max memory. GPU: torch.cuda.max_memory_allocated() over the timed train steps, after
  reset_peak_memory_stats() (everything allocated: weights, gradients, optimizer state,
  activations - the figure the paper reports). CPU: each method runs in a fresh subprocess;
  memory = peak RSS during the timed train steps (VmHWM, reset through /proc/self/clear_refs after
  the warm-up) minus that process's RSS after importing torch/timm/lspt_kernels and loading the
  fused backend, before the ViT is built. So it counts what the GPU figure counts (weights,
  gradients, optimizer state, activations) plus the allocator's retained pages, and not the
  interpreter and libraries. For the torch.compile row it also counts the compiler's resident
  state. `step_memory_gb` (peak minus the RSS just before the timed steps) is recorded as well.
- compile time (torch.compile row): the first train call plus the first inference call, minus one
  steady-state call of each, with the inductor/AOTAutograd cache hits recorded (a warm cache from an
  earlier run makes it much shorter).
- trainable parameters and "Total Params" = (backbone + trainable) / backbone (parameter_report()).

Every row is compared with GaPT's (same setting) and LSPT's extra train / inference time over
VPT-deep is printed next to the cost-model floor Np/(2T) (train) and Np/(3T) (forward only).
Files: bench.json (meta + rows + targets), bench.csv (one row per method and setting, with the
device name, versions and command line) and bench.png; the JSON and CSV are rewritten after every
method, so an interrupted or failing run keeps what it measured. Bad input (unknown or non-ViT model, values,
unwritable --output) stops before measuring with "lspt-bench: error: ..." and status 2; a method
that runs out of memory or fails is reported in its row and the run goes on (status 1 at the end);
Ctrl-C keeps the rows measured so far (status 130).

Methods: linear (probe), vpt-shallow, vpt-deep, gapt, lspt-reference (the pure-PyTorch step),
lspt-fused (backend "auto" resolved for the device: the row names the backend actually used and says
so when no fused backend is available), lspt-compile (torch.compile(model) of the fused model).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import difflib
import gc
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("linear", "vpt-shallow", "vpt-deep", "gapt", "lspt-reference", "lspt-fused", "lspt-compile")
LABELS = {
    "linear": "Linear probe",
    "vpt-shallow": "VPT-Shallow",
    "vpt-deep": "VPT-Deep",
    "gapt": "GaPT",
    "lspt-reference": "LSPT (reference)",
    "lspt-fused": "LSPT (fused)",
    "lspt-compile": "LSPT (fused, compiled)",
}
DTYPES = ("fp32", "bf16", "fp16")
DEFAULT_MODEL = "vit_base_patch16_224"

# The embedded default run. CPU: sized to finish in under 5 minutes on a 2-core machine.
# GPU: the paper's setting (batch 64, Np 10 and 100, fp32 and bf16 autocast).
DEFAULTS = {
    "cpu": dict(batch_size="4", num_prompts="10", dtype="fp32", repeats=3, warmup=1),
    "cuda": dict(batch_size="64", num_prompts="10,100", dtype="fp32,bf16", repeats=20, warmup=5),
}

# Targets (CPU) the issue asks to report.
TARGET_TIME_SLACK = 0.02      # LSPT-fused train time <= VPT-deep * (1 + Np/(2T) + 2 %)
TARGET_MEMORY_SLACK = 0.02    # LSPT-fused peak memory <= GaPT * (1 + 2 %)


class BenchError(Exception):
    """A bad input: the message is printed as is and the command exits with status 2."""


# ------------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------------
def _parse_list(text: str, kind, name: str) -> list:
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = kind(part)
        except ValueError:
            raise BenchError(f"--{name}: {part!r} is not a valid {kind.__name__}") from None
        out.append(value)
    if not out:
        raise BenchError(f"--{name}: give at least one value")
    return out


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _current_rss_bytes() -> int | None:
    kb = _proc_status_kb("VmRSS")
    return None if kb is None else kb * 1024


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0). False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int | None:
    kb = _proc_status_kb("VmHWM")
    if kb is not None:
        return kb * 1024
    try:
        import resource
        ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return ru if sys.platform == "darwin" else ru * 1024
    except Exception:  # pragma: no cover
        return None


def _is_oom(exc: BaseException) -> bool:
    import torch
    if isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return ("out of memory" in text.lower() or "can't allocate memory" in text
            or "DefaultCPUAllocator" in text)


def device_name(device: str) -> str:
    import torch
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def environment(device: str, argv: list[str] | None) -> dict:
    import timm
    import torch
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    prog = "lspt-bench" if prog.startswith("lspt-bench") else "python -m lspt_kernels.bench"
    command = prog + ("" if not argv else " " + shlex.join(argv))
    return dict(device=device, device_name=device_name(device), torch=torch.__version__,
                triton=triton_version, timm=timm.__version__, python=platform.python_version(),
                platform=platform.platform(), cuda=torch.version.cuda, command=command,
                threads=torch.get_num_threads(), float32_matmul_precision=torch.get_float32_matmul_precision(),
                time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))


# ------------------------------------------------------------------------------------------------
# Model checks (done once in the parent, before anything is measured)
# ------------------------------------------------------------------------------------------------
def parse_model_args(items: list[str]) -> dict:
    """["depth=2", "global_pool=avg"] -> {"depth": 2, "global_pool": "avg"} (Python literals, else str)."""
    import ast
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise BenchError(f"--model-arg must be KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def check_model(name: str, img_size: int | None = None, model_kwargs: dict | None = None) -> dict:
    """Raise BenchError for an unknown or non-ViT timm model; return its shape facts."""
    import timm
    import torch
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise BenchError(f"unknown timm model {name!r}{hint} (list ViTs with "
                         "python -c \"import timm; print(timm.list_models('vit_*'))\")")
    kwargs = dict(pretrained=False, **(model_kwargs or {}), num_classes=0)
    if img_size is not None:
        kwargs["img_size"] = img_size
    try:
        with torch.device("meta"):
            vit = timm.create_model(name, **kwargs)
    except Exception as exc:
        raise BenchError(f"cannot build timm model {name!r}"
                         f"{'' if not model_kwargs and img_size is None else f' with {kwargs}'}: "
                         f"{type(exc).__name__}: {exc}") from None
    from timm.models.vision_transformer import VisionTransformer
    if not isinstance(vit, VisionTransformer):
        raise BenchError(f"{name!r} is a {type(vit).__module__}.{type(vit).__name__}, not a timm "
                         "VisionTransformer: prompt tuning here needs a ViT (e.g. "
                         "vit_base_patch16_224, vit_small_patch16_224, deit_base_patch16_224)")
    img = vit.patch_embed.img_size
    return dict(num_patches=vit.patch_embed.num_patches, prefix=vit.num_prefix_tokens,
                embed_dim=vit.embed_dim, depth=len(vit.blocks),
                img_size=img[0] if isinstance(img, (tuple, list)) else img)


def check_output_dir(path: Path) -> Path:
    """Create the output directory and make sure a file can be written there (else BenchError)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".lspt-bench-", delete=True):
            pass
    except OSError as exc:
        raise BenchError(f"cannot write to output directory {str(path)!r}: "
                         f"{exc.strerror or exc} (choose another with --output DIR)") from None
    return path


# ------------------------------------------------------------------------------------------------
# One measurement (one method, one setting), in this process
# ------------------------------------------------------------------------------------------------
def build_vit(spec: dict):
    """A fresh random timm ViT (seeded) without a classifier head."""
    import timm
    import torch
    torch.manual_seed(spec.get("seed", 0))
    kwargs = dict(pretrained=False, **spec.get("model_kwargs", {}), num_classes=0)
    if spec.get("img_size") is not None:
        kwargs["img_size"] = spec["img_size"]
    return timm.create_model(spec["model"], **kwargs)


def build_encoder(method: str, spec: dict, vit=None):
    """The encoder for `method` around `vit` (default: a fresh random timm ViT, seeded). The
    encoders never change the frozen backbone, so several can share one."""
    import torch
    from . import GaPTEncoder, LinearProbe, LSPTEncoder, VPTEncoder
    if vit is None:
        vit = build_vit(spec)
    torch.manual_seed(spec.get("seed", 0) + 1)
    n_p, n_c = spec["num_prompts"], spec["num_classes"]
    if method == "linear":
        return LinearProbe(vit, n_c)
    if method in ("vpt-shallow", "vpt-deep"):
        return VPTEncoder(vit, n_p, n_c, deep=method == "vpt-deep")
    if method == "gapt":
        return GaPTEncoder(vit, n_p, n_c)
    if method == "lspt-reference":
        return LSPTEncoder(vit, n_p, n_c, backend="reference")
    if method in ("lspt-fused", "lspt-compile"):
        return LSPTEncoder(vit, n_p, n_c, backend=spec["fused_backend"])
    raise ValueError(method)


def fused_backend(device: str) -> tuple[str, str | None]:
    """The backend "auto" resolves to on `device`, and why no fused one is used (or None)."""
    import warnings

    import torch
    from .ops import resolve_backend, unavailable_reason
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        name = resolve_backend("auto", torch.device(device))
    name = "reference" if name == "eager" else name   # ops calls the plain-PyTorch step "eager"
    if name != "reference":
        return name, None
    order = ("cuda", "triton") if device.startswith("cuda") else ("cpu",)
    return name, "no fused backend: " + "; ".join(f"{n}: {_short(unavailable_reason(n))}" for n in order)


def _short(reason: str | None, limit: int = 300) -> str:
    """The first line of a (possibly long, compiler-log) reason, plus its first 'error:' line."""
    lines = [ln.strip() for ln in str(reason).splitlines() if ln.strip()]
    if not lines:
        return str(reason)
    out = lines[0] if len(lines[0]) <= 120 else lines[0][:117] + "..."
    err = next((ln for ln in lines[1:] if "error:" in ln.lower()), None)
    if err:
        out += " ... " + err
    return out if len(out) <= limit else out[:limit - 3] + "..."


class MemoryProbe:
    """Peak memory over a region of code, the way this benchmark reports it.

    GPU: peak = torch.cuda.max_memory_allocated() over the region (reset at `start`), i.e. all the
    allocated memory, weights included. CPU: peak = the process's peak RSS over the region (VmHWM,
    reset at `start` through /proc/self/clear_refs) minus its RSS when the probe was made (make it
    before the model is built). `step_memory_gb` is the peak minus the usage at `start`."""

    def __init__(self, device: str):
        import torch
        self.torch, self.cuda, self.device = torch, device.startswith("cuda"), device
        self.base = self._current()
        self.pre = None
        self.reset_ok = True

    def _current(self):
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
            return self.torch.cuda.memory_allocated(self.device)
        return _current_rss_bytes()

    def start(self) -> None:
        self.pre = self._current()
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.reset_ok = _reset_peak_rss()

    def stop(self) -> dict:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
            peak = self.torch.cuda.max_memory_allocated(self.device)
            return dict(peak_memory_gb=peak / 1e9, step_memory_gb=(peak - self.pre) / 1e9,
                        memory_kind="torch.cuda.max_memory_allocated")
        peak = _peak_rss_bytes()
        if peak is None or self.base is None:
            return dict(peak_memory_gb=None, step_memory_gb=None, memory_kind="unavailable (no /proc)")
        return dict(peak_memory_gb=(peak - self.base) / 1e9,
                    step_memory_gb=None if self.pre is None else (peak - self.pre) / 1e9,
                    memory_kind="peak RSS - RSS before the model was built"
                                + ("" if self.reset_ok else " (peak not resettable: since process start)"))


class _Timer:
    def __init__(self, device: str):
        import torch
        self.cuda = device.startswith("cuda")
        self.torch = torch

    def __call__(self, fn) -> float:
        if self.cuda:
            torch = self.torch
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000.0
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def make_step_fns(model, spec: dict, device: str, compiled: bool = False, compile_backend="inductor"):
    """(train_step, infer_step, logits_holder): one training step and one no-grad forward."""
    import torch
    import torch.nn.functional as F
    dtype = spec["dtype"]
    gen = torch.Generator().manual_seed(spec.get("seed", 0) + 1)
    img = model.vit.patch_embed.img_size
    images = torch.randn(spec["batch_size"], 3, img[0], img[1], generator=gen).to(device)
    labels = torch.randint(0, spec["num_classes"], (spec["batch_size"],), generator=gen).to(device)
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.01, momentum=0.9)
    run = torch.compile(model, backend=compile_backend) if compiled else model
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)

    def autocast():
        if low is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=low)

    out = {}

    def train_step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            logits = run(images)
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        opt.step()
        out["loss"] = loss.detach()

    def infer_step():
        with torch.no_grad(), autocast():
            out["logits"] = run(images)

    return train_step, infer_step, out


def _compile_cache_counters() -> dict:
    """Inductor / AOTAutograd cache hits and misses so far (warm caches make compiling much faster)."""
    try:
        from torch._dynamo.utils import counters
        return {k: v for k, v in (("fxgraph_cache_hit", counters["inductor"].get("fxgraph_cache_hit", 0)),
                                  ("fxgraph_cache_miss", counters["inductor"].get("fxgraph_cache_miss", 0)),
                                  ("autograd_cache_hit", counters["aot_autograd"].get("autograd_cache_hit", 0)),
                                  ("autograd_cache_miss", counters["aot_autograd"].get("autograd_cache_miss", 0)))}
    except Exception:
        return {}


def measure(method: str, spec: dict) -> dict:
    """Measure one method in one setting in this process; returns the row (without ratios)."""
    import torch
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = spec["device"]
    is_cuda = device.startswith("cuda")
    row = dict(method=method, label=LABELS[method], model=spec["model"], device=device,
               dtype=spec["dtype"], batch_size=spec["batch_size"], num_prompts=spec["num_prompts"],
               status="ok", error=None, backend=None, compiled=method == "lspt-compile",
               compile_backend=spec.get("compile_backend") if method == "lspt-compile" else None,
               threads=torch.get_num_threads())
    if method in ("lspt-fused", "lspt-compile"):
        row["backend"] = spec["fused_backend"]
        if spec.get("fused_note"):
            row["note"] = spec["fused_note"]
    elif method == "lspt-reference":
        row["backend"] = "reference"
    timer = _Timer(device)
    state = {}
    try:
        if is_cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        probe = MemoryProbe(device)
        model = build_encoder(method, spec).to(device)
        state["model"] = model
        rep = model.parameter_report()
        k, n = model.num_prefix_tokens, model.vit.patch_embed.num_patches
        row.update(trainable_params=rep["trainable"], backbone_params=rep["backbone"],
                   total_params_ratio=rep["total_params_ratio"], tokens=k + model.num_prompts + n,
                   img_size=model.vit.patch_embed.img_size[0], depth=model.depth,
                   embed_dim=model.embed_dim)
        train_step, infer_step, out = make_step_fns(model, spec, device, compiled=row["compiled"],
                                                    compile_backend=spec.get("compile_backend", "inductor"))
        state["fns"] = (train_step, infer_step, out)
        model.train()
        first_train = timer(train_step)                    # compiles the training graph if compiled
        for _ in range(max(0, spec["warmup"] - 1)):
            timer(train_step)
        # --- memory over the timed train steps ---
        gc.collect()
        probe.start()
        train_times = [timer(train_step) for _ in range(spec["repeats"])]
        row.update(probe.stop())
        loss = float(out["loss"])
        # --- inference ---
        model.eval()
        first_infer = timer(infer_step)                    # compiles the inference graph if compiled
        for _ in range(max(0, spec["warmup"] - 1)):
            timer(infer_step)
        infer_times = [timer(infer_step) for _ in range(spec["repeats"])]
        logits = out["logits"]
        row.update(train_s=statistics.median(train_times), infer_s=statistics.median(infer_times),
                   train_s_min=min(train_times), infer_s_min=min(infer_times),
                   train_s_all=train_times, infer_s_all=infer_times, loss=loss,
                   logits_shape=list(logits.shape), logits_finite=bool(torch.isfinite(logits).all()))
        if row["compiled"]:
            row["compile_s"] = max(0.0, first_train - row["train_s"]) + max(0.0, first_infer - row["infer_s"])
            row["compile_cache"] = _compile_cache_counters()
        if not (math.isfinite(loss) and row["logits_finite"]):
            row["note"] = (row.get("note", "") + "; " if row.get("note") else "") + "non-finite loss or logits"
    except Exception as exc:  # report in the row and go on with the next method
        row["status"] = "oom" if _is_oom(exc) else "error"
        row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:500]
        exc.__traceback__ = None
    finally:
        state.clear()
        gc.collect()
        if row["compiled"]:
            try:
                torch._dynamo.reset()
            except Exception:
                pass
        if is_cuda:
            torch.cuda.empty_cache()
    return row


def measure_interleaved(methods: list[str], spec: dict) -> dict[str, dict]:
    """Train and inference times with the methods alternating, round by round, in this process.

    All encoders share one frozen backbone (so memory stays about one model); after the warm-up,
    round r times method 1, 2, ... in turn, so every method sees the same share of whatever else
    the machine is doing. Returns {method: {train_s_interleaved, infer_s_interleaved, ...}} for the
    methods that ran ({"interleaved_error": ...} for one that failed)."""
    import torch
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = spec["device"]
    timer = _Timer(device)
    out: dict[str, dict] = {}
    fns: dict[str, tuple] = {}
    try:
        vit = build_vit(spec).to(device)
        for m in methods:
            try:
                model = build_encoder(m, spec, vit=vit).to(device)
                train_step, infer_step, _ = make_step_fns(model, spec, device, compiled=m == "lspt-compile",
                                                          compile_backend=spec.get("compile_backend", "inductor"))
                fns[m] = (model, train_step, infer_step)
                out[m] = dict(train_s_interleaved_all=[], infer_s_interleaved_all=[])
            except Exception as exc:
                out[m] = dict(interleaved_error=f"{type(exc).__name__}: {str(exc).strip()[:300]}")
        for kind in ("train", "infer"):
            for m, (model, train_step, infer_step) in list(fns.items()):
                model.train(kind == "train")
                step = train_step if kind == "train" else infer_step
                try:
                    for _ in range(spec["warmup"]):
                        timer(step)
                except Exception as exc:
                    out[m] = dict(interleaved_error=f"{type(exc).__name__}: {str(exc).strip()[:300]}")
                    del fns[m]
            for _ in range(spec["repeats"]):
                for m, (model, train_step, infer_step) in list(fns.items()):
                    try:
                        out[m][f"{kind}_s_interleaved_all"].append(timer(train_step if kind == "train" else infer_step))
                    except Exception as exc:
                        out[m] = dict(interleaved_error=f"{type(exc).__name__}: {str(exc).strip()[:300]}")
                        del fns[m]
        for m in fns:
            for kind in ("train", "infer"):
                out[m][f"{kind}_s_interleaved"] = statistics.median(out[m][f"{kind}_s_interleaved_all"])
    finally:
        fns.clear()
        gc.collect()
        try:
            torch._dynamo.reset()
        except Exception:
            pass
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------------
# Fresh-subprocess measurement (CPU peak RSS)
# ------------------------------------------------------------------------------------------------
def _worker(spec_path: str, out_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    import timm  # noqa: F401  - imported before the baseline RSS, like the parent
    import torch  # noqa: F401
    if spec["method"] in ("lspt-fused", "lspt-compile") and spec["fused_backend"] != "reference":
        from .ops import resolve_backend
        resolve_backend(spec["fused_backend"], torch.device(spec["device"]))   # load it before the baseline
    row = measure(spec["method"], spec)
    Path(out_path).write_text(json.dumps(row))
    return 0


def measure_isolated(method: str, spec: dict) -> dict:
    """Run `measure` in a fresh Python process (so its peak RSS is this method's alone)."""
    spec = dict(spec, method=method)
    with tempfile.TemporaryDirectory(prefix="lspt-bench-") as tmp:
        out_path, spec_path = os.path.join(tmp, "row.json"), os.path.join(tmp, "spec.json")
        Path(spec_path).write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", "lspt_kernels.bench", "--_worker", spec_path, out_path]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode == 0 and os.path.exists(out_path):
            return json.loads(Path(out_path).read_text())
    row = dict(method=method, label=LABELS[method], model=spec["model"], device=spec["device"],
               dtype=spec["dtype"], batch_size=spec["batch_size"], num_prompts=spec["num_prompts"])
    tail = " | ".join(proc.stdout.strip().splitlines()[-3:])
    if proc.returncode in (-9, 137):
        row.update(status="oom", error="the measuring process was killed (SIGKILL): most likely out of "
                                         f"memory. {tail}".strip())
    else:
        row.update(status="error", error=f"the measuring process exited with status {proc.returncode}: "
                                         f"{tail}"[:800])
    return row


# ------------------------------------------------------------------------------------------------
# Comparisons, the table, the files
# ------------------------------------------------------------------------------------------------
def setting_key(row: dict) -> tuple:
    return (row["model"], row.get("img_size"), row["batch_size"], row["num_prompts"], row["dtype"])


def add_comparisons(rows: list[dict]) -> None:
    """Ratios to GaPT (same setting) and LSPT's extra time over VPT-deep with the cost-model floor."""
    by_setting: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_setting.setdefault((r["model"], r["batch_size"], r["num_prompts"], r["dtype"]), {})[r["method"]] = r
    for group in by_setting.values():
        gapt, vpt = group.get("gapt"), group.get("vpt-deep")
        for r in group.values():
            if r.get("status") != "ok":
                continue
            if gapt and gapt.get("status") == "ok":
                for key in ("peak_memory_gb", "train_s", "infer_s"):
                    if r.get(key) is not None and gapt.get(key):
                        r[f"{key}_vs_gapt"] = r[key] / gapt[key]
            if r["method"].startswith("lspt") and r.get("tokens"):
                T, n_p = r["tokens"], r["num_prompts"]
                r["floor_train_extra"] = n_p / (2 * T)          # METHOD.md: Np / (2T) of the backbone
                r["floor_infer_extra"] = n_p / (3 * T)          # forward only: 8 Np D^2 / 24 T D^2
                if vpt and vpt.get("status") == "ok":
                    r["train_extra_vs_vpt_deep"] = r["train_s"] / vpt["train_s"] - 1
                    r["infer_extra_vs_vpt_deep"] = r["infer_s"] / vpt["infer_s"] - 1
                if vpt and r.get("train_s_interleaved") and vpt.get("train_s_interleaved"):
                    r["train_extra_vs_vpt_deep_interleaved"] = r["train_s_interleaved"] / vpt["train_s_interleaved"] - 1
                    r["infer_extra_vs_vpt_deep_interleaved"] = r["infer_s_interleaved"] / vpt["infer_s_interleaved"] - 1


def evaluate_targets(rows: list[dict]) -> list[dict]:
    """The issue's targets, per setting, from the measured rows (misses included)."""
    out = []
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["batch_size"], r["num_prompts"], r["dtype"]), {})[r["method"]] = r
    for key, g in groups.items():
        fused, ref, vpt, gapt = (g.get(m) for m in ("lspt-fused", "lspt-reference", "vpt-deep", "gapt"))
        setting = dict(model=key[0], batch_size=key[1], num_prompts=key[2], dtype=key[3])
        if not fused or fused.get("status") != "ok":
            continue
        no_fused = fused.get("backend") == "reference"
        # Times: the interleaved pass when it ran (methods alternating in one process), else the rows'.
        inter = all(r and r.get("train_s_interleaved") for r in (fused, vpt, ref))
        key_t = "train_s_interleaved" if inter else "train_s"
        how = " [interleaved timing]" if inter else ""
        if vpt and vpt.get("status") == "ok":
            limit = vpt[key_t] * (1 + fused["floor_train_extra"] + TARGET_TIME_SLACK)
            out.append(dict(setting, target="LSPT-fused train step <= VPT-deep x (1 + Np/(2T) + 2%)",
                            measured=fused[key_t], limit=limit, met=fused[key_t] <= limit, timing=key_t,
                            detail=f"{100 * (fused[key_t] / vpt[key_t] - 1):+.1f}% over VPT-deep; floor "
                                   f"{100 * fused['floor_train_extra']:.1f}% + 2% = "
                                   f"{100 * (fused['floor_train_extra'] + TARGET_TIME_SLACK):.1f}%{how}",
                            fused_backend=fused.get("backend")))
        if gapt and gapt.get("status") == "ok" and fused.get("peak_memory_gb") and gapt.get("peak_memory_gb"):
            limit = gapt["peak_memory_gb"] * (1 + TARGET_MEMORY_SLACK)
            out.append(dict(setting, target="LSPT-fused peak memory <= GaPT x 1.02",
                            measured=fused["peak_memory_gb"], limit=limit,
                            met=fused["peak_memory_gb"] <= limit,
                            detail=f"{fused['peak_memory_gb']:.3f} GB vs GaPT {gapt['peak_memory_gb']:.3f} GB "
                                   f"({100 * (fused['peak_memory_gb'] / gapt['peak_memory_gb'] - 1):+.1f}%)",
                            fused_backend=fused.get("backend")))
        if ref and ref.get("status") == "ok":
            out.append(dict(setting, target="LSPT-fused train step faster than LSPT-reference",
                            measured=fused[key_t], limit=ref[key_t], timing=key_t,
                            met=fused[key_t] < ref[key_t],
                            detail=f"{fused[key_t]:.3f} s vs {ref[key_t]:.3f} s "
                                   f"({ref[key_t] / fused[key_t]:.2f}x){how}",
                            fused_backend=fused.get("backend")))
        if no_fused:
            for t in out:
                if t.get("fused_backend") == "reference":
                    t["detail"] += " [no fused backend here: the 'fused' row ran the reference step]"
    return out


def _fmt_count(n) -> str:
    if n is None:
        return "-"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(n)


def _fmt_val(r: dict, key: str, digits: int) -> str:
    v = r.get(key)
    if v is None:
        return "-"
    ratio = r.get(f"{key}_vs_gapt")
    return f"{v:.{digits}f}" + (f" ({ratio:.3f}x)" if ratio is not None else "")


def _row_label(r: dict) -> str:
    label = r.get("label") or LABELS.get(r["method"], r["method"])
    if r["method"] in ("lspt-fused", "lspt-compile") and r.get("backend"):
        label = label.replace("fused", f"fused: {r['backend']}" if r["backend"] != "reference"
                              else "fused: NONE, ran reference")
    return label


def format_table(rows: list[dict], meta: dict | None = None) -> str:
    """The paper's table C.4 layout, one block per setting, ratios to GaPT in parentheses."""
    lines = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["batch_size"], r["num_prompts"], r["dtype"]), []).append(r)
    width = max([len("Method")] + [len(_row_label(r)) for r in rows])
    head = (f"{'Method':<{width}} {'Total Params':>12} {'Trainable':>10} {'Max Memory (GB)':>18} "
            f"{'Training Time per Batch (s)':>28} {'Inference Time per Batch (s)':>29}")
    for (model, batch, n_p, dtype), group in groups.items():
        img = next((r.get("img_size") for r in group if r.get("img_size")), None)
        T = max((r.get("tokens") or 0 for r in group), default=0)   # k + Np + N (a prompted method's)
        dev = (meta or {}).get("device_name") or group[0].get("device_name") or group[0].get("device")
        lines.append(f"{model}, {img or '?'} px, batch {batch}, Np {n_p}, {dtype}, T = {T or '?'} tokens, "
                     f"on {dev}; ratios to GaPT in parentheses")
        lines.append(head)
        lines.append("-" * len(head))
        notes = []
        for r in group:
            label = _row_label(r)
            if r.get("status") != "ok":
                lines.append(f"{label:<{width}} {r.get('status', 'error').upper()}: {r.get('error')}")
                continue
            ratio = r.get("total_params_ratio")
            mem_digits = 3 if (r.get("peak_memory_gb") or 0) < 10 else 2
            lines.append(f"{label:<{width}} {(f'{ratio:.3f}x' if ratio else '-'):>12} "
                         f"{_fmt_count(r.get('trainable_params')):>10} "
                         f"{_fmt_val(r, 'peak_memory_gb', mem_digits):>18} {_fmt_val(r, 'train_s', 4):>28} "
                         f"{_fmt_val(r, 'infer_s', 4):>29}")
            if r.get("compile_s") is not None:
                cache = r.get("compile_cache") or {}
                hits = cache.get("fxgraph_cache_hit", 0) + cache.get("autograd_cache_hit", 0)
                warm = f" (compile caches: {hits} hits)" if hits else ""
                notes.append(f"  {label}: compile time {r['compile_s']:.1f} s{warm} (first train + first "
                             "inference call minus steady state)" + (
                                 "; its memory includes the compiler's resident state"
                                 if not r["device"].startswith("cuda") else ""))
            if r.get("note") and f"  {r['note']}" not in notes:
                notes.append(f"  {r['note']}")
        for r in group:
            if r.get("status") == "ok" and r.get("train_extra_vs_vpt_deep") is not None and not r.get("compiled"):
                notes.append(f"  {_row_label(r)} over VPT-Deep: train {100 * r['train_extra_vs_vpt_deep']:+.1f}% "
                             f"(cost-model floor Np/(2T) = {100 * r['floor_train_extra']:.1f}%), inference "
                             f"{100 * r['infer_extra_vs_vpt_deep']:+.1f}% (floor Np/(3T) = "
                             f"{100 * r['floor_infer_extra']:.1f}%)"
                             + (f"; interleaved: train {100 * r['train_extra_vs_vpt_deep_interleaved']:+.1f}%, "
                                f"inference {100 * r['infer_extra_vs_vpt_deep_interleaved']:+.1f}%"
                                if r.get("train_extra_vs_vpt_deep_interleaved") is not None else ""))
        inter = [r for r in group if r.get("train_s_interleaved")]
        if inter:
            notes.append("  interleaved timing (one process, shared backbone, methods alternating round by round), "
                         "median train / inference s:")
            notes.extend(f"    {_row_label(r):<{width}} {r['train_s_interleaved']:.4f} / {r['infer_s_interleaved']:.4f}"
                         for r in inter)
        for r in group:
            if r.get("interleaved_error"):
                notes.append(f"  {_row_label(r)}: interleaved timing failed: {r['interleaved_error']}")
        lines.extend(notes)
        lines.append("")
    if rows and not any(r["method"] == "gapt" and r.get("status") == "ok" for r in rows):
        lines.append("(no GaPT row: ratios to GaPT omitted)")
    return "\n".join(lines).rstrip() + "\n"


CSV_FIELDS = ("method", "label", "status", "error", "model", "img_size", "tokens", "batch_size", "num_prompts",
              "dtype", "device", "device_name", "backend", "compiled", "compile_backend", "trainable_params",
              "backbone_params", "total_params_ratio", "peak_memory_gb", "peak_memory_gb_vs_gapt",
              "step_memory_gb", "memory_kind", "train_s", "train_s_vs_gapt", "infer_s", "infer_s_vs_gapt",
              "compile_s", "train_s_min", "infer_s_min", "train_s_interleaved", "infer_s_interleaved",
              "train_extra_vs_vpt_deep_interleaved", "train_extra_vs_vpt_deep", "floor_train_extra", "infer_extra_vs_vpt_deep",
              "floor_infer_extra", "repeats", "warmup", "threads", "note", "torch", "triton", "timm", "python",
              "command", "time")


def write_results(rows: list[dict], meta: dict, outdir: Path, plot: bool = True) -> list[Path]:
    """bench.json, bench.csv and (plot=True) bench.png under outdir."""
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
            w.writerow({**{k: meta.get(k) for k in ("device_name", "torch", "triton", "timm", "python",
                                                       "command", "time", "repeats", "warmup")}, **r})
    paths.append(cs)
    if plot:
        png = outdir / "bench.png"
        plot_rows(rows, png, title=f"{meta.get('model', '')} on {meta.get('device_name', '')}")
        paths.append(png)
    return paths


PANELS = (("peak_memory_gb", "max memory (GB)"), ("train_s", "train time / batch (s)"),
          ("infer_s", "inference time / batch (s)"))


def plot_rows(rows: list[dict], path, title: str = "", panels=PANELS) -> Path:
    """Grouped bars: max memory, train time and inference time per method, one bar per setting.

    `panels` is a sequence of (row key, axis title); rows need "method", "batch_size",
    "num_prompts", "dtype" and those keys (None or missing: no bar)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status", "ok") == "ok"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    settings = list(dict.fromkeys(_setting_label(r) for r in ok)) or ["-"]
    fig, axes = plt.subplots(1, len(panels), figsize=(max(10, 0.6 * len(methods) * len(panels) + 2), 5))
    axes = list(axes) if len(panels) > 1 else [axes]
    labels = [_row_label(next(r for r in rows if r["method"] == m)) if m in LABELS else m for m in methods]
    width = 0.8 / max(1, len(settings))
    for ax, (key, name) in zip(axes, panels):
        for j, s in enumerate(settings):
            xs, ys = [], []
            for i, m in enumerate(methods):
                r = next((r for r in ok if r["method"] == m and _setting_label(r) == s), None)
                if r is not None and r.get(key) is not None:
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(r[key])
            bars = ax.bar(xs, ys, width=width, label=s)
            if len(settings) <= 2:
                ax.bar_label(bars, fmt="%.3g", fontsize=6, padding=1)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
        ax.set_title(name)
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.18)                     # headroom for the bar labels and the legend
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _setting_label(r: dict) -> str:
    return f"B{r['batch_size']} Np{r['num_prompts']} {r['dtype']}"


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lspt-bench",
        description="Max memory, train and inference time per batch of LSPT vs GaPT, VPT and the linear "
                    "probe on a frozen timm ViT with random weights (the paper's table C.4). With no "
                    "arguments: ViT-B/16 at 224 px; on a GPU the paper's setting (batch 64, Np 10 and 100, "
                    "fp32 and bf16 autocast), on the CPU a setting that finishes in a few minutes "
                    f"(batch {DEFAULTS['cpu']['batch_size']}, Np {DEFAULTS['cpu']['num_prompts']}, fp32).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="any timm VisionTransformer name")
    p.add_argument("--batch-size", default=None, help="batch size(s), comma-separated "
                   f"(default: {DEFAULTS['cuda']['batch_size']} on a GPU, {DEFAULTS['cpu']['batch_size']} on the CPU)")
    p.add_argument("--num-prompts", default=None, help="Np value(s), comma-separated "
                   f"(default: {DEFAULTS['cuda']['num_prompts']} on a GPU, {DEFAULTS['cpu']['num_prompts']} on the CPU)")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (autocast), comma-separated "
                   f"(default: {DEFAULTS['cuda']['dtype']} on a GPU, {DEFAULTS['cpu']['dtype']} on the CPU)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--methods", default="all", help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (median reported; "
                   f"default {DEFAULTS['cuda']['repeats']} on a GPU, {DEFAULTS['cpu']['repeats']} on the CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default "
                   f"{DEFAULTS['cuda']['warmup']} on a GPU, {DEFAULTS['cpu']['warmup']} on the CPU)")
    p.add_argument("--img-size", type=int, default=None, help="image size (default: the model's)")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra keyword for timm.create_model, repeatable (e.g. depth=2, reg_tokens=4)")
    p.add_argument("--num-classes", type=int, default=200, help="classes of the linear head")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the lspt-compile row")
    p.add_argument("--output", default="lspt-bench-results", help="directory for bench.json, bench.csv, bench.png")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--interleave", action="store_true",
                   help="after the per-method measurements, time all methods again in one process with a shared "
                        "backbone, alternating round by round (robust to other load on the machine); the targets "
                        "then use these times")
    p.add_argument("--in-process", action="store_true",
                   help="CPU: measure in this process instead of a fresh subprocess per method (faster; the "
                        "peak RSS then includes what earlier methods left behind)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (torch.set_num_threads; default: torch's, one per core)")
    p.add_argument("--seed", type=int, default=0)
    return p


def _resolve_device(name: str) -> str:
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BenchError(f"--device {name}: no CUDA device is visible to torch ({torch.__version__}, "
                             f"CUDA build {torch.version.cuda}); use --device cpu")
        idx = name.split(":", 1)[1] if ":" in name else "0"
        if not idx.isdigit() or int(idx) >= torch.cuda.device_count():
            raise BenchError(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s)")
        return f"cuda:{idx}"
    if name != "cpu":
        raise BenchError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return "cpu"


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else list(argv)
    if args_list[:1] == ["--_worker"]:
        return _worker(args_list[1], args_list[2])
    parser = build_parser()
    args = parser.parse_args(args_list)
    try:
        return _run(args, args_list)
    except BenchError as exc:
        print(f"lspt-bench: error: {exc}", file=sys.stderr)
        return 2


def _run(args, argv: list[str]) -> int:
    t_start = time.perf_counter()
    import torch
    device = _resolve_device(args.device)
    defaults = DEFAULTS["cuda" if device.startswith("cuda") else "cpu"]
    batch_sizes = _parse_list(args.batch_size or defaults["batch_size"], int, "batch-size")
    prompts = _parse_list(args.num_prompts or defaults["num_prompts"], int, "num-prompts")
    dtypes = _parse_list(args.dtype or defaults["dtype"], str, "dtype")
    repeats = defaults["repeats"] if args.repeats is None else args.repeats
    warmup = defaults["warmup"] if args.warmup is None else args.warmup
    methods = list(METHODS) if args.methods.strip() == "all" else _parse_list(args.methods, str, "methods")
    for name, values, ok in (("batch-size", batch_sizes, lambda v: v >= 1), ("num-prompts", prompts, lambda v: v >= 1),
                             ("dtype", dtypes, lambda v: v in DTYPES), ("methods", methods, lambda v: v in METHODS)):
        bad = [v for v in values if not ok(v)]
        if bad:
            allowed = {"dtype": f"one of {', '.join(DTYPES)}", "methods": f"one of {', '.join(METHODS)}"}.get(
                name, "an int >= 1")
            raise BenchError(f"--{name}: {', '.join(map(str, bad))} not allowed: each must be {allowed}")
    if repeats < 1 or warmup < 1:
        raise BenchError("--repeats and --warmup must be >= 1 (the first run of a compiled model compiles it)")
    if args.num_classes < 1:
        raise BenchError("--num-classes must be >= 1")
    if args.threads is not None and args.threads < 1:
        raise BenchError("--threads must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    model_kwargs = parse_model_args(args.model_arg)
    shape = check_model(args.model, args.img_size, model_kwargs)
    outdir = check_output_dir(Path(args.output))

    backend, note = fused_backend(device)
    meta = environment(device, argv)
    meta["loadavg_start"] = _loadavg()    # other work on the machine skews CPU timings
    meta.update(model=args.model, model_kwargs=model_kwargs, img_size=args.img_size or shape["img_size"],
                depth=shape["depth"], embed_dim=shape["embed_dim"], batch_sizes=batch_sizes,
                num_prompts=prompts, dtypes=dtypes, methods=methods, repeats=repeats, warmup=warmup,
                fused_backend=backend, fused_note=note, num_classes=args.num_classes,
                optimizer="SGD(lr=0.01, momentum=0.9)", loss="cross-entropy, random labels",
                isolation="in-process" if (args.in_process or device.startswith("cuda")) else "subprocess per method",
                memory=("torch.cuda.max_memory_allocated over the timed train steps (reset first)"
                        if device.startswith("cuda") else
                        "peak RSS (VmHWM, reset after warm-up) during the timed train steps minus the "
                        "process's RSS before the ViT was built (after imports and backend load)"))
    print(f"lspt-bench: {args.model} ({meta['img_size']} px) on {meta['device_name']}; torch {meta['torch']}, "
          f"timm {meta['timm']}, triton {meta['triton']}; fused backend: {backend}"
          + (f" ({note})" if note else ""), flush=True)
    if note:
        print(f"lspt-bench: warning: {note}; the 'fused' rows run the reference step", file=sys.stderr, flush=True)

    settings = [(b, n, d) for d in dtypes for n in prompts for b in batch_sizes]
    total = len(settings) * len(methods)
    rows: list[dict] = []
    isolated = not device.startswith("cuda") and not args.in_process
    interrupted = False
    i = 0
    try:
        for b, n, d in settings:
            spec = dict(model=args.model, model_kwargs=model_kwargs, img_size=args.img_size, batch_size=b,
                        num_prompts=n, dtype=d, device=device, repeats=repeats, warmup=warmup,
                        num_classes=args.num_classes, seed=args.seed, fused_backend=backend, fused_note=note,
                        compile_backend=args.compile_backend, threads=args.threads)
            for m in methods:
                i += 1
                t0 = time.perf_counter()
                row = measure_isolated(m, spec) if isolated else measure(m, spec)
                row.update(repeats=repeats, warmup=warmup, device_name=meta["device_name"],
                           wall_s=time.perf_counter() - t0)
                rows.append(row)
                print(_progress(i, total, row), flush=True)
                add_comparisons(rows)
                try:                                       # keep what is measured so far on disk
                    write_results(rows, meta, outdir, plot=False)
                except OSError as exc:
                    print(f"lspt-bench: warning: cannot write results to {outdir}: {exc}", file=sys.stderr)
            if args.interleave:
                _interleave(rows[-len(methods):], spec)
                add_comparisons(rows)
                try:
                    write_results(rows, meta, outdir, plot=False)
                except OSError as exc:
                    print(f"lspt-bench: warning: cannot write results to {outdir}: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        interrupted = True
        meta["interrupted"] = f"after {len(rows)} of {total} measurements"
        print(f"\nlspt-bench: interrupted after {len(rows)} of {total} measurements; keeping those",
              file=sys.stderr, flush=True)
    add_comparisons(rows)
    meta["wall_s"] = time.perf_counter() - t_start
    meta["loadavg_end"] = _loadavg()
    print()
    print(format_table(rows, meta), end="")
    targets = evaluate_targets(rows)
    if targets:
        print("Targets:")
        for t in targets:
            print(f"  [{'met' if t['met'] else 'MISSED'}] {t['target']} (B{t['batch_size']} Np{t['num_prompts']} "
                  f"{t['dtype']}): {t['detail']}")
    try:
        paths = write_results(rows, meta, outdir, plot=not args.no_plot)
        print("wrote " + ", ".join(str(p) for p in paths))
    except Exception as exc:
        print(f"lspt-bench: error: cannot write the results to {outdir}: {type(exc).__name__}: {exc}; "
              "the rows as JSON follow on stdout", file=sys.stderr)
        print(json.dumps(dict(meta=meta, rows=rows), default=str))
        return 1
    load = meta.get("loadavg_end")
    print(f"total wall time {meta['wall_s']:.1f} s" + (f"; load average at the end {load[0]:.2f} on "
                                                        f"{os.cpu_count()} CPUs" if load else ""))
    if interrupted:
        return 130
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        print("lspt-bench: " + "; ".join(f"{_row_label(r)} (B{r['batch_size']} Np{r['num_prompts']} {r['dtype']}): "
                                         f"{r.get('status', 'error').upper()}" for r in failed)
              + " - reported in the rows above; the other rows are complete", file=sys.stderr)
        return 1
    return 0


def _interleave(rows: list[dict], spec: dict) -> None:
    """The --interleave pass for one setting: merge its times into `rows` (those that ran)."""
    ok = [r["method"] for r in rows if r.get("status") == "ok"]
    if not ok:
        return
    t0 = time.perf_counter()
    print(f"[interleaved] {len(ok)} methods (B{spec['batch_size']}, Np {spec['num_prompts']}, {spec['dtype']}), "
          f"{spec['repeats']} rounds ...", flush=True)
    found = measure_interleaved(ok, spec)
    for r in rows:
        r.update(found.get(r["method"], {}))
    add_comparisons(rows)
    print(f"[interleaved] done [{time.perf_counter() - t0:.1f} s]: " + ", ".join(
        f"{_row_label(r)} {r['train_s_interleaved']:.3f}/{r['infer_s_interleaved']:.3f} s"
        for r in rows if r.get("train_s_interleaved")), flush=True)


def _loadavg():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _progress(i: int, total: int, r: dict) -> str:
    head = f"[{i}/{total}] {_row_label(r)} (B{r['batch_size']}, Np {r['num_prompts']}, {r['dtype']})"
    if r.get("status") != "ok":
        return f"{head}: {r.get('status', 'error').upper()}: {r.get('error')} [{r.get('wall_s', 0):.1f} s]"
    mem = r.get("peak_memory_gb")
    extra = f", compile {r['compile_s']:.1f} s" if r.get("compile_s") is not None else ""
    return (f"{head}: train {r['train_s']:.4f} s, inference {r['infer_s']:.4f} s, memory "
            f"{'-' if mem is None else f'{mem:.3f} GB'}{extra} [{r.get('wall_s', 0):.1f} s]")


if __name__ == "__main__":
    sys.exit(main())
