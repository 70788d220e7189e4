"""Helpers the test files share (`from helpers import make_vit`); fixtures stay in conftest.py."""
import torch


def make_vit(embed_dim=32, depth=3, heads=2, img=32, patch=8, reg_tokens=0, global_pool="token",
             class_token=True, **kw):
    """A small random timm ViT (nothing downloaded)."""
    import timm
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=img,
                             patch_size=patch, embed_dim=embed_dim, depth=depth, num_heads=heads,
                             reg_tokens=reg_tokens, global_pool=global_pool, class_token=class_token, **kw)


# timm Eva flavours, each a real config with depth and width shrunk: name -> (timm model, extra kwargs).
EVA_FLAVOURS = {
    "dinov3": ("vit_small_patch16_dinov3", {}),         # EvaAttention, rope 'dinov3', CLS + 4 registers, layer scale
    "eva02": ("eva02_tiny_patch14_224", {}),            # EvaAttention (fused qkv, q/v biases), rope 'cat', SwiGLU
    "eva02-base": ("eva02_base_patch14_224", {}),       # separate q/k/v projections, SwiGLU with its norm
    "rope-mixed": ("vit_small_patch16_rope_mixed_224", {}),   # AttentionRope, one rope per block
    "pe": ("vit_pe_core_tiny_patch16_384", {}),         # Perception Encoder: AttentionRope, attention pooling
    "sbb-reg": ("vit_medium_patch16_rope_reg1_gap_256", {}),   # timm's SBB RoPE ViT: CLS + 1 register, avg pool
    "sapiens2-gqa": ("vit_base_patch16_sapiens2", dict(num_kv_heads=1)),   # q/k norms, grouped-query k/v, 8 registers
    "post-norm": ("eva02_enormous_patch14_clip_224", dict(mlp_ratio=2)),   # EvaBlockPostNorm, no rope
}


def make_eva(flavour="dinov3", embed_dim=32, depth=2, heads=2, img=32, patch=8, **kw):
    """A small random timm Eva of one of EVA_FLAVOURS (nothing downloaded); skips the test when this timm
    release lacks the model or the flavour's options (older releases have no DINOv3 configs, no q/k norms
    in Eva, ...)."""
    import pytest
    import timm
    name, extra = EVA_FLAVOURS[flavour]
    if not timm.is_model(name):
        pytest.skip(f"timm {timm.__version__} has no {name}")
    torch.manual_seed(0)
    try:
        return timm.create_model(name, pretrained=False, num_classes=0, img_size=img, patch_size=patch,
                                 embed_dim=embed_dim, depth=depth, num_heads=heads, **dict(extra, **kw))
    except TypeError as exc:
        pytest.skip(f"timm {timm.__version__} cannot build the {flavour!r} flavour of {name}: {exc}")


def noisy(vit, seed=5):
    """Every parameter of `vit` (any model) drawn from N(0, 1) under `seed`: weights no init shares, so a
    load that left any of them untouched shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vit.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return vit


def dinov3_release(vit) -> dict:
    """A timm DINOv3 state dict in Meta's key names (facebookresearch/dinov3): storage_tokens, ls1/ls2.gamma,
    one qkv bias with its bias_mask (zero for the distilled ViT-S/B/L), the pre-training mask token, the
    rope periods buffer."""
    out = {"mask_token": torch.zeros(1, vit.embed_dim), "rope_embed.periods": torch.ones(4)}
    for k, v in vit.state_dict().items():
        if k.startswith("rope."):
            continue
        k = k.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        out[k] = v.clone()
    for i in range(len(vit.blocks)):
        out[f"blocks.{i}.attn.qkv.bias"] = torch.zeros(3 * vit.embed_dim)
        out[f"blocks.{i}.attn.qkv.bias_mask"] = torch.ones(3 * vit.embed_dim)
    return out


def eva02_release(vit) -> dict:
    """A timm EVA-02 (B config: separate q/k/v, SwiGLU with its norm) state dict in BAAI's MIM pre-training
    key names (baaivision/EVA EVA-02): q_bias / v_bias, mlp.w1 / w2 / w3 / ffn_ln, the final norm as `norm`,
    mask token, MIM head and rope buffers, under {'module': ...} as its DeepSpeed saves."""
    swaps = [("attn.q_proj.bias", "attn.q_bias"), ("attn.v_proj.bias", "attn.v_bias"), ("mlp.fc1_g", "mlp.w1"),
             ("mlp.fc1_x", "mlp.w2"), ("mlp.fc2", "mlp.w3"), ("mlp.norm", "mlp.ffn_ln"), ("fc_norm.", "norm.")]
    out = {"mask_token": torch.zeros(1, 1, vit.embed_dim), "lm_head.weight": torch.zeros(8, vit.embed_dim),
           "lm_head.bias": torch.zeros(8), "rope.freqs_cos": torch.ones(16, 16), "rope.freqs_sin": torch.zeros(16, 16)}
    for k, v in vit.state_dict().items():
        if k.startswith("rope."):
            continue
        for a, b in swaps:
            k = k.replace(a, b)
        out[k] = v.clone()
    return {"module": out}


def vit_images(vit, batch=2):
    """A fixed batch of random images of the ViT's size."""
    size = vit.patch_embed.img_size
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(1))


def noisy_vit(seed=5, **kw):
    """make_vit(**kw), `noisy` under `seed`."""
    return noisy(make_vit(**kw), seed)


def zeroed_vit(**kw):
    """make_vit(**kw) with every parameter zero (a load target that shows what was loaded)."""
    vit = make_vit(**kw)
    with torch.no_grad():
        for p in vit.parameters():
            p.zero_()
    return vit


def same_backbone(a, b) -> bool:
    """Whether two ViTs hold the same weights (their classifier heads aside)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith("head."))


def assert_parity(enc, ref, images, atol=1e-5, rtol=1e-5):
    """Logits and the gradient of every trainable parameter of an encoder and its python/ reference,
    same upstream gradient."""
    missing, unexpected = ref.load_state_dict(enc.tuned_state_dict(), strict=False)
    assert not unexpected
    assert all(k.startswith("vit.") for k in missing), missing
    with torch.no_grad():  # temperatures and gates away from their init so their gradients matter
        for name, p in enc.named_parameters():
            if name in ("temperatures", "gate_logits"):
                p.add_(torch.linspace(-0.3, 0.3, p.numel()))
        ref.load_state_dict(enc.tuned_state_dict(), strict=False)
    out, expected = enc(images), ref(images)
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)
    upstream = torch.randn_like(out)
    names = [n for n, p in enc.named_parameters() if p.requires_grad]
    ref_params = dict(ref.named_parameters())
    grads = torch.autograd.grad(out, [dict(enc.named_parameters())[n] for n in names], upstream)
    ref_grads = torch.autograd.grad(expected, [ref_params[n] for n in names], upstream)
    for n, g, rg in zip(names, grads, ref_grads):
        assert rg.abs().max() > 0, f"reference gradient of {n} is zero: the comparison would be empty"
        torch.testing.assert_close(g, rg, atol=atol, rtol=rtol, msg=lambda m: f"{n}: {m}")


def need_backend(name: str) -> None:
    """Skip the calling test, with the reason, where the op's backend `name` cannot run here."""
    import pytest

    from lspt_kernels.backends import unavailable_reason
    why = unavailable_reason(name)
    if why is not None:
        pytest.skip(f"{name} backend unavailable: {why}")
