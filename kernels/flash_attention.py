"""FlashAttention (forward and backward) in Triton: causal, GQA, packed variable-length documents.

    from megatron_jinpan.kernels.flash_attention import flash_attention
    out = flash_attention(q, k, v)                          # == ops.attention_reference(q, k, v)
    out = flash_attention(q, k, v, cu_seqlens=cu)           # packed documents, never attend across
    out = flash_attention(q, k, v, doc_bounds=ops.document_bounds(cu, b, s))  # the same, bounds built once
    out, lse = flash_attention(q, k, v, return_lse=True)    # lse: [batch, heads, seq] fp32, natural log

Layout is flash-attn's: q [batch, seq, heads, head_dim], k/v [batch, seq,
kv_heads, head_dim] with heads % kv_heads == 0 (GQA: the kernels index the
shared kv head, repeated k/v are never materialised). head_dim 64 or 128
(16 and 32 also work, e.g. for tiny test models); anything else raises
ValueError. `cu_seqlens` (int32, [num_docs + 1]) gives document boundaries
over the flattened batch*seq tokens (rows are expected to start at a
boundary; a document that runs over a row end is split there, which is what
the row-wise reference does too).

How it works (FlashAttention-2):
- forward `_attn_fwd_kernel`: one program per (query block, batch*head);
  streams key blocks with an online softmax in base 2, fp32 accumulators,
  and writes O and the log-sum-exp. Without documents the key loop is split
  into fully visible blocks (no mask) and the diagonal blocks (causal mask);
  with documents every block is masked and the loop starts at the first
  key of the earliest document in the query block.
- masking for packed documents uses one int32 per token, the row position
  where its document starts: key j is visible to query i iff
  doc_start[i] <= j <= i. The backward's key loop additionally uses
  doc_end (exclusive) to stop at the end of the key block's document.
- backward: `_attn_bwd_preprocess` computes delta = rowsum(dO * O);
  `_attn_bwd_dkdv_kernel` runs one program per (key block, batch*kv_head)
  and loops over the query heads of its group and their query blocks, so dK
  and dV of a shared kv head are summed in registers (no atomics, no
  repeated k/v; deterministic); `_attn_bwd_dq_kernel` runs one program per
  (query block, batch*head) over key blocks like the forward.
- `jinpan::flash_attention` / `jinpan::flash_attention_backward` are torch.library
  custom ops (fake impls + registered autograd, so torch.compile traces through
  them); `flash_attention` the function and `FlashAttention` the module.

On a GPU the block sizes are autotuned per (seq, heads, head_dim, dtype)
(set JINPAN_FLASH_AUTOTUNE=0 for the fixed defaults); under the CPU
interpreter (TRITON_INTERPRET=1) fixed small blocks are used.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from megatron_jinpan.models.ops import attention_reference as reference  # noqa: F401  (the in-file reference)
from megatron_jinpan.models.ops import document_bounds

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# ------------------------------------------------------------------ forward
@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, doc_q, offs_m, lo, hi, SEQ, qk_scale,
               STRIDE_KV: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
               MASK: tl.constexpr, HAS_DOCS: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_off = cols[:, None] * STRIDE_KV + offs_d[None, :]
        if MASK:
            kmask = cols[:, None] < SEQ
            k = tl.load(k_base + kv_off, mask=kmask, other=0.0)
            v = tl.load(v_base + kv_off, mask=kmask, other=0.0)
        else:
            k = tl.load(k_base + kv_off)
            v = tl.load(v_base + kv_off)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        if MASK:
            allowed = (offs_m[:, None] >= cols[None, :]) & (cols[None, :] < SEQ)
            if HAS_DOCS:
                allowed = allowed & (cols[None, :] >= doc_q[:, None])
            qk = tl.where(allowed, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked rows so far: no NaN
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_sub = m_new
        p = tl.math.exp2(qk - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, DOC_START, SEQ, qk_scale,
                     HQ: tl.constexpr, HK: tl.constexpr, D: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DOCS: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HQ).to(tl.int64)
    h = pid_bh % HQ
    hk = h // (HQ // HK)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_mask = offs_m < SEQ
    q_base = Q + b * SEQ * HQ * D + h * D
    k_base = K + b * SEQ * HK * D + hk * D
    v_base = V + b * SEQ * HK * D + hk * D
    q = tl.load(q_base + offs_m[:, None] * (HQ * D) + offs_d[None, :], mask=row_mask[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    hi = tl.minimum(start_m + BLOCK_M, SEQ)
    if HAS_DOCS:
        doc_q = tl.load(DOC_START + b * SEQ + offs_m, mask=row_mask, other=0)
        first = tl.load(DOC_START + b * SEQ + start_m)  # doc starts are non-decreasing along a row
        lo = (first // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, doc_q, offs_m, lo, hi, SEQ, qk_scale,
                                   HK * D, D, BLOCK_N, True, True)
    else:
        # keys [0, start_m) are visible to every query of the block: no mask
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, offs_m, offs_m, 0, start_m, SEQ, qk_scale,
                                   HK * D, D, BLOCK_N, False, False)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, offs_m, offs_m, start_m, hi, SEQ, qk_scale,
                                   HK * D, D, BLOCK_N, True, False)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(O + b * SEQ * HQ * D + h * D + offs_m[:, None] * (HQ * D) + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=row_mask[:, None])
    lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453  # natural log of sum(exp(scale * qk))
    tl.store(LSE + (b * HQ + h) * SEQ + offs_m, lse, mask=row_mask)


# ------------------------------------------------------------------ backward
@triton.jit
def _attn_bwd_preprocess(O, DO, DELTA, SEQ, HQ: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HQ).to(tl.int64)
    h = pid_bh % HQ
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    mask = offs_m < SEQ
    off = b * SEQ * HQ * D + h * D + offs_m[:, None] * (HQ * D) + offs_d[None, :]
    o = tl.load(O + off, mask=mask[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + off, mask=mask[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + (b * HQ + h) * SEQ + offs_m, tl.sum(o * do, 1), mask=mask)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, doc_base, offs_n, lo, hi, SEQ, qk_scale,
                STRIDE_Q: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                MASK: tl.constexpr, HAS_DOCS: tl.constexpr):
    offs_d = tl.arange(0, D)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        rmask = rows < SEQ
        q_off = rows[:, None] * STRIDE_Q + offs_d[None, :]
        q = tl.load(q_base + q_off, mask=rmask[:, None], other=0.0)
        do = tl.load(do_base + q_off, mask=rmask[:, None], other=0.0)
        lse = tl.load(lse_base + rows, mask=rmask, other=float("inf")) * 1.4426950408889634
        delta = tl.load(delta_base + rows, mask=rmask, other=0.0)
        qkT = tl.dot(k, tl.trans(q)) * qk_scale  # [BLOCK_N, BLOCK_M], base-2 logits
        pT = tl.math.exp2(qkT - lse[None, :])
        if MASK:
            allowed = (rows[None, :] >= offs_n[:, None]) & rmask[None, :]
            if HAS_DOCS:
                doc_q = tl.load(doc_base + rows, mask=rmask, other=0)
                allowed = allowed & (doc_q[None, :] <= offs_n[:, None])
            pT = tl.where(allowed, pT, 0.0)
        dv += tl.dot(pT.to(do.dtype), do)
        dpT = tl.dot(v, tl.trans(do)).to(tl.float32)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DOC_START, DOC_END, SEQ, qk_scale, sm_scale,
                          HQ: tl.constexpr, HK: tl.constexpr, D: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DOCS: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HK).to(tl.int64)
    hk = pid_bh % HK
    GROUP: tl.constexpr = HQ // HK
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    nmask = offs_n < SEQ
    kv_off = b * SEQ * HK * D + hk * D + offs_n[:, None] * (HK * D) + offs_d[None, :]
    k = tl.load(K + kv_off, mask=nmask[:, None], other=0.0)
    v = tl.load(V + kv_off, mask=nmask[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    if HAS_DOCS:
        last = tl.minimum(start_n + BLOCK_N, SEQ) - 1
        hi_docs = tl.load(DOC_END + b * SEQ + last)  # queries past the last key's document see none of these keys
    for g in range(GROUP):
        h = hk * GROUP + g
        q_base = Q + b * SEQ * HQ * D + h * D
        do_base = DO + b * SEQ * HQ * D + h * D
        lse_base = LSE + (b * HQ + h) * SEQ
        delta_base = DELTA + (b * HQ + h) * SEQ
        if HAS_DOCS:
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, DOC_START + b * SEQ,
                                 offs_n, start_n, hi_docs, SEQ, qk_scale, HQ * D, D, BLOCK_M, True, True)
        else:
            mid = tl.minimum(start_n + BLOCK_N, SEQ)
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, DOC_START,
                                 offs_n, start_n, mid, SEQ, qk_scale, HQ * D, D, BLOCK_M, True, False)
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, DOC_START,
                                 offs_n, mid, SEQ, SEQ, qk_scale, HQ * D, D, BLOCK_M, False, False)
    dk = dk * sm_scale
    tl.store(DK + kv_off, dk.to(DK.dtype.element_ty), mask=nmask[:, None])
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=nmask[:, None])


@triton.jit
def _dq_inner(dq, q, do, lse, delta, doc_q, k_base, v_base, offs_m, lo, hi, SEQ, qk_scale,
              STRIDE_KV: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
              MASK: tl.constexpr, HAS_DOCS: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_off = cols[:, None] * STRIDE_KV + offs_d[None, :]
        if MASK:
            kmask = cols[:, None] < SEQ
            k = tl.load(k_base + kv_off, mask=kmask, other=0.0)
            v = tl.load(v_base + kv_off, mask=kmask, other=0.0)
        else:
            k = tl.load(k_base + kv_off)
            v = tl.load(v_base + kv_off)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.math.exp2(qk - lse[:, None])
        if MASK:
            allowed = (offs_m[:, None] >= cols[None, :]) & (cols[None, :] < SEQ)
            if HAS_DOCS:
                allowed = allowed & (cols[None, :] >= doc_q[:, None])
            p = tl.where(allowed, p, 0.0)
        dp = tl.dot(do, tl.trans(v)).to(tl.float32)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, DOC_START, SEQ, qk_scale, sm_scale,
                        HQ: tl.constexpr, HK: tl.constexpr, D: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DOCS: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HQ).to(tl.int64)
    h = pid_bh % HQ
    hk = h // (HQ // HK)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_mask = offs_m < SEQ
    q_off = b * SEQ * HQ * D + h * D + offs_m[:, None] * (HQ * D) + offs_d[None, :]
    q = tl.load(Q + q_off, mask=row_mask[:, None], other=0.0)
    do = tl.load(DO + q_off, mask=row_mask[:, None], other=0.0)
    lse = tl.load(LSE + (b * HQ + h) * SEQ + offs_m, mask=row_mask, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + (b * HQ + h) * SEQ + offs_m, mask=row_mask, other=0.0)
    k_base = K + b * SEQ * HK * D + hk * D
    v_base = V + b * SEQ * HK * D + hk * D
    dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    hi = tl.minimum(start_m + BLOCK_M, SEQ)
    if HAS_DOCS:
        doc_q = tl.load(DOC_START + b * SEQ + offs_m, mask=row_mask, other=0)
        first = tl.load(DOC_START + b * SEQ + start_m)
        lo = (first // BLOCK_N) * BLOCK_N
        dq = _dq_inner(dq, q, do, lse, delta, doc_q, k_base, v_base, offs_m, lo, hi, SEQ, qk_scale,
                       HK * D, D, BLOCK_N, True, True)
    else:
        dq = _dq_inner(dq, q, do, lse, delta, offs_m, k_base, v_base, offs_m, 0, start_m, SEQ, qk_scale,
                       HK * D, D, BLOCK_N, False, False)
        dq = _dq_inner(dq, q, do, lse, delta, offs_m, k_base, v_base, offs_m, start_m, hi, SEQ, qk_scale,
                       HK * D, D, BLOCK_N, True, False)
    dq = dq * sm_scale
    tl.store(DQ + q_off, dq.to(DQ.dtype.element_ty), mask=row_mask[:, None])


# ------------------------------------------------------------------ block sizes
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _autotune_enabled(device: torch.device) -> bool:
    return device.type != "cpu" and not _interpreting() and os.environ.get("JINPAN_FLASH_AUTOTUNE", "1") != "0"


_TUNE_KEY = ["SEQ", "HQ", "HK", "D", "HAS_DOCS"]
# forward and dq need BLOCK_M % BLOCK_N == 0 (the unmasked key loop stops at the query block start);
# dkdv needs BLOCK_N % BLOCK_M == 0 (the masked query loop covers exactly the key block).
# (BLOCK_M, BLOCK_N, num_warps, num_stages). Register budget at head_dim 128: a 128x128 fp32 tile is
# 128 registers/thread at 4 warps; dK/dV keeps two BLOCK_N x D fp32 accumulators, so BLOCK_N=128
# needs 8 warps (4 would hold 256 registers/thread and spill). Deeper pipelines (4-5 stages) for the
# streamed operand. Forward: on Hopper the tutorial drops 8-warp configs with BLOCK_M*BLOCK_N < 128*128,
# so the 8-warp forward configs here are 128x128 only; (128, 64, 4 warps, 3 stages) is the default.
_FWD_TILES = [(128, 64, 4, 3), (128, 64, 4, 4), (128, 128, 8, 3), (128, 32, 4, 4), (64, 64, 4, 3),
              (64, 64, 4, 4), (64, 32, 4, 4), (128, 128, 8, 2)]
_DKDV_TILES = [(64, 128, 8, 3), (64, 128, 8, 4), (32, 128, 8, 4), (32, 128, 8, 5), (64, 64, 4, 4),
               (64, 64, 4, 5), (32, 64, 4, 4), (16, 64, 4, 5)]
_DQ_TILES = [(128, 64, 8, 3), (128, 64, 8, 4), (128, 32, 4, 4), (128, 32, 4, 5), (64, 64, 4, 4),
             (64, 64, 4, 5), (64, 32, 4, 4), (128, 16, 4, 5)]
_FWD_CONFIGS, _DKDV_CONFIGS, _DQ_CONFIGS = (
    [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in tiles]
    for tiles in (_FWD_TILES, _DKDV_TILES, _DQ_TILES))

_fwd_tuned = triton.autotune(configs=_FWD_CONFIGS, key=_TUNE_KEY)(_attn_fwd_kernel)
_dkdv_tuned = triton.autotune(configs=_DKDV_CONFIGS, key=_TUNE_KEY)(_attn_bwd_dkdv_kernel)
_dq_tuned = triton.autotune(configs=_DQ_CONFIGS, key=_TUNE_KEY)(_attn_bwd_dq_kernel)


def _fixed_blocks(seq: int, d: int, device: torch.device):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) without autotuning."""
    if device.type == "cpu" or _interpreting():
        blk = max(16, min(64, triton.next_power_of_2(seq)))
        return blk, blk, 4, 1
    return (128, 64, 4, 3)  # Hopper-safe at every head_dim (8 warps at 128x64 is filtered out there)


