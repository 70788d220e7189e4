"""SETR-PUP heads, SegmentationModel (forward, feature blocks, loss) and its tuned files."""
import json

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import make_vit

from lspt_kernels.checkpoints import load_backbone_checkpoint, read_tuned_metadata
from lspt_kernels.encoders import build_encoder
from lspt_kernels.seg import AuxHead, PUPHead, SegmentationModel, default_feature_blocks, load_segmentation_model

NC = 6


def _model(method="lspt", depth=4, vit=None, **kw):
    vit = vit if vit is not None else make_vit(depth=depth, dynamic_img_size=True)
    options = {} if method in ("linear", "adapter") else dict(num_prompts=2)
    if method == "lspt":
        options["backend"] = "eager"
    torch.manual_seed(0)
    return SegmentationModel(build_encoder(method, vit, num_classes=1, **options), NC, channels=8, **kw)


def _images(h=32, w=32, batch=2):
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(3))


def _labels(h=32, w=32, batch=2):
    labels = torch.randint(0, NC, (batch, h, w), generator=torch.Generator().manual_seed(4))
    labels[:, :3] = 255
    return labels


# --- heads ----------------------------------------------------------------------------------------------
def test_pup_head_is_setrs_sequence():
    """Official order: LayerNorm; [conv3x3, BN, ReLU, x2] three times; conv3x3, BN, ReLU; 1x1 classifier;
    x2 -- written out with the head's own layers."""
    torch.manual_seed(0)
    head = PUPHead(16, NC, channels=8).train()
    x = torch.randn(2, 16, 3, 5)
    y = head.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    for i, (conv, bn, _) in enumerate(head.convs):
        y = F.relu(bn(conv(y)))
        if i < 3:
            y = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)
    y = F.interpolate(head.classifier(y), scale_factor=2, mode="bilinear", align_corners=False)
    out = head(x)
    assert out.shape == (2, NC, 48, 80)
    torch.testing.assert_close(out, y, atol=1e-5, rtol=1e-5)


def test_aux_head_is_setrs_sequence():
    torch.manual_seed(0)
    head = AuxHead(16, NC, channels=8).train()
    x = torch.randn(2, 16, 3, 5)
    y = F.relu(head.conv[1](head.conv[0](head.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))))
    y = head.classifier(F.interpolate(y, scale_factor=4, mode="bilinear", align_corners=False))
    torch.testing.assert_close(head(x), y, atol=1e-5, rtol=1e-5)


def test_heads_own_a_trained_layernorm_and_biased_convs():
    head = PUPHead(16, NC)
    assert head.norm.eps == 1e-6 and head.norm.weight.requires_grad
    assert all(m.bias is not None for m in head.modules() if isinstance(m, nn.Conv2d))
    assert [m.out_channels for m in head.modules() if isinstance(m, nn.Conv2d)] == [256, 256, 256, 256, NC]


def test_head_refuses_a_token_sequence():
    with pytest.raises(ValueError, match=r"\(B, 16, h, w\) feature grid"):
        PUPHead(16, NC)(torch.randn(2, 20, 16))


# --- feature blocks -----------------------------------------------------------------------------------
@pytest.mark.parametrize("depth, blocks", [(12, (4, 8, 11)), (24, (9, 17, 23)), (4, (1, 2, 3)), (3, (0, 1, 2))])
def test_default_feature_blocks_scale_with_depth(depth, blocks):
    assert default_feature_blocks(depth) == blocks


def test_too_shallow_for_the_default_is_refused():
    with pytest.raises(ValueError, match="no three distinct blocks.*pass feature_blocks"):
        _model(depth=2)


@pytest.mark.parametrize("blocks, match", [([2, 1], "increasing"), ([1, 1, 3], "increasing"),
                                           ([0, 4], "out of range"), (3, "list or tuple"), ([], "non-empty")])
def test_bad_feature_blocks_are_named(blocks, match):
    with pytest.raises(ValueError, match=match):
        _model(feature_blocks=blocks)


