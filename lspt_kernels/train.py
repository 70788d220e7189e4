"""`lspt-train`: tune LSPT (or a baseline) on a dataset with the official VPT/GaPT recipe.

The recipe (docs/training.md cites the official files): SGD with momentum 0.9, weight decay 0, a
per-epoch schedule with linear warm-up from 0 then cosine decay to 0, the learning rate given for a batch
of 256 and scaled by batch / 256, prompt dropout 0.1, GaPT's head init. One process, or data-parallel
under torchrun (DDP over the tuned parameters only; gloo on the CPU, NCCL on GPUs; rank 0 writes).

The run is a sequence of stages, as in timm's train.py, each a function of its own: `setup` (check the
command line, build the encoder, data and optimizer), `resume` (restore a saved run, or seed a new one),
then per epoch `train_one_epoch`, `validate` and `save_epoch` / `save_state`; `train` runs them in order.

Output directory: last.safetensors and best.safetensors (tuned parameters only, written by
`encoder.save_tuned` with the encoder config and the training record inside, so `lspt-eval` rebuilds the
encoder from the file), resume.pt (parameters, optimizer, scheduler, RNG states, epoch: written at the
start and after every epoch, atomically), log.jsonl, curves.png, config.json.

Reproducibility: each epoch's shuffling and worker seeds come from (seed, epoch); the global RNGs (prompt
dropout, main-process augmentation) are saved with every epoch's resume state, so `--resume` on the CPU ends
bit-for-bit where an uninterrupted run ends.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbones import is_eva
from .cli_helpers import (
    TRAIN_RECORD,
    OutputLock,
    UsageError,
    add_model_kwargs_option,
    autocast_context,
    backbone_fingerprint,
    build_backbone,
    check_amp,
    check_number,
    check_output_dir,
    error_message,
    model_kwargs_from_args,
    parse_bool,
    resolve_device,
)
from .data import IMAGENET_MEAN, IMAGENET_STD, DatasetSpec, ImageDataset, build_transform, load_dataset
from .encoders import METHODS, METHODS_WITHOUT_PROMPTS, from_timm
from .evaluate import evaluate

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
# What makes a saved run the same run: a --resume that differs in any of these is refused. backbone_seed is
# the seed of a random backbone (None with --checkpoint), backbone_sha256 the fingerprint of its weights.
IDENTITY = ("method", "model", "img_size", "model_kwargs", "checkpoint", "backbone_seed", "backbone_sha256",
            "num_classes", "classes", "encoder")
# What a resume.pt holds (save_state); a file without one of them is not a state this tool wrote.
STATE_KEYS = ("epoch", "identity", "settings", "best_acc", "best_epoch", "tuned", "optimizer", "scheduler", "scaler",
              "rng")
# The files of a run in its output folder: a new run refuses a folder holding any of them.
RUN_FILES = ("config.json", "resume.pt", "log.jsonl", "last.safetensors", "best.safetensors")
# Settings a --resume may change (with a warning that the result will differ from an uninterrupted run).
RESUMABLE_CHANGES = ("epochs", "warmup_epochs", "batch_size", "lr", "seed", "momentum", "weight_decay",
                     "prompt_dropout", "world_size", "amp", "limit_train_batches")

_on_step = None        # test hook: called as _on_step(epoch, step, loss) after every optimizer step


def warmup_cosine(warmup: int, total: int):
    """The official per-epoch factor (KMnP/vpt src/solver/lr_scheduler.py WarmupCosineSchedule): linear
    from 0 over `warmup` epochs, then half a cosine down to 0 at `total`."""
    def factor(epoch: int) -> float:
        if epoch < warmup:
            return epoch / max(1.0, warmup)
        progress = (epoch - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return factor


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lspt-train", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Tune prompts (LSPT, GaPT, VPT), adapters or a linear probe on a frozen timm ViT with the "
                    "official VPT/GaPT recipe. Multi-GPU: torchrun --standalone --nproc_per_node=N --no-python "
                    "lspt-train ARGS (or python -m torch.distributed.run ... -m lspt_kernels.train ARGS).")
    d = p.add_argument_group("data")
    d.add_argument("--data", required=True, help="dataset root: imagefolder (train/ val/ [test/]), VTAB-1k "
                   "lists (train800.txt ...) or FGVC json (train.json ...)")
    d.add_argument("--layout", default=None, help="imagefolder | vtab | fgvc (default: detected)")
    d.add_argument("--train-split", default="train", help="train | trainval (VTAB-1k's train800val200)")
    d.add_argument("--val-split", default="val", help="val | test: the split evaluated after every epoch")
    d.add_argument("--workers", type=int, default=2, help="data-loader processes per training process")
    m = p.add_argument_group("model")
    m.add_argument("--model", required=True, help="timm VisionTransformer or Eva name, e.g. vit_base_patch16_224, "
                   "vit_base_patch16_dinov3, eva02_base_patch14_224")
    m.add_argument("--img-size", type=int, default=None, help="image size (default: the model's)")
    add_model_kwargs_option(m)
    m.add_argument("--checkpoint", default=None, help="backbone weights: MAE / MoCo v3 / plain state dict file "
                   "for a ViT; for an Eva a file of its release (DINOv3, EVA-02, ...), read by timm's checkpoint "
                   "filter (without it the backbone is randomly initialised from --seed)")
    m.add_argument("--method", required=True, choices=sorted(METHODS))
    m.add_argument("--num-prompts", type=int, default=None, help="prompt tokens (default: the encoder's)")
    m.add_argument("--prompt-dropout", type=float, default=RECIPE["prompt_dropout"],
                   help="dropout on the prompt tokens, one mask per image (official GaPT run.sh)")
    m.add_argument("--head-init", default=RECIPE["head_init"], choices=("official", "torch"),
                   help="official: GaPT's kaiming-normal fan_out weight, bias -log(99); torch: nn.Linear's")
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
    m.add_argument("--pool", default=None, help="features the head sees (the encoders' POOLS; default: chosen by "
                   "from_timm from the checkpoint, e.g. MAE's average pooling)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=100, help="total epochs (official base-prompt.yaml)")
    o.add_argument("--warmup-epochs", type=int, default=10, help="linear warm-up from lr 0 (per epoch, as the "
                   "official schedule)")
    o.add_argument("--batch-size", type=int, default=64, help="global batch (split over the processes)")
    o.add_argument("--lr", type=float, default=0.4, help="base learning rate for a batch of 256; the run uses "
                   "lr * batch_size / 256")
    o.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    o.add_argument("--weight-decay", type=float, default=0.0, help="SGD weight decay (GaPT run.sh: 0)")
    o.add_argument("--seed", type=int, default=42, help="backbone init (without --checkpoint), prompts, "
                   "shuffling, dropout")
    o.add_argument("--limit-train-batches", type=int, default=None,
                   help="stop every epoch after this many batches (smoke runs, throughput measurements)")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default: cuda when available)")
    r.add_argument("--amp", default="auto", help="auto (bf16 on a GPU, none on the CPU) | bf16 | fp16 | none")
    r.add_argument("--grad-checkpointing", action="store_true", help="recompute blocks in backward")
    r.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    r.add_argument("--output", required=True, help="output directory")
    r.add_argument("--resume", action="store_true", help="continue the run saved in --output")
    return p


@dataclass
class Run:
    """What `setup` builds and the later stages read and update (timm's train.py keeps these as locals of
    its main). `model` is the encoder as it is trained: wrapped in DDP and/or torch.compile by `wrap_model`."""
    args: argparse.Namespace
    out: Path
    rank: int
    world: int
    device: torch.device
    amp: str
    spec: DatasetSpec
    encoder: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    train_ds: ImageDataset
    val_loader: torch.utils.data.DataLoader
    sampler: torch.utils.data.DistributedSampler | None
    identity: dict          # IDENTITY: what --resume must find unchanged
    settings: dict          # every setting of the run (config.json)
    record: dict            # what the tuned files record under TRAIN_RECORD (lspt-eval rebuilds from it)
    model: nn.Module | None = None
    start_epoch: int = 0
    best_acc: float = -1.0
    best_epoch: int = 0
    rows: list[dict] = field(default_factory=list)

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


def _plot_curves(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [r["epoch"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(epochs, [r["train_loss"] for r in rows], marker="o")
    a.set_xlabel("epoch"), a.set_ylabel("train loss"), a.grid(alpha=0.3)
    b.plot(epochs, [r["val_acc"] for r in rows], marker="o", color="tab:green")
    b.set_xlabel("epoch"), b.set_ylabel("val top-1 (%)"), b.grid(alpha=0.3)
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


def _check_numbers(args) -> None:
    """Every numeric option finite and in its range (NaN and inf pass argparse's float), and a warm-up that
    ends before the run does."""
    bounds = dict(epochs=dict(ge=1), batch_size=dict(ge=1), warmup_epochs=dict(ge=0), workers=dict(ge=0),
                  lr=dict(gt=0), momentum=dict(ge=0, lt=1), weight_decay=dict(ge=0), prompt_dropout=dict(ge=0, lt=1),
                  seed=dict(ge=0, lt=2**31), limit_train_batches=dict(ge=1), img_size=dict(ge=1), gate_init={})
    for name, bound in bounds.items():
        if getattr(args, name) is not None:
            check_number(f"--{name.replace('_', '-')}", getattr(args, name), **bound)
    if args.warmup_epochs >= args.epochs:
        raise UsageError(f"--warmup-epochs {args.warmup_epochs} must be less than --epochs {args.epochs}: the warm-up "
                         f"starts at lr 0 and reaches --lr only after {args.warmup_epochs} epoch(s), so this run would "
                         f"never train at the lr asked for (e.g. --warmup-epochs {args.epochs // 10})")
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
        # Rank 0 alone evaluates (so the logged accuracy is exactly what lspt-eval reports); the others
        # wait for it at the next collective, which a large val split can keep busy past the 30 min default.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=4))
    return rank, world, device


def _build_encoder(args, num_classes: int, model_kwargs: dict, enc_kwargs: dict):
    """The backbone (seeded, so lspt-eval can rebuild a random one), then the encoder around it."""
    vit = build_backbone(args.model, args.img_size, model_kwargs, args.seed)
    torch.manual_seed(args.seed)
    try:
        encoder = from_timm(vit, checkpoint=args.checkpoint, method=args.method, num_classes=num_classes,
                            **enc_kwargs)
    except TypeError as exc:          # an option this version of the encoders does not take
        raise UsageError(f"--method {args.method} does not take these options {sorted(enc_kwargs)}: {exc}") from None
    if args.grad_checkpointing:
        encoder.set_grad_checkpointing(True)
    return encoder


def _normalisation(vit, checkpoint) -> tuple[tuple, tuple]:
    """MAE / MoCo v3 checkpoints were trained on ImageNet statistics; a timm model's own config is used
    otherwise (ImageNet mean/std when it names none): without a checkpoint, and for an Eva, whose file is
    a release of that model read by timm's filter (EVA-02's CLIP statistics, DINOv3's ImageNet ones)."""
    cfg = getattr(vit, "pretrained_cfg", None) or {}
    if (checkpoint is None or is_eva(vit)) and "mean" in cfg and "std" in cfg:
        return tuple(cfg["mean"]), tuple(cfg["std"])
    return IMAGENET_MEAN, IMAGENET_STD


def _records(args, encoder, spec: DatasetSpec, model_kwargs: dict, amp: str, device, world: int):
    """(identity, settings, record): what --resume compares, config.json, and the tuned files' record."""
    img_size = encoder.vit.patch_embed.img_size[0]
    mean, std = _normalisation(encoder.vit, args.checkpoint)
    identity = dict(method=args.method, model=args.model, img_size=img_size, model_kwargs=model_kwargs,
                    checkpoint=str(Path(args.checkpoint).resolve()) if args.checkpoint else None,
                    backbone_seed=None if args.checkpoint else args.seed,
                    backbone_sha256=backbone_fingerprint(encoder.vit), num_classes=spec.num_classes,
                    classes=spec.classes, encoder=encoder.config())
    settings = dict(vars(args), img_size=img_size, layout=spec.layout, amp=amp, device=str(device),
                    world_size=world, effective_lr=args.lr * args.batch_size / 256, mean=list(mean), std=list(std),
                    num_classes=spec.num_classes, model_kwargs=model_kwargs, encoder=encoder.config(),
                    trainable_params=encoder.parameter_report()["trainable"],
                    versions=dict(torch=str(torch.__version__), timm=str(__import__("timm").__version__)))
    record = dict(model=args.model, img_size=img_size, model_kwargs=model_kwargs, seed=args.seed,
                  checkpoint=identity["checkpoint"], backbone_sha256=identity["backbone_sha256"], classes=spec.classes,
                  layout=spec.layout, mean=list(mean), std=list(std), eval_batch_size=args.batch_size // world, amp=amp)
    return identity, settings, record


def _check_batches(batch_size: int, images: int, world: int) -> None:
    """Every process gets at least one full batch per epoch. With several processes the loader drops an
    incomplete batch (as the official one), and DistributedSampler gives each process ceil(images / world)."""
    if images < world:
        raise UsageError(f"the train split has {images} image(s), fewer than the {world} processes: use fewer "
                         "processes (--nproc_per_node) or more data")
    per_process, share = batch_size // world, -(-images // world)
    if world > 1 and share < per_process:
        raise UsageError(f"--batch-size {batch_size} over {world} processes is {per_process} images per process and "
                         f"step, but the {images} train images give each process {share}: no full batch (incomplete "
                         f"batches are dropped with several processes); use --batch-size <= {world * share}")


def _data(args, spec: DatasetSpec, record: dict, rank: int, world: int, device):
    """(train dataset, val loader, distributed sampler or None)."""
    img_size, mean, std = record["img_size"], record["mean"], record["std"]
    train_ds = ImageDataset(spec.splits[args.train_split], build_transform(spec.layout, img_size, mean, std, True))
    val_ds = ImageDataset(spec.splits[args.val_split], build_transform(spec.layout, img_size, mean, std, False))
    sampler = None
    if world > 1:
        sampler = torch.utils.data.DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True,
                                                      seed=args.seed)
    val_loader = torch.utils.data.DataLoader(val_ds, batch_size=args.batch_size // world, shuffle=False,
                                             num_workers=args.workers, pin_memory=device.type == "cuda")
    return train_ds, val_loader, sampler


def setup(args) -> Run:
    """Set-up: check the command line (every check that needs no disk first), start the processes, build
    the encoder, the data and the optimizer; rank 0 checks --output before anything is written."""
    _check_numbers(args)
    enc_kwargs = _encoder_options(args)
    model_kwargs = model_kwargs_from_args(args)
    rank, world, device = _setup_distributed(args.device)
    amp = check_amp(args.amp, device)
    if args.batch_size % world:
        raise UsageError(f"--batch-size {args.batch_size} is the global batch: it must be divisible by the "
                         f"{world} processes")
    spec = load_dataset(args.data, args.layout)
    for split in (args.train_split, args.val_split):
        if split not in spec.splits:
            raise UsageError(f"split {split!r} not found in {args.data} (layout {spec.layout}; has "
                             f"{sorted(spec.splits)})")
    _check_batches(args.batch_size, len(spec.splits[args.train_split]), world)
    encoder = _build_encoder(args, spec.num_classes, model_kwargs, enc_kwargs).to(device)
    out = Path(args.output)
    if rank == 0:
        _check_output(out, args.resume)
    identity, settings, record = _records(args, encoder, spec, model_kwargs, amp, device, world)
    lr = settings["effective_lr"]
    optimizer = torch.optim.SGD(encoder.trainable_parameters(), lr=lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.warmup_epochs, args.epochs))
    scaler = torch.amp.GradScaler("cuda", enabled=(amp == "fp16"))
    train_ds, val_loader, sampler = _data(args, spec, record, rank, world, device)
    return Run(args=args, out=out, rank=rank, world=world, device=device, amp=amp, spec=spec, encoder=encoder,
               optimizer=optimizer, scheduler=scheduler, scaler=scaler, train_ds=train_ds, val_loader=val_loader,
               sampler=sampler, identity=identity, settings=settings, record=record)


