"""Segmentation data: the on-disk layouts, image and label-map reading, mmseg's train and test pipelines,
the dataset, and the sampler of iteration-based training.

Layouts (`detect_segmentation_layout`):
- "ade20k": an `ADEChallengeData2016` folder (or its parent) with images/{training,validation}/*.jpg
  and annotations/{training,validation}/*.png; splits "train" / "val"; 150 classes; label 0 is "other":
  reduce_zero_label maps 0 -> 255 (ignored) and k -> k - 1 (mmseg's ADE20KDataset).
- "generic": images/{train,val}/..., annotations/{train,val}/... PNG label maps (one class index per
  pixel); reduce_zero_label and ignore_index are options; the classes come from `num_classes`, or a
  classes.txt (one name per line) in the root, or else the largest label of the train split.
An image pairs with the annotation of the same relative path and stem (a/b.jpg -> a/b.png).

Pipelines (fudan-zvg/SETR configs/_base_/datasets/ade20k.py, the mmseg 0.x transforms in its
mmseg/datasets/pipelines/transforms.py): train = keep-aspect resize to (2048, 512) times a random ratio in
[0.5, 2.0), random crop 512 at most 75 % one class (10 tries), horizontal flip (p 0.5), photometric
distortion, normalise, pad to the crop (image 0, label ignore_index). Test = the image at its own size,
normalised, and its label map (inference resizes; the metric is taken at the original size).
Every random draw of a sample comes from its own numpy Generator, so a run is reproducible from its seed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data import IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, DataError, open_image
from .inference import as_pair, rescale_size

__all__ = ["ADE20K_CLASSES", "SEG_LAYOUTS", "SegmentationSpec", "detect_segmentation_layout",
           "load_segmentation_dataset", "read_label_map", "write_label_map", "prepare_label", "normalize",
           "TrainTransform", "EvalTransform", "SegmentationDataset", "IterationSampler", "photometric_distortion"]

SEG_LAYOUTS = ("ade20k", "generic")
ADE20K_SPLITS = {"train": "training", "val": "validation"}
GENERIC_SPLITS = ("train", "val", "test")
# The 150 classes of the ADE20K scene-parsing benchmark (objectInfo150), in label order 1..150.
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag")
# PIL modes that hold one class index per pixel ("P": the palette index, not its colour; "1": 0 / 1).
LABEL_MODES = ("L", "P", "1", "I", "I;16", "I;16L", "I;16B")


# --- reading files ------------------------------------------------------------------------------------
def read_label_map(path) -> np.ndarray:
    """A label map as an (H, W) int64 array of class indices: a single-channel PNG (8 or 16 bit) or a
    palette PNG (its indices). A colour (RGB) mask is refused: its colours are not class indices."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode not in LABEL_MODES:
                raise DataError(f"{path} is a {mode} image, not a label map: expected one class index per pixel "
                                f"(a single-channel or palette PNG, PIL modes {', '.join(LABEL_MODES)}); a colour "
                                f"mask must be converted to class indices first")
            return np.asarray(im).astype(np.int64)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot read label map {path}: {type(exc).__name__}: {exc}") from None


def write_label_map(path, label) -> None:
    """Write an (H, W) map of class indices as a single-channel PNG that `read_label_map` reads back: 8-bit
    (mode L) when every value fits, else 16-bit (mode I;16). Values must be in [0, 65535]."""
    from PIL import Image
    label = np.asarray(label)
    if label.ndim != 2 or label.dtype.kind not in "iu":
        raise ValueError(f"a label map must be an (H, W) integer array, got {label.dtype} {label.shape}")
    if label.size and (label.min() < 0 or label.max() > 65535):
        raise ValueError(f"label values must be in [0, 65535] for a PNG, got {label.min()}..{label.max()}")
    if not label.size or label.max() <= 255:
        Image.fromarray(label.astype(np.uint8), mode="L").save(path, format="PNG")
    else:
        Image.fromarray(label.astype(np.uint16)).save(path, format="PNG")


