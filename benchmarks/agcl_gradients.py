"""Gradient norm each Semi-AGCL loss term sends to the student, beside BCP's own loss.

Issue 8 asks for the AGCL weights to be chosen so that the terms act. This script measures, on
LA- and ACDC-shaped batches, ||d term / d student|| for L_BCP, L_reg (Eq 4), L_PL_AGG (Eq 3) and
L_RW_AGG (Eq 7), each at weight 1 and without the ramp, at initialisation and after some main-
stage steps, and prints the ratios to L_BCP:

    python benchmarks/agcl_gradients.py                       # CPU, reduced widths
    python benchmarks/agcl_gradients.py --device cuda --full  # paper widths and patches

Batches are random tensors with random labels (the quantity measured is the relative size of the
terms, not their value on real anatomy); --steps SGD steps on the full loss give the mid-training
point.
"""

from __future__ import annotations

import argparse

import torch

from agcl.data.specs import get_spec
from agcl.methods.base import MAIN, Batch
from agcl.methods.registry import get_method

TERMS = ("loss_bcp", "loss_reg", "loss_pl_agg", "loss_rw_agg")
SHAPES = {  # dataset: (reduced width kwargs, patch, labeled, unlabeled), (full ...)
    "la": (({"n_filters": 4}, (64, 64, 48), 2, 2), ({"n_filters": 16}, (112, 112, 80), 4, 4)),
    "acdc": (({"base_features": 8}, (128, 128), 6, 6), ({"base_features": 16}, (256, 256), 12, 12)),
}


def batch_for(dataset: str, patch, labeled: int, unlabeled: int, device, gen) -> Batch:
    spec = get_spec(dataset)
    return Batch(torch.randn(labeled, spec.in_channels, *patch, generator=gen).to(device),
                 torch.randint(0, spec.num_classes, (labeled, *patch), generator=gen).to(device),
                 torch.randn(unlabeled, spec.in_channels, *patch, generator=gen).to(device))


def term_norms(method, batch: Batch, step: int) -> dict[str, float]:
    """||grad|| over the student's parameters of each term, from one forward pass."""
    captured = {}
    original = method._agcl_terms

    def keep(*args, **kwargs):
        captured.update(original(*args, **kwargs))
        return captured

    method._agcl_terms = keep
    pairs = method.mixed_pairs(batch)
    captured["loss_bcp"] = method.pair_loss(pairs[0]) + method.pair_loss(pairs[1])
    method.extra_loss(pairs, step)
    method._agcl_terms = original
    params = [p for p in method.student.parameters() if p.requires_grad]
    norms = {}
    for term in TERMS:
        grads = torch.autograd.grad(captured[term], params, retain_graph=True, allow_unused=True)
        norms[term] = float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))
    return norms


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["la", "acdc"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full", action="store_true", help="paper widths, patches and batches")
    parser.add_argument("--steps", type=int, default=30, help="SGD steps before the mid point")
    parser.add_argument("--repeats", type=int, default=3, help="batches averaged per point")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"# device={device} full={args.full} steps={args.steps} repeats={args.repeats} "
          f"torch={torch.__version__}")
    print("dataset,point," + ",".join(f"grad_{t}" for t in TERMS) + ","
          + ",".join(f"ratio_{t}" for t in TERMS[1:]))
    for dataset in args.datasets:
        widths, patch, labeled, unlabeled = SHAPES[dataset][1 if args.full else 0]
        cls = get_method("semi_agcl")
        torch.manual_seed(0)
        hparams = cls.hparams_for(dataset, {"rampup": 0})
        method = cls(get_spec(dataset), hparams, widths, 10_000).to(device).train()
        method.start_stage(MAIN, fresh=True)
        optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.01, momentum=0.9,
                                    weight_decay=1e-4)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():  # fill the key queue first, so Eq 4 and 7 have their negatives
            for _ in range(-(-hparams["queue_length"] // hparams["n_patches"])):
                method.train_step(batch_for(dataset, patch, labeled, unlabeled, device, gen), 0)
        for point in ("init", f"after_{args.steps}_steps"):
            if point != "init":
                for step in range(args.steps):
                    loss, _ = method.train_step(
                        batch_for(dataset, patch, labeled, unlabeled, device, gen), step)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    method.after_optimizer_step(step)
            totals = dict.fromkeys(TERMS, 0.0)
            for _ in range(args.repeats):
                norms = term_norms(method, batch_for(dataset, patch, labeled, unlabeled, device,
                                                     gen), args.steps)
                for term in TERMS:
                    totals[term] += norms[term] / args.repeats
            ratios = [totals[t] / totals["loss_bcp"] for t in TERMS[1:]]
            print(f"{dataset},{point}," + ",".join(f"{totals[t]:.4g}" for t in TERMS) + ","
                  + ",".join(f"{r:.3g}" for r in ratios), flush=True)


if __name__ == "__main__":
    main()
