"""`lspt-train`: tune LSPT (or a baseline) on a dataset with the official VPT/GaPT recipe.

The recipe (docs/training.md cites the official files): SGD with momentum 0.9, weight decay 0, a
per-epoch schedule with linear warm-up from 0 then cosine decay to 0, the learning rate given for a batch
of 256 and scaled by batch / 256, prompt dropout 0.1, GaPT's head init. One process, or data-parallel
under torchrun (DDP over the tuned parameters only; gloo on the CPU, NCCL on GPUs; rank 0 writes).

Output directory: last.safetensors and best.safetensors (tuned parameters only, encoder config + training
metadata inside, so `lspt-eval` rebuilds the encoder from the file), resume.pt (parameters, optimizer,
scheduler, RNG states, epoch: written at the start and after every epoch, atomically), log.jsonl,
curves.png, config.json.

Reproducibility: each epoch's shuffling and worker seeds come from (seed, epoch); the global RNGs (prompt
dropout, main-process augmentation) are saved with every epoch's resume state, so `--resume` on the CPU ends
bit-for-bit where an uninterrupted run ends.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .evaluate import (
    UsageError,
    autocast_context,
    build_backbone,
    check_amp,
    evaluate,
    parse_model_kwargs,
    resolve_device,
)

__all__ = ["build_parser", "main", "warmup_cosine"]

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
NO_PROMPTS = ("linear", "adapter")
# What makes a saved run the same run: a --resume that differs in any of these is refused.
IDENTITY = ("method", "model", "img_size", "model_kwargs", "checkpoint", "num_classes", "classes", "encoder")

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
    from .encoders import METHODS
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
    m.add_argument("--model", required=True, help="timm VisionTransformer name, e.g. vit_base_patch16_224")
    m.add_argument("--img-size", type=int, default=None, help="image size (default: the model's)")
    m.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra timm.create_model arguments, e.g. drop_path_rate=0.0 patch_size=8")
    m.add_argument("--checkpoint", default=None, help="backbone weights: MAE / MoCo v3 / plain state dict file "
                   "(without it the backbone is randomly initialised from --seed)")
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
    m.add_argument("--shared-lstm", type=lambda s: s.lower() in ("1", "true", "yes"), default=None,
                   help="lspt: true | false")
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
    r.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    r.add_argument("--amp", default="auto", help="auto (bf16 on a GPU, none on the CPU) | bf16 | fp16 | none")
    r.add_argument("--grad-checkpointing", action="store_true", help="recompute blocks in backward")
    r.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    r.add_argument("--output", required=True, help="output directory")
    r.add_argument("--resume", action="store_true", help="continue the run saved in --output")
    return p


# ---------------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------------
def _atomic_write(path: Path, write) -> None:
    """write(tmp_path) then rename: a crash or Ctrl-C never leaves a half-written file behind."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


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


def _encoder_options(args) -> dict:
    """The encoder keyword arguments of this command line; a method option given to another method is an
    error, not silently dropped."""
    kw = dict(head_init=args.head_init)
    if args.method not in NO_PROMPTS:
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
    if not 0.0 <= args.prompt_dropout < 1.0:
        raise UsageError(f"--prompt-dropout must be in [0, 1), got {args.prompt_dropout}")
    return kw


