"""Named communication mappings of tensor / sequence parallelism, as autograd functions.

Each mapping is a pair (forward collective, backward collective) over the
tensor-parallel group (pass `mesh.tp_group`); every call goes through
`parallel.comm`, so it is counted by the accounting:

    mapping                                    forward           backward
    copy_to_tp_region                          identity          all-reduce
    reduce_from_tp_region                      all-reduce        identity
    scatter_to_tp_region        (last dim)     keep my chunk     all-gather
    gather_from_tp_region       (last dim)     all-gather        keep my chunk
    scatter_to_sequence_parallel_region        keep my seq chunk all-gather
    gather_from_sequence_parallel_region       all-gather seq    reduce-scatter seq
    reduce_scatter_to_sequence_parallel_region reduce-scatter    all-gather seq

The sequence dimension is dim 1 of activations laid out [batch, seq, hidden].
With a group of size 1 every mapping is the identity.
"""
from __future__ import annotations

import torch

from . import comm

SEQ_DIM = 1


# ---------------------------------------------------------------- plain collectives (no autograd)
def _world(group) -> int:
    return comm.group_size(group)


def _rank(group) -> int:
    import torch.distributed as dist

    return dist.get_rank(group) if _world(group) > 1 else 0


def all_reduce(x: torch.Tensor, group, async_op: bool = False):
    """Sum `x` over the group in place; returns (x, handle)."""
    x = x.contiguous()
    handle = comm.all_reduce(x, group, async_op=async_op)
    return x, handle


def all_gather_dim(x: torch.Tensor, group, dim: int, async_op: bool = False):
    """Concatenate every rank's `x` along `dim`. Returns (out, finish) where finish() gives the tensor."""
    world = _world(group)
    if world == 1:
        return x, (lambda: x)
    moved = x.movedim(dim, 0).contiguous()
    out = moved.new_empty((moved.shape[0] * world, *moved.shape[1:]))
    handle = comm.all_gather_into_tensor(out, moved, group, async_op=async_op)

    def finish():
        if handle is not None:
            handle.wait()
        return out.movedim(0, dim)

    return out, finish


def reduce_scatter_dim(x: torch.Tensor, group, dim: int, async_op: bool = False):
    """Sum over the group and keep this rank's chunk of `dim`. Returns (out, finish)."""
    world = _world(group)
    if world == 1:
        return x, (lambda: x)
    if x.shape[dim] % world:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} is not divisible by the tensor-parallel size {world}")
    moved = x.movedim(dim, 0).contiguous()
    out = moved.new_empty((moved.shape[0] // world, *moved.shape[1:]))
    handle = comm.reduce_scatter_tensor(out, moved, group, async_op=async_op)

    def finish():
        if handle is not None:
            handle.wait()
        return out.movedim(0, dim)

    return out, finish


def split_dim(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    world = _world(group)
    if world == 1:
        return x
    if x.shape[dim] % world:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} is not divisible by the tensor-parallel size {world}")
    return x.chunk(world, dim=dim)[_rank(group)].contiguous()


def gather_dim(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    return all_gather_dim(x, group, dim)[1]().contiguous()


def reduce_scatter(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    return reduce_scatter_dim(x, group, dim)[1]().contiguous()


def reduce(x: torch.Tensor, group) -> torch.Tensor:
    if _world(group) == 1:
        return x
    return all_reduce(x.clone(), group)[0]


# ---------------------------------------------------------------- autograd mappings
class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return split_dim(x, group, -1)

    @staticmethod
    def backward(ctx, grad):
        return gather_dim(grad, ctx.group, -1), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return gather_dim(x, group, -1)

    @staticmethod
    def backward(ctx, grad):
        return split_dim(grad, ctx.group, -1), None


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return split_dim(x, group, SEQ_DIM)

    @staticmethod
    def backward(ctx, grad):
        return gather_dim(grad, ctx.group, SEQ_DIM), None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, grad_reduce_scatter):
        ctx.group, ctx.grad_reduce_scatter = group, grad_reduce_scatter
        return gather_dim(x, group, SEQ_DIM)

    @staticmethod
    def backward(ctx, grad):
        if ctx.grad_reduce_scatter:
            return reduce_scatter(grad, ctx.group, SEQ_DIM), None, None
        return split_dim(grad, ctx.group, SEQ_DIM), None, None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter(x, group, SEQ_DIM)

    @staticmethod
    def backward(ctx, grad):
        return gather_dim(grad, ctx.group, SEQ_DIM), None


def copy_to_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    """Forward identity, backward all-reduce (input of a column-parallel layer)."""
    return _CopyToTP.apply(x, group) if _world(group) > 1 else x


def reduce_from_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    """Forward all-reduce, backward identity (output of a row-parallel layer)."""
    return _ReduceFromTP.apply(x, group) if _world(group) > 1 else x


def scatter_to_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    """Forward: keep this rank's chunk of the last dim; backward: all-gather it."""
    return _ScatterToTP.apply(x, group) if _world(group) > 1 else x


def gather_from_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    """Forward: all-gather the last dim; backward: keep this rank's chunk."""
    return _GatherFromTP.apply(x, group) if _world(group) > 1 else x


def scatter_to_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Forward: keep this rank's chunk of the sequence (dim 1); backward: all-gather it."""
    return _ScatterToSP.apply(x, group) if _world(group) > 1 else x


def gather_from_sequence_parallel_region(x: torch.Tensor, group, grad_reduce_scatter: bool = True) -> torch.Tensor:
    """Forward: all-gather the sequence (dim 1); backward: reduce-scatter it
    (or just split it with `grad_reduce_scatter=False`, when every rank's grad is already the full sum)."""
    return _GatherFromSP.apply(x, group, grad_reduce_scatter) if _world(group) > 1 else x


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    """Forward: sum over ranks and keep this rank's sequence chunk; backward: all-gather."""
    return _ReduceScatterToSP.apply(x, group) if _world(group) > 1 else x
