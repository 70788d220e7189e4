"""Checkpoints: self-supervised backbones a user brings (MAE, MoCo v3), and tuned-parameter files.

Nothing is downloaded: backbones come from local files, loaded with `weights_only=True`.
- MAE (facebookresearch/mae): {'model': state_dict} with timm's ViT key names; the pre-training
  decoder and mask token, when present, are dropped.
- MoCo v3 (facebookresearch/moco-v3): {'state_dict': ...} with keys 'module.base_encoder.*'; the
  momentum encoder and predictor are dropped, as is the base encoder's projection head.
- A plain state dict with timm key names, also as {'state_dict': plain}.
A DDP save, whose keys all start with 'module.', has that prefix stripped (only when every key
carries it). Paths may be str or os.PathLike, '~' is expanded. Tensors holding NaN or inf are
loaded, with a warning naming them.
An MAE file's final norm (`norm.*`) goes into `fc_norm` when the model has timm's avg-pool layout
(`norm` an Identity, `fc_norm` a LayerNorm); `encoders.from_timm` gives an MAE backbone the official
MAE pooling (docs/method.md, "Features").
A timm Eva backbone (DINOv3, EVA-02, Perception Encoder, ...) reads a file of its original release
the timm way: timm's reader (`timm.models.load_state_dict`: .pth or .safetensors, EMA weights first,
'model' / 'state_dict' wrappers and 'module.' prefixes), then timm's own checkpoint filter for Eva
(e.g. Meta's DINOv3 `storage_tokens`, `ls1.gamma`, `qkv.bias`; EVA-02's `mlp.w12`), then the same
strict key check as every other file.

Tuned-parameter files (`save_tuned_file` / `load_tuned_file`, behind `encoder.save_tuned` /
`encoder.load_tuned`) are safetensors files whose "lspt_kernels" metadata entry is the encoder's
`config()`; `read_tuned_metadata` is the one reader of that metadata. This module is file IO only:
it imports nothing from the encoders (they import it).
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from .backbones import checkpoint_filter, is_eva

__all__ = ["load_backbone_checkpoint", "load_release_checkpoint", "backbone_state_dict", "save_tuned_file",
           "load_tuned_file", "read_tuned_metadata", "is_mae_checkpoint", "is_mocov3_checkpoint", "is_mae_file",
           "as_path", "CONFIG_KEY"]

# What the official MoCo v3 file prefixes its encoder's keys with.
MOCOV3_PREFIX = "module.base_encoder."

# The metadata entry of a tuned file that holds `encoder.config()` (method and structural options).
CONFIG_KEY = "lspt_kernels"


def as_path(path, argument: str = "path") -> Path:
    """A file path from a str or os.PathLike, '~' expanded. bytes are refused: a bytes path works in
    some calls and fails oddly in others (str(b'x') is "b'x'")."""
    if isinstance(path, (str, os.PathLike)):
        path = os.fspath(path)
    if not isinstance(path, str):
        raise TypeError(f"{argument} must be a file path (str or os.PathLike), got {type(path).__name__}"
                        + (" (decode it with os.fsdecode)" if isinstance(path, bytes) else ""))
    if not path:
        raise ValueError(f"{argument} must be a file path, got an empty string")
    return Path(path).expanduser()


def _warn_non_finite(tensors: dict, source: str) -> None:
    """Warn (not refuse: a diverged run is still worth inspecting) with the names of float tensors
    that hold NaN or inf."""
    bad = [n for n, t in tensors.items()
           if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        warnings.warn(f"{source}: {len(bad)} tensor(s) hold NaN or inf values: {bad[:5]}"
                      f"{' ...' if len(bad) > 5 else ''}", RuntimeWarning, stacklevel=3)


def _strip_ddp_prefix(sd: dict) -> dict:
    """The tensors of sd; a plain DDP save prefixes every key with 'module.': strip it when (and only
    when) every tensor's key carries it (entries such as 'epoch' do not count)."""
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if sd and all(isinstance(k, str) and k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return sd


# Keys that every timm VisionTransformer state dict has (whatever its pooling, prefix or norms).
_VIT_KEYS = ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight")


def _unexpected_prefix_hint(unexpected: list[str], own: dict) -> str:
    """When the unexpected keys are the model's keys under one extra prefix ('backbone.', 'encoder.'),
    say so: the key lists alone do not show it."""
    prefixes = {k[:-len(o)] for k in unexpected for o in _VIT_KEYS if o in own and k.endswith("." + o)}
    if len(prefixes) == 1:
        prefix = prefixes.pop()
        return (f"; the checkpoint's keys carry a prefix {prefix!r} that the model's do not (strip it: "
                f"{{k.removeprefix({prefix!r}): v for k, v in state_dict.items()}})")
    return ""


def _read(path) -> dict:
    path = as_path(path)
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
    """Map an MAE / MoCo v3 / plain checkpoint dict onto timm ViT key names.

    {'model': sd} is MAE's; {'state_dict': sd} is MoCo v3's when sd has 'module.base_encoder.' keys,
    else a plain timm state dict; anything else is a plain state dict. A 'module.' prefix that every
    key carries (a DDP save) is stripped."""
    if "model" in obj and isinstance(obj["model"], dict):                         # MAE
        sd = _strip_ddp_prefix(obj["model"])
        sd = {k: v for k, v in sd.items() if not (k.startswith("decoder") or k == "mask_token")}
    elif "state_dict" in obj and isinstance(obj["state_dict"], dict):             # MoCo v3, or plain
        prefix, raw = MOCOV3_PREFIX, obj["state_dict"]
        if is_mocov3_checkpoint(obj):
            sd = {k[len(prefix):]: v for k, v in raw.items()
                  if k.startswith(prefix) and "momentum" not in k}
        else:
            sd = _strip_ddp_prefix(raw)
            if not any(k in sd for k in _VIT_KEYS):
                raise ValueError(f"{source}: a 'state_dict' checkpoint without '{prefix}' keys is not a "
                                 f"MoCo v3 checkpoint, nor a timm ViT state dict (no {' or '.join(_VIT_KEYS)}; "
                                 f"first keys: {list(raw)[:3]})")
    else:
        sd = _strip_ddp_prefix(obj)
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{source}: no tensors found (expected ViT weights such as 'pos_embed', "
                         "'blocks.0.attn.qkv.weight')")
    # The backbone's own classifier / projection head is never used by the encoders.
    return {k: v for k, v in tensors.items() if not k.startswith("head.")}


def is_mae_checkpoint(obj: dict) -> bool:
    """An MAE pre-training file keeps its weights under 'model' (facebookresearch/mae main_pretrain.py)."""
    return "model" in obj and isinstance(obj["model"], dict)


def is_mocov3_checkpoint(obj: dict) -> bool:
    """The official MoCo v3 file (facebookresearch/moco-v3) keeps its weights under 'state_dict', keyed
    'module.base_encoder.*' (the momentum encoder beside them)."""
    sd = obj.get("state_dict")
    return isinstance(sd, dict) and any(isinstance(k, str) and k.startswith(MOCOV3_PREFIX) for k in sd)


def is_mae_file(path) -> bool:
    """Whether a backbone checkpoint file is an MAE pre-training file ({'model': ...}). Meant for a file
    already loaded once: it is memory-mapped, so the weights are not read a second time."""
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
    """Load a backbone file strictly: a missing, unexpected or mismatched key is an error naming it.
    A timm VisionTransformer reads an MAE / MoCo v3 / plain checkpoint (formats and the 'module.' rule
    as in `backbone_state_dict`), its position embedding resampled when the model's grid differs from
    the checkpoint's (as timm does); a timm Eva reads any release through timm's filter
    (`load_release_checkpoint`). `path`: str or os.PathLike, '~' expanded. Tensors with NaN or inf
    are loaded with a RuntimeWarning naming them."""
    path = as_path(path)
    if is_eva(vit):
        return load_release_checkpoint(vit, path)
    sd = backbone_state_dict(_read(path), str(path))
    _warn_non_finite(sd, str(path))
    own = {k: v for k, v in vit.state_dict().items() if not k.startswith("head.")}
    sd = _final_norm_into_fc_norm(sd, own)
    if "pos_embed" in sd and "pos_embed" in own and sd["pos_embed"].shape != own["pos_embed"].shape:
        from timm.layers import resample_abs_pos_embed
        prefix = 0 if getattr(vit, "no_embed_class", False) else vit.num_prefix_tokens
        sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], new_size=vit.patch_embed.grid_size,
                                                 num_prefix_tokens=prefix)
    return _load_exactly(vit, sd, own, str(path))


