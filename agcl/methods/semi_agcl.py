"""Semi-AGCL: affinity-graph-guided contrastive learning on a BCP copy-paste mean teacher.

Base (assumed, ../shared/paper.md "Setup"): the paper's ACDC settings (mask 170x170 of 256, batch
24, 10k + 30k iterations, EMA 0.99) are BCP's defaults, so the base is BCP's bidirectional
copy-paste. Each labeled image i is paired with unlabeled image i; one random box (side
``mask_ratio`` of every axis) is drawn per step; pair i is mixed "inward" (labeled outside the box,
unlabeled inside) for even i and "outward" for odd i. The mixed image is supervised by the mixed
label: the ground truth where it came from the labeled image (weight 1), the EMA teacher's argmax
pseudo-label elsewhere (weight ``u_weight``). BCP's supervised pre-training (2000 / 10000
iterations) is a separate stage upstream; here it is ``pretrain_iterations`` steps of plain L_sup
on labeled images (teacher = student meanwhile), 0 by default.

AGCL terms on the unlabeled voxels (Eq 1-7): the teacher sees the weak view (the sampler's
flip/rotate/crop only), the student the strong view (`strong_intensity_view`: contrast, brightness
and noise; intensity-only so voxel positions match across views). With ``student_view: mixed`` (the
default) the strong view is the unlabeled part of the copy-paste image itself, so the student runs
once per step (the paper's cost, 1.33x V-Net, leaves no room for a second student pass); with
``separate`` the student also runs on whole strong-view unlabeled images. Patch pseudo-labels are
the mean softmax over a patch's unlabeled voxels; patch embeddings are the decoder features
averaged over the same voxels, then the ProjectionHead (the teacher's keys through an EMA copy of
the head). ``project_voxels: true`` projects every voxel first and averages after, the literal
reading, at the cost of about one more forward pass. Anchors are sampled by
`agcl_losses.select_anchor_patches`; per step:

  L_all = L_sup + ramp * (w_reg L_reg + w_pl L_PL_AGG + w_rw L_RW_AGG)

L_sup: the copy-paste loss above; L_reg: Eq 4 InfoNCE (queue negatives of other classes), our
reading of the undefined L_reg; L_PL_AGG: Eq 3 on the Eq 2 affinity of teacher vs student patch
pseudo-labels; L_RW_AGG: Eq 7 = Eq 4 plus the Eq 6 mixed hard negatives. ramp = sigmoid ramp-up
over (step - pretrain_iterations) // 150.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from agcl.methods import agcl_losses as L
from agcl.methods.base import Batch, Method, ema_update, make_ema_teacher
from agcl.methods.losses import sigmoid_rampup, supervised_loss
from agcl.methods.registry import register_method
from agcl.nets import ProjectionHead

STUDENT_VIEWS = ("mixed", "separate")
LOG_KEYS = ("loss_sup", "loss_sup_labeled", "loss_sup_unlabeled", "loss_reg", "loss_pl_agg",
            "loss_rw_agg", "affinity_trace", "affinity_nuclear", "n_anchors", "queue_fill",
            "rampup")


def box_mask(spatial: tuple[int, ...], ratio: float, device=None) -> torch.Tensor:
    """BCP's mask: ones, with a zero box of int(side * ratio) per axis at a random place."""
    mask = torch.ones(spatial, device=device)
    box = []
    for size in spatial:
        side = int(size * ratio)
        start = int(torch.randint(0, size - side + 1, (1,)))
        box.append(slice(start, start + side))
    mask[tuple(box)] = 0.0
    return mask


def pair_masks(mask: torch.Tensor, n_pairs: int) -> torch.Tensor:
    """Per-pair "labeled" masks (n, 1, *spatial): mask for even pairs, 1 - mask for odd ones."""
    inward = (torch.arange(n_pairs, device=mask.device) % 2 == 0).view(-1, *[1] * (mask.ndim + 1))
    return torch.where(inward, mask, 1.0 - mask)


