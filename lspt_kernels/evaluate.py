"""`lspt-eval`: rebuild a tuned model from its safetensors file alone and measure it: top-1 accuracy of a
classification file; mIoU, pixel accuracy and per-class IoU of a segmentation file (single-scale sliding
window, or `--multi-scale` with flips), optionally writing the predicted label maps (`--save-predictions`).

A file written by `lspt-train` carries two JSON metadata entries: "lspt_kernels" (the model's `config()`:
method, structural options, for segmentation the heads') and "lspt_train" (backbone name, image size, extra
timm arguments, the backbone seed used when no checkpoint was given, class names, layout, normalisation,
precision, eval batch size or the test windows). `lspt-eval` rebuilds the same backbone (from --checkpoint
when the run used one), the same model and the same eval transform, so it reproduces the score logged in
training.

    lspt-eval --data DIR --tuned OUT/best.safetensors [--split val|test] [--checkpoint BACKBONE_FILE]
    lspt-eval --data ADE_ROOT --tuned OUT/best.safetensors [--multi-scale] [--save-predictions PRED_DIR]
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from .cli_helpers import (
    UsageError,
    amp_dtype,
    autocast_context,
    check_amp,
    check_number,
    check_output_dir,
    error_message,
    parse_bool,
    rebuild_encoder,
    rebuild_model,
    resolve_device,
    train_record,
    tuned_inference,
    tuned_task,
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
from .seg import (
    EvalTransform,
    SegmentationDataset,
    detect_segmentation_layout,
    load_segmentation_dataset,
    write_label_map,
)
from .seg import evaluate as evaluate_segmentation

__all__ = ["evaluate", "build_parser", "main"]

SEGMENTATION_ONLY = ("multi_scale", "save_predictions", "reduce_zero_label")


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
        prog="lspt-eval", description="Top-1 accuracy of a classification file written by lspt-train on a dataset "
        "split; mIoU, pixel accuracy and per-class IoU of a segmentation file.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="dataset root (imagefolder, vtab or fgvc layout; segmentation: "
                   "ade20k or generic)")
    p.add_argument("--layout", default=None, help="imagefolder | vtab | fgvc (default: the training run's); "
                   "segmentation: ade20k | generic (default: detected)")
    p.add_argument("--split", default="val", help="val | test (| train, trainval)")
    p.add_argument("--tuned", required=True, help="OUT/best.safetensors or OUT/last.safetensors")
    p.add_argument("--model", default=None, help="timm model name (default: the one in the tuned file)")
    p.add_argument("--img-size", type=int, default=None, help="(default: the one in the tuned file)")
    p.add_argument("--checkpoint", default=None, help="backbone checkpoint (default: the training run's path)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--amp", default=None, help="auto | bf16 | fp16 | none (default: the training run's)")
    p.add_argument("--batch-size", type=int, default=None, help="(default: the training run's eval batch size)")
    p.add_argument("--workers", type=int, default=0)
    s = p.add_argument_group("segmentation files")
    s.add_argument("--multi-scale", action="store_true", help="multi-scale + flip: the image resized by 0.5, 0.75, "
                   "1.0, 1.25, 1.5 and 1.75 (each also flipped), the probabilities averaged (SETR's MS); without it "
                   "single-scale; both slide the training crop's window over the resized image")
    s.add_argument("--save-predictions", default=None, metavar="DIR", help="write one PNG label map per image into "
                   "DIR, named as the image (its path under the split's image folder, suffix .png), holding the "
                   "model's class indices 0..C-1 (after reduce_zero_label: file label k + 1 is class k)")
    s.add_argument("--reduce-zero-label", type=parse_bool, default=None, metavar="BOOL",
                   help="generic layout: label 0 is ignored and k is class k - 1 (default: the training run's)")
    return p


def _warn(message: str) -> None:
    print(f"lspt-eval: warning: {message}", file=sys.stderr, flush=True)


def _run(args) -> str:
    """The evaluation of a parsed command line; returns the result line (lines, for a segmentation file)."""
    for option, value, low in (("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0),
                               ("--img-size", args.img_size, 1)):
        if value is not None:
            check_number(option, value, ge=low)
    device = resolve_device(args.device)
    if tuned_task(train_record(args.tuned)[0]) == "segmentation":
        return _run_segmentation(args, device)
    given = [f"--{o.replace('_', '-')}" for o in SEGMENTATION_ONLY if getattr(args, o) not in (None, False)]
    if given:
        raise UsageError(f"{', '.join(given)} applies to segmentation files; --tuned {args.tuned} is a classification "
                         "file (lspt-eval reports its top-1)")
    if detect_segmentation_layout(args.data) is not None:
        raise UsageError(f"--data {args.data} is a segmentation dataset, but --tuned {args.tuned} is a classification "
                         "file: evaluate it on the classification data it was trained for")
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


def _segmentation_data(args, model, record: dict):
    """The split's SegmentationDataset and its spec, read as training read it: the file's classes, ignore index
    and reduce_zero_label (unless --reduce-zero-label), only the split evaluated."""
    if detect_segmentation_layout(args.data) is None:
        raise UsageError(f"--tuned {args.tuned} is a segmentation file, but --data {args.data} is not a segmentation "
                         "dataset (expected ADEChallengeData2016/{images,annotations}/{training,validation}, or "
                         "images/{train,val} and annotations/{train,val} with PNG label maps)")
    reduce = record.get("reduce_zero_label") if args.reduce_zero_label is None else args.reduce_zero_label
    spec = load_segmentation_dataset(args.data, args.layout, num_classes=model.num_classes, reduce_zero_label=reduce,
                                     ignore_index=model.ignore_index, splits=[args.split])
    if args.split not in spec.splits:
        raise UsageError(f"--split {args.split!r}: {args.data} has no such split (ade20k: train, val; generic: the "
                         "folders under images/)")
    transform = EvalTransform(record.get("mean", IMAGENET_MEAN), record.get("std", IMAGENET_STD))
    return spec, SegmentationDataset.from_spec(spec, args.split, transform)


def _prediction_writer(args, spec, dataset):
    """on_prediction for seg.evaluate: each label map to --save-predictions DIR under its image's name."""
    out, image_dir = check_output_dir(args.save_predictions, "--save-predictions"), spec.image_dir(args.split)

    def write(index: int, pred: torch.Tensor) -> None:
        name = Path(dataset.samples[index][0]).relative_to(image_dir).with_suffix(".png")
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        write_label_map(out / name, pred.numpy())
    return write


