"""Segmentation metrics as mmseg 0.x computes them (fudan-zvg/SETR mmseg/core/evaluation/mean_iou.py and
mmseg/datasets/custom.py `evaluate`): per class, the intersection, the union, the predicted and the
labelled areas are summed over the whole split (pixels labelled ignore_index skipped); then

    IoU_c = intersection_c / union_c        (NaN when the union is empty: the class is absent)
    mIoU  = mean of IoU_c over the classes with a non-empty union
    aAcc  = sum of intersections / labelled pixels        (pixel accuracy)
    mAcc  = mean over classes with labelled pixels of intersection_c / labelled_c

`IoUAccumulator` keeps the four sums as one int64 tensor, so batches add up exactly and data-parallel
ranks combine with one all_reduce.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["IoUAccumulator", "area_counts"]


def area_counts(pred: Tensor, label: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """(4, num_classes) int64: intersection, union, predicted and labelled area of every class over
    the non-ignored pixels of pred and label (integer tensors of one shape). A label outside
    [0, num_classes) that is not ignore_index is an error, never a silently dropped pixel."""
    if pred.shape != label.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and label {tuple(label.shape)} must have the same shape")
    if pred.is_floating_point() or label.is_floating_point():
        raise TypeError(f"pred and label must be integer class maps, got {pred.dtype} and {label.dtype}")
    keep = label != ignore_index
    pred, label = pred[keep].long(), label[keep].long()
    bad = (label < 0) | (label >= num_classes)
    if bool(bad.any()):
        raise ValueError(f"label values {torch.unique(label[bad])[:5].tolist()} are outside [0, {num_classes}) "
                         f"and not the ignore_index {ignore_index}")
    if bool(((pred < 0) | (pred >= num_classes)).any()):
        raise ValueError(f"pred holds values outside [0, {num_classes})")
    inter = torch.bincount(label[pred == label], minlength=num_classes)
    area_pred = torch.bincount(pred, minlength=num_classes)
    area_label = torch.bincount(label, minlength=num_classes)
    return torch.stack([inter, area_pred + area_label - inter, area_pred, area_label])


class IoUAccumulator:
    """Sums of `area_counts` over a split. update(pred, label) per batch (any shapes, e.g. (B, H, W));
    all_reduce() sums them over the ranks of the default process group (no-op without one); compute()
    gives mIoU, aAcc, mAcc and the per-class IoU / accuracy (NaN for an absent class)."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device=None):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.totals = torch.zeros(4, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: Tensor, label: Tensor) -> None:
        self.totals += area_counts(pred, label, self.num_classes, self.ignore_index).to(self.totals.device)

    def all_reduce(self) -> None:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.totals)

    def compute(self) -> dict:
        inter, union, _, labelled = self.totals.double().cpu()
        iou = torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(inter, math.nan))
        acc = torch.where(labelled > 0, inter / labelled.clamp_min(1), torch.full_like(inter, math.nan))
        present = union > 0
        total = float(labelled.sum())
        return dict(mIoU=float(iou[present].mean()) if bool(present.any()) else math.nan,
                    aAcc=float(inter.sum()) / total if total else math.nan,
                    mAcc=float(acc[labelled > 0].mean()) if bool((labelled > 0).any()) else math.nan,
                    per_class_iou=iou.tolist(), per_class_acc=acc.tolist())