def load_release_checkpoint(vit: nn.Module, path) -> nn.Module:
    """Load a backbone file in its original release's key names the timm way: timm's reader, then timm's
    checkpoint filter for the model's family (`backbones.checkpoint_filter`), then the strict key check
    of `load_backbone_checkpoint` (the backbone's own classifier / projection head is left out on both
    sides). The same tensors as timm.create_model(name, pretrained=True,
    pretrained_cfg_overlay=dict(file=path)), which loads non-strictly when the release's head size
    differs from the model's; nothing is downloaded."""
    import inspect

    from timm.models import load_state_dict

    path = as_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    # Older timm readers have no weights_only argument; torch.load then defaults to True (torch >= 2.6).
    safe = dict(weights_only=True) if "weights_only" in inspect.signature(load_state_dict).parameters else {}
    try:
        raw = load_state_dict(str(path), **safe)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ValueError(f"{path} is not a checkpoint timm can read (.pth with weights_only=True, or "
                         f".safetensors): {type(exc).__name__}: {first}") from exc
    try:
        sd = checkpoint_filter(vit)(raw, vit)
    except Exception as exc:
        raise ValueError(f"{path}: timm's checkpoint filter for {type(vit).__name__} cannot convert it "
                         f"({type(exc).__name__}: {exc})") from exc
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor) and not k.startswith("head.")}
    if not sd:
        raise ValueError(f"{path}: no tensors found (expected the weights of a {type(vit).__name__})")
    _warn_non_finite(sd, str(path))
    own = {k: v for k, v in vit.state_dict().items() if not k.startswith("head.")}
    return _load_exactly(vit, sd, own, f"{path} (after timm's checkpoint filter for {type(vit).__name__})")


