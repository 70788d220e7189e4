"""`PromptEncoder.forward_intermediates`: timm's dense-feature API on every encoder, running the same
block loop as forward_features (the method's step after every block but the last, checkpointing)."""
import pytest
import torch
from helpers import make_eva, make_vit

from lspt_kernels import LinearProbe, LSPTEncoder, VPTEncoder
from lspt_kernels.backends import unavailable_reason
from lspt_kernels.encoders import GaPTEncoder, build_encoder

NP, NC = 3, 5

METHODS = {
    "linear": ("linear", {}),
    "vpt-shallow": ("vpt-shallow", dict(num_prompts=NP)),
    "vpt-deep": ("vpt-deep", dict(num_prompts=NP)),
    "gapt": ("gapt", dict(num_prompts=NP, gate_init=1.0)),
    "adapter": ("adapter", dict(adapter_init="zero-up")),
    "lspt": ("lspt", dict(num_prompts=NP, backend="eager")),
    "lspt-kmeans": ("lspt", dict(num_prompts=NP, cspc="kmeans")),
    "lspt-gru": ("lspt", dict(num_prompts=NP, lpc="gru")),
    "lspt-transformer": ("lspt", dict(num_prompts=NP, lpc="transformer")),
    "lspt-2layers-unshared": ("lspt", dict(num_prompts=NP, lstm_layers=2, shared_lstm=False)),
    "lspt-none-none": ("lspt", dict(num_prompts=NP, cspc="none", lpc="none")),
}


def _encoder(case, vit=None):
    method, kw = METHODS[case]
    torch.manual_seed(0)
    return build_encoder(method, vit if vit is not None else make_vit(depth=4, dynamic_img_size=True),
                         num_classes=NC, **kw)


def _images(h=32, w=32, batch=2):
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("indices", [None, 2, [1, -1], (0, 2)])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("fmt", ["NCHW", "NLC"])
def test_without_prompts_equals_timm(indices, norm, fmt):
    """No prompts, no step: the linear probe's intermediates are timm's own, at a dynamic size too."""
    vit = make_vit(depth=4, dynamic_img_size=True)
    enc = LinearProbe(vit, NC)
    images = _images(48, 40)
    ours = enc.forward_intermediates(images, indices, norm=norm, output_fmt=fmt, intermediates_only=True)
    theirs = vit.forward_intermediates(images, indices, norm=norm, output_fmt=fmt, intermediates_only=True)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    if fmt == "NCHW":
        assert ours[0].shape == (2, vit.embed_dim, 6, 5)


def test_vpt_deep_equals_a_plain_rerun_of_timms_blocks():
    """VPT-deep by hand: timm's embedding, P[0] after the prefix, each block, the slot replaced by
    P[l + 1]; the grid is the patch tokens after each block."""
    vit = make_vit(depth=4, reg_tokens=2, dynamic_img_size=True)
    enc = VPTEncoder(vit, NP, NC, deep=True)
    images = _images(40, 48)
    k = vit.num_prefix_tokens
    with torch.no_grad():
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        x = torch.cat([x[:, :k], enc.prompts[0].expand(2, -1, -1), x[:, k:]], 1)
        expected = []
        for l, block in enumerate(vit.blocks):
            x = block(x)
            expected.append(x[:, k + NP:].reshape(2, 5, 6, -1).permute(0, 3, 1, 2))
            if l + 1 < len(vit.blocks):
                x = torch.cat([x[:, :k], enc.prompts[l + 1].expand(2, -1, -1), x[:, k + NP:]], 1)
        ours = enc.forward_intermediates(images, intermediates_only=True)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


class _Unfused(LSPTEncoder):
    """The same LSPT forced onto the plain PyTorch path (nn.LSTMCell per block)."""

    fused = property(lambda self: False)


