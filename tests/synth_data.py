"""A small synthetic image-classification dataset for the training tests (PNG files via PIL).

Four classes told apart by colour and texture (red plain, green vertical stripes, blue checkerboard, yellow
horizontal stripes), each image with its own brightness jitter, offset and pixel noise, so a tiny random
ViT with tuned prompts can separate them but not by memorising one image. Written in the three layouts of
lspt_kernels.data (imagefolder, vtab, fgvc).

    python tests/synth_data.py DIR [--size 224] [--per-class 16] [--layout imagefolder]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

CLASSES = ("red", "green", "blue", "yellow")
_COLOURS = np.array([[200, 40, 40], [40, 180, 60], [50, 70, 210], [210, 200, 40]], dtype=np.float32)


def make_image(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    period = max(2, size // 8)
    off = rng.integers(0, period)
    if label == 0:
        pattern = np.ones((size, size))
    elif label == 1:
        pattern = ((xx + off) // (period // 2 or 1)) % 2
    elif label == 2:
        pattern = (((xx + off) // period) + ((yy + off) // period)) % 2
    else:
        pattern = ((yy + off) // (period // 2 or 1)) % 2
    base = _COLOURS[label] * rng.uniform(0.7, 1.1)
    img = pattern[..., None] * base + (1 - pattern[..., None]) * base * 0.35
    img = img + rng.normal(0, 18, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_dataset(root, layout: str = "imagefolder", size: int = 32, per_class: dict | int = None,
                  seed: int = 0) -> Path:
    """Write the dataset; per_class: images per class for each split (default train 12, val 6, test 6)."""
    from PIL import Image
    root = Path(root)
    counts = {"train": 12, "val": 6, "test": 6}
    if isinstance(per_class, int):
        counts = {s: per_class for s in counts}
    elif per_class:
        counts.update(per_class)
    rng = np.random.default_rng(seed)
    lists: dict[str, list[tuple[str, int]]] = {s: [] for s in counts}
    for split, n in counts.items():
        for label, name in enumerate(CLASSES):
            for i in range(n):
                rel = (f"{split}/{name}/{i:03d}.png" if layout == "imagefolder"
                       else f"images/{split}_{name}_{i:03d}.png")
                path = root / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(make_image(label, size, rng)).save(path)
                lists[split].append((rel, label))
    if layout == "vtab":
        names = {"train": "train800.txt", "val": "val200.txt", "test": "test.txt"}
        for split, rows in lists.items():
            (root / names[split]).write_text("".join(f"{rel} {lab}\n" for rel, lab in rows))
        (root / "train800val200.txt").write_text(
            "".join(f"{rel} {lab}\n" for rel, lab in lists["train"] + lists["val"]))
    elif layout == "fgvc":
        # Official FGVC json files map paths relative to the image folder (here images/) to labels,
        # and some datasets number their classes from 1.
        for split, rows in lists.items():
            (root / f"{split}.json").write_text(json.dumps({rel[len("images/"):]: lab + 1 for rel, lab in rows}))
    elif layout != "imagefolder":
        raise ValueError(f"layout must be imagefolder, vtab or fgvc, got {layout!r}")
    return root


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--per-class", type=int, default=None)
    p.add_argument("--layout", default="imagefolder")
    a = p.parse_args()
    print(write_dataset(a.root, a.layout, a.size, a.per_class))
    sys.exit(0)
