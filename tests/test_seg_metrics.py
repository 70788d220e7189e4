"""mIoU, pixel accuracy and per-class IoU against a hand computation; the accumulator across batches and
across data-parallel ranks."""
import math
import os
import tempfile

import pytest
import torch

from lspt_kernels.seg.metrics import IoUAccumulator, area_counts

# 5 classes; 255 ignored. Class 3 is predicted but never labelled; class 4 appears nowhere.
LABEL = torch.tensor([[0, 0, 1, 255],
                      [1, 1, 2, 2]])
PRED = torch.tensor([[0, 1, 1, 3],
                     [1, 0, 2, 3]])
# By hand over the 7 labelled pixels (the ignored one, predicted 3, does not count):
#   class 0: labelled 2, predicted 2, intersection 1 -> union 3, IoU 1/3, acc 1/2
#   class 1: labelled 3, predicted 3, intersection 2 -> union 4, IoU 1/2, acc 2/3
#   class 2: labelled 2, predicted 1, intersection 1 -> union 2, IoU 1/2, acc 1/2
#   class 3: labelled 0, predicted 1                 -> union 1, IoU 0   (counted: its union is not empty)
#   class 4: nothing                                 -> union 0, IoU NaN (skipped)
HAND_IOU = [1 / 3, 1 / 2, 1 / 2, 0.0, math.nan]
HAND = dict(mIoU=(1 / 3 + 1 / 2 + 1 / 2 + 0) / 4, aAcc=4 / 7, mAcc=(1 / 2 + 2 / 3 + 1 / 2) / 3)


def _assert_hand(result):
    for key, value in HAND.items():
        assert result[key] == pytest.approx(value, abs=1e-12), key
    for got, want in zip(result["per_class_iou"], HAND_IOU):
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, abs=1e-12)


def test_against_a_hand_computation():
    meter = IoUAccumulator(5)
    meter.update(PRED, LABEL)
    _assert_hand(meter.compute())


def test_area_counts_rows():
    counts = area_counts(PRED, LABEL, 5)
    assert counts.tolist() == [[1, 2, 1, 0, 0], [3, 4, 2, 1, 0], [2, 3, 1, 1, 0], [2, 3, 2, 0, 0]]


def test_batches_add_up_to_the_whole_split():
    """Sums over the split, not means of per-image scores: pixel by pixel in any split of batches."""
    meter = IoUAccumulator(5)
    meter.update(PRED[:1], LABEL[:1])
    meter.update(PRED[1:], LABEL[1:])
    _assert_hand(meter.compute())


def test_everything_ignored_gives_nan():
    meter = IoUAccumulator(3)
    meter.update(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 255))
    result = meter.compute()
    assert math.isnan(result["mIoU"]) and math.isnan(result["aAcc"])


@pytest.mark.parametrize("value", [5, 7, -1])
def test_label_outside_the_classes_is_an_error(value):
    label = LABEL.clone()
    label[0, 0] = value
    with pytest.raises(ValueError, match=rf"label values \[{value}\].*ignore_index 255"):
        IoUAccumulator(5).update(PRED, label)


def test_shapes_and_dtypes_are_checked():
    with pytest.raises(ValueError, match="same shape"):
        IoUAccumulator(5).update(PRED, LABEL[:1])
    with pytest.raises(TypeError, match="integer"):
        IoUAccumulator(5).update(PRED.float(), LABEL)


def _rank(rank, path, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    meter = IoUAccumulator(5)
    meter.update(PRED[rank:rank + 1], LABEL[rank:rank + 1])      # each rank sees one row
    meter.all_reduce()
    torch.save(meter.compute(), f"{out}.{rank}")
    dist.destroy_process_group()


def test_all_reduce_over_two_ranks():
    """Two gloo processes, one row each: after all_reduce every rank has the whole split's metrics."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result")
        torch.multiprocessing.spawn(_rank, args=(os.path.join(tmp, "store"), out), nprocs=2)
        for rank in (0, 1):
            _assert_hand(torch.load(f"{out}.{rank}"))
