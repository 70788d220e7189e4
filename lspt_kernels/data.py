"""Datasets for `lspt-train` / `lspt-eval`: three on-disk layouts, one sample list, the official transforms.

Layouts (detected, or named with --layout):
- "imagefolder": DIR/train/<class>/*.png, DIR/val/<class>/..., optionally DIR/test/<class>/...
- "vtab": the VTAB-1k lists of the VPT/NOAH data preparation: DIR/train800.txt, val200.txt,
  train800val200.txt, test.txt, lines "relative/path label" (label an int in [0, C)), paths relative to DIR.
- "fgvc": the official VPT FGVC layout: DIR/train.json, val.json, test.json mapping a relative image path
  to its label; images under DIR, DIR/images or DIR/Images (CUB / NABirds / Dogs keep them in a subfolder).

Class indices always come from the train split (sorted class names / labels); a val or test label the train
split lacks is an error, never a silently new class. Images are opened lazily; a file that cannot be
decoded raises an error naming it. `open_image` is the one place an image file becomes an RGB image: 16-bit
and other integer images are scaled to the 8-bit range, not clipped.

List files are read as UTF-8 (a byte-order mark is skipped); any other encoding is an error naming the file.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["LAYOUTS", "DataError", "DatasetSpec", "detect_layout", "split_names", "load_dataset", "ImageDataset",
           "build_transform", "open_image", "IMAGENET_MEAN", "IMAGENET_STD"]

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
        raise DataError(f"{where}: {len(missing)} of the {len(samples)} image file(s) of split {split!r} do not exist, "
                        f"e.g. {missing[0]}")


def split_names(root, layout: str) -> list[str]:
    """The splits a dataset folder of this layout has (their folders or list files), without reading them."""
    root = Path(root)
    if layout not in LAYOUTS:
        raise DataError(f"--layout must be one of {LAYOUTS}, got {layout!r}")
    if not root.is_dir():
        raise DataError(f"--data {root}: no such directory")
    if layout == "imagefolder":
        return [s for s in ("train", "val", "test") if (root / s).is_dir()]
    files = VTAB_FILES if layout == "vtab" else FGVC_FILES
    return [s for s, name in files.items() if (root / name).is_file()]


def _read_text(path: Path) -> str:
    """A list file's text: UTF-8, a byte-order mark skipped (some editors write one)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start}); "
                        "save the list as UTF-8") from None


def _imagefolder(root: Path, classes: list[str] | None, wanted):
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
        if split not in wanted or not (root / split).is_dir():
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
    for n, line in enumerate(_read_text(path).splitlines(), 1):
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


def _vtab_classes(path: Path, rows) -> list[str]:
    """The classes of a VTAB-1k train list: its labels are the class indices 0..C-1, so each must appear."""
    labels = {lab for _, lab, _ in rows}
    top = max(labels)
    missing = sorted(set(range(top)) - labels)
    if missing:
        where = next(w for _, lab, w in rows if lab == top)
        raise DataError(f"{path} has no image of label(s) {missing[:10]}{' ...' if len(missing) > 10 else ''}, yet "
                        f"its labels go up to {top} ({where}: label {top} is out of range for the {len(labels)} "
                        "classes it has): VTAB labels are the class indices 0..C-1 and every class needs train images")
    return [str(i) for i in range(top + 1)]


def _vtab(root: Path, classes: list[str] | None, wanted):
    train_key = "train" if (root / VTAB_FILES["train"]).is_file() else "trainval"
    raw = {s: _read_vtab_list(root / f, root) for s, f in VTAB_FILES.items()
           if (root / f).is_file() and (s in wanted or (classes is None and s == train_key))}
    if classes is None:
        classes = _vtab_classes(root / VTAB_FILES[train_key], raw[train_key])
    num = len(classes)
    splits = {}
    for split, rows in raw.items():
        if split not in wanted:
            continue
        for _, lab, where in rows:
            if lab >= num:
                raise DataError(f"{where}: label {lab} is a class the train split lacks "
                                f"(train labels are 0..{num - 1})")
        splits[split] = [(p, lab) for p, lab, _ in rows]
    return classes, splits


def _read_fgvc_list(path: Path) -> dict:
    try:
        anno = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(anno, dict) or not anno:
        raise DataError(f"{path}: expected a non-empty JSON object {{relative image path: label}}")
    for rel, lab in anno.items():
        if not isinstance(lab, int) or isinstance(lab, bool) or lab < 0:
            raise DataError(f"{path}: label {lab!r} of {rel!r} is out of range (labels are integers >= 0)")
    return anno


