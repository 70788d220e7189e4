"""A small synthetic semantic-segmentation dataset for the tests (PNG / JPEG files via PIL).

Each image is a textured background (class 0: grey-brown noise and random stripes) with one to three
shapes drawn on it: a red disc (class 1), a green square (class 2), a blue triangle (class 3), each
with its own size, position, brightness jitter and pixel noise. Written in the two layouts of
lspt_kernels.seg.data:

- "generic": images/{train,val}/NNN.png, annotations/{train,val}/NNN.png holding 0..3, and an
  ignore_index (255) band along the top row of every map;
- "ade20k": ADEChallengeData2016/images/{training,validation}/ADE_*.jpg and annotations/.../ADE_*.png
  in ADE20K's coding: file value 0 is "other" (the top band) and class k is stored as k + 1.

    python tests/synth_seg.py DIR [--layout generic] [--size 32] [--train 24] [--val 8]
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

NUM_CLASSES = 4
_COLOURS = np.array([[210, 40, 40], [40, 190, 60], [50, 70, 220]], dtype=np.float32)


def make_sample(height: int, width: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 RGB image (H, W, 3), int64 label map (H, W) in 0..3)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(70, 130) + np.array([12, 0, -15], np.float32)
    stripes = ((xx + yy * rng.uniform(-1, 1)) // max(2, width // 6)) % 2
    image = base + 25 * stripes[..., None] + rng.normal(0, 12, (height, width, 3))
    label = np.zeros((height, width), np.int64)
    for cls in rng.permutation(3)[:rng.integers(1, 4)] + 1:
        r = rng.uniform(0.18, 0.3) * min(height, width)
        cy, cx = rng.uniform(r, height - r), rng.uniform(r, width - r)
        if cls == 1:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        elif cls == 2:
            mask = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
        else:
            mask = (yy <= cy + r) & (np.abs(xx - cx) <= (yy - (cy - r)) / 2)
        label[mask] = cls
        colour = _COLOURS[cls - 1] * rng.uniform(0.8, 1.1)
        image[mask] = colour + rng.normal(0, 12, (int(mask.sum()), 3))
    return np.clip(image, 0, 255).astype(np.uint8), label


def write_dataset(root, layout: str = "generic", size: int | tuple[int, int] = 32, counts: dict | None = None,
                  seed: int = 0, ignore_rows: int = 1) -> Path:
    """Write the dataset and return the path to pass as --data (the root). size: (H, W) or a square side;
    counts: images per split (default train 24, val 8); ignore_rows: the top rows labelled ignore."""
    from PIL import Image
    if layout not in ("generic", "ade20k"):
        raise ValueError(f"layout must be 'generic' or 'ade20k', got {layout!r}")
    root = Path(root)
    height, width = (size, size) if isinstance(size, int) else size
    counts = {"train": 24, "val": 8, **(counts or {})}
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        for i in range(n):
            image, label = make_sample(height, width, rng)
            if layout == "ade20k":
                folder = {"train": "training", "val": "validation"}[split]
                name = f"ADE_{folder[:5]}_{i:08d}"
                img_path = root / "ADEChallengeData2016" / "images" / folder / f"{name}.jpg"
                ann_path = root / "ADEChallengeData2016" / "annotations" / folder / f"{name}.png"
                label = label + 1
                label[:ignore_rows] = 0
            else:
                img_path = root / "images" / split / f"{i:03d}.png"
                ann_path = root / "annotations" / split / f"{i:03d}.png"
                label[:ignore_rows] = 255
            img_path.parent.mkdir(parents=True, exist_ok=True)
            ann_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(img_path, **({"quality": 95} if layout == "ade20k" else {}))
            Image.fromarray(label.astype(np.uint8), mode="L").save(ann_path)
    return root


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root")
    p.add_argument("--layout", default="generic")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--train", type=int, default=24)
    p.add_argument("--val", type=int, default=8)
    a = p.parse_args()
    print(write_dataset(a.root, a.layout, a.size, {"train": a.train, "val": a.val}))
    sys.exit(0)
