"""Several GPUs on one machine: concurrent jobs claim different GPUs, a killed job frees its
GPU, cuda:N is accepted and checked. Runs on CPU with fake GPU lists and a mocked torch.cuda."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from agcl.cli import build_parser
from agcl.runtime import devices

SLOTS = ["GPU-aaaa", "GPU-bbbb", "GPU-cccc"]
CLAIM = """
import sys, time
from pathlib import Path
from agcl.runtime.devices import claim_free_slot
slot = claim_free_slot({slots!r}, Path({lock_dir!r}), wait_s={wait}, poll_s=0.05)
Path({out!r}).write_text(str(slot))
time.sleep({hold})
"""


def start_claim(tmp_path: Path, name: str, hold: float, wait: float = 30.0) -> subprocess.Popen:
    code = CLAIM.format(slots=SLOTS, lock_dir=str(tmp_path / "locks"), wait=wait,
                        out=str(tmp_path / f"{name}.slot"), hold=hold)
    return subprocess.Popen([sys.executable, "-c", code])


def wait_for(path: Path, timeout: float = 60.0) -> int:
    deadline = time.time() + timeout
    while not (path.exists() and path.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    return int(path.read_text())


def test_concurrent_jobs_never_share_a_gpu_and_a_killed_job_frees_its_own(tmp_path):
    holders = [start_claim(tmp_path, f"job{i}", hold=60) for i in range(3)]
    try:
        slots = [wait_for(tmp_path / f"job{i}.slot") for i in range(3)]
        assert sorted(slots) == [0, 1, 2]
        # A fourth job waits while all three are held ...
        waiting = start_claim(tmp_path, "late", hold=0)
        time.sleep(1.0)
        assert waiting.poll() is None and not (tmp_path / "late.slot").exists()
        # ... and gets the GPU of the job that is killed (no clean-up code runs on SIGKILL).
        victim = slots.index(1)
        holders[victim].kill()
        holders[victim].wait()
        assert wait_for(tmp_path / "late.slot") == 1
        assert waiting.wait(timeout=30) == 0
    finally:
        for process in holders:
            process.kill()
            process.wait()


def test_claim_gives_up_with_a_clear_message(tmp_path):
    holders = [start_claim(tmp_path, f"job{i}", hold=60) for i in range(3)]
    try:
        for i in range(3):
            wait_for(tmp_path / f"job{i}.slot")
        with pytest.raises(RuntimeError, match=r"every GPU \(3\) stayed claimed .* for 0 s"):
            devices.claim_free_slot(SLOTS, tmp_path / "locks", wait_s=0.2, poll_s=0.05)
    finally:
        for process in holders:
            process.kill()
            process.wait()


@pytest.fixture
def three_fake_gpus(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(uuid=SLOTS[i]))
    monkeypatch.setenv(devices.SLOT_DIR_ENV, str(tmp_path / "locks"))
    yield
    for handle in devices._held_locks:  # release this process's claims
        handle.close()
    devices._held_locks.clear()


def test_resolve_device_claims_a_free_gpu_per_call_and_takes_cuda_n_as_given(three_fake_gpus):
    # Two claims from one process (as two jobs would make) get two different GPUs.
    assert devices.resolve_device("cuda") == torch.device("cuda:0")
    assert devices.resolve_device("auto") == torch.device("cuda:1")
    assert devices.resolve_device("cuda:2") == torch.device("cuda:2")  # explicit: no claim
    assert len(devices._held_locks) == 2
    with pytest.raises(RuntimeError, match=r"torch sees 3 CUDA device\(s\) \(cuda:0 to cuda:2\)"):
        devices.resolve_device("cuda:3")
    with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:N"):
        devices.resolve_device("gpu")


def test_one_visible_gpu_is_used_without_a_lock(monkeypatch, tmp_path):
    # e.g. SLURM's CUDA_VISIBLE_DEVICES: the job's own GPU is always cuda:0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv(devices.SLOT_DIR_ENV, str(tmp_path / "locks"))
    assert devices.resolve_device("cuda") == torch.device("cuda:0")
    assert not (tmp_path / "locks").exists()


def test_cpu_only_machine():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert devices.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="device cuda:1 was asked for but torch sees no CUDA "
                       r"device .*built for CUDA None.*--device cpu"):
        devices.resolve_device("cuda:1")


def test_paper_configs_refuse_the_cpu_unless_asked():
    from agcl.config import load_config
    from tests.conftest import REPO_ROOT
    for name in ("config.yaml", "reference.yaml"):
        assert load_config(REPO_ROOT / "config" / name)["device"] == "cuda"
    for name in ("demo.yaml", "cpu_study.yaml"):
        assert load_config(REPO_ROOT / "config" / name)["device"] == "cpu"


def test_cli_accepts_cuda_n_and_names_the_forms():
    parser = build_parser()
    args = parser.parse_args(["train", "la", "--config", "c.yaml", "--method", "supervised",
                              "--labels", "0.1", "--seed", "0", "--device", "cuda:1"])
    assert args.device == "cuda:1"
    with pytest.raises(SystemExit):
        parser.parse_args(["evaluate", "la", "--config", "c.yaml", "--device", "gpu1"])
