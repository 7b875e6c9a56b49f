"""Data parallelism: bucketed, overlapped gradient reduction (fp32, gloo on CPU).

Equivalence: dp=2 layouts (overlap on/off, tiny buckets, ZeRO-1, ZeRO-1 with
overlapped param gathers, gradient accumulation) train exactly like the
single-process run. Direct tests: overlapped and non-overlapped reductions
give bitwise-identical gradients, and buckets are launched from the hooks
while backward is still producing gradients.
"""
from __future__ import annotations


import pytest
import torch
import torch.multiprocessing as mp

from harness import BASE, assert_same_training, run_layout
from megatron_jinpan.parallel.local import free_port, set_worker_env

TINY = "parallel.bucket_mb=0.01"  # ~2.6K fp32 elements per bucket: many buckets on the debug model


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return run_layout([], 1, tmp_path_factory.mktemp("ref"))


LAYOUTS = {
    "dp2_overlap_tiny_buckets": ["parallel.tp=1", "parallel.overlap_grad_reduce=true", TINY],
    "no_overlap_tiny_buckets": ["parallel.overlap_grad_reduce=false", TINY],
    "zero1": ["parallel.zero=1", TINY],
    "zero1_overlap_param_gather": ["parallel.zero=1", "parallel.overlap_param_gather=true", TINY],
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_dp2_matches_single_process(reference, tmp_path, name):
    out = run_layout(LAYOUTS[name], 2, tmp_path)
    assert_same_training(reference, out)
    torch.testing.assert_close(torch.tensor(out["grad_norms"]), torch.tensor(reference["grad_norms"]),
                               rtol=1e-5, atol=1e-7)


# Gradient accumulation: global_batch 8, micro_batch 1, dp 2 -> 4 micro-batches
# per rank, 3 of them under no_sync. Accumulating sums gradients in another fp32
# order than the reference; with Adam's default eps=1e-8 the odd weight whose
# gradient is ~1e-8 amplifies that rounding (m/(sqrt(v)+eps) ~ sign(g)) to a
# few 1e-6. eps=1e-6 (reference and runs alike) keeps the comparison at the
# harness's tight tolerance without hiding real accumulation bugs.
ACCUM = ["train.micro_batch=1", "optim.eps=1e-6"]


@pytest.fixture(scope="module")
def accum_reference(tmp_path_factory):
    return run_layout(ACCUM, 1, tmp_path_factory.mktemp("ref_accum"))


@pytest.mark.parametrize("extra", [[TINY], ["parallel.zero=1", "parallel.overlap_param_gather=true"]],
                         ids=["overlap_tiny_buckets", "zero1_param_gather"])
def test_dp2_gradient_accumulation(accum_reference, tmp_path, extra):
    out = run_layout(ACCUM + extra, 2, tmp_path)
    assert_same_training(accum_reference, out)


# ---------------------------------------------------------------- direct tests

def _setup(rank, world, port):
    set_worker_env(rank, world, port)
    torch.set_num_threads(1)


def _one_backward(overrides, mesh, record=False, reduce=True):
    """Build the debug model under `overrides`, run one step's forward/backward, finish the reduction (with
    `reduce=False` and overlap off: leave this rank's own gradients in the buffer)."""
    from megatron_jinpan.config import load_config
    from megatron_jinpan.data import build_train_data
    from megatron_jinpan.parallel.parallelize import build_model
    from megatron_jinpan.training.losses import language_model_loss
    from megatron_jinpan.training.schedules import forward_backward

    cfg = load_config(None, BASE + list(overrides))
    (chunk,) = build_model(cfg, mesh)
    if record:
        chunk.events = []
    mbs = build_train_data(cfg).microbatches(0, mesh.dp_rank, mesh.dp)
    tokens = sum(float(mb["loss_mask"].sum()) for mb in mbs) * mesh.dp
    chunk.zero_grad_buffer()
    forward_backward([chunk], mbs, language_model_loss(cfg.model.vocab_size, mesh), mesh, loss_scale=1.0 / tokens)
    events_before_finish = list(chunk.events) if record else None
    if reduce:
        chunk.finish_grad_sync()
    return chunk, events_before_finish


def _overlap_worker(rank, world, port):
    _setup(rank, world, port)
    from megatron_jinpan.parallel.mesh import ParallelMesh

    mesh = ParallelMesh.create(1, 1, torch.device("cpu"))
    try:
        for zero in (0, 1):
            common = ["train.micro_batch=1", TINY, f"parallel.zero={zero}"]
            on, events = _one_backward(common + ["parallel.overlap_grad_reduce=true"], mesh, record=True)
            off, events_off = _one_backward(common + ["parallel.overlap_grad_reduce=false"], mesh, record=True)
            assert len(on.buckets) > 3, len(on.buckets)
            # bitwise-identical reduced gradients
            reduced_on = on.shard_grad if zero else on.grad_buffer
            reduced_off = off.shard_grad if zero else off.grad_buffer
            assert torch.equal(reduced_on, reduced_off), (zero, (reduced_on - reduced_off).abs().max())
            assert reduced_on.abs().sum() > 0
            # overlap: the first bucket is launched by a hook while later params still owe gradients
            kinds = [kind for kind, _ in events]
            first_launch = kinds.index("launch")
            last_grad = len(kinds) - 1 - kinds[::-1].index("grad")
            assert first_launch < last_grad, events
            assert kinds.count("launch") == len(on.buckets)
            # non-final micro-batches (no_sync) launch nothing; all launches happen in the last backward
            grads_per_backward = sum(len(b.params) for b in on.buckets)
            assert "launch" not in kinds[:3 * grads_per_backward]
            # without overlap nothing is launched during backward
            assert "launch" not in [kind for kind, _ in events_off]
    finally:
        mesh.destroy()


def test_overlap_is_bitwise_identical_and_launched_during_backward():
    mp.spawn(_overlap_worker, args=(2, free_port()), nprocs=2, join=True)


def _sparse_embedding_worker(rank, world, port):
    _setup(rank, world, port)
    from megatron_jinpan.parallel.mesh import ParallelMesh

    mesh = ParallelMesh.create(1, 1, torch.device("cpu"))
    try:
        # few tokens per step (1 x 32 per rank, vocab 256): the sparse path; many (4 x 2 x 32): the dense fallback
        for batch, sparse_expected in ((["train.global_batch=2", "train.micro_batch=1"], True),
                                       (["train.global_batch=16", "train.micro_batch=2"], False)):
            for zero in (0, 1):
                common = batch + [TINY, f"parallel.zero={zero}"]
                dense, _ = _one_backward(common, mesh)
                sparse, _ = _one_backward(common + ["parallel.sparse_embedding_grad=true"], mesh)
                rows = sparse.embedding_rows_reduced
                assert rows is not None and (2 * rows <= 256) == sparse_expected, (rows, sparse_expected)
                assert dense.embedding_rows_reduced is None
                # the same reduced gradients, bit for bit (a sum of two is order-free), embedding included
                got = sparse.shard_grad if zero else sparse.grad_buffer
                want = dense.shard_grad if zero else dense.grad_buffer
                assert torch.equal(got, want), (zero, (got - want).abs().max())
                emb = sparse.module.embed_tokens.weight.main_grad
                assert emb.abs().sum() > 0
                if sparse_expected and not zero:  # untouched rows stay zero; touched ones hold both ranks' sums
                    assert 0 < int((emb != 0).any(dim=1).sum()) <= rows
    finally:
        mesh.destroy()


def test_sparse_embedding_grad_equals_dense_reduction():
    """parallel.sparse_embedding_grad: reducing only the touched embedding rows gives the dense reduction's
    gradients exactly, with and without ZeRO-1, and falls back to dense when most rows are touched."""
    mp.spawn(_sparse_embedding_worker, args=(2, free_port()), nprocs=2, join=True)


def test_bucket_layout_reverse_order_and_padding():
    """Single process: buckets follow reverse registration order, are padded, and params alias the buffers."""
    from types import SimpleNamespace

    from megatron_jinpan.config import load_config
    from megatron_jinpan.models import Llama
    from megatron_jinpan.parallel.data import DataParallel

    cfg = load_config(None, ["model.name=debug", TINY, "parallel.zero=1"])
    model = Llama(cfg.model)
    mesh = SimpleNamespace(dp=2, dp_rank=1, pp=1, tp=1, tp_rank=0, device=torch.device("cpu"), dp_group=None)
    dp = DataParallel(model, mesh, cfg)
    names = [n for n, _ in model.named_parameters()]
    order = [n for b in dp.buckets for n in b.params]
    assert order == names[::-1]
    assert len(dp.buckets) > 3
    for bucket in dp.buckets:
        assert bucket.numel % (2 * 64) == 0 and bucket.shard_grad.numel() == bucket.numel // 2
    for name, param in model.named_parameters():
        start, end = dp.param_range[name]
        assert param.data_ptr() == dp.param_buffer[start:end].data_ptr()
        assert param.main_grad.data_ptr() == dp.grad_buffer[start:end].data_ptr()
    # rank 1 owns the second half of every bucket
    b = dp.buckets[0]
    assert dp.owned_range(b) == (b.offset + b.numel // 2, b.offset + b.numel)


def _bf16_reduce_worker(rank, world, port):
    _setup(rank, world, port)
    import torch.distributed as dist

    from megatron_jinpan.parallel.mesh import ParallelMesh

    mesh = ParallelMesh.create(1, 1, torch.device("cpu"))
    try:
        common = ["train.global_batch=2", "train.micro_batch=1", TINY]
        # this rank's own gradients, before any reduction (no overlap: nothing is launched during backward)
        local, _ = _one_backward(common + ["parallel.overlap_grad_reduce=false"], mesh, reduce=False)
        mine = local.grad_buffer.clone()
        both = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(both, mine)
        # what a bf16 wire gives: each rank's gradient rounded to bf16, summed, rounded again
        want = (both[0].bfloat16() + both[1].bfloat16()).float()
        exact = both[0] + both[1]
        assert not torch.equal(want, exact)  # the rounding is real, so the check below can fail

        for zero in (0, 1):
            for sparse in ("false", "true"):
                chunk, _ = _one_backward(common + [f"parallel.zero={zero}", "parallel.grad_reduce_dtype=bf16",
                                                   f"parallel.sparse_embedding_grad={sparse}"], mesh)
                assert chunk.comm_buffer.dtype == torch.bfloat16 and chunk.grad_buffer.dtype == torch.float32
                if sparse == "true":
                    assert chunk.embedding_rows_reduced is not None
                if zero:
                    for bucket in chunk.buckets:
                        start, end = chunk.owned_range(bucket)
                        got = chunk.shard_grad.narrow(0, chunk.shard_offset(bucket), end - start)
                        assert torch.equal(got, want[start:end]), (zero, sparse, bucket.index)
                else:
                    assert torch.equal(chunk.grad_buffer, want), (sparse, (chunk.grad_buffer - want).abs().max())
                    # and near the fp32 sum: bf16 keeps ~3 significant digits (elementwise, cancelling pairs
                    # can lose them all, so the check is on the whole buffer)
                    assert (chunk.grad_buffer - exact).norm() < 1e-2 * exact.norm()
    finally:
        mesh.destroy()


def test_bf16_grad_reduction_is_the_bf16_sum():
    """parallel.grad_reduce_dtype=bf16: every bucket (dense, row-sparse embedding, ZeRO-1 shards) ends as the
    bf16 sum of the ranks' bf16-rounded gradients, cast back into the fp32 buffer."""
    mp.spawn(_bf16_reduce_worker, args=(2, free_port()), nprocs=2, join=True)


def test_bf16_grad_reduction_trains_like_fp32(reference, tmp_path):
    """Three steps at dp=2 with a bf16 wire stay within bf16 rounding of the single-process fp32 run.

    (The sums themselves are checked bit for bit above.) Losses and gradient norms agree to bf16's precision;
    parameters only to Adam's step size: its update is ~lr * sign(g) for a tiny gradient, so an element whose
    bf16-rounded gradient changes sign moves by up to 2 * lr per step -- expected, not a bug."""
    out = run_layout(["parallel.grad_reduce_dtype=bf16", "parallel.zero=1", TINY], 2, tmp_path)
    torch.testing.assert_close(torch.tensor(out["losses"]), torch.tensor(reference["losses"]), rtol=1e-3, atol=0)
    torch.testing.assert_close(torch.tensor(out["grad_norms"]), torch.tensor(reference["grad_norms"]),
                               rtol=1e-2, atol=0)
    assert out["losses"] != reference["losses"]  # it did reduce in bf16
    steps, lr = 3, 3e-3
    for name, value in reference["params"].items():
        assert (out["params"][name] - value).abs().max() <= 2 * lr * steps, name
