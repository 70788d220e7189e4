"""lspt_kernels.data: the three layouts, label mapping from the train split, transforms, and every bad-input
case of the dataset (a clear error that names the folder, file or line)."""
import json
import shutil

import pytest
import torch
from synth_data import CLASSES, write_dataset

from lspt_kernels.data import DataError, ImageDataset, build_transform, detect_layout, load_dataset


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    base = tmp_path_factory.mktemp("synth")
    small = {"train": 3, "val": 2, "test": 2}
    return {layout: write_dataset(base / layout, layout, size=16, per_class=small)
            for layout in ("imagefolder", "vtab", "fgvc")}


def _copy(datasets, layout, tmp_path):
    return shutil.copytree(datasets[layout], tmp_path / layout)


@pytest.mark.parametrize("layout", ["imagefolder", "vtab", "fgvc"])
def test_layouts_are_detected_and_read(datasets, layout):
    root = datasets[layout]
    assert detect_layout(root) == layout
    spec = load_dataset(root)
    assert spec.layout == layout and spec.num_classes == len(CLASSES)
    assert {s: len(v) for s, v in spec.splits.items() if s != "trainval"} == {"train": 12, "val": 8, "test": 8}
    # Every label is a train class index, and every class appears in train.
    assert sorted({lab for _, lab in spec.splits["train"]}) == [0, 1, 2, 3]
    assert all(0 <= lab < 4 for samples in spec.splits.values() for _, lab in samples)
    assert "4 classes" in spec.summary() and "train 12" in spec.summary()


def test_labels_follow_the_train_split_in_every_layout(datasets):
    """The same image gets the same class name in each layout (imagefolder sorts class folder names; VTAB's
    labels are the indices; FGVC's 1-based labels map to 0-based in sorted order)."""
    names = {layout: load_dataset(datasets[layout]).classes for layout in datasets}
    assert names["imagefolder"] == sorted(CLASSES)
    assert names["vtab"] == ["0", "1", "2", "3"]
    assert names["fgvc"] == ["1", "2", "3", "4"]
    fgvc = load_dataset(datasets["fgvc"])
    for path, lab in fgvc.splits["val"]:
        written = CLASSES.index(path.split("_")[-2])          # images/<split>_<class>_<i>.png
        assert lab == written
    # Given classes (as lspt-eval passes them from a tuned file) fix the order.
    spec = load_dataset(datasets["imagefolder"], classes=sorted(CLASSES))
    assert spec.classes == sorted(CLASSES)


def test_vtab_trainval_split(datasets):
    spec = load_dataset(datasets["vtab"])
    assert len(spec.splits["trainval"]) == len(spec.splits["train"]) + len(spec.splits["val"])


def test_transforms_follow_the_official_code(datasets):
    from PIL import Image
    spec = load_dataset(datasets["imagefolder"])
    path = spec.splits["train"][0][0]
    img = Image.open(path).convert("RGB")
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    # VTAB: resize to the model size, no augmentation (the same tensor twice).
    vt = build_transform("vtab", 24, mean, std, train=True)
    a, b = vt(img), vt(img)
    assert a.shape == (3, 24, 24) and torch.equal(a, b)
    # FGVC-style train: random crop + flip (differs between calls for some seed); eval is deterministic.
    tr = build_transform("imagefolder", 24, mean, std, train=True)
    torch.manual_seed(0)
    outs = [tr(img) for _ in range(8)]
    assert all(o.shape == (3, 24, 24) for o in outs)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    ev = build_transform("imagefolder", 24, mean, std, train=False)
    assert torch.equal(ev(img), ev(img))
    # Normalisation: (x - mean) / std of the image scaled to [0, 1] (at its own size: no resampling).
    import numpy as np
    x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 255
    y = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(build_transform("vtab", 16, mean, std, train=False)(img), y)


# --- bad input -------------------------------------------------------------------------------------
def test_missing_and_empty_data_dir(tmp_path):
    with pytest.raises(DataError, match="no such directory"):
        load_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        load_dataset(tmp_path / "empty")


def test_layout_that_matches_none(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="matches none of the layouts"):
        load_dataset(tmp_path / "d")
    with pytest.raises(DataError, match="--layout must be one of"):
        load_dataset(tmp_path / "d", layout="coco")


def test_ambiguous_layout_asks_for_layout(datasets, tmp_path):
    root = _copy(datasets, "vtab", tmp_path)
    (root / "train.json").write_text(json.dumps({"images/x.png": 0}))
    with pytest.raises(DataError, match="several layouts.*--layout"):
        load_dataset(root)
    assert load_dataset(root, layout="vtab").layout == "vtab"


