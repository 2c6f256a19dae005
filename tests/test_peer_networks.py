"""Peer networks are a first-class route: a method declares the networks its loss trains
(`trained_networks()`, each optionally with its own lr scale / momentum / weight decay under the
shared schedule), and the engine refuses, at the first backward, a parameter that got a gradient
but belongs to no optimiser, or a declared network that got none."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from agcl.cli import main
from agcl.methods import registry
from tests.test_pipeline import prepare

# Cross pseudo supervision written as a user would from the README's add-a-baseline section:
# two peer nets, each supervised by the other's hard pseudo-label.
CPS_PLUGIN = '''
import torch
import torch.nn.functional as F

from agcl.methods import Batch, HParam, Method, TrainedNetwork, register_method, require_unlabeled
from agcl.nets import build


@register_method("{name}")
class PeerPlugin(Method):
    hyperparameters = {{"cps_weight": HParam(0.1, low=0.0)}}

    def __init__(self, spec, hparams, net_kwargs, total_iterations):
        super().__init__(spec, hparams, net_kwargs, total_iterations)
        with self.streams.seeded("peer_init"):
            self.peer = build(self.net_name(spec), spec.in_channels, spec.num_classes, **net_kwargs)

    def trained_networks(self):
        return [TrainedNetwork("student", self.student){peer_entry}]

    def train_step(self, batch: Batch, step: int):
        x_u = require_unlabeled(batch, self.name)
        x = torch.cat([batch.x_labeled, x_u])
        a, b = self.student(x), self.peer(x)
        n = batch.x_labeled.shape[0]
        sup = F.cross_entropy(a[:n], batch.y_labeled) + F.cross_entropy(b[:n], batch.y_labeled)
        cps = (F.cross_entropy(a, b.argmax(1).detach()) + F.cross_entropy(b, a.argmax(1).detach()))
        loss = sup + self.hparams["cps_weight"] * cps
        return loss, {{"loss_sup": sup.detach(), "loss_cps": cps.detach()}}
'''


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "_METHODS", dict(registry.registered()))
    monkeypatch.setattr(registry, "_LOADED_DIRS", list(registry._LOADED_DIRS))
    folder = tmp_path / "plugins"
    folder.mkdir()
    yield folder
    for name in [m for m in sys.modules if m.startswith(f"{registry.PLUGIN_PACKAGE}.peer")]:
        del sys.modules[name]


def write_plugin(folder, name, peer_entry):
    (folder / f"{name}.py").write_text(CPS_PLUGIN.format(name=name, peer_entry=peer_entry))


def train(project, folder, method, out, dataset="la"):
    config = project.read_text() + f"plugin_dirs: [{folder}]\n"
    project.write_text(config)
    return main(["train", dataset, "--config", str(project), "--method", method, "--labels",
                 "0.1", "--seed", "0", "--out", str(out), "--no-progress"])


def test_a_peer_network_declared_with_settings_of_its_own_trains(tiny_project, plugin_dir):
    write_plugin(plugin_dir, "peer_cps", ', TrainedNetwork("peer", self.peer, lr_scale=0.5, '
                                         'weight_decay=0.0)')
    prepare(tiny_project, "la")
    run = tiny_project.parent.parent / "run"
    assert train(tiny_project, plugin_dir, "peer_cps", run) == 0
    meta = json.loads((run / "run.json").read_text())
    # both nets are trained, and the compute table counts them both
    assert meta["trainable_parameters"] == 2 * meta["parameters"]
    assert meta["trained_networks"] == {"student": meta["parameters"],
                                        "peer": meta["parameters"]}


def test_the_peer_network_settings_make_their_own_parameter_group():
    from agcl.engine.optimizers import main_optimizer
    from agcl.engine.state import TrainingState
    from agcl.engine.update import Updater
    from agcl.methods.base import Batch, TrainedNetwork

    class Two(torch.nn.Module):
        name = "two"

        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)

        def trained_networks(self):
            return [TrainedNetwork("a", self.a), TrainedNetwork("b", self.b, lr_scale=0.25,
                                                               momentum=0.0, weight_decay=0.5)]

        def trainable_parameters(self):
            return [*self.a.parameters(), *self.b.parameters()]

        def train_step(self, batch, step):
            return (self.a(batch.x_labeled) + self.b(batch.x_labeled)).pow(2).mean(), {}

        def after_optimizer_step(self, step):
            pass

    method = Two()
    optimizer = main_optimizer(method, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4})
    shared, own = optimizer.param_groups
    assert (shared["momentum"], shared["weight_decay"]) == (0.9, 1e-4)
    assert (own["network"], own["momentum"], own["weight_decay"]) == ("b", 0.0, 0.5)
    update = Updater(method, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                     device=torch.device("cpu"), amp_dtype=None, nonfinite="stop",
                     max_consecutive_skips=3, where="toy")
    batch = Batch(torch.ones(4, 2), torch.zeros(4, dtype=torch.long), None)
    update(method, batch, {"lr": 0.08, "schedule": "poly"}, 2, 4, TrainingState())
    # the shared schedule's lr of this step (poly at 2 of 4), times each network's scale
    scheduled = 0.08 * (1 - 2 / 4) ** 0.9
    assert shared["lr"] == pytest.approx(scheduled) and own["lr"] == pytest.approx(0.25 * scheduled)


def test_a_peer_network_left_out_fails_at_the_first_step_naming_a_parameter(tiny_project,
                                                                            plugin_dir, capsys):
    write_plugin(plugin_dir, "peer_forgot", "")  # the peer computes the loss, no optimiser has it
    prepare(tiny_project, "la")
    run = tiny_project.parent.parent / "run"
    assert train(tiny_project, plugin_dir, "peer_forgot", run) == 1
    err = capsys.readouterr().err
    assert "step 1 (first of its stage)" in err
    assert "parameter peer." in err and "no optimiser updates it" in err
    assert not (run / "ckpt_final.pt").exists()


def test_a_declared_network_the_loss_never_uses_is_refused():
    from agcl.engine.optimizers import main_optimizer
    from agcl.engine.state import TrainingState
    from agcl.engine.update import GradientRoutingError, Updater
    from agcl.methods.base import Batch, TrainedNetwork

    class Idle(torch.nn.Module):
        name = "idle"

        def __init__(self):
            super().__init__()
            self.a, self.unused = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)

        def trained_networks(self):
            return [TrainedNetwork("a", self.a), TrainedNetwork("unused", self.unused)]

        def trainable_parameters(self):
            return [*self.a.parameters(), *self.unused.parameters()]

        def train_step(self, batch, step):
            return self.a(batch.x_labeled).pow(2).mean(), {}

        def after_optimizer_step(self, step):
            pass

    method = Idle()
    update = Updater(method, main_optimizer(method, {"lr": 0.1, "momentum": 0.9,
                                                     "weight_decay": 0.0}),
                     torch.amp.GradScaler("cpu", enabled=False), device=torch.device("cpu"),
                     amp_dtype=None, nonfinite="stop", max_consecutive_skips=3, where="toy",
                     last_stage=1)
    batch = Batch(torch.ones(4, 2), torch.zeros(4, dtype=torch.long), None)
    state = TrainingState()
    # a pre-training stage may leave a network out (Semi-AGCL's head before its main stage) ...
    update(method, batch, {"lr": 0.1, "schedule": "constant"}, 0, 4, state)
    # ... the last stage may not
    state.stage = 1
    with pytest.raises(GradientRoutingError, match="trained network 'unused' .*unused.weight.* "
                                                   "received no gradient"):
        update(method, batch, {"lr": 0.1, "schedule": "constant"}, 0, 4, state)


def test_a_peer_can_be_validated_beside_the_evaluated_net_without_being_selected_on(
        tiny_project, plugin_dir):
    import pandas as pd

    write_plugin(plugin_dir, "peer_watched", ', TrainedNetwork("peer", self.peer, validate=True)')
    prepare(tiny_project, "acdc")  # best_val selection, one validation patient
    run = tiny_project.parent.parent / "run"
    assert train(tiny_project, plugin_dir, "peer_watched", run, "acdc") == 0
    log = pd.read_csv(run / "train_log.csv")
    validated = log.dropna(subset=["val_dice"])
    assert len(validated) == 2 and validated["val_dice_peer"].notna().all()
    meta = json.loads((run / "run.json").read_text())
    # selection reads the evaluated net's val_dice only
    assert meta["best_val_dice"] == pytest.approx(validated["val_dice"].max())


# A UniMatch-style method through the documented interfaces only: a weak view's thresholded
# pseudo-label supervises two strong views (photometric jitter, blur, CutMix from an extra
# unlabeled batch) and a feature-perturbed pass (net.encode -> dropout -> net.decode).
UNIMATCH_PLUGIN = """
import torch
import torch.nn.functional as F