def prepare_label(raw: np.ndarray, num_classes: int, reduce_zero_label: bool, ignore_index: int, where) -> np.ndarray:
    """reduce_zero_label (mmseg's LoadAnnotations): 0 -> ignore_index, k -> k - 1, ignore_index kept; then
    every value must be a class in [0, num_classes) or ignore_index, else a DataError naming `where`."""
    label = raw.astype(np.int64, copy=True)
    if reduce_zero_label:
        ignored = (label == 0) | (label == ignore_index)
        label -= 1
        label[ignored] = ignore_index
    bad = ((label < 0) | (label >= num_classes)) & (label != ignore_index)
    if bad.any():
        values = np.unique(raw[bad])[:5].tolist()
        allowed = (f"in [1, {num_classes}] (file value k is class k - 1 under reduce_zero_label; 0 is ignored)"
                   if reduce_zero_label else f"in [0, {num_classes})")
        raise DataError(f"{where}: label values {values} are not classes: with {num_classes} classes the values "
                        f"must be {allowed} or the ignore_index {ignore_index}")
    return label


# --- layouts ------------------------------------------------------------------------------------------
@dataclass
class SegmentationSpec:
    layout: str
    root: Path
    classes: list[str]
    splits: dict[str, list[tuple[str, str]]] = field(default_factory=dict)    # split -> [(image, label map)]
    reduce_zero_label: bool = False
    ignore_index: int = 255

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def image_dir(self, split: str) -> Path:
        """The folder of a split's images (their paths relative to it name their label maps)."""
        return self.root / "images" / (ADE20K_SPLITS[split] if self.layout == "ade20k" else split)

    def summary(self) -> str:
        counts = ", ".join(f"{s} {len(v)}" for s, v in self.splits.items())
        return (f"data: {self.root} (layout {self.layout}, segmentation): {self.num_classes} classes, "
                f"reduce_zero_label={self.reduce_zero_label}, ignore_index={self.ignore_index}; images per split: "
                f"{counts}")


def detect_segmentation_layout(root) -> tuple[str, Path] | None:
    """("ade20k", the ADEChallengeData2016 folder) | ("generic", root) | None when `root` is neither."""
    root = Path(root)
    for base in (root, root / "ADEChallengeData2016"):
        if all((base / kind / "training").is_dir() for kind in ("images", "annotations")):
            return "ade20k", base
    if all((root / kind / "train").is_dir() for kind in ("images", "annotations")):
        return "generic", root
    return None


def _wanted(split: str, splits) -> bool:
    return splits is None or split in splits


