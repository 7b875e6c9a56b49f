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


DYING_RANK = 1


def _dies_at_step_3(cfg):
    """pretrain, except that rank DYING_RANK dies when step 3 starts (after the step-2 checkpoint)."""
    import os
    import signal

    from megatron_jinpan.training.loop import pretrain
    from megatron_jinpan.training.task import language_model_task

    def make_task(cfg, mesh):
        task = language_model_task(cfg, mesh)

        def prepare(mbs, step):
            if step == 2 and mesh.rank == DYING_RANK:
                if cfg.train.seed == 1:
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError("injected failure on this rank")
            return mbs
        task.prepare = prepare
        return task
    pretrain(cfg, make_task=make_task)


@pytest.mark.parametrize("how", ["signal", "exception"])
def test_dead_rank_is_named_others_stopped_and_resume_point_given(tmp_path, how):
    from megatron_jinpan.training.failure import RankFailure

    run_dir = tmp_path / "run"
    cfg = load_config(None, BASE + ["train.steps=4", "checkpoint.interval=2", f"run_dir={run_dir}",
                                    f"train.seed={1 if how == 'signal' else 2}", "parallel.tp=2"])
    with pytest.raises(RankFailure) as err:
        launch(cfg, _dies_at_step_3, nproc=2)
    message = str(err.value)
    assert f"rank {DYING_RANK} of 2 (pp 0, dp 0, tp {DYING_RANK}) died" in message
    if how == "signal":
        assert "killed by signal SIGKILL" in message
    else:
        assert "raised RuntimeError: injected failure on this rank" in message
    assert "the other 1 rank was stopped" in message
    assert str(run_dir / "checkpoints" / "step_0000002") in message and "checkpoint.resume=never" not in message
