"""α-β formulas, hierarchical placement, and sanity of the 8 -> 640 GPU projection."""
import math

import pytest

from megatron_jinpan.perf.comm_model import (Cluster, Link, collective_time, group_placement, ring_allgather_time,
                                             ring_allreduce_time)
from megatron_jinpan.perf.projection import CLUSTERS, Plan, Projector, fit_alpha_beta


def test_ring_formulas():
    link = Link(alpha=1e-5, beta=1e9)
    assert ring_allreduce_time(1e9, 1, link) == 0
    assert ring_allreduce_time(1e9, 4, link) == pytest.approx(2 * 3 / 4 * 1.0 + 6 * 1e-5)
    assert ring_allgather_time(1e9, 8, link) == pytest.approx(7 / 8 + 7e-5)
    # all-reduce = reduce-scatter + all-gather
    assert ring_allreduce_time(1e9, 8, link) == pytest.approx(2 * ring_allgather_time(1e9, 8, link))
    # bandwidth term saturates at 2S/β as n grows
    assert ring_allreduce_time(1e9, 1024, Link(0, 1e9)) < 2.0


def test_placement_and_hierarchy():
    assert group_placement(8, 1, 8) == (8, 1)
    assert group_placement(16, 1, 8) == (8, 2)
    assert group_placement(4, 2, 8) == (4, 1)
    assert group_placement(64, 8, 8) == (1, 64)
    c = CLUSTERS["h100"]
    intra = collective_time("all_reduce", 1e9, 8, 1, c)
    inter = collective_time("all_reduce", 1e9, 16, 1, c)
    assert inter > intra                       # leaving the node costs
    assert collective_time("all_reduce", 1e9, 64, 8, c) > inter  # one GPU per node: no NVLink stage


def test_fit_recovers_alpha_beta():
    truth = Link(3e-5, 2e9)
    flat = Cluster("x", 10**6, truth, truth, 1, 1, tree_latency=False)
    rows = [{"world": n, "bytes": s, "time_s": collective_time("all_reduce", s, n, 1, flat)}
            for n in (2, 4) for s in (4096, 1 << 20, 16 << 20)]
    fit = fit_alpha_beta(rows)
    assert fit.alpha == pytest.approx(truth.alpha, rel=1e-3)
    assert fit.beta == pytest.approx(truth.beta, rel=1e-3)


def test_projection_monotone_and_sane():
    proj = Projector(CLUSTERS["h100"], "llama-7b", mfu=0.57, overlap=0.8)
    plan = Plan(tp=2, pp=1, dp=4, micro_batch=1, zero=1, recompute="none", sp=False)
    r8 = proj.step(8, plan)
    assert r8["mfu"] <= 0.57 + 1e-9 and r8["step_time_s"] > r8["compute_s"]
    # same layout, more DP replicas: step time never drops, per-GPU throughput never rises
    times = [proj.step(n, Plan(2, 1, n // 2, 1, 1, "none", False), with_memory=False)["step_time_s"]
             for n in (8, 16, 64, 640)]
    assert times == sorted(times)
    # pipeline bubble shrinks with more micro-batches; full recompute costs compute
    b1 = proj.step(8, Plan(1, 2, 4, 4, 1, "none", False), with_memory=False)
    b2 = proj.step(8, Plan(1, 2, 4, 1, 1, "none", False), with_memory=False)
    assert b2["bubble_s"] < b1["bubble_s"]
    assert proj.step(8, Plan(2, 1, 4, 1, 1, "full", False), with_memory=False)["compute_s"] > r8["compute_s"]
    best8, best64 = proj.best(8), proj.best(64)
    assert best8["mem_gb"] <= 0.9 * 80 - 2 and best64["mem_gb"] <= 0.9 * 80 - 2
    eff = best64["tokens_per_s_per_gpu"] / best8["tokens_per_s_per_gpu"]
    assert 0.5 < eff <= 1.0 + 1e-9
    # a slower network never helps
    slow = Projector(CLUSTERS["a800"], "llama-7b", mfu=0.57, overlap=0.8)
    assert slow.step(64, Plan(2, 1, 32, 1, 1, "none", False), with_memory=False)["dp_comm_s"] > \
        proj.step(64, Plan(2, 1, 32, 1, 1, "none", False), with_memory=False)["dp_comm_s"]
    assert not math.isnan(best64["efficiency"] if "efficiency" in best64 else 0.0)


def test_projection_bf16_gradient_reduction_halves_dp_bytes():
    """--grad-reduce-dtype bf16: the DP reduction moves half the bytes (plus the same per-bucket latency) and
    the memory estimate carries the bf16 wire buffer."""
    plan = Plan(tp=2, pp=1, dp=32, micro_batch=1, zero=1, recompute="none", sp=False)
    fp32 = Projector(CLUSTERS["a800"], "llama-7b", mfu=0.57, overlap=0.8).step(64, plan)
    bf16 = Projector(CLUSTERS["a800"], "llama-7b", mfu=0.57, overlap=0.8, grad_reduce_dtype="bf16").step(64, plan)
    ratio = bf16["dp_comm_s"] / fp32["dp_comm_s"]
    assert 0.6 < ratio < 0.8, ratio  # the gradient reduce-scatter halves; the fp32 weight all-gather does not
    assert bf16["step_time_s"] <= fp32["step_time_s"]
    assert bf16["mem_gb"] > fp32["mem_gb"]
