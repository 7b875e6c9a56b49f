"""Kernel traffic under autocast (issue #19): no dtype round trips between norm, rotary and attention,
the decoder layer's fused residual add equals the unfused one, document bounds built once per micro-batch.

    python -m pytest -q tests/test_layer_traffic.py

Casts are counted with `perf.traffic.TrafficLedger` (a TorchDispatchMode). The Triton kernels run
under the CPU interpreter; its fp32 -> bf16 conversion truncates (a GPU rounds to nearest even),
so the bit-exact "written in the autocast dtype == computed then cast" checks use fp16 autocast.
"""
import pytest
import torch

pytest.importorskip("triton")

from megatron_jinpan.models import Llama, get_model_config, init_weights, ops  # noqa: E402
from megatron_jinpan.models.llama import DecoderLayer  # noqa: E402
from megatron_jinpan.models.ops import KernelChoice  # noqa: E402
from megatron_jinpan.perf.traffic import TrafficLedger  # noqa: E402

TRITON = KernelChoice(attention="triton", norm="triton", rope="triton", swiglu="triton")
TORCH = KernelChoice(attention="sdpa", norm="torch", rope="torch", swiglu="torch")
B, S = 3, 40  # no weight dimension of the debug model equals 3, 40 or 120


def _layer(choice, dtype=torch.float32, seed=0):
    cfg = get_model_config("debug", num_layers=1)
    model = init_weights(Llama(cfg), seed=seed).set_kernels(choice)
    with torch.no_grad():  # norm weights away from 1 so the weight multiply matters
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    return model.layers["0"].to(dtype), cfg


def _inputs(cfg, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, cfg.hidden_size, generator=g).to(dtype).requires_grad_()
    cos, sin = ops.rotary_cos_sin(torch.arange(S).expand(B, S), cfg.head_dim, cfg.rope_theta, dtype)
    grad = torch.randn(B, S, cfg.hidden_size, generator=g).to(dtype)
    return x, cos, sin, grad


def _unfused(layer: DecoderLayer, x, cos, sin):
    """The decoder layer as it was: residual adds as separate ops."""
    h = x + layer.self_attn(layer.input_layernorm(x), cos, sin)
    return h + layer.mlp(layer.post_attention_layernorm(h))


def _run(fn, layer, x, grad):
    out = fn()
    params = [x, *layer.parameters()]
    return out, torch.autograd.grad(out, params, grad)


@pytest.mark.parametrize("choice", [TORCH, TRITON], ids=["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_fused_residual_layer_equals_unfused(choice, dtype):
    if dtype == torch.float16 and choice is TORCH:
        pytest.skip("fp16 matmuls on CPU: the torch backends are covered in fp32")
    layer, cfg = _layer(choice, dtype)
    x, cos, sin, grad = _inputs(cfg, dtype)
    fused, fused_grads = _run(lambda: layer(x, cos, sin), layer, x, grad)
    plain, plain_grads = _run(lambda: _unfused(layer, x, cos, sin), layer, x, grad)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(fused, plain, **tol)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, **tol)


def test_fused_residual_kernel_mixed_dtypes_keeps_the_stream_dtype():
    """bf16 branch output + fp32 residual stream: the sum stays fp32 and equals PyTorch's `x + residual`."""
    from megatron_jinpan.kernels import rmsnorm as K

    g = torch.Generator().manual_seed(0)
    branch = torch.randn(B, S, 64, generator=g).to(torch.bfloat16).requires_grad_()
    stream = torch.randn(B, S, 64, generator=g).requires_grad_()
    w = (1 + 0.1 * torch.randn(64, generator=g)).requires_grad_()
    y, total = K.rms_norm(branch, w, 1e-6, residual=stream)
    assert total.dtype == torch.float32
    torch.testing.assert_close(total, branch + stream, atol=0, rtol=0)
    torch.testing.assert_close(y, ops.rms_norm_reference(branch + stream, w, 1e-6), atol=1e-6, rtol=1e-5)
    gy, gs = torch.randn_like(y), torch.randn_like(total)
    got = torch.autograd.grad((y, total), (branch, stream, w), (gy, gs))
    ref_total = branch + stream
    want = torch.autograd.grad((ops.rms_norm_reference(ref_total, w, 1e-6), ref_total), (branch, stream, w), (gy, gs))
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-2 if a.dtype == torch.bfloat16 else 1e-5, rtol=1e-2)


