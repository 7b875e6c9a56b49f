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
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import device as devices
from ..checkpoint.manager import CheckpointManager
from ..config import Config
from ..data.prefetch import Prefetcher
from ..parallel import comm
from ..parallel.mesh import ParallelMesh
from ..parallel.optimizer import build_optimizer
from ..parallel.parallelize import build_model
from ..parallel.validate import validate_config
from .lr import learning_rate
from .metrics import MetricsWriter
from .schedules import forward_backward
from .state import TrainState  # noqa: F401 - also imported from here by other modules
from .straggler import NO_TIMERS, StragglerDetector
from .task import Task, language_model_summary, language_model_task, loss_token_count


@dataclass
class TrainResult:
    records: list            # metrics records (on the logging rank; empty elsewhere)
    chunks: list
    mesh: ParallelMesh
    optimizer: object
    state: TrainState


def to_device(mb: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in mb.items()}


def pretrain(cfg: Config, keep_mesh: bool = False, make_task=None) -> TrainResult:
    """Train per `cfg`; returns the records and (for tests) the live model chunks.

    `make_task(cfg, mesh) -> Task` picks the objective (default: language modelling on data.blend);
    SFT, reward modelling and DPO pass theirs."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    validate_config(cfg, world)
    if not cfg.data.mock:
        from ..data import check_tokenizer

        check_tokenizer(cfg)
    device = devices.resolve_device(cfg.train.device)
    mesh = ParallelMesh.create(cfg.parallel.tp, cfg.parallel.pp, device)
    try:
        task = (make_task or language_model_task)(cfg, mesh)
        result = train(cfg, mesh, task)
    except BaseException as exc:
        # With other ranks the mesh is left as is: its teardown barrier would wait forever for ranks blocked
        # in this step's collectives; exiting lets the launcher see the failure and stop the others.
        if mesh.world_size == 1 and not keep_mesh:
            mesh.destroy()
        elif mesh.world_size > 1:
            print(f"[jinpan] {mesh.describe()} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        raise
    if not keep_mesh:
        mesh.destroy()
    return result


def _global_units(microbatches: list[dict], denominator, mesh) -> torch.Tensor:
    """The loss units (tokens, pairs, ...) of the whole global batch: this DP rank's, summed over DP."""
    count = sum(denominator(mb).to(torch.float64) for mb in microbatches)
    count = torch.as_tensor(count, dtype=torch.float64, device=mesh.device).reshape(())
    comm.all_reduce(count, mesh.dp_group)
    return count


def _sum_results(results: list[dict], mesh) -> dict:
    """Per-micro-batch loss/metric sums (last stage) -> sums over micro-batches and DP ranks, as floats."""
    keys = sorted(results[0]) if results else []
    if not keys:
        return {}
    local = torch.stack([torch.stack([torch.as_tensor(r[k], device=mesh.device).double().reshape(())
                                      for k in keys]) for r in results]).sum(0)
    comm.all_reduce(local, mesh.dp_group)
    return dict(zip(keys, local.tolist()))


def run_step(chunks, optimizer, microbatches, loss_fn, cfg, mesh, lr: float, task: Task | None = None,
             timers=NO_TIMERS) -> dict:
    """One optimizer step. Returns grad_norm, units (global loss units) and, on the last stage,
    the task's summary (loss and its metrics; loss is None elsewhere). `timers` (the straggler
    detector) times the forward_backward and optimizer phases."""
    denominator = task.denominator if task is not None else loss_token_count
    summarize = task.summarize if task is not None else language_model_summary
    optimizer.zero_grad()
    units = _global_units(microbatches, denominator, mesh)
    autocast = lambda: devices.autocast_context(mesh.device, cfg.train.dtype)  # noqa: E731
    with timers.phase("forward_backward"):
        results = forward_backward(chunks, microbatches, loss_fn, mesh, schedule=cfg.parallel.pp_schedule,
                                   loss_scale=1.0 / float(units.clamp(min=1)), autocast=autocast)
    with timers.phase("optimizer"):
        out = optimizer.step(lr)
    record = {"loss": None}
    if mesh.is_last_stage:
        record.update(summarize(_sum_results(results, mesh), float(units), False))
    record["grad_norm"] = out["grad_norm"]
    record["units"] = float(units)
    return record