@pytest.mark.parametrize("backend", ["eager", "cpu"])
def test_lspt_fused_equals_plain_pytorch(backend):
    """The fused step (eager op or C++ kernel) and the plain nn.LSTMCell path give the same grids and
    the same gradients of a loss on them."""
    if backend == "cpu" and unavailable_reason("cpu"):
        pytest.skip(f"cpu backend unavailable: {unavailable_reason('cpu')}")
    vit = make_vit(depth=4, dynamic_img_size=True)
    fused = LSPTEncoder(vit, NP, NC, backend=backend)
    plain = LSPTEncoder(vit, NP, NC)
    plain.__class__ = _Unfused
    plain.load_state_dict(fused.state_dict())
    images, results = _images(40, 32), []
    for enc in (fused, plain):
        grids = enc.forward_intermediates(images, [1, 3], intermediates_only=True)
        loss = sum((g * torch.linspace(-1, 1, g.numel()).view_as(g)).sum() for g in grids)
        params = [p for n, p in enc.named_parameters() if p.requires_grad and not n.startswith("head.")]
        results.append((grids, torch.autograd.grad(loss, params)))
    (grids_a, grads_a), (grids_b, grads_b) = results
    for a, b in zip(grids_a + list(grads_a), grids_b + list(grads_b)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert grads_a[0].abs().max() > 0      # the prompts do reach the grids


@pytest.mark.parametrize("case", list(METHODS))
def test_every_method_shares_forward_features_loop(case):
    """Every encoder: the features returned with the intermediates are forward_features', the grid holds
    the N patch tokens only, and the last grid is the last block's patch tokens."""
    enc = _encoder(case).eval()
    images = _images()
    with torch.no_grad():
        feats, grids = enc.forward_intermediates(images, [-1], output_fmt="NLC")
        torch.testing.assert_close(feats, enc.forward_features(images), atol=1e-6, rtol=1e-6)
    assert grids[0].shape == (2, 16, enc.embed_dim)


@pytest.mark.parametrize("case", ["lspt", "gapt", "vpt-deep"])
def test_stop_early_runs_no_later_block_and_every_step_before(case, monkeypatch):
    """stop_early: the blocks after the last index taken do not run, the steps after each block that
    runs do (so the grids are those of the full run); without it the step never follows the last block."""
    enc = _encoder(case)
    steps = []
    after = type(enc)._after_block
    monkeypatch.setattr(type(enc), "_after_block", lambda self, l, *a: (steps.append(l), after(self, l, *a)))
    ran = []
    for l, block in enumerate(enc.vit.blocks):     # norm1: GaPT and the Adapter re-run the block's parts
        block.norm1.register_forward_pre_hook(lambda m, a, l=l: ran.append(l))
    images = _images()
    with torch.no_grad():
        full = enc.forward_intermediates(images, [0, 1], intermediates_only=True)
        assert steps == [0, 1, 2] and ran == [0, 1, 2, 3]
        steps.clear(), ran.clear()
        early = enc.forward_intermediates(images, [0, 1], stop_early=True, intermediates_only=True)
    assert steps == [0, 1] and ran == [0, 1]
    for a, b in zip(full, early):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("case", ["lspt", "gapt", "vpt-shallow"])
def test_grad_checkpointing_gives_the_same_grids_and_gradients(case):
    results = []
    for checkpointing in (False, True):
        enc = _encoder(case).set_grad_checkpointing(checkpointing)
        grids = enc.forward_intermediates(_images(), [1, 2, 3], stop_early=True, intermediates_only=True)
        loss = sum((g * torch.linspace(-1, 1, g.numel()).view_as(g)).sum() for g in grids)
        params = [p for n, p in enc.named_parameters() if p.requires_grad and not n.startswith("head.")]
        results.append([g.detach() for g in grids] + list(torch.autograd.grad(loss, params)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_gapt_projects_its_temperatures():
    enc = _encoder("gapt")
    with torch.no_grad():
        enc.temperatures.fill_(50.0)
    enc.forward_intermediates(_images(), 1, intermediates_only=True)
    assert enc.temperatures.max().item() == GaPTEncoder.TEMPERATURE_RANGE[1]


@pytest.mark.parametrize("indices, match", [(0, r"\[1, 4\]"), (5, r"\[1, 4\]"), ([4], "out of range"),
                                            ([-5], "out of range"), ([], "non-empty"), (True, "int"),
                                            ([1.0], "list of block"), ("1", "list of block")])
def test_bad_indices_are_named(indices, match):
    with pytest.raises(ValueError, match="indices.*" if match in ("int", "non-empty") else match):
        _encoder("vpt-deep").forward_intermediates(_images(), indices)


def test_bad_output_format_is_named():
    with pytest.raises(ValueError, match="output_fmt"):
        _encoder("vpt-deep").forward_intermediates(_images(), output_fmt="NHWC")


def test_other_size_needs_dynamic_img_size():
    enc = LSPTEncoder(make_vit(depth=2), NP, NC)
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        enc.forward_intermediates(_images(48, 48))


# --- timm Eva backbones ----------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("flavour", ["dinov3", "eva02", "rope-mixed", "sapiens2-gqa"])
def test_eva_without_prompts_equals_timm(flavour, norm):
    """Timm's Eva.forward_intermediates is the oracle too (its rope, registers; DINOv3 at a dynamic size)."""
    vit = make_eva(flavour, depth=3)
    enc = LinearProbe(vit, NC)
    images = _images(48, 40) if vit.dynamic_img_size else _images()
    ours = enc.forward_intermediates(images, [0, 2], norm=norm, intermediates_only=True)
    theirs = vit.forward_intermediates(images, [0, 2], norm=norm, intermediates_only=True)
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("method", ["lspt", "gapt", "vpt-deep", "adapter"])
def test_segmentation_model_trains_on_a_dinov3_backbone(method):
    """SETR-PUP on a DINOv3-style Eva at an image size that is not the model's (dynamic size, padded): the
    logits come back at the input size and every trainable tensor gets a gradient."""
    from lspt_kernels.seg import SegmentationModel
    vit = make_eva("dinov3", depth=3)
    torch.manual_seed(0)
    enc = build_encoder(method, vit, num_prompts=NP, num_classes=NC)
    model = SegmentationModel(enc, 4, feature_blocks=(1, 2), channels=8).train()
    images = _images(44, 36)
    outputs = model(images)
    assert outputs[0].shape == (2, 4, 44, 36) and len(outputs[1]) == 1
    loss = model.loss(outputs, torch.randint(0, 4, (2, 44, 36), generator=torch.Generator().manual_seed(3)))
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    assert all(g is not None for g in grads)
    assert all(not p.requires_grad for p in vit.parameters())
