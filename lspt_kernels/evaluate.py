"""`lspt-eval`: rebuild a tuned encoder from its safetensors file alone and measure top-1 accuracy.

A file written by `lspt-train` carries two JSON metadata entries: "lspt_kernels" (the encoder's
`config()`: method and structural options) and "lspt_train" (backbone name, image size, extra timm
arguments, the backbone seed used when no checkpoint was given, class names, layout, normalisation, eval
batch size and precision). `lspt-eval` rebuilds the same backbone (from --checkpoint when the run used
one), the same encoder and the same eval transform, so it reproduces the accuracy logged in training.

    lspt-eval --data DIR --tuned OUT/best.safetensors [--split val|test] [--checkpoint BACKBONE_FILE]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

__all__ = ["UsageError", "build_backbone", "read_tuned_metadata", "rebuild_encoder",
           "evaluate", "autocast_context", "resolve_device", "main"]


class UsageError(ValueError):
    """Bad command-line input; the message names the argument."""


def resolve_device(device: str) -> torch.device:
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UsageError(f"--device must be cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA GPU is available here (torch.cuda.is_available() is "
                         "False); use --device cpu")
    return torch.device(device)


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX512-BF16 / AMX), which CPU autocast needs to be
    worth using."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return False


def check_amp(amp: str, device: torch.device) -> str:
    """Resolve --amp ("auto": bf16 on a GPU, none on the CPU) and refuse what the device cannot do."""
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
    import contextlib
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _parse_value(text: str):
    import ast
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_model_kwargs(items: list[str] | None, option: str = "--model-kwargs") -> dict:
    """["embed_dim=32", "depth=3"] -> {"embed_dim": 32, "depth": 3} (values as Python literals, else
    strings): the timm keywords of every CLI (lspt-train/-eval, lspt-bench, lspt-viz)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UsageError(f"{option} expects KEY=VALUE items (e.g. drop_path_rate=0.1), got {item!r}")
        out[key] = _parse_value(value.strip())
    return out


def build_backbone(model: str, img_size: int | None, model_kwargs: dict, seed: int):
    """The timm ViT (random init under `seed`, nothing downloaded; a --checkpoint is loaded later by
    from_timm), with no classifier head."""
    import timm
    kwargs = dict(model_kwargs)
    if img_size is not None:
        kwargs["img_size"] = img_size
    torch.manual_seed(seed)
    try:
        vit = timm.create_model(model, pretrained=False, num_classes=0, **kwargs)
    except RuntimeError as exc:      # timm's "Unknown model" error
        raise UsageError(f"--model {model!r}: {exc}") from None
    except TypeError as exc:
        raise UsageError(f"--model {model!r} does not take these arguments {kwargs}: {exc}") from None
    from timm.models.vision_transformer import VisionTransformer
    if not isinstance(vit, VisionTransformer):
        raise UsageError(f"--model {model!r} is a {type(vit).__name__}, not a timm VisionTransformer")
    return vit


def read_tuned_metadata(path) -> tuple[dict, dict]:
    """(encoder config, training metadata) of a tuned file written by lspt-train."""
    from .checkpoints import read_tuned_metadata as read
    try:
        config, others = read(path)
    except FileNotFoundError:
        raise UsageError(f"--tuned {path}: no such file") from None
    except ValueError as exc:
        raise UsageError(f"--tuned {exc}") from None
    meta = others.get("lspt_train", {})
    return config, meta if isinstance(meta, dict) else {}


