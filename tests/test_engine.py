"""Engine guarantees: a killed run resumes to the same weights, AMP on CPU, repeatable metrics."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from agcl.config import ConfigError, load_config
from agcl.engine.trainer import Trainer
from agcl.eval.evaluate import evaluate_run
from agcl.methods.base import HparamError
from agcl.runtime.runfolder import FINAL, LAST
from tests.conftest import onednn_disabled
from tests.test_pipeline import prepare


def final_weights(run: Path) -> dict:
    return torch.load(run / FINAL, weights_only=False)["state_dict"]


def longer_config(path: Path, iterations: int, every: int) -> Path:
    config = yaml.safe_load(path.read_text())
    config["datasets"]["la"]["train"].update(iterations=iterations, checkpoint_every=every)
    path.write_text(yaml.safe_dump(config))
    return path


def test_killed_process_resumes_to_identical_weights(tiny_project):
    config_path = longer_config(tiny_project, iterations=150, every=10)
    prepare(config_path, "la")
    args = [sys.executable, "-m", "agcl", "train", "la", "--config", str(config_path),
            "--method", "supervised", "--labels", "0.1", "--seed", "0", "--threads", "1",
            "--no-progress", "--out"]
    subprocess.run([*args, "runs/straight"], check=True, capture_output=True)

    killed = Path("runs/killed")
    proc = subprocess.Popen([*args, str(killed)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / LAST).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (killed / FINAL).exists():
        pytest.skip("the run finished before it could be killed (machine too fast for this test)")
    assert (killed / LAST).exists()
    step = torch.load(killed / LAST, weights_only=False)["state"]["step"]
    assert 0 < step < 150

    subprocess.run([*args, str(killed)], check=True, capture_output=True)
    straight = final_weights(Path("runs/straight"))
    resumed = final_weights(killed)
    for key, value in straight.items():
        assert torch.equal(value, resumed[key]), key


def test_bf16_autocast_training_on_cpu(tiny_project):
    config = yaml.safe_load(tiny_project.read_text())
    config["datasets"]["la"]["train"]["amp"] = "bf16"
    tiny_project.write_text(yaml.safe_dump(config))
    prepare(tiny_project, "la")
    with onednn_disabled():  # the engine's own autocast path, on kernels every CPU has
        meta = Trainer(load_config(tiny_project), "la", "supervised", 0.1, 0, Path("runs/bf16"),
                       progress=False).run()
    assert meta["amp"] == "bfloat16" and meta["device"] == "cpu"
    assert meta["skipped_steps"] == 0
    for value in final_weights(Path("runs/bf16")).values():
        assert torch.isfinite(value.float()).all()


def test_two_project_copies_give_identical_metrics(tmp_path, monkeypatch):
    """What two fresh clones running the demo must show: same config and seed, same numbers."""
    from tests.conftest import tiny_config

    values = []
    for copy in ("one", "two"):
        root = tmp_path / copy
        (root / "config").mkdir(parents=True)
        path = root / "config" / "tiny.yaml"
        path.write_text(yaml.safe_dump(tiny_config()))
        monkeypatch.chdir(root)
        prepare(path, "crag")
        config = load_config(path)
        run = Path("runs/crag")
        Trainer(config, "crag", "supervised", 0.2, 0, run, progress=False).run()
        summary = evaluate_run(config, "crag", run)
        values.append(json.dumps([{k: r[k] for k in ("case", "dice", "hd95", "asd")}
                                  for r in summary["metric_per_case"]], sort_keys=True))
    assert values[0] == values[1]


def test_train_keys_can_be_overridden_from_the_command_line(tiny_project):
    prepare(tiny_project, "la")
    config = load_config(tiny_project)
    meta = Trainer(config, "la", "supervised", 0.1, 0, Path("runs/lr"), progress=False,
                   overrides={"train.lr": 0.5, "train.iterations": 2}).run()
    assert meta["train"]["lr"] == 0.5 and meta["iterations"] == 2
    log = pd.read_csv(Path("runs/lr") / "train_log.csv")
    assert list(log["lr"]) == [0.5, 0.5] and (log["it_per_s"] > 0).all()
    with pytest.raises(ConfigError, match="'lrr' was unexpected"):
        Trainer(config, "la", "supervised", 0.1, 0, Path("runs/bad"), overrides={"train.lrr": 1})
    with pytest.raises(ConfigError, match=r"'--set train\.lr': 'x' is not of type 'number'"):
        Trainer(config, "la", "supervised", 0.1, 0, Path("runs/bad"), overrides={"train.lr": "x"})
    with pytest.raises(HparamError, match="no hyperparameter lrr"):
        Trainer(config, "la", "supervised", 0.1, 0, Path("runs/bad"), overrides={"lrr": 1})


def test_optional_tensorboard_scalars(tiny_project):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    prepare(tiny_project, "la")
    run = Path("runs/tb")
    Trainer(load_config(tiny_project), "la", "supervised", 0.1, 0, run, progress=False,
            overrides={"train.tensorboard": True}).run()
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    losses = [e.value for e in events.Scalars("loss")]
    log = pd.read_csv(run / "train_log.csv")
    assert [e.step for e in events.Scalars("loss")] == list(log["step"])
    assert losses == pytest.approx(list(log["loss"]))


def test_fp16_with_gradient_scaler_on_cpu(tiny_project):
    """The fp16 branch (GradScaler on) is the one older GPUs take; run it here too."""
    prepare(tiny_project, "la")
    trainer = Trainer(load_config(tiny_project), "la", "supervised", 0.1, 0, Path("runs/fp16"),
                      progress=False, overrides={"train.amp": "fp16"})
    assert trainer.description.amp_dtype == torch.float16
    with onednn_disabled():  # AVX512-FP16 CPUs would hand fp16 to oneDNN as bf16 above
        meta = trainer.run()
    assert meta["amp"] == "float16"
    log = pd.read_csv(Path("runs/fp16") / "train_log.csv")
    assert np.isfinite(log["loss"]).all()


def test_a_method_trains_with_its_own_recipe_when_the_config_gives_one(tiny_project):
    config = yaml.safe_load(tiny_project.read_text())
    config["datasets"]["la"]["train_by_method"] = {"supervised": {"iterations": 3, "lr": 0.02}}
    tiny_project.write_text(yaml.safe_dump(config))
    prepare(tiny_project, "la")
    trainer = Trainer(load_config(tiny_project), "la", "supervised", 0.1, 0, Path("runs/own"),
                      progress=False, overrides={"train.lr": 0.03})
    meta = trainer.run()
    assert meta["iterations"] == 3 and meta["train"]["lr"] == 0.03  # --set wins over the recipe
    assert list(pd.read_csv(Path("runs/own") / "train_log.csv")["lr"]) == [0.03] * 3


@pytest.mark.parametrize("dataset", ["la", "acdc"])
def test_channels_last_changes_the_layout_not_the_model(tiny_project, dataset):
    config = yaml.safe_load(tiny_project.read_text())
    # Dropout draws its mask in memory order, so with dropout the two layouts train on different
    # (equally random) masks; without it they differ by float rounding only.
    config["datasets"][dataset]["net"]["has_dropout"] = False
    tiny_project.write_text(yaml.safe_dump(config))
    prepare(tiny_project, dataset)
    config = load_config(tiny_project)
    runs = {}
    for channels_last in (True, False):
        out = Path(f"runs/{dataset}-cl{int(channels_last)}")
        Trainer(config, dataset, "mean_teacher", 0.1, 0, out, progress=False,
                overrides={"train.channels_last": channels_last, "train.iterations": 3}).run()
        runs[channels_last] = final_weights(out)
    layout = torch.channels_last_3d if dataset == "la" else torch.channels_last
    rank = 5 if dataset == "la" else 4
    conv_weights = [k for k, v in runs[True].items() if v.ndim == rank and v.shape[-1] > 1]
    assert conv_weights, "the nets have no convolution kernels wider than 1"
    for key in conv_weights:  # student and EMA teacher alike
        assert runs[True][key].is_contiguous(memory_format=layout), key
        assert runs[False][key].is_contiguous(), key
    for key, value in runs[False].items():  # 3 steps: the orders differ by rounding (x BatchNorm)
        if value.is_floating_point():
            torch.testing.assert_close(runs[True][key], value, rtol=1e-2, atol=2e-3)


def test_first_nonfinite_gradient_names_the_parameter_and_ignores_overflowing_norms():
    from agcl.engine.update import first_nonfinite_gradient
    params = [(f"p{i}", torch.nn.Parameter(torch.zeros(3, 4))) for i in range(3)]
    for _, p in params:
        p.grad = torch.ones_like(p)
    assert first_nonfinite_gradient(params) is None
    params[1][1].grad[2, 3] = 3e30  # finite, but its square overflows the fused norm
    assert first_nonfinite_gradient(params) is None
    params[2][1].grad[0, 0] = float("-inf")
    assert first_nonfinite_gradient(params) == "p2"
    params[0][1].grad[1, 1] = float("nan")
    assert first_nonfinite_gradient(params) == "p0"


def test_gradients_finite_is_one_device_flag():
    from agcl.engine.update import gradients_finite

    params = [(f"p{i}", torch.nn.Parameter(torch.zeros(3))) for i in range(2)]
    assert bool(gradients_finite(params))  # no gradients yet
    for _, p in params:
        p.grad = torch.ones(3)
    flag = gradients_finite(params)
    assert flag.ndim == 0 and flag.dtype == torch.bool and bool(flag)
    params[1][1].grad[2] = float("nan")
    assert not bool(gradients_finite(params))


def test_step_log_averages_the_applied_steps_and_reads_once_per_row():
    from agcl.engine.logs import StepLog

    log = StepLog()
    log.add({"step": 1, "stage": "main", "lr": 0.1, "loss": torch.tensor(1.0),
             "w": 0.5, "seconds": 0.2, "data_seconds": 0.1}, skipped=False)
    log.add({"step": 2, "stage": "main", "lr": 0.1, "loss": torch.tensor(float("nan")),
             "w": 0.5, "seconds": 0.4, "data_seconds": 0.1}, skipped=True)
    log.add({"step": 3, "stage": "main", "lr": 0.05, "loss": torch.tensor(3.0),
             "w": 1.5, "extra": torch.tensor(7.0), "seconds": 0.3, "data_seconds": 0.1},
            skipped=False)
    row = log.read()
    # terms: means over the two applied steps (the skipped NaN left out); a term that appears in
    # one step only is that step's value; lr and step are the row's own step's
    assert row["step"] == 3 and row["lr"] == 0.05 and row["skipped"] == 1
    assert row["loss"] == pytest.approx(2.0) and row["w"] == pytest.approx(1.0)
    assert row["extra"] == pytest.approx(7.0)
    assert row["seconds"] == pytest.approx(0.3) and row["it_per_s"] == pytest.approx(1 / 0.3)
    assert all(not torch.is_tensor(v) for v in row.values())
    log.add({"step": 4, "stage": "main", "lr": 0.05, "loss": torch.tensor(5.0),
             "seconds": 0.1, "data_seconds": 0.0}, skipped=False)
    assert log.read() == pytest.approx({"step": 4, "stage": "main", "lr": 0.05, "loss": 5.0,
                                        "seconds": 0.1, "data_seconds": 0.0, "skipped": 0,
                                        "it_per_s": 10.0})


def test_a_row_every_k_steps_is_the_mean_of_the_k_per_step_rows(tiny_project):
    """log_every changes how often values are read back from the device, not the training: the
    weights are identical and a row is the mean of the per-step rows it stands for."""
    prepare(tiny_project, "la")
    config = load_config(tiny_project)
    logs, weights = {}, {}
    for every in (1, 2):
        run = Path(f"runs/every{every}")
        Trainer(config, "la", "mean_teacher", 0.1, 0, run, progress=False,
                overrides={"train.iterations": 5, "train.log_every": every}).run()
        logs[every] = pd.read_csv(run / "train_log.csv")
        weights[every] = final_weights(run)
    assert list(logs[2]["step"]) == [2, 4, 5]  # and the stage's last step
    per_step = logs[1]
    previous = 0
    for _, row in logs[2].iterrows():
        steps = per_step[(per_step["step"] > previous) & (per_step["step"] <= row["step"])]
        previous = row["step"]
        for term in ("loss", "loss_sup", "loss_cons", "cons_weight"):
            assert row[term] == pytest.approx(steps[term].mean(), rel=1e-6)
    for name, tensor in weights[1].items():
        assert torch.equal(tensor, weights[2][name]), name


def test_the_training_set_goes_to_the_gpu_when_it_fits(monkeypatch):
    from types import SimpleNamespace

    from agcl.runtime.devices import data_device

    cpu, gpu = torch.device("cpu"), torch.device("cuda:1")
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(total_memory=80 * 2**30))
    assert data_device("auto", gpu, 20 * 2**30) == gpu  # a quarter of the card
    assert data_device("auto", gpu, 21 * 2**30) is None  # more: host memory, pinned copies
    assert data_device("device", gpu, 60 * 2**30) == gpu  # asked for
    assert data_device("host", gpu, 1) is None
    assert data_device("auto", cpu, 1) is None and data_device("device", cpu, 1) is None


def test_deterministic_kernels_by_default_on_the_cpu_and_autotuning_on_cuda(tiny_project):
    from agcl.runtime.devices import resolve_deterministic

    cpu, gpu = torch.device("cpu"), torch.device("cuda:0")
    assert resolve_deterministic("auto", cpu) is True
    assert resolve_deterministic("auto", gpu) is False
    assert resolve_deterministic(True, gpu) is True and resolve_deterministic(False, cpu) is False
    prepare(tiny_project, "la")
    meta = Trainer(load_config(tiny_project), "la", "supervised", 0.1, 0, Path("runs/det"),
                   progress=False, overrides={"train.iterations": 1}).run()
    assert meta["deterministic"] is True and meta["data_on"] == "host"
    assert torch.are_deterministic_algorithms_enabled()


class _TwoOptimisers(torch.nn.Module):
    """A toy method: the main loss trains `main`, an auxiliary update trains `aux` on its own
    loss (NaN on request), as SASSNet's discriminator beside its net."""

    def __init__(self, aux_nan: bool = False):
        super().__init__()
        self.main, self.aux = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
        self.aux_nan = aux_nan
        self.order = []

    def trained_networks(self):
        from agcl.methods.base import TrainedNetwork

        return [TrainedNetwork("main", self.main)]

    def trainable_parameters(self):
        return self.main.parameters()

    def auxiliary_updates(self):
        from agcl.methods.base import AuxiliaryUpdate

        return [AuxiliaryUpdate("critic", tuple(self.aux.parameters()), "adam", lr=0.1)]

    def train_step(self, batch, step):
        self.order.append("main")
        return self.main(batch.x_labeled).pow(2).mean(), {}

    def auxiliary_step(self, name, batch, step):
        self.order.append(name)
        loss = self.aux(batch.x_labeled).pow(2).mean()
        return (loss * float("nan") if self.aux_nan else loss), {"critic_term": loss.detach()}

    def after_optimizer_step(self, step):
        self.order.append("after")


