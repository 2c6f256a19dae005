"""Which device and which autocast dtype a run uses; shared by training and evaluation."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
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