def _pairs(image_dir: Path, label_dir: Path) -> list[tuple[str, str]]:
    """(image, label map) by relative path and stem; an image without its label map is an error."""
    images = sorted(p for p in image_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise DataError(f"{image_dir}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    pairs, seen = [], {}
    for image in images:
        rel = image.relative_to(image_dir).with_suffix("")
        if rel in seen:
            raise DataError(f"{image} and {seen[rel]} have the same name: which one {label_dir / rel}.png labels "
                            "is ambiguous")
        seen[rel] = image
        label = label_dir / rel.with_suffix(".png")
        if not label.is_file():
            raise DataError(f"{image} has no annotation: expected the label map {label}")
        pairs.append((str(image), str(label)))
    return pairs


def _generic_classes(root: Path, train: list[tuple[str, str]], reduce_zero_label: bool, ignore_index: int):
    names = root / "classes.txt"
    if names.is_file():
        classes = [line.strip() for line in names.read_text().splitlines() if line.strip()]
        if not classes:
            raise DataError(f"{names} lists no class names (one per line)")
        return classes
    top = -1
    for _, label in train:
        values = np.unique(read_label_map(label))
        values = values[values != ignore_index]
        if reduce_zero_label:
            values = values[values != 0] - 1
        if values.size:
            top = max(top, int(values.max()))
    if top < 0:
        raise DataError(f"{root}: the train label maps hold no labelled pixel, so the number of classes is unknown; "
                        "pass num_classes")
    return [str(i) for i in range(top + 1)]


def load_segmentation_dataset(root, layout: str | None = None, *, num_classes: int | None = None,
                              reduce_zero_label: bool | None = None, ignore_index: int = 255,
                              splits=None) -> SegmentationSpec:
    """The image / label-map pairs of every split of a segmentation dataset (or only of `splits`, so
    another split's problems do not stop an evaluation). ADE20K fixes 150 classes and reduce_zero_label=True
    (passing other values is an error); the generic layout takes them as options (reduce_zero_label default
    False; without num_classes or a classes.txt, the train split's labels give the classes and it is read)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"--data {root}: no such directory")
    detected = detect_segmentation_layout(root)
    if layout is not None and layout not in SEG_LAYOUTS:
        raise DataError(f"segmentation layout must be one of {SEG_LAYOUTS}, got {layout!r}")
    if detected is None or (layout is not None and detected[0] != layout):
        raise DataError(f"--data {root} is not a {layout or 'segmentation'} dataset: expected "
                        "ADEChallengeData2016/{images,annotations}/{training,validation} (ade20k) or "
                        "{images,annotations}/{train,val} with PNG label maps (generic)")
    layout, base = detected
    if layout == "ade20k":
        if num_classes not in (None, len(ADE20K_CLASSES)) or reduce_zero_label is False:
            raise DataError(f"{base}: ADE20K has {len(ADE20K_CLASSES)} classes and reduce_zero_label=True (label 0 "
                            f"is 'other'), got num_classes={num_classes}, reduce_zero_label={reduce_zero_label}")
        found = {s: _pairs(base / "images" / d, base / "annotations" / d)
                 for s, d in ADE20K_SPLITS.items() if (base / "images" / d).is_dir() and _wanted(s, splits)}
        return SegmentationSpec(layout, base, list(ADE20K_CLASSES), found, True, ignore_index)
    reduce_zero_label = bool(reduce_zero_label)
    counts_classes = num_classes is None and not (base / "classes.txt").is_file()     # from the train labels
    wanted = None if splits is None else {*splits, *(("train",) if counts_classes else ())}
    found = {}
    for split in GENERIC_SPLITS:
        if (base / "images" / split).is_dir() and _wanted(split, wanted):
            if not (base / "annotations" / split).is_dir():
                raise DataError(f"{base / 'images' / split} has no annotation folder {base / 'annotations' / split}")
            found[split] = _pairs(base / "images" / split, base / "annotations" / split)
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise DataError(f"num_classes must be an int >= 1, got {num_classes!r}")
        classes = [str(i) for i in range(num_classes)]
    else:
        classes = _generic_classes(base, found["train"], reduce_zero_label, ignore_index)
    if 0 <= ignore_index < len(classes):
        raise DataError(f"ignore_index {ignore_index} is one of the {len(classes)} classes; choose a value outside "
                        f"[0, {len(classes)}) (255 by convention)")
    return SegmentationSpec(layout, base, classes, found, reduce_zero_label, ignore_index)


# --- transforms ---------------------------------------------------------------------------------------
def _resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W, 3) -> size, bilinear without antialiasing (OpenCV's INTER_LINEAR, as mmcv), rounded."""
    if image.shape[:2] == tuple(size):
        return image
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    x = torch.nn.functional.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    return x[0].permute(1, 2, 0).round_().clamp_(0, 255).to(torch.uint8).numpy()


def _resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest neighbour, source pixel floor(i * in / out) (OpenCV's INTER_NEAREST, as mmcv)."""
    H, W = label.shape
    rows = np.minimum((np.arange(size[0]) * (H / size[0])).astype(np.int64), H - 1)
    cols = np.minimum((np.arange(size[1]) * (W / size[1])).astype(np.int64), W - 1)
    return label[rows[:, None], cols[None, :]]


def _rgb_to_hsv(img: np.ndarray) -> np.ndarray:
    """uint8 RGB -> uint8 HSV as OpenCV's 8-bit conversion: H in [0, 180) (degrees / 2), S and V in [0, 255]."""
    rgb = img.astype(np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(-1)
    diff = v - rgb.min(-1)
    s = np.where(v > 0, 255 * diff / np.maximum(v, 1), 0)
    safe = np.maximum(diff, 1e-12)
    h = np.where(v == r, 30 * (g - b) / safe, np.where(v == g, 60 + 30 * (b - r) / safe, 120 + 30 * (r - g) / safe))
    h = np.where(diff > 0, np.round(h), 0)
    h = np.where(h < 0, h + 180, h)
    return np.stack([h, np.round(s), v], -1).astype(np.uint8)


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    h = hsv[..., 0].astype(np.float32) / 30.0                                 # sector in [0, 6)
    s, v = hsv[..., 1].astype(np.float32) / 255.0, hsv[..., 2].astype(np.float32)
    i = np.floor(h).astype(np.int64) % 6
    f = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = np.zeros(hsv.shape, np.float32)
    for k, channels in enumerate(table):
        sel = i == k
        for c in range(3):
            out[..., c][sel] = channels[c][sel]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _convert(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """mmseg's PhotoMetricDistortion.convert: img * alpha + beta, clipped to [0, 255], truncated to uint8."""
    return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(img: np.ndarray, rng: np.random.Generator, brightness_delta: int = 32,
                           contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5), hue_delta: int = 18) -> np.ndarray:
    """mmseg's PhotoMetricDistortion on a uint8 RGB image, each step with probability 0.5: brightness
    (+ U(-32, 32)); contrast (x U(0.5, 1.5)) first or last (a coin); saturation (x U(0.5, 1.5)) and hue
    (+ an int in [-18, 18), modulo 180) in OpenCV's 8-bit HSV. (Its docstring's channel swap is not in
    its code, so not here either.)"""
    img = _convert(img, beta=rng.uniform(-brightness_delta, brightness_delta)) if rng.integers(2) else img
    contrast_last = rng.integers(2) == 0
    if not contrast_last and rng.integers(2):
        img = _convert(img, alpha=rng.uniform(*contrast_range))
    if rng.integers(2):
        hsv = _rgb_to_hsv(img)
        hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*saturation_range))
        img = _hsv_to_rgb(hsv)
    if rng.integers(2):
        hsv = _rgb_to_hsv(img)
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + rng.integers(-hue_delta, hue_delta)) % 180
        img = _hsv_to_rgb(hsv)
    if contrast_last and rng.integers(2):
        img = _convert(img, alpha=rng.uniform(*contrast_range))
    return img


def normalize(image: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """A uint8 RGB image (H, W, 3) as the float (3, H, W) tensor the model takes: / 255, then (x - mean) / std."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255)
    return x.sub_(torch.tensor(mean).view(3, 1, 1)).div_(torch.tensor(std).view(3, 1, 1))


class TrainTransform:
    """mmseg's ADE20K train pipeline on a uint8 RGB image (H, W, 3) and its prepared label map (H, W):
    Resize (scale x ratio ~ U[ratio_range), keep aspect), RandomCrop (cat_max_ratio, 10 tries), RandomFlip,
    PhotoMetricDistortion, Normalize, Pad to crop_size (image 0, label ignore_index). Returns a float
    (3, h, w) image tensor and an int64 (h, w) label tensor."""

    def __init__(self, crop_size=(512, 512), scale=(2048, 512), ratio_range=(0.5, 2.0), cat_max_ratio: float = 0.75,
                 flip_prob: float = 0.5, photometric: bool = True, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 ignore_index: int = 255):
        self.crop_size, self.scale = as_pair("crop_size", crop_size), as_pair("scale", scale)
        if not (len(ratio_range) == 2 and 0 < ratio_range[0] <= ratio_range[1]):
            raise ValueError(f"ratio_range must be (low, high) with 0 < low <= high, got {ratio_range!r}")
        self.ratio_range, self.cat_max_ratio, self.flip_prob = tuple(ratio_range), cat_max_ratio, flip_prob
        self.photometric, self.mean, self.std, self.ignore_index = photometric, mean, std, ignore_index

    def _crop_box(self, shape, rng):
        margin_h, margin_w = max(shape[0] - self.crop_size[0], 0), max(shape[1] - self.crop_size[1], 0)
        y, x = rng.integers(0, margin_h + 1), rng.integers(0, margin_w + 1)
        return slice(y, y + self.crop_size[0]), slice(x, x + self.crop_size[1])

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        lo, hi = self.ratio_range
        ratio = rng.random() * (hi - lo) + lo
        size = rescale_size(image.shape[0], image.shape[1], self.scale, ratio)
        image, label = _resize_image(image, size), _resize_label(label, size)
        box = self._crop_box(label.shape, rng)
        if self.cat_max_ratio < 1:
            for _ in range(10):
                values, counts = np.unique(label[box], return_counts=True)
                counts = counts[values != self.ignore_index]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                box = self._crop_box(label.shape, rng)
        image, label = image[box], label[box]
        if rng.random() < self.flip_prob:
            image, label = image[:, ::-1], label[:, ::-1]
        if self.photometric:
            image = photometric_distortion(np.ascontiguousarray(image), rng)
        x = normalize(image, self.mean, self.std)
        h, w = label.shape
        ch, cw = max(self.crop_size[0], h), max(self.crop_size[1], w)
        padded = torch.full((ch, cw), self.ignore_index, dtype=torch.int64)
        padded[:h, :w] = torch.from_numpy(np.ascontiguousarray(label))
        return torch.nn.functional.pad(x, (0, cw - w, 0, ch - h)), padded


class EvalTransform:
    """The test pipeline's part before inference: the image normalised at its own size, the label as is."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean, self.std = mean, std

    def __call__(self, image: np.ndarray, label: np.ndarray, rng=None):
        return normalize(image, self.mean, self.std), torch.from_numpy(label)


# --- dataset and sampler ------------------------------------------------------------------------------
class SegmentationDataset(torch.utils.data.Dataset):
    """(image, label map) pairs -> {"image": (3, h, w) float, "label": (h, w) int64, "index": i}.

    Every sample is checked: the label map must have the image's size and hold only classes in
    [0, num_classes) or ignore_index (after reduce_zero_label); each failure is a DataError naming the
    file. A key (i, seed) seeds the sample's random draws (IterationSampler yields such keys); a plain
    index draws its seed from numpy's global generator."""

    def __init__(self, samples: list[tuple[str, str]], transform, num_classes: int, *,
                 reduce_zero_label: bool = False, ignore_index: int = 255):
        self.samples, self.transform, self.num_classes = list(samples), transform, num_classes
        self.reduce_zero_label, self.ignore_index = reduce_zero_label, ignore_index

    @classmethod
    def from_spec(cls, spec: SegmentationSpec, split: str, transform) -> "SegmentationDataset":
        if split not in spec.splits:
            raise DataError(f"{spec.root}: no split {split!r} (found {sorted(spec.splits)})")
        return cls(spec.splits[split], transform, spec.num_classes, reduce_zero_label=spec.reduce_zero_label,
                   ignore_index=spec.ignore_index)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The uint8 RGB image (H, W, 3) and its prepared label map (H, W), both checked."""
        image_path, label_path = self.samples[index]
        image = np.array(open_image(image_path))
        raw = read_label_map(label_path)
        if raw.shape != image.shape[:2]:
            raise DataError(f"{label_path} is {raw.shape[1]}x{raw.shape[0]} (WxH) but its image {image_path} is "
                            f"{image.shape[1]}x{image.shape[0]}: a label map must have its image's size")
        return image, prepare_label(raw, self.num_classes, self.reduce_zero_label, self.ignore_index, label_path)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        image, label = self.load(index)
        rng = np.random.default_rng(list(seed) if seed is not None else int(np.random.randint(2**31)))
        image, label = self.transform(image, label, rng)
        return {"image": image, "label": label, "index": index}


class IterationSampler(torch.utils.data.Sampler):
    """Batches of iteration-based training, for DataLoader(batch_sampler=...): global iteration i takes
    entries [i B, (i + 1) B) of an endless stream of epochs, epoch e a permutation drawn from (seed, e);
    entry k comes with the augmentation seed (seed, k). Rank r of world_size takes its B / world_size
    share of every global batch. Iterations start..total-1, so a resumed run continues the stream exactly."""

    def __init__(self, num_samples: int, batch_size: int, total: int, *, seed: int = 0, start: int = 0,
                 rank: int = 0, world_size: int = 1):
        if num_samples < 1:
            raise ValueError("the dataset is empty")
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be a positive multiple of the {world_size} processes")
        self.num_samples, self.batch_size, self.total, self.seed = num_samples, batch_size, total, seed
        self.start, self.rank, self.world_size = start, rank, world_size
        self._epoch, self._perm = None, None

    def _entry(self, k: int) -> int:
        epoch = k // self.num_samples
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        return int(self._perm[k % self.num_samples])

    def __iter__(self):
        share = self.batch_size // self.world_size
        for it in range(self.start, self.total):
            first = it * self.batch_size + self.rank * share
            yield [(self._entry(k), (self.seed, k)) for k in range(first, first + share)]

    def __len__(self) -> int:
        return max(self.total - self.start, 0)