@pytest.mark.parametrize("aux_nan", [False, True])
def test_auxiliary_update_steps_its_own_parameters_after_the_main_update(aux_nan):
    from agcl.engine.optimizers import auxiliary_optimizers, main_optimizer
    from agcl.engine.state import TrainingState
    from agcl.engine.update import NonFiniteError, Updater
    from agcl.methods.base import Batch

    torch.manual_seed(0)
    method = _TwoOptimisers(aux_nan)
    method.name = "toy"
    auxiliary = auxiliary_optimizers(method)
    assert isinstance(auxiliary["critic"][1], torch.optim.Adam)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    update = Updater(method, main_optimizer(method, {"lr": 0.1, "momentum": 0.0,
                                                     "weight_decay": 0.0}),
                     torch.amp.GradScaler("cpu", enabled=False), device=torch.device("cpu"),
                     amp_dtype=None, nonfinite="skip", max_consecutive_skips=3, where="toy",
                     auxiliary=auxiliary)
    batch = Batch(torch.ones(4, 2), torch.zeros(4, dtype=torch.long), None)
    state = TrainingState()
    _, _, logs, skipped = update(method, batch, {"lr": 0.1, "schedule": "constant"}, 0, 1, state)
    assert method.order == ["main", "after", "critic"] and not skipped
    after = method.state_dict()
    assert not torch.equal(after["main.weight"], before["main.weight"])
    # the main SGD never touches the auxiliary parameters: they move only by their own Adam
    assert torch.equal(after["aux.weight"], before["aux.weight"]) == aux_nan
    assert "loss_critic" in logs and "critic_term" in logs
    assert state.skipped == int(aux_nan)
    if aux_nan:
        stop = Updater(method, update.optimizer, update.scaler, device=torch.device("cpu"),
                       amp_dtype=None, nonfinite="stop", max_consecutive_skips=3, where="toy",
                       auxiliary=auxiliary)
        with pytest.raises(NonFiniteError, match="auxiliary update critic: the loss is nan"):
            stop(method, batch, {"lr": 0.1, "schedule": "constant"}, 1, 2, state)


