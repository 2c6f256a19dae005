"""BCP: bidirectional copy-paste mean teacher (Bai et al., CVPR 2023), as its code trains it
(DeepMed-Lab-ECNU/BCP, code/LA_BCP_train.py and code/ACDC_BCP_train.py).

Two stages, run by the engine:
- pretrain (LA 2000, ACDC 10000 iterations, constant lr 0.01): the labeled half-batches a and b
  are mixed, x = x_a M + x_b (1 - M), with M = 1 outside one random box whose side is
  `mask_ratio` of every axis; LA scores the mixed label as a whole, ACDC scores the two regions
  apart (`pretrain_loss`).
- main (the dataset's recipe, lr schedule restarted): teacher and student start from the weights
  the pre-training stage hands on. The EMA teacher labels the two unlabeled half-batches (LA:
  foreground probability >= 0.5; ACDC: argmax), keeping the largest connected component per
  class and sample. Pair a and pair b are mixed in opposite directions with one box M per step:
      LA   a: x_la M + x_ua (1 - M)      b: x_ub M + x_lb (1 - M)
      ACDC a: x_ua M + x_la (1 - M)      b: x_lb M + x_ub (1 - M)
  and each mix is scored on its two regions apart, ground truth with weight 1 and pseudo-label
  with `u_weight`: mix_loss = (Dice_M w_M + Dice_1-M w_1-M + CE_M w_M + CE_1-M w_1-M) / 2,
  CE averaged over its region; the two mixes' losses are ADDED. EMA 0.99 without warm-up
  (LA over parameters, ACDC over the whole state incl. BatchNorm statistics).
Dice: LA mask_DiceLoss (per sample and class, linear denominator, smooth 1e-5, both classes);
ACDC DiceLoss (per class over the batch, squared denominator, smooth 1e-10, 4 classes).
The upstream consistency ramp is computed but never used, so there is none here.

Where ours differs from upstream, and why:
- The box comes from the run's "box_mask" stream (agcl.runtime.random_streams; one box per step, as
  upstream), so Semi-AGCL, built on BCP, draws the very same boxes at the same seed.
- The pre-trained weights the main stage starts from follow the run's selection policy
  (last, or best on val): upstream LA takes its best checkpoint on the TEST set (BCP #19).
- `separate_forwards: false` runs both mixes (and both teacher halves) as one batch: faster,
  but BatchNorm then sees one batch where upstream sees two.
"""

from __future__ import annotations

from agcl.methods import register_method
from agcl.methods.copy_paste import CopyPasteTeacher


@register_method("bcp")
class BCP(CopyPasteTeacher):
    """BCP: bidirectional copy-paste mean teacher, its pre-training and self-training stages."""
