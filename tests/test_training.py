"""The single-process trainer: metrics.jsonl contract, loss falls, eval, bf16, LR schedule."""
import json
import math

import pytest
import torch

from megatron_jinpan.config import load_config
from megatron_jinpan.training.loop import pretrain
from megatron_jinpan.training.lr import learning_rate

BASE = ["model.name=debug", "data.mock=true", "train.seq_len=32", "train.global_batch=8", "train.micro_batch=4",
        "train.device=cpu", "log.progress=false", "checkpoint.resume=never", "checkpoint.save_on_exit=false"]
KEYS = {"step", "loss", "grad_norm", "lr", "tokens", "tokens_per_s", "tflops_per_gpu", "mfu", "mem_gb"}


def _read(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_metrics_contract_and_loss_falls(tmp_path):
    cfg = load_config(None, BASE + [f"run_dir={tmp_path}", "train.steps=40", "optim.lr=3e-3", "optim.warmup=2",
                                    "train.eval_interval=20", "train.eval_iters=2"])
    pretrain(cfg)
    lines = _read(tmp_path)
    train_lines = [x for x in lines if "loss" in x]
    assert [x["step"] for x in train_lines] == list(range(1, 41))
    for line in train_lines:
        assert KEYS <= line.keys()
        assert line["mfu"] is None  # CPU: no peak to compare against
        assert line["tokens"] == line["step"] * 8 * 32
    first = sum(x["loss"] for x in train_lines[:5]) / 5
    last = sum(x["loss"] for x in train_lines[-5:]) / 5
    assert last < first - 0.3, (first, last)
    evals = [x for x in lines if "eval_loss" in x]
    assert [x["step"] for x in evals] == [20, 40]
    assert math.isclose(evals[-1]["eval_ppl"], math.exp(evals[-1]["eval_loss"]), rel_tol=1e-6)
    assert (tmp_path / "config.yaml").exists()
    assert any((tmp_path / "tb").iterdir())


def test_gradient_accumulation_matches_one_big_microbatch(tmp_path):
    a = pretrain(load_config(None, BASE + [f"run_dir={tmp_path}/a", "train.steps=3", "train.micro_batch=8"]))
    b = pretrain(load_config(None, BASE + [f"run_dir={tmp_path}/b", "train.steps=3", "train.micro_batch=1"]))
    la, lb = [r["loss"] for r in a.records], [r["loss"] for r in b.records]
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=1e-5, atol=1e-6)


def test_bf16_trains(tmp_path):
    result = pretrain(load_config(None, BASE + [f"run_dir={tmp_path}", "train.steps=3", "train.dtype=bf16"]))
    assert all(math.isfinite(r["loss"]) for r in result.records)


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_gives_the_same_losses(tmp_path, mode):
    a = pretrain(load_config(None, BASE + [f"run_dir={tmp_path}/a", "train.steps=2"]))
    b = pretrain(load_config(None, BASE + [f"run_dir={tmp_path}/b", "train.steps=2", f"train.recompute={mode}"]))
    assert [r["loss"] for r in a.records] == pytest.approx([r["loss"] for r in b.records], rel=1e-6)


def test_lr_schedule_warmup_then_cosine_to_min():
    optim = load_config(None, ["optim.lr=1.0", "optim.min_lr=0.1", "optim.warmup=10"]).optim
    assert learning_rate(0, optim, 110) == pytest.approx(0.1)
    assert learning_rate(9, optim, 110) == pytest.approx(1.0)
    assert learning_rate(60, optim, 110) == pytest.approx(0.55)
    assert learning_rate(110, optim, 110) == pytest.approx(0.1)
    values = [learning_rate(s, optim, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))
