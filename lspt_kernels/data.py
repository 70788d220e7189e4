"""Datasets for `lspt-train` / `lspt-eval`: three on-disk layouts, one sample list, the official transforms.

Layouts (detected, or named with --layout):
- "imagefolder": DIR/train/<class>/*.png, DIR/val/<class>/..., optionally DIR/test/<class>/...
- "vtab": the VTAB-1k lists of the VPT/NOAH data preparation: DIR/train800.txt, val200.txt,
  train800val200.txt, test.txt, lines "relative/path label" (label an int in [0, C)), paths relative to DIR.
- "fgvc": the official VPT FGVC layout: DIR/train.json, val.json, test.json mapping a relative image path
  to its label; images under DIR, DIR/images or DIR/Images (CUB / NABirds / Dogs keep them in a subfolder).

Class indices always come from the train split (sorted class names / labels); a val or test label the train
split lacks is an error, never a silently new class. Images are opened lazily; a file that cannot be
decoded raises an error naming it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["LAYOUTS", "DataError", "DatasetSpec", "detect_layout", "load_dataset", "ImageDataset",
           "build_transform", "IMAGENET_MEAN", "IMAGENET_STD"]

LAYOUTS = ("imagefolder", "vtab", "fgvc")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# split name -> list file, per layout. "trainval" is VTAB-1k's final-run training set (train800val200).
VTAB_FILES = {"train": "train800.txt", "val": "val200.txt", "trainval": "train800val200.txt", "test": "test.txt"}
FGVC_FILES = {"train": "train.json", "val": "val.json", "test": "test.json"}


class DataError(ValueError):
    """A dataset on disk that cannot be used as given; the message names the file or folder."""


@dataclass
class DatasetSpec:
    layout: str
    root: Path
    classes: list[str]                                   # index -> class name (from the train split)
    splits: dict[str, list[tuple[str, int]]] = field(default_factory=dict)   # split -> [(path, label)]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def summary(self) -> str:
        counts = ", ".join(f"{s} {len(v)}" for s, v in self.splits.items())
        shown = ", ".join(self.classes[:8]) + (" ..." if len(self.classes) > 8 else "")
        return (f"data: {self.root} (layout {self.layout}): {self.num_classes} classes [{shown}]; "
                f"images per split: {counts}")


def detect_layout(root) -> str:
    root = Path(root)
    if not root.exists():
        raise DataError(f"--data {root}: no such directory")
    if not root.is_dir():
        raise DataError(f"--data {root}: not a directory")
    found = []
    if (root / VTAB_FILES["train"]).is_file() or (root / VTAB_FILES["trainval"]).is_file():
        found.append("vtab")
    if (root / FGVC_FILES["train"]).is_file():
        found.append("fgvc")
    if (root / "train").is_dir():
        found.append("imagefolder")
    if len(found) == 1:
        return found[0]
    if not found:
        entries = sorted(p.name for p in root.iterdir())
        if not entries:
            raise DataError(f"--data {root} is empty")
        raise DataError(
            f"--data {root} matches none of the layouts {LAYOUTS}: expected train/ and val/ class folders "
            f"(imagefolder), {VTAB_FILES['train']} + {VTAB_FILES['val']} (vtab) or {FGVC_FILES['train']} + "
            f"{FGVC_FILES['val']} (fgvc); found {entries[:10]}{' ...' if len(entries) > 10 else ''}")
    raise DataError(f"--data {root} matches several layouts {found}: pass --layout to choose one")


def _check_files(split: str, samples, where) -> None:
    missing = [p for p, _ in samples if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{where}: {len(missing)} image file(s) of split {split!r} do not exist, "
                        f"e.g. {missing[0]}")


def _imagefolder(root: Path, classes: list[str] | None):
    splits: dict[str, list[tuple[str, int]]] = {}
    if not (root / "train").is_dir() and classes is None:
        raise DataError(f"{root}/train: missing (imagefolder layout needs train/ and val/ class folders)")

    def scan(split):
        d = root / split
        out = {}
        for c in sorted(p for p in d.iterdir() if p.is_dir()):
            files = sorted(str(f) for f in c.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if files:
                out[c.name] = files
        if not out:
            raise DataError(f"{d}: no class folders with images ({', '.join(IMAGE_EXTENSIONS)})")
        return out

    if classes is None:
        classes = sorted(scan("train"))
    index = {c: i for i, c in enumerate(classes)}
    for split in ("train", "val", "test"):
        if not (root / split).is_dir():
            continue
        found = scan(split)
        extra = sorted(set(found) - set(index))
        if extra:
            raise DataError(f"{root / split}: class folder(s) {extra[:5]} are not in the train split "
                            f"({len(classes)} classes: {classes[:5]}{' ...' if len(classes) > 5 else ''})")
        splits[split] = [(f, index[c]) for c in sorted(found) for f in found[c]]
    return classes, splits


def _read_vtab_list(path: Path, root: Path):
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise DataError(f"{path}:{n}: expected 'relative/path label', got {line!r}")
        try:
            label = int(parts[1])
        except ValueError:
            raise DataError(f"{path}:{n}: label must be an integer, got {parts[1]!r}") from None
        if label < 0:
            raise DataError(f"{path}:{n}: label {label} is out of range (labels are integers >= 0)")
        out.append((str(root / parts[0].strip()), label, f"{path}:{n}"))
    if not out:
        raise DataError(f"{path} lists no images")
    return out


def _vtab(root: Path, classes: list[str] | None):
    train_key = "train" if (root / VTAB_FILES["train"]).is_file() else "trainval"
    raw = {s: _read_vtab_list(root / f, root) for s, f in VTAB_FILES.items() if (root / f).is_file()}
    if classes is None:
        labels = sorted({lab for _, lab, _ in raw[train_key]})
        num = len(labels)
        bad = [(lab, where) for _, lab, where in raw[train_key] if lab >= num]
        if bad:
            raise DataError(f"{bad[0][1]}: label {bad[0][0]} is out of range: the train split has {num} "
                            f"classes, so labels must be in [0, {num - 1}]")
        classes = [str(i) for i in range(num)]
    num = len(classes)
    splits = {}
    for split, rows in raw.items():
        for _, lab, where in rows:
            if lab >= num:
                raise DataError(f"{where}: label {lab} is a class the train split lacks "
                                f"(train labels are 0..{num - 1})")
        splits[split] = [(p, lab) for p, lab, _ in rows]
    return classes, splits


def _fgvc(root: Path, classes: list[str] | None):
    raw = {}
    for split, name in FGVC_FILES.items():
        path = root / name
        if not path.is_file():
            continue
        try:
            anno = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(anno, dict) or not anno:
            raise DataError(f"{path}: expected a non-empty JSON object {{relative image path: label}}")
        for rel, lab in anno.items():
            if not isinstance(lab, int) or isinstance(lab, bool) or lab < 0:
                raise DataError(f"{path}: label {lab!r} of {rel!r} is out of range (labels are integers >= 0)")
        raw[split] = anno
    # The image folder differs per FGVC dataset in the official code (CUB images/, Dogs Images/, Cars and
    # Flowers the root): take the first candidate that holds the first training image.
    first = next(iter(raw["train"]))
    base = next((b for b in (root, root / "images", root / "Images") if (b / first).is_file()), root)
    if classes is None:
        classes = [str(c) for c in sorted(set(raw["train"].values()))]
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split, anno in raw.items():
        unknown = sorted({lab for lab in anno.values() if str(lab) not in index})
        if unknown:
            raise DataError(f"{root / FGVC_FILES[split]}: label(s) {unknown[:5]} are classes the train split "
                            f"lacks ({len(classes)} train classes)")
        splits[split] = [(str(base / rel), index[str(lab)]) for rel, lab in anno.items()]
    return classes, splits


def load_dataset(root, layout: str | None = None, classes: list[str] | None = None,
                 check_files: bool = True) -> DatasetSpec:
    """Read a dataset's sample lists. `classes` (e.g. from a tuned file) fixes the label order; without it the
    train split defines it. Every listed file is checked to exist (cheap; decoding happens lazily)."""
    root = Path(root)
    if layout is None:
        layout = detect_layout(root)
    elif layout not in LAYOUTS:
        raise DataError(f"--layout must be one of {LAYOUTS}, got {layout!r}")
    elif not root.is_dir():
        raise DataError(f"--data {root}: no such directory")
    if layout == "imagefolder":
        classes, splits = _imagefolder(root, classes)
    elif layout == "vtab":
        if classes is None and not any((root / VTAB_FILES[s]).is_file() for s in ("train", "trainval")):
            raise DataError(f"{root}: vtab layout needs {VTAB_FILES['train']} or {VTAB_FILES['trainval']}")
        classes, splits = _vtab(root, classes)
    else:
        if classes is None and not (root / FGVC_FILES["train"]).is_file():
            raise DataError(f"{root}: fgvc layout needs {FGVC_FILES['train']}")
        classes, splits = _fgvc(root, classes)
    if check_files:
        for split, samples in splits.items():
            _check_files(split, samples, root)
    return DatasetSpec(layout, root, list(classes), splits)


def build_transform(layout: str, img_size: int, mean, std, train: bool):
    """The official VPT transforms (KMnP/vpt src/data/transforms.py): FGVC-style data (imagefolder, fgvc)
    trains on Resize(size*256/224) + RandomCrop + horizontal flip and evaluates on Resize + CenterCrop;
    VTAB-1k resizes to the model size with no augmentation (src/data/datasets/tf_dataset.py)."""
    import torchvision.transforms as T
    norm = [T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))]
    if layout == "vtab":
        return T.Compose([T.Resize((img_size, img_size)), *norm])
    resize = int(round(img_size * 256 / 224))
    if train:
        return T.Compose([T.Resize(resize), T.RandomCrop(img_size), T.RandomHorizontalFlip(0.5), *norm])
    return T.Compose([T.Resize(resize), T.CenterCrop(img_size), *norm])


class ImageDataset(torch.utils.data.Dataset):
    """(path, label) samples -> (image tensor, label); an undecodable file is an error that names it."""

    def __init__(self, samples: list[tuple[str, int]], transform):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image
        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
        except Exception as exc:
            raise DataError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from None
        return self.transform(im), label
