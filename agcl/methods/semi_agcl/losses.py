"""Semi-AGCL's loss pieces as pure functions (equation numbers as in docs/paper-notes.md).

Patches are the non-overlapping cells of a regular grid of side ``patch_size`` (2D or 3D); voxels
past the last whole patch along an axis are ignored. Patch statistics can be restricted to a
voxel ``weight`` map (1 = the voxel belongs to the unlabeled image), so that a patch of a
copy-paste image is summarised over its unlabeled voxels only, the same voxels in both views.

Shapes: B batch, K classes, D embedding channels, N patches (flattened over images), M sampled
anchor patches, Q queue entries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PATCH_SIMILARITIES = ("entropy", "cosine", "class_confidence")
KERNELS = ("gk_l2", "gk_l1")
MIX_COEFFICIENTS = ("affinity", "half", "random")
_EPS = 1e-6


# ---------------------------------------------------------------------------------------------
# Patches (Eq 1)

def resolve_patch_size(patch_size: int | str, spatial) -> int:
    """The patch side on a crop of size ``spatial``: an int as given; ``"auto"`` = the shortest
    side // 8 (at least 1), i.e. 8 patches along the shortest axis as the paper's 32-pixel
    patches on 256x256 ACDC crops (an 8x8 grid). LA 112x112x80 gets 10 (an 11x11x8 grid of
    10^3 = 1000-voxel patches, about the 32^2 = 1024 pixels of an ACDC patch); a 48x48 crop 6."""
    if patch_size == "auto":
        return max(1, min(spatial) // 8)
    return patch_size


def _grid(spatial, patch_size: int) -> list[int]:
    if len(spatial) not in (2, 3):
        raise ValueError("patch pooling: expected (B, C, H, W) or (B, C, D, H, W) spatial sizes, "
                         f"got {tuple(spatial)}")
    if patch_size < 1 or any(size < patch_size for size in spatial):
        raise ValueError(f"patch_size: expected 1 <= patch_size <= every spatial size "
                         f"{tuple(spatial)}, got {patch_size}")
    return [size // patch_size for size in spatial]


def _channels_last(x: torch.Tensor) -> bool:
    return x.shape[1] == 1 or x.stride(1) == 1


def _patch_sums(x: torch.Tensor, grid: list[int], patch_size: int) -> torch.Tensor:
    """Sum over each whole patch of x (B, C, *spatial) -> (B, C, *grid).

    The patch axes are summed one at a time in x's own memory order (channels-last when x is,
    as the nets' features under train.channels_last): one fused reduction over all of them, or
    a channels-first view of a channels-last map, reads memory out of order (a 16-channel LA
    map: 0.43 s for the reshape-and-mean vs 0.04 s, on 2 cores). A reshape, not avg_pool: the
    same on CPU, and deterministic on CUDA, where avg_pool3d's backward is not.
    """
    n = len(grid)
    x = x[(..., *[slice(0, g * patch_size) for g in grid])]
    split = [d for g in grid for d in (g, patch_size)]
    if _channels_last(x):
        y = x.movedim(1, -1).reshape(x.shape[0], *split, x.shape[1])
        for axis in range(2 * n, 1, -2):  # the patch axes, innermost first
            y = y.sum(axis)
        return y.movedim(-1, 1)
    y = x.reshape(*x.shape[:2], *split)
    for axis in range(2 * n + 1, 2, -2):
        y = y.sum(axis)
    return y


class _WeightedPatchSum(torch.autograd.Function):
    """Sum over each patch of x * weight (weight carries no gradient) -> (B, C, *grid).

    Its own backward writes grad * weight over each patch straight into x's memory layout, once;
    autograd's chain of the forward (crop, mul, reshape, sums) materialised the full-size gradient
    several times and made the patch means the larger part of Semi-AGCL's extra step cost.
    """

    @staticmethod
    def forward(ctx, x, weight, patch_size):
        grid = _grid(x.shape[2:], patch_size)
        ctx.patch_size, ctx.grid, ctx.shape = patch_size, grid, x.shape
        ctx.channels_last = _channels_last(x)
        ctx.save_for_backward(weight)
        return _patch_sums(x if weight is None else x * weight, grid, patch_size)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        p, grid, shape = ctx.patch_size, ctx.grid, ctx.shape
        batch, channels, n = shape[0], shape[1], len(grid)
        split = [d for g in grid for d in (g, p)]
        ones = [d for g in grid for d in (g, 1)]
        covered = [g * p for g in grid]
        crop = (..., *[slice(0, c) for c in covered])
        if ctx.channels_last:  # (B, g1, p, g2, p, ..., C)
            g = grad.movedim(1, -1).reshape(batch, *ones, channels).expand(batch, *split, channels)
            w = None if weight is None else \
                weight[crop].movedim(1, -1).reshape(weight.shape[0], *split, 1)
        else:  # (B, C, g1, p, g2, p, ...)
            g = grad.reshape(batch, channels, *ones).expand(batch, channels, *split)
            w = None if weight is None else weight[crop].reshape(weight.shape[0], 1, *split)
        fmt = torch.contiguous_format
        if ctx.channels_last:
            fmt = {4: torch.channels_last, 5: torch.channels_last_3d}[2 + n]
        if covered == list(shape[2:]):
            out = torch.empty(shape, dtype=grad.dtype, device=grad.device, memory_format=fmt)
        else:  # voxels past the last whole patch get no gradient
            out = torch.empty(shape, dtype=grad.dtype, device=grad.device,
                              memory_format=fmt).zero_()
        # The patch-split view of out's covered part, in the order g and w were built in.
        target = out.movedim(1, -1)[(slice(None), *crop[1:])] if ctx.channels_last \
            else out[crop]
        target = target.view(g.shape)
        if w is None:
            target.copy_(g)
        else:
            torch.mul(g, w.to(grad.dtype), out=target)
        return out, None, None


def patch_sum(x: torch.Tensor, patch_size: int,
              weight: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of x (B, C, *spatial) (times ``weight`` (B, 1, *spatial), no gradient through it) over
    each whole patch -> (B, C, n_patches), patches in C order of the grid."""
    if x.ndim not in (4, 5):
        raise ValueError("patch pooling: expected (B, C, H, W) or (B, C, D, H, W), "
                         f"got {tuple(x.shape)}")
    if weight is not None:
        weight = weight.detach().to(x.dtype)
    if torch.is_grad_enabled() and x.requires_grad:
        return _WeightedPatchSum.apply(x, weight, patch_size).flatten(2)
    grid = _grid(x.shape[2:], patch_size)
    return _patch_sums(x if weight is None else x * weight, grid, patch_size).flatten(2)


