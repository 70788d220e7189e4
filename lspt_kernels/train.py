"""`lspt-train`: tune LSPT (or a baseline) on a classification dataset with the official VPT/GaPT recipe, or
on a segmentation dataset with SETR-PUP's (`--task segmentation`, detected from the data layout).

Classification (docs/training.md cites the official files): SGD with momentum 0.9, weight decay 0, a
per-epoch schedule with linear warm-up from 0 then cosine decay to 0, the learning rate given for a batch
of 256 and scaled by batch / 256, prompt dropout 0.1, GaPT's head init. Segmentation (docs/segmentation.md):
SETR-PUP and its auxiliary heads on the prompt-tuned encoder, SGD momentum 0.9, lr 0.001 with the heads at
10x, poly decay per iteration, 160k iterations of batch 16, validated every 16k. One process, or
data-parallel under torchrun (DDP over the tuned parameters only; gloo on the CPU, NCCL on GPUs, where the
heads' BatchNorm becomes SyncBatchNorm; rank 0 writes).

The run is a sequence of stages, as in timm's train.py, each a function of its own: `setup` (check the
command line, build the model, data and optimizer), `resume` (restore a saved run, or seed a new one),
then per round (an epoch, or an evaluation interval of iterations) `train_one_epoch`, `validate` and
`save_epoch` / `save_state`; `train` runs them in order. What differs between the tasks is a Task object
(`lspt_kernels.train_tasks`): data, model, optimizer and schedule, one step, the validation score.

Output directory: last.safetensors and best.safetensors (tuned parameters only, with the heads for
segmentation, written by `save_tuned` with the config and the training record inside, so `lspt-eval` rebuilds
the model from the file), resume.pt (parameters, optimizer, scheduler, RNG states, position: written at
the start and after every round, atomically), log.jsonl, curves.png, config.json.

Reproducibility: each epoch's shuffling and worker seeds come from (seed, epoch), each segmentation crop's
augmentation from (seed, its place in the sample stream); the global RNGs (prompt dropout, main-process
augmentation) are saved with every round's resume state, so `--resume` on the CPU ends bit-for-bit where an
uninterrupted run ends.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .backbones import is_eva
from .cli_helpers import (
    TRAIN_RECORD,
    HelpFormatter,
    OutputLock,
    UsageError,
    add_model_kwargs_option,
    backbone_fingerprint,
    check_amp,
    check_number,
    check_output_dir,
    error_message,
    model_kwargs_from_args,
    parse_bool,
    resolve_device,
)
from .data import IMAGENET_MEAN, IMAGENET_STD
from .encoders import METHODS, METHODS_WITHOUT_PROMPTS
from .train_tasks import TASK_OPTIONS, TASKS, Task, make_task, resolve_task_options, warmup_cosine

__all__ = ["build_parser", "main", "train", "warmup_cosine", "Run", "setup", "resume", "wrap_model",
           "train_one_epoch", "validate", "save_epoch", "save_state"]

# The recipe's values where the encoders' constructor defaults differ (those stay 0.0 / "torch").
RECIPE = dict(prompt_dropout=0.1, head_init="official")
# Options that only some methods take: option -> (methods, encoder keyword).
METHOD_OPTIONS = {
    "gate_init": (("gapt",), "gate_init"),
    "cspc": (("lspt",), "cspc"),
    "lpc": (("lspt",), "lpc"),
    "lstm_layers": (("lspt",), "lstm_layers"),
    "shared_lstm": (("lspt",), "shared_lstm"),
    "kmeans_steps": (("lspt",), "kmeans_steps"),
    "backend": (("lspt",), "backend"),
    "reduction_factor": (("adapter",), "reduction_factor"),
    "adapter_init": (("adapter",), "adapter_init"),
}
# What a resume.pt holds (save_state); a file without one of them is not a state this tool wrote. "epoch" is
# the position: epochs done, or iterations done for segmentation.
STATE_KEYS = ("epoch", "identity", "settings", "best_acc", "best_epoch", "tuned", "optimizer", "scheduler", "scaler",
              "rng")
# The files of a run in its output folder: a new run refuses a folder holding any of them.
RUN_FILES = ("config.json", "resume.pt", "log.jsonl", "last.safetensors", "best.safetensors")
# Settings a --resume may change (with a warning that the result will differ from an uninterrupted run).
RESUMABLE_CHANGES = ("epochs", "warmup_epochs", "batch_size", "lr", "seed", "momentum", "weight_decay",
                     "prompt_dropout", "world_size", "amp", "limit_train_batches", "iters", "eval_interval",
                     "head_lr_mult", "min_lr", "poly_power")

_on_step = None        # test hook: called as _on_step(position, step, loss) after every optimizer step


def _defaults(option: str) -> str:
    """The per-task defaults of an option, for its help."""
    return "; ".join(f"{task} {TASK_OPTIONS[task][option]}" for task in TASKS if option in TASK_OPTIONS[task])


class TrainParser(argparse.ArgumentParser):
    """lspt-train's parser: after parsing, the task is known (--task, or detected from --data) and every
    option left at None gets that task's default (`train_tasks.resolve_task_options`); an option of the other
    task is an error."""

    def parse_known_args(self, args=None, namespace=None):
        parsed, extras = super().parse_known_args(args, namespace)
        try:
            resolve_task_options(parsed)
        except UsageError as exc:
            self.error(str(exc))
        return parsed, extras


def build_parser() -> argparse.ArgumentParser:
    p = TrainParser(
        prog="lspt-train", formatter_class=HelpFormatter,
        description="Tune prompts (LSPT, GaPT, VPT), adapters or a linear probe on a frozen timm ViT: classification "
                    "with the official VPT/GaPT recipe, or semantic segmentation (SETR-PUP heads) with SETR's ADE20K "
                    "recipe. Multi-GPU: torchrun --standalone --nproc_per_node=N --no-python lspt-train ARGS (or "
                    "python -m torch.distributed.run ... -m lspt_kernels.train ARGS).")
    _data_options(p.add_argument_group("data"))
    _model_options(p.add_argument_group("model"))
    _optimisation_options(p.add_argument_group("optimisation"))
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default: cuda when available)")
    r.add_argument("--amp", default="auto", help="auto (bf16 on a GPU, none on the CPU) | bf16 | fp16 | none")
    r.add_argument("--grad-checkpointing", action="store_true", help="recompute blocks in backward")
    r.add_argument("--compile", action="store_true", help="torch.compile the model")
    r.add_argument("--output", required=True, help="output directory")
    r.add_argument("--resume", action="store_true", help="continue the run saved in --output")
    return p


def _data_options(d) -> None:
    d.add_argument("--data", required=True, help="dataset root: imagefolder (train/ val/ [test/]), VTAB-1k lists "
                   "(train800.txt ...) or FGVC json (train.json ...); segmentation: ADEChallengeData2016 (or its "
                   "parent) or images/{train,val} + annotations/{train,val} PNG label maps")
    d.add_argument("--task", default=None, choices=TASKS, help="default: segmentation when --data has a segmentation "
                   "layout, else classification")
    d.add_argument("--layout", default=None, help="imagefolder | vtab | fgvc; segmentation: ade20k | generic "
                   "(default: detected)")
    d.add_argument("--train-split", default="train", help="train | trainval (VTAB-1k's train800val200)")
    d.add_argument("--val-split", default="val", help="val | test: the split evaluated after every round")
    d.add_argument("--workers", type=int, default=2, help="data-loader processes per training process")
    d.add_argument("--num-classes", type=int, default=None, help="segmentation, generic layout: the classes (default: "
                   "classes.txt in --data, else the largest train label + 1; ADE20K: 150)")
    d.add_argument("--reduce-zero-label", type=parse_bool, default=None, metavar="BOOL", help="segmentation, generic "
                   "layout: label 0 is 'other' (ignored) and k is class k - 1 (default: false; ADE20K: true)")
    d.add_argument("--ignore-index", type=int, default=None, help="segmentation: the label value the loss and the "
                   f"metrics skip (default: {TASK_OPTIONS['segmentation']['ignore_index']})")


def _model_options(m) -> None:
    m.add_argument("--model", required=True, help="timm VisionTransformer or Eva name, e.g. vit_base_patch16_224, "
                   "vit_base_patch16_dinov3, eva02_base_patch14_224")
    m.add_argument("--img-size", type=int, default=None, help="classification: image size (default: the model's)")
    add_model_kwargs_option(m)
    m.add_argument("--checkpoint", default=None, help="backbone weights: MAE / MoCo v3 / plain state dict file "
                   "for a ViT; for an Eva a file of its release (DINOv3, EVA-02, ...), read by timm's checkpoint "
                   "filter (without it the backbone is randomly initialised from --seed)")
    m.add_argument("--method", required=True, choices=sorted(METHODS))
    m.add_argument("--num-prompts", type=int, default=None, help="prompt tokens (default: the encoder's)")
    m.add_argument("--prompt-dropout", type=float, default=RECIPE["prompt_dropout"],
                   help="dropout on the prompt tokens, one mask per image (official GaPT run.sh)")
    m.add_argument("--head-init", default=RECIPE["head_init"], choices=("official", "torch"),
                   help="classification: official: GaPT's kaiming-normal fan_out weight, bias -log(99); torch: "
                        "nn.Linear's")
    m.add_argument("--gate-init", type=float, default=None, help="gapt: initial gate logit magnitude")
    m.add_argument("--cspc", default=None, help="lspt: mean | kmeans | none")
    m.add_argument("--lpc", default=None, help="lspt: lstm | gru | transformer | none")
    m.add_argument("--lstm-layers", type=int, default=None, help="lspt: 1 | 2")
    m.add_argument("--shared-lstm", type=parse_bool, default=None, metavar="BOOL",
                   help="lspt: true | false (also 1/0, yes/no)")
    m.add_argument("--kmeans-steps", type=int, default=None, help="lspt: Lloyd steps for cspc=kmeans")
    m.add_argument("--backend", default=None, help="lspt: the fused step's backend (auto | cpu | triton | cuda "
                   "| eager/reference)")
    m.add_argument("--reduction-factor", type=int, default=None, help="adapter: hidden width D // this")
    m.add_argument("--adapter-init", default=None, help="adapter: official | zero-up")
    m.add_argument("--pool", default=None, help="classification: features the head sees (the encoders' POOLS; "
                   "default: chosen by from_timm from the checkpoint, e.g. MAE's average pooling)")
    m.add_argument("--crop-size", type=int, default=None, help="segmentation: training crop and sliding window side, "
                   "the backbone's size (default: 512); the resize scale is (4 crop, crop), the window stride 2 crop "
                   "// 3 (SETR's (2048, 512) and 341 at 512)")
    m.add_argument("--head-channels", type=int, default=None, help="segmentation: conv width of the SETR-PUP and "
                   "auxiliary heads (default: SETR's 256)")


def _optimisation_options(o) -> None:
    o.add_argument("--epochs", type=int, default=None, help="classification: total epochs (official "
                   f"base-prompt.yaml) (default: {TASK_OPTIONS['classification']['epochs']})")
    o.add_argument("--warmup-epochs", type=int, default=None, help="classification: linear warm-up from lr 0 (per "
                   f"epoch, as the official schedule) (default: {TASK_OPTIONS['classification']['warmup_epochs']})")
    o.add_argument("--iters", type=int, default=None, help="segmentation: total iterations (SETR's schedule_160k) "
                   f"(default: {TASK_OPTIONS['segmentation']['iters']})")
    o.add_argument("--eval-interval", type=int, default=None, help="segmentation: validate, save and log every N "
                   f"iterations (and at the end) (default: {TASK_OPTIONS['segmentation']['eval_interval']})")
    o.add_argument("--batch-size", type=int, default=None, help=f"global batch, split over the processes (default: "
                   f"{_defaults('batch_size')})")
    o.add_argument("--lr", type=float, default=None, help="classification: the base learning rate for a batch of 256, "
                   "the run uses lr * batch_size / 256; segmentation: the encoder's lr as given, the heads' x "
                   f"--head-lr-mult (default: {_defaults('lr')})")
    o.add_argument("--head-lr-mult", type=float, default=None, help="segmentation: the heads' lr over --lr "
                   f"(SETR's lr_mult) (default: {TASK_OPTIONS['segmentation']['head_lr_mult']:g})")
    o.add_argument("--min-lr", type=float, default=None, help="segmentation: the poly schedule's final lr, for every "
                   f"parameter group (default: {TASK_OPTIONS['segmentation']['min_lr']:g})")
    o.add_argument("--poly-power", type=float, default=None, help="segmentation: the poly schedule's power "
                   f"(default: {TASK_OPTIONS['segmentation']['poly_power']:g})")
    o.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    o.add_argument("--weight-decay", type=float, default=0.0, help="SGD weight decay (GaPT run.sh, SETR's ViT "
                   "configs: 0)")
    o.add_argument("--seed", type=int, default=42, help="backbone init (without --checkpoint), prompts, heads, "
                   "shuffling, augmentation, dropout")
    o.add_argument("--limit-train-batches", type=int, default=None,
                   help="classification: stop every epoch after this many batches (smoke runs, throughput "
                        "measurements)")


@dataclass
class Run:
    """What `setup` builds and the later stages read and update (timm's train.py keeps these as locals of
    its main). `module` is what is tuned and saved: the encoder (classification) or the SegmentationModel
    around it; `model` is it as it is trained: wrapped in DDP and/or torch.compile by `wrap_model`. Positions
    (start_epoch, best_epoch) count epochs, or iterations for segmentation; best_acc is the best validation
    score so far (top-1 or mIoU, in %)."""
    args: argparse.Namespace
    out: Path
    rank: int
    world: int
    device: torch.device
    amp: str
    task: Task
    spec: object            # data.DatasetSpec | seg.data.SegmentationSpec
    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR | None    # None: the task sets the lr per step (segmentation)
    scaler: torch.amp.GradScaler
    train_ds: torch.utils.data.Dataset
    val_ds: torch.utils.data.Dataset
    val_loader: torch.utils.data.DataLoader | None
    sampler: torch.utils.data.DistributedSampler | None
    identity: dict          # what --resume must find unchanged (_records)
    settings: dict          # every setting of the run (config.json)
    record: dict            # what the tuned files record under TRAIN_RECORD (lspt-eval rebuilds from it)
    model: nn.Module | None = None
    start_epoch: int = 0
    best_acc: float = -1.0
    best_epoch: int = 0
    rows: list[dict] = field(default_factory=list)

    @property
    def encoder(self) -> nn.Module:
        """The prompt-tuned encoder (the module itself for classification)."""
        return self.task.encoder_of(self.module)

    @property
    def effective_lr(self) -> float:
        return self.settings["effective_lr"]

    def say(self, *a, **k) -> None:
        """print on rank 0 only."""
        if self.rank == 0:
            print(*a, **k, flush=True)


# ---------------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------------
def _atomic_write(path: Path, write) -> None:
    """write(tmp_path) then rename: a crash, Ctrl-C or a full disk never leaves a half-written file behind,
    nor the temporary one; `path` keeps its last complete version. A full disk is an OSError that says so."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(exc.errno, f"no space left on the device writing {path} (its previous version, if any, is "
                                     "kept): free some space, then continue with --resume") from None
        raise


