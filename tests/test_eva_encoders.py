"""Every method on timm's Eva family (DINOv3, EVA-02, Perception Encoder, RoPE-ViT, Sapiens2) through the one
block loop. Prompts are position-free: the encoders give them the identity rotation, which must equal a
plain re-run of timm's blocks that counts them as prefix tokens of the attention (timm's own rope-free
rule). Then LSPT's fused step and its fp64 gradients, CSPC's mean over patch tokens only, GaPT's
temperature in every attention class, the Adapter in every block layout, SPT initialisation, and what is
refused. Tiny random models built from the real configs (tests/helpers.py EVA_FLAVOURS)."""
import copy

import pytest
import torch
from helpers import EVA_FLAVOURS, make_eva, make_vit, vit_images

from lspt_kernels import AdapterEncoder, GaPTEncoder, LinearProbe, LSPTEncoder, VPTEncoder, init_prompts_from_data
from lspt_kernels.backbones import attention_with_temperature, block_ropes, embed, run_block, run_block_with
from lspt_kernels.backends import unavailable_reason
from lspt_kernels.encoders import METHODS, build_encoder

NP, NC = 3, 5
FLAVOURS = list(EVA_FLAVOURS)


def _grads(model, images, upstream=None):
    """Logits and the gradient of every trainable parameter under one upstream gradient."""
    out = model(images)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)) if upstream is None else upstream
    return out, torch.autograd.grad(out, [p for p in model.parameters() if p.requires_grad], upstream)


def _rope_of_block(vit, rope, l):
    return None if rope is None else (rope[l] if getattr(vit, "rope_mixed", False) else rope)


def _prefix_rerun(vit, prompts, images):
    """VPT-deep written plainly: a copy of the backbone whose attentions count the prompts as prefix tokens
    (num_prefix_tokens = k + Np, so timm leaves them unrotated), timm's own blocks called with timm's own
    rope of the patches, the prompt slot replaced by P[l] before block l. Returns the features."""
    vit = copy.deepcopy(vit)
    k, n = vit.num_prefix_tokens, prompts.shape[1]
    for block in vit.blocks:
        block.attn.num_prefix_tokens = k + n
    x, rope = vit._pos_embed(vit.patch_embed(images))
    x = vit.norm_pre(x) if hasattr(vit, "norm_pre") else x          # older timm Evas have no norm_pre
    B = x.shape[0]
    prefix, patches = x[:, :k], x[:, k:]
    for l, block in enumerate(vit.blocks):
        x = run_block(block, torch.cat([prefix, prompts[l].expand(B, -1, -1), patches], dim=1),
                      _rope_of_block(vit, rope, l))
        prefix, patches = x[:, :k], x[:, k + n:]
    return vit.forward_head(vit.norm(x), pre_logits=True)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_vpt_deep_equals_timm_blocks_with_prompts_as_prefix_tokens(flavour):
    """The identity rotation of the prompt rows (no change to the backbone) and counting the prompts as
    prefix tokens of every attention give the same features and prompt gradients, bit for bit."""
    vit = make_eva(flavour)
    enc = VPTEncoder(vit, NP, NC, deep=True)
    images = vit_images(vit)
    got, expected = enc.forward_features(images), _prefix_rerun(vit, enc.prompts, images)
    assert torch.equal(got, expected)
    upstream = torch.randn(got.shape, generator=torch.Generator().manual_seed(3))
    g, = torch.autograd.grad(got, [enc.prompts], upstream)
    g_ref, = torch.autograd.grad(expected, [enc.prompts], upstream)
    assert torch.equal(g, g_ref) and g.abs().sum() > 0


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_lspt_without_cspc_and_lpc_is_vpt_deep(flavour):
    vit = make_eva(flavour)
    lspt = LSPTEncoder(vit, NP, NC, cspc="none", lpc="none")
    vpt = VPTEncoder(vit, NP, NC, deep=True)
    vpt.load_state_dict(lspt.state_dict())
    images = vit_images(vit)
    (out_l, g_l), (out_v, g_v) = _grads(lspt, images), _grads(vpt, images)
    assert torch.equal(out_l, out_v)
    assert all(torch.equal(a, b) for a, b in zip(g_l, g_v))