@torch.no_grad()
def evaluate(chunks, eval_sets: dict, loss_fn, cfg, mesh, task: Task | None = None) -> dict:
    """Held-out metrics: eval_<metric>_<name> per set and eval_<metric> over all sets (unit-weighted),
    e.g. eval_loss/eval_ppl for language modelling."""
    denominator = task.denominator if task is not None else loss_token_count
    summarize = task.summarize if task is not None else language_model_summary
    out = {}
    for chunk in chunks:
        chunk.train(False)
    totals: dict = {}
    total_units = 0.0
    for name, dataset in eval_sets.items():
        sums: dict = {}
        units = 0.0
        for i in range(cfg.train.eval_iters):
            mbs = [to_device(mb, mesh.device) for mb in dataset.microbatches(i, mesh.dp_rank, mesh.dp)]
            if task is not None and task.prepare is not None:
                mbs = task.prepare(mbs, None)
            units += float(_global_units(mbs, denominator, mesh))
            results = forward_backward(chunks, mbs, loss_fn, mesh, schedule=cfg.parallel.pp_schedule,
                                       forward_only=True)
            if mesh.is_last_stage:
                for k, v in _sum_results(results, mesh).items():
                    sums[k] = sums.get(k, 0.0) + v
        if mesh.is_last_stage:
            for k, v in summarize(sums, units, True).items():
                out[f"eval_{k}_{name}"] = v
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + v
            total_units += units
    if mesh.is_last_stage and total_units:
        out.update({f"eval_{k}": v for k, v in summarize(totals, total_units, True).items()})
    if task is not None and task.extra_eval is not None:
        out.update(task.extra_eval(chunks, mesh) or {})
    for chunk in chunks:
        chunk.train(True)
    return out


def train(cfg: Config, mesh: ParallelMesh, task: Task | None = None) -> TrainResult:
    run_dir = Path(cfg.run_dir)
    if mesh.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.yaml")
    torch.manual_seed(cfg.train.seed)

    task = task or language_model_task(cfg, mesh)
    chunks = (task.build_model or build_model)(cfg, mesh)
    optimizer = build_optimizer(chunks, cfg, mesh)
    checkpoints = CheckpointManager(cfg, mesh)
    state = checkpoints.resume(chunks, optimizer) or TrainState()
    train_data, eval_sets, loss_fn = task.train_data, task.eval_sets, task.loss_fn

    t = cfg.train
    tokens_per_step = task.tokens_per_step or t.global_batch * t.seq_len
    flops_per_step = cfg.model.flops_per_token(t.seq_len) * tokens_per_step
    peak = devices.peak_tflops(mesh.device)
    writer = MetricsWriter(run_dir, mesh.is_logging_rank, t.steps, state.step, cfg.log.progress, cfg.log.tensorboard)
    detector = StragglerDetector(cfg, mesh, chunks)
    prefetcher = Prefetcher(train_data, state.step, mesh.dp_rank, mesh.dp, mesh.device, cfg.data.prefetch,
                            cfg.data.num_workers, stop=t.steps)
    records = []
    checkpoints.install_signal_handler()
    try:
        for step in range(state.step, t.steps):
            devices.reset_peak_memory(mesh.device)
            start = time.perf_counter()
            lr = learning_rate(step, cfg.optim, t.steps)
            with detector.step():
                microbatches = [to_device(mb, mesh.device) for mb in prefetcher.get(step)]
                data_time = time.perf_counter() - start
                detector.add_data_time(data_time)
                if task.prepare is not None:
                    microbatches = task.prepare(microbatches, step)
                out = run_step(chunks, optimizer, microbatches, loss_fn, cfg, mesh, lr, task, timers=detector)
                devices.synchronize(mesh.device)
            elapsed = time.perf_counter() - start
            state.step = step + 1
            state.consumed_samples += t.global_batch
            state.tokens += tokens_per_step
            tflops = flops_per_step / elapsed / mesh.world_size / 1e12
            metrics = {k: v for k, v in out.items() if k not in ("loss", "grad_norm", "units")}
            record = {
                "step": state.step, "loss": out["loss"], "grad_norm": out["grad_norm"], "lr": lr, **metrics,
                "tokens": state.tokens, "tokens_per_s": tokens_per_step / elapsed, "tflops_per_gpu": tflops,
                "mfu": (tflops / peak) if peak else None, "mem_gb": devices.max_memory_gb(mesh.device),
                "step_time_s": elapsed, "data_time_s": data_time,
            }
            straggler = detector.report(state.step, writer)  # {} except every log.straggler_interval steps
            record.update(straggler)
            if t.eval_interval and (state.step % t.eval_interval == 0 or state.step == t.steps):
                record.update(evaluate(chunks, eval_sets, loss_fn, cfg, mesh, task))
            if mesh.is_logging_rank:
                records.append(record)
                if state.step % cfg.log.interval == 0 or state.step == t.steps or straggler:
                    writer.log(record)
            checkpoints.maybe_save(state, chunks, optimizer)
            if checkpoints.stop_requested():
                break
        checkpoints.save_final(state, chunks, optimizer)
    finally:
        prefetcher.close()
        writer.close()
    return TrainResult(records, chunks, mesh, optimizer, state)