def _fgvc_image_dir(root: Path, anno: dict) -> Path:
    """The folder the listed paths are relative to. It differs per FGVC dataset in the official code (CUB
    images/, Dogs Images/, Cars and Flowers the root): the candidate that holds the most of the first listed
    images (so one missing image does not send every path to the wrong folder)."""
    sample = list(anno)[:100]
    candidates = [b for b in (root, root / "images", root / "Images") if b.is_dir()]
    return max(candidates, key=lambda b: sum((b / rel).is_file() for rel in sample))


def _fgvc(root: Path, classes: list[str] | None, wanted):
    raw = {split: _read_fgvc_list(root / name) for split, name in FGVC_FILES.items()
           if (root / name).is_file() and (split in wanted or (classes is None and split == "train"))}
    if not raw:
        names = [name for split, name in FGVC_FILES.items() if split in wanted]
        raise DataError(f"{root}: fgvc layout needs {' or '.join(names) or FGVC_FILES['train']}")
    base = _fgvc_image_dir(root, raw.get("train") or next(iter(raw.values())))
    if classes is None:
        classes = [str(c) for c in sorted(set(raw["train"].values()))]
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split, anno in raw.items():
        if split not in wanted:
            continue
        unknown = sorted({lab for lab in anno.values() if str(lab) not in index})
        if unknown:
            raise DataError(f"{root / FGVC_FILES[split]}: label(s) {unknown[:5]} are classes the train split "
                            f"lacks ({len(classes)} train classes)")
        splits[split] = [(str(base / rel), index[str(lab)]) for rel, lab in anno.items()]
    return classes, splits, base


def load_dataset(root, layout: str | None = None, classes: list[str] | None = None,
                 check_files: bool = True, splits=None) -> DatasetSpec:
    """Read a dataset's sample lists. `classes` (e.g. from a tuned file) fixes the label order; without it the
    train split defines it. `splits`: the split names to read (default: all there are; lspt-eval reads only
    the one it evaluates, so another split's problems do not stop it). Every listed file is checked to exist
    (cheap; decoding happens lazily)."""
    root = Path(root)
    if layout is None:
        layout = detect_layout(root)
    elif layout not in LAYOUTS:
        raise DataError(f"--layout must be one of {LAYOUTS}, got {layout!r}")
    elif not root.is_dir():
        raise DataError(f"--data {root}: no such directory")
    wanted = set(splits) if splits is not None else {"train", "val", "test", "trainval"}
    images = root
    if layout == "imagefolder":
        classes, found = _imagefolder(root, classes, wanted)
    elif layout == "vtab":
        if classes is None and not any((root / VTAB_FILES[s]).is_file() for s in ("train", "trainval")):
            raise DataError(f"{root}: vtab layout needs {VTAB_FILES['train']} or {VTAB_FILES['trainval']}")
        classes, found = _vtab(root, classes, wanted)
    else:
        if classes is None and not (root / FGVC_FILES["train"]).is_file():
            raise DataError(f"{root}: fgvc layout needs {FGVC_FILES['train']}")
        classes, found, images = _fgvc(root, classes, wanted)
    if check_files:
        for split, samples in found.items():
            _check_files(split, samples, images)
    return DatasetSpec(layout, root, list(classes), found)


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


def _wide_integer_to_8bit(im, path):
    """A 16-bit grey image (PIL mode I;16* or I) as an 8-bit one, value * 255 / 65535 rounded."""
    import numpy as np
    from PIL import Image
    a = np.asarray(im)
    if a.size and (a.min() < 0 or a.max() > 65535):
        raise DataError(f"cannot read image {path}: its {im.mode} pixels go from {a.min()} to {a.max()}, outside "
                        "the 16-bit range 0..65535; save it as an 8- or 16-bit image")
    return Image.fromarray(np.rint(a.astype(np.float64) * (255 / 65535)).astype(np.uint8))


def open_image(path):
    """The one place an image file is opened: an RGB PIL image (8 bits per channel), decoded now.

    PIL converts palette, grey, alpha and CMYK images (and reads 16-bit colour PNGs as 8-bit RGB itself). A
    16-bit grey image (PIL mode I;16*, or I, as PIL reads some 16-bit files) is scaled by 255 / 65535, where
    `convert("RGB")` would clip it at 255; float pixels (mode F), whose range no file states, are refused. A
    file that cannot be read is a DataError naming it."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode == "I" or im.mode.startswith("I;16"):
                im = _wide_integer_to_8bit(im, path)
            elif im.mode == "F":
                raise DataError(f"cannot read image {path}: it has floating-point pixels (PIL mode F), whose range "
                                "is not defined; save it as an 8- or 16-bit image")
            return im.convert("RGB")
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from None


class ImageDataset(torch.utils.data.Dataset):
    """(path, label) samples -> (image tensor, label); an undecodable file is an error that names it."""

    def __init__(self, samples: list[tuple[str, int]], transform):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return self.transform(open_image(path)), label
