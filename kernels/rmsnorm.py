"""RMSNorm in Triton: forward, backward (dX and dW), optional fused residual add.

    from megatron_jinpan.kernels.rmsnorm import rms_norm, RMSNorm
    y = rms_norm(x, weight, eps)                          # == ops.rms_norm_reference
    y, s = rms_norm(x, weight, eps, residual=r)           # s = x + r (next residual), y = norm(s)

Layers, bottom up (DESIGN rule 6):
- `_rmsnorm_fwd_kernel` / `_rmsnorm_bwd_kernel`: one program per row in the
  forward; in the backward each program owns a contiguous block of rows and
  writes its own fp32 partial dW row, which the launcher sums with one
  `torch.sum` -- a fixed reduction order, so dW is bitwise deterministic
  (no atomics).
- `_forward` / `_backward`: launchers (flatten to [rows, hidden], pick the
  block size, allocate outputs).
- `jinpan::rms_norm` / `jinpan::rms_norm_backward`: torch.library custom ops
  (fake impls + registered autograd), so torch.compile does not graph-break.
- `rms_norm` and the `RMSNorm` module.

Numerics match Hugging Face's LlamaRMSNorm (the reference in
`megatron_jinpan.models.ops.rms_norm_reference`): the statistics are taken
in fp32, the normalised value is rounded to the input dtype, then scaled by
the weight in the promoted dtype of (input, weight). Any hidden size works
(the row is one masked power-of-two block).

Traffic under autocast (fp32 residual stream and weights, bf16 compute): the output
is written in the autocast dtype by the kernel itself (`ops.compute_dtype`), the same
value as kernel-then-cast without the cast kernel. With `residual=`, x and the residual
are each loaded in their own dtype, added in fp32 and the sum stored in their promoted
dtype (the residual stream's, fp32 under autocast); the backward writes the gradient of
x and of the residual each in its own dtype, again without a cast kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


from megatron_jinpan.device import multiprocessor_count
from megatron_jinpan.models.ops import compute_dtype
from megatron_jinpan.models.ops import rms_norm_reference as reference  # noqa: F401  (the in-file reference)

MAX_FUSED_SIZE = 65536


# ------------------------------------------------------------------ kernels
@triton.jit
def _rmsnorm_fwd_kernel(
    X, R, S, Y, W, RSTD,
    stride_x, stride_r, stride_s, stride_y,
    N, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # x and the residual in their own dtypes (bf16 branch output + fp32 stream under autocast),
        # added in fp32 and rounded once to the sum's dtype, like `x + residual` in PyTorch.
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(S.dtype.element_ty)
        tl.store(S + row * stride_s + cols, x, mask=mask)
    xf = x.to(tl.float32)
    mean_sq = tl.sum(xf * xf, axis=0) / N
    rstd = tl.rsqrt(mean_sq + eps)
    tl.store(RSTD + row, rstd)
    xhat = (xf * rstd).to(x.dtype).to(tl.float32)  # rounded like HF before the weight
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (xhat * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rmsnorm_bwd_kernel(
    DY, X, W, RSTD, DS, DX, DR, DW_PARTIAL,
    stride_dy, stride_x, stride_ds, stride_dx, stride_dr,
    M, N, rows_per_program,
    HAS_DRESIDUAL: tl.constexpr, WRITE_DR: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # DR: the residual's gradient (same value as DX) in the residual's dtype, when that differs from x's.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    start64 = row_start.to(tl.int64)
    x_ptr = X + start64 * stride_x
    dy_ptr = DY + start64 * stride_dy
    dx_ptr = DX + start64 * stride_dx
    ds_ptr = DS + start64 * stride_ds
    dr_ptr = DR + start64 * stride_dr
    for row in range(row_start, row_end):
        x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = x * rstd
        dw += dy * xhat
        g = dy * w
        # d/dx of x*rstd(x): rstd * (g - xhat * mean(g * xhat))
        c = tl.sum(g * xhat, axis=0) / N
        dx = (g - xhat * c) * rstd
        if HAS_DRESIDUAL:
            dx += tl.load(ds_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            ds_ptr += stride_ds
        tl.store(dx_ptr + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if WRITE_DR:
            tl.store(dr_ptr + cols, dx.to(DR.dtype.element_ty), mask=mask)
            dr_ptr += stride_dr
        x_ptr += stride_x
        dy_ptr += stride_dy
        dx_ptr += stride_dx
    tl.store(DW_PARTIAL + pid * N + cols, dw, mask=mask)


# ------------------------------------------------------------------ launchers
def _block_and_warps(n: int):
    block = triton.next_power_of_2(n)
    if block > MAX_FUSED_SIZE:
        raise ValueError(f"rms_norm: hidden size {n} exceeds the fused limit {MAX_FUSED_SIZE}")
    # 8 warps from hidden 4096 up (what Liger and Unsloth use at LLaMA-7B's 4096).
    warps = 1 if block <= 256 else 2 if block <= 1024 else 4 if block <= 2048 else 8 if block <= 16384 else 16
    return block, warps


def _num_programs_hint(device: torch.device) -> int:
    """Programs for the backward's row blocks: a few per SM on a GPU, few on CPU."""
    if device.type == "cpu":
        return 4
    return 4 * multiprocessor_count(device)


