"""The options the lspt-bench commands share: comma-separated lists, the autocast dtypes, the default
model, and the shape facts of a --model (checked before anything is measured)."""
from __future__ import annotations

from ..cli_helpers import UsageError, build_backbone

DTYPES = ("fp32", "bf16", "fp16")
DEFAULT_MODEL = "vit_base_patch16_224"


def parse_list(text: str, kind, name: str) -> list:
    """"1, 2,3" -> [1, 2, 3] (each part through `kind`); a UsageError naming --NAME for a bad or empty list."""
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(kind(part))
        except ValueError:
            raise UsageError(f"--{name}: {part!r} is not a valid {kind.__name__}") from None
    if not out:
        raise UsageError(f"--{name}: give at least one value")
    return out


def check_model(name: str, img_size: int | None = None, model_kwargs: dict | None = None,
                task: str = "classification") -> dict:
    """The shape facts of a timm ViT (built on the meta device: no memory, no time); a UsageError for an
    unknown or non-ViT model, or (task "segmentation") one too shallow for the heads' feature blocks."""
    try:
        vit = build_backbone(name, img_size, model_kwargs, device="meta")
    except UsageError:         # some timm releases cannot init a model on meta (e.g. older Evas): build it
        vit = build_backbone(name, img_size, model_kwargs)
    img = vit.patch_embed.img_size
    shape = dict(num_patches=vit.patch_embed.num_patches, prefix=vit.num_prefix_tokens,
                 embed_dim=vit.embed_dim, depth=len(vit.blocks),
                 img_size=img[0] if isinstance(img, (tuple, list)) else img)
    if task == "segmentation":
        from ..seg import default_feature_blocks
        try:
            shape["feature_blocks"] = list(default_feature_blocks(shape["depth"]))
        except ValueError:
            raise UsageError(f"--task segmentation needs a ViT of at least 3 blocks (SETR-PUP's heads read three, "
                             f"scaled from blocks 5, 9 and 12 of ViT-B); --model {name!r} has {shape['depth']} "
                             "(--model-kwargs depth=N)") from None
    return shape
