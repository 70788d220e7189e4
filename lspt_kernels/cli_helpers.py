"""What every command line tool shares (lspt-train, lspt-eval, lspt-viz, lspt-bench).

- `UsageError`: bad command-line input; each tool's main() prints "PROG: error: MESSAGE" and exits 2.
- `resolve_device`, `check_output_dir`, `check_amp` / `autocast_context`: the --device, --output and
  --amp options, parsed and checked the same way everywhere.
- `add_model_kwargs_option` / `model_kwargs_from_args` / `parse_model_kwargs`: extra timm keywords as
  `--model-kwargs KEY=VALUE ...` (`--model-arg` is a hidden alias in the tools that used to spell it so).
- `build_backbone`: the one place the tools and the benchmark call `timm.create_model` (seeded random
  init, nothing downloaded), with errors that name --model.
- Tuned files: `backbone_spec` (the backbone a file was tuned on: the flags, else what lspt-train
  recorded in it), `load_backbone`, `load_tuned_encoder` and `rebuild_encoder` (the encoder of a
  tuned file, ready to run).
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import tempfile
from pathlib import Path

import torch

from .checkpoints import load_backbone_checkpoint, read_tuned_metadata
from .data import IMAGENET_MEAN, IMAGENET_STD
from .encoders import build_encoder, check_vit

__all__ = ["UsageError", "resolve_device", "check_output_dir", "cpu_supports_bf16", "check_amp", "autocast_context",
           "add_model_kwargs_option", "model_kwargs_from_args", "parse_model_kwargs", "build_backbone",
           "TRAIN_RECORD", "train_record", "backbone_spec", "load_backbone", "load_tuned_encoder", "rebuild_encoder"]

# The metadata entry in which lspt-train records the backbone and data of a tuned file (model, img_size,
# model_kwargs, seed, checkpoint, classes, layout, mean, std, eval_batch_size, amp, epoch, val_acc).
TRAIN_RECORD = "lspt_train"
# The recorded entries that say which backbone a file was tuned on (one figure of lspt-viz needs one).
BACKBONE_KEYS = ("model", "model_kwargs", "img_size", "seed", "checkpoint")


class UsageError(ValueError):
    """Bad command-line input: the message names the option (or the file) and what was expected; the
    tool prints it as `PROG: error: MESSAGE` and exits with status 2."""


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


def autocast_context(device: torch.device, amp: str):
    """The autocast region of an --amp setting checked by `check_amp` ("none": no autocast)."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


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
    return vit


# ------------------------------------------------------------------------------------------------
# Tuned files: the backbone they were tuned on, and the encoder they hold
# ------------------------------------------------------------------------------------------------
def train_record(path, option: str = "--tuned") -> tuple[dict, dict]:
    """(encoder config, lspt-train's record or {}) of a tuned file (checkpoints.read_tuned_metadata),
    its errors as UsageErrors naming `option`."""
    try:
        config, others = read_tuned_metadata(path)
    except FileNotFoundError:
        raise UsageError(f"{option} {path}: no such file") from None
    except ValueError as exc:
        raise UsageError(f"{option} {exc}") from None
    record = others.get(TRAIN_RECORD, {})
    return config, record if isinstance(record, dict) else {}


def backbone_spec(tuned: list, model: str | None = None, model_kwargs: dict | None = None,
                  img_size: int | None = None, checkpoint=None, seed: int | None = None) -> dict:
    """The backbone the tuned files were trained on: {model, model_kwargs, img_size, seed, checkpoint,
    mean, std, recorded}. Each entry is its flag when given, else what lspt-train recorded in the files
    (which must then agree: one backbone for all). A record is used only for its own model: with a
    --model other than the recorded one, nothing recorded applies (model_kwargs {}, seed 0, no
    checkpoint, ImageNet mean/std). `model_kwargs` flags are added to the recorded ones."""
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
    record = records[0] if every and len(recorded) == 1 and model in (None, records[0]["model"]) else {}
    spec = dict(model=model or record["model"], model_kwargs=dict(record.get("model_kwargs") or {}),
                img_size=record.get("img_size"), seed=record.get("seed", 0), checkpoint=record.get("checkpoint"),
                mean=tuple(record.get("mean") or IMAGENET_MEAN), std=tuple(record.get("std") or IMAGENET_STD),
                recorded=bool(record))
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


def load_tuned_encoder(path, vit):
    """The encoder a `save_tuned` file was written from, rebuilt around `vit` from the file's config,
    with the file's tensors loaded. A file tuned on another ViT is a UsageError naming --tuned."""
    config, _ = train_record(path)
    method = config.pop("method")
    dim, depth = config.get("embed_dim", vit.embed_dim), config.get("depth", len(vit.blocks))
    if (dim, depth) != (vit.embed_dim, len(vit.blocks)):
        raise UsageError(f"--tuned {path} was tuned on a different ViT (embed_dim={dim}, depth={depth}) than the "
                         f"one given (embed_dim={vit.embed_dim}, depth={len(vit.blocks)}): pass the --model / "
                         "--model-kwargs / --checkpoint it was trained with")
    try:
        encoder = build_encoder(method, vit, **config)
    except TypeError as exc:
        raise UsageError(f"--tuned {path}: its config {config} does not fit the {method!r} encoder: {exc}") from None
    try:
        encoder.load_tuned(path)
    except ValueError as exc:
        raise UsageError(f"--tuned {exc}") from None
    return encoder


def rebuild_encoder(path, model: str | None = None, img_size: int | None = None, checkpoint=None):
    """The encoder of a tuned file, ready to run: its backbone rebuilt from lspt-train's record (or
    the overrides), the tuned tensors loaded. Returns (encoder, encoder config, lspt-train's record)."""
    config, record = train_record(path)
    vit = load_backbone(backbone_spec([path], model=model, img_size=img_size, checkpoint=checkpoint))
    return load_tuned_encoder(path, vit), config, record
