"""Gradient checkpointing: peak train memory and step time, plain vs checkpointed (issue 9, item 6).

    python bench/grad_checkpointing.py [--model vit_base_patch16_224] [--batch-size 64] [--num-prompts 10]
                                       [--method lspt] [--rounds 10]

One train step (bf16 autocast, SGD) per configuration: plain, every block checkpointed, and the first
9 and 6 blocks only (`set_grad_checkpointing(blocks=n)`). Peak memory (CUDA: max_memory_allocated after
reset_peak_memory_stats, one configuration at a time) and time by interleaved rounds (every
configuration once per round; per-round ratios to plain, median [min, max]). The target (issue 9):
peak memory at most 0.4x of plain for at most 1.4x the time at ViT-B/16. On the CPU only times are
printed (a tiny model unless --model is given): a smoke run, not a measurement.
"""
from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

from lspt_kernels.encoders import build_encoder


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-prompts", type=int, default=10)
    p.add_argument("--method", default="lspt")
    p.add_argument("--rounds", type=int, default=10)
    args = p.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if args.model is None and dev == "cpu":
        vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32,
                                patch_size=8, embed_dim=32, depth=12, num_heads=2)
    else:
        vit = timm.create_model(args.model or "vit_base_patch16_224", pretrained=False, num_classes=0)
    enc = build_encoder(args.method, vit, num_prompts=args.num_prompts, num_classes=100).to(dev)
    images = torch.randn(args.batch_size, 3, *vit.patch_embed.img_size, device=dev)
    opt = torch.optim.SGD(enc.trainable_parameters(), lr=1e-3)
    L = enc.depth
    configs = {"plain": dict(enable=False), "all blocks": dict(enable=True),
               f"{min(9, L)}/{L} blocks": dict(enable=True, blocks=min(9, L)),
               f"{min(6, L)}/{L} blocks": dict(enable=True, blocks=min(6, L))}

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def step():
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = enc(images).float().logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    peaks, times = {}, {c: [] for c in configs}
    for c, kw in configs.items():
        enc.set_grad_checkpointing(**kw)
        step()
        step()
        if dev == "cuda":
            sync()
            torch.cuda.reset_peak_memory_stats()
            step()
            sync()
            peaks[c] = torch.cuda.max_memory_allocated() / 2 ** 30
    for _ in range(args.rounds):
        for c, kw in configs.items():
            enc.set_grad_checkpointing(**kw)
            sync()
            t = time.perf_counter()
            step()
            sync()
            times[c].append(time.perf_counter() - t)
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    print(f"{args.method} on {name}, batch {args.batch_size}, Np {args.num_prompts}, bf16 autocast, "
          f"{args.rounds} interleaved rounds")
    for c in configs:
        ratios = [a / b for a, b in zip(times[c], times["plain"])]
        mem = (f"peak {peaks[c]:.2f} GiB (x{peaks[c] / peaks['plain']:.2f})" if peaks else "peak n/a (CPU)")
        print(f"  {c:14s} {statistics.median(times[c]) * 1e3:9.1f} ms  time x{statistics.median(ratios):.2f} "
              f"[{min(ratios):.2f}, {max(ratios):.2f}]  {mem}")


if __name__ == "__main__":
    main()
