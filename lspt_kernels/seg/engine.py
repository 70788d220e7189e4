"""The segmentation recipe's optimisation and evaluation, one call per iteration / per evaluation, for
`lspt-train` and `lspt-eval` (or any loop) to drive.

The recipe of SETR's ADE20K configs as the prompt-tuning papers use it (docs/segmentation.md cites the
lines): SGD, momentum 0.9, weight decay 0, lr 0.001 with the heads at 10x (mmcv's custom_keys 'head':
lr_mult 10), poly decay per iteration lr = (base - min_lr) (1 - i / total)^0.9 + min_lr with min_lr 1e-4
for every parameter group (mmcv's PolyLrUpdaterHook: min_lr is absolute, not scaled by the group's
multiplier), set before iteration i's update.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

from .inference import InferenceConfig, inference
from .metrics import IoUAccumulator

__all__ = ["build_optimizer", "poly_lr", "set_poly_lr", "train_step", "evaluate"]


def _unwrap(model):
    """The SegmentationModel inside a DistributedDataParallel (or the model itself)."""
    return getattr(model, "module", model)


def build_optimizer(model, lr: float = 0.001, momentum: float = 0.9, weight_decay: float = 0.0,
                    head_lr_mult: float = 10.0) -> torch.optim.SGD:
    """SGD over the model's trainable parameters: the encoder's (prompts, LSPT / GaPT parameters) at lr,
    the heads' at lr * head_lr_mult. Each group keeps its "base_lr" for `set_poly_lr`."""
    model = _unwrap(model)
    head_ids = {id(p) for module in model.heads().values() for p in module.parameters()}
    params = model.trainable_parameters()
    groups = [dict(name="encoder", params=[p for p in params if id(p) not in head_ids], lr=lr),
              dict(name="heads", params=[p for p in params if id(p) in head_ids], lr=lr * head_lr_mult)]
    groups = [dict(g, base_lr=g["lr"]) for g in groups if g["params"]]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


def poly_lr(base_lr: float, iteration: int, total: int, power: float = 0.9, min_lr: float = 1e-4) -> float:
    """mmcv's poly schedule: (base_lr - min_lr) * (1 - iteration / total) ** power + min_lr."""
    if not 0 <= iteration <= total:
        raise ValueError(f"iteration {iteration} must be in [0, total={total}]")
    return (base_lr - min_lr) * (1 - iteration / total) ** power + min_lr


def set_poly_lr(optimizer: torch.optim.Optimizer, iteration: int, total: int, power: float = 0.9,
                min_lr: float = 1e-4) -> None:
    for group in optimizer.param_groups:
        group["lr"] = poly_lr(group["base_lr"], iteration, total, power, min_lr)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def train_step(model, optimizer: torch.optim.Optimizer, images: Tensor, labels: Tensor, iteration: int,
               total: int, *, power: float = 0.9, min_lr: float = 1e-4, amp_dtype: torch.dtype | None = None,
               scaler: torch.amp.GradScaler | None = None) -> dict:
    """One iteration: the poly learning rates of `iteration` (0-based), forward in training mode (main
    and auxiliary logits), the weighted loss, backward, the update. `model` may be a DDP wrapper.
    Returns {"loss": float, "lr": the first group's lr, "correct": int, "labelled": int}: the pixels the
    main logits classify right, out of the labelled ones (mmseg's training accuracy acc_seg, over the labelled
    pixels as later mmseg versions; SETR's divides by all of them). A loss
    that is NaN or inf raises FloatingPointError before anything is updated."""
    module = _unwrap(model)
    model.train()
    set_poly_lr(optimizer, iteration, total, power, min_lr)
    with _autocast(images.device, amp_dtype):
        outputs = model(images)
    loss = module.loss(outputs, labels)
    with torch.no_grad():          # mmseg's decode head computes this accuracy in every iteration too
        main = outputs[0] if isinstance(outputs, tuple) else outputs
        labelled = labels != module.ignore_index
        correct = ((main.argmax(1) == labels) & labelled).sum()
        value, correct, labelled = torch.stack([loss.detach().double(), correct.double(),
                                                labelled.sum().double()]).tolist()    # one host sync
    correct, labelled = int(correct), int(labelled)
    if not math.isfinite(value):
        raise FloatingPointError(f"the training loss is {value} at iteration {iteration + 1}")
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return {"loss": value, "lr": optimizer.param_groups[0]["lr"], "correct": correct, "labelled": labelled}


def evaluate(model, dataset, config: InferenceConfig = InferenceConfig(), *, device=None,
             amp_dtype: torch.dtype | None = None, rank: int = 0, world_size: int = 1, workers: int = 0,
             on_prediction=None, progress: bool = False) -> dict:
    """mIoU, aAcc, mAcc and per-class IoU / accuracy of `model` on a SegmentationDataset with the test
    transform (images at their own size), each image inferred as `config` says (SS or MS+flip) and
    scored at its original size. Rank r of world_size infers images r, r + world_size, ... and the sums
    are all-reduced, so every rank returns the split's metrics. on_prediction(index, (H, W) int64 label
    map) is called for every image this rank infers (e.g. to write PNGs)."""
    module = _unwrap(model)
    device = torch.device(device) if device is not None else next(module.parameters()).device
    was_training = module.training
    module.eval()
    meter = IoUAccumulator(module.num_classes, module.ignore_index, device)
    # Its own generator for the workers' base seed: evaluating never draws from the global RNG (a training run's
    # dropout stream is the same whether or not, and how often, it evaluates).
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=range(rank, len(dataset), world_size),
                                         num_workers=workers, generator=torch.Generator())
    if progress:
        from tqdm import tqdm
        loader = tqdm(loader, desc="eval", unit="img", disable=rank != 0)
    try:
        for sample in loader:
            image, label = sample["image"][None].to(device), sample["label"].to(device)
            with _autocast(device, amp_dtype):
                probs = inference(module, image, module.num_classes, config, module.align_corners)
            pred = probs.argmax(1)[0]
            meter.update(pred, label)
            if on_prediction is not None:
                on_prediction(int(sample["index"]), pred.cpu())
    finally:
        module.train(was_training)
    meter.all_reduce()
    return meter.compute()
