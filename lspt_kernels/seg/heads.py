"""SETR's decode heads on a ViT's patch-token grid: the progressive-upsampling (PUP) main head and the
auxiliary heads, as the official SETR code builds them (fudan-zvg/SETR
mmseg/models/decode_heads/vit_up_head.py, `VisionTransformerUpHead`, with num_conv=4 /
num_upsampe_layer=4 for the main head and num_conv=2 / num_upsampe_layer=2 for the auxiliary ones).

Both heads start with their own LayerNorm (eps 1e-6, trained with the head) over the D channels of
each grid cell. The convolutions keep nn.Conv2d's bias and default init (the official `init_weights`
only touches Linear and LayerNorm layers, and sets LayerNorm to weight 1 / bias 0, which is its
default); every upsampling is bilinear with align_corners=False (the official configs). BatchNorm is
nn.BatchNorm2d (eps 1e-5, momentum 0.1, as mmcv's SyncBN); a data-parallel run converts it with
`torch.nn.SyncBatchNorm.convert_sync_batchnorm`, which keeps the state-dict names.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PUPHead", "AuxHead", "upsample"]


def upsample(x: Tensor, size: tuple[int, int], align_corners: bool = False) -> Tensor:
    """Bilinear resize of (B, C, h, w) to `size`; no work when it already has that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


def _conv_bn_relu(in_channels: int, channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, channels, kernel_size=3, padding=1),
                         nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


class _GridHead(nn.Module):
    """The per-cell LayerNorm every SETR head applies first (official `self.norm`)."""

    def __init__(self, embed_dim: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim, eps=eps)

    def _normed(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.norm.normalized_shape[0]:
            raise ValueError(f"{type(self).__name__} expects a (B, {self.norm.normalized_shape[0]}, h, w) feature "
                             f"grid, got {tuple(x.shape)}")
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class PUPHead(_GridHead):
    """SETR-PUP: LayerNorm, then 4 x [3x3 conv (`channels`), BatchNorm, ReLU] with a x2 bilinear
    upsample after each of the first three, a 1x1 classifier and a final x2: (B, D, h, w) ->
    (B, num_classes, 16h, 16w). The classifier runs at 8x, before the last upsample, as the official
    head does (mmseg's later SETRUPHead upsamples first and classifies at 16x)."""

    def __init__(self, embed_dim: int, num_classes: int, channels: int = 256, align_corners: bool = False,
                 eps: float = 1e-6):
        super().__init__(embed_dim, eps)
        self.align_corners = align_corners
        self.convs = nn.ModuleList(_conv_bn_relu(embed_dim if i == 0 else channels, channels) for i in range(4))
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self._normed(x)
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i < 3:
                x = upsample(x, (2 * x.shape[-2], 2 * x.shape[-1]), self.align_corners)
        x = self.classifier(x)
        return upsample(x, (2 * x.shape[-2], 2 * x.shape[-1]), self.align_corners)


class AuxHead(_GridHead):
    """SETR's auxiliary head: LayerNorm, 3x3 conv (`channels`), BatchNorm, ReLU, x4 bilinear, 1x1
    classifier: (B, D, h, w) -> (B, num_classes, 4h, 4w). The model resizes it to the input, as the
    official head resizes to its img_size."""

    def __init__(self, embed_dim: int, num_classes: int, channels: int = 256, align_corners: bool = False,
                 eps: float = 1e-6):
        super().__init__(embed_dim, eps)
        self.align_corners = align_corners
        self.conv = _conv_bn_relu(embed_dim, channels)
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(self._normed(x))
        x = upsample(x, (4 * x.shape[-2], 4 * x.shape[-1]), self.align_corners)
        return self.classifier(x)
