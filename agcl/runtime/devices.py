"""Device policy: which device and autocast dtype a run uses, how batches reach it, where the
training set lives, and the seeding/determinism switches; shared by training and evaluation.

On a machine with several GPUs, jobs that Snakemake runs side by side must not all land on
cuda:0: each process claims a free GPU through a lock file named after the GPU's UUID and keeps
it until it exits (the OS drops an flock when the process ends or dies, so a killed job frees its
GPU). Only the GPUs torch can see are candidates, so a user's CUDA_VISIBLE_DEVICES (or SLURM's)
is honoured; `cuda:N` picks GPU N explicitly and claims nothing.
"""

from __future__ import annotations

import fcntl
import logging
import os
import random
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

SLOT_DIR_ENV = "AGCL_GPU_SLOT_DIR"
_held_locks: list = []  # open lock files: held for the life of the process


def gpu_slot_dir() -> Path:
    """Where the per-GPU lock files live (one folder per user on this machine)."""
    default = Path(tempfile.gettempdir()) / f"agcl-gpu-slots-{os.getuid()}"
    return Path(os.environ.get(SLOT_DIR_ENV, default))


def claim_free_slot(slot_ids: list[str], lock_dir: Path, wait_s: float = 3600.0,
                    poll_s: float = 2.0) -> int:
    """Index of the first slot whose lock this process takes; waits while all are held."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    warned = False
    while True:
        for index, slot_id in enumerate(slot_ids):
            name = re.sub(r"[^A-Za-z0-9_.-]", "_", slot_id)
            # Not a context manager: the lock lasts exactly as long as this handle stays open.
            handle = open(lock_dir / f"{name}.lock", "a+")  # noqa: SIM115
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            _held_locks.append(handle)
            return index
        if time.monotonic() > deadline:
            raise RuntimeError(f"every GPU ({len(slot_ids)}) stayed claimed by other agcl jobs "
                               f"for {wait_s:.0f} s (lock files in {lock_dir})")
        if not warned:
            log.warning("all %d GPUs are claimed by other agcl jobs; waiting for one "
                        "(lock files in %s)", len(slot_ids), lock_dir)
            warned = True
        time.sleep(poll_s)


def _free_cuda_device() -> torch.device:
    count = torch.cuda.device_count()
    if count == 1:
        return torch.device("cuda:0")
    uuids = [str(torch.cuda.get_device_properties(i).uuid) for i in range(count)]
    index = claim_free_slot(uuids, gpu_slot_dir())
    log.info("using GPU cuda:%d of %d (%s)", index, count, uuids[index])
    return torch.device(f"cuda:{index}")


def resolve_device(name: str) -> torch.device:
    """auto -> a free GPU if torch sees one, else the CPU; cuda -> a free GPU; cuda:N -> GPU N."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?|auto", name)
    if match is None:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if not torch.cuda.is_available():
        raise RuntimeError(f"device {name} was asked for but torch sees no CUDA device (torch "
                           f"{torch.__version__}, built for CUDA {torch.version.cuda}); install a "
                           "CUDA build of torch, or set device: cpu / --device cpu to train on "
                           "the CPU")
    if match.group(1) is None:
        return _free_cuda_device()
    index, count = int(match.group(1)), torch.cuda.device_count()
    if index >= count:
        raise RuntimeError(f"device {name}: torch sees {count} CUDA device(s) "
                           f"(cuda:0 to cuda:{count - 1})")
    return torch.device(name)


def resolve_amp(setting: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 on CUDA where supported, fp16 (with a scaler) on older GPUs, off on CPU."""
    if setting == "off" or (setting == "auto" and device.type == "cpu"):
        return None
    if setting == "bf16":
        return torch.bfloat16
    if setting == "fp16":
        return torch.float16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def amp_name(amp_dtype: torch.dtype | None) -> str:
    return str(amp_dtype).replace("torch.", "") if amp_dtype else "off"


def seed_everything(seed: int, device: torch.device, deterministic: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cuda":
        # cuBLAS needs this for deterministic GEMMs; some 3D CUDA kernels have no deterministic
        # version, so on CUDA we warn instead of failing (CPU runs are exactly repeatable).
        # Not deterministic: cuDNN benchmarks and picks the fastest convolution algorithms.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=device.type == "cuda")


def resolve_deterministic(setting: str | bool, device: torch.device) -> bool:
    """train.deterministic: auto = on the CPU (where it costs nothing and runs repeat exactly),
    off on CUDA (cuDNN autotuning; GPU runs are not bit-repeatable even with it on)."""
    if setting == "auto":
        return device.type != "cuda"
    return bool(setting)


def channels_last_format(ndim: int) -> torch.memory_format:
    """The channels-last memory format of an (N, C, spatial...) tensor with `ndim` dimensions."""
    return {4: torch.channels_last, 5: torch.channels_last_3d}[ndim]


def to_device(batch: torch.Tensor | None, device: torch.device,
              channels_last: bool = False) -> torch.Tensor | None:
    """A sampler's batch on the training device (a no-op when the training set lives there);
    host batches go through pinned memory to a GPU."""
    if batch is None:
        return None
    if batch.device.type == "cpu" and device.type == "cuda":
        batch = batch.pin_memory().to(device, non_blocking=True)
    elif batch.device != device:
        batch = batch.to(device)
    if channels_last:
        batch = batch.contiguous(memory_format=channels_last_format(batch.ndim))
    return batch


# data_placement auto holds the training set on a GPU when it takes at most this share of the
# card's memory (LA: ~0.5 GB, ACDC: ~0.4 GB at the upstream sizes; an H100 has 80 GB).
DEVICE_DATA_SHARE = 0.25


def data_device(placement: str, device: torch.device, nbytes: int) -> torch.device | None:
    """Where the sampler keeps the training set: on the training device (None = host memory)."""
    if device.type != "cuda" or placement == "host":
        return None
    if placement == "device":
        return device
    total = torch.cuda.get_device_properties(device).total_memory
    return device if nbytes <= DEVICE_DATA_SHARE * total else None
