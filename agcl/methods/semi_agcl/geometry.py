"""Semi-AGCL's patch geometry, checked with the config (SemiAGCL.check_recipe) from the crop,
the batch and the hyperparameters alone (no data)."""

from __future__ import annotations

import math

from agcl.methods.semi_agcl.losses import resolve_patch_size

# ---------------------------------------------------------------------------------------------
# Patch geometry, checked with the config (Method.check_recipe), from the crop and batch alone.
# Thresholds:
# - >= 16 patches per image (a 4x4 grid): with fewer, a patch is over 1/16 of the crop and its
#   mean softmax is that of the whole image, mostly background (32-pixel patches on 48x48 crops:
#   1 patch per image, 99-100 % background), so the classes Eq 2-7 contrast never form patches.
# - >= 4 anchors per class per step: the rows of each class in the Eq 3 graph and the keys of
#   each class the step adds to the queue; with 1-2 the nuclear norm cannot see class structure.
# - the queue fills by the time the ramp ends (queue_length / keys per step <= ramp steps): the
#   terms reach full weight on a full queue; at 2 keys a step a 2048-key queue was 5 % full when
#   the ramp of 50 steps ended. With rampup 0 (full weight from step 1) it must fill within the
#   first tenth of the main stage.
MIN_PATCHES_PER_IMAGE = 16
MIN_ANCHORS_PER_CLASS = 4
NO_RAMP_FILL_FRACTION = 0.1


def patch_geometry(hparams: dict, train_cfg: dict, num_classes: int) -> dict:
    """What the geometry promises per main-stage step, from crop, batch and hparams (no data).

    Kept patches: both mixes share one box, the unlabeled region is the box in one mix and its
    complement in the other, so a patch position's two coverages add up to 1: with
    min_patch_coverage <= 0.5 every position is kept in one of the two mixes, i.e. (unlabeled
    images per mix) x (patches per image) per step, wherever the box falls. Above 0.5, only the
    positions no box face crosses are sure (<= 2 grid slabs per axis cross one). The separate
    view keeps every patch of every unlabeled image. Anchors per class assume an even class split
    of the kept patches: the best case (background dominates real crops), so the check refuses
    only what no data could rescue; train_log's anchors_class<k> shows what the data gives.
    """
    crop = list(train_cfg["patch"])
    patch = resolve_patch_size(hparams["contrast_patch"], crop)
    grid = [size // patch for size in crop]
    per_image = math.prod(grid)
    unlabeled = train_cfg["batch_size"] - train_cfg["labeled_batch_size"]
    per_mix = unlabeled // 2
    if hparams["agcl_view"] == "separate":
        kept = unlabeled * per_image
    elif hparams["min_patch_coverage"] <= 0.5:
        kept = per_mix * per_image
    else:
        crossed = sum(2 * per_image // g for g in grid if g)
        kept = per_mix * max(0, per_image - crossed)
    quota = max(1, hparams["n_patches"] // num_classes)  # the sampler's per-class quota
    per_class = min(quota, kept // num_classes)
    keys = per_class * num_classes
    ramp_steps = hparams["rampup"] * hparams["rampup_epoch_iterations"]
    fill_by = ramp_steps if ramp_steps > 0 else \
        max(1, math.ceil(NO_RAMP_FILL_FRACTION * train_cfg["iterations"]))
    fill_steps = math.ceil(hparams["queue_length"] / keys) if keys else math.inf
    return {"patch": patch, "grid": grid, "per_image": per_image, "per_mix": per_mix,
            "kept": kept, "quota": quota, "per_class": per_class, "keys": keys,
            "ramp_steps": ramp_steps, "fill_by": fill_by, "fill_steps": fill_steps}


def _largest_patch(hparams: dict, train_cfg: dict, num_classes: int, ok) -> int | None:
    """The largest patch side whose geometry passes ``ok``, None if not even 1 does."""
    return next((p for p in range(min(train_cfg["patch"]), 0, -1)
                 if ok(patch_geometry({**hparams, "contrast_patch": p}, train_cfg, num_classes))),
                None)


def geometry_problems(hparams: dict, train_cfg: dict, num_classes: int, where: str) -> list[str]:
    """Each geometry threshold the recipe misses, with its numbers and the fix (`where` is the
    config block of the method's hparams, e.g. datasets.acdc.hparams.semi_agcl)."""
    patch = hparams["contrast_patch"]  # a valid value: hparams_for checked it
    crop = list(train_cfg["patch"])
    geo = patch_geometry(hparams, train_cfg, num_classes)
    shown = f"contrast_patch {patch}" + (f" (= {geo['patch']})" if patch == "auto" else "")
    on = f"on a {'x'.join(map(str, crop))} crop"
    problems = []
    if geo["per_image"] < MIN_PATCHES_PER_IMAGE:
        best = _largest_patch(hparams, train_cfg, num_classes,
                              lambda g: g["per_image"] >= MIN_PATCHES_PER_IMAGE)
        fix = f"set {where}.contrast_patch <= {best}" if best else "train on a larger crop"
        n = geo["per_image"]
        problems.append(f"{shown} {on} gives {n} patch{'' if n == 1 else 'es'} per image (needs "
                        f">= {MIN_PATCHES_PER_IMAGE}): {fix}")
    if geo["quota"] < MIN_ANCHORS_PER_CLASS:
        problems.append(f"n_patches {hparams['n_patches']} over {num_classes} classes gives "
                        f"{geo['quota']} anchors per class (needs >= {MIN_ANCHORS_PER_CLASS}): set "
                        f"{where}.n_patches >= {MIN_ANCHORS_PER_CLASS * num_classes}")
    elif geo["per_class"] < MIN_ANCHORS_PER_CLASS and geo["per_image"] >= MIN_PATCHES_PER_IMAGE:
        best = _largest_patch(hparams, train_cfg, num_classes,
                              lambda g: g["per_class"] >= MIN_ANCHORS_PER_CLASS)
        fix = f"set {where}.contrast_patch <= {best}" if best else "use more unlabeled images a step"
        problems.append(
            f"{shown} {on} with {geo['per_mix']} unlabeled image(s) per mix keeps about "
            f"{geo['kept']} patches per step, {geo['per_class']} per class at an even split of "
            f"{num_classes} classes (needs >= {MIN_ANCHORS_PER_CLASS} anchors per class): {fix}")
    if geo["keys"] and geo["per_class"] >= MIN_ANCHORS_PER_CLASS \
            and geo["fill_steps"] > geo["fill_by"]:
        if geo["ramp_steps"]:
            until = (f"the ramp ends at step {geo['ramp_steps']} (rampup {hparams['rampup']} x "
                     f"rampup_epoch_iterations {hparams['rampup_epoch_iterations']})")
        else:
            until = (f"with rampup 0 it must fill within {NO_RAMP_FILL_FRACTION:.0%} of the "
                     f"{train_cfg['iterations']} main-stage iterations ({geo['fill_by']} steps)")
        problems.append(
            f"queue_length {hparams['queue_length']} at {geo['keys']} keys per step (at most) "
            f"fills after {geo['fill_steps']} steps, but {until}: set {where}.queue_length <= "
            f"{geo['keys'] * geo['fill_by']} or a longer ramp")
    return problems
