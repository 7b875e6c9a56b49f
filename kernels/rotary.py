"""Rotary position embedding in Triton (Hugging Face `rotate_half` layout), q and k together.

    from megatron_jinpan.kernels.rotary import apply_rotary
    q_out, k_out = apply_rotary(q, k, cos, sin)            # == ops.apply_rotary_reference
    apply_rotary(q, k, cos, sin, inplace=True)             # rotates q and k in place

q: [batch, seq, heads, head_dim]; k: [batch, seq, kv_heads, head_dim] (GQA:
kv_heads may be fewer); cos/sin: [batch, seq, head_dim], built from
position ids (`ops.rotary_cos_sin`), so packed documents whose positions
restart are handled by the tables, not by the kernel.

With x = [x1, x2] (the two halves of head_dim):
    out1 = x1*cos1 - x2*sin1        out2 = x2*cos2 + x1*sin2
and the backward is the transpose of that linear map:
    dx1  = g1*cos1 + g2*sin2        dx2  = g2*cos2 - g1*sin1
One kernel does both (BACKWARD constexpr). One program handles a block of tokens
(all their q heads and k heads), reading cos/sin once; math in fp32.

Under autocast the outputs are written in the autocast dtype by the kernel (fp32 math on
bf16 q/k and fp32 cos/sin, rounded once): the same values as kernel-then-cast, without
the cast kernels; the gradients come back in q's and k's dtypes (`ops.compute_dtype`).

Layers: `_rotary_kernel` -> `_launch` -> the custom ops `jinpan::rotary` /
`jinpan::rotary_backward` (torch.compile traces through them; the in-place form
uses `RotaryFunction`, eager only) -> `apply_rotary` and the `Rotary` module.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_jinpan.models.ops import apply_rotary_reference as reference  # noqa: F401  (the in-file reference)
from megatron_jinpan.models.ops import compute_dtype


@triton.jit
def _rotate_heads(X, OUT, x_off, o_off, stride_xh, stride_oh, H, tmask, c1, c2, s1, s2,
                  BLOCK_H: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                  BACKWARD: tl.constexpr):
    # x_off/o_off: [BLOCK_T, 1, 1] token offsets; c*/s*: [BLOCK_T, 1, BLOCK_HALF]
    heads = tl.arange(0, BLOCK_H)[None, :, None]
    cols = tl.arange(0, BLOCK_HALF)[None, None, :]
    mask = tmask & (heads < H) & (cols < HALF)
    p1 = X + x_off + heads * stride_xh + cols
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    q1 = OUT + o_off + heads * stride_oh + cols
    tl.store(q1, y1.to(OUT.dtype.element_ty), mask=mask)
    tl.store(q1 + HALF, y2.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    Q, K, QO, KO, COS, SIN,
    TOKENS, SEQ, HQ, HK,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_qob, stride_qos, stride_qoh,
    stride_kob, stride_kos, stride_koh,
    stride_cb, stride_cs, stride_sb, stride_ss,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BACKWARD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None, None]
    tmask = token < TOKENS
    b = token // SEQ
    s = token % SEQ
    cols = tl.arange(0, BLOCK_HALF)[None, None, :]
    cmask = tmask & (cols < HALF)
    cptr = COS + b * stride_cb + s * stride_cs + cols
    sptr = SIN + b * stride_sb + s * stride_ss + cols
    c1 = tl.load(cptr, mask=cmask, other=0.0).to(tl.float32)
    c2 = tl.load(cptr + HALF, mask=cmask, other=0.0).to(tl.float32)
    s1 = tl.load(sptr, mask=cmask, other=0.0).to(tl.float32)
    s2 = tl.load(sptr + HALF, mask=cmask, other=0.0).to(tl.float32)
    _rotate_heads(Q, QO, b * stride_qb + s * stride_qs, b * stride_qob + s * stride_qos,
                  stride_qh, stride_qoh, HQ, tmask, c1, c2, s1, s2, BLOCK_HQ, HALF, BLOCK_HALF, BACKWARD)
    _rotate_heads(K, KO, b * stride_kb + s * stride_ks, b * stride_kob + s * stride_kos,
                  stride_kh, stride_koh, HK, tmask, c1, c2, s1, s2, BLOCK_HK, HALF, BLOCK_HALF, BACKWARD)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(q, k, cos, sin, q_out, k_out, backward: bool):
    b, s, hq, d = q.shape
    hk = k.shape[2]
    half = d // 2
    if b * s == 0:
        return q_out, k_out
    block_half = triton.next_power_of_2(half)
    per_token = (triton.next_power_of_2(hq) + triton.next_power_of_2(hk)) * block_half
    # ~8K elements per program on a GPU; bigger blocks under the CPU interpreter (per-program overhead).
    target = 65536 if q.device.type == "cpu" else 8192
    fit = max(1, target // per_token)
    fit = 1 << (fit.bit_length() - 1)  # tl.arange needs a power of two (6 q heads + 2 kv: 320 per token)
    block_t = min(triton.next_power_of_2(b * s), fit)
    work = block_t * per_token
    warps = 1 if work <= 512 else 2 if work <= 2048 else 4 if work <= 8192 else 8
    _rotary_kernel[(triton.cdiv(b * s, block_t),)](
        q, k, q_out, k_out, cos, sin,
        b * s, s, hq, hk,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2),
        k_out.stride(0), k_out.stride(1), k_out.stride(2),
        cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        HALF=half, BLOCK_HALF=block_half, BLOCK_T=block_t,
        BLOCK_HQ=triton.next_power_of_2(hq), BLOCK_HK=triton.next_power_of_2(hk),
        BACKWARD=backward, num_warps=warps,
    )
    return q_out, k_out


def _check(q, k, cos, sin):
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"apply_rotary: q and k must be [batch, seq, heads, head_dim], got {tuple(q.shape)}, {tuple(k.shape)}")
    b, s, _, d = q.shape
    if k.shape[0] != b or k.shape[1] != s or k.shape[3] != d:
        raise ValueError(f"apply_rotary: k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)}")
    if d % 2:
        raise ValueError(f"apply_rotary: head_dim must be even, got {d}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[-1] != d or t.shape[1] != s or t.shape[0] not in (1, b):
            raise ValueError(f"apply_rotary: {name} must be [batch, seq, head_dim] = [{b}, {s}, {d}], got {tuple(t.shape)}")


def _expand(t, b):
    return t.expand(b, -1, -1) if t.shape[0] != b else t


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, inplace):
        _check(q, k, cos, sin)
        b = q.shape[0]
        cos, sin = _unit_last(_expand(cos, b)), _unit_last(_expand(sin, b))
        q_in, k_in = _unit_last(q), _unit_last(k)
        if inplace:
            q_out, k_out = q_in, k_in
        else:
            q_dtype = compute_dtype(q, cos)  # like `q * cos` in the reference (autocast: its dtype)
            k_dtype = compute_dtype(k, cos)
            q_out = torch.empty(q.shape, device=q.device, dtype=q_dtype)
            k_out = torch.empty(k.shape, device=k.device, dtype=k_dtype)
        _launch(q_in, k_in, cos, sin, q_out, k_out, backward=False)
        if inplace:
            if q_in is not q:
                q.copy_(q_in)
            if k_in is not k:
                k.copy_(k_in)
            q_out, k_out = q, k
            ctx.mark_dirty(q, k)
        ctx.save_for_backward(cos, sin)
        ctx.dtypes = (q.dtype, k.dtype)
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        q_dtype, k_dtype = ctx.dtypes
        dq, dk = _unit_last(dq), _unit_last(dk)
        dq_in = torch.empty(dq.shape, device=dq.device, dtype=q_dtype)
        dk_in = torch.empty(dk.shape, device=dk.device, dtype=k_dtype)
        _launch(dq, dk, cos, sin, dq_in, dk_in, backward=True)
        return dq_in, dk_in, None, None, None


# ------------------------------------------------------------------ custom ops
# `jinpan::rotary` / `jinpan::rotary_backward`: torch.library custom ops (fake impls +
# registered autograd) so torch.compile traces through them without a graph break and a
# TorchDispatchMode sees them by name. The in-place form stays on `RotaryFunction`
# (custom ops with registered autograd cannot mutate their inputs); it is eager-only.
@torch.library.custom_op("jinpan::rotary", mutates_args=())
def _rotary_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               q_out_dtype: torch.dtype | None = None,
               k_out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Output dtypes: None = promoted (q/k, cos), like `q * cos`; `apply_rotary` passes the autocast dtype."""
    b = q.shape[0]
    cos, sin = _unit_last(_expand(cos, b)), _unit_last(_expand(sin, b))
    q_out = torch.empty(q.shape, device=q.device, dtype=q_out_dtype or torch.promote_types(q.dtype, cos.dtype))
    k_out = torch.empty(k.shape, device=k.device, dtype=k_out_dtype or torch.promote_types(k.dtype, cos.dtype))
    return _launch(_unit_last(q), _unit_last(k), cos, sin, q_out, k_out, backward=False)


