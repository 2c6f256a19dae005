"""Reproducible CPU numerics (config `reproducible_cpu`, agcl.runtime.numerics): the CPU switches are set
before torch loads, override what the environment says, and are recorded with the run."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from agcl.runtime.numerics import REPRODUCIBLE_ENV, pin_cpu_numerics
from agcl.runtime.runfolder import FINAL
from tests.conftest import REPO_ROOT
from tests.test_pipeline import prepare

HAS_AVX512 = "avx512f" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False


def train_weights(config: Path, out: Path, env: dict) -> tuple[str, dict]:
    """Train the tiny LA supervised run in a fresh process under `env`; (weights hash, run.json)."""
    base = {k: v for k, v in os.environ.items() if k not in REPRODUCIBLE_ENV}
    subprocess.run([sys.executable, "-m", "agcl", "train", "la", "--config", str(config),
                    "--method", "supervised", "--labels", "0.2", "--seed", "0", "--out", str(out),
                    "--no-progress"], check=True, capture_output=True, text=True,
                   env={**base, "PYTHONPATH": str(REPO_ROOT), **env})
    state = torch.load(out / FINAL, weights_only=False)["state_dict"]
    digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in state.values())).hexdigest()
    return digest, json.loads((out / "run.json").read_text())


def with_reproducible(config_path: Path, on: bool) -> Path:
    config = yaml.safe_load(config_path.read_text())
    config["reproducible_cpu"] = on
    path = config_path.with_name(f"repro_{on}.yaml")
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_mode_overrides_the_environment_and_is_recorded(tiny_project):
    prepare(tiny_project, "la")
    config = with_reproducible(tiny_project, True)
    root = tiny_project.parent
    native, meta = train_weights(config, root / "a", {})
    # other instruction sets asked for in the environment: the mode's switches win
    other, meta_b = train_weights(config, root / "b", {"ONEDNN_MAX_CPU_ISA": "SSE41",
                                                        "ATEN_CPU_CAPABILITY": "default"})
    assert native == other
    for m in (meta, meta_b):
        numerics = m["cpu_numerics"]
        assert numerics["reproducible_cpu"] is True
        assert (numerics["onednn_max_cpu_isa"], numerics["aten_cpu_capability"],
                numerics["mkl_cbwr"]) == ("AVX2", "avx2", "AVX2")
        assert numerics["cpu_capability"] == "AVX2"
        assert numerics["threads"] == 1  # the mode's thread count when --threads is not given


@pytest.mark.skipif(not HAS_AVX512, reason="needs an AVX-512 CPU to show the ISA moving weights")
def test_without_the_mode_the_instruction_set_moves_the_weights(tiny_project):
    """Why the mode exists: on this CPU, oneDNN at AVX2 and at its native AVX-512 give other
    weights; the mode's run equals the AVX2 one (what an AVX2-only CPU computes)."""
    prepare(tiny_project, "la")
    root = tiny_project.parent
    off = with_reproducible(tiny_project, False)
    one = {"OMP_NUM_THREADS": "1"}  # the thread count moves weights too: compare at the mode's
    native, meta = train_weights(off, root / "native", one)
    avx2, _ = train_weights(off, root / "avx2", {**REPRODUCIBLE_ENV, **one})
    pinned, _ = train_weights(with_reproducible(tiny_project, True), root / "pinned", {})
    assert native != avx2
    assert meta["cpu_numerics"]["reproducible_cpu"] is False
    assert meta["cpu_numerics"]["cpu_capability"] == "AVX512"
    assert pinned == avx2


def test_pinning_after_torch_loaded_under_other_values_is_refused(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")
    with pytest.raises(RuntimeError, match="ONEDNN_MAX_CPU_ISA=AVX512_CORE.*before starting Python"):
        pin_cpu_numerics()  # torch is loaded in this process
    for key, value in REPRODUCIBLE_ENV.items():
        monkeypatch.setenv(key, value)
    pin_cpu_numerics()  # already in force: nothing to refuse


def test_make_test_and_the_demo_use_the_mode():
    line = next(x for x in (REPO_ROOT / "Makefile").read_text().splitlines()
                if x.startswith("REPRODUCIBLE_CPU_ENV"))
    assert dict(kv.split("=") for kv in line.split("=", 1)[1].split()) == REPRODUCIBLE_ENV
    for name in ("demo", "cpu_study"):
        assert yaml.safe_load((REPO_ROOT / "config" / f"{name}.yaml").read_text())["reproducible_cpu"]
