"""Scaling benchmark runner: real training steps of the real trainer under a sweep of layouts.

    from megatron_jinpan.perf.runner import Layout, run_layout_bench, run_sweep
    rows = run_sweep([Layout(world=2, zero=1)], model="debug", steps=3, out_dir="benchmarks/results")

Each run spawns `world` local processes (gloo on CPU, nccl on GPUs via
megatron_jinpan.device), calls `training.loop.pretrain` on mock data and
instruments it from the outside (no change to the trainer):

- forward: wall time between forward pre/post hooks of every model chunk;
- backward: `forward_backward` wall time minus forward;
- optimizer: wall time of `Optimizer.step` (it includes waiting for the DP
  gradient reductions, the grad-norm and ZeRO-1 parameter all-gathers);
- exposed communication: wall time a rank is *blocked* in comm.py —
  synchronous calls plus `wait()` on asynchronous handles (comm time hidden
  behind compute is not in it);
- pipeline bubble: not observable separately; reported as
  (p-1)/(m·v+p-1) of the forward+backward time (formula, stated as such);
- bytes per step per (op, group): comm.py accounting of the last step;
- memory: tensor-level peak per rank = weights + gradient buffers +
  optimizer states (from the live objects) + peak saved activations of one
  step's micro-batches (saved-tensor hooks), and the process RSS high-water
  mark (CPU) or max allocated (GPU).
Timings average the steps after the first (warm-up).
"""
from __future__ import annotations

import csv
import json
import os
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..parallel.local import free_port, set_worker_env
from .metadata import git_commit, hardware

CSV_FIELDS = [
    "model", "world_size", "tp", "pp", "dp", "sp", "virtual_stages", "micro_batch", "global_batch", "seq_len",
    "recompute", "zero", "steps", "status", "step_time_s", "step_time_min_s", "tokens_per_s", "tokens_per_s_per_gpu",
    "tflops_per_gpu", "mfu", "fwd_s", "bwd_s", "opt_s", "comm_exposed_s", "bubble_s", "other_s",
    "comm_bytes_per_step", "comm_calls_per_step", "peak_mem_mb", "params_mb", "grads_mb", "optim_mb", "act_mb",
    "rss_mb", "backend", "hardware", "git_commit", "note",
]


@dataclass
class Layout:
    world: int = 1
    tp: int = 1
    pp: int = 1
    zero: int = 0
    micro_batch: int = 2
    recompute: str = "none"
    sp: bool = False
    virtual_stages: int = 1
    extra: list = field(default_factory=list)

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)

    def name(self) -> str:
        s = f"w{self.world}_tp{self.tp}_pp{self.pp}_dp{self.dp}_z{self.zero}_mb{self.micro_batch}_{self.recompute}"
        return s + ("_sp" if self.sp else "") + (f"_v{self.virtual_stages}" if self.virtual_stages > 1 else "")

    def overrides(self, batch_per_replica: int) -> list[str]:
        out = [f"parallel.tp={self.tp}", f"parallel.pp={self.pp}", f"parallel.zero={self.zero}",
               f"parallel.sp={str(self.sp).lower()}", f"train.micro_batch={self.micro_batch}",
               f"train.recompute={self.recompute}", f"train.global_batch={batch_per_replica * self.dp}"]
        if self.virtual_stages > 1:
            out += ["parallel.pp_schedule=interleaved", f"parallel.virtual_stages={self.virtual_stages}"]
        return out + list(self.extra)


BASE = ["data.mock=true", "optim.lr=1e-3", "optim.warmup=1", "log.progress=false", "log.tensorboard=false",
        "checkpoint.resume=never", "checkpoint.save_on_exit=false", "train.eval_interval=0"]


# ====================================================================== in-worker instrumentation
class _Timers:
    def __init__(self):
        self.reset()
        self.steps: list[dict] = []
        self.comm_tables: list[dict] = []

    def reset(self):
        self.fwd = self.fb = self.opt = self.comm = 0.0
        self._fwd_start: list[float] = []