def _as_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    t = t.reshape(-1, n)
    return t if t.stride(-1) == 1 else t.contiguous()


def _forward(x, weight, eps, residual=None, out_dtype=None):
    """out_dtype: the output's dtype (default: promoted (input, weight), HF's; the autocast dtype under autocast)."""
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match hidden size {n}")
    x2 = _as_rows(x, n)
    m = x2.shape[0]
    if out_dtype is None:
        out_dtype = _promoted(x, weight, residual)
    y = torch.empty((m, n), device=x.device, dtype=out_dtype)
    rstd = torch.empty((m,), device=x.device, dtype=torch.float32)
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"rms_norm: residual shape {tuple(residual.shape)} != input shape {tuple(x.shape)}")
        r2 = _as_rows(residual, n)  # loaded in its own dtype: no cast kernel
        s2 = torch.empty((m, n), device=x.device, dtype=torch.promote_types(x.dtype, residual.dtype))
    else:
        r2 = s2 = x2
    block, warps = _block_and_warps(n)
    if m > 0:
        _rmsnorm_fwd_kernel[(m,)](
            x2, r2, s2, y, weight, rstd,
            x2.stride(0), r2.stride(0), s2.stride(0), y.stride(0),
            n, eps,
            HAS_RESIDUAL=residual is not None, BLOCK_N=block, num_warps=warps,
        )
    normed_input = s2 if residual is not None else x2
    return y.view(*x.shape[:-1], n), normed_input, rstd


def _default_out_dtype(x, weight, residual=None):
    """The autocast dtype under autocast, else the promoted dtype of (x + residual, weight) (HF's)."""
    return compute_dtype(x, weight) if residual is None else compute_dtype(x, residual, weight)


def _promoted(x, weight, residual=None):
    dtype = torch.promote_types(x.dtype, weight.dtype)
    return dtype if residual is None else torch.promote_types(dtype, residual.dtype)


def _backward(dy, x2, weight, rstd, dsum=None, dx_dtype=None, dres_dtype=None):
    """dy: grad of the output; x2: the normalised input [m, n]; dsum: grad of the residual sum.

    -> (dx in dx_dtype (default x2's), the residual's grad in dres_dtype if that differs (else None), dw).
    """
    m, n = x2.shape
    dy2 = _as_rows(dy, n)
    dx = torch.empty((m, n), device=x2.device, dtype=dx_dtype or x2.dtype)
    dres = None
    if dres_dtype is not None and dres_dtype != dx.dtype:
        dres = torch.empty((m, n), device=x2.device, dtype=dres_dtype)
    programs = max(1, min(m, _num_programs_hint(x2.device)))
    rows_per_program = triton.cdiv(m, programs) if m else 1
    programs = triton.cdiv(m, rows_per_program) if m else 1
    # Every program writes its whole partial row, so no zero-fill (one memset kernel fewer); none run when m == 0.
    alloc = torch.empty if m > 0 else torch.zeros
    dw_partial = alloc((programs, n), device=x2.device, dtype=torch.float32)
    ds2 = _as_rows(dsum, n) if dsum is not None else dy2
    dr = dres if dres is not None else dx
    block, warps = _block_and_warps(n)
    if m > 0:
        _rmsnorm_bwd_kernel[(programs,)](
            dy2, x2, weight, rstd, ds2, dx, dr, dw_partial,
            dy2.stride(0), x2.stride(0), ds2.stride(0), dx.stride(0), dr.stride(0),
            m, n, rows_per_program,
            HAS_DRESIDUAL=dsum is not None, WRITE_DR=dres is not None, BLOCK_N=block, num_warps=warps,
        )
    dw = dw_partial.sum(0).to(weight.dtype)  # fixed order: deterministic
    return dx, dres, dw


