"""Pipeline schedules: op orders (deadlock-free, each op once, bounded activations) and a live run.

The op orders are checked by simulating every rank at once (pure Python); a
4-stage gloo run then counts the activations actually kept alive by
`forward_backward` (its `trace`): 1F1B keeps at most pp - pp_rank
micro-batches in flight per stage, GPipe all of them. Equivalence with the
single-process run is in test_pipeline.py.
"""

import pytest
import torch
import torch.multiprocessing as mp

from harness import BASE
from megatron_jinpan.training.schedules import _messages_from, schedule_ops
from megatron_jinpan.parallel.local import free_port, set_worker_env


def _simulate(schedule, pp, m, vs, forward_only=False):
    """Run all ranks' op lists with async sends; returns max live activations per rank (fails on deadlock)."""
    stages = pp * vs
    ops = [schedule_ops(schedule, pp, r, m, vs, forward_only) for r in range(pp)]
    done, pos = set(), [0] * pp
    live, max_live = [0] * pp, [0] * pp
    progressed = True
    while progressed:
        progressed = False
        for r in range(pp):
            while pos[r] < len(ops[r]):
                kind, v, i = ops[r][pos[r]]
                s = v * pp + r
                if kind == "F":
                    ready = s == 0 or ("F", s - 1, i) in done
                else:
                    ready = ("F", s, i) in done and (s == stages - 1 or ("B", s + 1, i) in done)
                if not ready:
                    break
                done.add((kind, s, i))
                if not forward_only:
                    live[r] += 1 if kind == "F" else -1
                    max_live[r] = max(max_live[r], live[r])
                pos[r] += 1
                progressed = True
    assert all(p == len(o) for p, o in zip(pos, ops)), f"deadlock: {schedule} pp={pp} m={m} vs={vs} at {pos}"
    for r in range(pp):
        expect = {("F", v, i) for v in range(vs) for i in range(m)}
        if not forward_only:
            expect |= {("B", v, i) for v in range(vs) for i in range(m)}
        assert sorted(ops[r]) == sorted(expect)
        for v in range(vs):  # micro-batches enter each chunk in order
            assert [i for k, c, i in ops[r] if k == "F" and c == v] == list(range(m))
    return max_live


@pytest.mark.parametrize("pp", [2, 3, 4])
@pytest.mark.parametrize("m", [1, 2, 4, 5, 8])
def test_gpipe_and_1f1b_orders(pp, m):
    assert _simulate("gpipe", pp, m, 1) == [m] * pp
    assert _simulate("1f1b", pp, m, 1) == [min(pp - r, m) for r in range(pp)]
    for schedule in ("gpipe", "1f1b"):
        _simulate(schedule, pp, m, 1, forward_only=True)


@pytest.mark.parametrize("pp,m,vs", [(2, 2, 2), (2, 4, 2), (2, 6, 3), (4, 4, 2), (4, 8, 2), (3, 9, 2)])
def test_interleaved_orders(pp, m, vs):
    max_live = _simulate("interleaved", pp, m, vs)
    for r in range(pp):
        warmup = m * vs if m == pp else min((pp - r - 1) * 2 + (vs - 1) * pp, m * vs)
        assert max_live[r] == min(warmup + 1, m * vs)
    _simulate("interleaved", pp, m, vs, forward_only=True)


def test_message_streams_cover_every_boundary():
    pp, m, vs = 2, 4, 2
    sent = {}
    for r in range(pp):
        for dst, msgs in _messages_from(schedule_ops("interleaved", pp, r, m, vs), pp, r, pp * vs).items():
            sent.setdefault(dst, []).extend(msgs)
    acts = sorted(msg for msgs in sent.values() for msg in msgs if msg[0] == "act")
    grads = sorted(msg for msgs in sent.values() for msg in msgs if msg[0] == "grad")
    assert acts == sorted(("act", s, i) for s in range(1, 4) for i in range(m))
    assert grads == sorted(("grad", s, i) for s in range(0, 3) for i in range(m))


def test_bad_schedule_requests_fail_clearly():
    with pytest.raises(ValueError, match="divisible by parallel.pp"):
        schedule_ops("interleaved", 2, 0, 3, 2)
    with pytest.raises(ValueError, match="interleaved"):
        schedule_ops("1f1b", 2, 0, 4, 2)
    with pytest.raises(ValueError, match="pp_schedule"):
        schedule_ops("zigzag", 2, 0, 4, 1)


