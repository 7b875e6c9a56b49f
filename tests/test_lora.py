"""LoRA (train.trainable=lora) under tensor, sequence, pipeline and data parallelism.

    python -m pytest -q tests/test_lora.py

Equivalence: the same LoRA run under (tp, pp, dp) = (2, 2, 2) with SP and ZeRO-1 gives the single
process's losses and adapters (fp32); the frozen base stays bit-identical to its initial value; B
starts at zero so step 0 is the base model; dropout masks are the same under TP as on one process.
"""
from __future__ import annotations

import pytest
import torch

from harness import run_layout
from megatron_jinpan.config import LoRAConfig, load_config
from megatron_jinpan.models import Llama, get_model_config
from megatron_jinpan.models.llama import init_weights
from megatron_jinpan.parallel.lora import apply_lora, count_adapter_params, is_lora_name, merge_lora

def assert_same_training(reference: dict, other: dict) -> None:
    """Losses and gradient norms tight; adapters to 2e-5: A's gradient is exactly zero at step 0 (B = 0) and
    tiny after, where Adam's m / (sqrt(v) + eps) turns last-bit differences of the reduction order into
    ~1e-5 differences of an update. A missing or doubled TP/DP reduction changes the grad norm at once."""
    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(other["losses"]), torch.tensor(reference["losses"]), **close)
    torch.testing.assert_close(torch.tensor(other["grad_norms"]), torch.tensor(reference["grad_norms"]), **close)
    assert reference["params"].keys() == other["params"].keys()
    for name, value in reference["params"].items():
        torch.testing.assert_close(other["params"][name], value, rtol=1e-5, atol=2e-5, msg=lambda m: f"{name}: {m}")


LORA = ["train.trainable=lora", "lora.rank=4", "lora.alpha=8", "optim.lr=1e-2", "optim.weight_decay=0.0"]


def _base_init(overrides=()):
    cfg = load_config(None, ["model.name=debug", *overrides])
    return {k: v.detach().clone() for k, v in init_weights(Llama(cfg.model), cfg.train.seed).state_dict().items()}


def test_apply_lora_keeps_step0_logits_and_counts_params():
    cfg = get_model_config("debug")
    model = init_weights(Llama(cfg), 7)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    before = model(tokens)
    lora = LoRAConfig(rank=4, alpha=8.0, targets=["q", "v", "down"])
    apply_lora(model, lora, seed=7)
    assert torch.equal(model(tokens), before)  # B = 0
    adapters = {n: p for n, p in model.named_parameters() if is_lora_name(n)}
    assert sum(p.numel() for p in adapters.values()) == count_adapter_params(cfg, lora) > 0
    assert all(torch.count_nonzero(p) == 0 for n, p in adapters.items() if "lora_B" in n)
    assert all(torch.count_nonzero(p) > 0 for n, p in adapters.items() if "lora_A" in n)
    with pytest.raises(ValueError, match="already applied"):
        apply_lora(model, lora, seed=7)


def test_merge_equals_unmerged():
    cfg = get_model_config("debug")
    model = apply_lora(init_weights(Llama(cfg), 3), LoRAConfig(rank=4, alpha=8.0), seed=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B.weight"):
                p.normal_(0.0, 0.02)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    unmerged = model(tokens)
    merged = merge_lora(model)(tokens)
    assert not any(is_lora_name(n) for n, _ in model.named_parameters())
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return run_layout(LORA, 1, tmp_path_factory.mktemp("lora_ref"))


def test_lora_3d_sp_zero1_matches_single_process(reference, tmp_path):
    out = run_layout(LORA + ["parallel.tp=2", "parallel.pp=2", "parallel.sp=true", "parallel.zero=1"], 8, tmp_path)
    assert_same_training(reference, out)
    base = _base_init()
    for run in (reference, out):
        adapters = {k: v for k, v in run["params"].items() if is_lora_name(k)}
        assert len(adapters) == 2 * 7 * get_model_config("debug").num_layers
        assert all(torch.count_nonzero(v) > 0 for v in adapters.values())  # B trained away from zero
        # The frozen base: bit-identical to its initial value after training.
        assert set(run["params"]) - set(adapters) == set(base)
        for name, value in base.items():
            assert torch.equal(run["params"][name], value), name


def test_lora_dropout_masks_match_under_tp(tmp_path):
    drop = LORA + ["lora.dropout=0.2", "train.steps=2"]
    ref = run_layout(drop, 1, tmp_path / "one")
    out = run_layout(drop + ["parallel.tp=2", "parallel.sp=true"], 2, tmp_path / "tp")
    assert_same_training(ref, out)
    no_drop = run_layout(LORA + ["train.steps=2"], 1, tmp_path / "nodrop")
    assert ref["losses"][1] != pytest.approx(no_drop["losses"][1], rel=1e-6)  # dropout did act
