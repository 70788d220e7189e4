"""Encoders vs the pure-PyTorch reference (python/lspt_reference), and the encoders' contract."""
import pytest
import torch
import torch.nn as nn
from helpers import assert_parity, make_vit
from helpers import vit_images as _images  # test_fused_encoder imports NP, NC, _images and assert_parity from here

import lspt_reference as R
from lspt_kernels import AdapterEncoder, GaPTEncoder, LinearProbe, LSPTEncoder, VPTEncoder

NP, NC = 3, 5

LSPT_OPTIONS = [
    dict(),
    dict(cspc="kmeans"),
    dict(cspc="none"),
    dict(lpc="gru"),
    dict(lpc="transformer"),
    dict(lpc="none"),
    dict(cspc="none", lpc="none"),
    dict(cspc="kmeans", lpc="none"),
    dict(lstm_layers=2),
    dict(shared_lstm=False),
    dict(shared_lstm=False, lstm_layers=2),
    dict(lpc="gru", shared_lstm=False),
    dict(lpc="transformer", shared_lstm=False),
]


def _pair(method, vit, **kw):
    if method == "linear":
        return LinearProbe(vit, NC), R.ReferenceLinearProbe(vit, NC)
    if method == "vpt-deep":
        return VPTEncoder(vit, NP, NC, deep=True), R.ReferenceVPT(vit, NP, NC, deep=True)
    if method == "vpt-shallow":
        return VPTEncoder(vit, NP, NC, deep=False), R.ReferenceVPT(vit, NP, NC, deep=False)
    if method == "gapt":
        # gate_init 1 so the gates (sigmoid(-1) ~ 0.27) carry real weight in the comparison
        return GaPTEncoder(vit, NP, NC, gate_init=1.0), R.ReferenceGaPT(vit, NP, NC, gate_init=1.0)
    return LSPTEncoder(vit, NP, NC, backend="reference", **kw), R.ReferenceLSPT(vit, NP, NC, **kw)


@pytest.mark.parametrize("method", ["linear", "vpt-shallow", "vpt-deep", "gapt", "lspt"])
def test_methods_match_reference(small_vit, method):
    enc, ref = _pair(method, small_vit)
    assert_parity(enc, ref, _images(small_vit))


@pytest.mark.parametrize("options", LSPT_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_lspt_options_match_reference(small_vit, options):
    enc, ref = _pair("lspt", small_vit, **options)
    assert_parity(enc, ref, _images(small_vit))


def test_lspt_without_cspc_and_lpc_is_vpt_deep(small_vit):
    lspt = LSPTEncoder(small_vit, NP, NC, cspc="none", lpc="none")
    vpt = VPTEncoder(small_vit, NP, NC, deep=True)
    vpt.load_state_dict(lspt.state_dict())
    images = _images(small_vit)
    out_l, out_v = lspt(images), vpt(images)
    assert torch.equal(out_l, out_v)
    g_l = torch.autograd.grad(out_l.sum(), [lspt.prompts, lspt.head.weight])
    g_v = torch.autograd.grad(out_v.sum(), [vpt.prompts, vpt.head.weight])
    assert all(torch.equal(a, b) for a, b in zip(g_l, g_v))


def test_parameter_names_and_counts():
    vit = make_vit(embed_dim=32, depth=3)
    D, L = 32, 3
    lspt, vpt = LSPTEncoder(vit, NP, NC), VPTEncoder(vit, NP, NC, deep=True)
    gapt, shallow = GaPTEncoder(vit, NP, NC), VPTEncoder(vit, NP, NC, deep=False)
    assert lspt.prompts.shape == vpt.prompts.shape == (L, NP, D)
    assert gapt.prompts.shape == shallow.prompts.shape == (NP, D)
    assert isinstance(lspt.lstm, nn.LSTMCell) and lspt.lstm.input_size == lspt.lstm.hidden_size == D
    assert gapt.gate_logits.shape == (L - 1,) and gapt.temperatures.shape == (L,)
    assert torch.all(gapt.gate_logits == -5.0) and torch.all(gapt.temperatures == 1.0)
    assert isinstance(lspt.head, nn.Linear) and lspt.head.out_features == NC
    r_lspt, r_vpt = lspt.parameter_report(), vpt.parameter_report()
    assert r_lspt["trainable"] - r_vpt["trainable"] == 8 * D * D + 8 * D
    assert r_vpt["trainable"] == L * NP * D + D * NC + NC
    assert r_lspt["trainable"] == sum(p.numel() for p in lspt.trainable_parameters())
    backbone = sum(p.numel() for p in vit.parameters())
    assert r_lspt["backbone"] == backbone
    assert r_lspt["total_params_ratio"] == pytest.approx((backbone + r_lspt["trainable"]) / backbone)
    assert set(lspt.tuned_state_dict()) == {"prompts", "lstm.weight_ih", "lstm.weight_hh", "lstm.bias_ih",
                                            "lstm.bias_hh", "head.weight", "head.bias"}


def test_lspt_adds_8d2_for_vit_b():
    # The paper's 1.02x -> 1.08x: 8 D^2 + 8 D = 4.73 M for ViT-B (D = 768).
    D = 768
    assert 8 * D * D + 8 * D == 4_724_736
    vit = make_vit(embed_dim=D, depth=2, heads=12, img=16, patch=16)
    diff = LSPTEncoder(vit, 10, 2).parameter_report()["trainable"] - \
        VPTEncoder(vit, 10, 2).parameter_report()["trainable"]
    assert diff == 4_724_736


def test_prompt_init_bound():
    vit = make_vit(embed_dim=32, patch=8)
    v = (6.0 / (3 * 8 * 8 + 32)) ** 0.5
    p = LSPTEncoder(vit, 50, NC).prompts
    assert p.abs().max() <= v and p.abs().max() > 0.8 * v


def test_backbone_frozen_and_in_eval(small_vit):
    enc = LSPTEncoder(small_vit, NP, NC, backend="reference")
    enc.train()
    assert enc.training and not enc.vit.training
    assert all(not m.training for m in enc.vit.modules())
    out = enc(_images(small_vit))
    out.sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in enc.vit.parameters())
    assert all(p.grad is not None for p in enc.trainable_parameters())