def test_an_auxiliary_update_must_own_parameters_no_other_optimiser_updates():
    from agcl.engine.optimizers import auxiliary_optimizers
    from agcl.methods.base import AuxiliaryUpdate

    method = _TwoOptimisers()
    method.name = "toy"
    method.auxiliary_updates = lambda: [AuxiliaryUpdate("critic", tuple(method.main.parameters()),
                                                        "adam", lr=0.1)]
    with pytest.raises(ValueError, match="toy: auxiliary update 'critic' must own parameters"):
        auxiliary_optimizers(method)
    method.auxiliary_updates = lambda: [AuxiliaryUpdate("critic", tuple(method.aux.parameters()),
                                                        "rmsprop", lr=0.1)]
    with pytest.raises(ValueError, match="optimizer 'rmsprop', expected one of adam, sgd"):
        auxiliary_optimizers(method)


class _BatchNormToy(torch.nn.Module):
    """A toy method whose forward updates BatchNorm statistics and a queue buffer."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.BatchNorm1d(4),
                                       torch.nn.Linear(4, 1))
        self.register_buffer("queue", torch.zeros(3))

    def trained_networks(self):
        from agcl.methods.base import TrainedNetwork

        return [TrainedNetwork("net", self.net)]

    def trainable_parameters(self):
        return self.net.parameters()

    def train_step(self, batch, step):
        out = self.net(batch.x_labeled)
        self.queue = torch.cat([self.queue[1:], out.detach().mean().reshape(1)])  # replaced
        return out.pow(2).mean(), {}

    def after_optimizer_step(self, step):
        pass


@pytest.mark.parametrize("scale", [1e38, float("nan")])
def test_a_skipped_step_leaves_every_parameter_and_buffer_as_it_was(scale):
    """A non-finite batch under nonfinite: skip: the forward already moved the BatchNorm running
    statistics and the queue; the skip puts them back (before the fix: non-finite buffers in
    the final checkpoint, a Dice of 0 at evaluation)."""
    from agcl.engine.optimizers import main_optimizer
    from agcl.engine.state import TrainingState
    from agcl.engine.update import Updater
    from agcl.methods.base import Batch

    torch.manual_seed(0)
    method = _BatchNormToy()
    method.name = "toy"
    update = Updater(method, main_optimizer(method, {"lr": 0.1, "momentum": 0.9,
                                                     "weight_decay": 1e-4}),
                     torch.amp.GradScaler("cpu", enabled=False), device=torch.device("cpu"),
                     amp_dtype=None, nonfinite="skip", max_consecutive_skips=3, where="toy")
    schedule = {"lr": 0.1, "schedule": "constant"}
    state = TrainingState()
    good = Batch(torch.randn(8, 2), torch.zeros(8, dtype=torch.long), None)
    update(method, good, schedule, 0, 3, state)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    bad = Batch(good.x_labeled * scale, good.y_labeled, None)
    _, _, _, skipped = update(method, bad, schedule, 1, 3, state)
    assert skipped and state.skipped == 1  # a non-finite loss or gradient
    after = method.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    # the next finite step trains on as if the bad batch had never come
    update(method, good, schedule, 2, 3, state)
    assert all(torch.isfinite(v.float()).all() for v in method.state_dict().values())


class _SometimesUnused(torch.nn.Module):
    """A toy method whose `selector` gets a gradient only on step 0 (as SS-Net's selector of a
    class absent from later batches)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net, self.selector = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)

    def trained_networks(self):
        from agcl.methods.base import TrainedNetwork

        return [TrainedNetwork("net", self.net), TrainedNetwork("selector", self.selector)]

    def trainable_parameters(self):
        return self.parameters()

    def train_step(self, batch, step):
        loss = self.net(batch.x_labeled).pow(2).mean()
        if step == 0:
            loss = loss + self.selector(batch.x_labeled).pow(2).mean()
        return loss, {}

    def after_optimizer_step(self, step):
        pass