# ------------------------------------------------------------------ launchers
def _doc_bounds(cu_seqlens: torch.Tensor, batch: int, seq: int, device):
    """Per token (flattened), the row positions where its document starts and ends (exclusive).

    `ops.document_bounds`; the model builds them once per micro-batch (`ops.PackedDocuments`) and
    passes them as `doc_bounds=`, so no layer and no backward recomputes them.
    """
    return document_bounds(cu_seqlens, batch, seq, device)


def _forward(q, k, v, scale, doc_start):
    b, s, hq, d = q.shape
    hk = k.shape[2]
    o = torch.empty_like(q)
    lse = torch.empty((b, hq, s), device=q.device, dtype=torch.float32)
    has_docs = doc_start is not None
    docs = doc_start if has_docs else lse
    args = (q, k, v, o, lse, docs, s, scale * LOG2E)
    meta = dict(HQ=hq, HK=hk, D=d, HAS_DOCS=has_docs)
    if _autotune_enabled(q.device):
        _fwd_tuned[lambda m: (triton.cdiv(s, m["BLOCK_M"]), b * hq)](*args, **meta)
    else:
        bm, bn, warps, stages = _fixed_blocks(s, d, q.device)
        _attn_fwd_kernel[(triton.cdiv(s, bm), b * hq)](*args, **meta, BLOCK_M=bm, BLOCK_N=bn,
                                                       num_warps=warps, num_stages=stages)
    return o, lse


