"""Test-time inference as mmseg: sliding windows, the keep-aspect test resize, multi-scale + flip."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import make_vit

from lspt_kernels.encoders import build_encoder
from lspt_kernels.seg import InferenceConfig, SegmentationModel, inference, slide_inference
from lspt_kernels.seg.inference import rescale_size

NC = 3


def _pixelwise():
    """Translation-exact: every output pixel is a function of its input pixel only (1x1 convs)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, NC, 1)).eval()


def _seg_model():
    vit = make_vit(depth=3, dynamic_img_size=True)
    return SegmentationModel(build_encoder("lspt", vit, num_prompts=2, num_classes=1, backend="eager"), NC,
                             channels=8).eval()


def _images(h, w, batch=1):
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("size, crop", [((32, 32), 32), ((24, 40), 48), ((32, 40), (32, 48))])
def test_slide_equals_whole_when_one_window_covers_the_image(size, crop):
    """One window (a window never exceeds the image): the slide result is the whole-image result."""
    model, images = _seg_model(), _images(*size, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(slide_inference(model, images, NC, crop, 16), model(images), atol=0, rtol=0)


@pytest.mark.parametrize("crop, stride", [(20, 20), (20, 7), ((16, 24), (13, 5)), (30, 1)])
def test_slide_is_invariant_to_the_stride_for_a_translation_exact_model(crop, stride):
    model, images = _pixelwise(), _images(50, 70)
    with torch.no_grad():
        # up to 900 windows summed in fp32 per pixel (stride 1), then divided
        torch.testing.assert_close(slide_inference(model, images, NC, crop, stride), model(images),
                                   atol=2e-5, rtol=2e-5)


def test_slide_windows_and_averaging_are_mmsegs():
    """600 x 900 with crop 512, stride 341: rows start at 0 and 88 (the last window flush with the
    border), columns at 0, 341 and 388; each pixel gets the mean over the windows that cover it."""
    seen = []

    def window_id(x):               # the image holds each pixel's (row, column): the window's corner
        seen.append((int(x[0, 0, 0, 0]), int(x[0, 1, 0, 0]), *x.shape[-2:]))
        return torch.full((1, 1, *x.shape[-2:]), float(len(seen) - 1))

    rows, cols = torch.meshgrid(torch.arange(600.0), torch.arange(900.0), indexing="ij")
    image = torch.stack([rows, cols, torch.zeros_like(rows)])[None]
    out = slide_inference(window_id, image, 1, 512, 341)[0, 0]
    assert seen == [(y, x, 512, 512) for y in (0, 88) for x in (0, 341, 388)]
    for y, x, ids in [(0, 0, [0]), (100, 0, [0, 3]), (0, 380, [0, 1]), (0, 600, [1, 2]), (0, 860, [2]),
                      (550, 880, [5]), (300, 400, [0, 1, 2, 3, 4, 5]), (300, 350, [0, 1, 3, 4])]:
        assert out[y, x].item() == pytest.approx(sum(ids) / len(ids)), (y, x)


@pytest.mark.parametrize("h, w, ratio, short, expected", [
    (512, 683, 1.0, None, (512, 683)),
    (375, 500, 1.0, None, (512, 683)),
    (375, 500, 0.5, None, (256, 341)),
    (375, 500, 1.75, None, (896, 1195)),
    (1000, 100, 1.0, None, (2048, 205)),       # the long side limits: 2048 / 1000
    (375, 500, 0.5, 512, (512, 683)),          # SETR's variant keeps the short side at the crop
    (1000, 100, 1.0, 512, (5120, 512)),        # ... and drops the long-side limit
])
def test_rescale_size_is_mmcvs(h, w, ratio, short, expected):
    assert rescale_size(h, w, (2048, 512), ratio, short) == expected


def _aug_by_hand(fn, images, ratios, scale):
    H, W = images.shape[-2:]
    total = 0
    for r in ratios:
        size = rescale_size(H, W, scale, r)
        x = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        for flip in (False, True):
            logits = fn(x.flip(-1) if flip else x)
            p = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False).softmax(1)
            total = total + (p.flip(-1) if flip else p)
    return total / (2 * len(ratios))


def test_multi_scale_averages_softmax_at_the_original_size_with_flips_undone():
    """mmseg's aug_test: probabilities (not logits) of every (ratio, flip), each resized to the original
    size and unflipped, averaged. The model sees a column ramp, so a flip that is not undone shows."""
    conv = _pixelwise()

    def fn(x):
        ramp = torch.linspace(-3, 3, x.shape[-1]).view(1, 1, 1, -1)
        return conv(x) + ramp * torch.tensor([1.0, 0.0, -1.0]).view(1, 3, 1, 1)

    images = _images(30, 44)
    config = InferenceConfig.multi_scale(mode="whole", scale=(120, 30))
    assert config.ratios == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75) and config.flip
    with torch.no_grad():
        expected = _aug_by_hand(fn, images, config.ratios, (120, 30))
        torch.testing.assert_close(inference(fn, images, NC, config), expected, atol=1e-6, rtol=1e-5)


def test_single_scale_is_the_softmax_of_slide_at_the_original_size():
    model, images = _seg_model(), _images(40, 56)
    config = InferenceConfig(crop_size=32, stride=21, scale=(160, 40))      # ratio 1: the image keeps its size
    with torch.no_grad():
        expected = slide_inference(model, images, NC, 32, 21).softmax(1)
        torch.testing.assert_close(inference(model, images, NC, config), expected, atol=1e-6, rtol=1e-6)


def test_flip_of_a_pixelwise_model_changes_nothing():
    model, images = _pixelwise(), _images(32, 48)
    single = InferenceConfig(mode="whole", scale=(192, 32))
    with torch.no_grad():
        torch.testing.assert_close(inference(model, images, NC, InferenceConfig(mode="whole", scale=(192, 32),
                                                                                flip=True)),
                                   inference(model, images, NC, single), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("options, match", [(dict(mode="sliding"), "mode"), (dict(crop_size=0), "crop_size"),
                                            (dict(stride=(3,)), "stride"), (dict(ratios=()), "ratios"),
                                            (dict(ratios=(1.0, -0.5)), "ratios"), (dict(scale="big"), "scale")])
def test_bad_config_is_named(options, match):
    with pytest.raises(ValueError, match=match):
        InferenceConfig(**options)


def test_logits_of_the_wrong_size_are_named():
    with pytest.raises(ValueError, match="logits at the window's size"):
        slide_inference(lambda x: torch.zeros(1, NC, 4, 4), _images(32, 32), NC, 16, 16)
