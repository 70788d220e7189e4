"""What every command line tool shares (lspt-train, lspt-eval, lspt-viz, lspt-bench).

- `UsageError`: bad command-line input; each tool's main() prints "PROG: error: MESSAGE" and exits 2;
  `error_message` is the one-line text of any error (a DataLoader worker's traceback reduced to its message).
- `check_number`, `parse_bool`: numeric options are finite and within their range; boolean options are
  true/false (1/0, yes/no) and nothing else.
- `resolve_device`, `check_output_dir`, `OutputLock`, `check_amp` / `autocast_context`: the --device,
  --output and --amp options, parsed and checked the same way everywhere; an output folder locked for the
  life of a run.
- `add_model_kwargs_option` / `model_kwargs_from_args` / `parse_model_kwargs`: extra timm keywords as
  `--model-kwargs KEY=VALUE ...` (`--model-arg` is a hidden alias in the tools that used to spell it so).
- `build_backbone`: the one place the tools and the benchmark call `timm.create_model` (seeded random
  init, nothing downloaded), with errors that name --model / --img-size; `backbone_fingerprint`: what
  tells two backbones apart.
- Tuned files: `backbone_spec` (the backbone a file was tuned on: the flags, else what lspt-train
  recorded in it, its entries' types checked once), `load_backbone`, `backbone_mismatch` (flags or
  weights that make a backbone another one than the file's), `load_tuned_encoder` and `rebuild_encoder`
  (the encoder of a tuned file, ready to run); `tuned_task`, `load_tuned_model` and `rebuild_model` for
  either kind of file (an encoder, or a segmentation file's SegmentationModel), `tuned_inference` (the
  test-time windows lspt-train recorded in a segmentation file).
- `HelpFormatter`: argparse's defaults formatter, silent about None defaults (their help says what they mean).
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import hashlib
import json
import math
import os
import re
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

from .checkpoints import load_backbone_checkpoint, read_tuned_metadata
from .data import IMAGENET_MEAN, IMAGENET_STD, LAYOUTS
from .encoders import build_encoder, check_vit
from .seg.data import SEG_LAYOUTS
from .seg.inference import InferenceConfig
from .seg.model import TASK as SEGMENTATION
from .seg.model import load_segmentation_model

__all__ = ["UsageError", "error_message", "check_number", "parse_bool", "resolve_device", "check_output_dir",
           "OutputLock", "cpu_supports_bf16", "check_amp", "autocast_context", "add_model_kwargs_option",
           "model_kwargs_from_args", "parse_model_kwargs", "build_backbone", "backbone_fingerprint", "TRAIN_RECORD",
           "train_record", "backbone_spec", "load_backbone", "backbone_mismatch", "load_tuned_encoder",
           "rebuild_encoder", "amp_dtype", "HelpFormatter", "tuned_task", "load_tuned_model", "rebuild_model",
           "tuned_inference"]

# The metadata entry in which lspt-train records the backbone and data of a tuned file (model, img_size,
# model_kwargs, seed, checkpoint, classes, layout, mean, std, eval_batch_size, amp, epoch, val_acc).
TRAIN_RECORD = "lspt_train"
# The recorded entries that say which backbone a file was tuned on (one figure of lspt-viz needs one).
BACKBONE_KEYS = ("model", "model_kwargs", "img_size", "seed", "checkpoint")


class UsageError(ValueError):
    """Bad command-line input: the message names the option (or the file) and what was expected; the
    tool prints it as `PROG: error: MESSAGE` and exits with status 2."""


def error_message(exc: BaseException) -> str:
    """The text a tool prints for an error. An error raised in a DataLoader worker reaches the main process
    with the worker's whole traceback as its message ("Caught DataError in DataLoader worker process 0.
    Original Traceback ..."): only the original message is kept, so --workers 0 and --workers N print the
    same line."""
    text = str(exc)
    wrapped = re.match(r"Caught (\w+) in DataLoader worker process \d+\.\s*\nOriginal Traceback", text)
    if wrapped:
        lines = text.splitlines()
        for i in range(len(lines) - 1, -1, -1):
            head = re.match(rf"(?:[\w.]+\.)?{wrapped.group(1)}: ", lines[i])
            if head:
                return "\n".join([lines[i][head.end():], *lines[i + 1:]]).strip()
    return text


# ------------------------------------------------------------------------------------------------
# Numbers and booleans
# ------------------------------------------------------------------------------------------------
def check_number(option: str, value, *, ge=None, gt=None, le=None, lt=None) -> None:
    """A UsageError naming `option` unless `value` is a finite number (not a bool) within the bounds
    given (ge: >=, gt: >, le: <=, lt: <). NaN and inf pass every comparison argparse could make, so a
    float option would otherwise run with them."""
    bounds = [(op, b) for op, b in ((">=", ge), (">", gt), ("<=", le), ("<", lt)) if b is not None]
    fits = {">=": lambda v, b: v >= b, ">": lambda v, b: v > b, "<=": lambda v, b: v <= b, "<": lambda v, b: v < b}
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if number and math.isfinite(value) and all(fits[op](value, b) for op, b in bounds):
        return
    kind = "" if isinstance(value, int) and not isinstance(value, bool) else "a finite number "
    what = kind + " and ".join(f"{op} {b}" for op, b in bounds)
    raise UsageError(f"{option} must be {what.strip()}, got {value!r}")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's ArgumentDefaultsHelpFormatter, except that an option whose default is None gets no
    "(default: None)": its help says what happens without it (e.g. "the model's", or a default per task)."""

    def _get_help_string(self, action):
        return (action.help or "") if action.default is None else super()._get_help_string(action)


