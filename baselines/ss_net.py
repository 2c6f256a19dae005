"""SS-Net (Wu et al., MICCAI 2022): smoothness by VAT and class separation against a memory.

"Exploring Smoothness and Class-Separation for Semi-supervised Medical Image Segmentation", as
its code trains it: ycwu1997/SS-Net at c0a8bf6,
code/train_ss_3d.py (LA, V-Net) and code/train_ss_2d.py (ACDC, U-Net).

One step, on x = [labeled; unlabeled] (train_ss_3d.py:105-181, train_ss_2d.py:108-170):
- one forward gives the logits and the embedding e (the last decoder map; 3D: after the decoder's
  Dropout3d, "ssnet3d"), p = softmax(logits);
- memory: the labeled voxels predicted correctly as foreground (argmax p = y > 0) are projected
  by the projection head in eval mode, no gradient; per class c with n > 32 such vectors the 32
  of LOWEST selector_c rank (torch.sort ascending) replace memory[c], with 0 < n <= 32 all of
  them do; a class with none keeps its memory (feature_memory.py:16-54); the background never
  enters;
- class separation: every labeled voxel (with its label) and every unlabeled voxel (with its
  pseudo-label argmax p) goes through the projection then the prediction head (train mode), and
  per class with > 1 vector and > 1 memory row: mean of (1 - cos(f, m)) weighted by the rescaled
  sigmoid selector weights of f (detached input) and of m; summed over classes / C
  (contrastive_losses.py:8-69). The memory weights are rescaled over an axis of length 1, so
  they come out 1 (gradients ~0): reproduced as is;
- smoothness: VAT / LDS on the whole batch (losses.py:92-153): target softmax of a no_grad
  forward (BatchNorm running statistics updated), d = unit(U(-0.5, 0.5)) per sample, one power
  iteration d <- unit(grad_d D(softmax f(x + xi d), target)), then D(softmax f(x + eps d),
  target) with BatchNorm running statistics frozen; D is Binary_dice_loss over the whole
  probability tensor (3D) or softDiceLoss averaged over classes (2D);
- loss = Dice + w(t) (LDS + 0.1 (CL_labeled + CL_unlabeled)), w = consistency * sigmoid ramp of
  iter // 150 (LA: iter_num counted after the increment, ACDC before it). CE is logged only.
Dice: 3D Binary_dice_loss of the foreground probability (losses.py:44-48), 2D DiceLoss over all
4 classes (losses.py:6-42, = agcl.methods.dice batch_squared). No EMA; one SGD (lr 0.01,
momentum 0.9, weight decay 1e-4) over the net and every head; LA x0.1 every 2500 iterations, ACDC
constant lr (train_ss_2d.py never changes it).

Where ours differs from upstream, and why:
- The VAT start direction is drawn from the run's "vat_noise" stream on the batch's device;
  upstream draws torch.rand on the CPU's global generator (losses.py:105,138).
- The power iteration takes torch.autograd.grad with respect to d alone; upstream calls
  backward() (which also fills the parameters' gradients) then model.zero_grad(), so the update
  is the same.
- The heads read the net's feature_channels (16 at real width, SS-Net's fixed dim_in = 16).
- softDiceLoss is SS-Net's with n_classes = 4 fixed (losses.py:99); here it averages over the
  dataset's classes (the same on ACDC).
- The memory lives in buffers (memory, memory_count) so that checkpoints resume it; upstream keeps
  numpy arrays on the host.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from agcl.data.specs import DatasetSpec
from agcl.methods import (
    Batch,
    HParam,
    Method,
    TrainedNetwork,
    register_method,
    require_unlabeled,
)
from agcl.methods.dice import dice_batch_squared
from agcl.methods.ramps import epoch_rampup
from agcl.nets.ssnet import SSNetHeads

DICE_FORMS = ("linear", "batch_squared")


def linear_dice_loss(probs: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """1 - (2 sum(p t) + eps) / (sum p + sum t + eps) over every element (losses.py:44-48)."""
    target = target.to(probs.dtype)
    return 1 - (2 * torch.sum(probs * target) + eps) / (torch.sum(probs) + torch.sum(target) + eps)


def class_mean_soft_dice_loss(probs: torch.Tensor, target: torch.Tensor,
                              smooth: float = 1e-10) -> torch.Tensor:
    """Mean over classes of 1 - (2 sum(p t) + s) / (sum p^2 + sum t^2 + s), sums over the batch,
    for soft targets (softDiceLoss, losses.py:50-73), class by class as upstream. The target is
    read in float32, as upstream's target.float() (losses.py:56): a no-op but in float64."""
    target = target.float()
    loss = 0.0
    for c in range(probs.shape[1]):
        p, t = probs[:, c], target[:, c]
        dice = (2 * torch.sum(p * t) + smooth) / (torch.sum(p * p) + torch.sum(t * t) + smooth)
        loss = loss + (1 - dice)
    return loss / probs.shape[1]


