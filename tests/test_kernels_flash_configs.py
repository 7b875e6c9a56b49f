"""Every FlashAttention autotune config computes the right thing, and the config tables keep the
rules of the kernel review (issue #19): no two 128x128 fp32 dK/dV tiles at 4 warps, no 8-warp
forward tile smaller than 128x128 (the Hopper filter), a Hopper-safe fixed forward default.

    python -m pytest -q tests/test_kernels_flash_configs.py

On CPU the configs run under the Triton interpreter (warps and stages are ignored there; tile
shapes, masks and loop bounds are what is checked). Registers and spills need a GPU:
benchmarks/attention_spills.py.
"""
import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402

from megatron_jinpan.kernels import flash_attention as FA  # noqa: E402
from megatron_jinpan.kernels import rmsnorm as RN  # noqa: E402
from megatron_jinpan.models import ops  # noqa: E402

B, S, HQ, HK, D = 1, 130, 4, 2, 16  # 130: a partial last block for every tile size


def _tiles(configs):
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in configs]


def test_config_tables_follow_the_review(monkeypatch):
    for bm, bn, warps, _ in _tiles(FA._DKDV_CONFIGS):
        assert bn % bm == 0
        assert not (bn == 128 and warps == 4), "dK/dV with BLOCK_N=128 at 4 warps spills at head_dim 128"
    for table in (FA._FWD_CONFIGS, FA._DQ_CONFIGS):
        for bm, bn, _, _ in _tiles(table):
            assert bm % bn == 0
    for bm, bn, warps, _ in _tiles(FA._FWD_CONFIGS):
        assert warps < 8 or bm * bn >= 128 * 128, "the tutorial's Hopper filter drops this forward config"
    assert max(st for *_, st in _tiles(FA._DKDV_CONFIGS + FA._DQ_CONFIGS)) >= 4
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the GPU default, not the interpreter's small blocks
    assert FA._fixed_blocks(4096, 128, torch.device("cuda")) == (128, 64, 4, 3)


def test_rmsnorm_launch_choices():
    assert RN._block_and_warps(4096) == (4096, 8)
    assert RN._block_and_warps(2048)[1] == 4
    assert RN._num_programs_hint(torch.device("cpu")) == 4
    from megatron_jinpan import device

    assert RN.multiprocessor_count is device.multiprocessor_count
    assert hasattr(device._multiprocessor_count, "cache_info")  # queried once per device, not every backward


def _problem(docs: bool):
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(B, S, h, D, generator=g) for h in (HQ, HK, HK, HQ))
    cu = torch.tensor([0, 7, 70, 71, S], dtype=torch.int32) if docs else None
    start, end = ops.document_bounds(cu, B, S) if docs else (None, None)
    return q, k, v, do, cu, start, end


def _reference(q, k, v, do, cu):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = ops.attention_reference(*leaves, cu_seqlens=cu)
    out.backward(do)
    return (out.detach(), *(t.grad for t in leaves))


@pytest.mark.parametrize("docs", [False, True], ids=["causal", "packed"])
def test_every_config_matches_the_reference(docs):
    q, k, v, do, cu, start, end = _problem(docs)
    want_o, want_dq, want_dk, want_dv = _reference(q, k, v, do, cu)
    scale = D ** -0.5
    lse = torch.empty((B, HQ, S), dtype=torch.float32)
    o = torch.empty_like(q)
    ds, de = (start, end) if docs else (lse, lse)
    meta = dict(HQ=HQ, HK=HK, D=D, HAS_DOCS=docs)
    for c in FA._FWD_CONFIGS:
        FA._attn_fwd_kernel[(triton.cdiv(S, c.kwargs["BLOCK_M"]), B * HQ)](
            q, k, v, o, lse, ds, S, scale * FA.LOG2E, **meta, **c.kwargs)
        torch.testing.assert_close(o, want_o, atol=2e-5, rtol=1e-4, msg=lambda m: f"forward {c}: {m}")
    delta = (o * do).sum(-1).transpose(1, 2).contiguous()  # [b, h, s], what the preprocess kernel writes
    for c in FA._DKDV_CONFIGS:
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        FA._attn_bwd_dkdv_kernel[(triton.cdiv(S, c.kwargs["BLOCK_N"]), B * HK)](
            q, k, v, do, lse, delta, dk, dv, ds, de, S, scale * FA.LOG2E, scale, **meta, **c.kwargs)
        torch.testing.assert_close(dk, want_dk, atol=5e-5, rtol=1e-4, msg=lambda m: f"dK {c}: {m}")
        torch.testing.assert_close(dv, want_dv, atol=5e-5, rtol=1e-4, msg=lambda m: f"dV {c}: {m}")
    for c in FA._DQ_CONFIGS:
        dq = torch.empty_like(q)
        FA._attn_bwd_dq_kernel[(triton.cdiv(S, c.kwargs["BLOCK_M"]), B * HQ)](
            q, k, v, do, lse, delta, dq, ds, S, scale * FA.LOG2E, scale, **meta, **c.kwargs)
        torch.testing.assert_close(dq, want_dq, atol=5e-5, rtol=1e-4, msg=lambda m: f"dQ {c}: {m}")
