"""The pretraining loop, the same for every (tp, pp, dp) layout.

    from megatron_jinpan.config import load_config
    from megatron_jinpan.training.loop import pretrain
    pretrain(load_config("configs/pretrain/demo.yaml"))

Under torchrun each process runs this; `jinpan pretrain --nproc N` spawns
the processes itself. A step: this DP rank's micro-batches ->
`forward_backward` (the pipeline schedule) -> optimizer step (gradient
reduction, clipping, update) -> metrics, eval, checkpoint.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import device as devices
from ..config import Config
from ..parallel import comm
from ..parallel.mesh import ParallelMesh
from ..parallel.optimizer import build_optimizer
from ..parallel.parallelize import build_model
from ..parallel.validate import validate_config
from .losses import language_model_loss
from .lr import learning_rate
from .metrics import MetricsWriter
from .schedules import forward_backward


@dataclass
class TrainState:
    """What a checkpoint needs beyond weights and optimizer to continue exactly."""

    step: int = 0               # optimizer steps done
    consumed_samples: int = 0   # global samples consumed (the data position)
    tokens: int = 0             # tokens trained on

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    records: list            # metrics records (on the logging rank; empty elsewhere)
    chunks: list
    mesh: ParallelMesh
    optimizer: object
    state: TrainState


def to_device(mb: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in mb.items()}


def pretrain(cfg: Config, keep_mesh: bool = False) -> TrainResult:
    """Train per `cfg`; returns the records and (for tests) the live model chunks."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    validate_config(cfg, world)
    if not cfg.data.mock:
        from ..data import check_tokenizer

        check_tokenizer(cfg)
    device = devices.resolve_device(cfg.train.device)
    mesh = ParallelMesh.create(cfg.parallel.tp, cfg.parallel.pp, device)
    try:
        return train(cfg, mesh)
    finally:
        if not keep_mesh:
            mesh.destroy()


def _global_token_count(microbatches: list[dict], mesh) -> torch.Tensor:
    count = sum(mb["loss_mask"].sum() for mb in microbatches).to(torch.float64).reshape(())
    comm.all_reduce(count, mesh.dp_group)
    return count


def run_step(chunks, optimizer, microbatches, loss_fn, cfg, mesh, lr: float) -> dict:
    """One optimizer step; returns loss (on the last stage; else None) and grad_norm."""
    optimizer.zero_grad()
    global_tokens = _global_token_count(microbatches, mesh)
    autocast = lambda: devices.autocast_context(mesh.device, cfg.train.dtype)  # noqa: E731
    results = forward_backward(chunks, microbatches, loss_fn, mesh, schedule=cfg.parallel.pp_schedule,
                               loss_scale=1.0 / float(global_tokens), autocast=autocast)
    out = optimizer.step(lr)
    loss = None
    if mesh.is_last_stage:
        total = torch.stack([r["loss"].float() for r in results]).sum().to(torch.float64)
        comm.all_reduce(total, mesh.dp_group)
        loss = float(total / global_tokens)
    return {"loss": loss, "grad_norm": out["grad_norm"]}


@torch.no_grad()
def evaluate(chunks, eval_sets: dict, loss_fn, cfg, mesh) -> dict:
    """eval_loss/eval_ppl over all held-out sets, and eval_loss_<name>/eval_ppl_<name> per set."""
    import math

    out = {}
    for chunk in chunks:
        chunk.eval()
    total_loss, total_tokens = 0.0, 0.0
    for name, dataset in eval_sets.items():
        loss_sum = torch.zeros((), dtype=torch.float64, device=mesh.device)
        tokens = torch.zeros((), dtype=torch.float64, device=mesh.device)
        for i in range(cfg.train.eval_iters):
            mbs = [to_device(mb, mesh.device) for mb in dataset.microbatches(i, mesh.dp_rank, mesh.dp)]
            results = forward_backward(chunks, mbs, loss_fn, mesh, schedule=cfg.parallel.pp_schedule,
                                       forward_only=True)
            for r in results:
                loss_sum += r["loss"].double()
                tokens += r["tokens"].double()
        if mesh.is_last_stage:
            comm.all_reduce(loss_sum, mesh.dp_group)
            comm.all_reduce(tokens, mesh.dp_group)
            loss = float(loss_sum / tokens.clamp(min=1))
            out[f"eval_loss_{name}"] = loss
            out[f"eval_ppl_{name}"] = math.exp(min(loss, 50.0))
            total_loss += float(loss_sum)
            total_tokens += float(tokens)
    if mesh.is_last_stage and total_tokens:
        out["eval_loss"] = total_loss / total_tokens
        out["eval_ppl"] = math.exp(min(out["eval_loss"], 50.0))
    for chunk in chunks:
        chunk.train()
    return out


def train(cfg: Config, mesh: ParallelMesh) -> TrainResult:
    from ..checkpoint.manager import CheckpointManager
    from ..data import build_eval_data, build_train_data

    run_dir = Path(cfg.run_dir)
    if mesh.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.yaml")
    torch.manual_seed(cfg.train.seed)

    chunks = build_model(cfg, mesh)
    optimizer = build_optimizer(chunks, cfg, mesh)
    checkpoints = CheckpointManager(cfg, mesh)
    state = checkpoints.resume(chunks, optimizer) or TrainState()
    train_data = build_train_data(cfg)
    eval_sets = build_eval_data(cfg) if cfg.train.eval_interval > 0 else {}
    loss_fn = language_model_loss(cfg.model.vocab_size, mesh)

    t = cfg.train
    tokens_per_step = t.global_batch * t.seq_len
    flops_per_step = cfg.model.flops_per_token(t.seq_len) * tokens_per_step
    peak = devices.peak_tflops(mesh.device)
    writer = MetricsWriter(run_dir, mesh.is_logging_rank, t.steps, state.step, cfg.log.progress, cfg.log.tensorboard)
    records = []
    checkpoints.install_signal_handler()
    try:
        for step in range(state.step, t.steps):
            devices.reset_peak_memory(mesh.device)
            start = time.perf_counter()
            lr = learning_rate(step, cfg.optim, t.steps)
            microbatches = [to_device(mb, mesh.device) for mb in train_data.microbatches(step, mesh.dp_rank, mesh.dp)]
            out = run_step(chunks, optimizer, microbatches, loss_fn, cfg, mesh, lr)
            devices.synchronize(mesh.device)
            elapsed = time.perf_counter() - start
            state.step = step + 1
            state.consumed_samples += t.global_batch
            state.tokens += tokens_per_step
            tflops = flops_per_step / elapsed / mesh.world_size / 1e12
            record = {
                "step": state.step, "loss": out["loss"], "grad_norm": out["grad_norm"], "lr": lr,
                "tokens": state.tokens, "tokens_per_s": tokens_per_step / elapsed, "tflops_per_gpu": tflops,
                "mfu": (tflops / peak) if peak else None, "mem_gb": devices.max_memory_gb(mesh.device),
                "step_time_s": elapsed,
            }
            if t.eval_interval and (state.step % t.eval_interval == 0 or state.step == t.steps):
                record.update(evaluate(chunks, eval_sets, loss_fn, cfg, mesh))
            if mesh.is_logging_rank:
                records.append(record)
                if state.step % cfg.log.interval == 0 or state.step == t.steps:
                    writer.log(record)
            checkpoints.maybe_save(state, chunks, optimizer)
            if checkpoints.stop_requested():
                break
        checkpoints.save_final(state, chunks, optimizer)
    finally:
        writer.close()
    return TrainResult(records, chunks, mesh, optimizer, state)