def _pool(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Mean over each whole patch -> (B, C, n_patches), patches in C order of the grid."""
    return patch_sum(x, patch_size) / patch_size ** (x.ndim - 2)


def patch_coverage(weight: torch.Tensor, patch_size: int,
                   weight_sum: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``weight`` (B, 1, *spatial) within each patch -> (B, n_patches); ``weight_sum``
    (B, 1, n_patches), its per-patch sum, when the caller has it already."""
    if weight_sum is None:
        return _pool(weight.float(), patch_size)[:, 0]
    return (weight_sum / patch_size ** (weight.ndim - 2))[:, 0]


def patch_mean(x: torch.Tensor, patch_size: int, weight: torch.Tensor | None = None,
               weight_sum: torch.Tensor | None = None) -> torch.Tensor:
    """Average of x (B, C, *spatial) over each patch -> (B, C, n_patches).

    With ``weight`` (B, 1, *spatial) the average is weighted: sum(w x) / sum(w) per patch (0 for a
    patch without weight); ``weight_sum`` (B, 1, n_patches), sum(w) per patch, when the caller
    has it already (one region, several maps). The weight gets no gradient.
    """
    if weight is None:
        return _pool(x, patch_size)
    if weight_sum is None:
        weight_sum = patch_sum(weight.to(x.dtype), patch_size)
    return patch_sum(x, patch_size, weight) / weight_sum.to(x.dtype).clamp_min(_EPS)


def binary_entropy(probs: torch.Tensor) -> torch.Tensor:
    """-(p log p + (1 - p) log(1 - p)) elementwise (natural log; 0 log 0 = 0)."""
    p = probs.float()
    return -(torch.xlogy(p, p) + torch.xlogy(1.0 - p, 1.0 - p))


def average_patch_entropy(probs: torch.Tensor, patch_size: int,
                          weight: torch.Tensor | None = None,
                          weight_sum: torch.Tensor | None = None) -> torch.Tensor:
    """Eq 1: Ent^k_ij = mean over patch j of the binary entropy of p = probs[i, k].

    probs (B, K, *spatial) softmax -> (B, K, n_patches); ``weight`` and ``weight_sum`` as in
    `patch_mean`.
    """
    return patch_mean(binary_entropy(probs), patch_size, weight, weight_sum)


def flatten_patches(x: torch.Tensor) -> torch.Tensor:
    """(B, C, n_patches) -> (B * n_patches, C), image-major."""
    return x.movedim(1, -1).reshape(-1, x.shape[1])


def sampling_scores(similarity: str, *, labels: torch.Tensor, teacher_probs: torch.Tensor,
                    entropy: torch.Tensor, student_emb: torch.Tensor,
                    teacher_emb: torch.Tensor) -> torch.Tensor:
    """How reliable each patch is as an anchor (higher = more reliable) -> (N,).

    ``labels`` (N,) is each patch's dominant class c = argmax of its mean teacher probability.
    - entropy (the paper's choice, Eq 1): -Ent^c, low class-c entropy = confident patch;
    - class_confidence: the mean teacher probability of class c;
    - cosine: cosine similarity of the student and teacher embeddings of the patch (view agreement).
    The ablation compares these three rankings; the rule that uses them is `select_anchor_patches`.
    """
    pick = labels[:, None]
    if similarity == "entropy":
        return -entropy.gather(1, pick)[:, 0]
    if similarity == "class_confidence":
        return teacher_probs.gather(1, pick)[:, 0]
    if similarity == "cosine":
        return F.cosine_similarity(student_emb, teacher_emb, dim=1)
    raise ValueError(f"patch_similarity: expected one of {', '.join(PATCH_SIMILARITIES)}, "
                     f"got {similarity!r}")


def select_anchor_patches(scores: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                          per_class: int, num_classes: int) -> torch.Tensor:
    """Our sampling rule (the paper's exact rule was not recovered).

    For every class k: among the valid patches whose dominant class is k, the ``per_class`` with the
    highest score. Each anchor's positive is the teacher (weak-view) key of the SAME patch, its
    negatives are the queue keys whose dominant class differs from k: no class collision, since a
    same-class patch is never pushed away. Returns the indices of the anchors (M,), class by class.
    """
    chosen = []
    for k in range(num_classes):  # K <= 4: a loop over classes, never over patches
        candidate = valid & (labels == k)
        count = min(per_class, int(candidate.sum()))
        if count:
            masked = scores.masked_fill(~candidate, float("-inf"))
            chosen.append(masked.topk(count).indices)
    if not chosen:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    return torch.cat(chosen)


# ---------------------------------------------------------------------------------------------
# Affinity graph (Eq 2, 3)

def affinity_matrix(y_t: torch.Tensor, y_s: torch.Tensor, sigma: float,
                    kernel: str = "gk_l2") -> torch.Tensor:
    """Eq 2: A_ij = exp(-d(y_t_i, y_s_j)^2 / (2 sigma^2)) for pseudo-label vectors (M, K) -> (M, M).

    gk_l2: d = Euclidean distance, so d^2 = sum_c (y_t_ic - y_s_jc)^2 (the printed Eq 2).
    gk_l1: d = L1 distance sum_c |y_t_ic - y_s_jc|, squared inside the same Gaussian kernel.
    """
    diff = y_t[:, None, :] - y_s[None, :, :]
    if kernel == "gk_l2":
        squared = diff.pow(2).sum(-1)
    elif kernel == "gk_l1":
        squared = diff.abs().sum(-1).pow(2)
    else:
        raise ValueError(f"kernel: expected one of {', '.join(KERNELS)}, got {kernel!r}")
    return torch.exp(-squared / (2.0 * sigma**2))


def affinity_graph_loss(affinity: torch.Tensor, gamma: float,
                        use_nuclear: bool = True) -> dict[str, torch.Tensor]:
    """Eq 3 with our inferred sign: L_PL_AGG = -Tr(A)/n + gamma ||A||_* / n, A (n, n).

    Maximising the trace pulls each patch's student pseudo-label onto its teacher one; the nuclear
    norm (sum of singular values, differentiable through torch.linalg.svdvals) favours a low-rank,
    class-structured graph. Both terms are divided by n so the loss does not grow with the number of
    sampled patches. Returns {"loss", "trace", "nuclear"} (the last two undivided, for logging).
    """
    n = affinity.shape[0]
    trace = torch.diagonal(affinity).sum()
    nuclear = torch.linalg.svdvals(affinity).sum() if use_nuclear else affinity.new_zeros(())
    loss = (-trace + gamma * nuclear) / n if use_nuclear else -trace / n
    return {"loss": loss, "trace": trace, "nuclear": nuclear}


# ---------------------------------------------------------------------------------------------
# Contrastive terms (Eq 4, 6, 7)

def info_nce_from_similarities(pos_sim: torch.Tensor, neg_sim: torch.Tensor, tau: float,
                               negative_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over anchors of -log(e^{s+/tau} / (e^{s+/tau} + sum_n e^{s_n/tau})).

    pos_sim (M,), neg_sim (M, N); negative_mask (M, N) bool, False drops that negative. An anchor
    without any negative scores 0. Computed with logsumexp, so it is stable for small tau.
    """
    if pos_sim.numel() == 0:
        return pos_sim.new_zeros(())
    logits = torch.cat([pos_sim[:, None], neg_sim], dim=1) / tau
    if negative_mask is not None:
        keep = torch.cat([torch.ones_like(negative_mask[:, :1]), negative_mask], dim=1)
        logits = logits.masked_fill(~keep, float("-inf"))
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


def mix_coefficients(mode: str, affinity_diag: torch.Tensor, n_mix: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Eq 6 coefficient c per (anchor, mixed negative) -> (M, n_mix).

    affinity: c = A_ii of the anchor (the paper); half: c = 1/2; random: c ~ U(0, 1) drawn from
    ``generator`` (the global RNG when None).
    """
    shape = (affinity_diag.shape[0], n_mix)
    if mode == "affinity":
        return affinity_diag.detach()[:, None].expand(shape)
    if mode == "half":
        return affinity_diag.new_full(shape, 0.5)
    if mode == "random":
        device = generator.device if generator is not None else affinity_diag.device
        draws = torch.rand(shape, generator=generator, device=device)
        return draws.to(device=affinity_diag.device, dtype=affinity_diag.dtype)
    raise ValueError(f"mix_coefficient: expected one of {', '.join(MIX_COEFFICIENTS)}, "
                     f"got {mode!r}")


def mix_hard_negatives(n_i: torch.Tensor, n_j: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
    """Eq 6: h = (c n_i + (1 - c) n_j) / ||c n_i + (1 - c) n_j||_2 along the last axis.

    ``coeff`` broadcasts against n_i without its last axis, e.g. (M, n_mix) for (M, n_mix, D).
    """
    coeff = coeff[..., None]
    return F.normalize(coeff * n_i + (1.0 - coeff) * n_j, dim=-1)


def hard_negative_pairs(sim: torch.Tensor, mask: torch.Tensor, n_candidates: int, n_mix: int,
                        generator: torch.Generator | None = None):
    """Pick the pairs (n_i, n_j) that Eq 6 mixes, as MoCHi: both among the anchor's hardest.

    sim, mask (M, Q). For each anchor: the ``n_candidates`` allowed queue keys most similar to it,
    then ``n_mix`` random ordered pairs of two different candidates. Returns queue indices
    (idx_i, idx_j) and their validity, each (M, n_mix); invalid where a candidate was not allowed
    (too few negatives in the queue yet).
    """
    count = min(n_candidates, sim.shape[1])
    shape = (sim.shape[0], n_mix)
    if count < 2:
        empty = torch.zeros(shape, dtype=torch.long, device=sim.device)
        return empty, empty, torch.zeros(shape, dtype=torch.bool, device=sim.device)
    top = sim.detach().masked_fill(~mask, float("-inf")).topk(count, dim=1)
    device = generator.device if generator is not None else sim.device
    first = torch.randint(0, count, shape, generator=generator, device=device).to(sim.device)
    offset = torch.randint(1, count, shape, generator=generator, device=device).to(sim.device)
    second = (first + offset) % count  # never the same candidate twice
    allowed = torch.isfinite(top.values)
    return (top.indices.gather(1, first), top.indices.gather(1, second),
            allowed.gather(1, first) & allowed.gather(1, second))


# ---------------------------------------------------------------------------------------------
# MoCo queue

@torch.no_grad()
def enqueue(queue: torch.Tensor, queue_labels: torch.Tensor, pointer: torch.Tensor,
            keys: torch.Tensor, labels: torch.Tensor) -> None:
    """Write keys (m, D) and their classes (m,) into the ring buffer at ``pointer``, in place.

    queue (Q, D), queue_labels (Q,) (-1 = empty slot), pointer (1,) int64. Writing wraps around the
    end; with m > Q only the last Q keys are kept. The pointer moves to the slot after the last key.
    """
    size = queue.shape[0]
    if keys.shape[0] > size:
        keys, labels = keys[-size:], labels[-size:]
    count = keys.shape[0]
    if count == 0:
        return
    slots = (pointer + torch.arange(count, device=queue.device)) % size
    queue[slots] = keys.to(queue.dtype)
    queue_labels[slots] = labels.to(queue_labels.dtype)
    pointer.copy_((pointer + count) % size)


# ---------------------------------------------------------------------------------------------
# Copy-paste supervision (BCP base)