from agcl.methods import Batch, HParam, Method, register_method, require_unlabeled
from agcl.methods.augment import brightness_contrast, cutmix_boxes, gaussian_blur, mix


@register_method("peer_unimatch")
class UniMatchStyle(Method):
    extra_unlabeled_batches = 1
    hyperparameters = {"threshold": HParam(0.95, low=0.0, high=1.0)}

    def strong(self, x, g):
        return gaussian_blur(brightness_contrast(x, g), g)

    def train_step(self, batch: Batch, step: int):
        x_u = require_unlabeled(batch, self.name)
        (x_mix,) = batch.x_unlabeled_extra
        g = self.streams.torch("unimatch_views", x_u.device)
        with torch.no_grad():
            self.student.eval()
            p_mix = self.student(x_mix).softmax(1)
            self.student.train()
        n, nu = batch.x_labeled.shape[0], x_u.shape[0]
        skips = self.student.encode(torch.cat([batch.x_labeled, x_u]))
        logits, _ = self.student.decode(skips)
        fp, _ = self.student.decode([F.dropout2d(s[n:], 0.5) for s in skips])
        p_weak = logits[n:].detach().softmax(1)
        conf, pseudo = p_weak.max(1)
        box = cutmix_boxes(x_u.shape[:1] + x_u.shape[2:], g, x_u.device)
        s1 = mix(self.strong(x_u, g), self.strong(x_mix, g), box)
        pseudo_1 = mix(pseudo, p_mix.argmax(1), box)
        conf_1 = mix(conf, p_mix.max(1).values, box)
        keep = (conf_1 >= self.hparams["threshold"]).float()
        loss_s = (F.cross_entropy(self.student(s1), pseudo_1, reduction="none") * keep).mean()
        loss_fp = (F.cross_entropy(fp, pseudo, reduction="none")
                   * (conf >= self.hparams["threshold"]).float()).mean()
        sup = F.cross_entropy(logits[:n], batch.y_labeled)
        loss = (sup + 0.5 * loss_s + 0.5 * loss_fp) / 2
        return loss, {"loss_sup": sup.detach(), "loss_s": loss_s.detach(),
                      "loss_fp": loss_fp.detach(), "mask": keep.mean().detach()}
