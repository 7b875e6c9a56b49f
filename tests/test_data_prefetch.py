"""Background prefetch of the next steps' micro-batches (data/prefetch.py): same results, errors surface.

    python -m pytest -q tests/test_data_prefetch.py
"""
from __future__ import annotations

import threading

import pytest
import torch

from megatron_jinpan.config import load_config
from megatron_jinpan.data.prefetch import Prefetcher

BASE = ["model.name=debug", "data.mock=true", "train.steps=4", "train.global_batch=8", "train.micro_batch=2",
        "train.seq_len=32", "train.device=cpu", "optim.warmup=1", "log.progress=false", "log.tensorboard=false",
        "checkpoint.resume=never", "checkpoint.save_on_exit=false"]


class _Recorder:
    """A dataset whose micro-batches name their step, recording on which thread each was read."""

    def __init__(self, fail_at: int | None = None):
        self.threads: dict[int, str] = {}
        self.read = {s: threading.Event() for s in range(10)}
        self.fail_at = fail_at

    def microbatches(self, step, dp_rank, dp):
        if step == self.fail_at:
            raise ValueError("corrupt sample 17")
        self.threads[step] = threading.current_thread().name
        self.read[step].set()
        return [{"tokens": torch.full((2, 4), step), "dp_rank": dp_rank}]


def test_prefetcher_reads_ahead_in_the_background_in_order():
    data = _Recorder()
    pre = Prefetcher(data, start=3, dp_rank=1, dp=2, device=torch.device("cpu"), depth=2, workers=2, stop=7)
    try:
        for step in range(3, 7):
            mbs = pre.get(step)
            assert int(mbs[0]["tokens"][0, 0]) == step and mbs[0]["dp_rank"] == 1
            if step + 1 < 7:  # the next step is being read before the loop asks for it
                assert data.read[step + 1].wait(timeout=60)
        assert set(data.threads) == {3, 4, 5, 6}  # never past `stop`
        assert all(name.startswith("jinpan-data") for name in data.threads.values())
    finally:
        pre.close()
    off = _Recorder()
    assert int(Prefetcher(off, 0, 0, 1, torch.device("cpu"), depth=0).get(5)[0]["tokens"][0, 0]) == 5
    assert off.threads[5] == threading.current_thread().name  # prefetch 0: read in the loop


def test_background_read_error_names_the_step():
    pre = Prefetcher(_Recorder(fail_at=1), 0, 0, 1, torch.device("cpu"), depth=2)
    try:
        pre.get(0)
        with pytest.raises(RuntimeError, match=r"micro-batches of step 1 .*ValueError: corrupt sample 17"):
            pre.get(1)
    finally:
        pre.close()


def test_training_is_identical_with_prefetch_on_and_off(tmp_path):
    from megatron_jinpan.training.loop import pretrain

    runs = {}
    for name, extra in {"off": ["data.prefetch=0"], "on": ["data.prefetch=3", "data.num_workers=2"]}.items():
        result = pretrain(load_config(None, BASE + extra + [f"run_dir={tmp_path}/{name}"]))
        runs[name] = result
        assert all(r["data_time_s"] >= 0 for r in result.records)
    assert [r["loss"] for r in runs["on"].records] == [r["loss"] for r in runs["off"].records]
    for (name, a), b in zip(runs["off"].chunks[0].named_parameters(), runs["on"].chunks[0].parameters()):
        assert torch.equal(a, b), name