def rebuild_encoder(path, model: str | None = None, img_size: int | None = None, checkpoint=None):
    """The encoder of a tuned file, its backbone rebuilt from the metadata (or the overrides), the tuned
    tensors loaded. Returns (encoder, encoder config, training metadata)."""
    from .checkpoints import from_timm
    config, meta = read_tuned_metadata(path)
    model = model or meta.get("model")
    if not model:
        raise UsageError(f"--tuned {path} does not name its backbone (no 'lspt_train' metadata): pass --model")
    img_size = img_size or meta.get("img_size")
    checkpoint = checkpoint or meta.get("checkpoint")
    if checkpoint and not Path(checkpoint).is_file():
        raise UsageError(f"backbone checkpoint {checkpoint} (from the tuned file's metadata) not found: pass "
                         "--checkpoint")
    vit = build_backbone(model, img_size, meta.get("model_kwargs", {}), meta.get("seed", 0))
    method = config["method"]
    encoder = from_timm(vit, checkpoint=checkpoint, method=method,
                        **{k: v for k, v in config.items() if k != "method"})
    encoder.load_tuned(path)
    return encoder, config, meta


@torch.no_grad()
def evaluate(encoder, loader, device: torch.device, amp: str = "none") -> tuple[float, int, int]:
    """Top-1 accuracy in percent, correct, total, over a loader; the encoder in eval mode."""
    was_training = encoder.training
    encoder.eval()
    correct = total = 0
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast_context(device, amp):
            logits = encoder(images)
        correct += int((logits.argmax(-1) == labels).sum())
        total += labels.numel()
    encoder.train(was_training)
    return (100.0 * correct / total if total else float("nan")), correct, total


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lspt-eval", description="Top-1 accuracy of a tuned file written by lspt-train on a dataset split.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="dataset root (imagefolder, vtab or fgvc layout)")
    p.add_argument("--layout", default=None, help="imagefolder | vtab | fgvc (default: the training run's)")
    p.add_argument("--split", default="val", help="val | test (| train, trainval)")
    p.add_argument("--tuned", required=True, help="OUT/best.safetensors or OUT/last.safetensors")
    p.add_argument("--model", default=None, help="timm model name (default: the one in the tuned file)")
    p.add_argument("--img-size", type=int, default=None, help="(default: the one in the tuned file)")
    p.add_argument("--checkpoint", default=None, help="backbone checkpoint (default: the training run's path)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--amp", default=None, help="auto | bf16 | fp16 | none (default: the training run's)")
    p.add_argument("--batch-size", type=int, default=None, help="(default: the training run's eval batch size)")
    p.add_argument("--workers", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    from .data import DataError, ImageDataset, build_transform, load_dataset
    args = build_parser().parse_args(argv)
    try:
        device = resolve_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        encoder, config, meta = rebuild_encoder(args.tuned, args.model, args.img_size, args.checkpoint)
        amp = check_amp(args.amp or meta.get("amp", "none"), device)
        layout = args.layout or meta.get("layout")
        spec = load_dataset(args.data, layout, classes=meta.get("classes"))
        if args.split not in spec.splits:
            raise UsageError(f"--split {args.split!r}: {args.data} has no such split (has {sorted(spec.splits)})")
        if spec.num_classes != config["num_classes"]:
            raise UsageError(f"--data {args.data} has {spec.num_classes} classes, the tuned file "
                             f"{config['num_classes']}")
        img_size = encoder.vit.patch_embed.img_size[0]
        transform = build_transform(spec.layout, img_size, meta.get("mean", (0.485, 0.456, 0.406)),
                                    meta.get("std", (0.229, 0.224, 0.225)), train=False)
        batch = args.batch_size or meta.get("eval_batch_size", 64)
        if batch < 1:
            raise UsageError(f"--batch-size must be >= 1, got {batch}")
        loader = torch.utils.data.DataLoader(ImageDataset(spec.splits[args.split], transform), batch_size=batch,
                                             shuffle=False, num_workers=args.workers)
        encoder.to(device)
        acc, correct, total = evaluate(encoder, loader, device, amp)
    except (UsageError, DataError, FileNotFoundError, ValueError) as exc:
        print(f"lspt-eval: error: {exc}", file=sys.stderr)
        return 2
    print(f"{config['method']} on {args.data} [{args.split}]: top-1 {acc:.2f}% ({correct}/{total})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