# ---------------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------------
def _check_same_run(run: Run, state: dict) -> None:
    """Refuse another run's state; warn about changed hyper-parameters. An entry the saved identity lacks
    (a state written before it was recorded) is not compared."""
    saved = state["identity"]
    diff = [f"{k}: saved {saved.get(k)!r}, now {run.identity[k]!r}" for k in IDENTITY
            if k in saved and saved[k] != run.identity[k]]
    if diff:
        raise UsageError(f"--resume: {run.out} holds a different run; " + "; ".join(diff[:4]) +
                         " (use the saved settings, or another --output)")
    changed = {k: (state["settings"].get(k), run.settings[k]) for k in RESUMABLE_CHANGES
               if state["settings"].get(k) != run.settings[k]}
    if changed:
        run.say("lspt-train: warning: resuming with changed settings " +
                ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()) +
                "; the run will not match an uninterrupted one", file=sys.stderr)


def _continue_schedule(run: Run, epoch: int) -> None:
    """The saved groups carry the saved lr / momentum / decay: recompute them from this command line, so a
    resume with more --epochs continues on the new schedule (unchanged settings give the same numbers)."""
    args, lr = run.args, run.effective_lr
    factor = warmup_cosine(args.warmup_epochs, args.epochs)(epoch)
    run.scheduler.base_lrs = [lr] * len(run.optimizer.param_groups)
    for g in run.optimizer.param_groups:
        g.update(initial_lr=lr, lr=lr * factor, momentum=args.momentum, weight_decay=args.weight_decay)
    run.scheduler._last_lr = [g["lr"] for g in run.optimizer.param_groups]


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
    """The saved tuned parameters, optimizer, scheduler, grad scaler and RNG streams into the run's own."""
    params = dict(run.encoder.named_parameters())
    own = {n: tuple(params[n].shape) for n in run.encoder.tuned_state_dict()}
    saved = {n: tuple(t.shape) if isinstance(t, torch.Tensor) else None for n, t in state["tuned"].items()}
    if saved != own:
        raise _damaged(path, f"holds tuned tensors {saved} where this run has {own}")
    try:
        with torch.no_grad():
            for n, t in state["tuned"].items():
                params[n].copy_(t)
        run.optimizer.load_state_dict(state["optimizer"])
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