def _run_segmentation(args, device) -> str:
    """lspt-eval of a segmentation file: mIoU, aAcc, mAcc and the per-class IoU / accuracy lines."""
    if args.batch_size is not None:
        raise UsageError("--batch-size applies to classification files: segmentation infers one image at a time "
                         "(sliding windows at its own size)")
    model, config, record = rebuild_model(args.tuned, args.model, args.img_size, args.checkpoint, warn=_warn)
    amp = check_amp(args.amp or record.get("amp", "none"), device)
    spec, dataset = _segmentation_data(args, model, record)
    inference = tuned_inference(model, record, args.multi_scale)
    writer = _prediction_writer(args, spec, dataset) if args.save_predictions else None
    m = evaluate_segmentation(model.to(device), dataset, inference, device=device, amp_dtype=amp_dtype(amp),
                              workers=args.workers, on_prediction=writer, progress=sys.stderr.isatty())
    recorded = record.get("classes") or []
    names = recorded if len(recorded) == model.num_classes else spec.classes
    mode = "multi-scale + flip" if args.multi_scale else "single-scale"
    lines = [f"{config['method']} on {args.data} [{args.split}], {mode} ({len(dataset)} images; window "
             f"{inference.crop_size[0]}, stride {inference.stride[0]}, scale {inference.scale}): mIoU "
             f"{100 * m['mIoU']:.2f}%  aAcc {100 * m['aAcc']:.2f}%  mAcc {100 * m['mAcc']:.2f}%",
             "per class (%; '-': absent from the split's labels and predictions, left out of mIoU):",
             f"  {'class':<24} {'IoU':>7} {'Acc':>7}"]
    for name, iou, acc in zip(names, m["per_class_iou"], m["per_class_acc"]):
        lines.append(f"  {name[:24]:<24} " + " ".join("      -" if math.isnan(v) else f"{100 * v:7.2f}"
                                                       for v in (iou, acc)))
    if writer is not None:
        coding = "; reduce_zero_label: class k is label k + 1 of the dataset's files" if spec.reduce_zero_label else ""
        lines.append(f"predictions: {len(dataset)} PNG label maps in {args.save_predictions} (the model's class "
                     f"indices 0..{model.num_classes - 1}{coding})")
    return "\n".join(lines)


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
