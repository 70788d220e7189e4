"""Semantic segmentation with every method: SETR-PUP heads on a prompt-tuned ViT (the paper's appendix
A.1 protocol on ADE20K). docs/segmentation.md gives the protocol and where each number comes from.

    heads      SETR-PUP main head and auxiliary heads
    model      SegmentationModel (forward, loss, tuned files), load_segmentation_model
    inference  whole-image / sliding-window inference, multi-scale + flip, the test-time resize
    metrics    mIoU, pixel accuracy, per-class IoU over a split (DDP-aware accumulator)
    data       ADE20K and generic layouts, label maps, mmseg's train / test pipelines, the sampler
    engine     SGD with 10x heads, poly schedule, train_step, evaluate
"""
from .data import (
    EvalTransform,
    IterationSampler,
    SegmentationDataset,
    TrainTransform,
    detect_segmentation_layout,
    load_segmentation_dataset,
    write_label_map,
)
from .engine import build_optimizer, evaluate, poly_lr, train_step
from .heads import AuxHead, PUPHead
from .inference import MS_RATIOS, InferenceConfig, inference, slide_inference
from .metrics import IoUAccumulator
from .model import SegmentationModel, default_feature_blocks, load_segmentation_model

__all__ = ["SegmentationModel", "load_segmentation_model", "default_feature_blocks", "PUPHead", "AuxHead",
           "InferenceConfig", "MS_RATIOS", "inference", "slide_inference", "IoUAccumulator",
           "detect_segmentation_layout", "load_segmentation_dataset", "SegmentationDataset", "TrainTransform",
           "EvalTransform", "IterationSampler", "write_label_map", "build_optimizer", "poly_lr", "train_step",
           "evaluate"]
