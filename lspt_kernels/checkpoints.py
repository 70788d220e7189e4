"""Checkpoints: self-supervised backbones a user brings (MAE, MoCo v3), and tuned-parameter files.

Nothing is downloaded: backbones come from local files, loaded with `weights_only=True`.
- MAE (facebookresearch/mae): {'model': state_dict} with timm's ViT key names; the pre-training
  decoder and mask token, when present, are dropped.
- MoCo v3 (facebookresearch/moco-v3): {'state_dict': ...} with keys 'module.base_encoder.*'; the
  momentum encoder and predictor are dropped, as is the base encoder's projection head.
- A plain state dict with timm key names.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

__all__ = ["from_timm", "load_backbone_checkpoint", "backbone_state_dict", "load_tuned_file"]



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


def load_backbone_checkpoint(vit: nn.Module, path) -> nn.Module:
    """Load an MAE / MoCo v3 / plain checkpoint file into a timm VisionTransformer, strictly: a missing,
    unexpected or mismatched key is an error naming it. The position embedding is resampled when the
    model's grid differs from the checkpoint's (as timm does)."""
    sd = backbone_state_dict(_read(path), str(path))
    own = {k: v for k, v in vit.state_dict().items() if not k.startswith("head.")}
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


def from_timm(name_or_model, checkpoint=None, method: str = "lspt", **kwargs):
    """Build an encoder around a timm ViT given by name (random init, nothing downloaded) or module,
    with backbone weights from a local MAE / MoCo v3 / plain checkpoint file.

    method: "lspt" | "gapt" | "vpt-deep" | "vpt-shallow" | "linear"; kwargs go to the encoder
    (num_prompts, num_classes, ...) except `img_size` / `dynamic_img_size`, which go to timm.
    """
    import timm

    from .encoders import build_encoder

    if isinstance(name_or_model, str):
        timm_kwargs = {k: kwargs.pop(k) for k in ("img_size", "dynamic_img_size") if k in kwargs}
        try:
            vit = timm.create_model(name_or_model, pretrained=False, num_classes=0, **timm_kwargs)
        except RuntimeError as exc:
            raise ValueError(f"unknown timm model {name_or_model!r}: {exc}") from exc
    else:
        vit = name_or_model
    if checkpoint is not None:
        from .encoders import _check_vit
        _check_vit(vit)
        load_backbone_checkpoint(vit, checkpoint)
    return build_encoder(method, vit, **kwargs)


def load_tuned_file(encoder: nn.Module, path) -> None:
    """Load a safetensors file written by `save_tuned` into `encoder`, checking method and shapes."""
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
    saved = json.loads(meta.get("lspt_kernels", "{}"))
    if saved and saved.get("method") != encoder.method:
        raise ValueError(f"{path} holds {saved.get('method')!r} parameters, this encoder is {encoder.method!r}")
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
