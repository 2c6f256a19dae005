"""One parameter update: the learning rate of the step, autocast, backward, the finite check and
the non-finite policy (skip or stop). The method only computed the loss. A method's auxiliary
updates (its own optimisers, e.g. SASSNet's discriminator) follow the main one, each on its own
loss, under the same policy."""

from __future__ import annotations

import logging

import torch

from agcl.engine.method_errors import method_code
from agcl.methods.base import Batch

log = logging.getLogger("agcl.train")

# How many skipped steps run.json lists by number (all are counted).
LISTED_SKIPS = 50


class NonFiniteError(FloatingPointError):
    """A step produced a non-finite loss or gradient and the policy says stop."""


class MethodModeError(RuntimeError):
    """A trained network was left in eval mode by the method's step."""


class GradientRoutingError(RuntimeError):
    """A parameter received a gradient that no optimiser applies, or a declared trained network
    received none: the method's networks are not what the engine trains."""


def gradient_routing_problems(method, optimised: set[int], check_unused: bool) -> list[str]:
    """After a backward: parameters with a gradient that no optimiser owns and (check_unused)
    trained networks none of whose parameters got a gradient."""
    problems = [
        f"parameter {name} received a gradient but no optimiser updates it: declare its network "
        "in trained_networks() (or compute it under torch.no_grad() / detach it if it must not "
        "train)"
        for name, p in method.named_parameters() if p.grad is not None and id(p) not in optimised]
    if check_unused:
        names = {id(p): n for n, p in method.named_parameters()}
        for network in method.trained_networks():
            params = list(network.module.parameters())
            if all(p.grad is None for p in params):
                problems.append(
                    f"trained network {network.name!r} (e.g. parameter "
                    f"{names.get(id(params[0]), '?')}) received no gradient from train_step's loss:"
                    " the loss does not use it, so it would never train")
    return problems