# ------------------------------------------------------------------ a live 4-stage run
def _worker(rank, world, port, out_path):
    set_worker_env(rank, world, port)
    torch.set_num_threads(1)
    from megatron_jinpan import device as devices
    from megatron_jinpan.config import load_config
    from megatron_jinpan.data import build_train_data
    from megatron_jinpan.parallel.mesh import ParallelMesh
    from megatron_jinpan.parallel.parallelize import build_model
    from megatron_jinpan.training.losses import language_model_loss
    from megatron_jinpan.training.schedules import forward_backward

    report = {}
    base = BASE + ["run_dir=/tmp/unused", "train.global_batch=16", "train.micro_batch=2", "parallel.pp=4"]
    mesh = None
    for name, extra in (("plain", []), ("virtual", ["model.num_layers=8", "parallel.pp_schedule=interleaved",
                                                     "parallel.virtual_stages=2", "train.recompute=full"])):
        cfg = load_config(None, base + extra)
        if mesh is None:
            mesh = ParallelMesh.create(1, 4, torch.device("cpu"))
        chunks = build_model(cfg, mesh)
        mbs = build_train_data(cfg).microbatches(0, mesh.dp_rank, mesh.dp)
        loss_fn = language_model_loss(cfg.model.vocab_size, mesh)
        schedules = ["gpipe", "1f1b"] if name == "plain" else ["interleaved"]
        for schedule in schedules:
            for forward_only in (False, True):
                for c in chunks:
                    c.zero_grad_buffer()
                trace = {}
                out = forward_backward(chunks, mbs, loss_fn, mesh, schedule=schedule, forward_only=forward_only,
                                       loss_scale=1e-3, trace=trace)
                report[(schedule, forward_only)] = {"max_live": trace["max_live"],
                                                    "losses": [float(r["loss"]) for r in out],
                                                    "tokens": [float(r["tokens"]) for r in out]}
        if name == "plain":  # bf16 autocast through the pipeline
            autocast = lambda: devices.autocast_context(mesh.device, "bf16")  # noqa: E731
            out = forward_backward(chunks, mbs, loss_fn, mesh, schedule="1f1b", loss_scale=1e-3, autocast=autocast)
            report["bf16"] = [float(r["loss"]) for r in out]
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, report)
    if rank == 0:
        torch.save(gathered, out_path)
    mesh.destroy()


@pytest.fixture(scope="module")
def live_run(tmp_path_factory):
    out_path = str(tmp_path_factory.mktemp("schedules") / "report.pt")
    mp.spawn(_worker, args=(4, free_port(), out_path), nprocs=4, join=True)
    return torch.load(out_path, weights_only=False)


def test_1f1b_bounds_live_activations_and_gpipe_keeps_all(live_run):
    m, pp = 8, 4
    assert [r[("1f1b", False)]["max_live"] for r in live_run] == [pp - r for r in range(pp)]
    assert [r[("gpipe", False)]["max_live"] for r in live_run] == [m] * pp
    for r in live_run:
        assert r[("1f1b", True)]["max_live"] == 0 and r[("gpipe", True)]["max_live"] == 0
    # interleaved (pp=4, v=2, 16 chunk-micro-batches): Megatron's warm-up + 1 on each rank
    assert [r[("interleaved", False)]["max_live"] for r in live_run] == [11, 9, 7, 5]


def test_every_schedule_and_eval_give_the_same_losses_on_the_last_stage(live_run):
    *others, last = live_run
    for r in others:
        assert all(v["losses"] == [] for k, v in r.items() if isinstance(k, tuple)) and r["bf16"] == []
    ref = last[("gpipe", False)]["losses"]
    assert len(ref) == 8 and len(set(ref)) > 1
    for key in (("1f1b", False), ("gpipe", True), ("1f1b", True)):
        assert last[key]["losses"] == pytest.approx(ref, rel=1e-6)
    assert last[("interleaved", True)]["losses"] == pytest.approx(last[("interleaved", False)]["losses"], rel=1e-6)
    assert last[("gpipe", False)]["tokens"] == [64.0] * 8
    assert last["bf16"] == pytest.approx(ref, rel=3e-2)
