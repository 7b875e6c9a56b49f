"""Each tensor/sequence-parallel mapping: forward and backward vs the math, on 2 gloo processes."""
from __future__ import annotations

import torch

from harness import spawn_on_tp_mesh


def _check_with_accounting(mesh):
    from megatron_jinpan.parallel import comm

    with comm.accounting() as stats:
        _check(mesh)
    calls = {op: v["calls"] for (op, group), v in stats.table().items() if group == "tp"}
    assert calls.get("all_reduce", 0) > 0 and calls.get("all_gather", 0) > 0 and calls.get("reduce_scatter", 0) > 0, calls


def _per_rank(seed: int, shape, world):
    """Every rank's tensor (all ranks can compute all of them: same seeds)."""
    out = []
    for r in range(world):
        g = torch.Generator().manual_seed(seed * 100 + r)
        out.append(torch.randn(*shape, generator=g))
    return out


def _run(fn, x, grad):
    x = x.clone().requires_grad_()
    y = fn(x)
    y.backward(grad)
    return y.detach(), x.grad


def _check(mesh):
    from megatron_jinpan.parallel import mappings as m

    g, r, w = mesh.tp_group, mesh.tp_rank, mesh.tp
    b, s, h = 2, 4, 6
    xs = _per_rank(1, (b, s, h), w)       # per-rank inputs [b, s, h]
    gs = _per_rank(2, (b, s, h), w)       # per-rank output grads, same shape
    close = lambda a, e: torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)  # noqa: E731

    # copy_to_tp_region: fwd identity, bwd all-reduce
    y, dx = _run(lambda t: m.copy_to_tp_region(t, g), xs[r], gs[r])
    close(y, xs[r])
    close(dx, sum(gs))

    # reduce_from_tp_region: fwd all-reduce, bwd identity
    y, dx = _run(lambda t: m.reduce_from_tp_region(t, g), xs[r], gs[r])
    close(y, sum(xs))
    close(dx, gs[r])

    # scatter_to_tp_region (last dim): fwd my chunk, bwd all-gather of the grads
    full = xs[0]  # replicated input
    gl = [t[..., : h // w] for t in gs]
    y, dx = _run(lambda t: m.scatter_to_tp_region(t, g), full, gl[r])
    close(y, full.chunk(w, -1)[r])
    close(dx, torch.cat(gl, -1))

    # gather_from_tp_region (last dim): fwd all-gather, bwd my chunk
    y, dx = _run(lambda t: m.gather_from_tp_region(t, g), xs[r], torch.cat(gs, -1))
    close(y, torch.cat(xs, -1))
    close(dx, gs[r])

    # scatter_to_sequence_parallel_region (dim 1): fwd my seq chunk, bwd all-gather
    gseq = [t[:, : s // w] for t in gs]
    y, dx = _run(lambda t: m.scatter_to_sequence_parallel_region(t, g), full, gseq[r])
    close(y, full.chunk(w, 1)[r])
    close(dx, torch.cat(gseq, 1))

    # gather_from_sequence_parallel_region: fwd all-gather seq, bwd reduce-scatter seq
    gfull = _per_rank(3, (b, s * w, h), w)
    y, dx = _run(lambda t: m.gather_from_sequence_parallel_region(t, g), xs[r], gfull[r])
    close(y, torch.cat(xs, 1))
    close(dx, sum(gfull).chunk(w, 1)[r])
    # ... and with grad_reduce_scatter=False: bwd just keeps my chunk
    y, dx = _run(lambda t: m.gather_from_sequence_parallel_region(t, g, grad_reduce_scatter=False), xs[r], gfull[r])
    close(dx, gfull[r].chunk(w, 1)[r])

    # reduce_scatter_to_sequence_parallel_region: fwd reduce-scatter seq, bwd all-gather seq
    y, dx = _run(lambda t: m.reduce_scatter_to_sequence_parallel_region(t, g), xs[r], gseq[r])
    close(y, sum(xs).chunk(w, 1)[r])
    close(dx, torch.cat(gseq, 1))

    # round trip: scatter then gather along the sequence is the identity
    y, _ = _run(lambda t: m.gather_from_sequence_parallel_region(m.scatter_to_sequence_parallel_region(t, g), g),
                full, torch.ones(b, s, h))
    close(y, full)

    # async helpers used by the overlapped column-parallel backward
    _, finish = m.all_gather_dim(xs[r], g, 1, async_op=True)
    close(finish(), torch.cat(xs, 1))
    _, finish = m.reduce_scatter_dim(xs[r], g, 1, async_op=True)
    close(finish(), sum(xs).chunk(w, 1)[r])


def test_mappings_forward_backward_two_processes():
    spawn_on_tp_mesh(_check_with_accounting)


def test_mappings_identity_on_one_rank():
    """With a group of size 1 every mapping is the identity (no process group needed)."""
    import torch.distributed as dist

    from megatron_jinpan.parallel import mappings as m

    assert not dist.is_initialized()
    x = torch.randn(2, 4, 6)
    for fn in (m.copy_to_tp_region, m.reduce_from_tp_region, m.scatter_to_tp_region, m.gather_from_tp_region,
               m.scatter_to_sequence_parallel_region, m.gather_from_sequence_parallel_region,
               m.reduce_scatter_to_sequence_parallel_region):
        assert fn(x, None) is x