def _backward(do, q, k, v, o, lse, scale, doc_start, doc_end):
    b, s, hq, d = q.shape
    hk = k.shape[2]
    do = do.contiguous()
    delta = torch.empty_like(lse)
    pre_block = max(16, min(64, triton.next_power_of_2(s)))
    _attn_bwd_preprocess[(triton.cdiv(s, pre_block), b * hq)](o, do, delta, s, HQ=hq, D=d, BLOCK_M=pre_block)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    has_docs = doc_start is not None
    ds = doc_start if has_docs else lse
    de = doc_end if has_docs else lse
    meta = dict(HQ=hq, HK=hk, D=d, HAS_DOCS=has_docs)
    kv_args = (q, k, v, do, lse, delta, dk, dv, ds, de, s, scale * LOG2E, scale)
    q_args = (q, k, v, do, lse, delta, dq, ds, s, scale * LOG2E, scale)
    if _autotune_enabled(q.device):
        _dkdv_tuned[lambda m: (triton.cdiv(s, m["BLOCK_N"]), b * hk)](*kv_args, **meta)
        _dq_tuned[lambda m: (triton.cdiv(s, m["BLOCK_M"]), b * hq)](*q_args, **meta)
    else:
        bm, bn, warps, stages = _fixed_blocks(s, d, q.device)
        if not (_interpreting() or q.device.type == "cpu"):
            bm, bn = 64, 64
        _attn_bwd_dkdv_kernel[(triton.cdiv(s, bn), b * hk)](*kv_args, **meta, BLOCK_M=bm, BLOCK_N=bn,
                                                            num_warps=warps, num_stages=stages)
        _attn_bwd_dq_kernel[(triton.cdiv(s, bm), b * hq)](*q_args, **meta, BLOCK_M=bm, BLOCK_N=bn,
                                                          num_warps=warps, num_stages=stages)
    return dq, dk, dv