@_rotary_op.register_fake
def _(q, k, cos, sin, q_out_dtype=None, k_out_dtype=None):
    return (q.new_empty(q.shape, dtype=q_out_dtype or torch.promote_types(q.dtype, cos.dtype)),
            k.new_empty(k.shape, dtype=k_out_dtype or torch.promote_types(k.dtype, cos.dtype)))


@torch.library.custom_op("jinpan::rotary_backward", mutates_args=())
def _rotary_backward_op(dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        q_dtype: torch.dtype, k_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    b = dq.shape[0]
    cos, sin = _unit_last(_expand(cos, b)), _unit_last(_expand(sin, b))
    dq_in = torch.empty(dq.shape, device=dq.device, dtype=q_dtype)
    dk_in = torch.empty(dk.shape, device=dk.device, dtype=k_dtype)
    return _launch(_unit_last(dq), _unit_last(dk), cos, sin, dq_in, dk_in, backward=True)


@_rotary_backward_op.register_fake
def _(dq, dk, cos, sin, q_dtype, k_dtype):
    return dq.new_empty(dq.shape, dtype=q_dtype), dk.new_empty(dk.shape, dtype=k_dtype)


def _rotary_setup(ctx, inputs, output):
    q, k, cos, sin, _q_out_dtype, _k_out_dtype = inputs
    ctx.save_for_backward(cos, sin)
    ctx.dtypes = (q.dtype, k.dtype)


def _rotary_grad(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    dq_in, dk_in = _rotary_backward_op(dq, dk, cos, sin, *ctx.dtypes)
    return dq_in, dk_in, None, None, None, None


torch.library.register_autograd("jinpan::rotary", _rotary_grad, setup_context=_rotary_setup)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inplace: bool = False):
    """Rotate q [b, s, h, d] and k [b, s, h_kv, d] by cos/sin [b, s, d]; returns (q_out, k_out)."""
    if inplace:
        return RotaryFunction.apply(q, k, cos, sin, True)
    _check(q, k, cos, sin)
    return _rotary_op(q, k, cos, sin, compute_dtype(q, cos), compute_dtype(k, cos))


class Rotary(torch.nn.Module):
    """Module form: `Rotary()(q, k, cos, sin)`."""

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = inplace

    def forward(self, q, k, cos, sin):
        return apply_rotary(q, k, cos, sin, self.inplace)
