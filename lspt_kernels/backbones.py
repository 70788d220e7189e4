"""The timm backbones the encoders wrap, and everything that differs between their two families.

- `VisionTransformer` (timm/models/vision_transformer.py: ViT, DeiT, register tokens, ...): learnt
  absolute position embedding, blocks called as `block(x)`.
- `Eva` (timm/models/eva.py: EVA-02, DINOv3, Perception Encoder, RoPE-ViT, ...): rotary position
  embeddings (RoPE) besides or instead of the absolute one, register tokens, SwiGLU, layer scale; blocks
  called as `block(x, rope=...)`, one rope for all blocks or, for rope_type 'mixed', one per block.

The encoders' one block loop calls this module for what it must do differently: `embed` (patch
embedding, prefix tokens, position embeddings, and the rope of the patch tokens), `block_ropes` (each
block's rope for a buffer `[prefix | prompts | patches]`), `run_block` (timm's own block forward) and
`run_block_with` (a block re-run with GaPT's temperature or an adapter after its MLP). `attention_qkv`
computes q, k, v as each supported attention class does (projections, q/k norms, rope, grouped k/v),
for GaPT's temperature and lspt-viz's attention maps. `checkpoint_filter` is timm's own key converter
for the model's family.

Prompts are position-free: timm applies rope only to the tokens after an attention's
`num_prefix_tokens`, and `block_ropes` gives the prompt rows the identity rotation (sin 0, cos 1), so a
prompt's q and k are exactly those of an unrotated prefix token. The backbone is never modified
(docs/method.md, "RoPE backbones").

Imports nothing from lspt_kernels (checkpoints and encoders both use it).
"""
from __future__ import annotations

import importlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SUPPORTED", "check_vit", "is_eva", "embed", "block_ropes", "run_block", "run_block_with",
           "check_block_layout", "check_attention", "attention_qkv", "attention_with_temperature",
           "checkpoint_filter"]

SUPPORTED = ("timm VisionTransformer (vit_*, deit_*, ...) or timm Eva (eva02_*, vit_*_dinov3, vit_pe_*, "
             "vit_*_rope_*, ...) with its own blocks")