def _torch_save(obj, path: Path) -> None:
    """torch.save through a Python file, so a failed write is the OSError of that write (with its errno),
    not a RuntimeError of torch's zip writer."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def _rng_state() -> dict:
    state = dict(torch=torch.get_rng_state(), python=random.getstate(),
                 numpy=[np.random.get_state()[0], torch.from_numpy(np.random.get_state()[1].copy()),
                        *np.random.get_state()[2:]])
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy(), *n[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20     # Linux reports KiB


def _plot_curves(rows: list[dict], path: Path, task: Task) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x = [r[task.unit] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(x, [r["train_loss"] for r in rows], marker="o")
    a.set_xlabel(task.unit), a.set_ylabel("train loss"), a.grid(alpha=0.3)
    b.plot(x, [r[task.metric] for r in rows], marker="o", color="tab:green")
    b.set_xlabel(task.unit), b.set_ylabel(f"{task.metric_label} (%)"), b.grid(alpha=0.3)
    fig.tight_layout()
    _atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# set-up
# ---------------------------------------------------------------------------------------------------
def _encoder_options(args) -> dict:
    """The encoder keyword arguments of this command line; a method option given to another method is an
    error, not silently dropped."""
    kw = dict(head_init=args.head_init)
    if args.method not in METHODS_WITHOUT_PROMPTS:
        kw["prompt_dropout"] = args.prompt_dropout
        if args.num_prompts is not None:
            kw["num_prompts"] = args.num_prompts
    elif args.num_prompts is not None:
        raise UsageError(f"--num-prompts: --method {args.method} has no prompts")
    if args.pool is not None:
        kw["pool"] = args.pool
    for opt, (methods, key) in METHOD_OPTIONS.items():
        value = getattr(args, opt)
        if value is None:
            continue
        if args.method not in methods:
            raise UsageError(f"--{opt.replace('_', '-')} applies to {', '.join(methods)} only, not --method "
                             f"{args.method}")
        kw[key] = value
    return kw


def _check_numbers(args, task: Task) -> None:
    """Every numeric option finite and in its range (NaN and inf pass argparse's float), then the task's own
    (e.g. a warm-up that ends before the run does)."""
    bounds = dict(batch_size=dict(ge=1), workers=dict(ge=0), lr=dict(gt=0), momentum=dict(ge=0, lt=1),
                  weight_decay=dict(ge=0), prompt_dropout=dict(ge=0, lt=1), seed=dict(ge=0, lt=2**31), gate_init={})
    for name, bound in bounds.items():
        if getattr(args, name) is not None:
            check_number(f"--{name.replace('_', '-')}", getattr(args, name), **bound)
    task.check_numbers()
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        raise UsageError(f"--checkpoint {args.checkpoint}: no such file")


def _check_output(out: Path, resume: bool) -> None:
    """Refuse to overwrite another run, and find an unwritable directory before any work is done."""
    if resume and not (out / "resume.pt").is_file():
        raise UsageError(f"--resume: {out} holds no resume state (resume.pt); start the run without --resume")
    found = [f for f in RUN_FILES if (out / f).exists()] if out.is_dir() else []
    if not resume and found:
        raise UsageError(f"--output {out} already holds a run ({', '.join(found)}): pass --resume to continue it, or "
                         "choose another --output (nothing there was changed)")
    check_output_dir(out)


def _setup_distributed(device_arg: str | None):
    """(rank, world_size, device) from torchrun's environment; one process without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_arg)
    if world == 1:
        return 0, 1, device
    import torch.distributed as dist
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not dist.is_initialized():
        import datetime
        # Rank 0 alone evaluates classification runs (so the logged accuracy is exactly what lspt-eval reports);
        # the others wait for it at the next collective, which a large val split can keep busy past 30 min.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=4))
    return rank, world, device


def _normalisation(vit, checkpoint) -> tuple[tuple, tuple]:
    """MAE / MoCo v3 checkpoints were trained on ImageNet statistics; a timm model's own config is used
    otherwise (ImageNet mean/std when it names none): without a checkpoint, and for an Eva, whose file is
    a release of that model read by timm's filter (EVA-02's CLIP statistics, DINOv3's ImageNet ones)."""
    cfg = getattr(vit, "pretrained_cfg", None) or {}
    if (checkpoint is None or is_eva(vit)) and "mean" in cfg and "std" in cfg:
        return tuple(cfg["mean"]), tuple(cfg["std"])
    return IMAGENET_MEAN, IMAGENET_STD


def _records(args, task: Task, module, spec, model_kwargs: dict, amp: str, device, world: int):
    """(identity, settings, record): what makes a saved run this run (a --resume that differs in any entry is
    refused: backbone_seed is the seed of a random backbone, None with --checkpoint; backbone_sha256 the
    fingerprint of its weights), config.json, and the tuned files' record."""
    encoder = task.encoder_of(module)
    img_size = encoder.vit.patch_embed.img_size[0]
    mean, std = _normalisation(encoder.vit, args.checkpoint)
    own_identity, own_record = task.records(spec, world)
    identity = dict(task=task.name, method=args.method, model=args.model, img_size=img_size, model_kwargs=model_kwargs,
                    checkpoint=str(Path(args.checkpoint).resolve()) if args.checkpoint else None,
                    backbone_seed=None if args.checkpoint else args.seed,
                    backbone_sha256=backbone_fingerprint(encoder.vit), num_classes=spec.num_classes,
                    classes=spec.classes, encoder=module.config(), **own_identity)
    others = {k for t, table in TASK_OPTIONS.items() if t != task.name for k in table} - set(TASK_OPTIONS[task.name])
    given = {k: v for k, v in vars(args).items() if k not in others}          # the other task's options are None
    settings = dict(given, img_size=img_size, layout=spec.layout, amp=amp, device=str(device),
                    world_size=world, effective_lr=task.effective_lr(), mean=list(mean), std=list(std),
                    num_classes=spec.num_classes, model_kwargs=model_kwargs, encoder=module.config(),
                    trainable_params=sum(p.numel() for p in module.trainable_parameters()),
                    versions=dict(torch=str(torch.__version__), timm=str(__import__("timm").__version__)))
    record = dict(model=args.model, img_size=img_size, model_kwargs=model_kwargs, seed=args.seed,
                  checkpoint=identity["checkpoint"], backbone_sha256=identity["backbone_sha256"], classes=spec.classes,
                  layout=spec.layout, mean=list(mean), std=list(std), amp=amp, **own_record)
    return identity, settings, record


def setup(args) -> Run:
    """Set-up: check the command line (every check that needs no disk first), start the processes, build
    the model, the data and the optimizer; rank 0 checks --output before anything is written. `args` comes
    from `build_parser()`, which has resolved the task and its defaults."""
    task = make_task(args)
    _check_numbers(args, task)
    enc_kwargs = _encoder_options(args)
    img_size, model_kwargs = task.backbone_kwargs(model_kwargs_from_args(args))
    rank, world, device = _setup_distributed(args.device)
    amp = check_amp(args.amp, device)
    if args.batch_size % world:
        raise UsageError(f"--batch-size {args.batch_size} is the global batch: it must be divisible by the "
                         f"{world} processes")
    spec = task.load_data()
    for split in (args.train_split, args.val_split):
        if split not in spec.splits:
            raise UsageError(f"split {split!r} not found in {args.data} (layout {spec.layout}; has "
                             f"{sorted(spec.splits)})")
    task.check_data(spec, world)
    module = task.build_model(spec, model_kwargs, enc_kwargs).to(device)
    out = Path(args.output)
    if rank == 0:
        _check_output(out, args.resume)
    identity, settings, record = _records(args, task, module, spec, model_kwargs, amp, device, world)
    optimizer, scheduler = task.optimizer(module, settings["effective_lr"])
    scaler = torch.amp.GradScaler("cuda", enabled=(amp == "fp16"))
    train_ds, val_ds, val_loader, sampler = task.datasets(spec, record, rank, world, device)
    return Run(args=args, out=out, rank=rank, world=world, device=device, amp=amp, task=task, spec=spec,
               module=module, optimizer=optimizer, scheduler=scheduler, scaler=scaler, train_ds=train_ds,
               val_ds=val_ds, val_loader=val_loader, sampler=sampler, identity=identity, settings=settings,
               record=record)


# ---------------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------------
def _check_same_run(run: Run, state: dict) -> None:
    """Refuse another run's state; warn about changed hyper-parameters. An entry the saved identity lacks
    (a state written before it was recorded) is not compared."""
    saved = state["identity"]
    diff = [f"{k}: saved {saved.get(k)!r}, now {run.identity[k]!r}" for k in run.identity
            if k in saved and saved[k] != run.identity[k]]
    if diff:
        raise UsageError(f"--resume: {run.out} holds a different run; " + "; ".join(diff[:4]) +
                         " (use the saved settings, or another --output)")
    changed = {k: (state["settings"].get(k), run.settings.get(k)) for k in RESUMABLE_CHANGES
               if state["settings"].get(k) != run.settings.get(k)}
    if changed:
        run.say("lspt-train: warning: resuming with changed settings " +
                ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()) +
                "; the run will not match an uninterrupted one", file=sys.stderr)