@pytest.mark.parametrize("grad_reset", ["none", "zeros"])
def test_grad_reset_zeros_is_torch_1x_zero_grad(grad_reset):
    """Three SGD steps (momentum, weight decay) through the engine against the references' loop
    (optimizer.zero_grad(); backward; step) under torch 1.x (zero_grad zeroes) and torch 2 (it
    sets None): grad_reset zeros equals the first, none the second; they differ only for the
    parameter without a gradient after step 0."""
    import copy

    from agcl.engine.optimizers import main_optimizer
    from agcl.engine.state import TrainingState
    from agcl.engine.update import Updater
    from agcl.methods.base import Batch

    sgd = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2}
    ours, theirs = _SometimesUnused(), _SometimesUnused()
    ours.name = "toy"
    update = Updater(ours, main_optimizer(ours, sgd),
                     torch.amp.GradScaler("cpu", enabled=False), device=torch.device("cpu"),
                     amp_dtype=None, nonfinite="skip", max_consecutive_skips=3, where="toy",
                     grad_reset=grad_reset)
    reference = torch.optim.SGD(theirs.parameters(), **sgd)
    batch = Batch(torch.randn(4, 2, generator=torch.Generator().manual_seed(1)),
                  torch.zeros(4, dtype=torch.long), None)
    state = TrainingState()
    selector_after_0 = None
    for step in range(3):
        update(ours, batch, {"lr": 0.1, "schedule": "constant"}, step, 3, state)
        reference.zero_grad(set_to_none=grad_reset == "none")  # torch 1.x: zeroed
        loss, _ = theirs.train_step(batch, step)
        loss.backward()
        reference.step()
        if step == 0:
            selector_after_0 = copy.deepcopy(ours.selector.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    moved = not torch.equal(ours.selector.weight, selector_after_0["weight"])
    assert moved == (grad_reset == "zeros")
    with pytest.raises(ValueError, match="grad_reset"):
        Updater(ours, update.optimizer, update.scaler, device=torch.device("cpu"), amp_dtype=None,
                nonfinite="skip", max_consecutive_skips=3, where="toy", grad_reset="zero")


def test_grad_reset_reaches_the_recipe_without_moving_old_hashes(tiny_project):
    """grad_reset: none (the default, what ran before the key existed) leaves a recipe's settings
    hash as it was; zeros is a new recipe (it reruns, and a resume under the other is refused)."""
    from agcl.config import load_config
    from agcl.config.recipe import resolve_recipe

    config = load_config(tiny_project)
    default = resolve_recipe(config, "la", "supervised")
    assert default.train_cfg["grad_reset"] == "none"
    assert "grad_reset" not in default.settings["train"]
    config["datasets"]["la"]["train"]["grad_reset"] = "zeros"
    zeros = resolve_recipe(config, "la", "supervised")
    assert zeros.train_cfg["grad_reset"] == "zeros"
    assert zeros.settings_hash != default.settings_hash
