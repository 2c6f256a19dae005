"""Common random numbers: two methods at one seed see the same batches, box masks and dropout
masks, and a method's own draws (Semi-AGCL's strong view, hard negatives) shift nobody else's."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from agcl.config import load_config
from agcl.data.loaders import PatchSampler
from agcl.data.specs import SPECS
from agcl.engine import trainer as trainer_module
from agcl.engine.trainer import Trainer
from agcl.methods.base import MAIN, Batch
from agcl.methods.copy_paste import CopyPasteTeacher as BCP
from agcl.methods.registry import get_method
from agcl.runtime.random_streams import (
    RandomStreams,
    building,
    numpy_stream,
    seed_globals,
    seed_sequence,
    stream_seed,
    torch_stream,
)
from agcl.runtime.runfolder import FINAL, LAST, LOG_CSV
from tests.test_pipeline import prepare
from tests.test_sampler import random_set

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PURPOSES = ["labeled_batches", "unlabeled_batches", "box_mask", "strong_view", "hard_negatives",
            "mix_coefficients", "teacher_noise", "uncertainty_noise", "projection_head", "step"]


# --- the streams ------------------------------------------------------------------------------
def test_stream_seeds_are_seedsequence_of_seed_and_purpose_bytes():
    for seed in (0, 1, 12345):
        for purpose in ("box_mask", "step", "é"):
            code = purpose.encode("utf-8")
            fresh = np.random.SeedSequence(seed, spawn_key=(len(code), *code))
            assert stream_seed(seed, purpose) == int(fresh.generate_state(1, np.uint64)[0])
            np.testing.assert_array_equal(numpy_stream(seed, purpose).integers(0, 2**62, 8),
                                          np.random.default_rng(fresh).integers(0, 2**62, 8))
    step = np.random.SeedSequence(3, spawn_key=(4, *b"step", 17))
    np.testing.assert_array_equal(seed_sequence(3, "step", 17).generate_state(4),
                                  step.generate_state(4))


def test_stream_seeds_differ_across_purposes_seeds_and_steps():
    seeds = {stream_seed(seed, purpose) for seed in range(5) for purpose in PURPOSES}
    assert len(seeds) == 5 * len(PURPOSES)
    # a purpose that is a prefix of another, or whose bytes look like an index, is no collision
    keys = [("a",), ("a", 98), ("ab",), ("ab", 0), ("b",)]
    assert len({stream_seed(0, *key) for key in keys}) == len(keys)
    assert len({stream_seed(0, "step", t) for t in range(1000)}) == 1000


def test_stream_seeds_are_the_same_in_another_process():
    code = ("from agcl.runtime.random_streams import stream_seed; "
            f"print([stream_seed(s, p) for s in (0, 7) for p in {PURPOSES!r}])")
    env = {**os.environ, "PYTHONHASHSEED": "12345",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == str([stream_seed(s, p) for s in (0, 7) for p in PURPOSES])


@pytest.mark.parametrize("bad", [("", ()), ("box_mask", (-1,)), ("box_mask", (2**32,))])
def test_bad_purposes_and_indices_are_clear_errors(bad):
    purpose, index = bad
    with pytest.raises(ValueError, match="expected"):
        seed_sequence(0, purpose, *index)


def test_streams_resume_exactly_including_streams_not_used_yet():
    streams = RandomStreams(4)
    streams.numpy("box_mask").integers(0, 10, 5)
    torch.rand(3, generator=streams.torch("strong_view"))
    state = streams.state_dict()
    want = (streams.numpy("box_mask").integers(0, 10, 5),
            torch.rand(3, generator=streams.torch("strong_view")))
    later = RandomStreams(4)
    later.numpy("box_mask").integers(0, 10, 50)  # drawn before the load: overwritten by it
    later.numpy("teacher_noise")  # not in the checkpoint: back to its start
    later.load_state_dict(state)
    np.testing.assert_array_equal(later.numpy("box_mask").integers(0, 10, 5), want[0])
    assert torch.equal(torch.rand(3, generator=later.torch("strong_view")), want[1])
    assert later.numpy("teacher_noise").random() == numpy_stream(4, "teacher_noise").random()
    with pytest.raises(ValueError, match="expected seed 5"):
        RandomStreams(5).load_state_dict(state)
    with pytest.raises(ValueError, match="expected one device per purpose"):
        later.torch("strong_view", "meta")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_streams_draw_on_cuda_and_resume():
    streams = RandomStreams(2)
    generator = streams.torch("strong_view", "cuda")
    assert generator.device.type == "cuda"
    torch.rand(5, generator=generator, device="cuda")
    state = streams.state_dict()
    want = torch.rand(5, generator=generator, device="cuda")
    later = RandomStreams(2)
    later.load_state_dict({**state, "torch": {k: v.cuda() for k, v in state["torch"].items()}})
    assert torch.equal(torch.rand(5, generator=later.torch("strong_view", "cuda"), device="cuda"),
                       want)
    assert torch_stream(2, "x", "cuda").initial_seed() == stream_seed(2, "x")


def test_global_seeds_per_step_ignore_what_was_drawn_before():
    seed_globals(3, 10)
    want = torch.rand(4), np.random.random(), __import__("random").random()
    torch.rand(1000)
    np.random.random(7)
    seed_globals(3, 10)
    assert torch.equal(torch.rand(4), want[0]) and np.random.random() == want[1]
    assert __import__("random").random() == want[2]
    seed_globals(3, 11)
    assert not torch.equal(torch.rand(4), want[0])


# --- the sampler ------------------------------------------------------------------------------
def test_labeled_batches_do_not_depend_on_the_unlabeled_batch():
    """supervised (no unlabeled images) and a semi-supervised method draw the same labeled
    crops and flips, over several epochs of the pool of 3 labeled images."""
    data = random_set([(30, 26), (24, 40), (20, 30), (26, 26), (28, 22)])
    alone = PatchSampler(data, [24, 24], 2, 0, seed=5, augmentation="rot_flip_or_rotate")
    paired = PatchSampler(data, [24, 24], 2, 3, seed=5, augmentation="rot_flip_or_rotate")
    for _ in range(30):
        x_a, y_a, none = alone.next_batch()
        x_p, y_p, x_u = paired.next_batch()
        assert none is None and x_u.shape[0] == 3
        assert torch.equal(x_a, x_p) and torch.equal(y_a, y_p)
    state = paired.state_dict()
    want = paired.next_batch()
    again = PatchSampler(data, [24, 24], 2, 3, seed=5, augmentation="rot_flip_or_rotate")
    again.load_state_dict(state)
    for got, w in zip(again.next_batch(), want):
        assert torch.equal(got, w)
    with pytest.raises(ValueError, match="expected the RNG states of the streams labeled"):
        again.load_state_dict({"rng": {}, "queues": {}})


# --- methods on their own ---------------------------------------------------------------------
def build(name: str, seed: int = 0):
    cls = get_method(name)
    small = {"queue_length": 64} if name == "semi_agcl" else {}
    with building(RandomStreams(seed)):
        return cls(SPECS["la"], cls.hparams_for("la", small), {"n_filters": 2}, 100)


def tiny(name: str):
    method = build(name)
    method.train().start_stage(MAIN, fresh=True)
    return method


def tiny_batch() -> Batch:
    g = torch.Generator().manual_seed(1)
    shape = (16, 16, 32)
    return Batch(torch.randn(2, 1, *shape, generator=g), torch.randint(0, 2, (2, *shape), generator=g),
                 torch.randn(2, 1, *shape, generator=g))


def test_a_methods_own_draws_do_not_shift_the_box_masks():
    bcp, ours = tiny("bcp"), tiny("semi_agcl")
    batch = tiny_batch()
    for step in range(3):
        masks = [m.mixed_pairs(batch)[0].outside for m in (bcp, ours)]
        assert torch.equal(masks[0], masks[1])
        ours._strong(batch.x_unlabeled)  # extra strong-view noise, drawn by semi_agcl alone
    assert "strong_view" in ours.streams.state_dict()["torch"]
    assert "strong_view" not in bcp.streams.state_dict()["torch"]
    # and the masks do vary from step to step: the check above could fail
    assert not torch.equal(bcp.box_mask(batch.x_labeled), bcp.box_mask(batch.x_labeled))


def test_the_projection_head_is_built_from_its_own_stream():
    a, b = tiny("semi_agcl"), tiny("semi_agcl")
    assert all(torch.equal(x, y) for x, y in zip(a.head.parameters(), b.head.parameters()))
    assert torch.equal(a.queue, b.queue)
    assert not torch.equal(a.queue, build("semi_agcl", seed=1).queue)
    # the head's draws leave the global RNG where BCP leaves it
    after = {}
    for name in ("bcp", "semi_agcl"):
        torch.manual_seed(9)
        build(name)
        after[name] = torch.rand(3)
    assert torch.equal(after["bcp"], after["semi_agcl"])


# --- through the engine -----------------------------------------------------------------------
def digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def record_draws(monkeypatch) -> dict[str, list]:
    """Patch the sampler and BCP to record, per run: the batches, the box masks, and the
    global RNG state at each of BCP's forward passes (what its dropout masks come from)."""
    seen = {"labeled": [], "unlabeled": [], "box": [], "rng_at_forward": [], "method": []}
    next_batch, box_mask, forward = PatchSampler.next_batch, BCP.box_mask, BCP._forward

    def batches(self):
        x_l, y_l, x_u = next_batch(self)
        seen["labeled"].append(digest(x_l) + digest(y_l))
        seen["unlabeled"].append(None if x_u is None else digest(x_u))
        return x_l, y_l, x_u

    def boxes(self, x):
        mask = box_mask(self, x)
        seen["box"].append(digest(mask))
        seen["method"][:] = [self]
        return mask

    def forwards(self, net, inputs):
        seen["rng_at_forward"].append(digest(torch.get_rng_state()))
        return forward(self, net, inputs)

    monkeypatch.setattr(PatchSampler, "next_batch", batches)
    monkeypatch.setattr(BCP, "box_mask", boxes)
    monkeypatch.setattr(BCP, "_forward", forwards)
    return seen