def _check(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("flash_attention: q, k, v must be [batch, seq, heads, head_dim]")
    b, s, hq, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[1] != s or k.shape[3] != d:
        raise ValueError(f"flash_attention: k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)} "
                         "(same batch, seq and head_dim; kv heads may be fewer)")
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"flash_attention: head_dim={d} is not supported; use one of {SUPPORTED_HEAD_DIMS} "
                         "(64 and 128 are the tuned ones) or kernels.attention=sdpa")
    if k.shape[2] == 0 or hq % k.shape[2]:
        raise ValueError(f"flash_attention: q heads ({hq}) must be a multiple of kv heads ({k.shape[2]})")


def _common_dtype(q, k, v) -> torch.dtype:
    """Like SDPA: the autocast dtype when autocast is on, else the promoted dtype of q, k, v."""
    if torch.is_autocast_enabled(q.device.type):
        return torch.get_autocast_dtype(q.device.type)
    return torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)


# ------------------------------------------------------------------ autograd
# `jinpan::flash_attention` / `jinpan::flash_attention_backward`: torch.library custom ops (fake
# impls + registered autograd) so torch.compile traces through them without a graph break. Packed
# documents arrive as their per-token bounds (two int32 per token), built once per micro-batch and
# shared by every layer; the backward keeps a reference to the same tensors (no copy, no rebuild).
@torch.library.custom_op("jinpan::flash_attention", mutates_args=())
def _flash_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                        doc_start: torch.Tensor | None,
                        doc_end: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, scale, doc_start)