def strong_intensity_view(x: torch.Tensor, contrast: float, brightness: float,
                          noise: float) -> torch.Tensor:
    """Per image and channel: mean + c (x - mean) + b std + clip(N(0, noise std), +-2 noise std).

    c ~ U(1 - contrast, 1 + contrast), b ~ U(-brightness, brightness); std of the image itself, so
    the same settings suit z-scored LA and [0, 1] ACDC. Clipped noise as UA-MT's teacher input
    noise.
    """
    dims = tuple(range(2, x.ndim))
    mean = x.mean(dims, keepdim=True)
    std = x.std(dims, keepdim=True).clamp_min(1e-6)
    stat_shape = mean.shape
    c = 1.0 + contrast * (2 * torch.rand(stat_shape, device=x.device) - 1)
    b = brightness * (2 * torch.rand(stat_shape, device=x.device) - 1)
    eps = (torch.randn_like(x) * noise).clamp(-2 * noise, 2 * noise)
    return mean + c * (x - mean) + (b + eps) * std


@register_method("semi_agcl")
class SemiAGCL(Method):
    default_hparams = {
        "ema_decay": 0.99,  # BCP / paper
        "u_weight": 0.5,  # BCP: weight of the pseudo-labeled region of a mixed image
        "mask_ratio": 2 / 3,  # BCP: zero box side = 2/3 of each axis (170 of 256 on ACDC)
        "pretrain_iterations": 0,  # BCP pre-trains in a separate run; 0 keeps the demo short
        "rampup": 40,  # ramp-up length in 150-iteration "epochs" (UA-MT LA value)
        "w_reg": 1.0,  # Eq 8 prints no weights
        "w_pl": 1.0,  # Eq 8 prints no weights
        "w_rw": 1.0,  # Eq 8 prints no weights
        "student_view": "mixed",  # one student pass per step, as the paper's 1.33x cost implies
        "strong_contrast": 0.2,  # contrast factor in [0.8, 1.2]: mild, keeps anatomy readable
        "strong_brightness": 0.1,  # shift of +-0.1 image std
        "strong_noise": 0.1,  # Gaussian noise 0.1 std clipped at 0.2 (UA-MT's teacher noise)
        "patch_size": 16,  # LA 112x112x80 -> 7x7x5 patches of 16^3
        "min_patch_coverage": 0.5,  # a patch counts if >= half of its voxels are unlabeled-image
        "n_patches": 64,  # anchors per step, split evenly over classes; 64x64 graph, cheap SVD
        "patch_similarity": "entropy",  # ablation: entropy (paper) | cosine | class_confidence
        "kernel": "gk_l2",  # ablation: gk_l2 | gk_l1 (paper: GK + L2)
        "sigma": 0.5,  # one-hot labels of two classes are sqrt(2) apart -> affinity e^-4 ~ 0.02
        "gamma": 0.1,  # ||A||_* >= Tr(A): gamma < 1 keeps the trace term in charge
        "nuclear_norm": True,  # ablation: the nuclear-norm term of Eq 3 on / off
        "tau": 0.07,  # MoCo temperature
        "queue_length": 2048,  # 32 steps of 64 keys, well inside the EMA teacher's ~100-step memory
        "n_hard_candidates": 32,  # hardest allowed queue keys that Eq 6 mixes from (MoCHi's N)
        "n_mixed_negatives": 16,  # Eq 6 synthetic negatives per anchor (MoCHi's s)
        "mix_coefficient": "affinity",  # ablation: affinity (A_ii, paper) | half | random
        # The head on patch-mean features (False) instead of on every voxel (True): a per-voxel head
        # at 4x the decoder width costs about one more V-Net forward; the AGCL terms use patches.
        "project_voxels": False,
        "proj_hidden_channels": None,  # None = 4 x decoder feature channels (64 at width 16)
        "proj_dim": None,  # None = 2 x decoder feature channels (32 at width 16)
    }
    dataset_hparams = {
        "acdc": {"dice_include_background": True, "patch_size": 32, "rampup": 200},
        "crag": {"patch_size": 32, "rampup": 200},
    }
    _CHOICES = {"student_view": STUDENT_VIEWS, "patch_similarity": L.PATCH_SIMILARITIES,
                "kernel": L.KERNELS, "mix_coefficient": L.MIX_COEFFICIENTS}

    def __init__(self, spec, hparams, net_kwargs, total_iterations):
        super().__init__(spec, hparams, net_kwargs, total_iterations)
        for field, allowed in self._CHOICES.items():
            if hparams[field] not in allowed:
                raise ValueError(f"semi_agcl hparam {field}: expected one of "
                                 f"{', '.join(allowed)}, got {hparams[field]!r}")
        width = self.student.feature_channels
        hidden = hparams["proj_hidden_channels"] or 4 * width
        dim = hparams["proj_dim"] or 2 * width
        self.head = ProjectionHead(width, hidden, dim, spatial_dims=self.student.spatial_dims)
        self.teacher = make_ema_teacher(self.student)
        self.teacher_head = make_ema_teacher(self.head)
        # Buffers, so the queue is checkpointed and a resumed run continues exactly.
        self.register_buffer("queue", F.normalize(torch.randn(hparams["queue_length"], dim), dim=1))
        self.register_buffer("queue_labels", torch.full((hparams["queue_length"],), -1))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def trainable_parameters(self):
        return itertools.chain(self.student.parameters(), self.head.parameters())

    def after_optimizer_step(self, step: int) -> None:
        # Teacher = student during pre-training, so self-training starts from the pre-trained net.
        decay = 0.0 if step < self.hparams["pretrain_iterations"] else self.hparams["ema_decay"]
        ema_update(self.teacher, self.student, decay, step)
        ema_update(self.teacher_head, self.head, decay, step)

    # -----------------------------------------------------------------------------------------
    def train_step(self, batch: Batch, step: int):
        hp = self.hparams
        include_bg = hp["dice_include_background"]
        if step < hp["pretrain_iterations"]:
            losses = supervised_loss(self.student(batch.x_labeled), batch.y_labeled, include_bg)
            logs = dict.fromkeys(LOG_KEYS, 0.0)
            logs.update(loss_sup=float(losses["loss_sup"].detach()),
                        loss_sup_labeled=float(losses["loss_sup"].detach()))
            return losses["loss_sup"], logs

        x_l, y_l, x_u = batch.x_labeled, batch.y_labeled, batch.x_unlabeled
        if x_u is None or x_u.shape[0] != x_l.shape[0]:
            got = 0 if x_u is None else x_u.shape[0]
            raise ValueError(f"semi_agcl pairs each labeled image with one unlabeled image (BCP): "
                             f"the batch needs as many unlabeled as labeled images, got "
                             f"{x_l.shape[0]} labeled and {got} unlabeled")
        n = x_l.shape[0]

        with torch.no_grad():
            t_logits, t_feats = self.teacher.forward_features(x_u)
            t_probs = torch.softmax(t_logits.float(), dim=1)
        pseudo = L.class_argmax(t_probs)

        strong_u = strong_intensity_view(x_u, hp["strong_contrast"], hp["strong_brightness"],
                                         hp["strong_noise"])
        labeled_region = pair_masks(box_mask(tuple(x_l.shape[2:]), hp["mask_ratio"], x_l.device), n)
        mixed_u = strong_u if hp["student_view"] == "mixed" else x_u
        x_mix = x_l * labeled_region + mixed_u * (1 - labeled_region)
        y_mix = torch.where(labeled_region[:, 0] > 0.5, y_l, pseudo)

        student_in = x_mix if hp["student_view"] == "mixed" else torch.cat([x_mix, strong_u])
        s_logits, s_feats = self.student.forward_features(student_in)
        sup_l, sup_u = L.region_supervised_losses(s_logits[:n], y_mix,
                                                  [labeled_region, 1 - labeled_region], include_bg)
        loss_sup = sup_l + hp["u_weight"] * sup_u

        if hp["student_view"] == "mixed":
            unlabeled_region = 1 - labeled_region
        else:  # the separate strong views, whole images
            s_logits, s_feats = s_logits[n:], s_feats[n:]
            unlabeled_region = torch.ones_like(labeled_region)
        with torch.autocast(x_l.device.type, enabled=False):  # svdvals has no half kernel
            agcl = self._agcl_terms(torch.softmax(s_logits.float(), 1), s_feats.float(), t_probs,
                                    t_feats.float(), unlabeled_region)

        ramp = sigmoid_rampup((step - hp["pretrain_iterations"]) // 150, hp["rampup"])
        unsup = hp["w_reg"] * agcl["loss_reg"] + hp["w_pl"] * agcl["loss_pl_agg"] \
            + hp["w_rw"] * agcl["loss_rw_agg"]
        loss = loss_sup + ramp * unsup
        logs = {"loss_sup": loss_sup, "loss_sup_labeled": sup_l, "loss_sup_unlabeled": sup_u,
                **agcl, "rampup": ramp}
        return loss, {k: float(v.detach()) if torch.is_tensor(v) else float(v)
                      for k, v in logs.items()}

    def _patch_embeddings(self, head, feats, region, keep) -> torch.Tensor:
        """L2-normalised embeddings (N_kept, D) of the kept patches (``keep``: flat indices)."""
        patch = self.hparams["patch_size"]
        if self.hparams["project_voxels"]:
            pooled = L.flatten_patches(L.patch_mean(head(feats), patch, region))[keep]
        else:  # the head on each patch's mean feature: one vector per patch, not per voxel
            pooled = L.flatten_patches(L.patch_mean(feats, patch, region))[keep]
            as_map = pooled.T[None].reshape(1, pooled.shape[1], -1, *[1] * (feats.ndim - 3))
            pooled = head(as_map).flatten(2)[0].T
        return F.normalize(pooled, dim=1)

    def _agcl_terms(self, s_probs, s_feats, t_probs, t_feats, region) -> dict[str, torch.Tensor]:
        """Eq 1-7 on the patches of the unlabeled voxels; updates the queue after using it."""
        hp = self.hparams
        patch, k = hp["patch_size"], self.spec.num_classes
        keep = torch.nonzero(
            L.patch_coverage(region, patch).flatten() >= hp["min_patch_coverage"])[:, 0]
        if len(keep) < 2:  # no pair of unlabeled patches in this step: nothing to contrast
            zero = s_probs.sum() * 0.0
            return {"loss_reg": zero, "loss_pl_agg": zero, "loss_rw_agg": zero,
                    "affinity_trace": zero.detach(), "affinity_nuclear": zero.detach(),
                    "n_anchors": zero.detach(), "queue_fill": self._queue_fill()}
        y_s = L.flatten_patches(L.patch_mean(s_probs, patch, region))[keep]
        q = self._patch_embeddings(self.head, s_feats, region, keep)
        with torch.no_grad():
            y_t = L.flatten_patches(L.patch_mean(t_probs, patch, region))[keep]
            keys = self._patch_embeddings(self.teacher_head, t_feats, region, keep)
            entropy = L.flatten_patches(L.average_patch_entropy(t_probs, patch, region))[keep]
            labels = y_t.argmax(1)
            scores = L.sampling_scores(hp["patch_similarity"], labels=labels, teacher_probs=y_t,
                                       entropy=entropy, student_emb=q, teacher_emb=keys)
            anchors = L.select_anchor_patches(scores, labels, torch.ones_like(labels, dtype=bool),
                                              max(1, hp["n_patches"] // k), k)
        y_s, y_t, q, keys, labels = (t[anchors] for t in (y_s, y_t, q, keys, labels))

        affinity = L.affinity_matrix(y_t, y_s, hp["sigma"], hp["kernel"])
        graph = L.affinity_graph_loss(affinity, hp["gamma"], hp["nuclear_norm"])

        # Snapshot: the queue is updated in place below, after the graph has used it.
        queue, queue_labels = self.queue.clone(), self.queue_labels.clone()
        allowed = (queue_labels[None] >= 0) & (queue_labels[None] != labels[:, None])
        pos_sim = (q * keys).sum(1)
        queue_sim = q @ queue.T
        loss_reg = L.info_nce_from_similarities(pos_sim, queue_sim, hp["tau"], allowed)

        idx_i, idx_j, mixed_ok = L.hard_negative_pairs(queue_sim, allowed, hp["n_hard_candidates"],
                                                       hp["n_mixed_negatives"])
        coeff = L.mix_coefficients(hp["mix_coefficient"], torch.diagonal(affinity),
                                   hp["n_mixed_negatives"])
        hard = L.mix_hard_negatives(queue[idx_i], queue[idx_j], coeff)
        hard_sim = torch.einsum("md,mnd->mn", q, hard)
        loss_rw = L.info_nce_from_similarities(pos_sim, torch.cat([queue_sim, hard_sim], 1),
                                               hp["tau"], torch.cat([allowed, mixed_ok], 1))

        L.enqueue(self.queue, self.queue_labels, self.queue_ptr, keys, labels)
        return {"loss_reg": loss_reg, "loss_pl_agg": graph["loss"], "loss_rw_agg": loss_rw,
                "affinity_trace": graph["trace"].detach(),
                "affinity_nuclear": graph["nuclear"].detach(),
                "n_anchors": torch.tensor(float(len(anchors))), "queue_fill": self._queue_fill()}

    def _queue_fill(self) -> torch.Tensor:
        return (self.queue_labels >= 0).float().mean()