def _check_numbers(args) -> None:
    for name, low in (("epochs", 1), ("batch_size", 1), ("warmup_epochs", 0), ("workers", 0)):
        if getattr(args, name) < low:
            raise UsageError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if args.lr <= 0:
        raise UsageError(f"--lr must be > 0, got {args.lr}")
    if args.weight_decay < 0:
        raise UsageError(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if args.limit_train_batches is not None and args.limit_train_batches < 1:
        raise UsageError(f"--limit-train-batches must be >= 1, got {args.limit_train_batches}")
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        raise UsageError(f"--checkpoint {args.checkpoint}: no such file")


def _check_output(out: Path, resume: bool) -> None:
    """Refuse to overwrite another run, and find an unwritable directory before any work is done."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {out} exists and is not a directory")
    state = out / "resume.pt"
    if resume and not state.is_file():
        raise UsageError(f"--resume: {out} holds no resume state (resume.pt); start the run without --resume")
    if not resume and out.is_dir() and any((out / f).exists() for f in ("config.json", "resume.pt", "log.jsonl")):
        raise UsageError(f"--output {out} already holds a run (config.json / resume.pt): pass --resume to continue "
                         "it, or choose another --output (nothing there was changed)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"--output {out} is not writable: {exc.strerror or exc}") from None


def _setup_distributed(device_arg: str | None):
    """(rank, world_size, device) from torchrun's environment; one process without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want = device_arg or ("cuda" if torch.cuda.is_available() else "cpu")
    if world == 1:
        return 0, 1, resolve_device(want)
    import torch.distributed as dist
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(want)
    if device.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not dist.is_initialized():
        import datetime
        # Rank 0 alone evaluates (so the logged accuracy is exactly what lspt-eval reports); the others
        # wait for it at the next collective, which a large val split can keep busy past the 30 min default.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=4))
    return rank, world, device


def _say(rank: int, *a, **k) -> None:
    if rank == 0:
        print(*a, **k, flush=True)


# ---------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------
def _run(args) -> int:
    from safetensors.torch import save_file

    from .checkpoints import from_timm
    from .data import ImageDataset, build_transform, load_dataset

    _check_numbers(args)
    enc_kwargs = _encoder_options(args)
    model_kwargs = parse_model_kwargs(args.model_kwargs)
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
    out = Path(args.output)

    # The backbone (seeded, so lspt-eval can rebuild a random one), then the encoder.
    vit = build_backbone(args.model, args.img_size, model_kwargs, args.seed)
    img_size = vit.patch_embed.img_size[0]
    torch.manual_seed(args.seed)
    try:
        encoder = from_timm(vit, checkpoint=args.checkpoint, method=args.method, num_classes=spec.num_classes,
                            **enc_kwargs)
    except TypeError as exc:          # an option this version of the encoders does not take
        raise UsageError(f"--method {args.method} does not take these options {sorted(enc_kwargs)}: {exc}") from None
    if args.grad_checkpointing:
        if not hasattr(encoder, "set_grad_checkpointing"):
            raise UsageError("--grad-checkpointing: this version of the encoders has no set_grad_checkpointing")
        encoder.set_grad_checkpointing(True)
    encoder.to(device)
    if rank == 0:          # after every check that needs no disk, before anything is written
        _check_output(out, args.resume)

    # Normalisation: MAE / MoCo v3 checkpoints were trained on ImageNet statistics; a timm model's own
    # config is used otherwise (ImageNet mean/std when it names none).
    cfg = getattr(vit, "pretrained_cfg", None) or {}
    if args.checkpoint is None and "mean" in cfg and "std" in cfg:
        mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    else:
        from .data import IMAGENET_MEAN, IMAGENET_STD
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    eff_lr = args.lr * args.batch_size / 256
    identity = dict(method=args.method, model=args.model, img_size=img_size, model_kwargs=model_kwargs,
                    checkpoint=str(Path(args.checkpoint).resolve()) if args.checkpoint else None,
                    num_classes=spec.num_classes, classes=spec.classes, encoder=encoder.config())
    settings = dict(vars(args), img_size=img_size, layout=spec.layout, amp=amp, device=str(device),
                    world_size=world, effective_lr=eff_lr, mean=list(mean), std=list(std),
                    num_classes=spec.num_classes, model_kwargs=model_kwargs, encoder=encoder.config(),
                    trainable_params=encoder.parameter_report()["trainable"],
                    versions=dict(torch=str(torch.__version__), timm=str(__import__("timm").__version__)))
    train_meta = dict(model=args.model, img_size=img_size, model_kwargs=model_kwargs, seed=args.seed,
                      checkpoint=identity["checkpoint"], classes=spec.classes, layout=spec.layout,
                      mean=list(mean), std=list(std), eval_batch_size=args.batch_size // world, amp=amp)

    optimizer = torch.optim.SGD(encoder.trainable_parameters(), lr=eff_lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.warmup_epochs, args.epochs))
    scaler = torch.amp.GradScaler("cuda", enabled=(amp == "fp16"))

    start_epoch, best_acc, best_epoch, rows = 0, -1.0, 0, []
    if args.resume:
        state = torch.load(out / "resume.pt", map_location="cpu", weights_only=True)
        saved = state["identity"]
        diff = [f"{k}: saved {saved.get(k)!r}, now {identity[k]!r}" for k in IDENTITY if saved.get(k) != identity[k]]
        if diff:
            raise UsageError(f"--resume: {out} holds a different run; " + "; ".join(diff[:4]) +
                             " (use the saved settings, or another --output)")
        changed = {k: (state["settings"].get(k), v) for k, v in settings.items()
                   if k in ("epochs", "warmup_epochs", "batch_size", "lr", "seed", "momentum", "weight_decay",
                            "prompt_dropout", "world_size", "amp", "limit_train_batches")
                   and state["settings"].get(k) != v}
        if changed:
            _say(rank, "lspt-train: warning: resuming with changed settings " +
                 ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()) +
                 "; the run will not match an uninterrupted one", file=sys.stderr)
        with torch.no_grad():
            params = dict(encoder.named_parameters())
            for n, t in state["tuned"].items():
                params[n].copy_(t)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        # The saved groups carry the saved lr / momentum / decay: recompute them from this command line, so a
        # resume with more --epochs continues on the new schedule (unchanged settings give the same numbers).
        factor = warmup_cosine(args.warmup_epochs, args.epochs)(state["epoch"])
        scheduler.base_lrs = [eff_lr] * len(optimizer.param_groups)
        for g in optimizer.param_groups:
            g.update(initial_lr=eff_lr, lr=eff_lr * factor, momentum=args.momentum, weight_decay=args.weight_decay)
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
        start_epoch, best_acc, best_epoch = state["epoch"], state["best_acc"], state["best_epoch"]
        rngs = state["rng"]
        if len(rngs) == world:
            _set_rng_state(rngs[rank])
        else:
            _say(rank, f"lspt-train: warning: saved with {len(rngs)} processes, resumed with {world}: RNG streams "
                 "are reseeded", file=sys.stderr)
            torch.manual_seed(args.seed + 1000 * rank + start_epoch)
        if (out / "log.jsonl").is_file():
            rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
            rows = [r for r in rows if r["epoch"] <= start_epoch]
    else:
        # Each process its own dropout / augmentation stream; the same one on every run with this seed.
        torch.manual_seed(args.seed + 1000 * rank)
        np.random.seed(args.seed + rank)
        random.seed(args.seed + rank)

    def save_state(epoch: int) -> None:
        if world == 1:
            rngs = [_rng_state()]
        else:
            import io

            import torch.distributed as dist
            buf = io.BytesIO()
            torch.save(_rng_state(), buf)
            # Bytes, not tensors: all_gather_object cannot unpickle tensors it gathered here.
            packed = [None] * world
            dist.all_gather_object(packed, buf.getvalue())
            rngs = [torch.load(io.BytesIO(b), weights_only=True) for b in packed]
        if rank != 0:
            return
        state = dict(epoch=epoch, identity=identity, settings=settings, best_acc=best_acc, best_epoch=best_epoch,
                     tuned={n: t.detach().cpu().clone() for n, t in encoder.tuned_state_dict().items()},
                     optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                     scaler=scaler.state_dict(), rng=rngs)
        _atomic_write(out / "resume.pt", lambda p: torch.save(state, p))

    def save_tuned(name: str, epoch: int, acc: float) -> None:
        tensors = {n: t.detach().contiguous().cpu() for n, t in encoder.tuned_state_dict().items()}
        meta = {"lspt_kernels": json.dumps(encoder.config()),
                "lspt_train": json.dumps(dict(train_meta, epoch=epoch, val_acc=acc))}
        _atomic_write(out / name, lambda p: save_file(tensors, str(p), metadata=meta))

    # Data.
    train_ds = ImageDataset(spec.splits[args.train_split], build_transform(spec.layout, img_size, mean, std, True))
    val_ds = ImageDataset(spec.splits[args.val_split], build_transform(spec.layout, img_size, mean, std, False))
    per_rank = args.batch_size // world
    sampler = None
    if world > 1:
        sampler = torch.utils.data.DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True,
                                                      seed=args.seed)
    val_loader = torch.utils.data.DataLoader(val_ds, batch_size=per_rank, shuffle=False, num_workers=args.workers,
                                             pin_memory=device.type == "cuda")

    model = encoder
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        # Only the tuned parameters take part (the backbone's have requires_grad=False); the encoder has no
        # buffers to keep in sync.
        model = DistributedDataParallel(encoder, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)

    if rank == 0 and not args.resume:
        _atomic_write(out / "config.json", lambda p: p.write_text(json.dumps(settings, indent=2, default=str)))
    _say(rank, "lspt-train settings (defaults included):")
    for k in sorted(settings):
        _say(rank, f"  {k} = {settings[k]}")
    _say(rank, spec.summary())
    if args.checkpoint is None:
        _say(rank, f"note: no --checkpoint: the backbone is randomly initialised (seed {args.seed})")
    if args.resume:
        _say(rank, f"resuming {out} after epoch {start_epoch} (best val {best_acc:.2f}% at epoch {best_epoch})")
    else:
        save_state(0)

    tty = sys.stderr.isatty() and rank == 0
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, args.epochs):
            if sampler is not None:
                sampler.set_epoch(epoch)
            g = torch.Generator()
            g.manual_seed(args.seed * 100003 + epoch)       # shuffling and worker seeds: a function of (seed, epoch)
            loader = torch.utils.data.DataLoader(
                train_ds, batch_size=per_rank, shuffle=sampler is None, sampler=sampler, generator=g,
                num_workers=args.workers, pin_memory=device.type == "cuda",
                drop_last=world > 1)                        # as the official loader with several GPUs
            steps = len(loader) if args.limit_train_batches is None else min(len(loader), args.limit_train_batches)
            lr = optimizer.param_groups[0]["lr"]
            model.train()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            bar = None
            if tty:
                from tqdm import tqdm
                bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, dynamic_ncols=True)
            # Running sums stay on the device: no host sync per step.
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            correct_sum = torch.zeros((), dtype=torch.int64, device=device)
            seen = 0
            t0 = time.perf_counter()
            t1, seen1 = t0, 0        # after the first step: throughput leaves out loader start-up and lazy init
            for step, (images, labels) in enumerate(loader):
                if step >= steps:
                    break
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                with autocast_context(device, amp):
                    logits = model(images)
                loss = F.cross_entropy(logits.float(), labels)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"the training loss is {loss.item()} at epoch {epoch + 1} step "
                                             f"{step + 1}: lower --lr (the last good state is in {out})")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                n = labels.numel()
                loss_sum += loss.detach().double() * n
                seen += n
                if step == 0:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    t1, seen1 = time.perf_counter(), seen
                correct_sum += (logits.detach().argmax(-1) == labels).sum()
                if _on_step is not None:
                    _on_step(epoch, step, loss.detach())
                if bar is not None:
                    el = time.perf_counter() - t0
                    bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{100 * correct_sum.item() / seen:.1f}%",
                                    img_s=f"{seen * world / el:.1f}")
                    bar.update(1)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - t0
            if bar is not None:
                bar.close()
            timed, timed_s = (seen - seen1, t0 + elapsed - t1) if seen > seen1 else (seen, elapsed)
            totals = torch.tensor([loss_sum.item(), float(seen), float(correct_sum.item()), float(timed)],
                                  dtype=torch.float64)
            if world > 1:
                import torch.distributed as dist
                dist.all_reduce(totals)
            train_loss, train_acc = totals[0].item() / totals[1].item(), 100 * totals[2].item() / totals[1].item()
            images_per_s = totals[3].item() / timed_s
            scheduler.step()
            if rank == 0:
                val_acc, _, _ = evaluate(encoder, val_loader, device, amp)
                row = dict(epoch=epoch + 1, train_loss=train_loss, train_acc=train_acc, val_acc=val_acc, lr=lr,
                           images_per_s=images_per_s, peak_memory_gb=_peak_memory_gb(device),
                           epoch_time_s=elapsed)
                rows.append(row)
                _atomic_write(out / "log.jsonl",
                              lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in rows)))
                save_tuned("last.safetensors", epoch + 1, val_acc)
                if val_acc > best_acc:
                    best_acc, best_epoch = val_acc, epoch + 1
                    save_tuned("best.safetensors", epoch + 1, val_acc)
                _plot_curves(rows, out / "curves.png")
                print(f"epoch {epoch + 1}/{args.epochs}  train_loss {train_loss:.4f}  train_acc {train_acc:.1f}%  "
                      f"val_acc {val_acc:.2f}%  lr {lr:.3g}  {images_per_s:.1f} img/s  "
                      f"peak {row['peak_memory_gb']:.2f} GB", flush=True)
            if world > 1:
                import torch.distributed as dist
                objs = [best_acc, best_epoch]
                dist.broadcast_object_list(objs, src=0)
                best_acc, best_epoch = objs
            save_state(epoch + 1)
    except KeyboardInterrupt:
        if rank == 0:
            print(f"\nlspt-train: interrupted in epoch {epoch + 1}; {out}/resume.pt holds the state after epoch "
                  f"{_saved_epoch(out)}: continue with the same command and --resume", file=sys.stderr, flush=True)
        return 130
    if world > 1:
        _check_in_sync(encoder, world)
    _say(rank, f"best val accuracy: {best_acc:.2f}% (epoch {best_epoch}) -> {out / 'best.safetensors'}")
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
        return _run(args)
    except (ValueError, FloatingPointError) as exc:     # UsageError, DataError and the encoders' checks
        print(f"lspt-train: error: {exc}", file=sys.stderr, flush=True)
        return 2
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
