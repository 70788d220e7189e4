"""Test-time inference as mmseg 0.x (the code SETR ships, fudan-zvg/SETR mmseg/models/segmentors/
encoder_decoder.py and mmseg/datasets/pipelines/test_time_aug.py):

- each test image is resized keeping its aspect to the scale (2048, 512) times a ratio, as mmcv's
  `imrescale` (scale factor min(2048 r / long side, 512 r / short side), sizes rounded half up);
- the model runs on the whole image or on sliding windows (crop 512, stride 341: windows start every
  stride, the last one flush with the border, a window never larger than the image), the windows'
  logits summed and divided by how many windows cover each pixel (`slide_inference`);
- the logits are resized back to the original image size (bilinear), turned into probabilities with a
  softmax, flipped back when the input was flipped; multi-scale (ratios 0.5 ... 1.75) with flip
  averages those probabilities over every (ratio, flip) pair (`aug_test`).

The images given here are already normalised; mmseg resizes the 8-bit image before normalising, which
differs only by the rounding of the resized pixels (bilinear resizing and the per-channel affine
normalisation commute).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .heads import upsample

__all__ = ["InferenceConfig", "MS_RATIOS", "as_pair", "protocol_scale", "protocol_stride", "rescale_size",
           "slide_inference", "inference"]

MS_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)      # SETR's *_MS.py configs: img_ratios


def protocol_scale(crop: int) -> tuple[int, int]:
    """The (long, short) resize scale of the ADE20K protocol for a square crop: (2048, 512) at the protocol's
    crop 512, (4 crop, crop) for another crop (the same proportions)."""
    return 4 * crop, crop


def protocol_stride(crop: int) -> int:
    """The sliding window's stride for a square crop: 341 at 512 (PUP.py's test_cfg), 2 crop // 3 for another."""
    return max(1, 2 * crop // 3)


def as_pair(name: str, value) -> tuple[int, int]:
    """(h, w) from an int or a pair of positive ints; anything else is a ValueError naming `name`."""
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) else None
    if pair is None or len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return pair


@dataclass(frozen=True)
class InferenceConfig:
    """How `inference` runs. mode "slide" | "whole"; crop_size / stride (h, w) of the windows; scale: the
    (long, short) edge limits of the test resize; ratios: one resize per ratio (SS: (1.0,)); flip: also
    run every resize flipped horizontally; min_short_side: SETR's multi-scale variant (its Resize with
    setr_multi_scale=True) keeps the short side at least this long (the crop size) and drops the
    long-side limit; None (default) is mmseg's plain rule."""

    mode: str = "slide"
    crop_size: tuple[int, int] = (512, 512)
    stride: tuple[int, int] = (341, 341)
    scale: tuple[int, int] = (2048, 512)
    ratios: tuple[float, ...] = (1.0,)
    flip: bool = False
    min_short_side: int | None = None

    def __post_init__(self):
        if self.mode not in ("slide", "whole"):
            raise ValueError(f"mode must be 'slide' or 'whole', got {self.mode!r}")
        object.__setattr__(self, "crop_size", as_pair("crop_size", self.crop_size))
        object.__setattr__(self, "stride", as_pair("stride", self.stride))
        object.__setattr__(self, "scale", as_pair("scale", self.scale))
        ratios = tuple(self.ratios) if isinstance(self.ratios, (tuple, list)) else (self.ratios,)
        if not ratios or not all(isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0 for r in ratios):
            raise ValueError(f"ratios must be positive numbers, got {self.ratios!r}")
        object.__setattr__(self, "ratios", tuple(float(r) for r in ratios))
        if self.min_short_side is not None:
            as_pair("min_short_side", self.min_short_side)

    @classmethod
    def for_crop(cls, crop: int, **options) -> "InferenceConfig":
        """The SS protocol for square training crops of side `crop`: windows of the crop, `protocol_stride`
        and `protocol_scale` (at 512: crop 512, stride 341, scale (2048, 512), the defaults)."""
        return cls(**{"crop_size": crop, "stride": protocol_stride(crop), "scale": protocol_scale(crop), **options})

    @classmethod
    def multi_scale(cls, **options) -> "InferenceConfig":
        """The MS protocol: ratios 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, each also flipped."""
        return cls(**{"ratios": MS_RATIOS, "flip": True, **options})