class _TimedWork:
    """Proxy of an async comm handle that times `wait()` as exposed communication."""

    def __init__(self, work, timers):
        self._work, self._timers = work, timers

    def wait(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self._work.wait(*args, **kwargs)
        finally:
            self._timers.comm += time.perf_counter() - t0

    def __getattr__(self, name):
        return getattr(self._work, name)


def _instrument(timers: _Timers, holder: dict) -> None:
    from ..parallel import comm
    from ..training import loop

    def timed_comm(fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            if kwargs.get("async_op"):
                return _TimedWork(out, timers) if out is not None else None
            if isinstance(out, list):  # batch_isend_irecv
                return [_TimedWork(w, timers) for w in out]
            timers.comm += time.perf_counter() - t0
            return out
        return wrapper

    for name in ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast", "batch_isend_irecv"):
        setattr(comm, name, timed_comm(getattr(comm, name)))

    orig_fb, orig_build, orig_opt, orig_step = loop.forward_backward, loop.build_model, loop.build_optimizer, loop.run_step

    def forward_backward(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return orig_fb(*args, **kwargs)
        finally:
            timers.fb += time.perf_counter() - t0

    def build_model(cfg, mesh):
        chunks = orig_build(cfg, mesh)
        for chunk in chunks:
            module = getattr(chunk, "module", chunk)
            module.register_forward_pre_hook(lambda *a: timers._fwd_start.append(time.perf_counter()))
            module.register_forward_hook(lambda *a: setattr(timers, "fwd", timers.fwd + time.perf_counter()
                                                            - timers._fwd_start.pop()))
        holder["chunks"] = chunks
        return chunks

    def build_optimizer(chunks, cfg, mesh):
        opt = orig_opt(chunks, cfg, mesh)
        step = opt.step

        def timed_step(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return step(*args, **kwargs)
            finally:
                timers.opt += time.perf_counter() - t0
        opt.step = timed_step
        holder["optimizer"] = opt
        return opt

    def run_step(chunks, optimizer, microbatches, loss_fn, cfg, mesh, lr, task=None, **kwargs):
        timers.reset()
        holder.setdefault("microbatches", microbatches)
        holder["loss_fn"], holder["mesh"], holder["cfg"] = loss_fn, mesh, cfg
        t0 = time.perf_counter()
        with comm.accounting() as stats:
            out = orig_step(chunks, optimizer, microbatches, loss_fn, cfg, mesh, lr, task, **kwargs)
        timers.steps.append({"fwd": timers.fwd, "fb": timers.fb, "opt": timers.opt, "comm": timers.comm,
                             "wall": time.perf_counter() - t0})
        timers.comm_tables.append(stats.table())
        return out

    loop.forward_backward, loop.build_model, loop.build_optimizer, loop.run_step = \
        forward_backward, build_model, build_optimizer, run_step


def _measure_memory(holder: dict) -> dict:
    from .. import device as devices
    from ..parallel.parallelize import unwrap  # noqa: F401
    from ..training import loop
    from .memory import SavedTensorTracker, measure_model_state_bytes, model_param_tensors

    chunks, opt, mesh, cfg = holder["chunks"], holder["optimizer"], holder["mesh"], holder["cfg"]
    states = measure_model_state_bytes(chunks, opt)
    tracker = SavedTensorTracker(exclude=model_param_tensors(chunks))
    opt.zero_grad()
    with tracker:
        loop.forward_backward(chunks, holder["microbatches"], holder["loss_fn"], mesh,
                              schedule=cfg.parallel.pp_schedule, loss_scale=1e-3)
    opt.zero_grad()
    states["activations"] = tracker.peak_bytes
    states["rss_mb"] = devices.max_memory_gb(mesh.device) * 1024
    return states


def _worker(rank, world, port, overrides, out_path, measure_memory):
    set_worker_env(rank, world, port)
    import torch

    torch.set_num_threads(int(os.environ.get("JINPAN_BENCH_THREADS", "1")))
    from ..config import load_config
    from ..parallel import comm
    from ..training import loop

    timers, holder = _Timers(), {}
    _instrument(timers, holder)
    cfg = load_config(None, overrides)
    result = loop.pretrain(cfg, keep_mesh=True)
    mem = _measure_memory(holder) if measure_memory else {}
    mine = {"rank": rank, "steps": timers.steps, "comm": timers.comm_tables[-1] if timers.comm_tables else {},
            "mem": mem, "records": result.records, "pp_rank": result.mesh.pp_rank}
    everyone = comm.all_gather_object(mine)
    if rank == 0:
        torch.save(everyone, out_path)
    result.mesh.barrier()
    result.mesh.destroy()


# ====================================================================== driver
def _spawn(world: int, overrides: list[str], out_path: str, measure_memory: bool, timeout_s: float) -> str | None:
    """Run the workers; returns None on success or an error string."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_worker, args=(world, free_port(), overrides, out_path, measure_memory),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.time() + timeout_s
    try:
        while not ctx.join(timeout=0.5):
            if time.time() > deadline:
                for proc in ctx.processes:
                    if proc.is_alive():
                        proc.terminate()
                return f"timeout after {timeout_s:.0f}s"
    except Exception as exc:  # ProcessRaisedException / ProcessExitedException
        text = str(exc)
        if "NotImplementedError" in text:
            line = [ln for ln in text.splitlines() if "NotImplementedError" in ln]
            return "unsupported: " + (line[-1].strip() if line else "NotImplementedError")
        return "error: " + text.strip().splitlines()[-1][:300]
    return None


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarize(layout: Layout, cfg, per_rank: list[dict], steps: int) -> dict:
    """One CSV row from the per-rank results."""
    warm = slice(1, None) if steps > 1 else slice(0, None)
    # The step ends when the slowest rank ends: take the per-step max over ranks of each timer.
    # Each step's breakdown comes from its critical rank (the one with the longest step).
    step_rows = [r["steps"][warm] for r in per_rank]
    n = min(len(s) for s in step_rows)
    critical = [max((s[i] for s in step_rows), key=lambda d: d["wall"]) for i in range(n)]

    def stat(key):
        return _mean([c[key] for c in critical])

    records = next((r["records"] for r in per_rank if r["records"]), [])
    recs = records[warm] if records else []
    step_time = _mean([r["step_time_s"] for r in recs])
    tokens_per_s = _mean([r["tokens_per_s"] for r in recs])
    fb, fwd, opt, comm_s = stat("fb"), stat("fwd"), stat("opt"), stat("comm")
    m = cfg.train.global_batch // (cfg.train.micro_batch * layout.dp)
    v = layout.virtual_stages
    bubble = fb * (layout.pp - 1) / (m * v + layout.pp - 1) if layout.pp > 1 else 0.0
    fastest = min(critical, key=lambda d: d["wall"]) if critical else None  # least disturbed step
    mems = [r["mem"] for r in per_rank if r["mem"]]
    peak = max(mems, key=lambda d: d["params"] + d["grads"] + d["optimizer"] + d["activations"]) if mems else None
    comm_tbl = per_rank[0]["comm"]
    mb = 2**20
    row = {
        "model": cfg.model.name, "world_size": layout.world, "tp": layout.tp, "pp": layout.pp, "dp": layout.dp,
        "sp": layout.sp, "virtual_stages": layout.virtual_stages, "micro_batch": cfg.train.micro_batch,
        "global_batch": cfg.train.global_batch, "seq_len": cfg.train.seq_len, "recompute": layout.recompute,
        "zero": layout.zero, "steps": steps, "status": "ok", "step_time_s": step_time, "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_gpu": tokens_per_s / layout.world if tokens_per_s else None,
        "tflops_per_gpu": _mean([r["tflops_per_gpu"] for r in recs]), "mfu": _mean([r.get("mfu") for r in recs]),
        "fwd_s": fwd, "bwd_s": fb - fwd, "opt_s": opt, "comm_exposed_s": comm_s, "bubble_s": bubble,
        "other_s": stat("wall") - fb - opt,
        "step_time_min_s": fastest["wall"] if fastest else None, "fb_min_s": fastest["fb"] if fastest else None,
        "opt_min_s": fastest["opt"] if fastest else None,
        "comm_bytes_per_step": sum(v["bytes"] for v in comm_tbl.values()),
        "comm_calls_per_step": sum(v["calls"] for v in comm_tbl.values()),
    }
    if peak:
        row.update(peak_mem_mb=(peak["params"] + peak["grads"] + peak["optimizer"] + peak["activations"]) / mb,
                   params_mb=peak["params"] / mb, grads_mb=peak["grads"] / mb, optim_mb=peak["optimizer"] / mb,
                   act_mb=peak["activations"] / mb, rss_mb=max(d["rss_mb"] for d in mems))
    return row


def run_layout_bench(layout: Layout, model: str = "debug", steps: int = 3, seq_len: int = 64,
                     batch_per_replica: int = 4, device: str = "cpu", extra: list | None = None,
                     measure_memory: bool = True, timeout_s: float = 300.0, workdir: str | None = None) -> dict:
    """Run one layout; returns the CSV row (status ok | unsupported: ... | error: ...) and per-rank details."""
    import tempfile

    import torch

    from ..config import load_config
    from ..parallel.validate import layout_problems

    tmp = Path(workdir or tempfile.mkdtemp(prefix="jinpan_bench_"))
    tmp.mkdir(parents=True, exist_ok=True)
    overrides = BASE + [f"model.name={model}", f"train.steps={steps}", f"train.seq_len={seq_len}",
                        f"train.device={device}", f"run_dir={tmp / layout.name()}"]
    overrides += layout.overrides(batch_per_replica) + list(extra or [])
    cfg = load_config(None, overrides)
    base_row = {"model": model, "world_size": layout.world, "tp": layout.tp, "pp": layout.pp, "dp": layout.dp,
                "sp": layout.sp, "virtual_stages": layout.virtual_stages, "micro_batch": layout.micro_batch,
                "global_batch": cfg.train.global_batch, "seq_len": seq_len, "recompute": layout.recompute,
                "zero": layout.zero, "steps": steps}
    problems = layout_problems(cfg, layout.world)
    if problems:
        return {"row": dict(base_row, status="invalid: " + "; ".join(problems)[:200]), "ranks": []}
    out_path = str(tmp / f"{layout.name()}.pt")
    error = _spawn(layout.world, overrides, out_path, measure_memory, timeout_s)
    if error is not None:
        return {"row": dict(base_row, status=error), "ranks": []}
    per_rank = torch.load(out_path, weights_only=False)
    row = summarize(layout, cfg, per_rank, steps)
    return {"row": row, "ranks": per_rank, "cfg": cfg}


def run_sweep(layouts: list[Layout], model: str = "debug", steps: int = 3, seq_len: int = 64,
              batch_per_replica: int = 4, device: str = "cpu", out_csv: str | None = None, log=print,
              measure_memory: bool = True, timeout_s: float = 300.0) -> list[dict]:
    commit, hw = git_commit(), hardware()
    backend = "nccl" if device not in ("cpu",) and _accel() else "gloo"
    rows = []
    for layout in layouts:
        t0 = time.time()
        try:
            res = run_layout_bench(layout, model, steps, seq_len, batch_per_replica, device,
                                   measure_memory=measure_memory, timeout_s=timeout_s)
            row = res["row"]
        except Exception as exc:  # keep sweeping
            row = {"model": model, "world_size": layout.world, "tp": layout.tp, "pp": layout.pp, "dp": layout.dp,
                   "status": f"error: {exc}"[:300]}
            traceback.print_exc()
        row.update(git_commit=commit, hardware=hw, backend=backend)
        rows.append(row)
        tps = row.get("tokens_per_s")
        log(f"[bench] {layout.name():40s} {row['status'][:60]:20s} "
            + (f"{tps:9.0f} tok/s  step {row['step_time_s']:.3f}s  peak {row.get('peak_mem_mb', 0):.1f} MiB"
               if tps else "") + f"  ({time.time() - t0:.1f}s)")
        if out_csv:
            write_csv(rows, out_csv)
    return rows


def _accel() -> bool:
    from .. import device as devices

    return devices.accelerator_available()


def write_csv(rows: list[dict], path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


# ====================================================================== sweeps
def smoke_layouts() -> list[Layout]:
    return [Layout(1), Layout(2, tp=2), Layout(2, pp=2), Layout(4, tp=2, zero=1)]


def full_layouts(world_sizes=(1, 2, 4, 8)) -> list[Layout]:
    out = []
    for w in world_sizes:
        out.append(Layout(w))
        if w >= 2:
            out += [Layout(w, zero=1), Layout(w, tp=2), Layout(w, tp=2, sp=True), Layout(w, pp=2)]
        if w >= 4:
            out += [Layout(w, tp=2, pp=2, zero=1), Layout(w, pp=4, micro_batch=1)]
        if w == 8:
            out += [Layout(w, tp=2, pp=2, zero=1, sp=True)]
    out += [Layout(2, recompute="selective"), Layout(2, recompute="full"), Layout(2, micro_batch=1),
            Layout(2, micro_batch=4)]
    return out


def dump_json(rows, path):
    Path(path).write_text(json.dumps(rows, indent=1, default=str))


__all__ = ["Layout", "run_layout_bench", "run_sweep", "smoke_layouts", "full_layouts", "write_csv", "asdict"]