# ------------------------------------------------------------------ custom ops
# Registered as torch.library custom ops (`jinpan::rms_norm`, `jinpan::rms_norm_backward`)
# so torch.compile traces through them without a graph break (the fake impls give
# the output shapes) and a TorchDispatchMode sees one `jinpan::` op per call.
@torch.library.custom_op("jinpan::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None,
                 out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (y, x + residual or an empty tensor, rstd). Outputs may not alias inputs, hence the empty one.

    y is in out_dtype (None: promoted (sum, weight); `rms_norm` passes the autocast dtype under autocast).
    """
    y, normed_input, rstd = _forward(x, weight, eps, residual, out_dtype or _promoted(x, weight, residual))
    residual_out = normed_input.view(x.shape) if residual is not None else x.new_empty(0)
    return y, residual_out, rstd


@_rms_norm_op.register_fake
def _(x, weight, eps, residual, out_dtype=None):
    y = x.new_empty(x.shape, dtype=out_dtype or _promoted(x, weight, residual))
    residual_out = (x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype))
                    if residual is not None else x.new_empty(0))
    return y, residual_out, x.new_empty(x.numel() // x.shape[-1], dtype=torch.float32)


@torch.library.custom_op("jinpan::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(dy: torch.Tensor, normed_input: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                          dsum: torch.Tensor | None, dx_dtype: torch.dtype | None = None,
                          dres_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx in dx_dtype (None: the input's), the residual's grad in dres_dtype or an empty tensor
    when that is None or dx_dtype, dw)."""
    n = normed_input.shape[-1]
    dx, dres, dw = _backward(dy, _as_rows(normed_input, n), weight, rstd, dsum, dx_dtype, dres_dtype)
    dres = dres.view(normed_input.shape) if dres is not None else dx.new_empty(0)
    return dx.view(normed_input.shape), dres, dw


@_rms_norm_backward_op.register_fake
def _(dy, normed_input, weight, rstd, dsum, dx_dtype=None, dres_dtype=None):
    dx_dtype = dx_dtype or normed_input.dtype
    dres = (normed_input.new_empty(normed_input.shape, dtype=dres_dtype)
            if dres_dtype is not None and dres_dtype != dx_dtype else normed_input.new_empty(0))
    return normed_input.new_empty(normed_input.shape, dtype=dx_dtype), dres, torch.empty_like(weight)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, _eps, residual, _out_dtype = inputs
    _y, residual_out, rstd = output
    ctx.save_for_backward(residual_out if residual is not None else x, weight, rstd)
    ctx.has_residual = residual is not None
    ctx.x_dtype = x.dtype
    ctx.residual_dtype = residual.dtype if residual is not None else x.dtype


def _rms_norm_grad(ctx, dy, dsum, _drstd):
    normed_input, weight, rstd = ctx.saved_tensors
    if dy is None:  # only the sum was used downstream
        dy = torch.zeros_like(normed_input)
    dx, dres, dw = _rms_norm_backward_op(dy, normed_input, weight, rstd, dsum if ctx.has_residual else None,
                                         ctx.x_dtype, ctx.residual_dtype)
    if not ctx.has_residual:
        return dx, dw, None, None, None
    return dx, dw, None, (dres if ctx.residual_dtype != ctx.x_dtype else dx), None


torch.library.register_autograd("jinpan::rms_norm", _rms_norm_grad, setup_context=_rms_norm_setup)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None):
    """RMSNorm of `x` (or of `x + residual`, also returned as the next residual)."""
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual shape {tuple(residual.shape)} != input shape {tuple(x.shape)}")
    y, residual_out, _rstd = _rms_norm_op(x, weight, float(eps), residual, _default_out_dtype(x, weight, residual))
    return (y, residual_out) if residual is not None else y


class RMSNorm(torch.nn.Module):
    """Drop-in LlamaRMSNorm on the Triton kernel; `forward(x, residual=None)`."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x, residual=None):
        return rms_norm(x, self.weight, self.eps, residual)
