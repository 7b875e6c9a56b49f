"""`make bench-gpu` (benchmarks/gpu_all.sh) runs end to end on CPU in --dry-run mode, and fails fast without a GPU.

    python -m pytest -q tests/test_bench_gpu.py
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from megatron_jinpan import device as devices

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_all.sh"


def test_dry_run_produces_every_csv(tmp_path):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = sorted(p.name for p in tmp_path.glob("*.csv"))
    assert any(n.startswith("kernels_") for n in names) and any(n.startswith("throughput_") for n in names)
    assert "generation_dry_run.csv" in names
    for step in ("gpu tests (collected)", "kernels", "throughput", "generation"):
        assert f"] {step}" in proc.stdout


def test_without_a_gpu_it_stops_at_once_saying_why(tmp_path):
    if devices.accelerator_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run(["bash", str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr and "--dry-run" in proc.stderr
    assert not list(tmp_path.glob("*.csv"))
