"""Triton FlashAttention vs the eager reference: causal, GQA, packed documents, fwd and bwd.

CPU interpreter in fp32/fp16 (tiny head counts); GPU in bf16 on LLaMA-like shapes.
"""
import math

import pytest
import torch

pytest.importorskip("triton")

from megatron_jinpan.device import default_device_type  # noqa: E402
from megatron_jinpan.kernels import flash_attention as K  # noqa: E402
from megatron_jinpan.models.ops import attention_reference, causal_document_mask  # noqa: E402

TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float16: dict(atol=1e-2, rtol=1e-2)}
REL = {torch.bfloat16: 3e-2}  # GPU: max error relative to the largest reference value, vs an fp32 reference


def _qkv(b, s, hq, hk, d, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, s, h, d, generator=g).to(device, dtype).requires_grad_() for h in (hq, hk, hk)]


def _run(q, k, v, cu=None, scale=None, reference_dtype=None):
    """(outputs and grads of the kernel), (same from the reference)."""
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q.device, q.dtype)
    o = K.flash_attention(q, k, v, scale=scale, cu_seqlens=cu)
    o.backward(do)
    got = [o, q.grad, k.grad, v.grad]
    ref_in = [t.detach().clone().to(reference_dtype or t.dtype).requires_grad_() for t in (q, k, v)]
    o_ref = attention_reference(*ref_in, scale=scale, cu_seqlens=cu)
    o_ref.backward(do.to(o_ref.dtype))
    return got, [o_ref] + [t.grad for t in ref_in]


def _assert_close(got, want, dtype):
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.shape == b.shape, name
        if dtype in REL:
            err = (a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6)
            assert err < REL[dtype], f"{name}: relative error {err:.3g}"
        else:
            torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m: f"{name}: {m}")


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b,s,hq,hk,d", [
    (1, 1, 2, 2, 64),      # seq 1
    (1, 17, 4, 1, 64),     # GQA 4
    (1, 129, 8, 1, 64),    # GQA 8, seq not a block multiple
    (2, 33, 2, 2, 128),    # GQA 1, head_dim 128, batch 2
    (1, 40, 2, 1, 16),     # small head dims work too
])
def test_flash_attention_causal(b, s, hq, hk, d, dtype):
    q, k, v = _qkv(b, s, hq, hk, d, dtype)
    got, want = _run(q, k, v)
    _assert_close(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_flash_attention_varlen_documents_of_every_length(dtype):
    # row 0: documents of lengths 1..9 (45 tokens) + a 3-token tail; row 1: one long and two short documents
    s = 48
    cu = _cu([*range(1, 10), 3, 30, 1, 17])
    q, k, v = _qkv(2, s, 4, 1, 64, dtype)
    got, want = _run(q, k, v, cu=cu)
    _assert_close(got, want, dtype)


def test_flash_attention_varlen_long_documents_gqa2():
    # documents that span several 64-blocks, block-unaligned boundaries
    cu = _cu([70, 1, 58])
    q, k, v = _qkv(1, 129, 2, 1, 64, torch.float32)
    got, want = _run(q, k, v, cu=cu)
    _assert_close(got, want, torch.float32)


def test_flash_attention_varlen_never_crosses_documents():
    # changing document 0's values must not change document 1's outputs or gradients
    cu = _cu([5, 11])
    q, k, v = _qkv(1, 16, 2, 2, 32, torch.float32)
    o1 = K.flash_attention(q, k, v, cu_seqlens=cu)
    with torch.no_grad():
        for t in (q, k, v):
            t[:, :5] += 3.0
    o2 = K.flash_attention(q, k, v, cu_seqlens=cu)
    torch.testing.assert_close(o1[:, 5:], o2[:, 5:], atol=0, rtol=0)
    o2[:, 5:].sum().backward()
    assert q.grad[:, :5].abs().max() == 0 and k.grad[:, :5].abs().max() == 0 and v.grad[:, :5].abs().max() == 0


def test_flash_attention_scale_and_lse():
    q, k, v = _qkv(1, 20, 2, 1, 32, torch.float32)
    got, want = _run(q, k, v, scale=0.3)
    _assert_close(got, want, torch.float32)
    out, lse = K.flash_attention(q, k, v, scale=0.3, return_lse=True)
    kk = k.repeat_interleave(2, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, kk) * 0.3
    scores = scores.masked_fill(~causal_document_mask(20, 20, "cpu"), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=1e-5, rtol=1e-5)
    assert lse.shape == (1, 2, 20) and lse.dtype == torch.float32


def test_flash_attention_backward_is_deterministic():
    q, k, v = _qkv(1, 50, 4, 1, 32, torch.float32)
    grads = []
    for _ in range(2):
        for t in (q, k, v):
            t.grad = None
        K.flash_attention(q, k, v).square().sum().backward()
        grads.append([t.grad.clone() for t in (q, k, v)])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("d", [48, 80, 256])
def test_flash_attention_rejects_unsupported_head_dim(d):
    q = torch.randn(1, 4, 2, d)
    with pytest.raises(ValueError, match="head_dim"):
        K.flash_attention(q, q, q)


def test_flash_attention_rejects_bad_gqa():
    with pytest.raises(ValueError, match="multiple of kv heads"):
        K.flash_attention(torch.randn(1, 4, 3, 64), torch.randn(1, 4, 2, 64), torch.randn(1, 4, 2, 64))


def test_flash_attention_module_mixed_dtypes():
    q, k, v = _qkv(1, 9, 2, 2, 16, torch.float32)
    out = K.FlashAttention(scale=1 / math.sqrt(16))(q, k.half(), v)  # promoted to fp32, like q * k
    torch.testing.assert_close(out, attention_reference(q, k.half().float(), v), atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("b,s,hq,hk,d", [(2, 4096, 32, 32, 128), (1, 2048, 32, 8, 128), (2, 1000, 16, 2, 64),
                                         (3, 129, 8, 1, 64), (1, 1, 4, 4, 128)])
def test_flash_attention_gpu_bf16(b, s, hq, hk, d):
    q, k, v = _qkv(b, s, hq, hk, d, torch.bfloat16, default_device_type())
    got, want = _run(q, k, v, reference_dtype=torch.float32)
    _assert_close(got, want, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
def test_flash_attention_gpu_bf16_varlen(d):
    lengths = [1, 2, 3, 200, 1000, 7, 1835, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    lengths.append(4096 - sum(lengths))  # row 0: many documents; row 1: one
    q, k, v = _qkv(2, 4096, 16, 4, d, torch.bfloat16, default_device_type())
    cu = _cu(lengths + [4096]).to(q.device)
    got, want = _run(q, k, v, cu=cu, reference_dtype=torch.float32)
    _assert_close(got, want, torch.bfloat16)
