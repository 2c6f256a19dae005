"""Time medpy 0.5.2 against agcl.eval.metrics.binary_metrics on real LA test cases.

Cases: the first N of test.list, then train.list, that are present in the mirror.
For each case, gt = the label and pred = a perturbed label (grown on one half, shrunk on the
other, shifted by (2, -1) voxels), as a stand-in for a network output. medpy is called the way the
upstream test scripts do: dc, jc, hd95 and asd separately, distances in voxels.

Prints CSV: case,medpy_seconds,ours_seconds,speedup,max_abs_diff and a final mean line.

    python benchmarks/metrics_speed.py --cases 20
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import h5py
import numpy as np
from medpy.metric import binary as medpy_binary
from scipy import ndimage

from agcl.eval.metrics import binary_metrics

REPO_ROOT = Path(__file__).resolve().parents[1]
LA_DATA = Path("yulequan") / "UA-MT" / "master" / "data"
VOLUMES = "2018LA_Seg_Training Set"
METRICS = ("dice", "jaccard", "hd95", "asd")


def perturbed(label: np.ndarray) -> np.ndarray:
    grown = ndimage.binary_dilation(label, iterations=2)
    half = label.shape[1] // 2
    grown[:, :half] = ndimage.binary_erosion(label, iterations=1)[:, :half]
    return np.roll(grown, (2, -1), axis=(0, 1))


def medpy_metrics(pred: np.ndarray, gt: np.ndarray) -> tuple[float, ...]:
    return (
        medpy_binary.dc(pred, gt),
        medpy_binary.jc(pred, gt),
        medpy_binary.hd95(pred, gt),
        medpy_binary.asd(pred, gt),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mirror", type=Path, default=REPO_ROOT.parent / "shared" / "datasets" / "mirror",
        help="root of the upstream file mirror (default: ../shared/datasets/mirror)",
    )
    parser.add_argument("--cases", type=int, default=20,
                        help="first N cases present, test.list then train.list (default 20)")
    args = parser.parse_args(argv)

    data = args.mirror / LA_DATA
    lists = [data / "test.list", data / "train.list"]
    if not all(path.is_file() for path in lists):
        parser.error(f"--mirror must hold {LA_DATA}/test.list and train.list (under {args.mirror})")
    # test.list first, then train.list: a partial mirror may lack some cases.
    listed = [case for path in lists for case in path.read_text().split()]
    present = [case for case in listed if (data / VOLUMES / case / "mri_norm2.h5").is_file()]
    cases = present[: args.cases]
    if not cases:
        parser.error(f"no LA case found under {data / VOLUMES}")
    if len(cases) < args.cases:
        print(f"note: only {len(cases)} of the {len(listed)} listed cases are in the mirror",
              file=sys.stderr)

    print("case,medpy_seconds,ours_seconds,speedup,max_abs_diff")
    rows = []
    for case in cases:
        with h5py.File(data / VOLUMES / case / "mri_norm2.h5", "r") as handle:
            gt = handle["label"][:].astype(bool)
        pred = perturbed(gt)

        start = time.perf_counter()
        reference = medpy_metrics(pred, gt)
        medpy_seconds = time.perf_counter() - start

        start = time.perf_counter()
        ours = binary_metrics(pred, gt)
        ours_seconds = time.perf_counter() - start

        diff = max(abs(ours[name] - value) for name, value in zip(METRICS, reference))
        rows.append((medpy_seconds, ours_seconds, medpy_seconds / ours_seconds, diff))
        print(f"{case},{medpy_seconds:.4f},{ours_seconds:.4f},{rows[-1][2]:.2f},{diff:.3g}",
              flush=True)

    medpy_mean, ours_mean, speedup_mean, _ = np.mean(rows, axis=0)
    worst = max(row[3] for row in rows)
    print(f"mean,{medpy_mean:.4f},{ours_mean:.4f},{speedup_mean:.2f},{worst:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
