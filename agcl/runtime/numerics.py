"""Reproducible CPU numerics: one config and seed give the same weights on any x86-64 CPU with AVX2.

A CPU run's floats depend on the instruction set its kernels use and on the number of threads.
The same demo run gave other numbers on an AVX2-only AMD machine than on an AVX-512 one; with the
switches below set on the AVX-512 machine it gave that AVX2 machine's numbers (LA supervised 5 %
0.7355 and ACDC 0.5525 mean test Dice over two seeds, the AVX2 machine's 0.735 and 0.552).
Measured on four probed runs (LA supervised and mean_teacher, ACDC supervised): oneDNN's ISA
changed the weights of every one; ATen's CPU capability and MKL's conditional numerical
reproducibility changed none, and are pinned as well since each is a documented switch of its
own library and other kernels may use them. The thread count changes the weights too (1 vs 2
threads differ), so the mode also fixes it (REPRODUCIBLE_THREADS unless --threads says otherwise).

The switches are environment variables that each library reads once, when torch loads: they are
set before torch is imported (the CLI does it from the config's `reproducible_cpu`), and a
process that imported torch under other values is refused rather than silently mixed.
"""

from __future__ import annotations

import os
import sys
import warnings

REPRODUCIBLE_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",  # ATen's vectorised CPU kernels
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN's convolutions (the one measured to matter)
    "MKL_CBWR": "AVX2",  # MKL's conditional numerical reproducibility (BLAS)
}
# One thread, as every workflow job runs (rule threads: 1); other counts give other numbers.
REPRODUCIBLE_THREADS = 1


def pin_cpu_numerics() -> None:
    """Set REPRODUCIBLE_ENV for this process; refuse if torch already loaded under other values."""
    if "torch" in sys.modules:
        wrong = {k: os.environ.get(k) for k, v in REPRODUCIBLE_ENV.items() if os.environ.get(k) != v}
        if wrong:
            raise RuntimeError(
                "reproducible_cpu: torch was imported before the CPU switches were set "
                f"({', '.join(f'{k}={v}' for k, v in wrong.items())}; expected "
                f"{', '.join(f'{k}={v}' for k, v in REPRODUCIBLE_ENV.items())}): set them in the "
                "environment before starting Python")
        return
    overridden = {k: os.environ[k] for k, v in REPRODUCIBLE_ENV.items()
                  if k in os.environ and os.environ[k] != v}
    if overridden:
        warnings.warn(f"reproducible_cpu replaces {overridden} by {REPRODUCIBLE_ENV}", stacklevel=2)
    os.environ.update(REPRODUCIBLE_ENV)


def cpu_numerics() -> dict:
    """What decided this process's CPU floats, for run.json and metrics.json."""
    import torch

    return {
        "reproducible_cpu": all(os.environ.get(k) == v for k, v in REPRODUCIBLE_ENV.items()),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        **{k.lower(): os.environ.get(k, "native") for k in REPRODUCIBLE_ENV},
        "threads": torch.get_num_threads(),
    }