def learning_rate(schedule: dict, step: int, total: int) -> float:
    """The lr of `step` of a stage of `total` steps under its schedule (a Stage's `schedule`)."""
    base = schedule["lr"]
    if schedule["schedule"] == "step":
        return base * schedule["gamma"] ** (step // schedule["step_size"])
    if schedule["schedule"] == "poly":
        return base * (1.0 - step / total) ** 0.9
    if schedule["schedule"] == "poly_lagged":  # SSL4MIS: set after step t-1 from t-1
        return base * (1.0 - max(step - 1, 0) / total) ** 0.9
    return base


def all_finite(tensors) -> torch.Tensor:
    """A 0-d bool tensor on the device: is every tensor finite? One fused norm over all of them
    is finite iff they are, barring an overflow of the squares (first_nonfinite then clears it)."""
    tensors = list(tensors)
    if not tensors:
        return torch.tensor(True)
    return torch.isfinite(torch.nn.utils.get_total_norm(tensors, foreach=True))


def first_nonfinite(named_tensors) -> str | None:
    """Name of the first tensor holding NaN/Inf, checked exactly."""
    named_tensors = list(named_tensors)
    if not named_tensors:
        return None
    finite = torch.stack([torch.isfinite(t).all() for _, t in named_tensors])
    if bool(finite.all()):
        return None
    return named_tensors[int((~finite).nonzero()[0])][0]


def _named_grads(named_params):
    return [(name, p.grad) for name, p in named_params if p.grad is not None]


def gradients_finite(named_params) -> torch.Tensor:
    """all_finite over the gradients of (name, parameter) pairs that have one."""
    return all_finite(g for _, g in _named_grads(named_params))


def first_nonfinite_gradient(named_params) -> str | None:
    """Name of the first parameter whose gradient holds NaN/Inf, checked exactly."""
    return first_nonfinite(_named_grads(named_params))


def buffer_slots(module: torch.nn.Module) -> list[tuple[torch.nn.Module, str, str]]:
    """(owner, name, qualified name) of every buffer of `module` and its children, found once:
    a step reads the tensor through its owner, so a buffer the forward replaced (a queue
    rebuilt with torch.cat) is still the one checked and restored."""
    return [(owner, name, f"{prefix}.{name}" if prefix else name)
            for prefix, owner in module.named_modules() for name in owner._buffers]


def float_buffers(slots) -> list[tuple[str, torch.Tensor]]:
    return [(qualified, owner._buffers[name]) for owner, name, qualified in slots
            if owner._buffers.get(name) is not None
            and owner._buffers[name].is_floating_point()]


def non_finite_problem(loss: torch.Tensor, logs: dict, trainable, buffers=()) -> str | None:
    """What is not finite, read exactly (None: only a fused norm overflowed)."""
    if not torch.isfinite(loss):
        terms = ", ".join(f"{k} {float(v):.4g}" for k, v in logs.items())
        return f"the loss is {float(loss)} ({terms})"
    bad = first_nonfinite_gradient(trainable)
    if bad is not None:
        return f"the gradient of {bad} is not finite (the loss is {float(loss):.4g})"
    bad = first_nonfinite(buffers)
    if bad is not None:
        return (f"the buffer {bad} is not finite after the forward (e.g. BatchNorm statistics "
                f"of an overflowing batch; the loss is {float(loss):.4g})")
    return None


def snapshot_buffers(slots) -> list[tuple[torch.nn.Module, str, torch.Tensor]]:
    """A copy of every buffer (BatchNorm statistics, queues, memories) of `slots`
    (buffer_slots), kept with its owner and name so that a buffer the forward replaced is
    restored too."""
    return [(owner, name, owner._buffers[name].detach().clone()) for owner, name, _ in slots
            if owner._buffers.get(name) is not None]


def restore_buffers(saved) -> None:
    """Put back what snapshot_buffers copied: a skipped step leaves no trace in any buffer."""
    with torch.no_grad():
        for owner, name, value in saved:
            current = owner._buffers.get(name)
            if current is not None and current.shape == value.shape:
                current.copy_(value)
            else:
                owner._buffers[name] = value


class Updater:
    """Applies one step's update to a method's trainable parameters, or skips it by policy.

    The step reads one value back from the device, whether the loss and every gradient are
    finite (GradScaler's fp16 step reads its own): the skip decision must precede the update.
    A step is applied only if its loss, every gradient and every floating buffer are finite. A
    skipped step leaves every parameter and every buffer as it was: the forward's changes to
    buffers (BatchNorm running statistics from a non-finite batch, a queue the step filled) are
    undone from a copy taken before it (under nonfinite: stop the run ends, and nothing is
    copied).
    """

    def __init__(self, method, optimizer, scaler, *, device: torch.device,
                 amp_dtype: torch.dtype | None, nonfinite: str, max_consecutive_skips: int,
                 where: str, auxiliary: dict | None = None, grad_reset: str = "none",
                 last_stage: int = 0):
        if grad_reset not in ("none", "zeros"):
            raise ValueError(f"grad_reset: expected none or zeros, got {grad_reset!r}")
        self.set_to_none = grad_reset == "none"
        self.method = method
        self.buffer_slots = buffer_slots(method)
        self.optimizer = optimizer
        self.auxiliary = auxiliary or {}
        self.scaler = scaler
        self.device = device
        self.amp_dtype = amp_dtype
        self.nonfinite = nonfinite
        self.max_consecutive_skips = max_consecutive_skips
        self.where = where  # names the run in errors and warnings
        names = {id(p): n for n, p in method.named_parameters()}
        self.trainable = [(names.get(id(p), "?"), p) for p in method.trainable_parameters()]
        self.auxiliary_named = {name: [(names.get(id(p), "?"), p) for p in update.parameters]
                                for name, (update, _) in self.auxiliary.items()}
        self.optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self.optimised |= {id(p) for _, (u, _) in self.auxiliary.items() for p in u.parameters}
        self.last_stage = last_stage
        # (qualified name, module, network) of every module the main update trains, named once:
        # the train-mode check reads them after every step
        self.trained_modules = [
            (f"{network.name}.{name}" if name else network.name, module, network.name)
            for network in method.trained_networks()
            for name, module in network.module.named_modules()]
        self.at = where
        self.routing_checked: set[int] = set()  # stages whose first backward was checked

    def __call__(self, method, batch: Batch, schedule: dict, step: int, stage_iterations: int,
                 state, stage_name: str = "main") -> tuple[float, torch.Tensor, dict, bool]:
        """(lr, loss, the method's log terms, skipped) of `step` of the current stage; `state`
        (a TrainingState) counts skips."""
        self.at = f"{self.where}, stage {stage_name}, step {state.step + 1}"
        lr = learning_rate(schedule, step, stage_iterations)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        check = None
        if state.stage not in self.routing_checked:
            self.routing_checked.add(state.stage)
            check = lambda: self._check_routing(method, state)
        loss_value, logs, problem = self._update(
            method.train_step, (batch, step), self.optimizer, self.trainable, check)
        if problem is None:
            with method_code(method, self.at, "after_optimizer_step"):
                method.after_optimizer_step(step)
            state.consecutive_skips = 0
            for name, (_, optimizer) in self.auxiliary.items():
                aux_loss, aux_logs, aux_problem = self._update(
                    method.auxiliary_step, (name, batch, step), optimizer,
                    self.auxiliary_named[name], hook=f"auxiliary_step({name!r})")
                logs = {**logs, f"loss_{name}": aux_loss, **aux_logs}
                if aux_problem is not None:  # only this optimiser's step is skipped
                    self._skip(f"auxiliary update {name}: {aux_problem}", state)
            self.scaler.update()
        else:
            self._skip(problem, state)
        return lr, loss_value, logs, problem is not None

    def _check_train_mode(self) -> None:
        """The engine keeps the method in train mode; a trained network's module that a step
        left in eval mode would train with frozen BatchNorm statistics and no dropout."""
        for qualified, module, network in self.trained_modules:
            if not module.training:
                raise MethodModeError(
                    f"{self.at}: {qualified} ({type(module).__name__}) of trained network "
                    f"{network!r} is in eval mode after the step: a method that switches a "
                    "trained module to eval (e.g. for a no-grad pass) must switch it back to "
                    "train() before returning")

    def _check_routing(self, method, state) -> None:
        problems = gradient_routing_problems(method, self.optimised,
                                             check_unused=state.stage == self.last_stage)
        if problems:
            raise GradientRoutingError(f"{self.at} (first of its stage): " + "; ".join(problems))

    def _update(self, compute, args, optimizer, named_params, check=None, hook="train_step"):
        """Autocast `compute(*args)` -> (loss, logs), backward, finite check, and the step of
        `optimizer` unless something is not finite; (loss, logs, problem or None)."""
        saved = snapshot_buffers(self.buffer_slots) if self.nonfinite == "skip" else None
        with (method_code(self.method, self.at, hook),
              torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                             enabled=self.amp_dtype is not None)):
            loss, logs = compute(*args)
        loss_value = loss.detach()
        optimizer.zero_grad(set_to_none=self.set_to_none)
        with method_code(self.method, self.at, f"the backward of {hook}'s loss"):
            self.scaler.scale(loss).backward()
        if check is not None:
            check()
        self._check_train_mode()
        buffers = float_buffers(self.buffer_slots)
        finite = torch.isfinite(loss_value) & all_finite(b for _, b in buffers)
        if not self.scaler.is_enabled():  # fp16: GradScaler skips steps with inf/NaN grads itself
            finite = finite & gradients_finite(named_params)
        problem = None if bool(finite) else non_finite_problem(loss_value, logs, named_params,
                                                               buffers)
        if problem is None:
            self.scaler.step(optimizer)
        else:
            optimizer.zero_grad(set_to_none=True)
            if saved is not None:
                restore_buffers(saved)
        return loss_value, logs, problem

    def _skip(self, problem: str, state) -> None:
        where = self.at
        if self.nonfinite == "stop":
            raise NonFiniteError(f"{where}: {problem}; stopping (train.nonfinite: stop)")
        state.skipped += 1
        state.consecutive_skips += 1
        if len(state.skipped_steps) < LISTED_SKIPS:
            state.skipped_steps.append(state.step + 1)
        if state.consecutive_skips >= self.max_consecutive_skips:
            raise NonFiniteError(f"{where}: {problem}; {self.max_consecutive_skips} steps in a "
                                 "row skipped, stopping (train.max_consecutive_skips)")
        log.warning("%s: %s; step skipped (train.nonfinite: skip)", where, problem)