def _read_log(path: Path, upto: int) -> list[dict]:
    """The rows of log.jsonl up to epoch `upto`; a damaged line is an error naming the file and line."""
    rows = []
    for n, line in enumerate(path.read_bytes().decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            row = exc.msg
        if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
            raise UsageError(f"--resume: {path}:{n} is not a log row ({str(row)[:60]}; got {line[:40]!r}): delete that "
                             "line (that epoch's row is then missing from the log), or the whole file")
        rows.append(row)
    return [r for r in rows if r["epoch"] <= upto]


def resume(run: Run) -> None:
    """Resume: with --resume, restore the tuned parameters, optimizer, scheduler, grad scaler, RNG streams,
    best epoch and log of the run saved in --output (refusing another run's state, and a damaged one);
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
    _continue_schedule(run, state["epoch"])
    run.start_epoch, run.best_acc, run.best_epoch = state["epoch"], state["best_acc"], state["best_epoch"]
    log = run.out / "log.jsonl"
    if log.is_file():
        run.rows = _read_log(log, run.start_epoch)


def wrap_model(run: Run) -> None:
    """The model the epochs train: the encoder in DDP over several processes (only the tuned parameters take
    part: the backbone's have requires_grad=False; the encoder has no buffers to keep in sync), compiled
    with --compile."""
    model = run.encoder
    if run.world > 1:
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(run.encoder, device_ids=[run.device.index] if run.device.type == "cuda"
                                        else None)
    run.model = torch.compile(model) if run.args.compile else model


# ---------------------------------------------------------------------------------------------------
# one epoch
# ---------------------------------------------------------------------------------------------------
def _epoch_loader(run: Run, epoch: int) -> torch.utils.data.DataLoader:
    if run.sampler is not None:
        run.sampler.set_epoch(epoch)
    g = torch.Generator()
    g.manual_seed(run.args.seed * 100003 + epoch)        # shuffling and worker seeds: a function of (seed, epoch)
    return torch.utils.data.DataLoader(
        run.train_ds, batch_size=run.args.batch_size // run.world, shuffle=run.sampler is None, sampler=run.sampler,
        generator=g, num_workers=run.args.workers, pin_memory=run.device.type == "cuda",
        drop_last=run.world > 1)                         # as the official loader with several GPUs


def _train_step(run: Run, images, labels, epoch: int, step: int):
    """Forward, cross-entropy, backward and optimizer step on one batch (on the device): (loss, logits)."""
    with autocast_context(run.device, run.amp):
        logits = run.model(images)
    loss = F.cross_entropy(logits.float(), labels)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the training loss is {loss.item()} at epoch {epoch + 1} step "
                                 f"{step + 1}: lower --lr (the last good state is in {run.out})")
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return loss, logits


def train_one_epoch(run: Run, epoch: int) -> dict:
    """Train one epoch (`epoch` counts from 0; at most --limit-train-batches batches). Returns, over all
    processes: train_loss, train_acc (%), the lr of the epoch, images_per_s (from the end of the first step,
    so loader start-up and lazy initialisation are left out) and epoch_time_s."""
    loader = _epoch_loader(run, epoch)
    limit = run.args.limit_train_batches
    steps = len(loader) if limit is None else min(len(loader), limit)
    lr = run.optimizer.param_groups[0]["lr"]
    run.model.train()
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    bar = None
    if sys.stderr.isatty() and run.rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{run.args.epochs}", leave=False, dynamic_ncols=True)
    # Running sums stay on the device: no host sync per step.
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    correct_sum = torch.zeros((), dtype=torch.int64, device=run.device)
    seen = seen1 = 0
    t0 = t1 = time.perf_counter()
    for step, (images, labels) in enumerate(loader):
        if step >= steps:
            break
        images = images.to(run.device, non_blocking=True)
        labels = labels.to(run.device, non_blocking=True)
        loss, logits = _train_step(run, images, labels, epoch, step)
        n = labels.numel()
        loss_sum += loss.detach().double() * n
        seen += n
        if step == 0:
            if run.device.type == "cuda":
                torch.cuda.synchronize(run.device)
            t1, seen1 = time.perf_counter(), seen
        correct_sum += (logits.detach().argmax(-1) == labels).sum()
        if _on_step is not None:
            _on_step(epoch, step, loss.detach())
        if bar is not None:
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{100 * correct_sum.item() / seen:.1f}%",
                            img_s=f"{seen * run.world / (time.perf_counter() - t0):.1f}")
            bar.update(1)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    elapsed = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    timed, timed_s = (seen - seen1, t0 + elapsed - t1) if seen > seen1 else (seen, elapsed)
    totals = torch.tensor([loss_sum.item(), float(seen), float(correct_sum.item()), float(timed)], dtype=torch.float64)
    if run.world > 1:
        import torch.distributed as dist
        dist.all_reduce(totals)
    return dict(train_loss=totals[0].item() / totals[1].item(), train_acc=100 * totals[2].item() / totals[1].item(),
                lr=lr, images_per_s=totals[3].item() / timed_s, epoch_time_s=elapsed)


def validate(run: Run) -> float | None:
    """Validate: top-1 (%) on the --val-split, on rank 0 alone (the others return None), so the logged
    accuracy is exactly what lspt-eval reports for the saved file."""
    if run.rank != 0:
        return None
    return evaluate(run.encoder, run.val_loader, run.device, run.amp)[0]


# ---------------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------------
def _save_tuned(run: Run, name: str, epoch: int, acc: float) -> None:
    record = {TRAIN_RECORD: dict(run.record, epoch=epoch, val_acc=acc)}
    _atomic_write(run.out / name, lambda p: run.encoder.save_tuned(p, metadata=record))


def save_epoch(run: Run, epoch: int, stats: dict, val_acc: float | None) -> None:
    """Save after epoch `epoch` (counted from 1), on rank 0: the log row (log.jsonl), last.safetensors,
    best.safetensors when val top-1 rose (strictly), curves.png and the epoch's line; every process then
    holds rank 0's best epoch."""
    if run.rank == 0:
        row = dict(epoch=epoch, train_loss=stats["train_loss"], train_acc=stats["train_acc"], val_acc=val_acc,
                   lr=stats["lr"], images_per_s=stats["images_per_s"], peak_memory_gb=_peak_memory_gb(run.device),
                   epoch_time_s=stats["epoch_time_s"])
        run.rows.append(row)
        _atomic_write(run.out / "log.jsonl", lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in run.rows)))
        _save_tuned(run, "last.safetensors", epoch, val_acc)
        if val_acc > run.best_acc:
            run.best_acc, run.best_epoch = val_acc, epoch
            _save_tuned(run, "best.safetensors", epoch, val_acc)
        _plot_curves(run.rows, run.out / "curves.png")
        print(f"epoch {epoch}/{run.args.epochs}  train_loss {row['train_loss']:.4f}  "
              f"train_acc {row['train_acc']:.1f}%  val_acc {val_acc:.2f}%  lr {row['lr']:.3g}  "
              f"{row['images_per_s']:.1f} img/s  "
              f"peak {row['peak_memory_gb']:.2f} GB", flush=True)
    if run.world > 1:
        import torch.distributed as dist
        best = [run.best_acc, run.best_epoch]
        dist.broadcast_object_list(best, src=0)
        run.best_acc, run.best_epoch = best


