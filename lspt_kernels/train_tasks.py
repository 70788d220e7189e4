"""What `lspt-train` does differently per task. `train.py` runs the same stages for both (setup, resume,
wrap_model, train_one_epoch, validate, save_epoch / save_state, with the same output folder, lock, resume
state, DDP, Ctrl-C and robustness rules); a Task gives it the parts that differ:

- classification: the official VPT/GaPT recipe (docs/training.md), counted in epochs: a per-epoch warm-up +
  cosine schedule, the lr given for a batch of 256, top-1 on the val split;
- segmentation: SETR-PUP on ADE20K (docs/segmentation.md), counted in iterations: the crops of
  `lspt_kernels.seg`'s pipeline, its `train_step` (poly lr per iteration, heads at 10x), single-scale mIoU
  (sliding window) on the val split every --eval-interval iterations.

Progress is one number, the "position": epochs done (classification) or iterations done (segmentation).
A round is what runs between two validations: one epoch, or the iterations up to the next multiple of
--eval-interval. resume.pt, the log and the tuned files record positions, so a resumed run (even with
another --eval-interval) continues from the exact iteration where the saved one stopped.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from .cli_helpers import UsageError, amp_dtype, autocast_context, build_backbone, check_number
from .data import DataError, ImageDataset, build_transform, detect_layout, load_dataset
from .encoders import from_timm
from .evaluate import evaluate
from .seg import (
    EvalTransform,
    InferenceConfig,
    IterationSampler,
    SegmentationDataset,
    SegmentationModel,
    TrainTransform,
    build_optimizer,
    default_feature_blocks,
    detect_segmentation_layout,
    load_segmentation_dataset,
)
from .seg import evaluate as evaluate_segmentation
from .seg import train_step as segmentation_step
from .seg.engine import set_poly_lr
from .seg.inference import protocol_scale, protocol_stride

__all__ = ["TASKS", "TASK_OPTIONS", "detect_task", "resolve_task_options", "make_task", "warmup_cosine",
           "ClassificationTask", "SegmentationTask"]

TASKS = ("classification", "segmentation")
# The options whose default depends on the task, and those only one task takes: task -> {option: default}.
# On the command line they default to None ("not given"); an option of the other task's table is an error.
TASK_OPTIONS = {
    "classification": dict(epochs=100, warmup_epochs=10, lr=0.4, batch_size=64, img_size=None, pool=None,
                           limit_train_batches=None),
    "segmentation": dict(iters=160_000, eval_interval=16_000, crop_size=512, lr=0.001, batch_size=16,
                         head_lr_mult=10.0, min_lr=1e-4, poly_power=0.9, head_channels=256, num_classes=None,
                         reduce_zero_label=None, ignore_index=255),
}
WHY = {"classification": "classification counts --epochs", "segmentation": "segmentation counts --iters and "
       "trains crops of --crop-size"}


def detect_task(data) -> str:
    """The task of a --data folder: "segmentation" when it has a segmentation layout
    (`seg.detect_segmentation_layout`), else "classification" (whose loader names what is wrong with a
    folder that has neither). A folder with both, or with an images/ or annotations/ folder but neither
    layout (a segmentation dataset not laid out as expected), is a UsageError."""
    segmentation = detect_segmentation_layout(data) is not None
    try:
        detect_layout(data)
        classification = True
    except (DataError, OSError):
        classification = False
    if segmentation and classification:
        raise UsageError(f"--data {data} holds both a classification and a segmentation layout: pass --task")
    if not (segmentation or classification) and any((Path(data) / d).is_dir() for d in ("images", "annotations")):
        raise UsageError(f"--data {data} has an images/ or annotations/ folder but no segmentation layout: expected "
                         "images/{train,val} and annotations/{train,val} (generic) or "
                         "ADEChallengeData2016/{images,annotations}/{training,validation} (ade20k); pass --task "
                         "classification if it is a classification dataset")
    return "segmentation" if segmentation else "classification"


def resolve_task_options(args: argparse.Namespace) -> None:
    """Fill in `args.task` (detected from --data when not given) and the task's defaults of the options left
    at None; an option that only the other task takes is a UsageError naming it."""
    if args.task is None:
        args.task = detect_task(args.data)
    own = TASK_OPTIONS[args.task]
    other = next(t for t in TASKS if t != args.task)
    foreign = [k for k in TASK_OPTIONS[other] if k not in own and getattr(args, k) is not None]
    if foreign:
        names = ", ".join(f"--{k.replace('_', '-')}" for k in foreign)
        hint = " (--crop-size sets the backbone's size)" if "img_size" in foreign else ""
        raise UsageError(f"{names} {'applies' if len(foreign) == 1 else 'apply'} to --task {other} only; this run is "
                         f"--task {args.task} ({WHY[args.task]}){hint}")
    for option, default in own.items():
        if getattr(args, option) is None:
            setattr(args, option, default)


def make_task(args):
    """The Task of a command line whose task options are resolved (`resolve_task_options`)."""
    return {"classification": ClassificationTask, "segmentation": SegmentationTask}[args.task](args)


def warmup_cosine(warmup: int, total: int):
    """The official per-epoch factor (KMnP/vpt src/solver/lr_scheduler.py WarmupCosineSchedule): linear
    from 0 over `warmup` epochs, then half a cosine down to 0 at `total`."""
    def factor(epoch: int) -> float:
        if epoch < warmup:
            return epoch / max(1.0, warmup)
        progress = (epoch - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return factor


def build_prompt_encoder(args, model_kwargs: dict, enc_kwargs: dict, img_size, num_classes: int):
    """The backbone (seeded, so lspt-eval can rebuild a random one), then the encoder around it."""
    vit = build_backbone(args.model, img_size, model_kwargs, args.seed)
    torch.manual_seed(args.seed)
    try:
        return from_timm(vit, checkpoint=args.checkpoint, method=args.method, num_classes=num_classes, **enc_kwargs)
    except TypeError as exc:          # an option this version of the encoders does not take
        raise UsageError(f"--method {args.method} does not take these options {sorted(enc_kwargs)}: {exc}") from None


def _loader_generator(args, position: int) -> torch.Generator:
    """Shuffling and worker seeds: a function of (seed, position), never of the global RNG."""
    g = torch.Generator()
    g.manual_seed(args.seed * 100003 + position)
    return g


class Task:
    """What `train.py` asks of a task, built from the resolved command line. Class attributes: name; unit,
    the log's position key ("epoch" | "iteration"); round_name; metric, the log key of the validation score
    (a percentage, higher is better); metric_label, its words. Both tasks implement: check_numbers,
    load_data, check_data, backbone_kwargs, build_model, encoder_of, effective_lr, optimizer (-> optimizer,
    scheduler or None), records (-> this task's identity and record entries), datasets, total, round_end,
    span, train_loader, step (-> loss, images, correct, counted), validate, continue_schedule, log_row,
    log_line."""

    name = unit = round_name = metric = metric_label = ""

    def __init__(self, args: argparse.Namespace):
        self.args = args

    def after(self, position: int) -> str:
        """Words for a position: "epoch 3", "iteration 16000"."""
        return f"{self.unit} {position}"

    def progress(self, position: int, score) -> dict:
        """The entries a tuned file's record gets for where it was saved and its score."""
        return {self.unit: position, self.metric: score}


class ClassificationTask(Task):
    name, unit, round_name, metric, metric_label = "classification", "epoch", "epoch", "val_acc", "val accuracy"

    def check_numbers(self) -> None:
        a = self.args
        for name, bound in dict(epochs=dict(ge=1), warmup_epochs=dict(ge=0), limit_train_batches=dict(ge=1),
                                img_size=dict(ge=1)).items():
            if getattr(a, name) is not None:
                check_number(f"--{name.replace('_', '-')}", getattr(a, name), **bound)
        if a.warmup_epochs >= a.epochs:
            raise UsageError(f"--warmup-epochs {a.warmup_epochs} must be less than --epochs {a.epochs}: the "
                             f"warm-up starts at lr 0 and reaches --lr only after {a.warmup_epochs} epoch(s), so this "
                             f"run would never train at the lr asked for (e.g. --warmup-epochs {a.epochs // 10})")

    def load_data(self):
        return load_dataset(self.args.data, self.args.layout)

    def check_data(self, spec, world: int) -> None:
        """Every process gets at least one full batch per epoch. With several processes the loader drops an
        incomplete batch (as the official one), and DistributedSampler gives each process ceil(images / world)."""
        batch_size, images = self.args.batch_size, len(spec.splits[self.args.train_split])
        if images < world:
            raise UsageError(f"the train split has {images} image(s), fewer than the {world} processes: use fewer "
                             "processes (--nproc_per_node) or more data")
        per_process, share = batch_size // world, -(-images // world)
        if world > 1 and share < per_process:
            raise UsageError(f"--batch-size {batch_size} over {world} processes is {per_process} images per process "
                             f"and step, but the {images} train images give each process {share}: no full batch "
                             f"(incomplete batches are dropped with several processes); use --batch-size <= "
                             f"{world * share}")

    def backbone_kwargs(self, model_kwargs: dict) -> tuple[int | None, dict]:
        """(image size, timm keywords) of the backbone."""
        return self.args.img_size, model_kwargs

    def build_model(self, spec, model_kwargs: dict, enc_kwargs: dict):
        encoder = build_prompt_encoder(self.args, model_kwargs, enc_kwargs, self.args.img_size, spec.num_classes)
        if self.args.grad_checkpointing:
            encoder.set_grad_checkpointing(True)
        return encoder

    def encoder_of(self, module):
        return module

    def effective_lr(self) -> float:
        return self.args.lr * self.args.batch_size / 256

    def optimizer(self, module, lr: float):
        a = self.args
        optimizer = torch.optim.SGD(module.trainable_parameters(), lr=lr, momentum=a.momentum,
                                    weight_decay=a.weight_decay)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(a.warmup_epochs, a.epochs))

    def records(self, spec, world: int) -> tuple[dict, dict]:
        """(identity, record) entries of this task beyond the shared ones."""
        return {}, dict(eval_batch_size=self.args.batch_size // world)

    def datasets(self, spec, record: dict, rank: int, world: int, device):
        """(train dataset, val dataset, val loader or None, distributed sampler or None)."""
        a, (img_size, mean, std) = self.args, (record["img_size"], record["mean"], record["std"])
        train_ds = ImageDataset(spec.splits[a.train_split], build_transform(spec.layout, img_size, mean, std, True))
        val_ds = ImageDataset(spec.splits[a.val_split], build_transform(spec.layout, img_size, mean, std, False))
        sampler = None
        if world > 1:
            sampler = torch.utils.data.DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True,
                                                          seed=a.seed)
        val_loader = torch.utils.data.DataLoader(val_ds, batch_size=a.batch_size // world, shuffle=False,
                                                 num_workers=a.workers, pin_memory=device.type == "cuda")
        return train_ds, val_ds, val_loader, sampler

    @property
    def total(self) -> int:
        return self.args.epochs

    def round_end(self, position: int) -> int:
        return position + 1

    def span(self, position: int) -> str:
        """Words for the round that starts at `position`."""
        return f"epoch {position + 1}"

    def train_loader(self, run, position: int):
        """(the round's batches, how many of them to run)."""
        if run.sampler is not None:
            run.sampler.set_epoch(position)
        a = self.args
        loader = torch.utils.data.DataLoader(
            run.train_ds, batch_size=a.batch_size // run.world, shuffle=run.sampler is None, sampler=run.sampler,
            generator=_loader_generator(a, position), num_workers=a.workers, pin_memory=run.device.type == "cuda",
            drop_last=run.world > 1)                     # as the official loader with several GPUs
        limit = a.limit_train_batches
        return loader, len(loader) if limit is None else min(len(loader), limit)

    def step(self, run, batch, position: int, step: int):
        """Forward, cross-entropy, backward and optimizer step on one batch: (loss, images, correct, counted),
        the counts of the training accuracy (images here) as device tensors (no host sync per step)."""
        images, labels = (t.to(run.device, non_blocking=True) for t in batch)
        with autocast_context(run.device, run.amp):
            logits = run.model(images)
        loss = F.cross_entropy(logits.float(), labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the training loss is {loss.item()} at epoch {position + 1} step "
                                     f"{step + 1}: lower --lr (the last good state is in {run.out})")
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        return loss.detach(), labels.numel(), (logits.detach().argmax(-1) == labels).sum(), labels.numel()

    def validate(self, run):
        """Top-1 (%) on the val split, on rank 0 alone (the others return None), so the logged accuracy is
        exactly what lspt-eval reports for the saved file."""
        if run.rank != 0:
            return None
        return evaluate(run.module, run.val_loader, run.device, run.amp)[0]

    def continue_schedule(self, run, position: int) -> None:
        """The saved groups carry the saved lr / momentum / decay: recompute them from this command line, so a
        resume with more --epochs continues on the new schedule (unchanged settings give the same numbers)."""
        a, lr = self.args, run.effective_lr
        factor = warmup_cosine(a.warmup_epochs, a.epochs)(position)
        run.scheduler.base_lrs = [lr] * len(run.optimizer.param_groups)
        for g in run.optimizer.param_groups:
            g.update(initial_lr=lr, lr=lr * factor, momentum=a.momentum, weight_decay=a.weight_decay)
        run.scheduler._last_lr = [g["lr"] for g in run.optimizer.param_groups]

    def log_row(self, end: int, stats: dict, score, peak_gb: float) -> dict:
        return dict(epoch=end, train_loss=stats["train_loss"], train_acc=stats["train_acc"], val_acc=score,
                    lr=stats["lr"], images_per_s=stats["images_per_s"], peak_memory_gb=peak_gb,
                    epoch_time_s=stats["epoch_time_s"])

    def log_line(self, row: dict) -> str:
        return (f"epoch {row['epoch']}/{self.args.epochs}  train_loss {row['train_loss']:.4f}  "
                f"train_acc {row['train_acc']:.1f}%  val_acc {row['val_acc']:.2f}%  lr {row['lr']:.3g}  "
                f"{row['images_per_s']:.1f} img/s  peak {row['peak_memory_gb']:.2f} GB")