TRUE_WORDS = ("true", "1", "yes")
FALSE_WORDS = ("false", "0", "no")


def parse_bool(text: str) -> bool:
    """argparse `type=` of a boolean option: true/false, 1/0 or yes/no (any case); any other word is refused
    rather than read as False."""
    word = str(text).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false (or 1/0, yes/no), got {text!r}")


# ------------------------------------------------------------------------------------------------
# --device, --output, --amp
# ------------------------------------------------------------------------------------------------
def resolve_device(name: str | None) -> torch.device:
    """--device: "auto" (or None: cuda when a GPU is visible, else cpu), "cpu", "cuda" or "cuda:N";
    cuda means cuda:0. Refused: other names, and a GPU that is not there."""
    if name is None or name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    index = name[len("cuda:"):] if name.startswith("cuda:") else "0" if name == "cuda" else None
    if index is None or not index.isdigit():
        raise UsageError(f"--device: expected cpu, cuda or cuda:N, got {name!r} (or auto: cuda when a GPU is "
                         "visible, else cpu)")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is available here (no CUDA device is visible to torch "
                         f"{torch.__version__}, CUDA build {torch.version.cuda}); use --device cpu")
    if int(index) >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", int(index))


def check_output_dir(path, option: str = "--output") -> Path:
    """Create the output directory and check that a file can be written there, before any work is done."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-", delete=True):
            pass
    except OSError as exc:
        raise UsageError(f"{option} {path} is not writable: {exc.strerror or exc} (choose another {option})") from None
    return path


LOCK_FILE = ".lock"


class OutputLock:
    """An output folder held by one run: an exclusive advisory lock (flock) on OUT/.lock for the life of
    the `with` block. The operating system drops it when the process ends, however it ends (crash, kill
    -9), so a stale lock never blocks a rerun. A second holder gets a UsageError naming the first (pid,
    host, start time and command, which the holder writes into the lock file and empties at the end).
    Where fcntl is missing (Windows) nothing is locked."""

    def __init__(self, path, option: str = "--output"):
        self.path, self.option, self.file = Path(path), option, None

    def __enter__(self) -> "OutputLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        file = open(self.path / LOCK_FILE, "a+")
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            file.seek(0)
            holder = file.read().strip() or "holder unknown"
            file.close()
            raise UsageError(f"{self.option} {self.path} is in use by another run ({holder}): wait until it ends, "
                             f"or choose another {self.option}") from None
        file.seek(0)
        file.truncate()
        file.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                   f"{' '.join(sys.argv)}\n")
        file.flush()
        self.file = file
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            # Emptied, not removed: a lock file unlinked while another process opens it would let two
            # processes hold "the" lock. Emptied, a run that was refused leaves the folder as it found it.
            self.file.truncate(0)
            self.file.close()          # closing releases the lock
            self.file = None


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX512-BF16 / AMX), which CPU autocast needs to be
    worth using."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return False


def check_amp(amp: str, device: torch.device) -> str:
    """--amp: resolve "auto" (bf16 on a GPU that has it, none on the CPU) and refuse what the device
    cannot do."""
    if amp not in ("auto", "bf16", "fp16", "none"):
        raise UsageError(f"--amp must be one of auto, bf16, fp16, none; got {amp!r}")
    if amp == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "none"
    if device.type == "cpu":
        if amp == "fp16":
            raise UsageError("--amp fp16 needs a GPU (CPU autocast in fp16 is not supported here); use --amp "
                             "bf16 on a CPU with bf16 support or --amp none")
        if amp == "bf16" and not cpu_supports_bf16():
            raise UsageError("--amp bf16: this CPU has no native bf16 support (AVX512-BF16/AMX); use --amp none")
    elif amp == "bf16" and not torch.cuda.is_bf16_supported():
        raise UsageError(f"--amp bf16: {torch.cuda.get_device_name(device)} does not support bf16; use --amp fp16")
    return amp


def amp_dtype(amp: str) -> torch.dtype | None:
    """The autocast dtype of an --amp setting checked by `check_amp`; None for "none"."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)


