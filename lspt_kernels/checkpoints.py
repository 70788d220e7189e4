"""Checkpoints: self-supervised backbones a user brings (MAE, MoCo v3), and tuned-parameter files.

Nothing is downloaded: backbones come from local files, loaded with `weights_only=True`.
- MAE (facebookresearch/mae): {'model': state_dict} with timm's ViT key names; the pre-training
  decoder and mask token, when present, are dropped.
- MoCo v3 (facebookresearch/moco-v3): {'state_dict': ...} with keys 'module.base_encoder.*'; the
  momentum encoder and predictor are dropped, as is the base encoder's projection head.
- A plain state dict with timm key names.
An MAE file's final norm (`norm.*`) goes into `fc_norm` when the model has timm's avg-pool layout
(`norm` an Identity, `fc_norm` a LayerNorm), and `from_timm` gives an MAE backbone the official MAE
pooling (docs/method.md, "Features").
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

__all__ = ["from_timm", "load_backbone_checkpoint", "backbone_state_dict", "load_tuned_file", "is_mae_checkpoint"]



def _read(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} is not a PyTorch checkpoint (torch.load with weights_only=True "
                         f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a checkpoint dict (MAE {{'model': ...}}, MoCo v3 "
                         f"{{'state_dict': ...}} or a state dict), got {type(obj).__name__}")
    return obj


def backbone_state_dict(obj: dict, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Map an MAE / MoCo v3 / plain checkpoint dict onto timm ViT key names."""
    if "model" in obj and isinstance(obj["model"], dict):                         # MAE
        sd = dict(obj["model"])
        sd = {k: v for k, v in sd.items() if not (k.startswith("decoder") or k == "mask_token")}
    elif "state_dict" in obj and isinstance(obj["state_dict"], dict):             # MoCo v3
        prefix = "module.base_encoder."
        raw = obj["state_dict"]
        if not any(k.startswith(prefix) for k in raw):
            raise ValueError(f"{source}: a 'state_dict' checkpoint without '{prefix}' keys is not a "
                             f"MoCo v3 checkpoint (first keys: {list(raw)[:3]})")
        sd = {k[len(prefix):]: v for k, v in raw.items()
              if k.startswith(prefix) and "momentum" not in k}
    else:
        sd = dict(obj)
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{source}: no tensors found (expected ViT weights such as 'pos_embed', "
                         "'blocks.0.attn.qkv.weight')")
    # The backbone's own classifier / projection head is never used by the encoders.
    return {k: v for k, v in tensors.items() if not k.startswith("head.")}


def is_mae_checkpoint(obj: dict) -> bool:
    """An MAE pre-training file keeps its weights under 'model' (facebookresearch/mae main_pretrain.py)."""
    return "model" in obj and isinstance(obj["model"], dict)