@_flash_attention_op.register_fake
def _(q, k, v, scale, doc_start, doc_end):
    b, s, hq, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, hq, s), dtype=torch.float32)


@torch.library.custom_op("jinpan::flash_attention_backward", mutates_args=())
def _flash_attention_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 o: torch.Tensor, lse: torch.Tensor, scale: float, doc_start: torch.Tensor | None,
                                 doc_end: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(do, q, k, v, o, lse, scale, doc_start, doc_end)


@_flash_attention_backward_op.register_fake
def _(do, q, k, v, o, lse, scale, doc_start, doc_end):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _flash_setup(ctx, inputs, output):
    q, k, v, scale, doc_start, doc_end = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, doc_start, doc_end)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _flash_grad(ctx, do, _dlse):
    q, k, v, o, lse, doc_start, doc_end = ctx.saved_tensors
    dq, dk, dv = _flash_attention_backward_op(do, q, k, v, o, lse, ctx.scale, doc_start, doc_end)
    return dq, dk, dv, None, None, None


torch.library.register_autograd("jinpan::flash_attention", _flash_grad, setup_context=_flash_setup)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                    cu_seqlens: torch.Tensor | None = None, return_lse: bool = False, doc_bounds=None):
    """Causal attention, [b, s, h, d] in and out; see the module docstring.

    Packed documents: `doc_bounds` = (start, end) from `ops.document_bounds` (what the model passes,
    built once per micro-batch), or `cu_seqlens` (the bounds are built here).
    """
    _check(q, k, v)
    dtype = _common_dtype(q, k, v)
    q, k, v = (t.to(dtype).contiguous() for t in (q, k, v))
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if doc_bounds is None and cu_seqlens is not None:
        doc_bounds = _doc_bounds(cu_seqlens, q.shape[0], q.shape[1], q.device)
    doc_start, doc_end = doc_bounds if doc_bounds is not None else (None, None)
    if doc_start is not None and doc_start.numel() != q.shape[0] * q.shape[1]:
        raise ValueError(f"flash_attention: doc_bounds cover {doc_start.numel()} tokens but q has "
                         f"{q.shape[0]} x {q.shape[1]}; build them for this batch and sequence length")
    o, lse = _flash_attention_op(q, k, v, scale, doc_start, doc_end)
    return (o, lse) if return_lse else o


class FlashAttention(torch.nn.Module):
    """Module form: `FlashAttention(scale=None)(q, k, v, cu_seqlens=None)`."""

    def __init__(self, scale: float | None = None):
        super().__init__()
        self.scale = scale

    def forward(self, q, k, v, cu_seqlens=None):
        return flash_attention(q, k, v, scale=self.scale, cu_seqlens=cu_seqlens)