class _Unfused(LSPTEncoder):
    """The same encoder forced onto the plain PyTorch path (nn.LSTMCell per block)."""

    fused = property(lambda self: False)


@pytest.mark.parametrize("backend", ["eager", "cpu"])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_fused_lspt_equals_the_plain_pytorch_step(flavour, backend):
    """The fused step (one op per block, num_prefix_tokens = class + register tokens) equals LSPT written
    with nn.LSTMCell and the patch mean in PyTorch: logits and every gradient."""
    if backend == "cpu" and unavailable_reason("cpu"):
        pytest.skip(f"cpu backend unavailable: {unavailable_reason('cpu')}")
    vit = make_eva(flavour)
    torch.manual_seed(1)
    fused = LSPTEncoder(vit, NP, NC, backend=backend)
    plain = _Unfused(vit, NP, NC)
    plain.load_state_dict(fused.state_dict())
    assert fused.fused and not plain.fused
    images = vit_images(vit)
    (out_f, g_f), (out_p, g_p) = _grads(fused, images), _grads(plain, images)
    torch.testing.assert_close(out_f, out_p, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_f, g_p):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_gradcheck_of_one_lspt_forward_fp64(flavour):
    """fp64 gradcheck (random projections) of the logits in the prompts and the LSTM's W_hh, the default
    (fused) step on the CPU."""
    vit = make_eva(flavour, embed_dim=16, img=16).double()
    torch.manual_seed(1)
    enc = LSPTEncoder(vit, 2, 3).double()
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    try:
        vit.forward_features(images)
    except RuntimeError as exc:         # timm 1.0.20's mixed rope mixes fp32 into an fp64 model
        import timm
        pytest.skip(f"timm {timm.__version__}'s own fp64 forward of {flavour!r} fails: {exc}")

    def logits(prompts, weight_hh):
        return torch.func.functional_call(enc, {"prompts": prompts, "lstm.weight_hh": weight_hh}, (images,))

    inputs = (enc.prompts.detach().clone().requires_grad_(), enc.lstm.weight_hh.detach().clone().requires_grad_())
    assert torch.autograd.gradcheck(logits, inputs, fast_mode=True)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_linear_probe_features_are_timms(flavour):
    vit = make_eva(flavour)
    images = vit_images(vit)
    probe = LinearProbe(vit, NC)
    assert torch.equal(probe.forward_features(images), vit.forward_head(vit.forward_features(images), pre_logits=True))


@pytest.mark.parametrize("flavour", ["dinov3", "sapiens2-gqa"])
def test_cspc_mean_is_over_the_patch_tokens_only(flavour):
    """After block l the prompts become P[l + 1] + the mean of the block's PATCH tokens: not the class and
    register tokens (k = 5 for DINOv3, 9 for Sapiens2), not the prompts."""
    vit = make_eva(flavour)
    k = vit.num_prefix_tokens
    enc = LSPTEncoder(vit, NP, NC, lpc="none")
    inputs, outputs = [], []
    hooks = [vit.blocks[0].register_forward_hook(lambda m, a, out: outputs.append(out.detach().clone())),
             vit.blocks[1].register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().clone()))]
    enc(vit_images(vit))
    for h in hooks:
        h.remove()
    out, entering = outputs[0], inputs[0]
    expected = enc.prompts[1].detach() + out[:, k + NP:].mean(1, keepdim=True)
    torch.testing.assert_close(entering[:, k:k + NP], expected, atol=0, rtol=0)
    with_registers = enc.prompts[1].detach() + out[:, 1:].mean(1, keepdim=True)
    assert not torch.allclose(entering[:, k:k + NP], with_registers, atol=1e-4)


