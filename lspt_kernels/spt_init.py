"""SPT prompt initialisation (Wang et al. 2024, "Revisiting the Power of Prompt for Visual Tuning",
arXiv 2402.02382): prompts start as the frozen backbone's own tokens on a sample of training images.

The prompts entering block l are drawn from the patch tokens entering block l of the backbone run
without prompts: VPT-deep and LSPT initialise every P[l] (LSPT's P[l], l >= 1, is the LSTM input
whose output enters block l); VPT-shallow and GaPT initialise their one prompt set from the
embedding output (block 1's input). docs/method.md, "SPT initialisation", has the decisions.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from .backbones import block_ropes, run_block

__all__ = ["init_prompts_from_data", "HOWS"]

# "tokens": Np distinct sampled patch tokens; "kmeans": Np k-means centroids of the sampled tokens;
# "pool": Np distinct windows (window x window patches, non-overlapping) average-pooled.
HOWS = ("tokens", "kmeans", "pool")


def _batches(images_or_loader) -> Iterable[Tensor]:
    if isinstance(images_or_loader, Tensor):
        yield images_or_loader
        return
    for i, batch in enumerate(images_or_loader):
        if isinstance(batch, (tuple, list)) and batch:
            batch = batch[0]                        # (images, labels, ...) from a DataLoader
        if not isinstance(batch, Tensor):
            raise TypeError(f"images_or_loader must be a (B, C, H, W) tensor or yield tensors or "
                            f"(images, ...) tuples; batch {i} is {type(batch).__name__}")
        yield batch


def _window_means(tokens: Tensor, grid: tuple[int, int], window: int) -> Tensor:
    """(B, N, D) patch tokens on an (h, w) grid -> (B * h' * w', D) means of window x window blocks."""
    B, N, D = tokens.shape
    h, w = grid
    s = max(1, min(window, h, w))
    pooled = F.avg_pool2d(tokens.transpose(1, 2).reshape(B, D, h, w), s, s)      # (B, D, h', w')
    return pooled.flatten(2).transpose(1, 2).reshape(-1, D)


def _kmeans(points: Tensor, init: Tensor, iters: int) -> Tensor:
    """Lloyd's k-means from `init` until the assignments stop changing (at most `iters` rounds); an
    empty cluster keeps its centroid (a real token, since `init` is drawn from the points)."""
    centroids, assign = init.clone(), None
    for _ in range(iters):
        new = torch.cdist(points, centroids, compute_mode="donot_use_mm_for_euclid_dist").argmin(1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        onehot = F.one_hot(assign, len(centroids)).to(points.dtype)                 # (M, Np)
        counts = onehot.sum(0).unsqueeze(1)
        centroids = torch.where(counts > 0, (onehot.T @ points) / counts.clamp_min(1), centroids)
    return centroids


def _stream(seed: int, image: int, layer: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + image * 1_000_003 + layer) % (1 << 62))


def _check_arguments(encoder, how, num_images, tokens_per_image, window, kmeans_iters) -> Tensor:
    """The encoder's prompt parameter, after every argument has been checked."""
    from .encoders import PromptEncoder

    if not isinstance(encoder, PromptEncoder):
        raise TypeError(f"encoder must be an lspt_kernels encoder, got {type(encoder).__name__}")
    prompts = getattr(encoder, "prompts", None)
    if prompts is None:
        raise ValueError(f"the {encoder.method!r} encoder has no prompts to initialise")
    if how not in HOWS:
        raise ValueError(f"how must be one of {HOWS}, got {how!r}")
    for name, value in (("num_images", num_images), ("window", window), ("kmeans_iters", kmeans_iters)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if tokens_per_image is not None and (not isinstance(tokens_per_image, int) or tokens_per_image < 1):
        raise ValueError(f"tokens_per_image must be an int >= 1 or None, got {tokens_per_image!r}")
    return prompts


def _candidate_banks(encoder, images_or_loader, layers: list[int], how: str, seed: int, num_images: int,
                     tokens_per_image: int | None, window: int) -> dict[int, list[Tensor]]:
    """Per layer l, the candidate tokens entering block l of the backbone run without prompts: sampled
    patch tokens ("tokens", "kmeans") or window means ("pool"), from at most `num_images` images."""
    vit, k = encoder.vit, encoder.num_prefix_tokens
    weight = vit.patch_embed.proj.weight
    banks: dict[int, list[Tensor]] = {l: [] for l in layers}
    seen = 0
    for batch in _batches(images_or_loader):
        if seen >= num_images:
            break
        if batch.dim() >= 1 and batch.shape[0] == 0:
            continue                                                  # an empty batch adds nothing
        # The encoder's own rule (check_images, then embed's cast), not a cast first: integer images are
        # refused here as in forward, not taken as 0..255 values.
        batch = batch[:num_images - seen].to(device=weight.device)
        encoder.check_images(batch)
        seen += batch.shape[0]
        ph, pw = vit.patch_embed.patch_size
        grid = (-(-batch.shape[2] // ph), -(-batch.shape[3] // pw))
        x, rope = encoder.embed(batch)                              # (B, k + N, D): block 1's input
        ropes = block_ropes(vit, rope, 0)                           # no prompts in this buffer
        for l in range(layers[-1] + 1):
            if l > 0:
                x = run_block(vit.blocks[l - 1], x, ropes[l - 1])    # block l's input, no prompts
            patches = x[:, k:].float().cpu()                         # (B, N, D)
            if how == "pool":
                banks[l].append(_window_means(patches, grid, window))
                continue
            B, N, D = patches.shape
            keep = N if tokens_per_image is None else min(tokens_per_image, N)
            # One stream per (seed, image, layer): the sample does not depend on how the images are batched.
            idx = torch.stack([torch.randperm(N, generator=_stream(seed, seen - B + i, l))[:keep] for i in range(B)])
            banks[l].append(torch.gather(patches, 1, idx.unsqueeze(-1).expand(-1, -1, D)).reshape(-1, D))
    if seen == 0:
        raise ValueError("images_or_loader gave no images")
    return banks


@torch.no_grad()
def init_prompts_from_data(encoder, images_or_loader, how: str = "tokens", seed: int = 0, *,
                           num_images: int = 256, tokens_per_image: int | None = 64, window: int = 2,
                           kmeans_iters: int = 100):
    """Overwrite `encoder.prompts` from the frozen backbone's tokens on a sample of images.

    images_or_loader: a (B, C, H, W) tensor, or an iterable (e.g. a DataLoader) of such tensors or of
      (images, labels, ...) tuples; at most `num_images` images are used, in order.
    how: "tokens" (default: Np distinct random patch tokens), "kmeans" (Np k-means centroids of the
      sampled tokens, initialised from Np of them) or "pool" (Np distinct random window x window means).
    tokens_per_image: patch tokens kept per image and layer for "tokens"/"kmeans" (None: all of them).
    Deterministic for a seed and the same images. Returns the encoder.
    """
    prompts = _check_arguments(encoder, how, num_images, tokens_per_image, window, kmeans_iters)
    layers = list(range(prompts.shape[0])) if prompts.dim() == 3 else [0]
    was_training = encoder.training
    encoder.eval()
    try:
        banks = _candidate_banks(encoder, images_or_loader, layers, how, seed, num_images, tokens_per_image,
                                 window)
    finally:
        encoder.train(was_training)
    gen = torch.Generator().manual_seed(seed)
    Np = encoder.num_prompts
    for l in layers:
        bank = torch.cat(banks[l])                                   # (M, D)
        if bank.shape[0] < Np:
            raise ValueError(f"{bank.shape[0]} candidate tokens at layer {l} for {Np} prompts: give more images"
                             + (" or a smaller window" if how == "pool" else ""))
        chosen = bank[torch.randperm(bank.shape[0], generator=gen)[:Np]]
        if how == "kmeans":
            chosen = _kmeans(bank, chosen, kmeans_iters)
        target = prompts.data[l] if prompts.dim() == 3 else prompts.data
        target.copy_(chosen.to(target.dtype))
    return encoder
