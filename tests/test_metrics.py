"""binary_metrics must equal medpy 0.5.2 (dc, jc, hd95, asd) and define the empty cases."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
from medpy.metric import binary as medpy_binary
from scipy import ndimage

from agcl.common.components import largest_component as largest_connected_component
from agcl.eval.metrics import (
    binary_metrics,
    multiclass_metrics,
)

TOL = 1e-6


def medpy_all(pred, gt, spacing=None) -> dict:
    """The four numbers as the upstream test scripts compute them, one medpy call each."""
    return {
        "dice": medpy_binary.dc(pred, gt),
        "jaccard": medpy_binary.jc(pred, gt),
        "hd95": medpy_binary.hd95(pred, gt, voxelspacing=spacing),
        "asd": medpy_binary.asd(pred, gt, voxelspacing=spacing),
    }


def assert_matches_medpy(pred, gt, spacing=None) -> None:
    ours = binary_metrics(pred, gt, spacing=spacing)
    for name, expected in medpy_all(pred, gt, spacing).items():
        assert ours[name] == pytest.approx(expected, abs=TOL), name


def box(shape, lo, hi) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return mask


def ball(shape, center, radius) -> np.ndarray:
    grid = np.indices(shape)
    dist2 = sum((g - c) ** 2 for g, c in zip(grid, center))
    return dist2 <= radius**2


def single_voxel(shape, where) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[where] = True
    return mask


HAND_BUILT = {
    "cube_vs_shifted_cube": (box((12, 12, 10), (2, 2, 2), (7, 7, 6)),
                             box((12, 12, 10), (3, 4, 2), (9, 8, 7))),
    "sphere_vs_smaller_offset_sphere": (ball((16, 16, 16), (8, 8, 8), 5),
                                        ball((16, 16, 16), (7, 9, 8), 3.5)),
    # Touching the array edge: medpy counts the array edge as surface; a crop must not change it.
    "touching_edges_3d": (box((8, 9, 10), (0, 0, 0), (8, 5, 4)),
                          box((8, 9, 10), (0, 3, 0), (5, 9, 10))),
    "filling_whole_array": (np.ones((5, 6, 4), bool), box((5, 6, 4), (1, 1, 1), (4, 5, 3))),
    "one_voxel_each": (single_voxel((6, 7, 8), (1, 2, 3)), single_voxel((6, 7, 8), (4, 6, 0))),
    "one_voxel_inside_cube": (single_voxel((9, 9, 9), (4, 4, 4)),
                              box((9, 9, 9), (2, 2, 2), (7, 7, 7))),
    "two_components_3d": (box((14, 10, 8), (1, 1, 1), (4, 4, 4)) | box((14, 10, 8), (9, 5, 3),
                                                                        (13, 9, 8)),
                          box((14, 10, 8), (2, 1, 1), (11, 7, 6))),
    "disk_vs_square_2d": (ball((20, 17), (9, 8), 6), box((20, 17), (4, 2), (13, 17))),
    "edge_strip_2d": (box((10, 10), (0, 0), (10, 2)), box((10, 10), (0, 0), (3, 10))),
}
SPACINGS = [None, (0.625, 0.625, 2.5), 1.7]


@pytest.mark.parametrize("name", sorted(HAND_BUILT))
@pytest.mark.parametrize("spacing", SPACINGS, ids=["voxels", "anisotropic", "scalar"])
def test_hand_built_masks_equal_medpy(name, spacing):
    pred, gt = HAND_BUILT[name]
    if isinstance(spacing, tuple) and pred.ndim == 2:
        spacing = (0.625, 2.5)
    assert_matches_medpy(pred, gt, spacing)
    assert_matches_medpy(gt, pred, spacing)  # asd is one-way: the swap gives other numbers


def test_hd95_is_one_pooled_percentile_and_asd_is_one_way():
    # A (1, 10) array: the array edge above and below makes every object pixel a surface pixel.
    pred = np.zeros((1, 10), bool)
    gt = np.zeros((1, 10), bool)
    pred[0, 0] = True
    gt[0, 0:4] = True
    # pred->gt distances [0]; gt->pred [0, 1, 2, 3]; pooled sorted [0, 0, 1, 2, 3].
    # Pooled p95: position 0.95 * 4 = 3.8 -> 2 + 0.8 * (3 - 2) = 2.8.
    # Max of the two one-way p95s would be p95([0, 1, 2, 3]) = 2 + 0.85 = 2.85: not what medpy does.
    result = binary_metrics(pred, gt)
    assert result["hd95"] == pytest.approx(2.8, abs=1e-12)
    assert medpy_binary.hd95(pred, gt) == pytest.approx(2.8, abs=1e-12)
    assert result["asd"] == 0.0  # mean of pred->gt only
    assert binary_metrics(gt, pred)["asd"] == pytest.approx(1.5)  # mean of [0, 1, 2, 3]
    assert result["dice"] == pytest.approx(2 * 1 / (1 + 4))
    assert result["jaccard"] == pytest.approx(1 / 4)
    counts = {k: result[k] for k in ("tp", "fp", "fn", "tn", "n_pred", "n_ref")}
    assert counts == {"tp": 1, "fp": 0, "fn": 3, "tn": 6, "n_pred": 1, "n_ref": 4}
    assert result["policy_applied"] is None
    assert not result["empty_pred"] and not result["empty_gt"]


def test_spacing_scales_distances():
    pred = np.zeros((1, 10), bool)
    gt = np.zeros((1, 10), bool)
    pred[0, 0] = True
    gt[0, 0:4] = True
    # Along axis 1 every distance doubles with spacing 2 there.
    assert binary_metrics(pred, gt, spacing=(5.0, 2.0))["hd95"] == pytest.approx(5.6)


@pytest.mark.parametrize(
    "policy, both_empty, one_empty",
    [
        ("metrics_reloaded", (1.0, 1.0, 0.0, 0.0), (0.0, 0.0, math.nan, math.nan)),
        ("reference", (0.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0, 0.0)),
    ],
)
def test_empty_policies(policy, both_empty, one_empty):
    empty = np.zeros((4, 5, 6), bool)
    full = box((4, 5, 6), (1, 1, 1), (3, 3, 3))
    keys = ("dice", "jaccard", "hd95", "asd")

    both = binary_metrics(empty, empty, empty_policy=policy)
    np.testing.assert_equal([both[k] for k in keys], both_empty)
    assert both["empty_pred"] and both["empty_gt"] and both["policy_applied"] == policy

    missed = binary_metrics(empty, full, empty_policy=policy)
    np.testing.assert_equal([missed[k] for k in keys], one_empty)
    assert missed["empty_pred"] and not missed["empty_gt"]
    assert (missed["fn"], missed["n_ref"], missed["tp"]) == (8, 8, 0)

    spurious = binary_metrics(full, empty, empty_policy=policy)
    np.testing.assert_equal([spurious[k] for k in keys], one_empty)
    assert spurious["empty_gt"] and spurious["policy_applied"] == policy
    assert spurious["fp"] == 8


def test_bad_inputs_name_the_problem():
    mask = box((4, 4, 4), (1, 1, 1), (3, 3, 3))
    with pytest.raises(ValueError, match="empty_policy.*'nnunet'.*metrics_reloaded.*reference"):
        binary_metrics(mask, mask, empty_policy="nnunet")
    with pytest.raises(ValueError, match="same shape"):
        binary_metrics(mask, mask[:3])
    label_map = mask.astype(np.uint8) * 2
    label_map[0, 0, 0] = 1
    with pytest.raises(ValueError, match=r"gt: expected a binary mask.*\[0, 1, 2\]"):
        binary_metrics(mask, label_map)
    with pytest.raises(ValueError, match="spacing: expected 3 values"):
        binary_metrics(mask, mask, spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match="spacing: expected positive"):
        binary_metrics(mask, mask, spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="2D or 3D"):
        binary_metrics(mask[0, 0], mask[0, 0])


def test_integer_zero_one_masks_are_accepted():
    pred, gt = HAND_BUILT["cube_vs_shifted_cube"]
    assert binary_metrics(pred.astype(np.uint8), gt.astype(np.int64)) == binary_metrics(pred, gt)


def test_multiclass_metrics_per_class():
    gt = np.zeros((6, 8), np.uint8)
    gt[0:2, 0:4] = 1  # 8 pixels
    gt[3:6, 0:2] = 2  # 6 pixels
    pred = gt.copy()
    pred[0:2, 3] = 0  # class 1: 6 of 8 pixels found
    records = multiclass_metrics(pred, gt, classes=[1, 2, 3])
    assert [r["class"] for r in records] == [1, 2, 3]
    assert records[0]["dice"] == pytest.approx(2 * 6 / (6 + 8))
    assert records[1]["dice"] == 1.0 and records[1]["hd95"] == 0.0
    # Class 3 is absent from both maps: the default policy gives a perfect, flagged score.
    assert records[2]["dice"] == 1.0 and records[2]["policy_applied"] == "metrics_reloaded"
    reference = multiclass_metrics(pred, gt, classes=[3], empty_policy="reference")
    assert reference[0]["dice"] == 0.0
    with pytest.raises(ValueError, match="same shape"):
        multiclass_metrics(pred, gt[:5], classes=[1])


def test_largest_connected_component():
    mask = np.zeros((6, 8), bool)
    mask[0:2, 0:2] = True  # 4 pixels
    mask[4:6, 3:7] = True  # 8 pixels: the largest
    mask[2, 2] = True  # touches the first block only through a corner
    kept = largest_connected_component(mask)
    expected = np.zeros_like(mask)
    expected[4:6, 3:7] = True
    np.testing.assert_array_equal(kept, expected)

    # Diagonal touch: one component of 5 under full connectivity, two under face connectivity.
    mask[4:6, 3:7] = False
    mask[5, 7] = True
    full = largest_connected_component(mask)
    assert full.sum() == 5 and full[2, 2]
    faces = largest_connected_component(mask, connectivity=1)
    assert faces.sum() == 4 and not faces[2, 2]

    empty = np.zeros((3, 3), bool)
    assert not largest_connected_component(empty).any()
    with pytest.raises(ValueError, match="connectivity"):
        largest_connected_component(mask, connectivity=3)


# --- real upstream files -------------------------------------------------------------------

def perturbed(label: np.ndarray) -> np.ndarray:
    """A plausible prediction: the label grown on one side, shrunk elsewhere, and shifted."""
    grown = ndimage.binary_dilation(label, iterations=2)
    grown[:, : label.shape[1] // 2] = ndimage.binary_erosion(label, iterations=1)[
        :, : label.shape[1] // 2
    ]
    return np.roll(grown, (2, -1), axis=(0, 1))


@pytest.mark.parametrize("index", [0, 1])
def test_real_la_cases_equal_medpy(la_mirror_dir, index):
    case = (la_mirror_dir / "test.list").read_text().split()[index]
    path = la_mirror_dir / "2018LA_Seg_Training Set" / case / "mri_norm2.h5"
    with h5py.File(path, "r") as handle:
        gt = handle["label"][:].astype(bool)
    pred = perturbed(gt)
    assert_matches_medpy(pred, gt)
    assert_matches_medpy(pred, gt, spacing=(0.625, 0.625, 2.5))


def test_real_acdc_volume_equal_medpy(acdc_volumes_mirror_dir):
    path = min(acdc_volumes_mirror_dir.glob("patient*_frame*.h5"))
    with h5py.File(path, "r") as handle:
        labels = handle["label"][:]
    pred_labels = np.roll(labels, 3, axis=2)
    pred_labels[:, :, ::7] = 0
    for cls in (1, 2, 3):
        gt, pred = labels == cls, pred_labels == cls
        assert gt.any() and pred.any(), f"{path.name}: class {cls} unexpectedly empty"
        assert_matches_medpy(pred, gt)
        assert_matches_medpy(pred, gt, spacing=(10.0, 1.5, 1.5))
    records = multiclass_metrics(pred_labels, labels, classes=(1, 2, 3))
    assert records[1]["dice"] == pytest.approx(medpy_binary.dc(pred_labels == 2, labels == 2))


def test_every_metric_list_of_the_package_is_read_from_the_one_metric_table():
    import re
    from pathlib import Path

    from agcl.eval import evaluate, metric_table
    from agcl.report import forest, power, published, render, stats, stats_view

    names = metric_table.METRICS
    assert evaluate.METRICS == published.METRICS == names
    assert list(render.METRIC_TITLES) == list(render.BETTER) == list(names)
    assert set(stats.DEFAULT_SMALLEST_EFFECT) == set(names)
    compared = set(metric_table.COMPARED)
    assert set(forest.FOREST_METRICS) == set(stats_view.STATS_METRICS) == compared
    assert set(power.PLANNED_METRICS) == compared
    assert {m for m in names if render.BETTER[m] is min} == metric_table.LOWER_IS_BETTER
    # no module spells a list of metric names of its own
    package = Path(metric_table.__file__).resolve().parents[1]
    spelled = re.compile(r'[\(\[\{]\s*"(dice|jaccard|hd95|asd)"\s*[:,]')
    own = [str(p.relative_to(package)) for p in package.rglob("*.py")
           if p.name not in ("metric_table.py",) and spelled.search(p.read_text())]
    assert own == [], own
