"""The contract every registered method keeps with the engine (DomainBed / timm style).

Parametrized over `list_methods()`, so a new method file is tested here without an edit: one
train_step gives a finite scalar loss and a dict of floats, backward reaches only the trainable
parameters, the unlabeled images reach the student (the check that catches USB's Mean Teacher
bug), hparams are deterministic and strict, state_dict round-trips, and bf16 autocast works.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from agcl.data.specs import SPECS
from agcl.methods.base import Batch, HparamError
from agcl.methods.hparams import ReadTrackedHparams
from agcl.methods.registry import get_method, list_methods
from agcl.runtime.random_streams import RandomStreams
from tests.conftest import cpu_bf16_autocast, onednn_disabled

METHODS = list_methods()
MeanTeacher = get_method("mean_teacher")
# (dataset, smallest net widths, patch): one 3D and one 2D spec. The 3D patch keeps two values
# per channel at the bottleneck, so BatchNorm also works on BCP's half-batches of one image.
SPEC_CASES = {"la": ({"n_filters": 2}, (16, 16, 32)), "acdc": ({"base_features": 2}, (32, 32))}
TOTAL_ITERATIONS = 100_000
LATE_STEP = TOTAL_ITERATIONS - 1  # every consistency ramp (<= 200 x 150 iterations) is at full weight
# Only to make the gradient check meaningful on untrained nets: their near-uniform 4-class
# predictions have entropy ~ln 4 > ln 2, so UA-MT's mask would be empty and its loss zero.
# ad_mt: at ACDC's conf_threshold 0.95 no pixel of these tiny untrained nets is confident, so
# (as in the reference) the unlabeled loss has no gradient at initialisation
GRADIENT_CHECK_HPARAMS = {"ua_mt": {"threshold_ceiling": 10.0}, "ad_mt": {"conf_threshold": 0.0}}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_method(name: str, dataset: str, seed: int = 0, method_cls=None, **overrides) -> nn.Module:
    cls = method_cls or get_method(name)
    reason = cls.unsupported(SPECS[dataset])
    if reason:  # e.g. a 3D-only reference on ACDC: the config must skip it (config_checks)
        pytest.skip(f"{name}: {reason}")
    net_kwargs, _ = SPEC_CASES[dataset]
    torch.manual_seed(seed)
    method = cls(SPECS[dataset], cls.hparams_for(dataset, overrides), net_kwargs, TOTAL_ITERATIONS)
    return method.train()  # as the engine does before its loop


def make_batch(dataset: str, seed: int = 1, n_labeled: int = 2, n_unlabeled: int = 2) -> Batch:
    spec, (_, patch) = SPECS[dataset], SPEC_CASES[dataset]
    gen = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(n_labeled, spec.in_channels, *patch, generator=gen),
                 torch.randint(0, spec.num_classes, (n_labeled, *patch), generator=gen),
                 torch.randn(n_unlabeled, spec.in_channels, *patch, generator=gen))


def with_extra_unlabeled(method, batch: Batch) -> Batch:
    """The batch with the method's extra unlabeled batches (UniMatch's CutMix source), as the
    engine's sampler adds them: other unlabeled images (here the batch's own, rolled and
    rescaled, so that they move with x_unlabeled)."""
    wanted = type(method).extra_unlabeled_batches
    if not wanted or batch.x_unlabeled_extra:
        return batch
    x_u = batch.x_unlabeled
    return Batch(batch.x_labeled, batch.y_labeled, x_u,
                 [x_u.roll(k + 1, dims=0).flip(-1) * (1.0 - 0.1 * k) for k in range(wanted)])


def run_step(method, batch: Batch, step: int, seed: int = 123):
    torch.manual_seed(seed)  # same dropout masks in runs that are compared
    return method.train_step(with_extra_unlabeled(method, batch), step)


def student_gradient(method, batch: Batch, step: int) -> torch.Tensor:
    method.zero_grad(set_to_none=True)
    loss, _ = run_step(method, batch, step)
    loss.backward()
    return torch.cat([torch.zeros(p.numel()) if p.grad is None else p.grad.flatten()
                      for p in method.inference_net().parameters()])


def unlabeled_reaches_student(method, batch: Batch, step: int, freeze_batchnorm: bool = True):
    """Does changing only x_unlabeled change the student's gradient?

    BatchNorm is frozen first: with batch statistics the labeled images' supervised loss already
    depends on the unlabeled images (one forward pass), which would hide a consistency term that
    never reaches the student. Each run uses a fresh copy, so state a step mutates cannot leak.
    """
    if freeze_batchnorm:
        for module in method.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    other = Batch(batch.x_labeled, batch.y_labeled, batch.x_unlabeled.flip(0) * 2.0 + 0.5)
    first = student_gradient(copy.deepcopy(method), batch, step)
    # The comparison below is exact, so the step itself must be repeatable bit for bit.
    assert torch.equal(first, student_gradient(copy.deepcopy(method), batch, step))
    second = student_gradient(copy.deepcopy(method), other, step)
    return not torch.equal(first, second)


@pytest.mark.parametrize("dataset", sorted(SPEC_CASES))
@pytest.mark.parametrize("name", METHODS)
def test_train_step_gives_finite_scalar_loss_log_values_and_gradients(name, dataset):
    method = make_method(name, dataset)
    batch = make_batch(dataset)
    loss, logs = run_step(method, batch, 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    # log values: floats, or detached 0-d tensors that the engine reads once per log row
    assert logs and all(isinstance(k, str) and math.isfinite(float(v))
                        and (type(v) is float or (torch.is_tensor(v) and v.ndim == 0
                                                  and not v.requires_grad))
                        for k, v in logs.items()), logs
    loss.backward()
    trainable = {id(p) for p in method.trainable_parameters()}
    grads = [p.grad for p in method.parameters() if id(p) in trainable and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    untouched = [p for p in method.parameters() if id(p) not in trainable]
    assert all(p.grad is None for p in untouched), "backward reached non-trainable parameters"
    method.after_optimizer_step(0)
    with torch.no_grad():
        out = method.inference_net().eval()(batch.x_labeled)
    assert out.shape == (2, SPECS[dataset].num_classes, *SPEC_CASES[dataset][1])


@pytest.mark.parametrize("dataset", sorted(SPEC_CASES))
@pytest.mark.parametrize("name", METHODS)
def test_unlabeled_images_reach_the_student(name, dataset):
    if not get_method(name).uses_unlabeled:
        pytest.skip(f"{name} does not use unlabeled images")
    method = make_method(name, dataset, **GRADIENT_CHECK_HPARAMS.get(name, {}))
    assert unlabeled_reaches_student(method, make_batch(dataset), LATE_STEP)


class _DetachedStudentMeanTeacher(MeanTeacher):
    """USB's Mean Teacher bug: the student's unlabeled logits are detached (not registered)."""

    def consistency(self, student_logits, teacher_logits, x_unlabeled, step):
        return super().consistency(student_logits.detach(), teacher_logits, x_unlabeled, step)


@pytest.mark.parametrize("dataset", sorted(SPEC_CASES))
def test_the_gradient_check_catches_a_consistency_loss_that_misses_the_student(dataset):
    method = make_method("", dataset, method_cls=_DetachedStudentMeanTeacher)
    batch = make_batch(dataset)
    logs = run_step(method, batch, LATE_STEP)[1]
    assert logs["loss_cons"] > 0 and logs["cons_weight"] == pytest.approx(0.1)
    assert not unlabeled_reaches_student(method, batch, LATE_STEP)
    # Without frozen BatchNorm the bug would hide behind the shared batch statistics.
    assert unlabeled_reaches_student(make_method("", dataset, method_cls=_DetachedStudentMeanTeacher),
                                     batch, LATE_STEP, freeze_batchnorm=False)


@pytest.mark.parametrize("name", METHODS)
def test_hparams_are_deterministic_and_reject_unknown_keys(name):
    cls = get_method(name)
    for dataset in SPECS:
        hparams = cls.hparams_for(dataset)
        assert hparams == cls.hparams_for(dataset)
        assert set(hparams) == set(cls.hyperparameters)  # declared once, nothing inherited
        json.dumps(hparams)  # recorded in run.json
        hparams[next(iter(hparams))] = "changed"
        assert cls.hparams_for(dataset) != hparams  # a fresh dict every call
        key, value = next(iter(cls.hparams_for(dataset).items()))
        assert cls.hparams_for(dataset, {key: value}) == cls.hparams_for(dataset)
        with pytest.raises(HparamError, match="no_such_hparam"):
            cls.hparams_for(dataset, {"no_such_hparam": 1})


@pytest.mark.parametrize("dataset", sorted(SPEC_CASES))
@pytest.mark.parametrize("name", METHODS)
def test_state_dict_round_trip_reproduces_the_loss(name, dataset):
    source = make_method(name, dataset, seed=0)
    batch = make_batch(dataset)
    loss, _ = run_step(source, batch, 0)
    loss.backward()
    torch.optim.SGD(source.trainable_parameters(), lr=0.1).step()
    source.after_optimizer_step(1)  # EMA teachers now differ from both init and student
    target = make_method(name, dataset, seed=1)
    before = run_step(target, batch, 5)[0].item()
    target.load_state_dict(source.state_dict())
    # A method's random streams are state beside its weights: the engine checkpoints both.
    target.streams = RandomStreams(source.streams.seed)
    target.streams.load_state_dict(source.streams.state_dict())
    expected = run_step(source, batch, 5)[0].item()
    assert run_step(target, batch, 5)[0].item() == expected
    assert before != expected  # different weights give a different loss: the check can fail


@pytest.mark.parametrize("dataset", sorted(SPEC_CASES))
@pytest.mark.parametrize("name", METHODS)
def test_bf16_cpu_autocast_step_is_finite(name, dataset):
    method = make_method(name, dataset)
    with cpu_bf16_autocast():
        assert method.student(make_batch(dataset).x_labeled).dtype == torch.bfloat16
        loss, logs = run_step(method, make_batch(dataset), 0)
    assert torch.isfinite(loss) and all(math.isfinite(v) for v in logs.values())
    with onednn_disabled():
        loss.backward()  # outside autocast, as the engine
    assert all(torch.isfinite(p.grad).all() for p in method.trainable_parameters()
               if p.grad is not None)


@pytest.mark.parametrize("name", METHODS)
def test_every_declared_hyperparameter_is_read_so_none_is_inert(name):
    """A declared name nothing reads would accept `--set name=...` and change nothing: each is
    read by stages(), check_recipe(), the constructor, a step of every stage or the update."""
    cls = get_method(name)
    read = set()
    for dataset in sorted(SPEC_CASES):
        if cls.unsupported(SPECS[dataset]):
            continue
        net_kwargs, patch = SPEC_CASES[dataset]
        hparams = ReadTrackedHparams(cls.hparams_for(dataset))
        train = {"iterations": 10, "lr": 0.01, "schedule": "constant", "step_size": 5,
                 "gamma": 0.1, "patch": list(patch), "batch_size": 4, "labeled_batch_size": 2}
        stages = cls.stages(hparams, train)
        cls.check_recipe(hparams, train, SPECS[dataset])
        torch.manual_seed(0)
        method = cls(SPECS[dataset], hparams, net_kwargs, TOTAL_ITERATIONS).train()
        for stage in stages:
            method.start_stage(stage.name, fresh=True)
            run_step(method, make_batch(dataset), LATE_STEP)
            method.after_optimizer_step(LATE_STEP)
            for update in method.auxiliary_updates():
                method.auxiliary_step(update.name, make_batch(dataset), LATE_STEP)
        read |= hparams.read
    assert set(cls.hyperparameters) - read == set()


@pytest.mark.parametrize("dataset", sorted(SPEC_CASES))
@pytest.mark.parametrize("name", METHODS)
def test_auxiliary_updates_own_their_parameters_and_their_gradients(name, dataset):
    """An auxiliary update (an optimiser of the method's own, e.g. SASSNet's discriminator) owns
    parameters outside trainable_parameters(); its loss is finite and back-propagates into them
    alone, and every parameter of the method is updated by exactly one optimiser or by none."""
    method = make_method(name, dataset)
    updates = method.auxiliary_updates()
    if not updates:
        pytest.skip(f"{name} has no auxiliary update")
    trainable = {id(p) for p in method.trainable_parameters()}
    for update in updates:
        owned = {id(p) for p in update.parameters}
        assert owned and not owned & trainable
        method.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        loss, logs = method.auxiliary_step(update.name, make_batch(dataset), LATE_STEP)
        assert loss.ndim == 0 and torch.isfinite(loss)
        assert all(math.isfinite(float(v)) for v in logs.values())
        loss.backward()
        reached = {id(p) for p in method.parameters() if p.grad is not None}
        assert reached and reached <= owned, "an auxiliary loss reached parameters it does not own"


def test_a_renamed_hyperparameter_names_its_new_spelling():
    cls = get_method("semi_agcl")
    with pytest.raises(HparamError, match="gamma is now nuclear_weight"):
        cls.hparams_for("acdc", {"gamma": 0.1})
    with pytest.raises(HparamError, match="patch_size is now contrast_patch"):
        cls.hparams_for("acdc", {"patch_size": 8})
