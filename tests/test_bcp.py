"""BCP's pieces on hand-computed tensors, and its two stages through the engine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from agcl.common.components import largest_component_per_class_batch as largest_component_per_class
from agcl.config import load_config
from agcl.data.specs import SPECS
from agcl.engine import trainer as trainer_module
from agcl.engine.trainer import Trainer
from agcl.methods.base import MAIN, PRETRAIN, Batch
from agcl.methods.copy_paste import bcp_box_mask, masked_ce, mix_loss
from agcl.methods.dice import dice_batch_squared, dice_per_sample_linear
from agcl.methods.registry import get_method
from agcl.runtime.runfolder import FINAL, LAST, LOG_CSV, PRETRAIN_BEST
from tests.test_pipeline import prepare

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_box_mask_side_and_start_range():
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(200):
        mask = bcp_box_mask((9, 6), 2 / 3, rng)
        zeros = (mask == 0).nonzero()
        assert (mask == 0).sum() == 6 * 4  # int(9 * 2/3) x int(6 * 2/3)
        starts.add((int(zeros[:, 0].min()), int(zeros[:, 1].min())))
    # numpy's randint(0, size - side) upstream: starts 0..2 and 0..1, never the last position
    assert starts == {(r, c) for r in range(3) for c in range(2)}


def test_per_sample_linear_dice_by_hand():
    probs = torch.tensor([[[0.8, 0.4]], [[0.2, 0.6]]]).permute(1, 0, 2)  # (N=1, K=2, 2 voxels)
    target = torch.tensor([[0, 1]])
    # class 0: p (0.8, 0.4), t (1, 0): inter 0.8, union 2.2; class 1: p (0.2, 0.6), t (0, 1)
    d0 = (1.6 + 1e-5) / (2.2 + 1e-5)
    d1 = (1.2 + 1e-5) / (1.8 + 1e-5)
    assert float(dice_per_sample_linear(probs, target)) == pytest.approx(1 - (d0 + d1) / 2)
    mask = torch.tensor([[[1.0, 0.0]]])  # only the first voxel
    d0 = (1.6 + 1e-5) / (1.8 + 1e-5)
    d1 = (0.0 + 1e-5) / (0.2 + 1e-5)
    assert float(dice_per_sample_linear(probs, target, mask)) == pytest.approx(1 - (d0 + d1) / 2)


def test_batch_squared_dice_by_hand():
    probs = torch.tensor([[[0.8, 0.4]], [[0.2, 0.6]]]).permute(1, 0, 2)
    target = torch.tensor([[0, 1]])
    d0 = (2 * 0.8 + 1e-10) / (0.64 + 0.16 + 1 + 1e-10)
    d1 = (2 * 0.6 + 1e-10) / (0.04 + 0.36 + 1 + 1e-10)
    assert float(dice_batch_squared(probs, target)) == pytest.approx(((1 - d0) + (1 - d1)) / 2)


def test_mix_loss_adds_the_two_regions_with_their_weights():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 4, 4)
    t_in, t_out = torch.randint(0, 3, (2, 4, 4)), torch.randint(0, 3, (2, 4, 4))
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, :2] = 1
    probs = torch.softmax(logits, 1)
    expected = (dice_batch_squared(probs, t_in, mask) * 1.0
                + dice_batch_squared(probs, t_out, 1 - mask) * 0.5
                + masked_ce(logits, t_in, mask) * 1.0 + masked_ce(logits, t_out, 1 - mask) * 0.5) / 2
    got = mix_loss(logits, t_in, t_out, mask, 1.0, 0.5, "batch_squared")
    assert float(got) == pytest.approx(float(expected))
    ce = torch.nn.functional.cross_entropy(logits, t_in, reduction="none")
    assert float(masked_ce(logits, t_in, mask)) == pytest.approx(float(ce[:, :2].mean()))


def test_largest_component_uses_full_connectivity_per_sample_and_class():
    labels = torch.zeros(2, 5, 5, dtype=torch.long)
    labels[0, 0, 0] = labels[0, 1, 1] = labels[0, 2, 2] = 1  # diagonal: one component
    labels[0, 4, 4] = 1  # a second, smaller one
    labels[0, 0, 4] = 2  # class 2 alone
    labels[1, 3, :] = 1
    labels[1, 0, 0] = 1
    out = largest_component_per_class(labels, 3)
    assert out[0, 4, 4] == 0 and out[0, 2, 2] == 1 and out[0, 0, 4] == 2
    assert out[1, 3].tolist() == [1] * 5 and out[1, 0, 0] == 0


def make_bcp(dataset: str, **overrides):
    cls = get_method("bcp")
    widths = {"la": {"n_filters": 2}, "acdc": {"base_features": 2}}[dataset]
    torch.manual_seed(0)
    return cls(SPECS[dataset], cls.hparams_for(dataset, overrides), widths, 100).train()


@pytest.mark.parametrize("dataset,labeled_first", [("la", True), ("acdc", False)])
def test_mix_directions_follow_the_reference(dataset, labeled_first, monkeypatch):
    method = make_bcp(dataset)
    method.start_stage(MAIN, fresh=True)
    shape = (2, 1, 16, 16, 32) if dataset == "la" else (2, 1, 32, 32)
    batch = Batch(torch.ones(shape), torch.zeros(shape[:1] + shape[2:], dtype=torch.long),
                  torch.zeros(shape))
    seen = []
    original = method._forward

    def record(net, inputs):
        if net is method.student:
            seen.extend(x.clone() for x in inputs)
        return original(net, inputs)

    monkeypatch.setattr(method, "_forward", record)
    pairs = method.mixed_pairs(batch)
    outside = pairs[0].outside
    # labeled images are ones, unlabeled zeros: a mix is 1 exactly where it shows labeled pixels
    assert torch.equal(seen[0], outside if labeled_first else 1 - outside)
    assert torch.equal(seen[1], 1 - outside if labeled_first else outside)
    assert [p.labeled_outside for p in pairs] == [labeled_first, not labeled_first]


def test_threshold_pseudo_labels_are_foreground_at_one_half():
    method = make_bcp("la", largest_component=False)
    logits = torch.zeros(1, 2, 2, 2, 1)
    logits[0, 1, 0, 0, 0] = 1.0  # p_fg = sigmoid(1) > 0.5
    logits[0, 1, 1, 1, 0] = -1.0
    labels = method.pseudo_labels(logits)
    assert labels[0, 0, 0, 0] == 1 and labels[0, 1, 1, 0] == 0 and labels[0, 0, 1, 0] == 1  # 0.5


def test_stages_declared_per_dataset():
    cls = get_method("bcp")
    train = {"iterations": 15000, "lr": 0.01, "schedule": "step", "step_size": 2500, "gamma": 0.1}
    la = cls.stages(cls.hparams_for("la"), train)
    assert [(s.name, s.iterations) for s in la] == [(PRETRAIN, 2000), (MAIN, 15000)]
    assert la[0].schedule["schedule"] == "constant" and la[1].schedule["schedule"] == "step"
    assert not la[1].keep_optimizer_state
    acdc = cls.stages(cls.hparams_for("acdc"), {**train, "iterations": 30000})
    assert [(s.name, s.iterations) for s in acdc] == [(PRETRAIN, 10000), (MAIN, 30000)]
    assert acdc[1].keep_optimizer_state
    assert [s.name for s in cls.stages(cls.hparams_for("la", {"pretrain_iterations": 0}),
                                       train)] == [MAIN]


# --- through the engine ---------------------------------------------------------------------
def bcp_trainer(config_path: Path, run: Path, dataset: str = "la", **hparams) -> Trainer:
    overrides = {"pretrain_iterations": 3, **hparams}
    return Trainer(load_config(config_path), dataset, "bcp", 0.2, 0, run, progress=False,
                   overrides=overrides)


def weights(run: Path) -> dict:
    return torch.load(run / FINAL, weights_only=True)["state_dict"]


def test_two_stages_run_log_and_record(tiny_project):
    prepare(tiny_project, "la")
    run = Path("runs/bcp")
    trainer = bcp_trainer(tiny_project, run, pretrain_lr=0.05)
    assert trainer.description.total == 3 + 4
    meta = trainer.run()
    log = pd.read_csv(run / LOG_CSV)
    assert list(log["step"]) == list(range(1, 8))
    assert list(log["stage"]) == [PRETRAIN] * 3 + [MAIN] * 4
    assert list(log["stage_step"]) == [1, 2, 3, 1, 2, 3, 4]
    assert list(log["lr"]) == pytest.approx([0.05] * 3 + [0.01] * 4)  # each stage its schedule
    assert [s["name"] for s in meta["stages"]] == [PRETRAIN, MAIN]
    assert meta["stages"][0]["selected_step"] == 3 and meta["stages"][0]["selection"] == "last"
    assert (meta["stages"][1]["first_step"], meta["stages"][1]["last_step"]) == (4, 7)
    assert meta["iterations"] == 7
    assert json.loads((run / "run.json").read_text())["stages"] == meta["stages"]


def test_teacher_starts_the_main_stage_from_the_pretrained_student(tiny_project, monkeypatch):
    prepare(tiny_project, "la")
    seen = {}
    original = get_method("bcp").start_stage

    def spy(self, name, fresh):
        original(self, name, fresh)
        if name == MAIN:
            seen["equal"] = all(torch.equal(a, b) for a, b in zip(
                self.teacher.state_dict().values(), self.student.state_dict().values()))
            seen["fresh"] = fresh

    monkeypatch.setattr(get_method("bcp"), "start_stage", spy)
    bcp_trainer(tiny_project, Path("runs/bcp")).run()
    assert seen == {"equal": True, "fresh": True}


@pytest.mark.parametrize("kill_at", [2, 5])  # inside pre-training, inside the main stage
def test_kill_in_either_stage_resumes_to_identical_weights(tiny_project, monkeypatch, kill_at):
    prepare(tiny_project, "la")
    config = yaml_config(tiny_project, checkpoint_every=1)
    straight = Path("runs/straight")
    bcp_trainer(config, straight).run()
    killed = Path("runs/killed")
    original = trainer_module.Trainer._step

    def dying(self, *args):
        if args[-1].step + 1 == kill_at:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(trainer_module.Trainer, "_step", dying)
    with pytest.raises(KeyboardInterrupt):
        bcp_trainer(config, killed).run()
    monkeypatch.setattr(trainer_module.Trainer, "_step", original)
    assert (killed / LAST).exists()
    meta = bcp_trainer(config, killed).run()
    assert meta["resumed_at_steps"] == [kill_at - 1]
    for key, value in weights(straight).items():
        assert torch.equal(value, weights(killed)[key]), key
    assert list(pd.read_csv(killed / LOG_CSV)["step"]) == list(range(1, 8))


def yaml_config(path: Path, **train) -> Path:
    import yaml

    config = yaml.safe_load(path.read_text())
    config["datasets"]["la"]["train"].update(train)
    path.write_text(yaml.safe_dump(config))
    return path


def test_best_val_pretraining_hands_on_its_best_weights(tiny_project, monkeypatch):
    from agcl.runtime.runfolder import RunFolder

    prepare(tiny_project, "acdc")
    run = Path("runs/acdc")
    scores = iter([0.9, 0.3, 0.1, 0.5])  # pretrain: val at its steps 2 and 3; main: 2 and 4
    monkeypatch.setattr(trainer_module.Trainer, "_validate", lambda self, m, c: next(scores))
    saved, handed = {}, {}
    save = RunFolder.save_checkpoint

    def spy_save(self, name, payload, resume_step=None):
        if name == PRETRAIN_BEST:
            saved[payload["step"]] = {k[len("student."):]: v.clone()
                                      for k, v in payload["method"].items()
                                      if k.startswith("student.")}
        return save(self, name, payload, resume_step)

    original = get_method("bcp").start_stage

    def spy_stage(self, name, fresh):
        if name == MAIN:
            handed.update({k: v.clone() for k, v in self.student.state_dict().items()})
        original(self, name, fresh)

    monkeypatch.setattr(RunFolder, "save_checkpoint", spy_save)
    monkeypatch.setattr(get_method("bcp"), "start_stage", spy_stage)
    meta = Trainer(load_config(tiny_project), "acdc", "bcp", 0.1, 0, run, progress=False,
                   overrides={"pretrain_iterations": 3}).run()
    pre = meta["stages"][0]
    assert pre["selection"] == "best_val" and pre["selected_step"] == 2
    assert pre["selected_val_dice"] == pytest.approx(0.9)
    assert list(saved) == [2]  # only the best pre-training state was kept
    assert all(torch.equal(handed[k], v) for k, v in saved[2].items())
    assert meta["best_val_step"] == 7  # the main stage's own best (its step 4)
    assert not (run / PRETRAIN_BEST).exists()  # removed once the run is finished


def test_a_stage_that_keeps_the_optimiser_takes_the_momentum_of_the_selected_weights(
        tiny_project, monkeypatch):
    """BCP's ACDC code saves model and optimiser together at the best val (save_net_opt) and
    self-training loads both (load_net_opt): the momentum handed on is the best step's, not the
    last pre-training step's."""
    from agcl.runtime.runfolder import RunFolder

    prepare(tiny_project, "acdc")
    scores = iter([0.9, 0.3, 0.1, 0.5])  # pretrain: val at its steps 2 and 3 (best: 2)
    monkeypatch.setattr(trainer_module.Trainer, "_validate", lambda self, m, c: next(scores))
    saved, handed = {}, {}
    save = RunFolder.save_checkpoint

    def momenta(optimizer_state):
        return {k: v["momentum_buffer"].clone() for k, v in optimizer_state["state"].items()}

    def spy_save(self, name, payload, resume_step=None):
        if name == PRETRAIN_BEST:
            saved[payload["step"]] = momenta(payload["optimizer"])
        return save(self, name, payload, resume_step)

    next_stage = trainer_module.Trainer._next_stage

    def spy_next_stage(self, parts, state):
        last = momenta(parts.optimizer.state_dict())
        next_stage(self, parts, state)
        handed.update(last=last, now=momenta(parts.optimizer.state_dict()))

    monkeypatch.setattr(RunFolder, "save_checkpoint", spy_save)
    monkeypatch.setattr(trainer_module.Trainer, "_next_stage", spy_next_stage)
    trainer = Trainer(load_config(tiny_project), "acdc", "bcp", 0.1, 0, Path("runs/acdc"),
                      progress=False, overrides={"pretrain_iterations": 3})
    assert trainer.description.stages[1].keep_optimizer_state  # ACDC's recipe
    trainer.run()
    assert list(saved) == [2] and saved[2]
    assert handed["now"].keys() == saved[2].keys()
    assert all(torch.equal(handed["now"][k], saved[2][k]) for k in saved[2])
    assert any(not torch.equal(handed["last"][k], saved[2][k]) for k in saved[2])
