"""Semi-AGCL: affinity-graph-guided contrastive learning on BCP (agcl/methods/copy_paste.py).

Base (assumed, docs/paper-notes.md "Setup"): the paper's ACDC settings (mask 170x170 of 256, batch
24, 10k + 30k iterations, EMA 0.99) are BCP's defaults, so Semi-AGCL is BCP, stages and all (its
copy-paste pre-training, then self-training with the EMA teacher), plus the AGCL terms below.
Nothing of BCP is repeated here: this class only adds to it. With every AGCL weight 0 it trains
bit-identically to `bcp` (no strong view, no extra random numbers; tested).

AGCL terms on the unlabeled voxels of both copy-paste mixes (Eq 1-7): the teacher sees the weak
view (the sampler's flip/rotate/crop only), the student the strong view (`strong_intensity_view`:
contrast, brightness and noise; intensity-only so voxel positions match across views). With
``agcl_view: mixed`` (the default) the strong view is the unlabeled part of the copy-paste images
themselves, so the student runs once per mix (the paper's cost, 1.33x V-Net, leaves no room for a
second student pass); with ``separate`` the mixes keep BCP's plain images and the student also
runs on whole strong-view unlabeled images. Patch pseudo-labels are the mean softmax over a
patch's unlabeled voxels; patch embeddings are the decoder features averaged over the same voxels,
then the ProjectionHead (the teacher's keys through an EMA copy of the head). ``project_voxels:
true`` projects every voxel first and averages after, the literal reading, at the cost of about
one more forward pass. Anchors are sampled by `losses.select_anchor_patches`; per step of
the main stage:

  L_all = L_BCP + ramp * (w_reg L_reg + w_pl L_PL_AGG + w_rw L_RW_AGG)
  defaults: w_reg 0, w_pl 1, w_rw 0.1 (reasons and measurements at `agcl_hparams`)

L_BCP: BCP's two mix losses, added; L_reg: Eq 4 InfoNCE (queue negatives of other classes), our
reading of the undefined L_reg; L_PL_AGG: Eq 3 on the Eq 2 affinity of teacher vs student patch
pseudo-labels; L_RW_AGG: Eq 7 = Eq 4 plus the Eq 6 mixed hard negatives. ramp = sigmoid ramp-up
over main-stage step // rampup_epoch_iterations (150; the engine counts steps from the start of
the main stage).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from agcl.methods.base import MAIN, HParam, TrainedNetwork
from agcl.methods.copy_paste import CopyPasteTeacher, MixedPair
from agcl.methods.ema import ema_update, make_ema_teacher
from agcl.methods.ramps import epoch_rampup
from agcl.methods.registry import register_method
from agcl.methods.semi_agcl import losses as L
from agcl.methods.semi_agcl.geometry import geometry_problems
from agcl.nets import ProjectionHead

AGCL_VIEWS = ("mixed", "separate")
AGCL_WEIGHTS = ("w_reg", "w_pl", "w_rw")


def agcl_terms_on(hparams: dict) -> bool:
    """Whether any AGCL term has weight (all 0: the method trains exactly as bcp)."""
    return any(hparams[w] > 0 for w in AGCL_WEIGHTS)


def strong_intensity_view(x: torch.Tensor, contrast: float, brightness: float,
                          noise: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per image and channel: mean + c (x - mean) + b std + clip(N(0, noise std), +-2 noise std).

    c ~ U(1 - contrast, 1 + contrast), b ~ U(-brightness, brightness); std of the image itself, so
    the same settings suit z-scored LA and [0, 1] ACDC. Clipped noise as UA-MT's teacher input
    noise. Drawn from `generator` (on x's device; None: the global RNG).
    """
    dims = tuple(range(2, x.ndim))
    mean = x.mean(dims, keepdim=True)
    std = x.std(dims, keepdim=True).clamp_min(1e-6)
    stat_shape = mean.shape
    draw = {"generator": generator, "device": x.device, "dtype": x.dtype}
    c = 1.0 + contrast * (2 * torch.rand(stat_shape, **draw) - 1)
    b = brightness * (2 * torch.rand(stat_shape, **draw) - 1)
    eps = (torch.randn(x.shape, **draw) * noise).clamp(-2 * noise, 2 * noise)
    return mean + c * (x - mean) + (b + eps) * std