def supervised_dice(probs: torch.Tensor, labels: torch.Tensor, form: str) -> torch.Tensor:
    """train_ss_3d.py:159 Binary_dice_loss(p[:, 1], y == 1) ("linear"), train_ss_2d.py:161
    DiceLoss(4)(p, y) ("batch_squared": per class over the batch, smooth 1e-10, background in)."""
    if form == "linear":
        return linear_dice_loss(probs[:, 1], labels == 1)
    return dice_batch_squared(probs, labels)


def vat_distance(probs: torch.Tensor, target: torch.Tensor, form: str) -> torch.Tensor:
    """VAT3d's Binary_dice_loss over the whole (B, C, ...) tensors ("linear", losses.py:131),
    VAT2d's softDiceLoss ("batch_squared", losses.py:99)."""
    if form == "linear":
        return linear_dice_loss(probs, target)
    return class_mean_soft_dice_loss(probs, target)


def unit_per_sample(d: torch.Tensor) -> torch.Tensor:
    """d / (||d_b||_2 + 1e-8) per sample b (_l2_normalize, losses.py:86-90)."""
    norm = torch.linalg.vector_norm(d.flatten(1), dim=1).view(-1, *([1] * (d.ndim - 1)))
    return d / (norm + 1e-8)


@contextlib.contextmanager
def running_stats_frozen(net: nn.Module):
    """Normalisation layers use batch statistics without updating their running ones
    (_disable_tracking_bn_stats, losses.py:75-84)."""
    layers = [m for m in net.modules() if getattr(m, "track_running_stats", False)]
    for layer in layers:
        layer.track_running_stats = False
    try:
        yield
    finally:
        for layer in layers:
            layer.track_running_stats = True


def lds_loss(net: nn.Module, x: torch.Tensor, noise: torch.Tensor, xi: float, epsilon: float,
             power_iterations: int, form: str) -> torch.Tensor:
    """Local distributional smoothness of `net` at x (VAT2d / VAT3d.forward, losses.py:101-153);
    `noise` is the U(0, 1) draw of x's shape the start direction comes from."""
    with torch.no_grad():
        target = torch.softmax(net(x), dim=1)  # in train mode: BatchNorm statistics update
    d = unit_per_sample(noise - 0.5)
    with running_stats_frozen(net):
        for _ in range(power_iterations):
            d.requires_grad_(True)
            distance = vat_distance(torch.softmax(net(x + xi * d), dim=1), target, form)
            (grad,) = torch.autograd.grad(distance, d)
            d = unit_per_sample(grad)
        return vat_distance(torch.softmax(net(x + epsilon * d), dim=1), target, form)


def selector_weights(selector: nn.Module, vectors: torch.Tensor) -> torch.Tensor:
    """sigmoid(selector(v)) (N, 1), rescaled to mean 1 over the N vectors
    (contrastive_losses.py:50,54-55)."""
    weights = torch.sigmoid(selector(vectors))
    return (weights.shape[0] / weights.sum(dim=0)) * weights