def autocast_context(device: torch.device, amp: str):
    """The autocast region of an --amp setting checked by `check_amp` ("none": no autocast)."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype(amp))


# ------------------------------------------------------------------------------------------------
# --model-kwargs KEY=VALUE ...
# ------------------------------------------------------------------------------------------------
def add_model_kwargs_option(parser, alias: bool = False) -> None:
    """--model-kwargs KEY=VALUE ... (repeatable). alias=True also accepts the hidden spelling
    --model-arg, which lspt-viz and lspt-bench used; errors name the spelling that was typed."""
    parser.add_argument("--model-kwargs", action="extend", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra timm.create_model arguments (Python literals, else strings), e.g. "
                             "drop_path_rate=0.1 patch_size=8")
    if alias:
        parser.add_argument("--model-arg", action="extend", nargs="+", default=[], help=argparse.SUPPRESS)


def model_kwargs_from_args(args) -> dict:
    """The timm keywords of a parsed command line (--model-kwargs, then the --model-arg alias)."""
    kwargs = parse_model_kwargs(args.model_kwargs, "--model-kwargs")
    kwargs.update(parse_model_kwargs(getattr(args, "model_arg", None), "--model-arg"))
    return kwargs


def _literal(text: str):
    import ast
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_model_kwargs(items: list[str] | None, option: str = "--model-kwargs") -> dict:
    """["embed_dim=32", "depth=3"] -> {"embed_dim": 32, "depth": 3} (values as Python literals, else
    strings)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UsageError(f"{option} expects KEY=VALUE items (e.g. drop_path_rate=0.1), got {item!r}")
        out[key] = _literal(value.strip())
    return out