@pytest.mark.parametrize("t", [1.0, 0.4, 3.0])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_gapt_attention_is_timms_with_the_logits_divided_by_t(flavour, t):
    """GaPT's attention with temperature t equals timm's own attention module (its q/k norms, rope,
    grouped k/v, output norm) run on its explicit-softmax path with scale / t, on the buffer with prompts."""
    vit = make_eva(flavour)
    x, rope = embed(vit, vit_images(vit))
    x = torch.cat([x[:, :vit.num_prefix_tokens], torch.randn(x.shape[0], NP, x.shape[-1]),
                   x[:, vit.num_prefix_tokens:]], dim=1)
    for block, r in zip(vit.blocks, block_ropes(vit, rope, NP)):
        h = x if type(block).__name__ == "EvaBlockPostNorm" else block.norm1(x)     # the attention's input
        oracle = copy.deepcopy(block.attn)
        oracle.fused_attn, oracle.scale = False, oracle.scale / t
        expected = oracle(h) if r is None else oracle(h, rope=r)
        got = attention_with_temperature(block.attn, h, r, torch.tensor(t))
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
        x = run_block(block, x, r)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_gapt_block_at_temperature_one_is_timms_block(flavour):
    vit = make_eva(flavour)
    x, rope = embed(vit, vit_images(vit))
    r = block_ropes(vit, rope, 0)[0]
    torch.testing.assert_close(run_block_with(vit.blocks[0], x, r, temperature=torch.tensor(1.0)),
                               run_block(vit.blocks[0], x, r), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_adapter_acts_on_the_mlp_output_before_layer_scale_norm_and_residual(flavour):
    """The Adapter's block equals timm's own block forward with the adapter hooked onto its MLP's output
    (so it precedes gamma_2, a post-norm block's norm2, and the residual add)."""
    vit = make_eva(flavour)
    torch.manual_seed(1)
    enc = AdapterEncoder(vit, NC, reduction_factor=4, adapter_init="zero-up")
    with torch.no_grad():
        for a in enc.adapters:
            a.up.weight.normal_(0, 0.5)
        for name, p in vit.named_parameters():     # DINOv3's layer scale (1e-5) would hide the adapter
            if name.split(".")[-1] in ("gamma_1", "gamma_2"):
                p.uniform_(0.5, 1.5)
    images = vit_images(vit)
    got = enc.forward_features(images)
    hooks = [b.mlp.register_forward_hook(lambda m, a, out, adapter=adapter: adapter(out))
             for b, adapter in zip(vit.blocks, enc.adapters)]
    try:
        expected = LinearProbe(vit, NC).forward_features(images)
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(got, LinearProbe(vit, NC).forward_features(images), atol=1e-3)


@pytest.mark.parametrize("flavour", ["dinov3", "rope-mixed"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_on_eva(flavour, method):
    """Every method's trainable parameters get a gradient through an Eva, and the backbone none."""
    vit = make_eva(flavour)
    enc = build_encoder(method, vit, num_prompts=NP, num_classes=NC)
    out, grads = _grads(enc, vit_images(vit))
    assert out.shape == (2, NC) and all(g is not None for g in grads)
    assert all(not p.requires_grad for p in vit.parameters())


@pytest.mark.parametrize("flavour", ["dinov3", "rope-mixed"])
@pytest.mark.parametrize("method", ["lspt", "gapt"])
def test_compiles_without_graph_breaks(flavour, method):
    """torch.compile(fullgraph=True) traces the rope rows and each block's rope (aot_eager: forward and
    backward graphs), with eager's logits and gradients."""
    backend = dict(backend="eager" if unavailable_reason("cpu") else "cpu") if method == "lspt" else {}
    torch._dynamo.reset()
    vit = make_eva(flavour)
    enc = build_encoder(method, vit, num_prompts=NP, num_classes=NC, **backend)
    images = vit_images(vit)
    upstream = torch.randn(2, NC, generator=torch.Generator().manual_seed(2))
    out_c, g_c = _grads(torch.compile(enc, fullgraph=True, backend="aot_eager"), images, upstream)
    out_e, g_e = _grads(enc, images, upstream)
    torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["vpt-deep", "gapt", "lspt"])
def test_backbone_is_untouched_by_a_forward_or_an_exception(method, monkeypatch):
    vit = make_eva("dinov3")
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    prefix = [b.attn.num_prefix_tokens for b in vit.blocks]
    enc = build_encoder(method, vit, num_prompts=NP, num_classes=NC)
    enc(vit_images(vit))

    def fail(*args):
        raise RuntimeError("stop")
    monkeypatch.setattr(type(enc), "_after_block", fail)
    with pytest.raises(RuntimeError, match="stop"):
        enc(vit_images(vit))
    assert [b.attn.num_prefix_tokens for b in vit.blocks] == prefix
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())


@pytest.mark.parametrize("method", ["vpt-deep", "lspt"])
def test_spt_prompts_are_the_tokens_entering_their_block(method):
    """SPT draws P[l] from the patch tokens entering block l of the backbone run without prompts: timm's
    own forward_intermediates of block l - 1 (the embedding output for block 0)."""
    vit = make_eva("dinov3")
    enc = build_encoder(method, vit, num_prompts=NP, num_classes=NC)
    images = vit_images(vit, batch=3)
    init_prompts_from_data(enc, images, tokens_per_image=None)
    with torch.no_grad():
        x, _ = embed(vit, images)
        entering = [x[:, vit.num_prefix_tokens:]] + vit.forward_intermediates(images, output_fmt="NLC",
                                                                             intermediates_only=True)[:-1]
    for l, tokens in enumerate(entering):
        distance = torch.cdist(enc.prompts[l].detach(), tokens.reshape(-1, tokens.shape[-1]),
                               compute_mode="donot_use_mm_for_euclid_dist").min(1).values
        assert distance.max() < 1e-5, (l, distance)


# --- what is refused ------------------------------------------------------------------------------------
def _on_meta(name, **kw):
    """The model's shapes only (no memory, no init); on the CPU where this timm cannot init on meta."""
    import timm
    try:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False, num_classes=0, **kw)
    except (NotImplementedError, RuntimeError):
        return timm.create_model(name, pretrained=False, num_classes=0, **kw)


