"""Shared fixtures. Tests on real upstream files read ../shared/datasets and skip cleanly without it."""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(os.environ.get("AGCL_SHARED_DATASETS", REPO_ROOT.parent / "shared" / "datasets"))
# Tests run in temporary working directories: the method plugins are this checkout's baselines/
# (also for the `agcl` processes they start, which inherit the environment).
os.environ.setdefault("AGCL_PLUGIN_DIRS", str(REPO_ROOT / "baselines"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors gain nothing from threads; on a busy 2-core box 2 threads cost seconds a pass."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@contextlib.contextmanager
def onednn_disabled():
    """Run CPU bf16 through PyTorch's own kernels instead of oneDNN's.

    On CPUs with AVX512-BF16 or AMX, torch hands bf16 convolutions to oneDNN, whose kernels are
    wrong for some shapes (pytorch#169688, pytorch#188426: an innermost output size of 1 with a
    stride > 1, which a 16-deep 3D patch reaches at the nets' fourth downsampling); on such CPUs
    the 3D bf16 tests got non-finite gradients. Without oneDNN the same autocast code paths run
    on kernels every CPU has, so these tests check our AMP code rather than one vendor's kernel.
    """
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a TF32-on-Intel-GPU notice from flags()
        with torch.backends.mkldnn.flags(enabled=False):
            yield


@contextlib.contextmanager
def cpu_bf16_autocast():
    """bf16 autocast on CPU, on kernels that are correct on every CPU (see onednn_disabled)."""
    import torch

    with onednn_disabled(), torch.autocast("cpu", dtype=torch.bfloat16):
        yield


@pytest.fixture(scope="session")
def shared_mirror() -> Path:
    """Root of the byte-exact mirror of the upstream raw-file URLs (…/mirror/<owner>/<repo>/<branch>/…)."""
    mirror = SHARED_DATASETS / "mirror"
    if not mirror.is_dir():
        pytest.skip(f"real upstream files not available ({mirror} is absent)")
    return mirror


@pytest.fixture(scope="session")
def la_mirror_dir(shared_mirror: Path) -> Path:
    return shared_mirror / "yulequan" / "UA-MT" / "master" / "data"


@pytest.fixture(scope="session")
def acdc_volumes_mirror_dir(shared_mirror: Path) -> Path:
    return shared_mirror / "HiLab-git" / "WSL4MIS" / "main" / "data" / "ACDC" / "ACDC_training_volumes"


@pytest.fixture(scope="session")
def acdc_lists_mirror_dir(shared_mirror: Path) -> Path:
    return shared_mirror / "HiLab-git" / "SSL4MIS" / "master" / "data" / "ACDC"


def tiny_config() -> dict:
    """Smallest config that runs every stage on synthetic data in seconds (not a demo of quality)."""
    train3d = {"iterations": 4, "batch_size": 4, "labeled_batch_size": 2, "patch": [32, 32, 16],
               "schedule": "constant", "checkpoint_every": 2, "val_every": 2}
    train2d = {"iterations": 4, "batch_size": 4, "labeled_batch_size": 2, "patch": [32, 32],
               "schedule": "poly", "checkpoint_every": 2, "val_every": 2}
    return {
        "name": "tiny",
        "seeds": [0, 1],
        "methods": ["supervised"],
        "ratios": [0.1, 0.2],
        "device": "cpu",
        "datasets": {
            "la": {"source": "synthetic", "net": {"n_filters": 2},
                   "synth": {"n_train": 10, "n_test": 2, "size_xy": [30, 36], "size_z": 16},
                   "train": train3d, "eval": {"patch": [32, 32, 16], "stride": [8, 8, 8]}},
            "acdc": {"source": "synthetic", "net": {"base_features": 2}, "selection": "best_val",
                     "synth": {"n_train_patients": 10, "n_val_patients": 1, "n_test_patients": 2,
                               "slices": [8, 8], "size_hw": [24, 28]},
                     "train": train2d, "eval": {"patch": [32, 32]}},
            "crag": {"source": "synthetic", "net": {"base_features": 2}, "selection": "best_val",
                     "synth": {"n_train": 10, "n_test": 2, "size": [40, 48]},
                     "expected_counts": [10, 2], "val_cases": 2,
                     "train": train2d, "eval": {"patch": [32, 32], "stride": [16, 16]}},
        },
    }


@pytest.fixture
def tiny_project(tmp_path, monkeypatch):
    """A working directory holding config/tiny.yaml; paths in the config resolve against it."""
    import yaml

    (tmp_path / "config").mkdir()
    path = tmp_path / "config" / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config()))
    monkeypatch.chdir(tmp_path)
    return path


# --- equality tests must run wherever the reference snapshots are -----------------------------
_REFERENCE_SKIPS: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped and Path(report.fspath).name.startswith("test_ref_"):
        _REFERENCE_SKIPS.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    """A reference-equality test that skips although ../shared/references (the snapshots of the
    pinned reference commits) is present fails the run: a skipped equality test would let a
    change that breaks equality land green."""
    from tests.reference_code import REFERENCE_SNAPSHOTS

    if _REFERENCE_SKIPS and REFERENCE_SNAPSHOTS.is_dir():
        print(f"\n{len(_REFERENCE_SKIPS)} reference equality test(s) skipped although "
              f"{REFERENCE_SNAPSHOTS} exists (each must run):\n  "
              + "\n  ".join(_REFERENCE_SKIPS[:20]))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def load_benchmark(name: str):
    """A script of benchmarks/ imported as a module (its folder on sys.path, as when run), so
    that a test calls its main() and helpers."""
    import importlib.util
    import sys

    folder = str(REPO_ROOT / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