def _timm_class(module: str, name: str):
    """A class of timm, or None when this timm release has none (older releases lack AttentionRope, ...)."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


_CLASSES: dict | None = None


def _classes() -> dict:
    """timm's classes (and its rope function), looked up once: timm is imported on first use, not with
    lspt_kernels. A plain global rather than lru_cache, so that torch.compile traces the lookup (the
    encoders' constructors fill it, before any forward)."""
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _lookup()
    return _CLASSES


def _lookup() -> dict:
    vit = "timm.models.vision_transformer"
    found = dict(
        vit=_timm_class(vit, "VisionTransformer"),
        eva=_timm_class("timm.models.eva", "Eva"),
        eva_block=_timm_class("timm.models.eva", "EvaBlock"),
        eva_post_norm_block=_timm_class("timm.models.eva", "EvaBlockPostNorm"),
        naflex=_timm_class("timm.models.naflexvit", "NaFlexVit"),
        apply_rot_embed_cat=_timm_class("timm.layers", "apply_rot_embed_cat"),
    )
    if found["vit"] is None:  # pragma: no cover - timm is a dependency
        raise ImportError("lspt_kernels needs timm (timm.models.vision_transformer.VisionTransformer)")
    # Attention: in timm.layers since 1.0; older releases define it in vision_transformer.py.
    attention = {_timm_class("timm.layers", "Attention"), _timm_class(vit, "Attention")}
    found["vit_attention"] = tuple(c for c in attention if c is not None)
    found["eva_attention"] = tuple(c for c in (_timm_class("timm.models.eva", "EvaAttention"),
                                               _timm_class("timm.layers", "AttentionRope")) if c is not None)
    return found


def is_eva(vit) -> bool:
    """Whether `vit` is a timm Eva (rotary embeddings, blocks called with their rope)."""
    eva = _classes()["eva"]
    return eva is not None and isinstance(vit, eva)


def check_vit(vit) -> None:
    """Raise a TypeError unless `vit` is a backbone the encoders wrap: a timm VisionTransformer, or a timm
    Eva whose blocks and attentions are timm's own (the rope convention `block_ropes` relies on)."""
    c = _classes()
    name = f"{type(vit).__module__}.{type(vit).__name__}"
    if isinstance(vit, c["vit"]):
        return
    if not is_eva(vit):
        why = ""
        if c["naflex"] is not None and isinstance(vit, c["naflex"]):
            why = (" (NaFlex variable-resolution inputs, patch-coordinate inputs and masks, are not supported: build "
                   "the model without use_naflex=True / TIMM_USE_NAFLEX=1)")
        raise TypeError(f"expected a timm VisionTransformer or Eva (e.g. timm.create_model('vit_base_patch16_224') or "
                        f"'vit_base_patch16_dinov3'), got {name}{why}; supported: {SUPPORTED}")
    blocks = tuple(b for b in (c["eva_block"], c["eva_post_norm_block"]) if b is not None)
    for i, block in enumerate(vit.blocks):
        attn = getattr(block, "attn", None)
        if type(block) not in blocks or type(attn) not in c["eva_attention"]:
            raise TypeError(f"{name}: block {i} is {type(block).__name__} with attention {type(attn).__name__}; "
                            "the encoders wrap an Eva whose blocks are timm's EvaBlock / EvaBlockPostNorm with "
                            "EvaAttention or AttentionRope (they apply the rope to the tokens after the prefix, which "
                            f"keeps the prompts position-free); supported: {SUPPORTED}")


def embed(vit, images: Tensor) -> tuple[Tensor, Tensor | None]:
    """(B, C, H, W) images in the model's dtype -> the tokens entering block 1, (B, k + N, D), and the
    rotary embedding of the N patch tokens as timm computes it per forward (None without RoPE): timm's
    patch embedding, prefix tokens, position embedding(s) and pre-norm."""
    x = vit.patch_embed(images)
    if is_eva(vit):
        x, rope = vit._pos_embed(x)                # Eva runs its patch dropout inside
        norm_pre = getattr(vit, "norm_pre", None)  # older timm Evas have none
        return (x if norm_pre is None else norm_pre(x)), rope
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    return vit.norm_pre(x), None


def block_ropes(vit, rope: Tensor | None, num_prompts: int) -> list[Tensor | None]:
    """Per block, the rope of the tokens after the prefix of a buffer `[prefix | prompts (Np) | patches]`.

    The Np prompt rows get the identity rotation (sin 0, cos 1 in timm's [sin | cos] layout), so a
    prompt's q and k leave the rotation exactly as they entered it, as a prefix token's do. rope_type
    'mixed' (vit.rope_mixed) holds one rope per block along its first dimension; the others one for all
    blocks. Without RoPE every entry is None."""
    depth = len(vit.blocks)
    if rope is None:
        return [None] * depth
    if not isinstance(rope, Tensor):
        raise TypeError(f"{type(vit).__name__}._pos_embed returned a {type(rope).__name__} rope; the encoders "
                        "expect timm's concatenated [sin | cos] tensor")
    if num_prompts:
        shape = (*rope.shape[:-2], num_prompts, rope.shape[-1] // 2)
        identity = torch.cat([rope.new_zeros(shape), rope.new_ones(shape)], dim=-1)
        rope = torch.cat([identity, rope], dim=-2)
    if getattr(vit, "rope_mixed", False):
        return list(rope.unbind(0))
    return [rope] * depth


def run_block(block: nn.Module, x: Tensor, rope: Tensor | None = None) -> Tensor:
    """timm's own forward of one block, with its rope when the backbone has one."""
    return block(x) if rope is None else block(x, rope=rope)


# --- re-running a block with a change inside (GaPT, the Adapter) ------------------------------------
def _layout(block: nn.Module) -> str | None:
    """"eva" (EvaBlock: pre-norm, gamma_1/gamma_2 layer scale), "post-norm" (EvaBlockPostNorm: the norms
    after the attention and the MLP), "vit" (timm's Block layout: norm1, attn, ls1, drop_path1, norm2,
    mlp, ls2, drop_path2), or None."""
    c = _classes()
    if c["eva_post_norm_block"] is not None and isinstance(block, c["eva_post_norm_block"]):
        return "post-norm"
    if c["eva_block"] is not None and isinstance(block, c["eva_block"]):
        return "eva"
    if all(hasattr(block, a) for a in ("norm1", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")) \
            and all(hasattr(getattr(block, "attn", None), a) for a in ("qkv", "num_heads", "scale", "proj")):
        return "vit"
    return None


def check_block_layout(vit, who: str, pre_norm: bool = False) -> None:
    """Raise a TypeError unless every block has a layout `run_block_with` re-runs (timm's Block, EvaBlock,
    EvaBlockPostNorm); pre_norm=True also refuses EvaBlockPostNorm (whose norm1 follows the attention).
    `who` starts the message: "<who> needs ..."."""
    allowed = ("vit", "eva") if pre_norm else ("vit", "eva", "post-norm")
    for i, block in enumerate(vit.blocks):
        layout = _layout(block)
        if layout not in allowed:
            kinds = "timm's pre-norm Block or EvaBlock" if pre_norm else "timm's Block, EvaBlock or EvaBlockPostNorm"
            raise TypeError(f"{who} needs {kinds}; block {i} is {type(block).__name__} with attention "
                            f"{type(getattr(block, 'attn', None)).__name__}")


def check_attention(vit, who: str) -> None:
    """Raise a TypeError unless every block's attention is a class `attention_qkv` computes exactly:
    timm's Attention, EvaAttention or AttentionRope. `who` starts the message: "<who> recomputes ..."."""
    c = _classes()
    known = c["vit_attention"] + c["eva_attention"]
    for i, block in enumerate(vit.blocks):
        attn = getattr(block, "attn", None)
        if type(attn) not in known:
            raise TypeError(f"{who} recomputes the attention logits; block {i}'s attention is "
                            f"{type(attn).__module__}.{type(attn).__name__}, and only timm's "
                            f"{', '.join(sorted({k.__name__ for k in known}))} are supported")


def _rotate(attn: nn.Module, t: Tensor, rope: Tensor) -> Tensor:
    """The rope on the tokens after the attention's prefix, as EvaAttention / AttentionRope apply it."""
    apply_rot_embed_cat = _classes()["apply_rot_embed_cat"]
    npt = attn.num_prefix_tokens
    half = getattr(attn, "rotate_half", False)
    rotated = apply_rot_embed_cat(t[:, :, npt:], rope, half=half) if half else apply_rot_embed_cat(t[:, :, npt:], rope)
    return torch.cat([t[:, :, :npt], rotated], dim=2)


def attention_qkv(attn: nn.Module, x: Tensor, rope: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v (B, heads, T, head_dim) of `x` (B, T, D) as timm's Attention, EvaAttention and AttentionRope
    compute them before the softmax: fused or separate projections (EvaAttention's q/v biases and fixed
    zero k bias), the q/k norms, the rope on the tokens after attn.num_prefix_tokens, and grouped-query
    k/v repeated to every head."""
    B, T, _ = x.shape
    heads = attn.num_heads
    if getattr(attn, "qkv", None) is not None:
        q_bias = getattr(attn, "q_bias", None)
        if q_bias is None:
            qkv = attn.qkv(x)
        else:
            bias = torch.cat((q_bias, attn.k_bias, attn.v_bias))
            qkv = attn.qkv(x) + bias if getattr(attn, "qkv_bias_separate", False) else \
                F.linear(x, attn.qkv.weight, bias)
        q, k, v = qkv.reshape(B, T, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        kv_heads = getattr(attn, "num_kv_heads", heads)
        q = attn.q_proj(x).reshape(B, T, heads, -1).transpose(1, 2)
        k = attn.k_proj(x).reshape(B, T, kv_heads, -1).transpose(1, 2)
        v = attn.v_proj(x).reshape(B, T, kv_heads, -1).transpose(1, 2)
    if getattr(attn, "q_norm", None) is not None:     # older timm EvaAttention has no q/k norms
        q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        q, k = _rotate(attn, q, rope).type_as(v), _rotate(attn, k, rope).type_as(v)
    groups = heads // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return q, k, v


def attention_with_temperature(attn: nn.Module, x: Tensor, rope: Tensor | None, temperature: Tensor) -> Tensor:
    """The attention's forward with its logits q.k^T.scale divided by `temperature` (GaPT), q/k norms and
    rope applied first exactly as timm does; the output norm, gate and projection as timm's."""
    B, T, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attention_qkv(attn, x, rope)
    # SDPA takes a float scale; a learnable temperature divides q instead (the same logits).
    out = F.scaled_dot_product_attention(q / temperature.to(q.dtype), k, v, scale=attn.scale)
    out = out.transpose(1, 2).reshape(B, T, -1)
    norm = getattr(attn, "norm", None)
    if norm is not None:
        out = norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj(out)


def run_block_with(block: nn.Module, x: Tensor, rope: Tensor | None = None, *, temperature: Tensor | None = None,
                   adapter: nn.Module | None = None) -> Tensor:
    """A block's forward with GaPT's `temperature` in its attention and/or `adapter` applied to its MLP
    output (before the layer scale, the norm of a post-norm block, and the residual add). Blocks must
    pass `check_block_layout`."""
    def attend(h: Tensor) -> Tensor:
        if temperature is not None:
            return attention_with_temperature(block.attn, h, rope, temperature)
        return block.attn(h) if rope is None else block.attn(h, rope=rope)

    def mlp(h: Tensor) -> Tensor:
        out = block.mlp(h)
        return out if adapter is None else adapter(out)

    layout = _layout(block)
    if layout == "post-norm":
        x = x + block.drop_path1(block.norm1(attend(x)))
        return x + block.drop_path2(block.norm2(mlp(x)))
    if layout == "eva":
        a = attend(block.norm1(x))
        x = x + block.drop_path1(a if block.gamma_1 is None else block.gamma_1 * a)
        m = mlp(block.norm2(x))
        return x + block.drop_path2(m if block.gamma_2 is None else block.gamma_2 * m)
    x = x + block.drop_path1(block.ls1(attend(block.norm1(x))))
    return x + block.drop_path2(block.ls2(mlp(block.norm2(x))))


def checkpoint_filter(vit):
    """timm's own checkpoint filter for the model's family (`checkpoint_filter_fn(state_dict, model)` of
    timm/models/eva.py or vision_transformer.py): it maps an original release's key names (Meta's DINOv3,
    BAAI's EVA-02, Perception Encoder, ...) onto timm's and resamples position embeddings."""
    module = "timm.models.eva" if is_eva(vit) else "timm.models.vision_transformer"
    return importlib.import_module(module).checkpoint_filter_fn