def test_imagefolder_val_class_missing_from_train(datasets, tmp_path):
    root = _copy(datasets, "imagefolder", tmp_path)
    shutil.copytree(root / "val" / "red", root / "val" / "purple")
    with pytest.raises(DataError, match=r"val: class folder\(s\) \['purple'\] are not in the train split"):
        load_dataset(root)


def test_imagefolder_without_images(tmp_path):
    (tmp_path / "d" / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no class folders with images"):
        load_dataset(tmp_path / "d")


def _relabel(file, line, label):
    """Give line `line` (0-based, -1: the last) of a VTAB list the label `label`; the other lines kept."""
    def edit(root):
        lines = (root / file).read_text().splitlines()
        lines[line] = lines[line].rsplit(" ", 1)[0] + " " + label
        (root / file).write_text("\n".join(lines) + "\n")
    return edit


def _only_line(file, label):
    """Make a VTAB list one line: the train list's first image with the label `label`."""
    def edit(root):
        first = (root / "train800.txt").read_text().splitlines()[0]
        (root / file).write_text(first.rsplit(" ", 1)[0] + " " + label + "\n")
    return edit


VTAB_BAD_LABELS = {        # case: (the edit of the lists, the error's message, named with file and line)
    "train-label-past-the-classes": (_relabel("train800.txt", -1, "7"), r"train800.txt:12: label 7 is out of range"),
    "negative": (_only_line("val200.txt", "-1"), r"val200.txt:1: label -1 is out of range"),
    "not-an-integer": (_only_line("val200.txt", "cat"), r"val200.txt:1: label must be an integer"),
    "class-the-train-split-lacks": (_only_line("val200.txt", "4"),
                                    r"val200.txt:1: label 4 is a class the train split lacks"),
}


@pytest.mark.parametrize("case", list(VTAB_BAD_LABELS))
def test_vtab_bad_label_is_named_with_file_and_line(datasets, tmp_path, case):
    edit, message = VTAB_BAD_LABELS[case]
    root = _copy(datasets, "vtab", tmp_path)
    edit(root)
    with pytest.raises(DataError, match=message):
        load_dataset(root)


def test_fgvc_unknown_class_and_bad_label(datasets, tmp_path):
    root = _copy(datasets, "fgvc", tmp_path)
    val = json.loads((root / "val.json").read_text())
    first = next(iter(val))
    (root / "val.json").write_text(json.dumps({**val, first: 9}))
    with pytest.raises(DataError, match=r"val.json: label\(s\) \[9\] are classes the train split lacks"):
        load_dataset(root)
    (root / "val.json").write_text(json.dumps({**val, first: "bird"}))
    with pytest.raises(DataError, match=r"val.json: label 'bird' .* is out of range"):
        load_dataset(root)


def test_listed_image_missing_is_named(datasets, tmp_path):
    root = _copy(datasets, "vtab", tmp_path)
    victim = load_dataset(root).splits["val"][3][0]
    (tmp_path / "vtab" / victim.split("vtab/", 1)[1]).unlink()
    with pytest.raises(DataError, match="do not exist, e.g. .*" + victim.rsplit("/", 1)[1]):
        load_dataset(root)


def test_unreadable_image_is_named(datasets, tmp_path):
    root = _copy(datasets, "imagefolder", tmp_path)
    spec = load_dataset(root)
    path = spec.splits["train"][5][0]
    with open(path, "wb") as f:
        f.write(b"this is not a png")
    ds = ImageDataset(spec.splits["train"], build_transform("imagefolder", 16, (0.5,) * 3, (0.5,) * 3, False))
    ds[4]                                                   # its neighbours still load
    with pytest.raises(DataError, match="cannot read image " + path):
        ds[5]


def test_vtab_train_split_lacking_a_label_names_it(datasets, tmp_path):
    root = _copy(datasets, "vtab", tmp_path)
    lines = (root / "train800.txt").read_text().splitlines()
    (root / "train800.txt").write_text("".join(f"{line}\n" for line in lines if not line.endswith(" 1")))
    with pytest.raises(DataError, match=r"train800.txt has no image of label\(s\) \[1\], yet its labels go up to 3"):
        load_dataset(root)


@pytest.mark.parametrize("layout, name", [("vtab", "train800.txt"), ("fgvc", "train.json")])
def test_list_file_with_a_byte_order_mark_is_read(datasets, tmp_path, layout, name):
    root = _copy(datasets, layout, tmp_path)
    expected = load_dataset(root).splits["train"]
    (root / name).write_bytes(b"\xef\xbb\xbf" + (root / name).read_bytes())
    assert load_dataset(root).splits["train"] == expected


@pytest.mark.parametrize("layout, name", [("vtab", "val200.txt"), ("fgvc", "val.json")])
def test_list_file_that_is_not_utf8_is_named(datasets, tmp_path, layout, name):
    root = _copy(datasets, layout, tmp_path)
    text = (root / name).read_bytes()
    cut = text.index(b"\n") + 5 if layout == "vtab" else 5
    (root / name).write_bytes(text[:cut] + b"\xe9" + text[cut:])
    line = 2 if layout == "vtab" else 1
    with pytest.raises(DataError, match=rf"{name}:{line}: not UTF-8 text \(byte 0xe9 at offset {cut}\)"):
        load_dataset(root)


def test_fgvc_one_missing_image_is_named_under_its_folder(datasets, tmp_path):
    root = _copy(datasets, "fgvc", tmp_path)
    first = next(iter(json.loads((root / "train.json").read_text())))
    (root / "images" / first).unlink()                     # the very image the folder used to be guessed from
    with pytest.raises(DataError, match=rf"{root / 'images'}: 1 of the 12 image file\(s\) of split 'train' do not "
                                        rf"exist, e.g. {root / 'images' / first}"):
        load_dataset(root)


def test_fgvc_with_only_a_test_list_reads_it_given_the_classes(datasets, tmp_path):
    root = _copy(datasets, "fgvc", tmp_path)
    classes = load_dataset(root).classes
    for name in ("train.json", "val.json"):
        (root / name).unlink()
    spec = load_dataset(root, "fgvc", classes=classes, splits=["test"])
    assert list(spec.splits) == ["test"] and len(spec.splits["test"]) == 8
    assert all(path.startswith(str(root / "images")) for path, _ in spec.splits["test"])


def test_only_the_splits_asked_for_are_read(datasets, tmp_path):
    root = _copy(datasets, "imagefolder", tmp_path)
    shutil.copytree(root / "train" / "red", root / "train" / "purple")      # a class val and test lack
    classes = sorted(CLASSES)
    with pytest.raises(DataError, match="purple"):
        load_dataset(root, classes=classes)
    spec = load_dataset(root, classes=classes, splits=["val"])
    assert list(spec.splits) == ["val"] and len(spec.splits["val"]) == 8


# --- image files ---------------------------------------------------------------------------------------
def _ramp(dtype, top):
    import numpy as np
    return np.linspace(0, top, 16 * 16).reshape(16, 16).astype(dtype)


@pytest.mark.parametrize("name, dtype", [("g16.png", "uint16"), ("g16.tif", "uint16"), ("i32.tif", "int32")])
def test_16bit_images_are_scaled_not_clipped(tmp_path, name, dtype):
    import numpy as np
    from PIL import Image

    from lspt_kernels.data import open_image
    ramp = _ramp(dtype, 65472)
    Image.fromarray(ramp).save(tmp_path / name)
    rgb = np.asarray(open_image(tmp_path / name))
    assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8
    expected = np.rint(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert (rgb == expected[..., None]).all()
    assert len(np.unique(rgb)) > 200                      # convert("RGB") left 5 values, 99.6% at 255


def test_image_dataset_opens_16bit_images_like_8bit_ones(tmp_path):
    import numpy as np
    from PIL import Image
    eight = _ramp("uint8", 255)
    Image.fromarray(eight).save(tmp_path / "g8.png")
    Image.fromarray(eight.astype(np.uint16) * 257).save(tmp_path / "g16.png")     # the same image in 16 bits
    transform = build_transform("vtab", 16, (0.5,) * 3, (0.5,) * 3, train=False)
    ds = ImageDataset([(str(tmp_path / "g8.png"), 0), (str(tmp_path / "g16.png"), 0)], transform)
    assert torch.equal(ds[0][0], ds[1][0])


@pytest.mark.parametrize("values, pattern", [
    (_ramp("float32", 1.0), r"it has floating-point pixels \(PIL mode F\)"),
    (_ramp("int32", 70000), r"its I pixels go from 0 to 70000, outside the 16-bit range"),
])
def test_images_without_a_defined_range_are_refused(tmp_path, values, pattern):
    from PIL import Image

    from lspt_kernels.data import open_image
    Image.fromarray(values).save(tmp_path / "x.tif")
    with pytest.raises(DataError, match=rf"cannot read image {tmp_path / 'x.tif'}: {pattern}"):
        open_image(tmp_path / "x.tif")
