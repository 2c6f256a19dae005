"""What the engine's checkpoints hold: the resume payload (weights, optimiser, sampler, RNG and
stream states, so a resumed run ends with the same weights as an uninterrupted one), the best
pre-training state, the inference payload and run.json's metadata. Where the files live and how
they are written belongs to agcl.runtime.runfolder."""

from __future__ import annotations

import random

import numpy as np
import torch

from agcl.common.utils import code_version
from agcl.runtime.numerics import cpu_numerics


def rng_states() -> dict:
    """The global RNGs' states in types torch.load(weights_only=True) reads (no numpy arrays)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"python": random.getstate(),
              "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                        float(cached)),
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos,
                         has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def resume_payload(run, parts, state) -> dict:
    """Everything a killed run needs to continue bit-identically (ckpt_last.pt)."""
    return {
        "identity": run.identity, "settings": run.recipe.settings,
        "method": parts.method.state_dict(), "optimizer": parts.optimizer.state_dict(),
        "auxiliary_optimizers": auxiliary_states(parts.auxiliary),
        "scaler": parts.scaler.state_dict(), "sampler": parts.sampler.state_dict(),
        "rng": rng_states(), "streams": parts.streams.state_dict(),
        "state": state.to_dict(),
    }


def restore(parts, saved: dict) -> None:
    """Load a resume payload into freshly prepared parts."""
    parts.method.load_state_dict(saved["method"])
    parts.optimizer.load_state_dict(saved["optimizer"])
    load_auxiliary_states(parts.auxiliary, saved)
    parts.scaler.load_state_dict(saved["scaler"])
    parts.sampler.load_state_dict(saved["sampler"])
    set_rng_states(saved["rng"])
    parts.streams.load_state_dict(saved["streams"])


def auxiliary_states(auxiliary: dict) -> dict:
    return {name: optimizer.state_dict() for name, (_, optimizer) in auxiliary.items()}


def load_auxiliary_states(auxiliary: dict, saved: dict) -> None:
    states = saved.get("auxiliary_optimizers", {})
    missing = sorted(set(auxiliary) - set(states))
    if missing:
        raise KeyError(f"the checkpoint holds no state of the auxiliary optimiser(s) "
                       f"{', '.join(missing)} (expected key 'auxiliary_optimizers')")
    for name, (_, optimizer) in auxiliary.items():
        optimizer.load_state_dict(states[name])


def pretrain_best_payload(run, parts, state) -> dict:
    """The best pre-training state, with the optimisers', which a next stage that keeps them
    loads with the weights (BCP's ACDC code: save_net_opt at the best val, load_net_opt after)."""
    return {"method": parts.method.state_dict(), "optimizer": parts.optimizer.state_dict(),
            "auxiliary_optimizers": auxiliary_states(parts.auxiliary),
            "step": state.step, "run_id": state.run_id, "identity": run.identity}


def inference_payload(run, method, state) -> dict:
    """What evaluation needs: the inference network alone, how to rebuild it, whose it is."""
    return {
        "net_name": method.net_name(run.spec),
        "net_kwargs": dict(run.net),
        "in_channels": run.spec.in_channels,
        "num_classes": run.spec.num_classes,
        "state_dict": method.inference_net().state_dict(),
        "step": state.step,
        "method": run.method,
        "identity": run.identity,
        "run_id": state.run_id,
    }


def unread_hparams(hparams) -> list[str]:
    return hparams.unread() if hasattr(hparams, "unread") else []


def run_metadata(run, parts, state) -> dict:
    """run.json: the run's typed description (agcl.config.run: dataset, method, ratio, seed,
    net, validation window, split, device, precision, hashes), then how it trained, on what, and
    which weights were kept."""
    method = parts.method
    trained = {n.name: sum(p.numel() for p in n.module.parameters())
               for n in method.trained_networks()}
    return {
        **run.record(),
        "run_id": state.run_id,
        "identity": run.identity,
        # a noise-floor twin: this method's run again with its initial weights one ulp away
        "noise_floor_of": run.recipe.noise_floor_of,
        "init_perturbation": run.recipe.init_perturbation,
        "iterations": run.total,
        "stages": state.stages,
        "hparams": dict(run.hparams),
        # declared, but nothing read them in this run: a value set for them changed nothing
        "unread_hparams": unread_hparams(run.hparams),
        "train": run.train_cfg,
        # the evaluated network's, and everything the optimiser updates (e.g. MC-Net+'s
        # extra decoders, projection heads, CPS's peer), network by network
        "parameters": sum(p.numel() for p in method.inference_net().parameters()),
        "trainable_parameters": sum(trained.values()),
        "trained_networks": trained,
        # parameters of the method's own optimisers (SASSNet's discriminator), not evaluated
        "auxiliary_parameters": {name: sum(p.numel() for p in update.parameters)
                                 for name, (update, _) in parts.auxiliary.items()},
        "labeled": parts.data.labeled_ids,
        "n_labeled": len(parts.data.labeled_ids),
        "n_unlabeled": len(parts.data.unlabeled_ids),
        "n_val": len(parts.split["val"]),
        "selection": run.recipe.selection,
        "best_val_dice": None if state.best_step is None else state.best_val,
        "best_val_step": state.best_step,
        "data_on": str(parts.data_device or "host"),
        "cpu_numerics": cpu_numerics(),
        "train_seconds": state.train_seconds,
        "resumed_at_steps": state.resumed_at,
        "nonfinite_policy": run.train_cfg["nonfinite"],
        "skipped_steps": state.skipped,
        "skipped_step_numbers": state.skipped_steps,
        "code_version": code_version(),
        "config_name": run.config["name"],
        "config": run.config,
    }