# ------------------------------------------------------------------------------------------------
# The backbone
# ------------------------------------------------------------------------------------------------
def build_backbone(model: str, img_size: int | None = None, model_kwargs: dict | None = None, seed: int = 0,
                   device=None):
    """The timm ViT or Eva `model` without a classifier head, randomly initialised under `seed` (nothing is
    downloaded; a checkpoint is loaded by the caller). `device="meta"` builds only the shapes. An
    unknown name, arguments the model does not take, or a model the encoders cannot wrap are a
    UsageError naming --model."""
    import timm
    if not timm.is_model(model):
        close = difflib.get_close_matches(model, timm.list_models(), n=3, cutoff=0.6)
        raise UsageError(f"--model {model!r}: unknown timm model" + (f"; did you mean {', '.join(close)}?" if close
                                                                    else "")
                         + f" (timm {timm.__version__}, which may predate it: a recent backbone such as DINOv3 "
                           "needs a recent timm; list its ViTs with python -c \"import timm; "
                           "print(timm.list_models('vit_*'))\")")
    kwargs = dict(model_kwargs or {})
    if img_size is not None:
        kwargs["img_size"] = img_size
    torch.manual_seed(seed)
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            vit = timm.create_model(model, pretrained=False, num_classes=0, **kwargs)
    except TypeError as exc:
        raise UsageError(f"--model {model!r} does not take these arguments {kwargs}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - timm raises what the model's constructor raises
        raise UsageError(f"--model {model!r} cannot be built with {kwargs}: {type(exc).__name__}: {exc}") from None
    try:
        check_vit(vit)
    except TypeError as exc:
        raise UsageError(f"--model {model!r} is a {type(vit).__module__}.{type(vit).__name__}, not a timm "
                         "VisionTransformer or Eva the encoders wrap (e.g. vit_base_patch16_224, "
                         f"deit_base_patch16_224, vit_base_patch16_dinov3, eva02_base_patch14_224): {exc}") from None
    pe = vit.patch_embed
    if getattr(pe, "grid_size", None) is not None and min(pe.grid_size) < 1:
        # timm builds such a model; its first forward would fail inside the convolution.
        size = img_size if img_size is not None else tuple(pe.img_size)
        raise UsageError(f"--img-size {size}: smaller than the {tuple(pe.patch_size)} patch of --model {model!r}, so "
                         "an image holds no patch; use an image size of at least the patch size")
    return vit


def backbone_fingerprint(vit) -> str | None:
    """The first 16 hex digits of the sha256 of a backbone's weights (each state-dict entry's name, shape,
    dtype and bytes; its classifier head aside): what tells the backbone a tuned file was trained on from
    another one, whatever the file or seed it came from. None for a model on the meta device."""
    digest = hashlib.sha256()
    for name, t in sorted(vit.state_dict().items()):
        if name.startswith("head."):
            continue
        if t.is_meta:
            return None
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# Tuned files: the backbone they were tuned on, and the encoder they hold
# ------------------------------------------------------------------------------------------------
def _is_int(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_numbers(value) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in value)


# What lspt-train records (TRAIN_RECORD): entry -> (check, what the check expects). A file whose record
# breaks one of these was damaged or edited; it is refused with the entry named, before anything is built.
RECORD_ENTRIES = {
    "model": (lambda v: isinstance(v, str) and bool(v), "a timm model name"),
    "img_size": (lambda v: v is None or _is_int(v, 1), "an int >= 1 (or null)"),
    "model_kwargs": (lambda v: isinstance(v, dict), "an object of timm keywords"),
    "seed": (lambda v: _is_int(v, 0), "an int >= 0"),
    "checkpoint": (lambda v: v is None or (isinstance(v, str) and bool(v)), "a file path (or null)"),
    "classes": (lambda v: isinstance(v, list) and bool(v) and all(isinstance(c, str) for c in v),
                "a non-empty list of class names"),
    "layout": (lambda v: v in LAYOUTS + SEG_LAYOUTS, f"one of {', '.join(LAYOUTS + SEG_LAYOUTS)}"),
    "mean": (_is_numbers, "a list of numbers"),
    "std": (lambda v: _is_numbers(v) and all(x > 0 for x in v), "a list of numbers > 0"),
    "eval_batch_size": (lambda v: _is_int(v, 1), "an int >= 1"),
    "amp": (lambda v: v in ("auto", "bf16", "fp16", "none"), "one of auto, bf16, fp16, none"),
    "epoch": (lambda v: _is_int(v, 0), "an int >= 0"),
    "val_acc": (lambda v: v is None or _is_numbers([v]), "a number (or null)"),
    "backbone_sha256": (lambda v: isinstance(v, str) and bool(v), "a hex digest"),
    # segmentation: the labels' coding, the test-time windows and resize, the progress in iterations
    "reduce_zero_label": (lambda v: isinstance(v, bool), "true or false"),
    "stride": (lambda v: _is_int(v, 1), "an int >= 1"),
    "scale": (lambda v: isinstance(v, list) and len(v) == 2 and all(_is_int(x, 1) for x in v),
              "a list of two ints >= 1 (long, short)"),
    "iteration": (lambda v: _is_int(v, 0), "an int >= 0"),
    "val_miou": (lambda v: v is None or _is_numbers([v]), "a number (or null)"),
}


def _check_record(record, path, option: str) -> dict:
    """lspt-train's record of a tuned file, every entry's type checked (RECORD_ENTRIES); None: no record."""
    if record is None:
        return {}
    where = f"{option} {path}: its {TRAIN_RECORD!r} metadata"
    if not isinstance(record, dict):
        raise UsageError(f"{where} is damaged: expected a JSON object, got {str(record)[:60]!r}")
    unknown = sorted(set(record) - set(RECORD_ENTRIES))
    if unknown:
        raise UsageError(f"{where} has entries this version does not know: {unknown} (a damaged file, or one "
                         "written by a newer lspt_kernels)")
    for key, value in record.items():
        check, expected = RECORD_ENTRIES[key]
        if not check(value):
            raise UsageError(f"{where} entry {key!r} must be {expected}, got {json.dumps(value)[:60]}")
    return record


def train_record(path, option: str = "--tuned") -> tuple[dict, dict]:
    """(encoder config, lspt-train's record or {}) of a tuned file (checkpoints.read_tuned_metadata),
    its errors, and a record whose entries have the wrong type, as UsageErrors naming `option`."""
    try:
        config, others = read_tuned_metadata(path)
    except FileNotFoundError:
        raise UsageError(f"{option} {path}: no such file") from None
    except ValueError as exc:
        raise UsageError(f"{option} {exc}") from None
    return config, _check_record(others.get(TRAIN_RECORD), path, option)


def backbone_spec(tuned: list, model: str | None = None, model_kwargs: dict | None = None,
                  img_size: int | None = None, checkpoint=None, seed: int | None = None) -> dict:
    """The backbone the tuned files were trained on: {model, model_kwargs, img_size, seed, checkpoint,
    mean, std, recorded, record}. Each entry is its flag when given, else what lspt-train recorded in the
    files (which must then agree: one backbone for all). A record is used only for its own model: with a
    --model other than the recorded one, nothing recorded applies (model_kwargs {}, seed 0, no
    checkpoint, ImageNet mean/std). `model_kwargs` flags are added to the recorded ones. "record" is the
    files' one record (or {}), so `backbone_mismatch` can compare the flags with it."""
    records = [train_record(f)[1] for f in tuned]
    recorded = {tuple(json.dumps(r.get(k), sort_keys=True) for k in BACKBONE_KEYS) for r in records}
    every = all(r.get("model") for r in records)
    if model is None and not every:
        raise UsageError("--model is needed: " + ", ".join(str(f) for f, r in zip(tuned, records) if not r.get("model"))
                         + " does not name its backbone (only files written by lspt-train record it): pass --model")
    if model is None and len(recorded) > 1:
        raise UsageError("the tuned files were trained on different backbones (" + "; ".join(
            f"{f}: {', '.join(f'{k}={r.get(k)}' for k in BACKBONE_KEYS)}" for f, r in zip(tuned, records))
            + "): pass the backbone's options, or use one backbone's files at a time")
    common = records[0] if every and len(recorded) == 1 else {}
    record = common if model in (None, common.get("model")) else {}
    spec = dict(model=model or record["model"], model_kwargs=dict(record.get("model_kwargs") or {}),
                img_size=record.get("img_size"), seed=record.get("seed", 0), checkpoint=record.get("checkpoint"),
                mean=tuple(record.get("mean") or IMAGENET_MEAN), std=tuple(record.get("std") or IMAGENET_STD),
                recorded=bool(record), record=common)
    spec["model_kwargs"].update(model_kwargs or {})
    for key, value in (("img_size", img_size), ("seed", seed), ("checkpoint", checkpoint)):
        if value is not None:
            spec[key] = value
    if spec["checkpoint"] is not None and not Path(spec["checkpoint"]).is_file():
        if checkpoint is not None:
            raise UsageError(f"--checkpoint {checkpoint}: no such file")
        raise UsageError(f"backbone checkpoint {spec['checkpoint']} (recorded in the tuned file) not found: pass "
                         "--checkpoint")
    return spec


def load_backbone(spec: dict):
    """The ViT of a `backbone_spec`: built under its seed, its checkpoint (if any) loaded."""
    vit = build_backbone(spec["model"], spec["img_size"], spec["model_kwargs"], spec["seed"])
    if spec["checkpoint"] is not None:
        try:
            load_backbone_checkpoint(vit, spec["checkpoint"])
        except (FileNotFoundError, ValueError) as exc:
            raise UsageError(f"--checkpoint: {exc}") from None
    return vit


def backbone_mismatch(spec: dict, vit) -> str | None:
    """Why `vit`, built from a `backbone_spec`, is not the backbone lspt-train recorded in the tuned files,
    naming both values: the flags that differ from the record and, when the record has the weights'
    fingerprint, the two fingerprints. None when it is that backbone (the same weights from another
    checkpoint path or seed included), or when the files record none."""
    record = spec["record"]
    if not record:
        return None
    expected = record.get("backbone_sha256")
    actual = backbone_fingerprint(vit) if expected else None
    if expected and actual == expected:
        return None
    recorded = dict(model=record.get("model"), model_kwargs=record.get("model_kwargs") or {},
                    img_size=record.get("img_size"), checkpoint=record.get("checkpoint"), seed=record.get("seed", 0))
    given = dict(spec, checkpoint=str(Path(spec["checkpoint"]).resolve()) if spec["checkpoint"] else None)
    if given["checkpoint"] is not None:
        recorded.pop("seed")                     # the checkpoint's weights replace the seeded init
    flags = [f"--{key.replace('_', '-')} {given[key]} (lspt-train recorded {value})"
             for key, value in recorded.items() if given[key] != value]
    if expected:
        flags.append(f"its weights (sha256 {actual}) are not the ones the file was tuned on ({expected})")
    return "the backbone is not the one the tuned file was trained on: " + "; ".join(flags) if flags else None


def load_tuned_encoder(path, vit):
    """The encoder a `save_tuned` file was written from, rebuilt around `vit` from the file's config,
    with the file's tensors loaded. A file tuned on another ViT, or a config the encoder refuses, is a
    UsageError naming --tuned."""
    config, _ = train_record(path)
    method = config.pop("method")
    dim, depth = config.get("embed_dim", vit.embed_dim), config.get("depth", len(vit.blocks))
    if (dim, depth) != (vit.embed_dim, len(vit.blocks)):
        raise UsageError(f"--tuned {path} was tuned on a different ViT (embed_dim={dim}, depth={depth}) than the "
                         f"one given (embed_dim={vit.embed_dim}, depth={len(vit.blocks)}): pass the --model / "
                         "--model-kwargs / --checkpoint it was trained with")
    try:
        encoder = build_encoder(method, vit, **config)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--tuned {path}: its config {config} does not fit the {method!r} encoder: {exc}") from None
    try:
        encoder.load_tuned(path)
    except ValueError as exc:
        raise UsageError(f"--tuned {exc}") from None
    return encoder


def rebuild_encoder(path, model: str | None = None, img_size: int | None = None, checkpoint=None, warn=None):
    """The encoder of a tuned file, ready to run: its backbone rebuilt from lspt-train's record (or
    the overrides), the tuned tensors loaded. Returns (encoder, encoder config, lspt-train's record).
    A backbone other than the recorded one (`backbone_mismatch`) is reported through `warn(message)`
    (default: a RuntimeWarning)."""
    return _rebuild(path, model, img_size, checkpoint, warn, load_tuned_encoder)


def _rebuild(path, model, img_size, checkpoint, warn, load):
    config, record = train_record(path)
    spec = backbone_spec([path], model=model, img_size=img_size, checkpoint=checkpoint)
    vit = load_backbone(spec)
    mismatch = backbone_mismatch(spec, vit)
    if mismatch:
        if warn is None:
            import warnings
            warnings.warn(mismatch, RuntimeWarning, stacklevel=3)
        else:
            warn(mismatch)
    return load(path, vit), config, record


def tuned_task(config: dict) -> str:
    """The task of a tuned file from its config (`train_record`'s first value): "segmentation" for a
    SegmentationModel's file, "classification" for an encoder's."""
    return SEGMENTATION if config.get("task") == SEGMENTATION else "classification"


def load_tuned_model(path, vit):
    """The model a tuned file was written from, rebuilt around `vit` with the file's tensors loaded: the
    encoder (`load_tuned_encoder`), or for a segmentation file its SegmentationModel (heads included). A
    file that does not fit `vit` is a UsageError naming --tuned."""
    config, _ = train_record(path)
    if tuned_task(config) != SEGMENTATION:
        return load_tuned_encoder(path, vit)
    try:
        return load_segmentation_model(path, vit)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--tuned {exc}") from None


def rebuild_model(path, model: str | None = None, img_size: int | None = None, checkpoint=None, warn=None):
    """`rebuild_encoder` for either kind of tuned file: (the encoder or SegmentationModel, its config,
    lspt-train's record)."""
    return _rebuild(path, model, img_size, checkpoint, warn, load_tuned_model)


def tuned_inference(model, record: dict, multi_scale: bool = False) -> InferenceConfig:
    """How lspt-eval and lspt-viz infer with a segmentation file's model: sliding windows of the backbone's
    size with the stride and resize scale lspt-train recorded (`InferenceConfig.for_crop`'s when it recorded
    none, or for a backbone built at another size); multi_scale: SETR's ratios, each also flipped."""
    crop = model.encoder.vit.patch_embed.img_size[0]
    recorded = record.get("img_size") == crop and "stride" in record and "scale" in record
    config = InferenceConfig.for_crop(crop, **(dict(stride=record["stride"], scale=tuple(record["scale"]))
                                               if recorded else {}))
    if not multi_scale:
        return config
    return InferenceConfig.multi_scale(crop_size=config.crop_size, stride=config.stride, scale=config.scale)
