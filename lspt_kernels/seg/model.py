"""`SegmentationModel`: a prompt-tuned encoder (any method of lspt_kernels.encoders) with SETR-PUP's main
head and auxiliary heads on its patch-token grids, the training loss, and its tuned file.

The grids come from `encoder.forward_intermediates` (patch tokens only; the prompts and prefix tokens
are not in them), so every method's step still runs after every block but the last. The encoder's
classification head is removed: segmentation never uses it, and it is neither trained nor saved.

A tuned file is the encoders' format (safetensors; metadata JSON under "lspt_kernels") holding the
encoder's tuned tensors under "encoder.", and the heads' parameters and BatchNorm statistics under
"decode_head." / "aux_heads."; its metadata has task "segmentation", the method, the encoder's
config() and every head option, so `load_segmentation_model` rebuilds the model around a backbone.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..encoders import TRAINING_ONLY_OPTIONS, PromptEncoder, build_encoder, take_indices
from .heads import AuxHead, PUPHead, upsample

__all__ = ["SegmentationModel", "default_feature_blocks", "load_segmentation_model", "TASK"]

TASK = "segmentation"          # the "task" of a segmentation tuned file's metadata


def default_feature_blocks(depth: int) -> tuple[int, ...]:
    """The paper's blocks 5, 9 and 12 (1-based) of a 12-block ViT, 0-based and scaled to `depth`:
    round(5 d / 12) - 1, round(9 d / 12) - 1, d - 1 -> (4, 8, 11) for ViT-B, (9, 17, 23) for a 24-block ViT.
    A ViT too shallow for three distinct blocks is refused: pass feature_blocks yourself."""
    blocks = tuple(math.floor(f * depth / 12 + 0.5) - 1 for f in (5, 9)) + (depth - 1,)
    if min(blocks) < 0 or len(set(blocks)) != 3:
        raise ValueError(f"a {depth}-block ViT has no three distinct blocks for the default feature_blocks "
                         f"(scaled from (4, 8, 11) of 12 blocks: {blocks}); pass feature_blocks, e.g. "
                         f"({depth - 1},) for the main head alone")
    return blocks


class SegmentationModel(nn.Module):
    """SETR-PUP on a prompt-tuned ViT.

    feature_blocks: 0-based blocks, increasing (negatives count from the end); the main head reads the
    last, one auxiliary head reads each of the others. None: `default_feature_blocks(depth)`.
    aux_weight: the auxiliary losses' weight (> 0 when there are auxiliary heads).
    channels: the heads' conv width (SETR: 256). align_corners: every bilinear resize (SETR: False).
    ignore_index: the label value the loss and the metrics skip. avg_non_ignore: average the
    cross-entropy over the labelled pixels only; False (default) averages over all pixels with ignored
    ones counting 0, as the official code (mmseg 0.x `weight_reduce_loss`) does.

    forward(images) returns the main logits (B, num_classes, H, W) at the input size; in training mode
    (or with aux=True) it returns (main, [aux logits, one per auxiliary head]). An input that is not a
    multiple of the patch size is padded with zeros at the bottom and right, and the logits cropped
    back. The backbone must accept the (padded) input size: build it with img_size=crop size and
    dynamic_img_size=True (docs/segmentation.md).
    """

    def __init__(self, encoder: PromptEncoder, num_classes: int, *, feature_blocks=None, aux_weight: float = 0.4,
                 channels: int = 256, align_corners: bool = False, ignore_index: int = 255,
                 avg_non_ignore: bool = False):
        super().__init__()
        if not isinstance(encoder, PromptEncoder):
            raise TypeError(f"encoder must be a lspt_kernels PromptEncoder (build_encoder / from_timm), "
                            f"got {type(encoder).__name__}")
        for name, value in (("num_classes", num_classes), ("channels", channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int) or 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index must be an int outside the classes [0, {num_classes}), "
                             f"got {ignore_index!r}")
        if feature_blocks is not None and not isinstance(feature_blocks, (list, tuple)):
            raise ValueError(f"feature_blocks must be a list or tuple of block indices, got {feature_blocks!r}")
        blocks = default_feature_blocks(encoder.depth) if feature_blocks is None else \
            take_indices(encoder.depth, feature_blocks)
        if any(b >= a for a, b in zip(blocks[1:], blocks)):
            raise ValueError(f"feature_blocks must be increasing (the main head reads the last), got {blocks}")
        if not isinstance(aux_weight, (int, float)) or isinstance(aux_weight, bool) or not math.isfinite(aux_weight) \
                or aux_weight < 0 or (len(blocks) > 1 and aux_weight == 0):
            raise ValueError(f"aux_weight must be a finite number > 0 (there are {len(blocks) - 1} auxiliary heads; "
                             f"pass feature_blocks=({blocks[-1]},) for none), got {aux_weight!r}")
        self.encoder = encoder
        encoder.head = nn.Identity()
        D = encoder.embed_dim
        self.num_classes, self.feature_blocks, self.aux_weight = num_classes, tuple(blocks), float(aux_weight)
        self.ignore_index, self.align_corners, self.avg_non_ignore = ignore_index, align_corners, avg_non_ignore
        self.channels = channels
        self.decode_head = PUPHead(D, num_classes, channels, align_corners)
        self.aux_heads = nn.ModuleList(AuxHead(D, num_classes, channels, align_corners) for _ in blocks[:-1])

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.encoder.vit.patch_embed.patch_size)

    def set_grad_checkpointing(self, enable: bool = True, *, blocks: int | None = None) -> "SegmentationModel":
        """The encoder's gradient checkpointing (`PromptEncoder.set_grad_checkpointing`)."""
        self.encoder.set_grad_checkpointing(enable, blocks=blocks)
        return self

    # --- forward and loss ---------------------------------------------------------------------------
    def forward(self, images: Tensor, *, aux: bool | None = None):
        if not isinstance(images, Tensor) or images.dim() != 4:
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a (B, C, H, W) tensor, got {got}")
        aux = self.training if aux is None else aux
        H, W = images.shape[-2:]
        ph, pw = self.patch_size
        padded = F.pad(images, (0, -W % pw, 0, -H % ph)) if H % ph or W % pw else images
        size = padded.shape[-2:]
        feats = self.encoder.forward_intermediates(padded, list(self.feature_blocks), stop_early=True,
                                                   intermediates_only=True)

        def at_input(logits: Tensor) -> Tensor:
            return upsample(logits, size, self.align_corners)[..., :H, :W]

        main = at_input(self.decode_head(feats[-1]))
        if not aux:
            return main
        return main, [at_input(head(f)) for head, f in zip(self.aux_heads, feats[:-1])]

    def _cross_entropy(self, logits: Tensor, labels: Tensor) -> Tensor:
        if self.avg_non_ignore:
            return F.cross_entropy(logits.float(), labels, ignore_index=self.ignore_index)
        return F.cross_entropy(logits.float(), labels, ignore_index=self.ignore_index, reduction="none").mean()

    def loss(self, outputs, labels: Tensor) -> Tensor:
        """Cross-entropy of the main logits plus aux_weight times that of each auxiliary head, with
        ignore_index skipped. outputs: forward's result (main logits, or (main, aux list)); labels:
        (B, H, W) integer class indices at the logits' size."""
        main, aux = outputs if isinstance(outputs, tuple) else (outputs, [])
        if not isinstance(labels, Tensor) or labels.dim() != 3 or labels.shape != main.shape[:1] + main.shape[2:]:
            got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"labels must be (B, H, W) = {tuple(main.shape[:1] + main.shape[2:])} like the logits, "
                             f"got {got}")
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor of class indices, got {labels.dtype}")
        labels = labels.long()
        bad = ((labels < 0) | (labels >= self.num_classes)) & (labels != self.ignore_index)
        if bool(bad.any()):
            values = torch.unique(labels[bad])[:5].tolist()
            raise ValueError(f"labels hold values {values} outside the classes [0, {self.num_classes}) that are not "
                             f"the ignore_index {self.ignore_index}")
        total = self._cross_entropy(main, labels)
        for logits in aux:
            total = total + self.aux_weight * self._cross_entropy(logits, labels)
        return total

    # --- tuned files --------------------------------------------------------------------------------
    def heads(self) -> dict[str, nn.Module]:
        """The heads by their state-dict prefix (trained at the heads' learning rate)."""
        return {"decode_head": self.decode_head, "aux_heads": self.aux_heads}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The encoder's tuned parameters and every head parameter (the backbone is frozen)."""
        return [p for p in self.parameters() if p.requires_grad]

    def tuned_state_dict(self) -> dict[str, Tensor]:
        """What a tuned file holds: the encoder's tuned parameters, and the heads' full state (parameters
        and BatchNorm statistics)."""
        sd = {f"encoder.{n}": t for n, t in self.encoder.tuned_state_dict().items()}
        for prefix, module in self.heads().items():
            sd.update({f"{prefix}.{n}": t.detach() for n, t in module.state_dict().items()})
        return sd

    def config(self) -> dict:
        """Everything `load_segmentation_model` needs besides the backbone (JSON-serialisable)."""
        encoder = self.encoder.config()
        return dict(task=TASK, method=encoder.pop("method"), encoder=encoder, num_classes=self.num_classes,
                    feature_blocks=list(self.feature_blocks), aux_weight=self.aux_weight, channels=self.channels,
                    align_corners=self.align_corners, ignore_index=self.ignore_index,
                    avg_non_ignore=self.avg_non_ignore)

    def save_tuned(self, path, extra_metadata: dict | None = None) -> None:
        """Write `tuned_state_dict()` to a safetensors file, `config()` as JSON under "lspt_kernels";
        extra_metadata: more entries (name -> JSON-serialisable value, e.g. a training record). `path`:
        str or os.PathLike, '~' expanded; its directory must exist. Written as the encoders' files are
        (`checkpoints.save_tuned_file`), so a failed write (a full disk) is the OSError of that write."""
        from ..checkpoints import save_tuned_file
        save_tuned_file(self, path, extra_metadata)

    def load_tuned(self, path) -> None:
        """Load a file written by `save_tuned` into this model: its task, method, encoder options and head
        options must match, and every tensor name and shape; nothing is copied until all checks pass."""
        from safetensors.torch import load_file

        from ..checkpoints import as_path, read_tuned_metadata
        path = as_path(path)
        saved, _ = read_tuned_metadata(path)
        diffs = _config_differences(saved, self.config())
        if diffs:
            raise ValueError(f"{path} does not fit this model: " + "; ".join(diffs))
        tensors = load_file(str(path))
        own = self.tuned_state_dict()
        missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        mismatched = [f"{n}: file {tuple(t.shape)} vs model {tuple(own[n].shape)}"
                      for n, t in tensors.items() if n in own and t.shape != own[n].shape]
        if missing or unexpected or mismatched:
            raise ValueError(f"{path} does not fit this model: missing {missing[:8]}, unexpected {unexpected[:8]}, "
                             f"mismatched {mismatched[:8]}")
        targets = {f"encoder.{n}": p for n, p in self.encoder.named_parameters()}
        for prefix, module in self.heads().items():
            targets.update({f"{prefix}.{n}": t for n, t in module.state_dict(keep_vars=True).items()})
        with torch.no_grad():
            for n, t in tensors.items():
                targets[n].copy_(t)