@pytest.mark.parametrize("name, kw, message", [
    ("naflexvit_base_patch16_gap", {}, r"got timm\.models\.naflexvit\.NaFlexVit \(NaFlex variable-resolution inputs"),
    ("swin_tiny_patch4_window7_224", {}, r"got timm\.models\.swin_transformer\.SwinTransformer; supported: timm "
                                         r"VisionTransformer .* or timm Eva"),
])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_other_timm_families_are_refused_by_name(name, kw, message, method):
    import timm
    if not timm.is_model(name):
        pytest.skip(f"timm {timm.__version__} has no {name}")
    with pytest.raises(TypeError, match=message):
        build_encoder(method, _on_meta(name, **kw), num_prompts=NP, num_classes=NC)


def test_eva_with_another_attention_class_is_refused():
    vit = make_eva("eva02")

    class MyAttention(type(vit.blocks[1].attn)):
        pass
    attn = vit.blocks[1].attn
    attn.__class__ = MyAttention
    with pytest.raises(TypeError, match=r"block 1 is EvaBlock with attention MyAttention; the encoders wrap an Eva "
                                        r"whose blocks are timm's EvaBlock"):
        VPTEncoder(vit, NP, NC)


def test_gapt_refuses_an_attention_it_cannot_recompute():
    """A ViT with its own attention class runs VPT (timm's block forward) but not GaPT, whose temperature
    needs the logits."""
    vit = make_vit()

    class MyAttention(type(vit.blocks[2].attn)):
        pass
    vit.blocks[2].attn.__class__ = MyAttention
    VPTEncoder(vit, NP, NC)
    with pytest.raises(TypeError, match=r"GaPT \(its temperatures\) recomputes the attention logits; block 2's "
                                        r"attention is .*MyAttention, and only timm's Attention, .*EvaAttention "
                                        r"are supported"):
        GaPTEncoder(vit, NP, NC)