"""


def test_a_unimatch_style_plugin_trains_on_the_documented_interfaces_only(tiny_project,
                                                                          plugin_dir):
    import pandas as pd

    (plugin_dir / "peer_unimatch.py").write_text(UNIMATCH_PLUGIN)
    # no private attribute of a net or the engine: only the documented interfaces
    assert ".encoder" not in UNIMATCH_PLUGIN and ".decoders" not in UNIMATCH_PLUGIN
    prepare(tiny_project, "acdc")
    run = tiny_project.parent.parent / "run"
    assert train(tiny_project, plugin_dir, "peer_unimatch", run, "acdc") == 0
    log = pd.read_csv(run / "train_log.csv")
    assert {"loss_sup", "loss_s", "loss_fp", "mask"} <= set(log.columns)
    assert log["loss"].notna().all()


def test_a_network_takes_its_optimiser_state_from_another_when_a_stage_keeps_it(tiny_project,
                                                                                monkeypatch):
    """TrainedNetwork.optimizer_state_from through `agcl train`: ABD's peer, at the start of the
    main stage (which keeps the pre-training's optimiser state), holds a copy of the student's
    momentum, as the script's load_net_opt(model_2, optimizer2, ...) gives it."""
    import yaml

    from agcl.engine import trainer

    config = yaml.safe_load(tiny_project.read_text())
    config["datasets"]["acdc"]["hparams"] = {"abd": {"pretrain_iterations": 2,
                                                     "displacement_grid": 4}}
    tiny_project.write_text(yaml.safe_dump(config))
    seen = []

    def handing_on(method, optimizer):
        before = [id(optimizer.state.get(p, {}).get("momentum_buffer"))
                  for p in method.peer.parameters()]
        started = trainer_hand_on(method, optimizer)
        pairs = zip(method.peer.parameters(), method.student.parameters(), strict=True)
        seen.append((started, before, [
            torch.equal(optimizer.state[p]["momentum_buffer"], optimizer.state[q]["momentum_buffer"])
            for p, q in pairs]))
        return started

    trainer_hand_on = trainer.hand_on_optimizer_state
    monkeypatch.setattr(trainer, "hand_on_optimizer_state", handing_on)
    prepare(tiny_project, "acdc")
    run = tiny_project.parent.parent / "run"
    assert main(["train", "acdc", "--config", str(tiny_project), "--method", "abd", "--labels",
                 "0.2", "--seed", "0", "--out", str(run), "--no-progress"]) == 0
    (started, before, equal), = seen  # once: at the main stage's start
    assert started == ["peer"] and all(equal)
    assert set(before) == {id(None)}  # the peer trained nothing in pre-training
