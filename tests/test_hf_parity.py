"""Our Llama and a random transformers.LlamaForCausalLM with the same weights give the same logits."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from megatron_jinpan.models import Llama, LlamaConfig


def _hf_model(num_kv_heads, tie=False, seed=0):
    torch.manual_seed(seed)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=num_kv_heads, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=tie, attn_implementation="eager")
    return transformers.LlamaForCausalLM(hf_cfg).float().eval(), hf_cfg


def _ours_from_hf(hf, hf_cfg, backend):
    cfg = LlamaConfig(vocab_size=hf_cfg.vocab_size, hidden_size=hf_cfg.hidden_size,
                      intermediate_size=hf_cfg.intermediate_size, num_layers=hf_cfg.num_hidden_layers,
                      num_heads=hf_cfg.num_attention_heads, num_kv_heads=hf_cfg.num_key_value_heads,
                      norm_eps=hf_cfg.rms_norm_eps, rope_theta=hf_cfg.rope_parameters["rope_theta"],
                      tie_embeddings=hf_cfg.tie_word_embeddings)
    ours = Llama(cfg).eval()
    state = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not unexpected and all(m == "lm_head.weight" for m in missing)
    from megatron_jinpan.models.ops import KernelChoice
    ours.set_kernels(KernelChoice(attention=backend, norm="torch", rope="torch", swiglu="torch"))
    return ours


@pytest.mark.parametrize("num_kv_heads", [8, 2])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("tie", [False, True])
def test_logits_match_hf(num_kv_heads, backend, tie):
    hf, hf_cfg = _hf_model(num_kv_heads, tie)
    ours = _ours_from_hf(hf, hf_cfg, backend)
    tokens = torch.randint(0, hf_cfg.vocab_size, (2, 23))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_position_ids_match_hf():
    hf, hf_cfg = _hf_model(2)
    ours = _ours_from_hf(hf, hf_cfg, "sdpa")
    tokens = torch.randint(0, hf_cfg.vocab_size, (1, 10))
    pos = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens, position_ids=pos), hf(tokens, position_ids=pos).logits,
                                   atol=1e-5, rtol=1e-5)
