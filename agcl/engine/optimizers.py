"""The optimisers the engine builds for a method: SGD over the networks it trains (every
reference's; methods.base.TrainedNetwork), and one per auxiliary update the method declares
(methods.base.AuxiliaryUpdate)."""

from __future__ import annotations

import torch

from agcl.methods.base import AuxiliaryUpdate

AUXILIARY_OPTIMIZERS = ("adam", "sgd")


def main_param_groups(method, train_cfg: dict) -> list[dict]:
    """One group for the networks on the train block's settings (in declaration order), then one
    per network with settings of its own. Each group keeps its `lr_scale`: the Updater sets its
    lr to the stage's scheduled lr times it."""
    shared, own, owner = [], [], {}
    for network in method.trained_networks():
        params = list(network.module.parameters())
        if not params:
            raise ValueError(f"{method.name}: trained network {network.name!r} has no parameters")
        for p in params:
            if id(p) in owner:
                raise ValueError(f"{method.name}: a parameter of trained network "
                                 f"{network.name!r} also belongs to {owner[id(p)]!r} (declare "
                                 "each parameter in one network)")
            owner[id(p)] = network.name
        if network.own_settings:
            own.append({"params": params, "network": network.name, "lr_scale": network.lr_scale,
                        "lr": train_cfg["lr"] * network.lr_scale,
                        "momentum": (train_cfg["momentum"] if network.momentum is None
                                     else network.momentum),
                        "weight_decay": (train_cfg["weight_decay"] if network.weight_decay is None
                                         else network.weight_decay)})
        else:
            shared.extend(params)
    return ([{"params": shared}] if shared else []) + own


def hand_on_optimizer_state(method, optimizer: torch.optim.Optimizer) -> list[str]:
    """At the start of a stage that keeps the optimiser's state: every trained network that
    names `optimizer_state_from` gets a copy of that network's per-parameter state (parameters
    paired in order; the two must have the same shapes). Returns the networks so started."""
    networks = {network.name: network for network in method.trained_networks()}
    started = []
    for network in networks.values():
        source_name = network.optimizer_state_from
        if source_name is None:
            continue
        source = networks.get(source_name)
        if source is None:
            raise ValueError(f"{method.name}: trained network {network.name!r} takes its optimiser "
                             f"state from {source_name!r}, which is not a trained network "
                             f"(declared: {', '.join(networks)})")
        pairs = list(zip(network.module.parameters(), source.module.parameters(), strict=True))
        for target, origin in pairs:
            if target.shape != origin.shape:
                raise ValueError(f"{method.name}: {network.name!r} and {source_name!r} differ in "
                                 "shape; optimizer_state_from needs two nets of one kind")
            optimizer.state.pop(target, None)
            if origin in optimizer.state:
                optimizer.state[target] = {key: value.clone() if torch.is_tensor(value) else value
                                           for key, value in optimizer.state[origin].items()}
        started.append(network.name)
    return started


def main_optimizer(method, train_cfg: dict) -> torch.optim.Optimizer:
    return torch.optim.SGD(main_param_groups(method, train_cfg), lr=train_cfg["lr"],
                           momentum=train_cfg["momentum"], weight_decay=train_cfg["weight_decay"])


def auxiliary_optimizer(update: AuxiliaryUpdate, method_name: str) -> torch.optim.Optimizer:
    if update.optimizer == "adam":
        return torch.optim.Adam(update.parameters, lr=update.lr, betas=update.betas,
                                weight_decay=update.weight_decay)
    if update.optimizer == "sgd":
        return torch.optim.SGD(update.parameters, lr=update.lr, momentum=update.momentum,
                               weight_decay=update.weight_decay)
    raise ValueError(f"{method_name}: auxiliary update {update.name!r}: optimizer "
                     f"{update.optimizer!r}, expected one of {', '.join(AUXILIARY_OPTIMIZERS)}")


def auxiliary_optimizers(method) -> dict[str, tuple[AuxiliaryUpdate, torch.optim.Optimizer]]:
    """name -> (declaration, optimiser), in the method's order; the parameters must lie outside
    trainable_parameters() and outside each other (one optimiser updates each parameter)."""
    seen = {id(p) for p in method.trainable_parameters()}
    built = {}
    for update in method.auxiliary_updates():
        if update.name in built:
            raise ValueError(f"{method.name}: two auxiliary updates named {update.name!r}")
        ids = {id(p) for p in update.parameters}
        if not ids or ids & seen:
            raise ValueError(f"{method.name}: auxiliary update {update.name!r} must own "
                             "parameters that no other optimiser updates")
        seen |= ids
        built[update.name] = (update, auxiliary_optimizer(update, method.name))
    return built
