"""Sliding-window inference of one real LA case: batched windows vs one window at a time.

Both use the reference protocol (patch 112x112x80, stride_xy 18, stride_z 4, softmax averaged
over overlaps) through agcl.nets.inference.sliding_window_probabilities; only `window_batch`
differs. The network is an untrained VNet (speed does not depend on the weights). Batching pays
off on a GPU; on a CPU both are bound by the same convolutions.

Prints CSV: mode,window_batch,seconds,windows,speedup and checks both give the same output.

    python benchmarks/inference_speed.py --device cuda --window-batch 16      # GPU, full size
    python benchmarks/inference_speed.py --width 4 --stride-xy 36 --stride-z 8  # quick CPU look
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from agcl.data.formats import la_case_path, read_h5_volume, read_list
from agcl.nets import build
from agcl.nets.inference import sliding_window_probabilities, window_starts

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LA = REPO_ROOT.parent / "shared" / "datasets" / "mirror" / "yulequan" / "UA-MT" / "master" / "data"


def first_present_case(la_dir: Path) -> str:
    for case in read_list(la_dir / "test.list") + read_list(la_dir / "train.list"):
        if la_case_path(la_dir, case).exists():
            return case
    sys.exit(f"no LA case found under {la_dir}")


def timed(net, image, patch, stride, device, window_batch, amp_dtype) -> tuple[float, np.ndarray]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    tic = time.perf_counter()
    probs = sliding_window_probabilities(net, image, patch, stride, 2, device, window_batch, amp_dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - tic, probs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--la-dir", type=Path, default=DEFAULT_LA,
                        help="folder with train.list, test.list and the h5 volumes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--width", type=int, default=16, help="VNet n_filters (16 = paper)")
    parser.add_argument("--stride-xy", type=int, default=18)
    parser.add_argument("--stride-z", type=int, default=4)
    parser.add_argument("--window-batch", type=int, default=8)
    parser.add_argument("--bf16", action="store_true", help="autocast to bfloat16")
    args = parser.parse_args()

    case = first_present_case(args.la_dir)
    image, _ = read_h5_volume(la_case_path(args.la_dir, case))
    volume = image[None].astype(np.float32)
    patch, stride = [112, 112, 80], [args.stride_xy, args.stride_xy, args.stride_z]
    device = torch.device(args.device)
    torch.manual_seed(0)
    net = build("vnet", 1, 2, n_filters=args.width).to(device).eval()
    amp_dtype = torch.bfloat16 if args.bf16 else None
    windows = math.prod(len(window_starts(max(s, p), p, st))
                        for s, p, st in zip(image.shape, patch, stride))

    seconds_loop, probs_loop = timed(net, volume, patch, stride, device, 1, amp_dtype)
    seconds_batched, probs_batched = timed(net, volume, patch, stride, device, args.window_batch,
                                           amp_dtype)
    max_diff = float(np.abs(probs_loop - probs_batched).max())
    print(f"# case {case} shape {image.shape}, device {device}, VNet n_filters {args.width}, "
          f"stride {stride}, max |difference| {max_diff:.2e}")
    print("mode,window_batch,seconds,windows,speedup")
    print(f"one_window_at_a_time,1,{seconds_loop:.3f},{windows},1.00")
    print(f"batched,{args.window_batch},{seconds_batched:.3f},{windows},"
          f"{seconds_loop / seconds_batched:.2f}")


if __name__ == "__main__":
    main()