def run(config_path, method: str, out: str, iterations: int, **overrides) -> dict:
    with pytest.MonkeyPatch.context() as patch:
        seen = record_draws(patch)
        Trainer(load_config(config_path), "la", method, 0.2, 0, Path(out), progress=False,
                iterations=iterations, overrides=overrides or None).run()
    return seen


@pytest.mark.parametrize("view, main_steps", [("mixed", 24), ("separate", 6)])
def test_semi_agcl_draws_bcps_batches_box_masks_and_dropout_masks(tiny_project, view, main_steps):
    """AGCL terms on (strong views, hard negatives, the separate view's extra student pass):
    every step still sees BCP's batches and box mask, and BCP's forward passes start from the
    same global RNG state, so their dropout masks are BCP's too."""
    prepare(tiny_project, "la")
    pre = {"pretrain_iterations": 6}
    base = run(tiny_project, "bcp", "runs/bcp", main_steps, **pre)
    ours = run(tiny_project, "semi_agcl", "runs/ours", main_steps, agcl_view=view,
               **pre)
    steps = 6 + main_steps
    assert len(base["labeled"]) == len(ours["labeled"]) == steps
    assert len(base["box"]) == steps and len(set(base["box"])) > 1
    for key in ("labeled", "unlabeled", "box", "rng_at_forward"):
        assert ours[key] == base[key], key
    assert len(base["rng_at_forward"]) == 2 * main_steps  # teacher and student, every main step
    used = ours["method"][0].streams.state_dict()["torch"]
    assert {"strong_view", "hard_negatives"} <= set(used)
    # the terms were on: they changed the trained weights
    ours_w, base_w = (torch.load(Path(d) / FINAL, weights_only=False)["state_dict"]
                      for d in ("runs/ours", "runs/bcp"))
    assert any(not torch.equal(ours_w[k], v) for k, v in base_w.items())