def _is_mae_file(path) -> bool:
    """The format of a file already loaded once: memory-mapped, so no second full read of the weights."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:           # legacy (non-zip) files cannot be memory-mapped
        obj = _read(path)
    return isinstance(obj, dict) and is_mae_checkpoint(obj)


def _final_norm_into_fc_norm(sd: dict, own: dict) -> dict:
    """timm's avg-pool layout has no `norm.*` but an `fc_norm.*`: the file's final norm is that one."""
    if any(k.startswith("norm.") for k in sd) and not any(k.startswith("fc_norm.") for k in sd) \
            and any(k.startswith("fc_norm.") for k in own) and not any(k.startswith("norm.") for k in own):
        return {("fc_" + k if k.startswith("norm.") else k): v for k, v in sd.items()}
    return sd


def load_backbone_checkpoint(vit: nn.Module, path) -> nn.Module:
    """Load an MAE / MoCo v3 / plain checkpoint file into a timm VisionTransformer, strictly: a missing,
    unexpected or mismatched key is an error naming it. The position embedding is resampled when the
    model's grid differs from the checkpoint's (as timm does)."""
    sd = backbone_state_dict(_read(path), str(path))
    own = {k: v for k, v in vit.state_dict().items() if not k.startswith("head.")}
    sd = _final_norm_into_fc_norm(sd, own)
    if "pos_embed" in sd and "pos_embed" in own and sd["pos_embed"].shape != own["pos_embed"].shape:
        from timm.layers import resample_abs_pos_embed
        prefix = 0 if getattr(vit, "no_embed_class", False) else vit.num_prefix_tokens
        sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], new_size=vit.patch_embed.grid_size,
                                                 num_prefix_tokens=prefix)
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if mismatched:
            parts.append("mismatched shapes " + "; ".join(mismatched[:8]))
        raise ValueError(f"{path} does not fit {type(vit).__name__} (embed_dim={vit.embed_dim}, "
                         f"depth={len(vit.blocks)}): " + ", ".join(parts))
    vit.load_state_dict(sd, strict=False)   # only the head (never loaded) is left out
    return vit


def from_timm(name_or_model, checkpoint=None, method: str = "lspt", pool: str | None = None, **kwargs):
    """Build an encoder around a timm ViT given by name (random init, nothing downloaded) or module,
    with backbone weights from a local MAE / MoCo v3 / plain checkpoint file.

    method: a name of lspt_kernels.encoders.METHODS ("lspt", "gapt", "vpt-deep", "vpt-shallow",
    "adapter", "linear"); kwargs go to the encoder (num_prompts, num_classes, ...) except `img_size` /
    `dynamic_img_size`, which go to timm.
    pool: the features the head sees (encoders.POOLS). None: "mae" for an MAE file (the official MAE
    protocol: the pretrained final norm of the mean of all tokens after CLS), else "model" (the timm
    model's own pooling; CLS after the final norm for a 'token' model, as MoCo v3).
    """
    import timm

    from .encoders import POOLS, build_encoder

    if pool is not None and pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS} or None (chosen from the checkpoint), got {pool!r}")
    if isinstance(name_or_model, str):
        timm_kwargs = {k: kwargs.pop(k) for k in ("img_size", "dynamic_img_size") if k in kwargs}
        try:
            vit = timm.create_model(name_or_model, pretrained=False, num_classes=0, **timm_kwargs)
        except RuntimeError as exc:
            raise ValueError(f"unknown timm model {name_or_model!r}: {exc}") from exc
    else:
        vit = name_or_model
    mae = False
    if checkpoint is not None:
        from .encoders import _check_vit
        _check_vit(vit)
        load_backbone_checkpoint(vit, checkpoint)
        mae = _is_mae_file(checkpoint)
    if pool is None:
        pool = "mae" if mae else "model"
    return build_encoder(method, vit, pool=pool, **kwargs)


# Files written before these options were recorded: pooling was always the model's own, and the
# dimensions are still checked by the tensor shapes below.
_OLDER_FILES = {"pool": "model"}
_CHECKED_BY_SHAPES = ("embed_dim", "depth", "adapter_dim")


def _config_differences(saved: dict, own: dict) -> list[str]:
    """Every structural option (all of config() except TRAINING_ONLY_OPTIONS) that differs."""
    from .encoders import TRAINING_ONLY_OPTIONS

    missing = object()
    diffs = []
    for key in sorted(set(saved) | set(own)):
        if key in TRAINING_ONLY_OPTIONS or (key in _CHECKED_BY_SHAPES and key not in saved):
            continue
        a, b = saved.get(key, _OLDER_FILES.get(key, missing)), own.get(key, missing)
        if a != b:
            show = lambda v: "(not recorded)" if v is missing else repr(v)  # noqa: E731
            diffs.append(f"{key}: file {show(a)} vs encoder {show(b)}")
    return diffs


def load_tuned_file(encoder: nn.Module, path) -> None:
    """Load a safetensors file written by `save_tuned` into `encoder`, checking every structural option
    recorded in its metadata against `encoder.config()`, and the tensor names and shapes. Nothing is
    copied until every check has passed: a refused file leaves the encoder as it was."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tuned-parameter file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:
        raise ValueError(f"{path} is not a safetensors file written by save_tuned: {exc}") from exc
    if "lspt_kernels" not in meta:
        raise ValueError(f"{path} has no 'lspt_kernels' metadata: it was not written by save_tuned, so "
                         "what its tensors mean (method, options) is unknown")
    try:
        saved = json.loads(meta["lspt_kernels"])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: its 'lspt_kernels' metadata is not valid JSON ({exc.msg} at "
                         f"character {exc.pos}): the file is damaged or was not written by save_tuned") from exc
    if not isinstance(saved, dict) or "method" not in saved:
        raise ValueError(f"{path}: its 'lspt_kernels' metadata must be a JSON object with a 'method', "
                         f"got {meta['lspt_kernels'][:80]!r}")
    if saved["method"] != encoder.method:
        raise ValueError(f"{path} holds {saved['method']!r} parameters, this encoder is {encoder.method!r}")
    diffs = _config_differences(saved, encoder.config())
    if diffs:
        raise ValueError(f"{path} was saved with other {encoder.method!r} options than this encoder: "
                         + "; ".join(diffs))
    own = dict(encoder.named_parameters())
    expected = {n for n, p in own.items() if p.requires_grad}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    mismatched = [f"{n}: file {tuple(t.shape)} vs encoder {tuple(own[n].shape)}"
                  for n, t in tensors.items() if n in own and t.shape != own[n].shape]
    if missing or unexpected or mismatched:
        raise ValueError(f"{path} does not fit this encoder: missing {missing}, unexpected {unexpected}, "
                         f"mismatched {mismatched}")
    with torch.no_grad():
        for n, t in tensors.items():
            own[n].copy_(t)
