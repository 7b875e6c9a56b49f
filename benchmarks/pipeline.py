"""Pipeline schedule benchmark on CPU/gloo: step time, bubble fraction, activation memory per stage.

    python benchmarks/pipeline.py --pp 4 --microbatches 8 --schedule 1f1b
    python benchmarks/pipeline.py --pp 2 --microbatches 8 --virtual-stages 2 --schedule interleaved
    python benchmarks/pipeline.py --sweep          # the table in the report -> benchmarks/results/pipeline_cpu.csv
    python benchmarks/pipeline.py --pp 2 --microbatches 4 --model debug   # a real (tiny) Llama instead

Runs the real `forward_backward` (megatron_jinpan/training/schedules.py) on
`pp` local gloo processes. By default every stage is *synthetic* compute: a
forward that sleeps `--forward-ms / virtual_stages` and a backward that
sleeps twice that, so timings are stable on a 2-core machine and the
measured bubble can be compared with the theory; the stage-to-stage
tensors are real ([micro_batch, seq, hidden] fp32 through
`comm.batch_isend_irecv`). With `--model debug|tiny` the stages are the
real Llama chunks from `build_model` (CPU contention then blurs timings).

Per stage (pp rank) it reports:
- step time: wall time of `forward_backward` from a common start until the
  last stage is done (slowest rank per step; median over `--steps`);
- measured bubble: 1 - (this stage's time inside forward/backward compute) / step time,
  from the schedule's timestamps (`trace["events"]`), against the theory
  (p-1)/(m*v+p-1);
- peak activation memory: the most micro-batches alive awaiting backward
  (`trace["max_live"]`) x bytes of one stage-boundary tensor (what the
  schedule keeps per micro-batch at the stage boundary; the layers' own
  saved tensors scale with the same count).
Rows are appended to benchmarks/results/pipeline_cpu.csv.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from megatron_jinpan.parallel.local import free_port, set_worker_env

RESULTS = Path(__file__).resolve().parent / "results" / "pipeline_cpu.csv"
FIELDS = ["schedule", "pp", "microbatches", "virtual_stages", "mode", "pp_rank", "step_time_s", "busy_s",
          "bubble_measured", "bubble_theory", "max_live", "activation_bytes", "peak_activation_mb"]


class _Sleep(torch.autograd.Function):
    """Identity whose forward takes `fwd_s` and backward `2 * fwd_s` seconds."""

    @staticmethod
    def forward(ctx, x, fwd_s):
        ctx.fwd_s = fwd_s
        time.sleep(fwd_s)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(2 * ctx.fwd_s)
        return grad, None


class SyntheticStage(nn.Module):
    """A pipeline chunk with a fixed compute time: embedding on the first stage, head on the last."""

    def __init__(self, first: bool, last: bool, hidden: int, vocab: int, fwd_s: float):
        super().__init__()
        self.cfg = SimpleNamespace(hidden_size=hidden)
        self.embed = nn.Embedding(vocab, hidden) if first else None
        self.scale = nn.Parameter(torch.ones(hidden))
        self.head = nn.Linear(hidden, vocab, bias=False) if last else None
        self.fwd_s = fwd_s

    def forward(self, x, position_ids=None, cu_seqlens=None):
        h = self.embed(x) if self.embed is not None else x
        h = _Sleep.apply(h * self.scale, self.fwd_s)
        return self.head(h) if self.head is not None else h


def _synthetic_loss(output, mb):
    loss = F.cross_entropy(output.float().reshape(-1, output.shape[-1]), mb["labels"].reshape(-1), reduction="sum")
    return loss, {"tokens": torch.tensor(float(mb["labels"].numel()))}


def _worker(rank, args, port, out_path):
    set_worker_env(rank, args.pp, port)
    torch.set_num_threads(1)
    from megatron_jinpan.parallel import comm
    from megatron_jinpan.parallel.mesh import ParallelMesh
    from megatron_jinpan.training.schedules import forward_backward

    mesh = ParallelMesh.create(tp=1, pp=args.pp, device=torch.device("cpu"))
    v, m, b, s = args.virtual_stages, args.microbatches, args.micro_batch, args.seq_len
    if args.model:
        from megatron_jinpan.config import load_config
        from megatron_jinpan.parallel.parallelize import build_model
        from megatron_jinpan.training.losses import language_model_loss

        overrides = [f"model.name={args.model}", "train.device=cpu", f"parallel.pp={args.pp}",
                     f"parallel.pp_schedule={args.schedule}", f"parallel.virtual_stages={v}",
                     f"train.seq_len={s}", "run_dir=/tmp/jinpan_pipeline_bench"]
        cfg = load_config(None, overrides)
        chunks = build_model(cfg, mesh)
        vocab = cfg.model.vocab_size
        loss_fn = language_model_loss(vocab, mesh)
    else:
        vocab, stages = 128, args.pp * v
        chunks = [SyntheticStage(st == 0, st == stages - 1, args.hidden, vocab, args.forward_ms / 1000 / v)
                  for st in (c * args.pp + mesh.pp_rank for c in range(v))]
        loss_fn = _synthetic_loss
    gen = torch.Generator().manual_seed(0)
    mbs = []
    for _ in range(m):
        tokens = torch.randint(0, vocab, (b, s + 1), generator=gen)
        mbs.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(b, s),
                    "position_ids": torch.arange(s).expand(b, s)})
    rows = []
    for step in range(args.warmup + args.steps):
        trace = {}
        comm.all_gather_object(None)  # line the stages up
        t0 = time.perf_counter()
        forward_backward(chunks, mbs, loss_fn, mesh, schedule=args.schedule, loss_scale=1.0 / (m * b * s),
                         trace=trace)
        total = time.perf_counter() - t0
        for chunk in chunks:  # real chunks are DataParallel-wrapped: close the step's gradient sync
            if hasattr(chunk, "finish_grad_sync"):
                chunk.finish_grad_sync()
                chunk.zero_grad_buffer()
        busy = sum(e[4] - e[3] for e in trace["events"])
        if step >= args.warmup:
            rows.append((total, busy, trace["max_live"], trace["activation_bytes"]))
    # The pipeline's step ends when its last stage does: per step, the slowest rank's time.
    totals = comm.all_gather_object([r[0] for r in rows])
    step_times = [max(ts) for ts in zip(*totals)]
    step_time = statistics.median(step_times)
    busy = statistics.median(r[1] for r in rows)
    max_live, act_bytes = rows[-1][2], rows[-1][3]
    mine = {"schedule": args.schedule, "pp": args.pp, "microbatches": m, "virtual_stages": v,
            "mode": args.model or "synthetic", "pp_rank": mesh.pp_rank, "step_time_s": round(step_time, 4),
            "busy_s": round(busy, 4), "bubble_measured": round(1 - busy / step_time, 4),
            "bubble_theory": round((args.pp - 1) / (m * v + args.pp - 1), 4), "max_live": max_live,
            "activation_bytes": act_bytes, "peak_activation_mb": round(max_live * act_bytes / 2**20, 3)}
    everyone = comm.all_gather_object(mine)
    if rank == 0:
        torch.save(everyone, out_path)
    mesh.destroy()


def run(args) -> list[dict]:
    out_path = f"/tmp/jinpan_pipeline_bench_{os.getpid()}.pt"
    mp.spawn(_worker, args=(args, free_port(), out_path), nprocs=args.pp, join=True)
    rows = torch.load(out_path, weights_only=False)
    os.remove(out_path)
    return rows


def report(rows: list[dict]) -> None:
    r0 = rows[0]
    print(f"\n{r0['schedule']} pp={r0['pp']} m={r0['microbatches']} v={r0['virtual_stages']} ({r0['mode']}): "
          f"step {r0['step_time_s']:.3f}s, bubble measured "
          f"{statistics.mean(r['bubble_measured'] for r in rows):.3f} (mean over stages) "
          f"vs theory {r0['bubble_theory']:.3f}")
    print(f"  {'stage':>5} {'step_s':>8} {'busy_s':>8} {'bubble':>7} {'theory':>7} {'live':>5} {'act_MB':>8}")
    for r in rows:
        print(f"  {r['pp_rank']:>5} {r['step_time_s']:>8.3f} {r['busy_s']:>8.3f} {r['bubble_measured']:>7.3f} "
              f"{r['bubble_theory']:>7.3f} {r['max_live']:>5} {r['peak_activation_mb']:>8.3f}")


def write_csv(rows: list[dict]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    new = not RESULTS.exists()
    with open(RESULTS, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


SWEEP = [  # (schedule, pp, microbatches, virtual_stages)
    ("gpipe", 4, 8, 1), ("1f1b", 4, 4, 1), ("1f1b", 4, 8, 1), ("1f1b", 4, 16, 1), ("interleaved", 4, 8, 2),
    ("1f1b", 2, 8, 1), ("interleaved", 2, 8, 2), ("interleaved", 2, 8, 4),
]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pp", type=int, default=4)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--virtual-stages", type=int, default=1)
    p.add_argument("--schedule", default=None, choices=["gpipe", "1f1b", "interleaved"],
                   help="default: interleaved when --virtual-stages > 1, else 1f1b")
    p.add_argument("--forward-ms", type=float, default=20.0, help="synthetic forward time per stage (backward 2x)")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256, help="synthetic stage width")
    p.add_argument("--model", default=None, help="use a real registry model (debug, tiny) instead of sleeps")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--sweep", action="store_true", help="run the standard table")
    p.add_argument("--no-csv", action="store_true")
    args = p.parse_args(argv)
    configs = SWEEP if args.sweep else [(args.schedule or ("interleaved" if args.virtual_stages > 1 else "1f1b"),
                                         args.pp, args.microbatches, args.virtual_stages)]
    for schedule, pp, m, v in configs:
        run_args = argparse.Namespace(**{**vars(args), "schedule": schedule, "pp": pp, "microbatches": m,
                                         "virtual_stages": v})
        rows = run(run_args)
        report(rows)
        if not args.no_csv:
            write_csv(rows)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