def _config_differences(saved: dict, own: dict) -> list[str]:
    """The options of a saved config() that differ from this model's (training-only encoder options
    excepted, as for the encoders' own files)."""
    if saved.get("task") != TASK:
        return [f"it is a {saved.get('task', 'classification')!r} file, not a {TASK!r} one"]
    diffs = [f"{k}: file {saved.get(k)!r} vs model {v!r}" for k, v in own.items()
             if k != "encoder" and saved.get(k) != v]
    enc_saved, enc_own = saved.get("encoder", {}), own["encoder"]
    diffs += [f"encoder {k}: file {enc_saved.get(k)!r} vs model {enc_own.get(k)!r}"
              for k in sorted(set(enc_saved) | set(enc_own))
              if k not in TRAINING_ONLY_OPTIONS and k != "num_classes" and enc_saved.get(k) != enc_own.get(k)]
    return diffs


def load_segmentation_model(path, vit: nn.Module, **encoder_options) -> SegmentationModel:
    """Rebuild the SegmentationModel of a tuned file around `vit` (a timm ViT with the backbone weights,
    built for the segmentation input size, e.g. img_size=512 and dynamic_img_size=True) and load its
    tensors. encoder_options: run-time encoder options the file does not fix (e.g. backend="eager")."""
    from ..checkpoints import as_path, read_tuned_metadata
    path = as_path(path)
    saved, _ = read_tuned_metadata(path)
    if saved.get("task") != TASK:
        raise ValueError(f"{path} is a {saved.get('task', 'classification')!r} tuned file, not a {TASK!r} one")
    head = {k: saved[k] for k in ("num_classes", "feature_blocks", "aux_weight", "channels", "align_corners",
                                  "ignore_index", "avg_non_ignore") if k in saved}
    if "num_classes" not in head or not isinstance(saved.get("encoder"), dict):
        raise ValueError(f"{path}: its segmentation metadata lacks 'num_classes' or 'encoder'; the file is damaged")
    encoder = build_encoder(saved["method"], vit, **{**saved["encoder"], **encoder_options})
    model = SegmentationModel(encoder, head.pop("num_classes"), **head)
    model.load_tuned(path)
    return model