@pytest.mark.parametrize("choice", [TORCH, TRITON], ids=["torch", "triton"])
def test_norm_and_rotary_write_the_autocast_dtype_like_op_then_cast(choice):
    layer, cfg = _layer(choice)
    x, cos, sin, _ = _inputs(cfg)
    norm, attn = layer.input_layernorm, layer.self_attn
    q = torch.randn(B, S, cfg.num_heads, cfg.head_dim).half()
    k = torch.randn(B, S, cfg.num_kv_heads, cfg.head_dim).half()
    plain_y = norm(x)
    plain_q, plain_k = ops.apply_rotary(q, k, cos, sin, attn.rope_backend)
    with torch.autocast("cpu", dtype=torch.float16):
        y = norm(x)
        qr, kr = ops.apply_rotary(q, k, cos, sin, attn.rope_backend)
    assert y.dtype == qr.dtype == kr.dtype == torch.float16
    assert plain_y.dtype == plain_q.dtype == torch.float32
    assert torch.equal(y, plain_y.half()) and torch.equal(qr, plain_q.half()) and torch.equal(kr, plain_k.half())


@pytest.mark.parametrize("choice", [TORCH, TRITON], ids=["torch", "triton"])
def test_no_activation_casts_between_norm_rotary_and_attention(choice):
    """bf16 autocast, fp32 weights and residual stream: norm -> q/k/v -> rotary -> attention -> o_proj,
    forward and backward, casts no activation between fp32 and bf16 (weights are cast, activations are not)."""
    layer, cfg = _layer(choice)
    x, cos, sin, grad = _inputs(cfg)
    grad_bf16 = grad.to(torch.bfloat16)  # what o_proj's output gradient is in a real step
    with TrafficLedger(B, S) as block:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer.self_attn(layer.input_layernorm(x), cos, sin)
        out.backward(grad_bf16)
    assert out.dtype == torch.bfloat16 and x.grad.dtype == torch.float32
    assert block.casts() == [], block.casts()
    # The whole layer: only its last residual add's gradient (fp32 stream -> bf16 MLP output) is cast.
    with TrafficLedger(B, S) as whole:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x, cos, sin)
        y.backward(grad)
    assert y.dtype == torch.float32
    expected_max = 1 if choice is TRITON else 2  # torch: the fused residual add is still two ops
    assert len(whole.casts()) <= expected_max, whole.casts()


def test_ledger_counts_casts_of_activations_only():
    """The counter is not blind: a plain autocast linear on an fp32 activation is one cast."""
    lin = torch.nn.Linear(64, 64, bias=False)
    x = torch.randn(B, S, 64)
    with TrafficLedger(B, S) as ledger:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lin(x)
    casts = ledger.casts()
    assert len(casts) == 1 and casts[0].shape == (B, S, 64) and casts[0].dst == torch.bfloat16
    assert ledger.totals().launches >= 2  # the weight cast and the matmul


@pytest.mark.parametrize("recompute", ["none", "full", "selective"])
@pytest.mark.parametrize("choice", [TORCH, TRITON], ids=["sdpa", "triton"])
def test_document_bounds_built_once_per_micro_batch(monkeypatch, recompute, choice):
    if choice is TRITON and recompute == "selective":
        pytest.skip("full recompute covers the Triton path")
    calls = {"bounds": 0, "mask": 0}
    real_bounds, real_mask = ops.document_bounds, ops.causal_document_mask

    def bounds(*a, **k):
        calls["bounds"] += 1
        return real_bounds(*a, **k)

    def mask(*a, **k):
        calls["mask"] += 1
        return real_mask(*a, **k)

    monkeypatch.setattr(ops, "document_bounds", bounds)
    monkeypatch.setattr(ops, "causal_document_mask", mask)
    cfg = get_model_config("debug", num_layers=3)
    model = init_weights(Llama(cfg), seed=0).set_kernels(choice)
    model.recompute_layers = recompute == "full"
    for layer in model.layers.values():
        layer.self_attn.recompute_core = recompute == "selective"
    tokens = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    position_ids = torch.cat([torch.cat([torch.arange(n) for n in row])[None] for row in ([3, 1, 16], [20])])
    cu = torch.tensor([0, 3, 4, 20, 40], dtype=torch.int32)
    model(tokens, position_ids=position_ids, cu_seqlens=cu).square().mean().backward()
    used = "bounds" if choice is TRITON else "mask"
    assert calls[used] == 1, calls
    # and the model output still equals attention given cu_seqlens per call (built inside ops.attention)
    ref = init_weights(Llama(cfg), seed=0).set_kernels(choice)
    with torch.no_grad():
        got = model(tokens, position_ids=position_ids, cu_seqlens=cu)
        h = ref.embed_tokens(tokens)
        cos, sin = ops.rotary_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, h.dtype)
        for layer in ref.layers.values():
            attn = layer.self_attn
            n = layer.input_layernorm(h)
            q = attn.q_proj(n).view(2, 20, -1, cfg.head_dim)
            k = attn.k_proj(n).view(2, 20, -1, cfg.head_dim)
            v = attn.v_proj(n).view(2, 20, -1, cfg.head_dim)
            q, k = ops.apply_rotary(q, k, cos, sin, attn.rope_backend)
            o = ops.attention(q, k, v, cu_seqlens=cu, backend=attn.attention_backend)
            h = h + attn.o_proj(o.reshape(2, 20, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        want = ref.lm_head(ref.norm(h))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
