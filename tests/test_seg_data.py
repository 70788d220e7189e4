"""Segmentation data: layouts, label maps (reduce_zero_label, bad files), mmseg's train pipeline (pad with
255, crop with cat_max_ratio, photometric distortion), the iteration sampler."""
import numpy as np
import pytest
import torch
from PIL import Image
from synth_seg import NUM_CLASSES, write_dataset

from lspt_kernels.data import IMAGENET_MEAN, IMAGENET_STD, DataError
from lspt_kernels.seg.data import (
    ADE20K_CLASSES,
    EvalTransform,
    IterationSampler,
    SegmentationDataset,
    TrainTransform,
    detect_segmentation_layout,
    load_segmentation_dataset,
    photometric_distortion,
    prepare_label,
)


def _read(path):
    with Image.open(path) as im:
        return np.array(im)


def _save(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


# --- layouts ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("given", ["parent", "ADEChallengeData2016"])
def test_ade20k_layout_from_the_folder_or_its_parent(tmp_path, given):
    write_dataset(tmp_path, "ade20k", 16, {"train": 3, "val": 2})
    root = tmp_path if given == "parent" else tmp_path / "ADEChallengeData2016"
    assert detect_segmentation_layout(root) == ("ade20k", tmp_path / "ADEChallengeData2016")
    spec = load_segmentation_dataset(root)
    assert spec.layout == "ade20k" and spec.num_classes == 150 and spec.classes == list(ADE20K_CLASSES)
    assert spec.reduce_zero_label and spec.ignore_index == 255
    assert {s: len(v) for s, v in spec.splits.items()} == {"train": 3, "val": 2}
    image, label = spec.splits["val"][1]
    assert image.endswith("validation/ADE_valid_00000001.jpg") and label.endswith("validation/ADE_valid_00000001.png")


def test_ade20k_fixes_its_classes(tmp_path):
    write_dataset(tmp_path, "ade20k", 16, {"train": 1, "val": 1})
    with pytest.raises(DataError, match="150 classes and reduce_zero_label=True"):
        load_segmentation_dataset(tmp_path, num_classes=10)


def test_generic_layout_and_its_classes(tmp_path):
    write_dataset(tmp_path, "generic", 16, {"train": 12, "val": 2})
    assert detect_segmentation_layout(tmp_path) == ("generic", tmp_path)
    spec = load_segmentation_dataset(tmp_path)
    assert spec.num_classes == NUM_CLASSES and not spec.reduce_zero_label        # the largest train label + 1
    assert load_segmentation_dataset(tmp_path, num_classes=7).num_classes == 7
    (tmp_path / "classes.txt").write_text("background\ndisc\nsquare\ntriangle\nstar\n")
    assert load_segmentation_dataset(tmp_path).classes[-1] == "star"


def test_not_a_segmentation_dataset(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    assert detect_segmentation_layout(tmp_path) is None
    with pytest.raises(DataError, match="not a segmentation dataset"):
        load_segmentation_dataset(tmp_path)


def test_ignore_index_among_the_classes_is_refused(tmp_path):
    write_dataset(tmp_path, "generic", 16, {"train": 2, "val": 1})
    with pytest.raises(DataError, match="ignore_index 2 is one of the 4 classes"):
        load_segmentation_dataset(tmp_path, num_classes=4, ignore_index=2)


# --- label maps ---------------------------------------------------------------------------------------
def test_reduce_zero_label_pixel_by_pixel():
    raw = np.array([[0, 1, 2], [150, 255, 0]])
    assert prepare_label(raw, 150, True, 255, "x.png").tolist() == [[255, 0, 1], [149, 255, 255]]
    assert prepare_label(raw[:, 1:], 256, False, 255, "x.png").tolist() == [[1, 2], [255, 0]]


def test_ade20k_samples_are_reduced_pixel_by_pixel(tmp_path):
    write_dataset(tmp_path, "ade20k", 16, {"train": 1, "val": 1})
    spec = load_segmentation_dataset(tmp_path)
    data = SegmentationDataset.from_spec(spec, "val", EvalTransform())
    raw = _read(spec.splits["val"][0][1]).astype(np.int64)
    expected = np.where(raw == 0, 255, raw - 1)
    sample = data[0]
    assert sample["label"].tolist() == expected.tolist() and sample["index"] == 0
    assert (raw[0] == 0).all() and (sample["label"][0] == 255).all()         # the "other" band is ignored


@pytest.mark.parametrize("reduce, value, shown", [(False, 4, r"\[4\]"), (True, 5, r"\[5\]"), (False, 200, r"\[200\]")])
def test_a_label_outside_the_classes_names_its_file(tmp_path, reduce, value, shown):
    write_dataset(tmp_path, "generic", 16, {"train": 2, "val": 1})
    bad = tmp_path / "annotations" / "train" / "001.png"
    label = _read(bad)
    label[5, 5] = value
    _save(bad, label, "L")
    spec = load_segmentation_dataset(tmp_path, num_classes=4, reduce_zero_label=reduce)
    data = SegmentationDataset.from_spec(spec, "train", EvalTransform())
    data[0]
    with pytest.raises(DataError, match=rf"001.png: label values {shown} are not classes"):
        data[1]


def test_a_mask_of_another_size_names_both_files(tmp_path):
    write_dataset(tmp_path, "generic", 16, {"train": 1, "val": 1})
    _save(tmp_path / "annotations" / "val" / "000.png", np.zeros((16, 12), np.uint8), "L")
    data = SegmentationDataset.from_spec(load_segmentation_dataset(tmp_path), "val", EvalTransform())
    with pytest.raises(DataError, match=r"000.png is 12x16 \(WxH\) but its image .*images/val/000.png is 16x16"):
        data[0]


def test_an_rgb_mask_is_refused(tmp_path):
    write_dataset(tmp_path, "generic", 16, {"train": 1, "val": 1})
    _save(tmp_path / "annotations" / "val" / "000.png", np.zeros((16, 16, 3), np.uint8))
    data = SegmentationDataset.from_spec(load_segmentation_dataset(tmp_path), "val", EvalTransform())
    with pytest.raises(DataError, match="000.png is a RGB image, not a label map"):
        data[0]


def test_palette_and_16_bit_label_maps_are_label_maps(tmp_path):
    write_dataset(tmp_path, "generic", 16, {"train": 1, "val": 1})
    label = _read(tmp_path / "annotations" / "val" / "000.png")
    palette = Image.fromarray(label, mode="L").convert("P")
    palette.save(tmp_path / "annotations" / "val" / "000.png")
    spec = load_segmentation_dataset(tmp_path, num_classes=300, ignore_index=65535)
    data = SegmentationDataset.from_spec(spec, "val", EvalTransform())
    assert data[0]["label"].tolist() == label.tolist()
    wide = label.astype(np.uint16)
    wide[8, 8] = 299
    Image.fromarray(wide).save(tmp_path / "annotations" / "val" / "000.png")
    with Image.open(tmp_path / "annotations" / "val" / "000.png") as im:
        assert im.mode.startswith("I")
    assert data[0]["label"].tolist() == wide.tolist()


def test_a_missing_annotation_names_the_image_and_the_expected_file(tmp_path):
    write_dataset(tmp_path, "generic", 16, {"train": 2, "val": 1})
    (tmp_path / "annotations" / "train" / "001.png").unlink()
    with pytest.raises(DataError, match=r"images/train/001.png has no annotation: expected the label map "
                                        r".*annotations/train/001.png"):
        load_segmentation_dataset(tmp_path)


# --- the train pipeline -------------------------------------------------------------------------------
def _normalized(image):
    x = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    return (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def test_pad_to_the_crop_with_255_pixel_by_pixel():
    """A 20 x 24 sample kept at its size (scale (24, 20), ratio 1): the crop is the whole sample; the
    image is padded with 0 (after normalising) and the label with 255 at the bottom and right."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    label = rng.integers(0, 4, (20, 24))
    t = TrainTransform(crop_size=32, scale=(24, 20), ratio_range=(1.0, 1.0), flip_prob=0.0, photometric=False)
    x, y = t(image, label, np.random.default_rng(1))
    assert x.shape == (3, 32, 32) and y.shape == (32, 32) and y.dtype == torch.int64
    torch.testing.assert_close(x[:, :20, :24], _normalized(image))
    assert (x[:, 20:] == 0).all() and (x[:, :, 24:] == 0).all()
    assert y[:20, :24].tolist() == label.tolist()
    assert (y[20:] == 255).all() and (y[:, 24:] == 255).all()


def test_resize_keeps_aspect_and_labels_stay_classes():
    """Scale (2048, 512) x ratio: a 375 x 500 sample at ratio 1 becomes 512 x 683 (mmcv's rule), the
    label map by nearest neighbour (only values it had), then the 512 crop."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
    label = np.repeat(np.arange(5), 100)[None].repeat(375, 0)
    t = TrainTransform(ratio_range=(1.0, 1.0), cat_max_ratio=1.0, flip_prob=0.0, photometric=False)
    x, y = t(image, label, np.random.default_rng(3))
    assert x.shape == (3, 512, 512)
    assert set(torch.unique(y).tolist()) <= set(range(5))
    cols = (torch.arange(683) * (500 / 683)).long() // 100     # the resized map's classes by column
    first = [c for c in range(683 - 511) if torch.equal(y[0], cols[c:c + 512])]
    assert first, "the crop is not a window of the nearest-neighbour resized label map"


def test_cat_max_ratio_prefers_crops_with_no_dominant_class():
    """Left half class 1, right half class 2, a 32-wide crop of 64: fewer than half the offsets keep
    either class under 75 %; with cat_max_ratio 0.75 (10 tries) nearly every crop does."""
    image = np.zeros((32, 64, 3), np.uint8)
    label = np.where(np.arange(64) < 32, 1, 2)[None].repeat(32, 0)

    def balanced(ratio):
        t = TrainTransform(crop_size=32, scale=(64, 32), ratio_range=(1.0, 1.0), cat_max_ratio=ratio,
                           flip_prob=0.0, photometric=False)
        shares = [(t(image, label, np.random.default_rng(s))[1] == 1).float().mean().item() for s in range(60)]
        return sum(0.25 < s < 0.75 for s in shares) / len(shares)

    assert balanced(1.0) < 0.6 and balanced(0.75) > 0.95


def test_photometric_distortion_keeps_the_image_and_is_seeded():
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    a = photometric_distortion(image, np.random.default_rng(5))
    b = photometric_distortion(image, np.random.default_rng(5))
    assert a.dtype == np.uint8 and a.shape == image.shape and np.array_equal(a, b)
    changed = [not np.array_equal(photometric_distortion(image, np.random.default_rng(s)), image) for s in range(64)]
    assert 48 <= sum(changed) < 64       # each of the 4 steps has probability 1/2: 1/16 of draws change nothing


def test_hsv_follows_opencvs_8_bit_convention():
    from lspt_kernels.seg.data import _hsv_to_rgb, _rgb_to_hsv
    pure = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 0, 128]]], np.uint8)
    assert _rgb_to_hsv(pure)[0, :, 0].tolist() == [0, 60, 120, 165]
    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    back = _hsv_to_rgb(_rgb_to_hsv(image)).astype(int)
    assert np.abs(back - image).max() <= 4


# --- the sampler --------------------------------------------------------------------------------------
def test_iteration_sampler_epochs_resume_and_ranks():
    full = list(IterationSampler(10, 4, 6, seed=3))
    assert len(full) == 6 and all(len(b) == 4 for b in full)
    stream = [i for batch in full for i, _ in batch]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert list(IterationSampler(10, 4, 6, seed=3, start=4)) == full[4:]        # resume mid-epoch
    ranks = [list(IterationSampler(10, 4, 6, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks)] == full
    assert len({seed for batch in full for _, seed in batch}) == 24            # one augmentation seed per draw
    with pytest.raises(ValueError, match="multiple of the 3 processes"):
        IterationSampler(10, 4, 6, world_size=3)


def test_a_keyed_sample_is_reproducible(tmp_path):
    write_dataset(tmp_path, "generic", 24, {"train": 2, "val": 1})
    spec = load_segmentation_dataset(tmp_path)
    data = SegmentationDataset.from_spec(spec, "train", TrainTransform(crop_size=16, scale=(64, 16)))
    a, b, c = data[(1, (0, 7))], data[(1, (0, 7))], data[(1, (0, 8))]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert not torch.equal(a["image"], c["image"])