def rescale_size(height: int, width: int, scale: tuple[int, int], ratio: float = 1.0,
                 min_short_side: int | None = None) -> tuple[int, int]:
    """(new_h, new_w) of a keep-aspect resize, as mmseg: the scale times the ratio, truncated to ints
    (MultiScaleFlipAug), then mmcv's imrescale factor min(long / long side, short / short side) and
    sizes int(x * factor + 0.5). With min_short_side, SETR's variant: factor max(short, min_short_side) /
    short side, no long-side limit."""
    long_edge, short_edge = int(max(scale) * ratio), int(min(scale) * ratio)
    if min_short_side is not None:
        factor = max(short_edge, min_short_side) / min(height, width)
    else:
        factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def slide_inference(logits_fn, images: Tensor, num_classes: int, crop_size=(512, 512), stride=(341, 341)) -> Tensor:
    """mmseg's sliding window: logits_fn(crop) -> (B, num_classes, h, w) logits of each window at its
    own size; the windows' logits are summed into the image and divided by each pixel's window count.
    A window is never larger than the image (no padding)."""
    (h_crop, w_crop), (h_stride, w_stride) = as_pair("crop_size", crop_size), as_pair("stride", stride)
    B, _, H, W = images.shape
    h_grids = max(H - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(W - w_crop + w_stride - 1, 0) // w_stride + 1
    preds = images.new_zeros((B, num_classes, H, W), dtype=torch.float32)
    count = images.new_zeros((1, 1, H, W), dtype=torch.float32)
    for i in range(h_grids):
        for j in range(w_grids):
            y2, x2 = min(i * h_stride + h_crop, H), min(j * w_stride + w_crop, W)
            y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
            logits = logits_fn(images[:, :, y1:y2, x1:x2])
            if logits.shape != (B, num_classes, y2 - y1, x2 - x1):
                raise ValueError(f"logits_fn returned {tuple(logits.shape)} for a window of {(y2 - y1, x2 - x1)}; "
                                 f"expected {(B, num_classes, y2 - y1, x2 - x1)} (logits at the window's size)")
            preds[:, :, y1:y2, x1:x2] += logits.float()
            count[:, :, y1:y2, x1:x2] += 1
    return preds / count


def inference(logits_fn, images: Tensor, num_classes: int, config: InferenceConfig = InferenceConfig(),
              align_corners: bool = False) -> Tensor:
    """Class probabilities (B, num_classes, H, W) at the images' own size: for every ratio (and flip),
    resize the (normalised) images as `rescale_size`, run `config.mode`, resize the logits back,
    softmax, undo the flip; the mean over all of them (mmseg's aug_test; SS is one ratio, no flip).
    logits_fn: images -> logits at their size, e.g. a SegmentationModel in eval mode."""
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, C, H, W) floating-point tensor, got {got}")
    H, W = images.shape[-2:]
    probs, n = None, 0
    with torch.no_grad():
        for ratio in config.ratios:
            size = rescale_size(H, W, config.scale, ratio, config.min_short_side)
            resized = images if size == (H, W) else F.interpolate(images, size=size, mode="bilinear",
                                                                  align_corners=False)
            for flip in (False, True) if config.flip else (False,):
                x = resized.flip(-1) if flip else resized
                if config.mode == "slide":
                    logits = slide_inference(logits_fn, x, num_classes, config.crop_size, config.stride)
                else:
                    logits = logits_fn(x).float()
                p = upsample(logits, (H, W), align_corners).softmax(1)
                p = p.flip(-1) if flip else p
                probs = p if probs is None else probs.add_(p)
                n += 1
    return probs / n
