"""SwiGLU activation in Triton: silu(gate) * up, forward and backward.

    from megatron_jinpan.kernels.swiglu import swiglu, SwiGLU
    h = swiglu(gate, up)                  # == F.silu(gate) * up

Elementwise over the flattened tensors, fp32 math, one pass each way:
    y     = g * sigmoid(g) * u
    dgate = dy * u * sigmoid(g) * (1 + g * (1 - sigmoid(g)))
    dup   = dy * g * sigmoid(g)
The backward recomputes sigmoid(g) instead of saving the activation.

Layers: `_swiglu_fwd_kernel`/`_swiglu_bwd_kernel` -> `_forward`/`_backward`
-> the custom ops `jinpan::swiglu` / `jinpan::swiglu_backward` (torch.compile
traces through them) -> `swiglu` and the `SwiGLU` module (which also owns the
gate/up/down projections when given sizes).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


def reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The pure-PyTorch definition the kernel is tested against."""
    return F.silu(gate) * up


@triton.jit
def _swiglu_fwd_kernel(G, U, Y, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DY, G, U, DG, DU, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    du = dy * silu
    tl.store(DG + offs, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, du.to(DU.dtype.element_ty), mask=mask)


def _block(n: int, device: torch.device) -> int:
    # Big blocks under the CPU interpreter (per-program overhead); 1K-4K elements per program on a GPU.
    if device.type == "cpu":
        return max(16, min(triton.next_power_of_2(max(n, 1)), 1 << 16))
    return 4096 if n >= (1 << 22) else 1024


def _forward(gate, up):
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    gate, up = gate.contiguous(), up.contiguous()
    y = torch.empty(gate.shape, device=gate.device, dtype=torch.promote_types(gate.dtype, up.dtype))
    n = gate.numel()
    if n:
        block = _block(n, gate.device)
        _swiglu_fwd_kernel[(triton.cdiv(n, block),)](gate, up, y, n, BLOCK=block, num_warps=4 if block <= 1024 else 8)
    return y, gate, up


def _backward(dy, gate, up):
    dy = dy.contiguous()
    dg = torch.empty_like(gate)
    du = torch.empty_like(up)
    n = gate.numel()
    if n:
        block = _block(n, gate.device)
        _swiglu_bwd_kernel[(triton.cdiv(n, block),)](dy, gate, up, dg, du, n, BLOCK=block,
                                                     num_warps=4 if block <= 1024 else 8)
    return dg, du


# `jinpan::swiglu` / `jinpan::swiglu_backward`: torch.library custom ops (fake impls + registered
# autograd) so torch.compile traces through them without a graph break.
@torch.library.custom_op("jinpan::swiglu", mutates_args=())
def _swiglu_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _forward(gate, up)[0]


@_swiglu_op.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype))


@torch.library.custom_op("jinpan::swiglu_backward", mutates_args=())
def _swiglu_backward_op(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward(dy, gate.contiguous(), up.contiguous())


@_swiglu_backward_op.register_fake
def _(dy, gate, up):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_grad(ctx, dy):
    gate, up = ctx.saved_tensors
    return _swiglu_backward_op(dy, gate, up)


torch.library.register_autograd("jinpan::swiglu", _swiglu_grad, setup_context=_swiglu_setup)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up on the Triton kernel."""
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    return _swiglu_op(gate, up)


class SwiGLU(torch.nn.Module):
    """`SwiGLU()(gate, up)`; with sizes, the full LLaMA MLP: down(swiglu(gate(x), up(x)))."""

    def __init__(self, hidden_size: int | None = None, intermediate_size: int | None = None,
                 device=None, dtype=None):
        super().__init__()
        if hidden_size is not None and intermediate_size is not None:
            kw = dict(bias=False, device=device, dtype=dtype)
            self.gate_proj = torch.nn.Linear(hidden_size, intermediate_size, **kw)
            self.up_proj = torch.nn.Linear(hidden_size, intermediate_size, **kw)
            self.down_proj = torch.nn.Linear(intermediate_size, hidden_size, **kw)
        else:
            self.gate_proj = self.up_proj = self.down_proj = None

    def forward(self, gate, up=None):
        if up is None:
            if self.gate_proj is None:
                raise ValueError("SwiGLU without projections needs forward(gate, up)")
            return self.down_proj(swiglu(self.gate_proj(gate), self.up_proj(gate)))
        return swiglu(gate, up)