def _load_exactly(vit: nn.Module, sd: dict, own: dict, source: str) -> nn.Module:
    """Load `sd` into `vit` when its keys and shapes are exactly `own`'s (the model's, head left out),
    else a ValueError listing every difference."""
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
                         + _unexpected_prefix_hint(unexpected, own))
        if mismatched:
            parts.append("mismatched shapes " + "; ".join(mismatched[:8]))
        raise ValueError(f"{source} does not fit {type(vit).__name__} (embed_dim={vit.embed_dim}, "
                         f"depth={len(vit.blocks)}): " + ", ".join(parts))
    vit.load_state_dict(sd, strict=False)   # only the head (never loaded) is left out
    return vit


# Files written before these options were recorded: pooling was always the model's own, and the
# dimensions are still checked by the tensor shapes below.
_OLDER_FILES = {"pool": "model"}
_CHECKED_BY_SHAPES = ("embed_dim", "depth", "adapter_dim")


def _config_differences(saved: dict, own: dict, training_only) -> list[str]:
    """Every structural option (all of config() except the `training_only` ones) that differs."""
    missing = object()
    diffs = []
    for key in sorted(set(saved) | set(own)):
        if key in training_only or (key in _CHECKED_BY_SHAPES and key not in saved):
            continue
        a, b = saved.get(key, _OLDER_FILES.get(key, missing)), own.get(key, missing)
        if a != b:
            show = lambda v: "(not recorded)" if v is missing else repr(v)  # noqa: E731
            diffs.append(f"{key}: file {show(a)} vs encoder {show(b)}")
    return diffs