def test_negative_blocks_and_a_main_head_alone():
    model = _model(feature_blocks=(-1,)).train()
    assert model.feature_blocks == (3,) and len(model.aux_heads) == 0
    main, aux = model(_images())
    assert aux == [] and main.shape == (2, NC, 32, 32)


@pytest.mark.parametrize("weight", [0, -0.4, float("nan"), True])
def test_bad_aux_weight_is_named(weight):
    with pytest.raises(ValueError, match="aux_weight"):
        _model(aux_weight=weight)


# --- forward ------------------------------------------------------------------------------------------
def test_forward_gives_logits_at_the_input_size():
    model = _model()
    model.train()
    main, aux = model(_images())
    assert main.shape == (2, NC, 32, 32) and [a.shape for a in aux] == [(2, NC, 32, 32)] * 2
    model.eval()
    assert model(_images()).shape == (2, NC, 32, 32)
    assert len(model(_images(), aux=True)[1]) == 2


def test_an_input_off_the_patch_grid_is_padded_and_cropped_back():
    model = _model().eval()
    images = _images(30, 45)
    padded = F.pad(images, (0, 3, 0, 2))
    with torch.no_grad():
        out = model(images)
        torch.testing.assert_close(out, model(padded)[..., :30, :45], atol=0, rtol=0)
    assert out.shape == (2, NC, 30, 45)


def test_the_encoders_classification_head_is_gone():
    model = _model()
    assert isinstance(model.encoder.head, nn.Identity)
    assert not any(n.startswith("encoder.head") for n in model.tuned_state_dict())


# --- loss ---------------------------------------------------------------------------------------------
def _ce_all_pixels(logits, labels):
    """Cross-entropy summed over labelled pixels, divided by ALL pixels (mmseg 0.x's mean)."""
    keep = labels != 255
    logp = logits.log_softmax(1).permute(0, 2, 3, 1)[keep]
    return -logp.gather(1, labels[keep][:, None]).sum() / labels.numel()


def test_loss_is_main_plus_weighted_aux_over_all_pixels():
    model = _model(aux_weight=0.4).train()
    outputs, labels = model(_images()), _labels()
    main, aux = outputs
    expected = _ce_all_pixels(main, labels) + 0.4 * sum(_ce_all_pixels(a, labels) for a in aux)
    torch.testing.assert_close(model.loss(outputs, labels), expected, atol=1e-5, rtol=1e-5)


def test_avg_non_ignore_averages_over_labelled_pixels():
    model = _model(avg_non_ignore=True, feature_blocks=(3,)).eval()
    logits, labels = model(_images()), _labels()
    torch.testing.assert_close(model.loss(logits, labels), F.cross_entropy(logits, labels, ignore_index=255))


def test_loss_gradients_reach_prompts_lstm_and_heads():
    model = _model().train()
    model.loss(model(_images()), _labels()).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().max() > 0, name
    assert not any(p.requires_grad for p in model.encoder.vit.parameters())


@pytest.mark.parametrize("labels, error, match", [
    (torch.full((2, 32, 32), 7), ValueError, r"values \[7\] outside the classes \[0, 6\).*ignore_index 255"),
    (torch.zeros(2, 32, 32), TypeError, "integer"),
    (torch.zeros(2, 16, 16, dtype=torch.long), ValueError, r"\(B, H, W\) = \(2, 32, 32\)"),
])
def test_bad_labels_are_named(labels, error, match):
    model = _model().eval()
    with pytest.raises(error, match=match):
        model.loss(model(_images()), labels)


def test_grad_checkpointing_gives_the_same_loss_and_gradients():
    results = []
    for enable in (False, True):
        model = _model().set_grad_checkpointing(enable).train()
        loss = model.loss(model(_images()), _labels())
        results.append([loss.detach()] + list(torch.autograd.grad(loss, model.trainable_parameters())))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# --- tuned files --------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lspt", "gapt", "vpt-deep", "vpt-shallow", "linear", "adapter"])