def _damaged(path: Path, what: str) -> UsageError:
    return UsageError(f"--resume: {path} {what}: the file is damaged (a copy cut short, a full disk, an edit?); "
                      "restore it, or start the run again in another --output")


def _load_state(path: Path) -> dict:
    """resume.pt as save_state wrote it, or one error naming the file and what to do."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling, zip, EOF and OS errors all mean "cannot be read"
        raise _damaged(path, f"cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
    if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS):
        have = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise _damaged(path, f"is not a resume state of lspt-train (expected the entries {list(STATE_KEYS)}, got "
                             f"{have})")
    types = dict(identity=dict, settings=dict, tuned=dict, rng=list, epoch=int, best_epoch=int, best_acc=(int, float))
    wrong = [k for k, t in types.items() if not isinstance(state[k], t)]
    if wrong:
        raise _damaged(path, f"holds entries of the wrong type: {wrong}")
    return state


def _restore(run: Run, state: dict, path: Path) -> None:
    """The saved tuned tensors (parameters, and the heads' BatchNorm statistics), optimizer, scheduler, grad
    scaler and RNG streams into the run's own."""
    own = {n: tuple(t.shape) for n, t in run.module.tuned_state_dict().items()}
    saved = {n: tuple(t.shape) if isinstance(t, torch.Tensor) else None for n, t in state["tuned"].items()}
    if saved != own:
        raise _damaged(path, f"holds tuned tensors {saved} where this run has {own}")
    targets = run.module.state_dict(keep_vars=True)
    try:
        with torch.no_grad():
            for n, t in state["tuned"].items():
                targets[n].copy_(t)
        run.optimizer.load_state_dict(state["optimizer"])
        if run.scheduler is not None:
            run.scheduler.load_state_dict(state["scheduler"])
        run.scaler.load_state_dict(state["scaler"])
        rngs = state["rng"]
        if len(rngs) == run.world:
            _set_rng_state(rngs[run.rank])
        else:
            run.say(f"lspt-train: warning: saved with {len(rngs)} processes, resumed with {run.world}: RNG streams "
                    "are reseeded", file=sys.stderr)
            torch.manual_seed(run.args.seed + 1000 * run.rank + state["epoch"])
    except (KeyError, IndexError, ValueError, TypeError, RuntimeError) as exc:
        raise _damaged(path, f"has an optimizer, scheduler, scaler or RNG state that does not fit ({exc})") from None


def _read_log(path: Path, upto: int, key: str = "epoch") -> list[dict]:
    """The rows of log.jsonl up to position `upto` (the rows' `key`: epoch, or iteration); a damaged line is an
    error naming the file and line."""
    rows = []
    for n, line in enumerate(path.read_bytes().decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            row = exc.msg
        if not isinstance(row, dict) or not isinstance(row.get(key), int):
            raise UsageError(f"--resume: {path}:{n} is not a log row ({str(row)[:60]}; got {line[:40]!r}): delete that "
                             "line (that row is then missing from the log), or the whole file")
        rows.append(row)
    return [r for r in rows if r[key] <= upto]


def resume(run: Run) -> None:
    """Resume: with --resume, restore the tuned tensors, optimizer, scheduler, grad scaler, RNG streams,
    position, best score and log of the run saved in --output (refusing another run's state, and a damaged one);
    without it, seed this process's own RNG streams (prompt dropout, augmentation)."""
    args = run.args
    if not args.resume:
        # Each process its own dropout / augmentation stream; the same one on every run with this seed.
        torch.manual_seed(args.seed + 1000 * run.rank)
        np.random.seed(args.seed + run.rank)
        random.seed(args.seed + run.rank)
        return
    path = run.out / "resume.pt"
    state = _load_state(path)
    _check_same_run(run, state)
    _restore(run, state, path)
    run.task.continue_schedule(run, state["epoch"])
    run.start_epoch, run.best_acc, run.best_epoch = state["epoch"], state["best_acc"], state["best_epoch"]
    log = run.out / "log.jsonl"
    if log.is_file():
        run.rows = _read_log(log, run.start_epoch, run.task.unit)


def wrap_model(run: Run) -> None:
    """The model the rounds train: the module in DDP over several processes (only the tuned parameters take
    part: the backbone's have requires_grad=False; the segmentation heads' BatchNorm statistics are rank 0's,
    broadcast at every forward, and on GPUs the BatchNorm layers become SyncBatchNorm, statistics over the
    global batch as SETR's SyncBN), compiled with --compile."""
    model = run.module
    if run.world > 1:
        from torch.nn.parallel import DistributedDataParallel
        model = sync_batchnorm(run.module, run.device)
        model = DistributedDataParallel(model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    run.model = torch.compile(model) if run.args.compile else model


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` with its BatchNorm layers as SyncBatchNorm (same parameters and statistics, same state-dict
    names) on a GPU; unchanged on the CPU, where SyncBatchNorm does not run (each process then normalises its
    own share of the batch)."""
    if device.type != "cuda":
        return module
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)


# ---------------------------------------------------------------------------------------------------
# one epoch
# ---------------------------------------------------------------------------------------------------
def train_one_epoch(run: Run, epoch: int) -> dict:
    """Train one round from position `epoch` (epochs done, counted from 0; for segmentation the iterations
    done, the round running to the next multiple of --eval-interval; classification runs at most
    --limit-train-batches batches). Returns, over all processes: train_loss, train_acc (% of images, or of
    labelled pixels), the lr at the round's end, images_per_s (from the end of the first step, so loader
    start-up and lazy initialisation are left out) and epoch_time_s."""
    task = run.task
    loader, steps = task.train_loader(run, epoch)
    run.model.train()
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    bar = None
    if sys.stderr.isatty() and run.rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=steps, desc=f"{task.span(epoch)}/{task.total}", leave=False, dynamic_ncols=True)
    # Running sums stay on the device: no host sync per step (the segmentation step syncs for its own checks).
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    correct_sum = torch.zeros((), dtype=torch.int64, device=run.device)
    counted_sum = torch.zeros((), dtype=torch.int64, device=run.device)
    seen = seen1 = 0
    t0 = t1 = time.perf_counter()
    for step, batch in enumerate(loader):
        if step >= steps:
            break
        loss, n, correct, counted = task.step(run, batch, epoch, step)
        loss_sum += loss.double() * n
        seen += n
        if step == 0:
            if run.device.type == "cuda":
                torch.cuda.synchronize(run.device)
            t1, seen1 = time.perf_counter(), seen
        correct_sum += correct
        counted_sum += counted
        if _on_step is not None:
            _on_step(epoch, step, loss)
        if bar is not None:
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}",
                            acc=f"{100 * correct_sum.item() / max(1, counted_sum.item()):.1f}%",
                            img_s=f"{seen * run.world / (time.perf_counter() - t0):.1f}")
            bar.update(1)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    elapsed = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    timed, timed_s = (seen - seen1, t0 + elapsed - t1) if seen > seen1 else (seen, elapsed)
    totals = torch.tensor([loss_sum.item(), float(seen), float(correct_sum.item()), float(timed),
                           float(counted_sum.item())], dtype=torch.float64)
    if run.world > 1:
        import torch.distributed as dist
        dist.all_reduce(totals)
    return dict(train_loss=totals[0].item() / totals[1].item(),
                train_acc=100 * totals[2].item() / max(1.0, totals[4].item()),
                lr=run.optimizer.param_groups[0]["lr"], images_per_s=totals[3].item() / timed_s, epoch_time_s=elapsed)


def validate(run: Run) -> float | None:
    """Validate: the task's score on the --val-split, what lspt-eval reports for the saved file: top-1 (%) on
    rank 0 alone (the others return None), or single-scale mIoU (%) over all processes."""
    return run.task.validate(run)


# ---------------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------------
def _save_tuned(run: Run, name: str, epoch: int, score: float) -> None:
    record = {TRAIN_RECORD: dict(run.record, **run.task.progress(epoch, score))}
    _atomic_write(run.out / name, lambda p: run.module.save_tuned(p, record))


def save_epoch(run: Run, epoch: int, stats: dict, val_acc: float | None) -> None:
    """Save after the round that ends at position `epoch` (epochs done, counted from 1; iterations done for
    segmentation), on rank 0: the log row (log.jsonl), last.safetensors, best.safetensors when the validation
    score (`val_acc`: top-1, or mIoU) rose (strictly), curves.png and the round's line; every process then
    holds rank 0's best."""
    if run.rank == 0:
        row = run.task.log_row(epoch, stats, val_acc, _peak_memory_gb(run.device))
        run.rows.append(row)
        _atomic_write(run.out / "log.jsonl", lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in run.rows)))
        _save_tuned(run, "last.safetensors", epoch, val_acc)
        if val_acc > run.best_acc:
            run.best_acc, run.best_epoch = val_acc, epoch
            _save_tuned(run, "best.safetensors", epoch, val_acc)
        _plot_curves(run.rows, run.out / "curves.png", run.task)
        print(run.task.log_line(row), flush=True)
    if run.world > 1:
        import torch.distributed as dist
        best = [run.best_acc, run.best_epoch]
        dist.broadcast_object_list(best, src=0)
        run.best_acc, run.best_epoch = best


def save_state(run: Run, epoch: int) -> None:
    """Save the resume state at position `epoch` (0: before the first round) to resume.pt, atomically: tuned
    tensors, optimizer, scheduler, grad scaler, the RNG states of every process, best so far."""
    if run.world == 1:
        rngs = [_rng_state()]
    else:
        import io

        import torch.distributed as dist
        buf = io.BytesIO()
        torch.save(_rng_state(), buf)
        # Bytes, not tensors: all_gather_object cannot unpickle tensors it gathered here.
        packed = [None] * run.world
        dist.all_gather_object(packed, buf.getvalue())
        rngs = [torch.load(io.BytesIO(b), weights_only=True) for b in packed]
    if run.rank != 0:
        return
    state = dict(epoch=epoch, identity=run.identity, settings=run.settings, best_acc=run.best_acc,
                 best_epoch=run.best_epoch,
                 tuned={n: t.detach().cpu().clone() for n, t in run.module.tuned_state_dict().items()},
                 optimizer=run.optimizer.state_dict(),
                 scheduler=run.scheduler.state_dict() if run.scheduler is not None else None,
                 scaler=run.scaler.state_dict(), rng=rngs)
    _atomic_write(run.out / "resume.pt", lambda p: _torch_save(state, p))


# ---------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------
def _announce(run: Run) -> None:
    """config.json (a new run) and the settings, data and start lines."""
    args = run.args
    if run.rank == 0 and not args.resume:
        _atomic_write(run.out / "config.json", lambda p: p.write_text(json.dumps(run.settings, indent=2, default=str)))
    run.say("lspt-train settings (defaults included):")
    for k in sorted(run.settings):
        run.say(f"  {k} = {run.settings[k]}")
    run.say(run.spec.summary())
    if args.checkpoint is None:
        run.say(f"note: no --checkpoint: the backbone is randomly initialised (seed {args.seed})")
    if args.resume:
        run.say(f"resuming {run.out} after {run.task.after(run.start_epoch)} (best {run.task.metric_label} "
                f"{run.best_acc:.2f}% at {run.task.after(run.best_epoch)})")


def _check_finite(run: Run, start: int, end: int) -> None:
    """After a round's updates, before anything of it is saved: tuned tensors with NaN or inf (an lr or
    momentum that made the run diverge within the round) stop the run, so no file ever holds them and a NaN
    model's argmax never becomes a "best" score."""
    bad = [n for n, t in run.module.tuned_state_dict().items() if not bool(torch.isfinite(t).all())]
    if bad:
        task = run.task
        raise FloatingPointError(f"the run diverged: the tuned parameters {bad[:5]} hold NaN or inf after "
                                 f"{task.after(end)}; nothing of that {task.round_name} was saved: lower --lr (the "
                                 f"state after {task.after(start)} is in {run.out / 'resume.pt'})")


def _run_epochs(run: Run) -> int:
    """The rounds from run.start_epoch; Ctrl-C returns 130 with the last completed round's state on disk."""
    task, position = run.task, run.start_epoch
    try:
        while position < task.total:
            end = task.round_end(position)
            stats = train_one_epoch(run, position)
            _check_finite(run, position, end)
            if run.scheduler is not None:
                run.scheduler.step()
            save_epoch(run, end, stats, validate(run))
            save_state(run, end)
            position = end
    except KeyboardInterrupt:
        if run.rank == 0:
            saved = _saved_epoch(run.out)
            print(f"\nlspt-train: interrupted in {task.span(position)}; {run.out}/resume.pt holds the state after "
                  f"{task.after(saved) if isinstance(saved, int) else saved}: continue with the same command and "
                  "--resume", file=sys.stderr, flush=True)
        return 130
    return 0


def train(args) -> int:
    """lspt-train end to end: set-up, then, with --output locked by rank 0 for the life of the run (a second
    run on it is refused), resume and per round train_one_epoch, validate, save. Ctrl-C exits with status
    130, the state of the last completed round on disk."""
    run = setup(args)
    with OutputLock(run.out) if run.rank == 0 else contextlib.nullcontext():
        if run.rank == 0:
            _check_output(run.out, args.resume)     # again, now that no other run can write there
        resume(run)
        wrap_model(run)
        _announce(run)
        if not args.resume:
            save_state(run, 0)
        if _run_epochs(run) == 130:
            return 130
        if run.world > 1:
            _check_in_sync(run.module, run.world)
    run.say(f"best {run.task.metric_label}: {run.best_acc:.2f}% ({run.task.after(run.best_epoch)}) -> "
            f"{run.out / 'best.safetensors'}")
    return 0


def _check_in_sync(module, world: int) -> None:
    """DDP keeps every process's tuned parameters equal (and the last validation gave every process rank 0's
    BatchNorm statistics); a divergence (e.g. a parameter DDP did not see) would make rank 0's files describe
    only part of the run, so it is an error."""
    import torch.distributed as dist
    flat = torch.cat([t.detach().float().flatten().cpu() for t in module.tuned_state_dict().values()])
    stats = torch.stack([flat.sum(), flat.abs().sum(), flat.square().sum()]).double()
    low, high = stats.clone(), stats.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError(f"the {world} processes ended with different tuned parameters ({low.tolist()} vs "
                           f"{high.tolist()})")


def _saved_epoch(out: Path):
    try:
        return torch.load(out / "resume.pt", map_location="cpu", weights_only=True)["epoch"]
    except Exception:  # pragma: no cover - only for the message
        return "?"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return train(args)
    except (ValueError, FloatingPointError) as exc:     # UsageError, DataError and the models' checks
        print(f"lspt-train: error: {error_message(exc)}", file=sys.stderr, flush=True)
        return 2
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"lspt-train: error: {exc.strerror}", file=sys.stderr, flush=True)
        return 1
    finally:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch.distributed as dist
            if dist.is_initialized():
                # The DDP wrapper (in reference cycles) holds the process group: collect it now, not during
                # interpreter shutdown, where its gloo threads can abort the process after a finished run.
                import gc
                gc.collect()
                dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