def test_frozen_backbone_ignores_dropout():
    vit = make_vit(drop_rate=0.5, attn_drop_rate=0.5, drop_path_rate=0.5)
    enc = LSPTEncoder(vit, NP, NC, backend="reference").train()
    images = _images(vit)
    torch.testing.assert_close(enc(images), enc(images), atol=0, rtol=0)


def test_image_size_variants():
    vit = make_vit(dynamic_img_size=True)
    enc = LSPTEncoder(vit, NP, NC, backend="reference")
    assert enc(torch.randn(1, 3, 40, 24)).shape == (1, NC)
    ref = R.ReferenceLSPT(vit, NP, NC)
    assert_parity(enc, ref, torch.randn(2, 3, 40, 24))


def test_deit_distilled_and_no_class_token():
    import timm
    deit = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=0, img_size=32,
                             patch_size=8, embed_dim=24, depth=2, num_heads=2)
    assert deit.num_prefix_tokens == 2
    assert_parity(*_pair("lspt", deit), _images(deit))
    noclass = make_vit(class_token=False, global_pool="avg")
    assert noclass.num_prefix_tokens == 0
    assert_parity(*_pair("gapt", noclass), _images(noclass))


def test_drop_in_example_shapes():
    vit = make_vit()
    model = LSPTEncoder(vit, num_prompts=10, num_classes=200)
    logits = model(torch.randn(4, 3, 32, 32))
    assert logits.shape == (4, 200)


# --- bad input -----------------------------------------------------------------------------------
BAD_IMAGES = {        # case: (ViT options, image shape, dtype, error, message)
    "size": (dict(), (2, 3, 48, 48), torch.float32, ValueError,
             r"images must be \(32, 32\) pixels.*got \(2, 3, 48, 48\)"),
    "channels": (dict(), (2, 1, 32, 32), torch.float32, ValueError,
                 r"images must have 3 channels.*got \(2, 1, 32, 32\)"),
    "rank": (dict(), (3, 32, 32), torch.float32, ValueError,
             r"images must be a \(B, C, H, W\) tensor, got \(3, 32, 32\)"),
    "uint8": (dict(), (2, 3, 32, 32), torch.uint8, TypeError, "images must be a floating-point tensor"),
    "dynamic-size-not-a-multiple": (dict(dynamic_img_size=True), (1, 3, 30, 32), torch.float32, ValueError,
                                    "multiple of the patch size"),
}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_images(case):
    vit_kw, shape, dtype, error, message = BAD_IMAGES[case]
    enc = LSPTEncoder(make_vit(**vit_kw), NP, NC, backend="reference")
    with pytest.raises(error, match=message):
        enc(torch.randn(shape).to(dtype))


@pytest.mark.parametrize("cls", [LSPTEncoder, GaPTEncoder, VPTEncoder, LinearProbe, AdapterEncoder])
def test_not_a_vit(cls):
    with pytest.raises(TypeError, match="expected a timm VisionTransformer.*got torch.nn.modules.linear.Linear"):
        cls(nn.Linear(3, 3), num_classes=NC)


@pytest.mark.parametrize("cls", [LSPTEncoder, GaPTEncoder, VPTEncoder])
@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_bad_num_prompts(cls, bad):
    with pytest.raises(ValueError, match="num_prompts must be an int >= 1"):
        cls(make_vit(), num_prompts=bad, num_classes=NC)


@pytest.mark.parametrize("options, message", [
    (dict(cspc="max"), "cspc must be one of"),
    (dict(lpc="rnn"), "lpc must be one of"),
    (dict(lstm_layers=3), "lstm_layers must be one of"),
    (dict(lpc="gru", lstm_layers=2), "lstm_layers=2 needs lpc='lstm'"),
    (dict(backend="tpu"), "backend must be one of"),
    (dict(num_classes=0), "num_classes must be an int >= 1"),
], ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else None)
def test_bad_options(options, message):
    options = dict(dict(num_prompts=NP, num_classes=NC), **options)
    with pytest.raises(ValueError, match=message):
        LSPTEncoder(make_vit(), **options)


def test_reference_imports_nothing_from_the_package():
    import ast
    from pathlib import Path
    tree = ast.parse(Path(R.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(m.startswith("lspt_kernels") for m in imported), imported
