"""Semi-AGCL: each loss piece against hand-computed numbers, then whole train steps on tiny nets."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from agcl.data.specs import get_spec
from agcl.methods import copy_paste as bcp_module
from agcl.methods.base import MAIN, PRETRAIN, Batch, HparamError
from agcl.methods.registry import get_method
from agcl.methods.semi_agcl import losses as L
from agcl.methods.semi_agcl.method import strong_intensity_view


def h(p: float) -> float:
    """Binary entropy in nats."""
    return -sum(v * math.log(v) for v in (p, 1 - p) if v > 0)


# ---------------------------------------------------------------------------------------------
# Eq 1

def test_average_patch_entropy_on_a_hand_made_4x4_map():
    p = torch.tensor([[0.5, 0.5, 0.1, 0.9],
                      [0.5, 0.5, 0.1, 0.9],
                      [1.0, 1.0, 0.2, 0.2],
                      [1.0, 1.0, 0.5, 0.5]])
    probs = torch.stack([1 - p, p])[None]  # (1, 2, 4, 4): class 0 = 1 - p
    ent = L.average_patch_entropy(probs, 2)
    expected = torch.tensor([h(0.5), h(0.1), 0.0, (h(0.2) + h(0.5)) / 2], dtype=torch.float32)
    assert ent.shape == (1, 2, 4)
    torch.testing.assert_close(ent[0, 1], expected)
    torch.testing.assert_close(ent[0, 0], expected)  # binary entropy is symmetric in p, 1 - p


def test_average_patch_entropy_weighted_and_3d():
    p = torch.full((1, 1, 4, 4, 4), 0.5)
    p[..., :2, :, :] = 0.1  # the first half of axis 0
    probs = torch.cat([1 - p, p], dim=1)
    ent = L.average_patch_entropy(probs, 2)
    assert ent.shape == (1, 2, 8)
    torch.testing.assert_close(ent[0, 1], torch.tensor([h(0.1)] * 4 + [h(0.5)] * 4))
    # Weighted: only the voxels of weight 1 count, so a patch of a single p value keeps its entropy
    # and a mixed patch averages over the weighted voxels only.
    weight = torch.zeros(1, 1, 4, 4, 4)
    weight[..., 1:3, :, :] = 1.0  # one slab of 0.1 and one of 0.5 inside each z-patch pair
    ent_w = L.average_patch_entropy(probs, 4, weight)
    torch.testing.assert_close(ent_w[0, 1], torch.tensor([(h(0.1) + h(0.5)) / 2]))


def test_patch_size_larger_than_image_is_a_clear_error():
    with pytest.raises(ValueError, match="patch_size"):
        L.average_patch_entropy(torch.full((1, 2, 4, 4), 0.5), 8)


@pytest.mark.parametrize("shape", [(2, 3, 12, 8), (2, 3, 16, 12, 9)])
def test_patch_mean_equals_average_pooling_and_drops_partial_patches(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    pool = F.avg_pool2d if len(shape) == 4 else F.avg_pool3d
    torch.testing.assert_close(L.patch_mean(x, 4), pool(x, 4, 4).flatten(2))


def test_patch_coverage_counts_the_weighted_fraction():
    weight = torch.zeros(1, 1, 4, 4)
    weight[..., :3, :3] = 1.0
    torch.testing.assert_close(L.patch_coverage(weight, 2), torch.tensor([[1.0, 0.5, 0.5, 0.25]]))


def reference_patch_mean(x, patch, weight):
    """The straightforward weighted patch mean: autograd through avg_pool of x w and of w."""
    pool = F.avg_pool2d if x.ndim == 4 else F.avg_pool3d
    return (pool(x * weight, patch, patch) / pool(weight, patch, patch).clamp_min(1e-6)).flatten(2)


@pytest.mark.parametrize("shape", [(2, 3, 13, 10), (2, 5, 11, 8, 9), (1, 4, 8, 8, 8)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_weighted_patch_mean_and_its_gradient_match_the_reference(shape, channels_last):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format={4: torch.channels_last, 5: torch.channels_last_3d}[x.ndim])
    weight = (torch.rand((shape[0], 1, *shape[2:]), generator=g) > 0.4).double()
    weight[0, 0, :4] = 0.0  # some patches without weight: mean 0 there, no gradient
    upstream = torch.randn((shape[0], shape[1], math.prod(s // 4 for s in shape[2:])),
                           generator=g, dtype=torch.float64)
    grads = []
    for fn in (L.patch_mean, reference_patch_mean):
        leaf = x.clone().requires_grad_(True)
        out = fn(leaf, 4, weight)
        (out * upstream).sum().backward()
        grads.append((out.detach(), leaf.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
    assert grads[0][1].stride() == x.stride()  # the gradient comes back in x's memory layout
    # voxels past the last whole patch get no gradient
    assert (grads[0][1][:, :, 4 * (shape[2] // 4):] == 0).all()
    leaf = x[:1, :2, :8, :8].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: L.patch_mean(t, 4, weight[:1, :, :8, :8]), (leaf,))


def test_patch_sum_of_a_channels_last_map_is_the_plain_sum():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    expected = x.view(2, 3, 2, 2, 2, 2).sum((3, 5)).flatten(2)
    torch.testing.assert_close(L.patch_sum(x.contiguous(memory_format=torch.channels_last), 2),
                               expected)
    torch.testing.assert_close(L.patch_sum(x, 2), expected)


# ---------------------------------------------------------------------------------------------
# Patch sampling

def test_sampling_scores_per_similarity():
    y_t = torch.tensor([[0.9, 0.1], [0.3, 0.7]])
    labels = y_t.argmax(1)
    entropy = torch.tensor([[0.2, 0.3], [0.5, 0.4]])
    emb_s = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    emb_t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    kw = {"labels": labels, "teacher_probs": y_t, "entropy": entropy, "student_emb": emb_s,
          "teacher_emb": emb_t}
    torch.testing.assert_close(L.sampling_scores("entropy", **kw), torch.tensor([-0.2, -0.4]))
    torch.testing.assert_close(L.sampling_scores("class_confidence", **kw),
                               torch.tensor([0.9, 0.7]))
    torch.testing.assert_close(L.sampling_scores("cosine", **kw),
                               torch.tensor([1.0, 1 / math.sqrt(2)]))
    with pytest.raises(ValueError, match="patch_similarity: expected one of"):
        L.sampling_scores("dot", **kw)


def test_select_anchor_patches_takes_the_best_per_class_among_valid():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.8, 0.3, 0.7, 0.95])
    labels = torch.tensor([0, 0, 1, 1, 1, 0, 1])
    valid = torch.tensor([True, True, True, True, True, True, False])  # 0.95 is not valid
    anchors = L.select_anchor_patches(scores, labels, valid, per_class=2, num_classes=3)
    assert anchors.tolist() == [1, 5, 3, 2]  # class 0: 0.9, 0.7; class 1: 0.8, 0.5; class 2: none
    few = L.select_anchor_patches(scores, labels, valid, per_class=5, num_classes=2)
    assert sorted(few.tolist()) == [0, 1, 2, 3, 4, 5]


# ---------------------------------------------------------------------------------------------
# Eq 2, 3

Y_T = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
Y_S = torch.tensor([[0.8, 0.2], [0.0, 1.0]])


def test_affinity_matrix_gaussian_l2():
    # squared L2 distances: [[0.08, 2], [0.18, 0.5]]; sigma 1 -> exp(-d^2 / 2)
    expected = torch.exp(-torch.tensor([[0.04, 1.0], [0.09, 0.25]]))
    torch.testing.assert_close(L.affinity_matrix(Y_T, Y_S, 1.0, "gk_l2"), expected)


def test_affinity_matrix_gaussian_l1():
    # L1 distances [[0.4, 2], [0.6, 1]], squared in the kernel: [[0.16, 4], [0.36, 1]]
    expected = torch.exp(-torch.tensor([[0.08, 2.0], [0.18, 0.5]]))
    torch.testing.assert_close(L.affinity_matrix(Y_T, Y_S, 1.0, "gk_l1"), expected)
    with pytest.raises(ValueError, match="kernel"):
        L.affinity_matrix(Y_T, Y_S, 1.0, "rbf")


def test_affinity_graph_loss_value_and_gradient_by_hand():
    # A = [[3, 1], [0, 2]]: ||A||_* = sqrt(||A||_F^2 + 2 det A) = sqrt(26) for 2x2, and
    # d||A||_*/dA = U V^T = (A + det(A) A^-T) / ||A||_* = [[5, 1], [-1, 5]] / sqrt(26).
    a = torch.tensor([[3.0, 1.0], [0.0, 2.0]], dtype=torch.float64, requires_grad=True)
    out = L.affinity_graph_loss(a, gamma=0.5)
    root = math.sqrt(26)
    assert out["trace"].item() == pytest.approx(5.0)
    assert out["nuclear"].item() == pytest.approx(root)
    assert out["loss"].item() == pytest.approx((-5 + 0.5 * root) / 2)
    out["loss"].backward()
    uv = torch.tensor([[5.0, 1.0], [-1.0, 5.0]], dtype=torch.float64) / root
    torch.testing.assert_close(a.grad, (-torch.eye(2, dtype=torch.float64) + 0.5 * uv) / 2)


def test_nuclear_gradient_is_u_vt_for_a_random_full_rank_matrix():
    a = torch.rand(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    a = (a + torch.eye(5, dtype=torch.float64)).requires_grad_(True)
    L.affinity_graph_loss(a, gamma=1.0)["loss"].backward()
    u, _, vh = torch.linalg.svd(a.detach())
    torch.testing.assert_close(a.grad, (-torch.eye(5, dtype=torch.float64) + u @ vh) / 5)


def test_affinity_graph_loss_without_nuclear_norm():
    a = torch.tensor([[3.0, 1.0], [0.0, 2.0]])
    out = L.affinity_graph_loss(a, gamma=0.5, use_nuclear=False)
    assert out["loss"].item() == pytest.approx(-2.5)
    assert out["nuclear"].item() == 0.0


# ---------------------------------------------------------------------------------------------
# Eq 4, 6, 7

def info_nce(q, k_pos, negatives, tau, negative_mask=None):
    """Eq 4 / 7 on vectors: L2-normalised cosines into the loss the method computes."""
    q, k_pos, negatives = (F.normalize(t, dim=-1) for t in (q, k_pos, negatives))
    neg_sim = (q @ negatives.T if negatives.ndim == 2
               else torch.einsum("md,mnd->mn", q, negatives))
    return L.info_nce_from_similarities((q * k_pos).sum(-1), neg_sim, tau, negative_mask)


def direct_info_nce(q, k, negs, tau):
    q, k, negs = F.normalize(q, dim=-1), F.normalize(k, dim=-1), F.normalize(negs, dim=-1)
    out = []
    for i in range(q.shape[0]):
        pos = math.exp(float(q[i] @ k[i]) / tau)
        neg = sum(math.exp(float(q[i] @ n) / tau) for n in (negs if negs.ndim == 2 else negs[i]))
        out.append(-math.log(pos / (pos + neg)))
    return sum(out) / len(out)


def test_info_nce_matches_the_direct_formula():
    g = torch.Generator().manual_seed(0)
    q, k, negs = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g), \
        torch.randn(6, 8, generator=g)
    assert info_nce(q, k, negs, 0.5).item() == pytest.approx(direct_info_nce(q, k, negs, 0.5),
                                                               rel=1e-5)
    per_anchor = torch.randn(4, 3, 8, generator=g)
    assert info_nce(q, k, per_anchor, 0.2).item() == pytest.approx(
        direct_info_nce(q, k, per_anchor, 0.2), rel=1e-5)


def test_info_nce_mask_drops_negatives_and_is_stable_at_small_tau():
    g = torch.Generator().manual_seed(1)
    q, k, negs = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g), \
        torch.randn(5, 4, generator=g)
    mask = torch.tensor([[True, False, True, False, False], [False] * 5])
    masked = info_nce(q, k, negs, 0.3, mask)
    first = direct_info_nce(q[:1], k[:1], negs[[0, 2]], 0.3)
    assert masked.item() == pytest.approx(first / 2, rel=1e-5)  # anchor 2 has no negative: 0
    tiny = info_nce(q, q, negs, 1e-4)  # the direct formula overflows at this tau
    assert torch.isfinite(tiny) and tiny.item() >= 0


def test_mixed_hard_negative_coefficient_and_unit_norm():
    n_i = torch.tensor([[[1.0, 0.0]]])
    n_j = torch.tensor([[[0.0, 1.0]]])
    mixed = L.mix_hard_negatives(n_i, n_j, torch.tensor([[0.75]]))
    torch.testing.assert_close(mixed, torch.tensor([[[3.0, 1.0]]]) / math.sqrt(10))
    g = torch.Generator().manual_seed(0)
    n_i, n_j = torch.randn(4, 3, 8, generator=g), torch.randn(4, 3, 8, generator=g)
    many = L.mix_hard_negatives(n_i, n_j, torch.rand(4, 3, generator=g))
    torch.testing.assert_close(many.norm(dim=-1), torch.ones(4, 3))


def test_mix_coefficient_modes():
    diag = torch.tensor([0.9, 0.2, 0.6], requires_grad=True)
    affinity = L.mix_coefficients("affinity", diag, 2)
    torch.testing.assert_close(affinity, torch.tensor([[0.9, 0.9], [0.2, 0.2], [0.6, 0.6]]))
    assert not affinity.requires_grad  # the coefficient is a weight, not a path for gradients
    torch.testing.assert_close(L.mix_coefficients("half", diag, 2), torch.full((3, 2), 0.5))
    first = L.mix_coefficients("random", diag, 4, torch.Generator().manual_seed(5))
    again = L.mix_coefficients("random", diag, 4, torch.Generator().manual_seed(5))
    assert torch.equal(first, again) and first.shape == (3, 4)
    assert ((first >= 0) & (first <= 1)).all() and first.std() > 0
    with pytest.raises(ValueError, match="mix_coefficient"):
        L.mix_coefficients("third", diag, 2)


def test_hard_negative_pairs_are_two_different_allowed_hardest_keys():
    sim = torch.tensor([[0.9, 0.8, 0.1, 0.7, 0.95]])
    mask = torch.tensor([[True, True, True, True, False]])  # 0.95 is a same-class key
    idx_i, idx_j, ok = L.hard_negative_pairs(sim, mask, n_candidates=3, n_mix=50,
                                             generator=torch.Generator().manual_seed(0))
    assert ok.all()
    assert set(idx_i.flatten().tolist()) | set(idx_j.flatten().tolist()) == {0, 1, 3}
    assert (idx_i != idx_j).all()
    # Only one allowed key: every pair needs a disallowed one, so none is valid.
    _, _, none_ok = L.hard_negative_pairs(sim, torch.tensor([[True] + [False] * 4]), 3, 10)
    assert not none_ok.any()


# ---------------------------------------------------------------------------------------------
# Queue, copy-paste, augmentation

def test_enqueue_wraps_around_and_moves_the_pointer():
    queue, labels, ptr = torch.zeros(5, 2), torch.full((5,), -1), torch.zeros(1, dtype=torch.long)
    L.enqueue(queue, labels, ptr, torch.ones(3, 2), torch.tensor([0, 1, 0]))
    assert ptr.item() == 3 and labels.tolist() == [0, 1, 0, -1, -1]
    keys = torch.arange(8.0).view(4, 2)
    L.enqueue(queue, labels, ptr, keys, torch.tensor([1, 1, 2, 2]))
    assert ptr.item() == 2
    assert labels.tolist() == [2, 2, 0, 1, 1]  # slots 3, 4, 0, 1
    torch.testing.assert_close(queue[[3, 4, 0, 1]], keys)
    L.enqueue(queue, labels, ptr, torch.arange(14.0).view(7, 2), torch.arange(7))
    # Only the last 5 of 7 fit, written from slot 2; the pointer is after the last one, slot 2.
    assert labels.tolist() == [5, 6, 2, 3, 4] and ptr.item() == 2


def test_strong_view_keeps_positions_and_varies_per_image():
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(strong_intensity_view(x, 0.0, 0.0, 0.0), x)
    torch.manual_seed(0)
    y = strong_intensity_view(x, 0.2, 0.1, 0.0)  # affine per image: correlation stays 1
    for i in range(2):
        corr = torch.corrcoef(torch.stack([x[i].flatten(), y[i].flatten()]))[0, 1]
        assert corr.item() == pytest.approx(1.0, abs=1e-5)
    assert not torch.allclose(y, x)


# ---------------------------------------------------------------------------------------------
# The method

TINY = {
    "acdc": ({"base_features": 2}, (32, 32)),
    "la": ({"n_filters": 2}, (32, 32, 16)),
}


def tiny_method(dataset: str, **overrides):
    cls = get_method("semi_agcl")
    hparams = cls.hparams_for(dataset, {"contrast_patch": 8, "rampup": 0, "queue_length": 64,
                                        **overrides})
    torch.manual_seed(0)
    method = cls(get_spec(dataset), hparams, TINY[dataset][0], 100)
    method.train()
    return method


def tiny_batch(dataset: str, labeled: int = 2, unlabeled: int = 2) -> Batch:
    spec = get_spec(dataset)
    shape = TINY[dataset][1]
    g = torch.Generator().manual_seed(1)
    return Batch(torch.randn(labeled, 1, *shape, generator=g),
                 torch.randint(0, spec.num_classes, (labeled, *shape), generator=g),
                 torch.randn(unlabeled, 1, *shape, generator=g))


def fill_queue(method) -> None:
    """Keys of every class, so that each anchor has negatives from the first step on."""
    method.queue_labels.copy_(torch.arange(method.queue_labels.numel()) % method.spec.num_classes)


@pytest.mark.parametrize("dataset", ["acdc", "la"])
def test_train_step_is_finite_and_every_term_reaches_head_and_student(dataset, monkeypatch):
    method = tiny_method(dataset)
    fill_queue(method)
    loss, logs = method.train_step(tiny_batch(dataset), 0)
    assert torch.isfinite(loss)
    assert set(logs) >= {"loss_bcp", "loss_reg", "loss_pl_agg", "loss_rw_agg", "n_anchors"}
    assert all(math.isfinite(v) for v in logs.values())
    assert logs["n_anchors"] > 0 and logs["loss_reg"] > 0 and logs["loss_rw_agg"] > 0
    # Without BCP's loss, what is left (the AGCL terms) must still train the student and the head.
    monkeypatch.setattr(bcp_module, "mix_loss", lambda *a, **k: torch.zeros(()))
    method.zero_grad()
    loss, _ = method.train_step(tiny_batch(dataset), 1)
    loss.backward()
    for part in (method.student, method.head):
        grads = [p.grad for p in part.parameters() if p.grad is not None]
        assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in method.teacher.parameters())


@pytest.mark.parametrize("override", [
    {"patch_similarity": "cosine"}, {"patch_similarity": "class_confidence"},
    {"kernel": "gk_l1"}, {"nuclear_norm": False},
    {"mix_coefficient": "half"}, {"mix_coefficient": "random"},
    {"agcl_view": "separate"}, {"project_voxels": True},
])
def test_ablation_switches_run(override):
    method = tiny_method("acdc", **override)
    fill_queue(method)
    loss, logs = method.train_step(tiny_batch("acdc"), 0)
    loss.backward()
    assert torch.isfinite(loss)
    assert logs["n_anchors"] > 0


def test_pretraining_is_bcp_alone():
    method = tiny_method("acdc")
    method.start_stage(PRETRAIN, fresh=True)
    loss, logs = method.train_step(tiny_batch("acdc"), 0)
    assert set(logs) == {"loss_pretrain"} and torch.isfinite(loss)


def test_nuclear_switch_changes_the_graph_loss():
    logs = {}
    for flag in (True, False):
        method = tiny_method("acdc", nuclear_norm=flag)
        logs[flag] = {k: float(v) for k, v in method.train_step(tiny_batch("acdc"), 0)[1].items()}
    assert logs[True]["affinity_trace"] == pytest.approx(logs[False]["affinity_trace"])
    n = logs[True]["n_anchors"]
    assert logs[True]["loss_pl_agg"] == pytest.approx(
        (-logs[True]["affinity_trace"] + 0.1 * logs[True]["affinity_nuclear"]) / n, rel=1e-5)
    assert logs[False]["loss_pl_agg"] == pytest.approx(-logs[False]["affinity_trace"] / n, rel=1e-5)


def test_queue_is_checkpointed_and_restored_exactly():
    method = tiny_method("acdc")
    method.train_step(tiny_batch("acdc"), 0)
    state = method.state_dict()
    assert {"queue", "queue_labels", "queue_ptr"} <= set(state)
    assert state["queue_ptr"].item() > 0 and (state["queue_labels"] >= 0).any()
    assert any(key.startswith("teacher_head.") for key in state)
    restored = tiny_method("acdc")
    restored.load_state_dict(state)
    assert torch.equal(restored.queue, method.queue)
    assert torch.equal(restored.queue_labels, method.queue_labels)
    assert torch.equal(restored.queue_ptr, method.queue_ptr)


def test_teachers_start_from_the_pretrained_student_then_follow_by_ema():
    method = tiny_method("acdc")
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.1)
    head_ids = {id(p) for p in method.head.parameters()}
    assert head_ids <= {id(p) for group in optimizer.param_groups for p in group["params"]}

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))

    method.start_stage(PRETRAIN, fresh=True)
    teacher_before = [p.clone() for p in method.teacher.parameters()]
    for step in range(2):
        loss, _ = method.train_step(tiny_batch("acdc"), step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.after_optimizer_step(step)
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, method.teacher.parameters()))
    method.start_stage(MAIN, fresh=True)  # the engine's stage boundary
    assert same(method.teacher, method.student) and same(method.teacher_head, method.head)
    loss, _ = method.train_step(tiny_batch("acdc"), 0)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    method.after_optimizer_step(0)
    assert not same(method.teacher, method.student)  # an EMA from now on
    assert not same(method.teacher_head, method.head)


def test_bad_hparams_and_batches_are_clear_errors():
    cls = get_method("semi_agcl")
    with pytest.raises(ValueError, match="semi_agcl hparam kernel: expected one of gk_l2, gk_l1"):
        tiny_method("acdc", kernel="gaussian")
    with pytest.raises(HparamError, match="no hyperparameter sigmaa"):
        cls.hparams_for("acdc", {"sigmaa": 1.0})
    with pytest.raises(ValueError, match="2 labeled and 1 unlabeled"):
        tiny_method("acdc").train_step(tiny_batch("acdc", 2, 1), 0)


def test_dataset_defaults():
    cls = get_method("semi_agcl")
    assert all(cls.hparams_for(d)["contrast_patch"] == "auto" for d in ("la", "acdc", "crag"))
    # auto = shortest side // 8: the paper's 32 on ACDC 256x256, 10 on LA 112x112x80
    assert L.resolve_patch_size("auto", (256, 256)) == 32
    assert L.resolve_patch_size("auto", (112, 112, 80)) == 10
    assert L.resolve_patch_size("auto", (48, 48)) == 6 and L.resolve_patch_size("auto", (5, 9)) == 1
    assert L.resolve_patch_size(12, (48, 48)) == 12
    assert cls.hparams_for("acdc")["pretrain_iterations"] == 10000  # BCP's, inherited
    assert cls.hparams_for("la")["tau"] == 0.07 and cls.hparams_for("la")["ema_decay"] == 0.99


def test_default_weights_and_ramp_combine_the_terms_as_documented():
    cls = get_method("semi_agcl")
    la, acdc = cls.hparams_for("la"), cls.hparams_for("acdc")
    assert (la["w_reg"], la["w_pl"], la["w_rw"]) == (0.0, 1.0, 0.1)  # Eq 4 counted once
    assert (la["rampup"], acdc["rampup"], la["rampup_epoch_iterations"]) == (7, 20, 150)
    method = tiny_method("acdc", rampup=2, rampup_epoch_iterations=10)
    fill_queue(method)
    loss, logs = method.train_step(tiny_batch("acdc"), 15)  # "epoch" 15 // 10 = 1 of 2
    logs = {k: float(v) for k, v in logs.items()}
    ramp = math.exp(-5 * (1 - 1 / 2) ** 2)
    assert logs["agcl_ramp"] == pytest.approx(ramp)
    expected = logs["loss_bcp"] + ramp * (logs["loss_pl_agg"] + 0.1 * logs["loss_rw_agg"])
    assert logs["loss_reg"] > 0  # computed and logged, not added
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)


def test_with_every_agcl_weight_zero_it_trains_bit_identically_to_bcp(tiny_project):
    from pathlib import Path

    from agcl.config import load_config
    from agcl.engine.trainer import Trainer
    from agcl.runtime.runfolder import FINAL
    from tests.test_pipeline import prepare

    prepare(tiny_project, "la")
    config = load_config(tiny_project)
    off = {"w_reg": 0.0, "w_pl": 0.0, "w_rw": 0.0, "pretrain_iterations": 2}
    runs = {"bcp": {"pretrain_iterations": 2}, "semi_agcl": off}
    for name, overrides in runs.items():
        Trainer(config, "la", name, 0.2, 0, Path(f"runs/{name}"), progress=False,
                overrides=overrides).run()
    ours, base = (torch.load(Path(f"runs/{n}") / FINAL, weights_only=True)["state_dict"]
                  for n in ("semi_agcl", "bcp"))
    assert ours.keys() == base.keys()
    for key, value in base.items():
        assert torch.equal(ours[key], value), key
    # and the AGCL terms do change training when they are on
    Trainer(config, "la", "semi_agcl", 0.2, 0, Path("runs/on"), progress=False,
            overrides={"pretrain_iterations": 2}).run()
    on = torch.load(Path("runs/on") / FINAL, weights_only=True)["state_dict"]
    assert any(not torch.equal(on[k], v) for k, v in base.items())
    # train_log.csv carries the anchors of each class and the queue fill of the main stage
    import csv

    from agcl.runtime.runfolder import LOG_CSV

    with open(Path("runs/on") / LOG_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    main = [r for r in rows if r.get("anchors_class0")]
    assert main and {"anchors_class0", "anchors_class1", "queue_fill"} <= set(rows[0])
    assert float(main[-1]["queue_fill"]) > 0


# ---------------------------------------------------------------------------------------------
# Patch geometry, checked with the config

CPU_TRAIN = {"patch": [48, 48], "batch_size": 8, "labeled_batch_size": 4, "iterations": 1000}
WHERE = "datasets.acdc.hparams.semi_agcl"


def geometry(dataset="acdc", train=None, **hparams):
    from agcl.methods.semi_agcl.geometry import patch_geometry

    cls = get_method("semi_agcl")
    spec = get_spec(dataset)
    hp = cls.hparams_for(dataset, hparams)
    train = {**CPU_TRAIN, **(train or {})}
    return patch_geometry(hp, train, spec.num_classes), cls.check_recipe(hp, train, spec)


def test_patch_geometry_by_hand():
    # 32 on 48x48: one whole patch per image; 2 unlabeled images per mix -> 2 kept a step
    geo, problems = geometry(contrast_patch=32)
    assert (geo["grid"], geo["per_image"], geo["kept"], geo["per_class"]) == ([1, 1], 1, 2, 0)
    assert problems == [(f"contrast_patch 32 on a 48x48 crop gives 1 patch per image (needs >= 16): "
                         f"set {WHERE}.contrast_patch <= 12")]  # 48 // 12 = 4 -> 16; 48 // 13 = 3 -> 9
    # 8 on 48x48: a 6x6 grid, 2 x 36 = 72 kept, 18 per class of 4 > the 64 // 4 = 16 quota
    geo, problems = geometry(contrast_patch=8, rampup=5, rampup_epoch_iterations=10)
    assert (geo["per_image"], geo["kept"], geo["per_class"], geo["keys"]) == (36, 72, 16, 64)
    assert geo["fill_steps"] == 32 and geo["fill_by"] == 50 and problems == []
    # auto: 48 // 8 = 6, an 8x8 grid; LA's paper crop 112x112x80 -> 10, an 11x11x8 grid
    assert geometry()[0]["patch"] == 6 and geometry()[0]["per_image"] == 64
    la, _ = geometry("la", {"patch": [112, 112, 80]})
    assert (la["patch"], la["grid"], la["per_image"], la["kept"]) == (10, [11, 11, 8], 968, 1936)
    assert (la["quota"], la["keys"]) == (32, 64)  # 2 classes: 64 // 2 anchors each
    # Only patches no box face crosses are sure above coverage 0.5: 64 - 2 x 8 - 2 x 8 = 32
    assert geometry(min_patch_coverage=0.75)[0]["kept"] == 2 * 32
    assert geometry(agcl_view="separate")[0]["kept"] == 4 * 64  # whole unlabeled images


def test_queue_that_cannot_fill_before_the_ramp_ends_is_refused():
    _, problems = geometry(queue_length=4096, rampup=5, rampup_epoch_iterations=10)
    assert problems == [(
        f"queue_length 4096 at 64 keys per step (at most) fills after 64 steps, but the ramp ends "
        f"at step 50 (rampup 5 x rampup_epoch_iterations 10): set {WHERE}.queue_length <= 3200 "
        f"or a longer ramp")]
    _, problems = geometry(train={"iterations": 200}, rampup=0)  # 2048 / 64 = 32 > 20 steps
    assert len(problems) == 1 and "with rampup 0 it must fill within 10% of the 200 main-stage " \
        f"iterations (20 steps): set {WHERE}.queue_length <= 1280" in problems[0]
    assert geometry(train={"iterations": 200}, rampup=0, queue_length=1280)[1] == []


def test_too_few_anchors_per_class_is_refused():
    _, problems = geometry(n_patches=8)
    assert problems == [(f"n_patches 8 over 4 classes gives 2 anchors per class (needs >= 4): "
                         f"set {WHERE}.n_patches >= 16")]
    # Coverage 0.75, batch 4 (1 unlabeled image per mix), 12 on 48: a 4x4 grid whose every patch
    # a box face may cross (16 - 2 x 4 - 2 x 4 = 0 sure). Patch 6 (8x8: 64 - 32 = 32, 8 a class)
    # passes, 7 (6x6: 36 - 24 = 12, 3 a class) does not.
    _, problems = geometry(train={"batch_size": 4, "labeled_batch_size": 2}, contrast_patch=12,
                           min_patch_coverage=0.75)
    assert len(problems) == 1 and "keeps about 0 patches per step, 0 per class" in problems[0]
    assert problems[0].endswith(f"set {WHERE}.contrast_patch <= 6")


def test_geometry_is_not_checked_when_no_agcl_term_is_on():
    assert geometry(contrast_patch=32, w_reg=0.0, w_pl=0.0, w_rw=0.0)[1] == []


def test_agcl_train_refuses_a_bad_geometry_and_every_shipped_config_passes():
    from pathlib import Path

    from agcl.config import ConfigError, load_config
    from agcl.config.recipe import resolve_recipe

    root = Path(__file__).resolve().parents[1] / "config"
    study = load_config(root / "cpu_study.yaml")
    with pytest.raises(ConfigError, match=r"datasets\.acdc: semi_agcl: contrast_patch 32 on a 48x48 "
                       r"crop gives 1 patch per image \(needs >= 16\): set datasets\.acdc\."
                       r"hparams\.semi_agcl\.contrast_patch <= 12"):
        resolve_recipe(study, "acdc", "semi_agcl", overrides={"contrast_patch": 32})
    shipped = [("demo.yaml",), ("cpu_study.yaml",), ("cpu_study.yaml", "cpu_study_terms.yaml"),
               ("config.yaml",), ("reference.yaml",), ("config.yaml", "ablations.yaml")]
    for files in shipped:
        config = load_config(*(root / f for f in files))
        for dataset in config["datasets"]:
            for method in config["methods"]:
                if method.startswith("semi_agcl"):
                    resolve_recipe(config, dataset, method)  # raises on a bad geometry


def test_anchors_per_class_and_queue_fill_are_logged_as_tensors():
    method = tiny_method("acdc")
    _, logs = method.train_step(tiny_batch("acdc"), 0)
    counts = [logs[f"anchors_class{k}"] for k in range(4)]
    assert all(torch.is_tensor(c) and not c.requires_grad for c in counts)
    assert float(sum(counts)) == pytest.approx(float(logs["n_anchors"])) and float(counts[0]) > 0
    # the queue started empty and holds this step's keys now: one per anchor
    assert float(logs["queue_fill"]) == pytest.approx(float(logs["n_anchors"]) / 64)