class SegmentationTask(Task):
    name, unit, round_name, metric, metric_label = ("segmentation", "iteration", "evaluation interval", "val_miou",
                                                    "val mIoU")

    def check_numbers(self) -> None:
        a = self.args
        for name, bound in dict(iters=dict(ge=1), eval_interval=dict(ge=1), crop_size=dict(ge=1),
                                head_lr_mult=dict(gt=0), min_lr=dict(ge=0), poly_power=dict(gt=0),
                                head_channels=dict(ge=1), num_classes=dict(ge=1), ignore_index={}).items():
            if getattr(a, name) is not None:
                check_number(f"--{name.replace('_', '-')}", getattr(a, name), **bound)
        lowest = a.lr * min(1.0, a.head_lr_mult)
        if a.min_lr > lowest:
            raise UsageError(f"--min-lr {a.min_lr} must not exceed the lowest starting lr {lowest:g} (--lr {a.lr}, "
                             f"--head-lr-mult {a.head_lr_mult}): the poly schedule decays each lr towards --min-lr")

    def load_data(self):
        a = self.args
        return load_segmentation_dataset(a.data, a.layout, num_classes=a.num_classes,
                                         reduce_zero_label=a.reduce_zero_label, ignore_index=a.ignore_index,
                                         splits=(a.train_split, a.val_split))

    def check_data(self, spec, world: int) -> None:
        """Nothing to check: the iteration sampler's stream of epochs never runs dry, whatever the batch."""

    def backbone_kwargs(self, model_kwargs: dict) -> tuple[int, dict]:
        """The backbone at the crop size (its position embedding resampled to the crop's grid when a checkpoint
        is loaded), with dynamic_img_size=True: inference runs it on windows and images of other sizes."""
        if model_kwargs.get("dynamic_img_size", True) is not True:
            raise UsageError("--model-kwargs dynamic_img_size=False: segmentation needs dynamic_img_size=True (the "
                             "sliding windows of images smaller than the crop, and multi-scale inference, run the "
                             "backbone at other sizes); leave it out")
        return self.args.crop_size, {"dynamic_img_size": True, **model_kwargs}

    def build_model(self, spec, model_kwargs: dict, enc_kwargs: dict):
        a = self.args
        encoder = build_prompt_encoder(a, model_kwargs, enc_kwargs, a.crop_size, 1)
        try:
            default_feature_blocks(encoder.depth)
        except ValueError:
            raise UsageError(f"--model {a.model!r} has {encoder.depth} block(s): SETR-PUP's heads read three distinct "
                             "blocks (scaled from blocks 5, 9 and 12 of ViT-B), so segmentation needs a ViT of at "
                             "least 3 blocks (--model-kwargs depth=N)") from None
        model = SegmentationModel(encoder, spec.num_classes, channels=a.head_channels, ignore_index=spec.ignore_index)
        if a.grad_checkpointing:
            model.set_grad_checkpointing(True)
        return model

    def encoder_of(self, module):
        return module.encoder

    def effective_lr(self) -> float:
        return self.args.lr                             # as SETR's configs: not scaled by the batch

    def optimizer(self, module, lr: float):
        a = self.args
        return build_optimizer(module, lr=lr, momentum=a.momentum, weight_decay=a.weight_decay,
                               head_lr_mult=a.head_lr_mult), None

    def inference_config(self, crop: int | None = None) -> InferenceConfig:
        """Single-scale test: sliding windows of the crop (`InferenceConfig.for_crop`)."""
        return InferenceConfig.for_crop(crop or self.args.crop_size)

    def records(self, spec, world: int) -> tuple[dict, dict]:
        crop = self.args.crop_size
        return (dict(reduce_zero_label=spec.reduce_zero_label),
                dict(reduce_zero_label=spec.reduce_zero_label, stride=protocol_stride(crop),
                     scale=list(protocol_scale(crop))))

    def datasets(self, spec, record: dict, rank: int, world: int, device):
        a, (mean, std) = self.args, (record["mean"], record["std"])
        transform = TrainTransform(crop_size=a.crop_size, scale=protocol_scale(a.crop_size), mean=mean, std=std,
                                   ignore_index=spec.ignore_index)
        train_ds = SegmentationDataset.from_spec(spec, a.train_split, transform)
        return train_ds, SegmentationDataset.from_spec(spec, a.val_split, EvalTransform(mean, std)), None, None

    @property
    def total(self) -> int:
        return self.args.iters

    def round_end(self, position: int) -> int:
        interval = self.args.eval_interval
        return min((position // interval + 1) * interval, self.args.iters)

    def span(self, position: int) -> str:
        return f"iterations {position + 1}-{self.round_end(position)}"

    def train_loader(self, run, position: int):
        """The global batches of iterations position..round_end - 1 (`IterationSampler`: each sample's
        augmentation is seeded by its place in the stream, so workers and resumes see the same crops)."""
        a, end = self.args, self.round_end(position)
        sampler = IterationSampler(len(run.train_ds), a.batch_size, end, seed=a.seed, start=position, rank=run.rank,
                                   world_size=run.world)
        loader = torch.utils.data.DataLoader(run.train_ds, batch_sampler=sampler, num_workers=a.workers,
                                             pin_memory=run.device.type == "cuda",
                                             generator=_loader_generator(a, position))
        return loader, end - position

    def step(self, run, batch, position: int, step: int):
        """One iteration of `seg.train_step` (poly lr of this iteration, main + auxiliary losses):
        (loss, images, correct pixels, labelled pixels)."""
        a = self.args
        images = batch["image"].to(run.device, non_blocking=True)
        labels = batch["label"].to(run.device, non_blocking=True)
        try:
            out = segmentation_step(run.model, run.optimizer, images, labels, position + step, a.iters,
                                    power=a.poly_power, min_lr=a.min_lr, amp_dtype=amp_dtype(run.amp),
                                    scaler=run.scaler)
        except FloatingPointError as exc:
            raise FloatingPointError(f"{exc}: lower --lr (the last good state is in {run.out})") from None
        return torch.tensor(out["loss"], dtype=torch.float64), images.shape[0], out["correct"], out["labelled"]

    def validate(self, run):
        """Single-scale mIoU (%) on the val split (`seg.evaluate`, what lspt-eval computes), its images shared
        by the processes; every process returns it. Rank 0's BatchNorm statistics (the ones saved) are given
        to every process first, so each infers with the model of the saved file."""
        if run.world > 1:
            import torch.distributed as dist
            for buffer in run.module.buffers():
                dist.broadcast(buffer, src=0)
        metrics = evaluate_segmentation(run.module, run.val_ds, self.inference_config(), device=run.device,
                                        amp_dtype=amp_dtype(run.amp), rank=run.rank, world_size=run.world,
                                        workers=self.args.workers, progress=sys.stderr.isatty() and run.rank == 0)
        if metrics["mIoU"] != metrics["mIoU"]:
            raise DataError(f"the {self.args.val_split} split has no labelled pixel (every label is the ignore index "
                            f"{run.spec.ignore_index}): its mIoU is undefined")
        return 100 * metrics["mIoU"]

    def continue_schedule(self, run, position: int) -> None:
        """The groups' base lr (the heads' x --head-lr-mult), momentum and decay from this command line; the
        poly lr of each iteration follows from them (and --iters, --min-lr, --poly-power)."""
        a = self.args
        for g in run.optimizer.param_groups:
            g.update(base_lr=a.lr * (a.head_lr_mult if g.get("name") == "heads" else 1.0), momentum=a.momentum,
                     weight_decay=a.weight_decay)
        set_poly_lr(run.optimizer, min(position, a.iters), a.iters, a.poly_power, a.min_lr)

    def log_row(self, end: int, stats: dict, score, peak_gb: float) -> dict:
        return dict(iteration=end, train_loss=stats["train_loss"], train_acc=stats["train_acc"], val_miou=score,
                    lr=stats["lr"], images_per_s=stats["images_per_s"], peak_memory_gb=peak_gb,
                    time_s=stats["epoch_time_s"])

    def log_line(self, row: dict) -> str:
        return (f"iteration {row['iteration']}/{self.args.iters}  train_loss {row['train_loss']:.4f}  "
                f"pixel_acc {row['train_acc']:.1f}%  val_mIoU {row['val_miou']:.2f}%  lr {row['lr']:.3g}  "
                f"{row['images_per_s']:.1f} img/s  peak {row['peak_memory_gb']:.2f} GB")
