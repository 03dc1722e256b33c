"""ConfusionMatrix against a direct NumPy computation of mmseg's definitions."""
import math

import numpy as np
import pytest
import torch

from denseclip.run.metrics import ConfusionMatrix


def reference(preds, targets, num_classes, ignore=255):
    """mmseg's intersect_and_union summed over images, then total_area_to_metrics, written out in NumPy."""
    inter, area_pred, area_label = (np.zeros(num_classes) for _ in range(3))
    for p, t in zip(preds, targets):
        keep = t != ignore
        p, t = p[keep], t[keep]
        inter += np.bincount(p[p == t], minlength=num_classes)
        area_pred += np.bincount(p, minlength=num_classes)
        area_label += np.bincount(t, minlength=num_classes)
    union = area_pred + area_label - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou, acc = inter / union, inter / area_label
    return {"aAcc": inter.sum() / area_label.sum(), "mIoU": np.nanmean(iou), "mAcc": np.nanmean(acc),
            "IoU": iou, "Acc": acc}


def test_matches_numpy_with_ignore_and_absent_classes():
    rng = np.random.default_rng(0)
    k = 7
    preds, targets = [], []
    for shape in [(13, 17), (8, 9, 5), (31,)]:
        t = rng.integers(0, 4, shape)  # classes 4..6 never in the ground truth
        t[rng.random(shape) < 0.2] = 255
        p = rng.choice([0, 1, 2, 3, 5], size=shape)  # class 5 predicted but absent; 4 and 6 absent from both
        p = np.where((rng.random(shape) < 0.5) & (t != 255), t, p)  # half right, so IoUs are not all ~0
        preds.append(p)
        targets.append(t)
    cm = ConfusionMatrix(k)
    for p, t in zip(preds, targets):
        cm.update(torch.from_numpy(p), torch.from_numpy(t))
    got, want = cm.compute(), reference(preds, targets, k)
    for key in ("aAcc", "mIoU", "mAcc"):
        assert got[key] == pytest.approx(want[key], abs=1e-12)
    np.testing.assert_allclose(got["IoU"], want["IoU"], atol=1e-12)  # NaN positions must agree too
    np.testing.assert_allclose(got["Acc"], want["Acc"], atol=1e-12)
    assert got["IoU"][5] == 0.0 and math.isnan(got["Acc"][5])  # predicted, never true: IoU 0, Acc undefined
    assert math.isnan(got["IoU"][4]) and math.isnan(got["IoU"][6])  # absent from both: left out of the means


def test_perfect_and_reset_and_table():
    cm = ConfusionMatrix(3)
    t = torch.tensor([[0, 1, 2], [255, 1, 1]])
    cm.update(t.clamp(max=2), t)  # ignored pixel predicted as class 2: must not count
    res = cm.compute()
    assert res["aAcc"] == res["mIoU"] == res["mAcc"] == 1.0
    table = cm.format_table(["a", "bed ", "c"])
    assert table.splitlines()[2].split() == ["bed", "100.00", "100.00"]  # mmseg's 'bed ' printed stripped
    assert table.splitlines()[-1] == "aAcc 100.00  mIoU 100.00  mAcc 100.00"
    cm.reset()
    assert math.isnan(cm.compute()["mIoU"])


def test_rejects_out_of_range_values():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="target values"):
        cm.update(torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 3, 255]))
    with pytest.raises(ValueError, match="predicted classes"):
        cm.update(torch.tensor([0, 1, 3, 0]), torch.tensor([0, 1, 2, 255]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long))
