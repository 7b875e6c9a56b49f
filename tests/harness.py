"""Run the real trainer under a (tp, pp, dp) layout on local gloo processes, for equivalence tests.

    from harness import run_layout
    out = run_layout(["parallel.tp=2"], nproc=2, tmp_path=tmp_path)
    out["losses"], out["params"]     # per-step losses, full single-device state dict

Every layout trains the same `debug` model on the same mock data; results
must match the single-process run (fp32, CPU).
"""
from __future__ import annotations

import os

import torch
import torch.multiprocessing as mp

from megatron_jinpan.parallel.local import free_port, set_worker_env

BASE = [
    "model.name=debug", "data.mock=true", "train.steps=3", "train.global_batch=8", "train.micro_batch=2",
    "train.seq_len=32", "train.device=cpu", "optim.lr=3e-3", "optim.warmup=1", "optim.min_lr=3e-4",
    "log.progress=false", "log.tensorboard=false", "checkpoint.resume=never", "checkpoint.save_on_exit=false",
]


def spawn_on_tp_mesh(fn, nproc: int = 2) -> None:
    """Run `fn(mesh)` (a module-level function) on `nproc` gloo processes forming one tp=nproc mesh, one
    thread each; the mesh is destroyed afterwards even when `fn` fails."""
    mp.spawn(_tp_mesh_entry, args=(nproc, free_port(), fn), nprocs=nproc, join=True)


def _tp_mesh_entry(rank, world, port, fn):
    set_worker_env(rank, world, port)
    torch.set_num_threads(1)
    from megatron_jinpan.parallel.mesh import ParallelMesh

    mesh = ParallelMesh.create(tp=world, pp=1, device=torch.device("cpu"))
    try:
        fn(mesh)
    finally:
        mesh.destroy()


def _worker(rank, world, port, overrides, out_path):
    set_worker_env(rank, world, port)
    torch.set_num_threads(1)
    from megatron_jinpan.config import load_config
    from megatron_jinpan.parallel.parallelize import gather_full_state_dict
    from megatron_jinpan.training.loop import pretrain

    cfg = load_config(None, overrides)
    result = pretrain(cfg, keep_mesh=True)
    params = gather_full_state_dict(result.chunks, result.mesh)
    if result.mesh.is_logging_rank:
        torch.save({"losses": [r["loss"] for r in result.records],
                    "grad_norms": [r["grad_norm"] for r in result.records],
                    "records": result.records, "params": params}, out_path)
    result.mesh.barrier()
    result.mesh.destroy()


def run_layout(overrides: list[str], nproc: int, tmp_path, base: list[str] | None = None) -> dict:
    """Train with BASE + overrides on nproc processes; returns losses, grad norms and full params."""
    out_path = os.path.join(str(tmp_path), f"result_{abs(hash(tuple(overrides)))}_{nproc}.pt")
    all_overrides = list(base if base is not None else BASE) + [f"run_dir={tmp_path}/run_{nproc}"] + list(overrides)
    mp.spawn(_worker, args=(nproc, free_port(), all_overrides, out_path), nprocs=nproc, join=True)
    return torch.load(out_path, weights_only=False)


def assert_same_training(reference: dict, other: dict, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    torch.testing.assert_close(torch.tensor(other["losses"]), torch.tensor(reference["losses"]), rtol=rtol, atol=atol)
    assert reference["params"].keys() == other["params"].keys()
    for name, value in reference["params"].items():
        torch.testing.assert_close(other["params"][name], value, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