def class_separation_loss(heads: SSNetHeads, predicted: torch.Tensor, labels: torch.Tensor,
                          memory: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """contrastive_class_to_class_learned_memory (contrastive_losses.py:8-69): per class c with
    more than one predicted vector and more than one memory row, the mean of (1 - cos) between
    every vector and every memory row, weighted by both selectors; summed, divided by C."""
    num_classes = len(counts)
    loss = predicted.new_zeros(())
    for c in range(num_classes):
        vectors = predicted[labels == c]
        if counts[c] > 1 and vectors.shape[0] > 1:
            rows = F.normalize(memory[c, :counts[c]], dim=1)
            distances = 1 - F.normalize(vectors, dim=1) @ rows.T
            distances = distances * selector_weights(heads.selectors[c], vectors.detach())
            # contrastive_losses.py:60-63 rescales the memory weights after transposing them to
            # (1, N), over the length-1 axis: each weight is divided by itself.
            memory_weights = torch.sigmoid(heads.memory_selectors[c](rows)).T
            memory_weights = (memory_weights.shape[0] / memory_weights.sum(dim=0)) * memory_weights
            loss = loss + (distances * memory_weights).mean()
    return loss / num_classes


@register_method("ss_net")
class SSNet(Method):
    hyperparameters = {
        "dice_form": HParam("linear", "supervised Dice: train_ss_3d.py:92,159 Binary_dice_loss "
                            "on the foreground (linear), train_ss_2d.py:95,161 DiceLoss over all "
                            "classes (batch_squared)", choices=DICE_FORMS),
        "vat_distance": HParam("linear", "VAT distance: VAT3d Binary_dice_loss (linear), VAT2d "
                               "softDiceLoss (batch_squared), losses.py:99,131", choices=DICE_FORMS),
        "consistency": HParam(1.0, "--consistency 1 (train_ss_3d.py:35)", low=0.0),
        "consistency_rampup": HParam(40.0, "--consistency_rampup 40 (train_ss_3d.py:36), in "
                                     "150-iteration epochs", low=0.0),
        "rampup_epoch_iterations": HParam(150, "get_current_consistency_weight(iter_num // 150) "
                                          "(train_ss_3d.py:175, train_ss_2d.py:165)", low=1),
        "rampup_iteration_offset": HParam(1, "iter_num the ramp reads, minus the 0-based step: "
                                          "1 in train_ss_3d.py (incremented first, :163), 0 in "
                                          "train_ss_2d.py (incremented after, :172)",
                                          choices=(0, 1)),
        "contrastive_weight": HParam(0.1, "0.1 * (loss_cl_l + loss_cl_u) (train_ss_3d.py:177, "
                                     "train_ss_2d.py:166)", low=0.0),
        "vat_xi": HParam(10.0, "VAT xi = 10.0, the power-iteration step (losses.py:94,126)",
                         low=0.0),
        "vat_epsilon": HParam(10.0, "VAT epi = --magnitude 10.0 (train_ss_3d.py:37,93)", low=0.0),
        "vat_power_iterations": HParam(1, "VAT ip = 1 (losses.py:94,126)", low=1),
        "memory_per_class": HParam(32, "FeatureMemory(elements_per_class=32) (train_ss_3d.py:76, "
                                   "train_ss_2d.py:90)", low=1),
        "feat_dim": HParam(32, "feat_dim = 32 of the heads (VNet.py:246, unet.py:129)", low=1),
    }
    dataset_defaults = {
        # train_ss_2d.py: --consistency 0.1, --consistency_rampup 200, --magnitude 6.0, DiceLoss
        # and VAT2d, iter_num incremented after the ramp.
        # (CRAG, which no reference trains, takes this 2D recipe too)
        "2d": {"dice_form": "batch_squared", "vat_distance": "batch_squared", "consistency": 0.1,
               "consistency_rampup": 200.0, "rampup_iteration_offset": 0, "vat_epsilon": 6.0},
    }

    @classmethod
    def net_name(cls, spec: DatasetSpec) -> str:
        # net_factory.py: VNet (batchnorm, has_dropout=True) in 3D, UNet in 2D
        return "ssnet3d" if spec.spatial_dims == 3 else "unet"

    @classmethod
    def check_recipe(cls, hparams, train_cfg, spec) -> list[str]:
        if hparams["dice_form"] == "linear" and spec.num_classes != 2:
            return [(f"ss_net dice_form linear (Binary_dice_loss of class 1) needs 2 classes, "
                     f"{spec.name} has {spec.num_classes}: set dice_form batch_squared")]
        return []

    def __init__(self, spec, hparams, net_kwargs, total_iterations):
        super().__init__(spec, hparams, net_kwargs, total_iterations)
        with self.streams.seeded("ssnet_heads"):
            self.heads = SSNetHeads(self.student.feature_channels, spec.num_classes,
                                    hparams["feat_dim"])
        self.register_buffer("memory", torch.zeros(spec.num_classes, hparams["memory_per_class"],
                                                   hparams["feat_dim"]))
        self.register_buffer("memory_count", torch.zeros(spec.num_classes, dtype=torch.long))

    def trained_networks(self) -> list[TrainedNetwork]:
        return [TrainedNetwork("student", self.student), TrainedNetwork("heads", self.heads)]

    @torch.no_grad()
    def update_memory(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """FeatureMemory.add_features_from_sample_learned on the eval-mode projection of the
        correctly predicted labeled voxels (train_ss_3d.py:128-134, feature_memory.py:16-54)."""
        projection = self.heads.projection
        was_training = projection.training
        projection.eval()
        projected = projection(features)
        projection.train(was_training)
        keep = self.hparams["memory_per_class"]
        for c in range(self.spec.num_classes):
            vectors = projected[labels == c]
            count = vectors.shape[0]
            if count == 0:
                continue
            if count > keep:
                rank = torch.sigmoid(self.heads.selectors[c](vectors))
                order = torch.sort(rank[:, 0], dim=0).indices  # ascending, as upstream
                vectors, count = vectors[order[:keep]], keep
            self.memory[c, :count] = vectors.to(self.memory.dtype)
            self.memory_count[c] = count

    def contrast(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Projection, prediction, class separation against the memory (train_ss_3d.py:136-155)."""
        predicted = self.heads.prediction(self.heads.projection(features))
        return class_separation_loss(self.heads, predicted, labels, self.memory,
                                     self.memory_count.tolist())

    def train_step(self, batch: Batch, step: int):
        hp = self.hparams
        x_unlabeled = require_unlabeled(batch, self.name)
        n_labeled = batch.x_labeled.shape[0]
        labels = batch.y_labeled
        x = torch.cat([batch.x_labeled, x_unlabeled])
        logits, embedding = self.student.forward_features(x)  # train_ss_3d.py:109-117
        probs = torch.softmax(logits, dim=1)
        prediction = probs[:n_labeled].max(dim=1).indices
        pseudo_labels = probs[n_labeled:].max(dim=1).indices
        features = embedding.movedim(1, -1)  # (B, *spatial, F), train_ss_3d.py:123,147
        labeled, unlabeled = features[:n_labeled], features[n_labeled:]
        correct = (prediction == labels) & (prediction > 0)  # :119, background left out
        self.update_memory(labeled[correct], labels[correct])
        width = features.shape[-1]
        loss_cl_l = self.contrast(labeled.reshape(-1, width), labels.reshape(-1))
        loss_cl_u = self.contrast(unlabeled.reshape(-1, width), pseudo_labels.reshape(-1))
        loss_dice = supervised_dice(probs[:n_labeled], labels, hp["dice_form"])
        noise = torch.rand(x.shape, generator=self.streams.torch("vat_noise", x.device),
                           device=x.device, dtype=x.dtype)
        loss_lds = lds_loss(self.student, x, noise, hp["vat_xi"], hp["vat_epsilon"],
                            hp["vat_power_iterations"], hp["vat_distance"])
        weight = hp["consistency"] * epoch_rampup(step + hp["rampup_iteration_offset"],
                                                  hp["rampup_epoch_iterations"],
                                                  hp["consistency_rampup"])
        loss = loss_dice + weight * (loss_lds + hp["contrastive_weight"] * (loss_cl_l + loss_cl_u))
        with torch.no_grad():  # logged, never trained on (train_ss_3d.py:157)
            loss_ce = F.cross_entropy(logits[:n_labeled], labels)
        logs = {"loss_dice": loss_dice.detach(), "loss_ce": loss_ce, "loss_lds": loss_lds.detach(),
                "loss_cl_l": loss_cl_l.detach(), "loss_cl_u": loss_cl_u.detach(),
                "cons_weight": weight}
        return loss, logs
