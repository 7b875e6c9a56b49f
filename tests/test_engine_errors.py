"""Clear failures of the engine: Triton kernels without a GPU, a rank that dies under --nproc.

    python -m pytest -q tests/test_engine_errors.py
"""
from __future__ import annotations

import pytest

from megatron_jinpan import device as devices
from megatron_jinpan.config import ConfigError, load_config
from megatron_jinpan.training.commands import launch

BASE = ["model.name=debug", "data.mock=true", "train.steps=2", "train.global_batch=4", "train.micro_batch=2",
        "train.seq_len=32", "train.device=cpu", "log.progress=false", "log.tensorboard=false",
        "checkpoint.resume=never"]


def _never_called(cfg):
    raise AssertionError("no worker may start with a config that cannot run")


@pytest.mark.parametrize("key,fix", [("norm", "torch"), ("attention", "sdpa")])
def test_triton_kernels_without_gpu_fail_at_config_time(monkeypatch, key, fix):
    if devices.accelerator_available():
        pytest.skip("this machine has a GPU: Triton runs")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg = load_config(None, BASE + [f"kernels.{key}=triton"])
    with pytest.raises(ConfigError) as err:
        launch(cfg, _never_called, nproc=2)
    message = str(err.value)
    assert f"kernels.{key}=triton" in message and f"kernels.{key}={fix}" in message
    assert "TRITON_INTERPRET=1" in message and "no GPU" in message
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter is the documented way to run them on CPU
    from megatron_jinpan.parallel.validate import validate_config

    validate_config(cfg, 2)
