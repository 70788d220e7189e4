"""The segmentation recipe: SGD with the heads at 10x, the poly schedule, train_step / evaluate; every
method trains a tiny ViT on the synthetic set (tests/synth_seg.py) to a mIoU well above chance."""
import math

import pytest
import torch
from helpers import make_vit
from synth_seg import write_dataset

from lspt_kernels.encoders import build_encoder
from lspt_kernels.seg import (
    EvalTransform,
    InferenceConfig,
    IterationSampler,
    SegmentationDataset,
    SegmentationModel,
    TrainTransform,
    build_optimizer,
    evaluate,
    load_segmentation_dataset,
    poly_lr,
    train_step,
)

METHODS = ["vpt-shallow", "vpt-deep", "gapt", "lspt"]
# The synthetic images are 32 px: the ADE20K protocol scaled by 1/16 (crop 512 -> 32, scale (2048, 512) ->
# (128, 32), stride 341 -> 21).
CROP, SCALE, STRIDE = 32, (128, 32), 21


def _model(method, num_classes):
    torch.manual_seed(0)
    vit = make_vit(depth=4, dynamic_img_size=True)
    options = dict(num_prompts=4, **(dict(backend="eager") if method == "lspt" else {}))
    return SegmentationModel(build_encoder(method, vit, num_classes=1, **options), num_classes, channels=32)


def _train(method, root, iterations, batch=8, lr=0.01):
    """Train on the split 'train', return the mIoU results before and after on 'val' (SS, slide)."""
    spec = load_segmentation_dataset(root)
    train = SegmentationDataset.from_spec(spec, "train", TrainTransform(crop_size=CROP, scale=SCALE))
    val = SegmentationDataset.from_spec(spec, "val", EvalTransform())
    config = InferenceConfig(crop_size=CROP, stride=STRIDE, scale=SCALE)
    model = _model(method, spec.num_classes)
    before = evaluate(model, val, config)
    optimizer = build_optimizer(model, lr=lr)
    sampler = IterationSampler(len(train), batch, iterations, seed=0)
    for i, b in enumerate(torch.utils.data.DataLoader(train, batch_sampler=sampler)):
        step = train_step(model, optimizer, b["image"], b["label"], i, iterations)
        assert math.isfinite(step["loss"])
    return before, evaluate(model, val, config)


@pytest.fixture(scope="module")
def generic_root(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("synth_seg"), "generic", 32, {"train": 32, "val": 8})


@pytest.mark.parametrize("method", METHODS)
def test_each_method_learns_the_synthetic_set(method, generic_root):
    """30 iterations of batch 8: from an untrained mIoU under 0.25 to over 0.4, every class learnt (a
    constant background prediction scores about 0.16 here)."""
    before, after = _train(method, generic_root, 30)
    assert before["mIoU"] < 0.25
    assert after["mIoU"] > 0.4 and min(after["per_class_iou"]) > 0.2, after


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_each_method_learns_the_ade20k_layout(method, tmp_path):
    """The ADE20K layout (150 classes, reduce_zero_label, 'other' ignored), a longer run: mIoU over the
    classes present above 0.6."""
    root = write_dataset(tmp_path, "ade20k", 32, {"train": 48, "val": 12})
    _, after = _train(method, root, 300)
    assert after["mIoU"] > 0.6, after


def test_poly_schedule_is_mmcvs():
    assert poly_lr(0.01, 0, 100) == 0.01
    assert poly_lr(0.01, 100, 100) == 1e-4
    assert poly_lr(0.01, 50, 100) == pytest.approx((0.01 - 1e-4) * 0.5 ** 0.9 + 1e-4)
    with pytest.raises(ValueError, match="iteration 101"):
        poly_lr(0.01, 101, 100)


def test_heads_train_at_ten_times_the_lr_and_min_lr_is_absolute():
    model = _model("lspt", 5)
    optimizer = build_optimizer(model, lr=0.001)
    encoder, heads = optimizer.param_groups
    assert (encoder["name"], encoder["lr"], heads["name"], heads["lr"]) == ("encoder", 0.001, "heads", 0.01)
    head_params = {id(p) for m in model.heads().values() for p in m.parameters()}
    assert {id(p) for p in heads["params"]} == head_params
    assert len(encoder["params"]) + len(heads["params"]) == len(model.trainable_parameters())
    images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2, 32, 32))
    train_step(model, optimizer, images, labels, 9, 10)
    assert encoder["lr"] == pytest.approx((0.001 - 1e-4) * 0.1 ** 0.9 + 1e-4)
    assert heads["lr"] == pytest.approx((0.01 - 1e-4) * 0.1 ** 0.9 + 1e-4)


def test_train_step_under_bf16_autocast():
    model = _model("lspt", 5)
    step = train_step(model, build_optimizer(model), torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2, 32, 32)),
                      0, 10, amp_dtype=torch.bfloat16)
    assert math.isfinite(step["loss"])


def test_evaluate_splits_images_over_ranks_and_reports_label_maps(generic_root):
    spec = load_segmentation_dataset(generic_root)
    val = SegmentationDataset.from_spec(spec, "val", EvalTransform())
    model, seen = _model("vpt-deep", spec.num_classes).train(), {}
    for rank in (0, 1):
        evaluate(model, val, InferenceConfig(mode="whole", scale=SCALE), rank=rank, world_size=2,
                 on_prediction=lambda i, pred, rank=rank: seen.setdefault(rank, []).append((i, pred)))
    assert [i for i, _ in seen[0]] == [0, 2, 4, 6] and [i for i, _ in seen[1]] == [1, 3, 5, 7]
    pred = seen[1][0][1]
    assert pred.shape == (32, 32) and pred.dtype == torch.int64
    assert model.training                     # evaluate puts the model back in the mode it found
