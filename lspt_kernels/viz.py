"""`lspt-viz`: the per-block maps behind the paper's forgetting figures (1, 3, 4, 5), for any tuned
encoder and image.

- Similarity map of block l (paper fig. 3, "temporal forgetting"): cosine similarity between each
  prompt token that enters block l and each patch token that enters it, averaged over the prompts.
- Attention map of block l (paper figs. 1, 4, 5, "spatial forgetting"): block l's softmax attention
  from the CLS token (or, with source="prompts", averaged over the prompt tokens) to each patch,
  averaged over heads. GaPT's temperature of block l divides the logits, as in its forward.

Both are read from the encoder's own block loop (no second copy of it): a forward hook on every
block's `norm1` sees the block input x = [prefix | prompts | patches] (the prompts already written
into the slot for this block) and norm1(x), the attention input, from which q and k are recomputed
with the block's own projections, q/k norms and, on an Eva, its rotary embedding (the prompts' rows
the identity, as in the forward; `backbones.attention_qkv`). `norm1` is the hook point because it is
the one module timm's Block / EvaBlock forward and GaPT's temperature path call exactly once per block
(a hook on the block or on block.attn would not fire for GaPT, which calls the attention pieces
itself); a post-norm block (EvaBlockPostNorm) applies norm1 after its attention and is refused.

Models without a class token (class_token=False, e.g. global_pool="avg"): source="cls" falls back
to the mean attention of the tokens the pooled feature is built from, every token after the prefix
(prompts and patches, as timm's avg pool averages x[:, num_prefix_tokens:]); the result records it.
The linear probe has no prompts: its similarity maps are undefined (a ValueError says so), its
attention maps from CLS are the frozen backbone's.

Segmentation files (written by `lspt-train --task segmentation`): lspt-viz draws each file's predicted
mask over each image instead (`draw_masks`; single-scale sliding-window inference at the image's own size,
as lspt-eval), and summary.json gives the share of the image each class takes.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .backbones import attention_qkv, block_ropes, check_attention, check_block_layout
from .cli_helpers import (
    UsageError,
    add_model_kwargs_option,
    backbone_mismatch,
    backbone_spec,
    check_number,
    check_output_dir,
    load_backbone,
    load_tuned_encoder,
    load_tuned_model,
    model_kwargs_from_args,
    resolve_device,
    train_record,
    tuned_inference,
    tuned_task,
)
from .data import IMAGENET_MEAN, IMAGENET_STD, open_image

__all__ = ["KINDS", "SOURCES", "block_maps", "similarity_maps", "attention_maps", "summarize",
           "load_image", "draw_rows", "palette", "predict_mask", "draw_masks", "build_parser", "main"]

KINDS = ("similarity", "attention")
SOURCES = ("cls", "prompts")


# ------------------------------------------------------------------------------------------------
# Maps as tensors
# ------------------------------------------------------------------------------------------------
def _temperature(encoder, l: int) -> float | Tensor:
    """The softmax temperature block l's attention runs with: GaPT's temperatures[l] projected onto
    its range [0.01, 10] (the official TEMP_MIN / TEMP_MAX), 1 for every other method."""
    temps = getattr(encoder, "temperatures", None)
    if getattr(encoder, "method", None) != "gapt" or temps is None:
        return 1.0
    low, high = getattr(encoder, "TEMPERATURE_RANGE", (0.01, 10.0))
    return temps[l].detach().float().clamp(low, high)


def _check_blocks(vit, kinds=KINDS) -> None:
    """The maps are read at each block's norm1 (a pre-norm block's attention input); the attention maps
    recompute the logits, which needs an attention class `backbones.attention_qkv` knows."""
    check_block_layout(vit, "lspt_kernels.viz", pre_norm=True)
    if "attention" in kinds:
        check_attention(vit, "lspt_kernels.viz (attention maps)")


def _grid(encoder, images: Tensor, num_patches: int) -> tuple[int, int]:
    pe = encoder.vit.patch_embed
    H, W = images.shape[-2:]
    if getattr(encoder.vit, "dynamic_img_size", False) and hasattr(pe, "dynamic_feat_size"):
        h, w = pe.dynamic_feat_size((H, W))
    else:
        h, w = pe.grid_size
    if h * w != num_patches:
        raise RuntimeError(f"{num_patches} patch tokens do not form the {h}x{w} patch grid of a {H}x{W} image")
    return int(h), int(w)


def _queries(encoder, source: str, T: int) -> tuple[slice, str]:
    """The query tokens whose attention is averaged, and a description for the summary."""
    k, n = encoder.num_prefix_tokens, encoder.num_prompts
    if source == "prompts":
        if n == 0:
            raise ValueError(f"source='prompts' needs prompt tokens; the {encoder.method!r} encoder has none "
                             "(use source='cls')")
        return slice(k, k + n), "the prompt tokens (mean)"
    if getattr(encoder.vit, "cls_token", None) is not None:
        return slice(0, 1), "the CLS token"
    return slice(k, T), "all tokens after the prefix (mean; no class token, these are what the pool averages)"


def block_maps(encoder, images: Tensor, kinds=KINDS, source: str = "cls") -> dict:
    """Per-block maps of `encoder` on `images` (B, C, H, W), normalised as the encoder expects.

    Returns {"similarity": (B, L, h, w), "attention": (B, L, h, w)} (only the kinds asked for) as
    fp32 CPU tensors, plus "queries": which tokens the attention is taken from. The encoder runs in
    eval mode under no_grad (its training mode is restored afterwards)."""
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds!r}")
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if "similarity" in kinds and encoder.num_prompts == 0:
        raise ValueError(f"similarity maps need prompt tokens; the {encoder.method!r} encoder has none "
                         "(ask for kinds=('attention',))")
    if "attention" in kinds and source == "prompts":
        _queries(encoder, source, 0)                    # the error for an encoder without prompts
    vit = encoder.vit
    _check_blocks(vit, kinds)
    k, n, L = encoder.num_prefix_tokens, encoder.num_prompts, len(vit.blocks)
    found = {kind: [None] * L for kind in kinds}
    calls = [0] * L
    queries = {}

    def hook(l, block):
        def fn(module, args, xn):
            calls[l] += 1
            x = args[0]                                                   # block input (B, T, D)
            patches = x[:, k + n:].float()
            if "similarity" in kinds:
                prompts = x[:, k:k + n].float()
                cos = F.normalize(prompts, dim=-1) @ F.normalize(patches, dim=-1).transpose(1, 2)  # (B, n, N)
                found["similarity"][l] = cos.mean(1)
            if "attention" in kinds:
                attn = block.attn
                q, kk, _ = attention_qkv(attn, xn, ropes[l])                     # (B, heads, T, hd)
                rows, queries["queries"] = _queries(encoder, source, xn.shape[1])
                logits = (q[:, :, rows].float() @ kk.float().transpose(-2, -1)) * attn.scale
                probs = (logits / _temperature(encoder, l)).softmax(-1)         # (B, heads, Q, T)
                found["attention"][l] = probs[..., k + n:].mean(dim=(1, 2))     # (B, N)
        return fn

    handles = [block.norm1.register_forward_hook(hook(l, block)) for l, block in enumerate(vit.blocks)]
    was_training = encoder.training
    try:
        encoder.eval()
        with torch.no_grad():
            encoder.check_images(images)
            # Each block's rope as the loop builds it (the prompts' rows the identity); None without RoPE.
            ropes = block_ropes(vit, encoder.embed(images)[1], n) if "attention" in kinds else None
            encoder.forward_features(images)
    finally:
        for h in handles:
            h.remove()
        encoder.train(was_training)
    if calls != [1] * L:
        # A block whose norm1 ran twice (or never) cannot be attributed: refuse rather than guess.
        raise RuntimeError(f"expected each block's norm1 to run once per forward, got calls {calls}")
    N = found[kinds[0]][0].shape[-1]
    h, w = _grid(encoder, images, N)
    out = {kind: torch.stack(maps, 1).reshape(images.shape[0], L, h, w).cpu() for kind, maps in found.items()}
    if "attention" in kinds:
        out["queries"] = queries["queries"]
    return out


def similarity_maps(encoder, images: Tensor) -> Tensor:
    """(B, L, h, w): per block, the cosine similarity of its input prompts and each patch, mean over prompts."""
    return block_maps(encoder, images, ("similarity",))["similarity"]


def attention_maps(encoder, images: Tensor, source: str = "cls") -> Tensor:
    """(B, L, h, w): per block, attention from CLS (or the prompts' mean) to each patch, mean over heads."""
    return block_maps(encoder, images, ("attention",), source)["attention"]


def summarize(kind: str, maps: Tensor) -> list[list[dict]]:
    """Scalars per image and block for one kind's (B, L, h, w) maps, to compare forgetting as numbers.

    attention: entropy (nats) of the map renormalised over the patches, that entropy / log(N)
      (1 = uniform, i.e. fully blurred), and patch_mass = the raw map's sum (the share of the
      attention that goes to patches rather than to prefix and prompt tokens).
    similarity: mean, std and contrast (max - min) over the patches."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(maps, Tensor) or maps.dim() != 4:
        got = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise ValueError(f"maps must be a (B, L, h, w) tensor from block_maps, got {got}")
    B, L = maps.shape[:2]
    flat = maps.reshape(B, L, -1).double()
    N = flat.shape[-1]
    out = []
    for b in range(B):
        rows = []
        for l in range(L):
            m = flat[b, l]
            if kind == "attention":
                mass = m.sum()
                p = m / mass
                ent = -(p * p.clamp_min(1e-30).log()).sum()
                rows.append(dict(block=l + 1, entropy=float(ent), normalized_entropy=float(ent / math.log(N))
                                 if N > 1 else 0.0, patch_mass=float(mass)))
            else:
                rows.append(dict(block=l + 1, mean=float(m.mean()), std=float(m.std(unbiased=False)),
                                 contrast=float(m.max() - m.min())))
        out.append(rows)
    return out


# ------------------------------------------------------------------------------------------------
# Inputs: images
# ------------------------------------------------------------------------------------------------
def load_image(path, size, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> tuple[Tensor, Tensor]:
    """An image file -> ((3, H, W) tensor normalised with mean/std (default ImageNet's), (H, W, 3)
    uint8 for drawing): opened as training opens images (`data.open_image`: 16-bit images scaled, not
    clipped), the shorter side resized (bicubic) to cover `size` (int or (H, W)), then centre-cropped,
    as evaluation transforms do. A file that cannot be read is a ValueError (DataError) naming it."""
    from PIL import Image
    H, W = (size, size) if isinstance(size, int) else tuple(size)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    im = open_image(path)
    scale = max(H / im.height, W / im.width)
    im = im.resize((max(W, round(im.width * scale)), max(H, round(im.height * scale))), Image.BICUBIC)
    left, top = (im.width - W) // 2, (im.height - H) // 2
    im = im.crop((left, top, left + W, top + H))
    pixels = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(H, W, 3)
    x = pixels.permute(2, 0, 1).float() / 255.0
    mean, std = (torch.tensor(v, dtype=torch.float32).view(3, 1, 1) for v in (mean, std))
    x = (x - mean) / std
    return x, pixels


# ------------------------------------------------------------------------------------------------
# Drawing
# ------------------------------------------------------------------------------------------------
def draw_rows(image, rows: list[tuple[str, Tensor]], path, kind: str, title: str = "") -> Path:
    """One PNG: the image, then per row (label, (L, h, w) maps) one panel per block, each map
    upsampled to the image and overlaid on it, one colour scale (and colour bar) per row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = torch.as_tensor(image)
    H, W = image.shape[:2]
    L = max(m.shape[0] for _, m in rows)
    fig, axes = plt.subplots(len(rows), L + 1, figsize=(1.45 * (L + 1) + 0.8, 1.6 * len(rows) + 0.4),
                             squeeze=False, layout="constrained")
    for r, (label, maps) in enumerate(rows):
        up = F.interpolate(maps.float().unsqueeze(1), size=(H, W), mode="bilinear", align_corners=False)[:, 0]
        vmin, vmax = float(maps.min()), float(maps.max())
        axes[r, 0].imshow(image.numpy())
        axes[r, 0].set_title(f"{label}\ninput", fontsize=7)
        im = None
        for l in range(L):
            ax = axes[r, l + 1]
            if l < maps.shape[0]:
                ax.imshow(image.numpy())
                im = ax.imshow(up[l].numpy(), cmap="jet", alpha=0.55, vmin=vmin, vmax=vmax)
                ax.set_title(f"{label}\nblock {l + 1}", fontsize=7)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
            if not ax.images:
                ax.axis("off")
        cb = fig.colorbar(im, ax=list(axes[r]), shrink=0.85, pad=0.01)
        cb.ax.tick_params(labelsize=6)
        cb.set_label("cosine similarity" if kind == "similarity" else "attention", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lspt-viz",
        description="Per-block similarity (prompts vs patches) and attention maps of tuned encoders, "
                    "overlaid on images: the paper's forgetting figures for your own model. One PNG per "
                    "image and kind (rows: the tuned files in the order given, columns: blocks) and "
                    "summary.json with per-block scalars. Segmentation files: one PNG per image with each "
                    "file's predicted mask overlaid, and summary.json with each class's share of the image.")
    p.add_argument("--tuned", action="append", required=True, metavar="FILE",
                   help="a .safetensors file written by encoder.save_tuned (repeat: rows in this order, "
                        "e.g. GaPT first, then LSPT)")
    p.add_argument("--model", default=None,
                   help="the timm VisionTransformer name the files were tuned on (default: the backbone "
                        "that lspt-train recorded in the files; --model-kwargs/--img-size/--checkpoint/--seed "
                        "then default to it too)")
    add_model_kwargs_option(p, alias=True)
    p.add_argument("--img-size", type=int, default=None, help="image size (default: the model's)")
    p.add_argument("--checkpoint", default=None, metavar="BACKBONE",
                   help="backbone weights (MAE / MoCo v3 / plain state dict); without it the backbone is "
                        "timm's random init under --seed")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the random backbone when no --checkpoint (default: lspt-train's, else 0)")
    p.add_argument("--image", action="append", required=True, metavar="IMG", help="an image file (repeatable)")
    p.add_argument("--output", required=True, metavar="DIR", help="directory for the PNGs and summary.json")
    p.add_argument("--kind", default="both", choices=("similarity", "attention", "both"))
    p.add_argument("--from", dest="source", default="cls", choices=SOURCES,
                   help="attention from the CLS token (default) or averaged over the prompt tokens")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    return p


def _backbone(spec: dict, device: torch.device):
    """The ViT of the backbone spec on `device`, in eval mode; a note on stderr when it is a random init,
    a warning when it is not the backbone lspt-train recorded in the files."""
    vit = load_backbone(spec)
    try:
        _check_blocks(vit)
    except TypeError as exc:
        raise UsageError(f"--model {spec['model']!r}: {exc}") from None
    mismatch = backbone_mismatch(spec, vit)
    if mismatch:
        print(f"lspt-viz: warning: {mismatch}; the maps are not those of the tuned model", file=sys.stderr)
    if spec["checkpoint"] is None and spec["recorded"]:
        as_recorded = spec["seed"] == spec["record"].get("seed", 0)
        print(f"lspt-viz: note: the backbone is timm's random init under seed {spec['seed']}"
              + (", as lspt-train recorded (no checkpoint)" if as_recorded else
                 f" (--seed; lspt-train recorded {spec['record'].get('seed', 0)})"), file=sys.stderr)
    elif spec["checkpoint"] is None:
        print(f"lspt-viz: note: no --checkpoint, the backbone is timm's random init (seed {spec['seed']}); the "
              "maps mean something only if the tuned files were trained on this same backbone", file=sys.stderr)
    return vit.to(device).eval()


def _image_names(paths: list[Path]) -> list[str]:
    """Output names: the file stem; "folder_stem" when stems repeat (val/red/000.png, val/blue/000.png);
    the position appended when even those repeat."""
    names = [p.stem for p in paths]
    names = [n if names.count(n) == 1 else f"{p.parent.name}_{n}" for n, p in zip(names, paths)]
    return [n if names.count(n) == 1 else f"{n}-{i}" for i, n in enumerate(names)]


def _short_path(path) -> str:
    """The file name with its folder (val/blue/000.png -> blue/000.png): enough to tell images apart."""
    path = Path(path)
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def _labels(methods: list[str], paths: list[Path]) -> list[str]:
    """Row labels: the method, with the file name when two files share a method."""
    return [m if methods.count(m) == 1 else f"{m} ({p.stem})" for m, p in zip(methods, paths)]


def _load_images(paths: list[str], size, spec: dict) -> list[tuple[Tensor, Tensor]]:
    images = []
    for f in paths:
        try:
            images.append(load_image(f, size, spec["mean"], spec["std"]))
        except (FileNotFoundError, ValueError) as exc:
            raise UsageError(f"--image: {exc}") from None
    return images


def _check_prompts(args, kinds, tuned: list[Path], encoders: list) -> None:
    """--from prompts needs prompts in every row; similarity rows are skipped (with a note) for the rest."""
    without = [str(f) for f, e in zip(tuned, encoders) if e.num_prompts == 0]
    if without and args.source == "prompts":
        raise UsageError("--from prompts: " + ", ".join(without) + " has no prompt tokens; use --from cls")
    if without and "similarity" in kinds:
        print(f"lspt-viz: note: no similarity maps for {', '.join(without)} (no prompt tokens)", file=sys.stderr)


def _all_maps(encoders: list, batch: Tensor, kinds, source: str) -> tuple[dict, dict]:
    """({(tuned index, kind): (B, L, h, w) maps}, {tuned index: the attention queries' description})."""
    results, queries = {}, {}
    for i, enc in enumerate(encoders):
        want = tuple(k for k in kinds if k == "attention" or enc.num_prompts > 0)
        if not want:
            continue
        maps = block_maps(enc, batch, want, source)
        queries[i] = maps.pop("queries", None)
        for kind in want:
            results[i, kind] = maps[kind]
    return results, queries


def _draw(args, kinds, images, labels, results, queries, out_dir: Path) -> list[Path]:
    """One PNG per image and kind: a row per tuned file that has maps of that kind."""
    stems = _image_names([Path(f) for f in args.image])
    queries_text = next((q for q in queries.values() if q), "")
    written = []
    for b, (_, pixels) in enumerate(images):
        for kind in kinds:
            rows = [(labels[i], results[i, kind][b]) for i in range(len(labels)) if (i, kind) in results]
            if not rows:
                continue
            what = ("cosine similarity of the block's input prompts and each patch, mean over prompts"
                    if kind == "similarity" else f"attention to each patch from {queries_text}, mean over heads")
            written.append(draw_rows(pixels, rows, out_dir / f"{stems[b]}_{kind}.png", kind,
                                     title=f"{_short_path(args.image[b])}: {what}"))
    return written


def _summary(args, spec, size, kinds, tuned, encoders, labels, results, queries) -> dict:
    summary = dict(model=spec["model"], model_kwargs=spec["model_kwargs"], img_size=list(size), seed=spec["seed"],
                   checkpoint=spec["checkpoint"], mean=list(spec["mean"]), std=list(spec["std"]), kinds=list(kinds),
                   attention_from=args.source, results=[])
    for i, enc in enumerate(encoders):
        per_kind = {kind: summarize(kind, results[i, kind]) for kind in kinds if (i, kind) in results}
        for b, img in enumerate(args.image):
            entry = dict(tuned=str(tuned[i]), method=enc.method, label=labels[i], image=str(img))
            if queries.get(i):
                entry["attention_queries"] = queries[i]
            entry.update({kind: rows[b] for kind, rows in per_kind.items()})
            summary["results"].append(entry)
    return summary


def _run(args) -> int:
    for option, value in (("--img-size", args.img_size), ("--seed", args.seed)):
        if value is not None:
            check_number(option, value, ge=1 if option == "--img-size" else 0)
    kinds = KINDS if args.kind == "both" else (args.kind,)
    device = resolve_device(args.device)
    out_dir = check_output_dir(args.output)
    tuned = [Path(f) for f in args.tuned]
    if _segmentation_files(tuned):
        return _run_segmentation(args, tuned, device, out_dir)
    spec = backbone_spec(tuned, args.model, model_kwargs_from_args(args), args.img_size, args.checkpoint, args.seed)
    vit = _backbone(spec, device)
    size = tuple(vit.patch_embed.img_size)
    images = _load_images(args.image, size, spec)
    batch = torch.stack([x for x, _ in images]).to(device)
    encoders = [load_tuned_encoder(f, vit).to(device) for f in tuned]
    labels = _labels([e.method for e in encoders], tuned)
    _check_prompts(args, kinds, tuned, encoders)
    results, queries = _all_maps(encoders, batch, kinds, args.source)
    written = _draw(args, kinds, images, labels, results, queries, out_dir)
    summary = _summary(args, spec, size, kinds, tuned, encoders, labels, results, queries)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    for p in written:
        print(p)
    print(out_dir / "summary.json")
    return 0


# ------------------------------------------------------------------------------------------------
# Segmentation files: predicted masks
# ------------------------------------------------------------------------------------------------
def palette(num_classes: int) -> Tensor:
    """(num_classes, 3) uint8 colours, one per class, far apart for neighbouring indices (hues stepped by the
    golden ratio, two brightness levels), the same for every run."""
    import colorsys
    colours = [colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.75, 0.95 if k % 2 == 0 else 0.7) for k in range(num_classes)]
    return (torch.tensor(colours) * 255).round().to(torch.uint8)


def predict_mask(model, image: Tensor, config=None) -> Tensor:
    """The (H, W) int64 class map a SegmentationModel predicts for one normalised (3, H, W) image at its own size
    (`seg.inference`, single-scale sliding windows of the model's crop by default, as lspt-eval)."""
    from .seg import InferenceConfig, inference
    config = config or InferenceConfig.for_crop(model.encoder.vit.patch_embed.img_size[0])
    was_training = model.training
    model.eval()
    try:
        probs = inference(model, image[None], model.num_classes, config, model.align_corners)
    finally:
        model.train(was_training)
    return probs.argmax(1)[0].cpu()


def draw_masks(image, rows: list[tuple[str, Tensor]], path, class_names: list[str], title: str = "",
               alpha: float = 0.5, legend: int = 16) -> Path:
    """One PNG: the image, then per (label, (H, W) class map) the map's colours (`palette`) blended over it with
    `alpha`; a legend names the `legend` classes that take the most pixels over all maps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    image = torch.as_tensor(image)
    colours = palette(len(class_names))
    area = torch.bincount(torch.cat([m.flatten() for _, m in rows]), minlength=len(class_names))
    shown = [int(k) for k in area.argsort(descending=True)[:legend] if area[k] > 0]
    fig, axes = plt.subplots(1, len(rows) + 1, figsize=(2.6 * (len(rows) + 1), 3.2), squeeze=False,
                             layout="constrained")
    axes[0, 0].imshow(image.numpy())
    axes[0, 0].set_title("input", fontsize=8)
    for ax, (label, mask) in zip(axes[0, 1:], rows):
        blended = image.float() * (1 - alpha) + colours[mask].float() * alpha
        ax.imshow(blended.round().to(torch.uint8).numpy())
        ax.set_title(label, fontsize=8)
    for ax in axes[0]:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.legend(handles=[Patch(color=(colours[k].float() / 255).tolist(), label=class_names[k]) for k in shown],
               loc="outside lower center", ncol=min(len(shown), 6), fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _segmentation_files(tuned: list[Path]) -> bool:
    """Whether the --tuned files are segmentation files (all of them; a mix is refused)."""
    tasks = [tuned_task(train_record(f)[0]) for f in tuned]
    if len(set(tasks)) > 1:
        raise UsageError("--tuned: " + ", ".join(f"{f} ({t})" for f, t in zip(tuned, tasks)) + " mix segmentation "
                         "and classification files; lspt-viz draws one kind per run")
    return tasks[0] == "segmentation"


def _run_segmentation(args, tuned: list[Path], device: torch.device, out_dir: Path) -> int:
    """lspt-viz on segmentation files: per image, each file's predicted mask over it; summary.json."""
    import numpy as np

    from .seg.data import normalize
    if args.kind != "both" or args.source != "cls":
        raise UsageError("--kind and --from choose the per-block maps of classification files; for segmentation "
                         "files lspt-viz draws the predicted masks")
    spec = backbone_spec(tuned, args.model, model_kwargs_from_args(args), args.img_size, args.checkpoint, args.seed)
    vit = _backbone(spec, device)
    models = [load_tuned_model(f, vit).to(device) for f in tuned]
    labels = _labels([m.encoder.method for m in models], tuned)
    record = spec["record"]
    names = record.get("classes") if len(record.get("classes") or []) == models[0].num_classes else \
        [str(k) for k in range(models[0].num_classes)]
    stems, summary = _image_names([Path(f) for f in args.image]), []
    for stem, image_path in zip(stems, args.image):
        try:
            pixels = np.array(open_image(image_path))
        except (FileNotFoundError, ValueError) as exc:
            raise UsageError(f"--image: {exc}") from None
        x = normalize(pixels, spec["mean"], spec["std"]).to(device)
        masks = [predict_mask(m, x, tuned_inference(m, record)) for m in models]
        print(draw_masks(torch.from_numpy(pixels), list(zip(labels, masks)), out_dir / f"{stem}_segmentation.png",
                         names, title=f"{_short_path(image_path)}: predicted classes"))
        for f, m, label, mask in zip(tuned, models, labels, masks):
            share = torch.bincount(mask.flatten(), minlength=m.num_classes).double() / mask.numel()
            summary.append(dict(tuned=str(f), method=m.encoder.method, label=label, image=str(image_path),
                                size=list(mask.shape), class_shares={names[int(k)]: float(share[k])
                                                                     for k in share.argsort(descending=True)
                                                                     if share[k] > 0}))
    (out_dir / "summary.json").write_text(json.dumps(dict(model=spec["model"], model_kwargs=spec["model_kwargs"],
                                                          seed=spec["seed"], checkpoint=spec["checkpoint"],
                                                          kind="segmentation", results=summary), indent=2))
    print(out_dir / "summary.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        return _run(args)
    except UsageError as exc:
        print(f"lspt-viz: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
