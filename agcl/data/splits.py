"""Train / val / test ids and nested labeled subsets per seed.

Seed 0 keeps the upstream order, so its labeled subsets are exactly the references' (the first N
of LA's train.list; all slices of the first N ACDC patients of train.list). Other seeds permute the
labeled pool with a seeded generator. For one seed, the subset of a smaller ratio is always a
prefix of the larger one (nested). The test set is never part of any choice made here.
"""

from __future__ import annotations

import math

import numpy as np

from agcl.common.utils import ratio_tag
from agcl.data.specs import get_spec

# Counts the references use; floor(ratio * N) reproduces them, written down to fail loudly if not.
REFERENCE_COUNTS = {("la", 80, 0.05): 4, ("la", 80, 0.1): 8, ("acdc", 70, 0.05): 3, ("acdc", 70, 0.1): 7}


class SplitError(ValueError):
    pass


def labeled_count(ratio: float, pool_size: int) -> int:
    """floor(ratio x N), at least 1; a tiny epsilon keeps 0.07 x 100 from flooring to 6."""
    if not 0 < ratio <= 1:
        raise SplitError(f"label ratio must be in (0, 1], got {ratio}")
    return max(1, min(pool_size, math.floor(ratio * pool_size + 1e-9)))


def _unique_in_order(values):
    return list(dict.fromkeys(values))


def _unit_of_item(item: str) -> str:
    """The labeling unit of an item where a unit groups several ("patient001_frame01" and its
    slices "patient001_frame01_slice_3" -> "patient001")."""
    return item.split("_")[0]


def make_splits(index: dict, ratios: list[float], seed: int, val_cases: int = 0) -> dict:
    """index: a processed dataset's index.json; returns the JSON-ready split record."""
    dataset = index["dataset"]
    spec = get_spec(dataset)
    lists = index["lists"]
    # What a labeled subset counts (the spec's label_unit); where a unit groups several items
    # (ACDC: both frames of a patient are labeled together) the pool holds the units.
    unit = spec.label_unit
    if spec.unit_items:
        pool = _unique_in_order(_unit_of_item(item) for item in lists["train"])
    else:
        pool = list(lists["train"])
    if spec.val_from == "upstream_list":
        val = list(lists["val"])
        carved = 0
    else:  # train_tail
        # Counts refer to the whole upstream training list (5% of LA = 4 of 80), val carved or not.
        if val_cases >= len(pool):
            raise SplitError(f"{dataset}: val_cases={val_cases} leaves no training case (pool {len(pool)})")
        # Carved from the tail of the upstream order, before any permutation, so every seed and
        # every ratio shares the same val set and it never overlaps a labeled subset.
        val = pool[len(pool) - val_cases:] if val_cases else []
        pool = pool[: len(pool) - val_cases]
        carved = len(val)
    if not pool:
        raise SplitError(f"{dataset}: the training list is empty")

    if seed == 0:
        order, order_note = pool, "upstream list order"
    else:
        perm = np.random.default_rng(seed).permutation(len(pool))
        order, order_note = [pool[i] for i in perm], f"numpy default_rng({seed}).permutation"

    upstream_pool = len(pool) + carved
    labeled = {}
    for ratio in sorted(set(ratios)):
        n = labeled_count(ratio, upstream_pool)
        ref = REFERENCE_COUNTS.get((dataset, upstream_pool, ratio))
        if ref is not None and ref != n:
            raise SplitError(f"{dataset}: {ratio} of {upstream_pool} gives {n}, references use {ref}")
        n = min(n, len(order))
        units = order[:n]
        entry = {"n": n, unit + "s": units}
        if spec.unit_items:  # the items of the chosen units, and their training slices
            chosen = set(units)
            entry[spec.unit_items + "s"] = [f for f in lists["train"] if _unit_of_item(f) in chosen]
            if spec.layout == "slices":
                entry["slices"] = [s for s in index["train_slices"] if _unit_of_item(s) in chosen]
        labeled[ratio_tag(ratio)] = entry

    # Units that group items train on all the listed items, in upstream order; otherwise the
    # train ids are the units in the seed's order.
    train_ids = list(lists["train"]) if spec.unit_items else list(order)
    return {
        "dataset": dataset,
        "seed": seed,
        "unit": unit,
        "order": order_note,
        "labeled_pool": order,
        "count_rule": f"floor(ratio x {upstream_pool} {unit}s), at least 1",
        "train": train_ids,
        "val": val,
        "test": list(lists["test"]),
        "labeled": labeled,
        "val_source": "upstream val.list" if spec.val_from == "upstream_list" else (
            f"last {len(val)} cases of the upstream train order" if val else "none"),
        "restricted": bool(index.get("missing")),
    }