def test_supervised_and_mean_teacher_draw_the_same_labeled_batches(tiny_project):
    prepare(tiny_project, "la")
    sup = run(tiny_project, "supervised", "runs/sup", 20)
    mt = run(tiny_project, "mean_teacher", "runs/mt", 20)
    assert len(sup["labeled"]) == 20 and len(set(sup["labeled"])) == 20
    assert sup["labeled"] == mt["labeled"]
    assert set(sup["unlabeled"]) == {None} and None not in mt["unlabeled"]


@pytest.mark.parametrize("method", ["semi_agcl", "mean_teacher", "sassnet"])
def test_a_killed_run_drawing_from_method_streams_resumes_to_identical_weights(
        tiny_project, monkeypatch, method):
    prepare(tiny_project, "la")
    overrides = {"pretrain_iterations": 2} if method == "semi_agcl" else None
    config = load_config(tiny_project)

    def trainer(out):
        return Trainer(config, "la", method, 0.2, 0, Path(out), progress=False,
                       overrides=overrides)

    trainer("runs/straight").run()
    original = trainer_module.Trainer._step

    def dying(self, *args):
        if args[-1].step + 1 == 4:  # past the checkpoint of step 2 (checkpoint_every 2)
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(trainer_module.Trainer, "_step", dying)
    with pytest.raises(KeyboardInterrupt):
        trainer("runs/killed").run()
    monkeypatch.setattr(trainer_module.Trainer, "_step", original)
    assert "streams" in torch.load(Path("runs/killed") / LAST, weights_only=False)
    meta = trainer("runs/killed").run()
    assert meta["resumed_at_steps"] == [2]
    straight, killed = (torch.load(Path(d) / FINAL, weights_only=False)["state_dict"]
                        for d in ("runs/straight", "runs/killed"))
    for key, value in straight.items():
        assert torch.equal(value, killed[key]), key
    assert len(pd.read_csv(Path("runs/killed") / LOG_CSV)) == meta["iterations"]


def test_a_checkpoint_without_stream_states_is_refused_by_name(tiny_project, monkeypatch):
    from agcl.runtime.runfolder import RunMismatchError

    prepare(tiny_project, "la")
    config = load_config(tiny_project)
    original = trainer_module.Trainer._step

    def dying(self, *args):
        if args[-1].step + 1 == 4:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(trainer_module.Trainer, "_step", dying)
    with pytest.raises(KeyboardInterrupt):
        Trainer(config, "la", "supervised", 0.2, 0, Path("runs/old"), progress=False).run()
    monkeypatch.setattr(trainer_module.Trainer, "_step", original)
    saved = torch.load(Path("runs/old") / LAST, weights_only=False)
    del saved["streams"]  # as an older version wrote it
    torch.save(saved, Path("runs/old") / LAST)
    with pytest.raises(RunMismatchError, match="expected key 'streams'"):
        Trainer(config, "la", "supervised", 0.2, 0, Path("runs/old"), progress=False).run()
    assert (Path("runs/old") / LAST).exists()  # refused, nothing removed
