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

import torch

from .cli_helpers import (
    UsageError,
    autocast_context,
    check_amp,
    check_number,
    error_message,
    rebuild_encoder,
    resolve_device,
)
from .data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataError,
    ImageDataset,
    build_transform,
    detect_layout,
    load_dataset,
    split_names,
)

__all__ = ["evaluate", "build_parser", "main"]


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
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--amp", default=None, help="auto | bf16 | fp16 | none (default: the training run's)")
    p.add_argument("--batch-size", type=int, default=None, help="(default: the training run's eval batch size)")
    p.add_argument("--workers", type=int, default=0)
    return p


def _warn(message: str) -> None:
    print(f"lspt-eval: warning: {message}", file=sys.stderr, flush=True)


def _run(args) -> str:
    """The evaluation of a parsed command line; returns the result line."""
    for option, value, low in (("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0),
                               ("--img-size", args.img_size, 1)):
        if value is not None:
            check_number(option, value, ge=low)
    device = resolve_device(args.device)
    encoder, config, record = rebuild_encoder(args.tuned, args.model, args.img_size, args.checkpoint, warn=_warn)
    amp = check_amp(args.amp or record.get("amp", "none"), device)
    layout = args.layout or record.get("layout") or detect_layout(args.data)
    available = split_names(args.data, layout)
    if args.split not in available:
        raise UsageError(f"--split {args.split!r}: {args.data} has no such split (has {sorted(available)})")
    # Only the split evaluated is read: another split's problems (an extra class, a missing file) are not ours.
    spec = load_dataset(args.data, layout, classes=record.get("classes"), splits=[args.split])
    if spec.num_classes != config["num_classes"]:
        raise UsageError(f"--data {args.data} has {spec.num_classes} classes, the tuned file {config['num_classes']}")
    img_size = encoder.vit.patch_embed.img_size[0]
    transform = build_transform(spec.layout, img_size, record.get("mean", IMAGENET_MEAN),
                                record.get("std", IMAGENET_STD), train=False)
    batch = args.batch_size or record.get("eval_batch_size", 64)
    loader = torch.utils.data.DataLoader(ImageDataset(spec.splits[args.split], transform), batch_size=batch,
                                         shuffle=False, num_workers=args.workers)
    acc, correct, total = evaluate(encoder.to(device), loader, device, amp)
    return f"{config['method']} on {args.data} [{args.split}]: top-1 {acc:.2f}% ({correct}/{total})"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        line = _run(args)
    except (UsageError, DataError, FileNotFoundError, ValueError) as exc:
        print(f"lspt-eval: error: {error_message(exc)}", file=sys.stderr)
        return 2
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