@register_method("semi_agcl")
class SemiAGCL(CopyPasteTeacher):
    # Weights and ramp, from the gradient each term sends to the student at weight 1 (benchmarks/
    # agcl_gradients.py; ratios to L_BCP's gradient on LA / ACDC shapes): L_reg and L_RW_AGG
    # ~120x at init and 12x / 1.2x after 20 steps (InfoNCE at tau 0.07 on a fresh queue),
    # L_PL_AGG 0.08-0.18x at init and 0.6x / 1.2x after 20 steps.
    # - w_reg 0: Eq 8's L_reg is undefined in the surviving text; read as Eq 4's InfoNCE it is
    #   already inside L_RW_AGG (Eq 7 = Eq 4's queue negatives plus the Eq 6 mixed ones), so a
    #   non-zero w_reg would count the base InfoNCE twice. Kept as a switch for that reading.
    # - w_rw 0.1: brings the InfoNCE gradient to about 0.1-1.2x BCP's once the ramp is up, so
    #   it acts without drowning the copy-paste supervision (at weight 1 it is 1-12x).
    # - w_pl 1: L_PL_AGG is already 0.1-1x BCP's gradient at weight 1.
    # - rampup: the teacher is BCP's pre-trained net, so the terms need no long warm-up, only the
    #   queue (2048 keys = 32 steps); the ramp ends well inside the first lr phase: LA 7 "epochs"
    #   of 150 steps = 1050 of the 2500 steps at lr 0.01; ACDC/CRAG 20 = 3000 of 30000.
    agcl_hparams = {
        "rampup": HParam(7, "ramp-up length in 'epochs' of rampup_epoch_iterations, from the main "
                         "stage", low=0),
        "rampup_epoch_iterations": HParam(150, "iter_num // 150, as every reference counts its "
                                          "ramps", low=1),
        "w_reg": HParam(0.0, "see above: Eq 4 is inside L_RW_AGG", low=0.0),
        "w_pl": HParam(1.0, "weight of L_PL_AGG (Eq 3)", low=0.0),
        "w_rw": HParam(0.1, "weight of L_RW_AGG (Eq 7)", low=0.0),
        "agcl_view": HParam("mixed", "one student pass per mix, as the paper's 1.33x cost implies",
                            choices=AGCL_VIEWS),
        "strong_contrast": HParam(0.2, "contrast factor in [0.8, 1.2]: mild, keeps anatomy "
                                  "readable", low=0.0),
        "strong_brightness": HParam(0.1, "shift of +-0.1 image std", low=0.0),
        "strong_noise": HParam(0.1, "Gaussian noise 0.1 std clipped at 0.2 (UA-MT's teacher "
                               "noise)", low=0.0),
        # auto: the shortest crop side // 8 (losses.resolve_patch_size): ACDC / CRAG
        # 256x256 -> 32, the paper's 8x8 grid; LA 112x112x80 -> 10, an 11x11x8 grid of 1000-voxel
        # patches (an ACDC patch has 1024 pixels); a 48x48 CPU crop -> 6. Or an int. (Not the
        # training crop, train.patch, nor the evaluation window, eval.patch.)
        "contrast_patch": HParam("auto", "side of the contrastive patches", choices=("auto",),
                                 kind=int, low=1),
        "min_patch_coverage": HParam(0.5, "a patch counts if >= half of its voxels are "
                                     "unlabeled-image", low=0.0, high=1.0),
        "n_patches": HParam(64, "anchors per step, split evenly over classes; 64x64 graph, cheap "
                            "SVD", low=1),
        "patch_similarity": HParam("entropy", "ablation: entropy (paper) | cosine | "
                                   "class_confidence", choices=L.PATCH_SIMILARITIES),
        "kernel": HParam("gk_l2", "ablation: gk_l2 | gk_l1 (paper: GK + L2)", choices=L.KERNELS),
        "sigma": HParam(0.5, "one-hot labels of two classes are sqrt(2) apart -> affinity e^-4 ~ "
                        "0.02", low=0.0),
        "nuclear_weight": HParam(0.1, "Eq 3's gamma: ||A||_* >= Tr(A), < 1 keeps the trace term "
                                 "in charge", low=0.0),
        "nuclear_norm": HParam(True, "ablation: the nuclear-norm term of Eq 3 on / off"),
        "tau": HParam(0.07, "MoCo temperature", low=0.0),
        # 32 steps of 64 keys, well inside the EMA teacher's ~100-step memory (check_recipe
        # refuses a queue that cannot fill before the ramp ends)
        "queue_length": HParam(2048, "negatives kept from past steps", low=1),
        "n_hard_candidates": HParam(32, "hardest allowed queue keys that Eq 6 mixes from "
                                    "(MoCHi's N)", low=1),
        "n_mixed_negatives": HParam(16, "Eq 6 synthetic negatives per anchor (MoCHi's s)", low=1),
        "mix_coefficient": HParam("affinity", "ablation: affinity (A_ii, paper) | half | random",
                                  choices=L.MIX_COEFFICIENTS),
        # The head on patch-mean features (False) instead of on every voxel (True): a per-voxel
        # head at 4x the decoder width costs about one more V-Net forward; the terms use patches.
        "project_voxels": HParam(False, "the head on every voxel, then patch means"),
        "proj_hidden_channels": HParam(None, "None = 4 x decoder feature channels (64 at width "
                                       "16)", kind=int, low=1, nullable=True),
        "proj_dim": HParam(None, "None = 2 x decoder feature channels (32 at width 16)", kind=int,
                           low=1, nullable=True),
    }
    hyperparameters = {**CopyPasteTeacher.hyperparameters, **agcl_hparams}
    dataset_defaults = {
        **CopyPasteTeacher.dataset_defaults,
        "2d": {**CopyPasteTeacher.dataset_defaults["2d"], "rampup": 20},
    }
    # `gamma` collided with the lr decay (train.gamma), `patch_size` with the crop and window.
    renamed_hparams = {"gamma": "nuclear_weight", "patch_size": "contrast_patch"}

    @classmethod
    def check_recipe(cls, hparams, train_cfg, spec) -> list[str]:
        """The patch geometry of this recipe, refused where it cannot give the AGCL terms enough
        patches, anchors or queue keys (thresholds and estimates at `patch_geometry`)."""
        if not agcl_terms_on(hparams):
            return []  # no AGCL term: trains as bcp whatever the geometry
        return geometry_problems(hparams, train_cfg, spec.num_classes,
                                 f"datasets.{spec.name}.hparams.{cls.name}")

    def __init__(self, spec, hparams, net_kwargs, total_iterations):
        super().__init__(spec, hparams, net_kwargs, total_iterations)
        width = self.student.feature_channels
        hidden = hparams["proj_hidden_channels"] or 4 * width
        dim = hparams["proj_dim"] or 2 * width
        # A stream of its own, so the global RNG after construction is BCP's.
        with self.streams.seeded("projection_head"):
            self.head = ProjectionHead(width, hidden, dim, spatial_dims=self.student.spatial_dims)
            queue = F.normalize(torch.randn(hparams["queue_length"], dim), dim=1)
        self.teacher_head = make_ema_teacher(self.head)
        # Buffers, so the queue is checkpointed and a resumed run continues exactly.
        self.register_buffer("queue", queue)
        self.register_buffer("queue_labels", torch.full((hparams["queue_length"],), -1))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @property
    def agcl_active(self) -> bool:
        return agcl_terms_on(self.hparams)

    def trained_networks(self) -> list[TrainedNetwork]:
        networks = [TrainedNetwork("student", self.student)]
        # The projection head is trained only when a contrastive term reads it (an ablation with
        # the AGCL terms off leaves it out, as it gets no gradient)
        return networks + [TrainedNetwork("head", self.head)] if self.agcl_active else networks

    def start_stage(self, name: str, fresh: bool) -> None:
        super().start_stage(name, fresh)
        if name == MAIN and fresh:
            self.teacher_head.load_state_dict(self.head.state_dict())

    def after_optimizer_step(self, step: int) -> None:
        super().after_optimizer_step(step)
        if self.stage == MAIN:
            ema_update(self.teacher_head, self.head, self.hparams["ema_decay"])

    # -----------------------------------------------------------------------------------------
    def student_view(self, x_unlabeled: torch.Tensor) -> torch.Tensor:
        if self.agcl_active and self.hparams["agcl_view"] == "mixed":
            return self._strong(x_unlabeled)
        return x_unlabeled

    def _strong(self, x: torch.Tensor) -> torch.Tensor:
        hp = self.hparams
        return strong_intensity_view(x, hp["strong_contrast"], hp["strong_brightness"],
                                     hp["strong_noise"], self.streams.torch("strong_view", x.device))

    def extra_loss(self, pairs: list[MixedPair], step: int):
        if not self.agcl_active:
            return None, {}
        hp = self.hparams
        if hp["agcl_view"] == "mixed":
            views = [(p.logits, p.features, p.unlabeled_region) for p in pairs]
        else:  # the separate strong views, whole images
            logits, feats = self.student.forward_features(
                self._strong(torch.cat([p.unlabeled for p in pairs])))
            sizes = [p.unlabeled.shape[0] for p in pairs]
            views = [(lg, ft, torch.ones_like(p.unlabeled_region))
                     for lg, ft, p in zip(logits.split(sizes), feats.split(sizes), pairs)]
        t_feats = [p.teacher_features for p in pairs]
        with torch.autocast(pairs[0].logits.device.type, enabled=False):  # svdvals: no half kernel
            if hp["project_voxels"]:  # every voxel through the heads, both mixes in one batch
                sizes = [f.shape[0] for _, f, _ in views]
                s_feats = self.head(torch.cat([f for _, f, _ in views]).float()).split(sizes)
                views = [(lg, ft, rg) for (lg, _, rg), ft in zip(views, s_feats)]
                with torch.no_grad():
                    t_feats = self.teacher_head(torch.cat(t_feats).float()).split(sizes)
            # Patch statistics per mix, concatenated once pooled: concatenating the full-size
            # probability and feature maps first would copy them all (~0.5 GB a step on LA).
            per_mix = [self._patch_statistics(logits, feats, p.teacher_probs, t_feat, region)
                       for (logits, feats, region), p, t_feat in zip(views, pairs, t_feats)]
            stats = {k: torch.cat([m[k] for m in per_mix]) for k in per_mix[0]}
            agcl = self._agcl_terms(stats, pairs[0].features.ndim)
        ramp = epoch_rampup(step, hp["rampup_epoch_iterations"], hp["rampup"])
        unsup = hp["w_reg"] * agcl["loss_reg"] + hp["w_pl"] * agcl["loss_pl_agg"] \
            + hp["w_rw"] * agcl["loss_rw_agg"]
        logs = {k: v.detach() if torch.is_tensor(v) else float(v) for k, v in agcl.items()}
        return ramp * unsup, {**logs, "agcl_ramp": ramp}

    def _patch_statistics(self, s_logits, s_feats, t_probs, t_feats, region) -> dict:
        """Per-patch means over the unlabeled voxels of one mix, one row per patch (image-major):
        coverage, student / teacher class probabilities, student / teacher features (already
        through the heads under project_voxels) and the teacher's Eq 1 entropy."""
        patch = L.resolve_patch_size(self.hparams["contrast_patch"], s_logits.shape[2:])
        weight_sum = L.patch_sum(region.float(), patch)  # one region, five maps: summed once

        def pooled(x):
            return L.flatten_patches(L.patch_mean(x, patch, region, weight_sum))

        stats = {"coverage": L.patch_coverage(region, patch, weight_sum).flatten(),
                 "y_s": pooled(torch.softmax(s_logits.float(), 1)), "q": pooled(s_feats.float())}
        with torch.no_grad():
            stats["y_t"] = pooled(t_probs)
            stats["keys"] = pooled(t_feats.float())
            stats["entropy"] = L.flatten_patches(  # Eq 1 on the unlabeled voxels
                L.average_patch_entropy(t_probs, patch, region, weight_sum))
        return stats

    def _embed(self, head, pooled: torch.Tensor, feature_ndim: int) -> torch.Tensor:
        """L2-normalised embeddings (N, D) of pooled patch features (N, C): the head on each
        patch's mean feature (one vector per patch, not per voxel) unless project_voxels already
        applied it to every voxel."""
        if not self.hparams["project_voxels"]:
            as_map = pooled.T[None].reshape(1, pooled.shape[1], -1, *[1] * (feature_ndim - 3))
            pooled = head(as_map).flatten(2)[0].T
        return F.normalize(pooled, dim=1)

    def _agcl_terms(self, stats: dict[str, torch.Tensor], feature_ndim: int
                    ) -> dict[str, torch.Tensor]:
        """Eq 1-7 on the patches of the unlabeled voxels (`stats` from _patch_statistics);
        updates the queue after using it."""
        hp = self.hparams
        k = self.spec.num_classes
        keep = torch.nonzero(stats["coverage"] >= hp["min_patch_coverage"])[:, 0]
        if len(keep) < 2:  # no pair of unlabeled patches in this step: nothing to contrast
            zero = stats["y_s"].sum() * 0.0
            return {"loss_reg": zero, "loss_pl_agg": zero, "loss_rw_agg": zero,
                    "affinity_trace": zero.detach(), "affinity_nuclear": zero.detach(),
                    "n_anchors": zero.detach(), **self._anchor_counts(stats["y_s"][:0, 0]),
                    "queue_fill": self._queue_fill()}
        y_s = stats["y_s"][keep]
        q = self._embed(self.head, stats["q"][keep], feature_ndim)
        with torch.no_grad():
            y_t = stats["y_t"][keep]
            keys = self._embed(self.teacher_head, stats["keys"][keep], feature_ndim)
            labels = y_t.argmax(1)
            scores = L.sampling_scores(hp["patch_similarity"], labels=labels, teacher_probs=y_t,
                                       entropy=stats["entropy"][keep], student_emb=q,
                                       teacher_emb=keys)
            anchors = L.select_anchor_patches(scores, labels, torch.ones_like(labels, dtype=bool),
                                              max(1, hp["n_patches"] // k), k)
        y_s, y_t, q, keys, labels = (t[anchors] for t in (y_s, y_t, q, keys, labels))

        affinity = L.affinity_matrix(y_t, y_s, hp["sigma"], hp["kernel"])
        graph = L.affinity_graph_loss(affinity, hp["nuclear_weight"], hp["nuclear_norm"])

        # Snapshot: the queue is updated in place below, after the graph has used it.
        queue, queue_labels = self.queue.clone(), self.queue_labels.clone()
        allowed = (queue_labels[None] >= 0) & (queue_labels[None] != labels[:, None])
        pos_sim = (q * keys).sum(1)
        queue_sim = q @ queue.T
        loss_reg = L.info_nce_from_similarities(pos_sim, queue_sim, hp["tau"], allowed)

        idx_i, idx_j, mixed_ok = L.hard_negative_pairs(
            queue_sim, allowed, hp["n_hard_candidates"], hp["n_mixed_negatives"],
            self.streams.torch("hard_negatives", q.device))
        coeff = L.mix_coefficients(hp["mix_coefficient"], torch.diagonal(affinity),
                                   hp["n_mixed_negatives"],
                                   self.streams.torch("mix_coefficients", q.device))
        hard = L.mix_hard_negatives(queue[idx_i], queue[idx_j], coeff)
        hard_sim = torch.einsum("md,mnd->mn", q, hard)
        loss_rw = L.info_nce_from_similarities(pos_sim, torch.cat([queue_sim, hard_sim], 1),
                                               hp["tau"], torch.cat([allowed, mixed_ok], 1))

        L.enqueue(self.queue, self.queue_labels, self.queue_ptr, keys, labels)
        return {"loss_reg": loss_reg, "loss_pl_agg": graph["loss"], "loss_rw_agg": loss_rw,
                "affinity_trace": graph["trace"].detach(),
                "affinity_nuclear": graph["nuclear"].detach(),
                "n_anchors": torch.tensor(float(len(anchors))), **self._anchor_counts(labels),
                "queue_fill": self._queue_fill()}

    def _anchor_counts(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """anchors_class<k>: the step's anchors of each class (device tensors, no host read)."""
        counts = torch.bincount(labels.detach().long(), minlength=self.spec.num_classes).float()
        return {f"anchors_class{c}": counts[c] for c in range(self.spec.num_classes)}

    def _queue_fill(self) -> torch.Tensor:
        return (self.queue_labels >= 0).float().mean()