def test_tuned_file_rebuilds_the_model(method, tmp_path):
    """A trained step (prompts, LSPT/GaPT parameters, heads and BatchNorm statistics all move), saved,
    rebuilt around a fresh copy of the backbone: the same logits, bit for bit."""
    model = _model(method).train()
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.5)
    model.loss(model(_images()), _labels()).backward()
    opt.step()
    path = tmp_path / "seg.safetensors"
    model.save_tuned(path, extra_metadata={"lspt_train": {"iteration": 1}})
    run_options = dict(backend="eager") if method == "lspt" else {}      # the backend is not in the file
    rebuilt = load_segmentation_model(path, make_vit(depth=4, dynamic_img_size=True), **run_options)
    model.eval(), rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(_images(40, 24)), model(_images(40, 24)), atol=0, rtol=0)
    config, others = read_tuned_metadata(path)
    assert config["task"] == "segmentation" and config["method"] == method
    assert others == {"lspt_train": {"iteration": 1}}
    assert any(k.startswith("decode_head.") and k.endswith("running_mean") for k in model.tuned_state_dict())


@pytest.mark.parametrize("change, match", [(dict(num_classes=5), "num_classes"),
                                           (dict(feature_blocks=(1, 3)), "feature_blocks"),
                                           (dict(method="vpt-deep"), "method"),
                                           (dict(num_prompts=3), "encoder num_prompts")])
def test_a_file_of_another_model_is_refused(change, match, tmp_path):
    path = tmp_path / "seg.safetensors"
    _model().save_tuned(path)
    vit = make_vit(depth=4, dynamic_img_size=True)
    options = dict(num_prompts=change.pop("num_prompts", 2))
    encoder = build_encoder(change.pop("method", "lspt"), vit, num_classes=1, **options)
    other = SegmentationModel(encoder, change.pop("num_classes", NC), channels=8, **change)
    before = {k: v.clone() for k, v in other.tuned_state_dict().items()}
    with pytest.raises(ValueError, match=match):
        other.load_tuned(path)
    assert all(torch.equal(before[k], v) for k, v in other.tuned_state_dict().items())


def test_a_classification_file_is_not_a_segmentation_file(tmp_path):
    path = tmp_path / "cls.safetensors"
    build_encoder("lspt", make_vit(depth=4), num_prompts=2, num_classes=3).save_tuned(path)
    with pytest.raises(ValueError, match="'classification' tuned file"):
        load_segmentation_model(path, make_vit(depth=4))
    with pytest.raises(ValueError, match="'classification' file"):
        _model().load_tuned(path)


def test_extra_metadata_cannot_replace_the_config(tmp_path):
    with pytest.raises(ValueError, match="lspt_kernels"):
        _model().save_tuned(tmp_path / "x.safetensors", extra_metadata={"lspt_kernels": {}})
    path = tmp_path / "y.safetensors"
    _model().save_tuned(path, extra_metadata={"note": "run 3"})
    assert json.loads(json.dumps(read_tuned_metadata(path)[1])) == {"note": "run 3"}


def test_a_larger_backbone_from_a_smaller_checkpoint(tmp_path):
    """The documented route to 512 px from a 224 checkpoint, here 64 px from a 32 px one: timm's model
    built with img_size=64 and dynamic_img_size=True; loading resamples the position embedding once
    (timm's resample_abs_pos_embed), and other input sizes are resampled per forward by timm."""
    from timm.layers import resample_abs_pos_embed
    small = make_vit(depth=3)
    torch.save(small.state_dict(), tmp_path / "vit32.pth")
    big = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64, patch_size=8,
                            embed_dim=32, depth=3, num_heads=2, dynamic_img_size=True)
    load_backbone_checkpoint(big, tmp_path / "vit32.pth")
    expected = resample_abs_pos_embed(small.pos_embed, new_size=(8, 8), num_prefix_tokens=1)
    torch.testing.assert_close(big.pos_embed, expected)
    model = SegmentationModel(build_encoder("vpt-deep", big, num_prompts=2, num_classes=1), NC, channels=8).eval()
    with torch.no_grad():
        assert model(_images(64, 64, 1)).shape == (1, NC, 64, 64)
        assert model(_images(40, 56, 1)).shape == (1, NC, 40, 56)