def save_state(run: Run, epoch: int) -> None:
    """Save the resume state after epoch `epoch` (0: before the first) to resume.pt, atomically: tuned
    parameters, optimizer, scheduler, grad scaler, the RNG states of every process, best so far."""
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
                 tuned={n: t.detach().cpu().clone() for n, t in run.encoder.tuned_state_dict().items()},
                 optimizer=run.optimizer.state_dict(), scheduler=run.scheduler.state_dict(),
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
        run.say(f"resuming {run.out} after epoch {run.start_epoch} (best val {run.best_acc:.2f}% at epoch "
                f"{run.best_epoch})")


def _check_finite(run: Run, epoch: int) -> None:
    """After an epoch's updates, before anything of it is saved: tuned parameters with NaN or inf (an lr or
    momentum that made the run diverge within the epoch) stop the run, so no file ever holds them and a NaN
    model's argmax never becomes a "best" accuracy."""
    bad = [n for n, t in run.encoder.tuned_state_dict().items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise FloatingPointError(f"the run diverged: the tuned parameters {bad[:5]} hold NaN or inf after epoch "
                                 f"{epoch}; nothing of that epoch was saved: lower --lr (the state after epoch "
                                 f"{epoch - 1} is in {run.out / 'resume.pt'})")


def _run_epochs(run: Run) -> int:
    """The epochs from run.start_epoch; Ctrl-C returns 130 with the last completed epoch's state on disk."""
    epoch = run.start_epoch
    try:
        for epoch in range(run.start_epoch, run.args.epochs):
            stats = train_one_epoch(run, epoch)
            _check_finite(run, epoch + 1)
            run.scheduler.step()
            save_epoch(run, epoch + 1, stats, validate(run))
            save_state(run, epoch + 1)
    except KeyboardInterrupt:
        if run.rank == 0:
            print(f"\nlspt-train: interrupted in epoch {epoch + 1}; {run.out}/resume.pt holds the state after epoch "
                  f"{_saved_epoch(run.out)}: continue with the same command and --resume", file=sys.stderr, flush=True)
        return 130
    return 0


def train(args) -> int:
    """lspt-train end to end: set-up, then, with --output locked by rank 0 for the life of the run (a second
    run on it is refused), resume and per epoch train_one_epoch, validate, save. Ctrl-C exits with status
    130, the state of the last completed epoch on disk."""
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
            _check_in_sync(run.encoder, run.world)
    run.say(f"best val accuracy: {run.best_acc:.2f}% (epoch {run.best_epoch}) -> {run.out / 'best.safetensors'}")
    return 0


def _check_in_sync(encoder, world: int) -> None:
    """DDP keeps every process's tuned parameters equal; a divergence (e.g. a parameter DDP did not see) would
    make rank 0's files describe only part of the run, so it is an error."""
    import torch.distributed as dist
    flat = torch.cat([t.detach().float().flatten().cpu() for t in encoder.tuned_state_dict().values()])
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
    except (ValueError, FloatingPointError) as exc:     # UsageError, DataError and the encoders' checks
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
