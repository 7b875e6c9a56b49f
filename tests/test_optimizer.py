"""Optimizer: ZeRO-1 vs AdamW equivalence with active clipping across tp/pp/dp, state_dict format,
optimizer-state memory, and train.trainable (embeddings / new_embeddings)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from harness import BASE, assert_same_training, run_layout
from megatron_jinpan.parallel.local import free_port, set_worker_env

# clip_grad well below the debug model's grad norm (~1) so clipping is active every step;
# a tied embedding so the pp=2 layout exercises the embedding-group reduction.
# eps=1e-6: with eps=1e-8 a weight whose (clipped) gradient is ~1e-9 turns fp32
# summation-order noise into ~1e-6 parameter differences (Adam's m/sqrt(v) is
# ~sign(g) there); see test_data_parallel.ACCUM.
CLIP = ["optim.clip_grad=0.05", "model.tie_embeddings=true", "optim.eps=1e-6"]


@pytest.fixture(scope="module")
def clip_reference(tmp_path_factory):
    return run_layout(CLIP, 1, tmp_path_factory.mktemp("ref_clip"))


LAYOUTS = {
    "dp2_zero1": (["parallel.zero=1", "parallel.bucket_mb=0.01"], 2),
    "tp2_sp_dp2_zero1": (["parallel.tp=2", "parallel.sp=true", "parallel.zero=1", "parallel.bucket_mb=0.01"], 4),
    "pp2_dp2_zero1_tied": (["parallel.pp=2", "parallel.zero=1", "parallel.overlap_param_gather=true"], 4),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_clipped_training_matches_single_process(clip_reference, tmp_path, name):
    overrides, nproc = LAYOUTS[name]
    out = run_layout(CLIP + overrides, nproc, tmp_path)
    assert min(clip_reference["grad_norms"]) > 0.05  # clipping really happened
    torch.testing.assert_close(torch.tensor(out["grad_norms"]), torch.tensor(clip_reference["grad_norms"]),
                               rtol=1e-5, atol=1e-7)
    assert_same_training(clip_reference, out)


# ---------------------------------------------------------------- in-process checks

def _train(overrides, steps=2):
    from megatron_jinpan.config import load_config
    from megatron_jinpan.training.loop import pretrain

    cfg = load_config(None, BASE + [f"train.steps={steps}", "run_dir=" + os.environ["TEST_RUN_DIR"]] + overrides)
    return cfg, pretrain(cfg, keep_mesh=True)


def _state_worker(rank, world, port, run_dir):
    set_worker_env(rank, world, port)
    os.environ["TEST_RUN_DIR"] = run_dir
    torch.set_num_threads(1)
    from megatron_jinpan.models import init_parameter
    from megatron_jinpan.parallel.optimizer import build_optimizer, optimizer_state_bytes
    from megatron_jinpan.parallel.parallelize import gather_full_state_dict, param_specs, unwrap

    # -------- state_dict: same layout-independent content under zero=0 and zero=1
    _, r0 = _train(["parallel.zero=0"])
    _, r1 = _train(["parallel.zero=1", "parallel.bucket_mb=0.01"])
    sd0, sd1 = r0.optimizer.state_dict(), r1.optimizer.state_dict()
    assert sd0["step"] == sd1["step"] == 2
    assert sd0["state"].keys() == sd1["state"].keys()
    module = unwrap(r1.chunks[0])
    specs = {spec.name: module.get_parameter(n) for n, spec in param_specs(module).items()}
    assert set(sd1["state"]) == set(specs)
    for name, entry in sd0["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert entry[key].shape == specs[name].shape, (name, key)
            torch.testing.assert_close(sd1["state"][name][key], entry[key], rtol=1e-5, atol=1e-9)
    assert {g["name"] for g in sd1["param_groups"]} == {"decay", "no_decay"}
    # round trip, and across layouts: zero=0's state loaded into a zero=1 optimizer
    fresh = build_optimizer(r1.chunks, r1.optimizer.cfg, r1.mesh)
    fresh.load_state_dict(sd0)
    again = fresh.state_dict()
    assert again["step"] == 2
    for name, entry in sd0["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(again["state"][name][key], entry[key]), (name, key)

    # -------- optimizer-state memory: zero=1 over dp=2 holds ~half of zero=0
    b0 = optimizer_state_bytes(r0.chunks, breakdown=True)
    b1 = optimizer_state_bytes(r1.chunks, breakdown=True)
    n_params = sum(p.numel() for c in r0.chunks for p in unwrap(c).parameters())
    assert b0["total"] == 12 * n_params, (b0, n_params)
    assert 0.45 < b1["total"] / b0["total"] < 0.56, (b0, b1)  # half, give or take bucket padding

    # -------- weights loaded in place (a checkpoint/HF load) are picked up by the zero=1 master shard
    weight = unwrap(r1.chunks[0]).get_parameter("layers.0.mlp.up_proj.weight")
    with torch.no_grad():
        weight.fill_(0.5)
    r1.optimizer.zero_grad()
    r1.optimizer.step(0.0)
    assert torch.all(weight == 0.5)

    # -------- trainable=embeddings: everything else frozen, no state for it
    cfg, re = _train(["train.trainable=embeddings", "parallel.zero=1"])
    full = gather_full_state_dict(re.chunks, re.mesh)
    init = {n: init_parameter(n, v.shape, cfg.model, cfg.train.seed) for n, v in full.items()}
    for name, value in full.items():
        same = torch.equal(value, init[name])
        assert same == (name not in ("embed_tokens.weight", "lm_head.weight")), name
    assert set(re.optimizer.state_dict()["state"]) == {"embed_tokens.weight", "lm_head.weight"}
    emb_numel = sum(p.numel() for c in re.chunks for p in unwrap(c).parameters() if p.requires_grad)
    assert optimizer_state_bytes(re.chunks) <= 12 * emb_numel // 2 + 12 * 64 * 2

    # -------- trainable=new_embeddings: rows below new_embeddings_from never change
    cfg, rn = _train(["train.trainable=new_embeddings", "train.new_embeddings_from=100", "parallel.zero=1",
                      "parallel.bucket_mb=0.01"])
    full = gather_full_state_dict(rn.chunks, rn.mesh)
    sdn = rn.optimizer.state_dict()
    for name in ("embed_tokens.weight", "lm_head.weight"):
        init = init_parameter(name, full[name].shape, cfg.model, cfg.train.seed)
        assert torch.equal(full[name][:100], init[:100]), name
        assert (full[name][100:] != init[100:]).float().mean() > 0.5, name
        assert sdn["state"][name]["exp_avg"][:100].abs().sum() == 0
        assert sdn["state"][name]["exp_avg"][100:256].abs().sum() > 0
    r0.mesh.barrier()
    r0.mesh.destroy()


def test_state_dict_memory_and_trainable(tmp_path):
    mp.spawn(_state_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)


def test_shard_adamw_matches_torch_adamw():
    """The alias-parameter trick: AdamW on flat views of one buffer equals AdamW on the real tensors."""
    torch.manual_seed(0)
    params = [torch.randn(7, 5), torch.randn(13)]
    grads = [torch.randn_like(p) for p in params]
    ref = [torch.nn.Parameter(p.clone()) for p in params]
    opt_ref = torch.optim.AdamW([{"params": [ref[0]], "weight_decay": 0.1}, {"params": [ref[1]], "weight_decay": 0.0}],
                                lr=1e-2, betas=(0.9, 0.95), fused=True)
    flat = torch.cat([p.reshape(-1) for p in params])
    gflat = torch.cat([g.reshape(-1) for g in grads])
    # split the first tensor across two "ranks" worth of segments
    cuts = [(0, 20, 0.1), (20, 35, 0.1), (35, 48, 0.0)]
    aliases = []
    for a, b, wd in cuts:
        alias = torch.nn.Parameter(flat[a:b])
        alias.grad = gflat[a:b]
        aliases.append((alias, wd))
    opt = torch.optim.AdamW([{"params": [a], "weight_decay": wd} for a, wd in aliases], lr=1e-2, betas=(0.9, 0.95),
                            fused=True)  # as build_optimizer
    for _ in range(3):
        for p, g in zip(ref, grads):
            p.grad = g.clone()
        opt_ref.step()
        opt.step()
    torch.testing.assert_close(flat, torch.cat([p.detach().reshape(-1) for p in ref]), rtol=1e-6, atol=0)


def _new_embeddings_tp_worker(rank, world, port, run_dir):
    set_worker_env(rank, world, port)
    os.environ["TEST_RUN_DIR"] = run_dir
    torch.set_num_threads(1)
    from megatron_jinpan.models import init_parameter
    from megatron_jinpan.parallel.parallelize import gather_full_state_dict

    # tp=2 splits the 256 padded rows 128/128: row 150 falls inside tp rank 1's shard (local row 22).
    cfg, res = _train(["parallel.tp=2", "train.trainable=new_embeddings", "train.new_embeddings_from=150"])
    full = gather_full_state_dict(res.chunks, res.mesh)
    for name in ("embed_tokens.weight", "lm_head.weight"):
        init = init_parameter(name, full[name].shape, cfg.model, cfg.train.seed)
        assert torch.equal(full[name][:150], init[:150]), name
        assert (full[name][150:] != init[150:]).float().mean() > 0.5, name
    res.mesh.barrier()
    res.mesh.destroy()


def test_new_embeddings_rows_frozen_under_tp(tmp_path):
    mp.spawn(_new_embeddings_tp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