def read_tuned_metadata(path) -> tuple[dict, dict]:
    """(encoder config, other metadata) of a file written by `save_tuned`: the config is
    `encoder.config()` as saved (with its "method"); the other entries (e.g. lspt-train's record of
    its backbone and data) are JSON-decoded where they are JSON. A missing file (FileNotFoundError),
    a file that is not safetensors, or absent or malformed metadata (ValueError) gets an error that
    says which."""
    from safetensors import safe_open

    path = as_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tuned-parameter file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise ValueError(f"{path} is not a safetensors file written by save_tuned: {exc}") from exc
    if CONFIG_KEY not in meta:
        raise ValueError(f"{path} has no {CONFIG_KEY!r} metadata: it was not written by save_tuned, so "
                         "what its tensors mean (method, options) is unknown")
    try:
        saved = json.loads(meta[CONFIG_KEY])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: its {CONFIG_KEY!r} metadata is not valid JSON ({exc.msg} at "
                         f"character {exc.pos}): the file is damaged or was not written by save_tuned") from exc
    if not isinstance(saved, dict) or "method" not in saved:
        raise ValueError(f"{path}: its {CONFIG_KEY!r} metadata must be a JSON object with a 'method', "
                         f"got {meta[CONFIG_KEY][:80]!r}")
    others = {}
    for key, text in meta.items():
        if key != CONFIG_KEY:
            try:
                others[key] = json.loads(text)
            except json.JSONDecodeError:
                others[key] = text
    return saved, others


def save_tuned_file(encoder: nn.Module, path, metadata: dict | None = None) -> None:
    """Write `encoder.tuned_state_dict()` (not the backbone) to a safetensors file, with
    `encoder.config()` as its "lspt_kernels" metadata and each entry of `metadata` (name -> a
    JSON-serialisable value, e.g. lspt-train's record of its backbone and data) JSON-encoded under
    its name. `path`: str or os.PathLike, '~' expanded; its directory must exist. The file is written by
    Python (not safetensors' own writer), so a failed write (a full disk) is the OSError of that write."""
    from safetensors.torch import save

    path = as_path(path)
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a directory; give a file name (e.g. "
                                f"{path / 'tuned.safetensors'})")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: directory {path.parent} does not exist")
    extra = dict(metadata or {})
    if CONFIG_KEY in extra:
        raise ValueError(f"metadata must not have a {CONFIG_KEY!r} entry: that one is the encoder's config()")
    entries = {CONFIG_KEY: json.dumps(encoder.config())}
    entries.update({str(k): json.dumps(v) for k, v in extra.items()})
    tensors = {n: t.contiguous().cpu() for n, t in encoder.tuned_state_dict().items()}
    data = save(tensors, metadata=entries)
    with open(path, "wb") as f:
        f.write(data)


def load_tuned_file(encoder: nn.Module, path, training_only=()) -> None:
    """Load a safetensors file written by `save_tuned` into `encoder`, checking every structural option
    recorded in its metadata against `encoder.config()` (all but the `training_only` ones, which shape
    only initialisation or training), and the tensor names and shapes. Nothing is copied until every
    check has passed: a refused file leaves the encoder as it was."""
    from safetensors.torch import load_file

    path = as_path(path)
    saved, _ = read_tuned_metadata(path)
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise ValueError(f"{path} is not a safetensors file written by save_tuned: {exc}") from exc
    if saved["method"] != encoder.method:
        raise ValueError(f"{path} holds {saved['method']!r} parameters, this encoder is {encoder.method!r}")
    diffs = _config_differences(saved, encoder.config(), training_only)
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
    _warn_non_finite(tensors, str(path))
    with torch.no_grad():
        for n, t in tensors.items():
            own[n].copy_(t)
