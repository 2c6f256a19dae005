"""GlaS object-level F1 / Dice / Hausdorff on hand-built instance maps with hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from agcl.eval import object_metrics as object_metrics_module
from agcl.eval.object_metrics import object_metrics, to_instances


@pytest.fixture(autouse=True, params=["distance_transform", "kd_tree"])
def hausdorff_path(request, monkeypatch):
    """Run every test through both exact ways of measuring object-to-object distances."""
    cost = 0.0 if request.param == "distance_transform" else math.inf
    monkeypatch.setattr(object_metrics_module, "_EDT_PIXEL_COST", cost)


def canvas(shape=(10, 10)) -> np.ndarray:
    return np.zeros(shape, dtype=np.int32)


def two_glands() -> np.ndarray:
    gt = canvas()
    gt[0:4, 0:4] = 1  # A: 16 px
    gt[0:2, 8:10] = 2  # B: 4 px
    return gt


def test_perfect_match():
    gt = two_glands()
    pred = np.where(gt > 0, gt + 10, 0)  # other ids, same objects
    result = object_metrics(pred, gt)
    assert (result["object_f1"], result["object_dice"], result["object_hausdorff"]) == (1, 1, 0)
    assert (result["tp"], result["fp"], result["fn"], result["n_pred"], result["n_gt"]) == (
        2, 0, 0, 2, 2,
    )


def test_missed_gland():
    gt = two_glands()
    pred = np.where(gt == 1, 1, 0)  # finds A only
    result = object_metrics(pred, gt)
    # tp 1, fp 0, fn 1 -> F1 = 2 / (2 + 0 + 1) = 2/3.
    assert (result["tp"], result["fp"], result["fn"]) == (1, 0, 1)
    assert result["object_f1"] == pytest.approx(2 / 3)
    # Dice: pred side A (weight 1) dice 1 -> 1; gt side A 16/20 * 1 + B 4/20 * 0 = 0.8 -> 0.9.
    assert result["object_dice"] == pytest.approx(0.9)
    # Hausdorff: B has no overlap, so it is paired with the nearest prediction, A.
    # H(B, A): A pixel (3,0) is farthest from B, nearest B pixel (1,8): sqrt(2^2 + 8^2) = sqrt(68)
    # (B's farthest pixel from A is (0,9)/(1,9) at 6). Object H = 0.5 * (0 + 4/20 * sqrt(68)).
    assert result["object_hausdorff"] == pytest.approx(0.1 * math.sqrt(68))


def test_false_positive():
    gt = canvas()
    gt[0:4, 0:4] = 1  # A: 16 px
    pred = gt.copy()
    pred[8:10, 8:10] = 2  # C: 4 px, far from everything
    result = object_metrics(pred, gt)
    # tp 1, fp 1, fn 0 -> F1 2/3.
    assert (result["tp"], result["fp"], result["fn"]) == (1, 1, 0)
    assert result["object_f1"] == pytest.approx(2 / 3)
    # Dice: pred side A 16/20 * 1 + C 4/20 * 0 = 0.8; gt side 1 -> 0.9.
    assert result["object_dice"] == pytest.approx(0.9)
    # H(C, A): A pixel (0,0) to C pixel (8,8) = sqrt(128) (C to A at most (9,9)->(3,3) = sqrt(72)).
    # Object H = 0.5 * (4/20 * sqrt(128) + 0).
    assert result["object_hausdorff"] == pytest.approx(0.1 * math.sqrt(128))


def test_split_gland():
    gt = canvas((4, 4))
    gt[:, :] = 1  # one gland filling the image, 16 px (no background pixel at all)
    pred = canvas((4, 4))
    pred[:, 0:3] = 1  # S1: 12 px = 75% of the gland -> TP
    pred[:, 3] = 2  # S2: 4 px = 25% -> FP
    result = object_metrics(pred, gt)
    assert (result["tp"], result["fp"], result["fn"]) == (1, 1, 0)
    assert result["object_f1"] == pytest.approx(2 / 3)
    # Dice(S1, G) = 24/28 = 6/7; Dice(S2, G) = 8/20 = 0.4.
    # pred side 12/16 * 6/7 + 4/16 * 0.4 = 0.742857; gt side (partner S1) 6/7 -> mean 0.8.
    assert result["object_dice"] == pytest.approx(0.8)
    # H(S1, G) = 1 (column 3 to column 2); H(S2, G) = 3 (column 0 to column 3).
    # pred side 0.75 * 1 + 0.25 * 3 = 1.5; gt side 1 -> mean 1.25.
    assert result["object_hausdorff"] == pytest.approx(1.25)


def test_half_overlap_is_not_a_match_but_more_than_half_of_the_gland_is():
    gt = canvas()
    gt[0:4, 0:4] = 1  # 16 px
    half = canvas()
    half[0:4, 0:2] = 1  # exactly 8 px = 50% of the gland: not strictly more -> FP
    result = object_metrics(half, gt)
    assert (result["tp"], result["fp"], result["fn"], result["object_f1"]) == (0, 1, 1, 0.0)
    # The rule looks at the GLAND's area: a prediction much larger than the gland still matches.
    big = canvas()
    big[0:10, 0:10] = 1  # 100 px containing the 16-px gland
    assert object_metrics(big, gt)["tp"] == 1


def test_hausdorff_uses_full_pixel_sets_not_boundaries():
    gt = canvas((7, 7))
    gt[1:6, 1:6] = 1  # filled 5x5 square, 25 px
    pred = gt.copy()
    pred[2:5, 2:5] = 0  # its 16-px outline: same boundary, hollow inside
    result = object_metrics(pred, gt)
    # Centre (3,3) of the gland is 2 px from the outline, so H = 2 (boundary-only would give 0).
    # Dice = 2 * 16 / (16 + 25) = 32/41 on both sides; 16 > 12.5 -> TP.
    assert result["object_hausdorff"] == pytest.approx(2.0)
    assert result["object_dice"] == pytest.approx(32 / 41)
    assert result["object_f1"] == 1.0


@pytest.mark.parametrize(
    "pred_has, gt_has, expected",
    [
        (False, False, (1.0, 1.0, 0.0, 0, 0, 0)),
        (False, True, (0.0, 0.0, math.nan, 0, 0, 2)),
        (True, False, (0.0, 0.0, math.nan, 0, 2, 0)),
    ],
)
def test_empty_images(pred_has, gt_has, expected):
    pred = two_glands() if pred_has else canvas()
    gt = two_glands() if gt_has else canvas()
    result = object_metrics(pred, gt)
    keys = ("object_f1", "object_dice", "object_hausdorff", "tp", "fp", "fn")
    np.testing.assert_equal([result[k] for k in keys], expected)
    assert (result["empty_pred"], result["empty_gt"]) == (not pred_has, not gt_has)


def test_boolean_masks_are_split_into_8_connected_components():
    mask = np.zeros((6, 6), bool)
    mask[0:2, 0:2] = True
    mask[2:4, 2:4] = True  # touches the first square at a corner only -> same object (8-conn.)
    mask[5, 5] = True
    instances = to_instances(mask)
    assert instances.max() == 2 and instances[0, 0] == instances[3, 3]
    assert to_instances(mask, connectivity=1).max() == 3
    result = object_metrics(mask, instances)
    assert (result["n_pred"], result["n_gt"], result["object_f1"]) == (2, 2, 1.0)


def test_bad_inputs_name_the_problem():
    gt = two_glands()
    with pytest.raises(ValueError, match="same shape"):
        object_metrics(gt[:5], gt)
    with pytest.raises(TypeError, match="pred_instances: expected an integer instance map"):
        object_metrics(gt.astype(np.float32), gt)
    with pytest.raises(ValueError, match="gt_instances: instance ids must be >= 0"):
        object_metrics(gt, -gt)
    with pytest.raises(TypeError, match="mask: expected a boolean"):
        to_instances(gt)
