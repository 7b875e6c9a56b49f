"""The model on Triton kernels (CPU interpreter) gives the torch/SDPA backends' logits, grads and training losses."""
import pytest
import torch

pytest.importorskip("triton")

from megatron_jinpan.models import KernelChoice, Llama, causal_lm_loss, get_model_config, init_weights  # noqa: E402

TRITON = KernelChoice(attention="triton", norm="triton", rope="triton", swiglu="triton")
TORCH = KernelChoice(attention="sdpa", norm="torch", rope="torch", swiglu="torch")


def _model(choice, **overrides):
    cfg = get_model_config("debug", num_layers=1, **overrides)
    model = init_weights(Llama(cfg), seed=3)
    return model.set_kernels(choice)


def _batch(cfg, b=2, s=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (b, s + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


@pytest.mark.parametrize("overrides", [
    dict(),                                                    # debug: head_dim 16, GQA 2
    dict(hidden_size=128, num_heads=2, num_kv_heads=1, intermediate_size=96),  # head_dim 64
], ids=["debug-hd16", "hd64"])
def test_llama_triton_matches_torch_logits_and_grads(overrides):
    fast, ref = _model(TRITON, **overrides), _model(TORCH, **overrides)
    tokens, labels = _batch(fast.cfg)
    losses = []
    for model in (fast, ref):
        logits = model(tokens)
        loss = causal_lm_loss(logits, labels)
        loss.backward()
        losses.append((logits, loss))
    torch.testing.assert_close(losses[0][0], losses[1][0], atol=1e-5, rtol=1e-4)
    for (name, p), p_ref in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-6, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_llama_triton_packed_documents_match_sdpa():
    overrides = dict(hidden_size=128, num_heads=2, num_kv_heads=1, intermediate_size=96)
    fast, ref = _model(TRITON, **overrides), _model(TORCH, **overrides)
    tokens, _ = _batch(fast.cfg, b=2, s=20)
    lengths = [[3, 1, 16], [20]]
    position_ids = torch.cat([torch.cat([torch.arange(n) for n in row])[None] for row in lengths])
    cu = torch.tensor([0, 3, 4, 20, 40], dtype=torch.int32)
    outs = []
    for model in (fast, ref):
        out = model(tokens, position_ids=position_ids, cu_seqlens=cu)
        out.square().mean().backward()
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-4)
    for p, p_ref in zip(fast.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-6, rtol=1e-4)


def test_llama_trains_with_triton_kernels_like_torch():
    """A few AdamW steps under the interpreter: the loss curve follows the torch backends'."""
    overrides = dict(hidden_size=128, num_heads=2, num_kv_heads=1, intermediate_size=96)
    curves = []
    for choice in (TRITON, TORCH):
        model = _model(choice, **overrides)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        tokens, labels = _batch(model.cfg, b=2, s=16, seed=5)
        curve = []
        for _ in range(4):
            loss = causal_lm_loss(model(tokens), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        curves.append(curve)
    fast, ref = curves
    assert fast[-1] < fast[0] - 0.05, fast
    for a, b in zip(fast, ref):
        assert abs(a - b) < 1e-4, (fast, ref)
