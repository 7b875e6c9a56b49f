"""What the straggler detector costs: the same training run with log.straggler_interval=0 and =10, side by side.

    python benchmarks/straggler_overhead.py --nproc 4 --rounds 5 --steps 21 \
        --out benchmarks/results/straggler_overhead_cpu.csv

Runs the real loop (`training.loop.train`) on the demo layout (tiny model, tp=2, pp=2, SP, ZeRO-1, seq 128,
mock tokens) in one set of worker processes; each round trains `--steps` steps with the detector off and
on, in alternating order (a loaded machine drifts; pairing within a round cancels most of it). Loop time
per step is measured between the starts of the first and the last step (a Task.prepare hook stamps the
time), so it contains everything the loop does, the interval's all-gather and report included. Reported:
per round both times and their ratio, then the median ratio over rounds.

On a shared, loaded machine the round-to-round noise is larger than 1%, so the script also computes
the overhead bottom-up, which noise does not move: stopwatch operations per step (counted) x their cost
(timed in a tight loop), plus the interval's all-gather timed after a barrier (so it does not include
waiting for a slower rank, which a step pays anyway), divided by the interval, over the off step time.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_jinpan.parallel.local import free_port, set_worker_env  # noqa: E402

LAYOUT = ["model.name=tiny", "parallel.tp=2", "parallel.pp=2", "parallel.sp=true", "parallel.zero=1",
          "train.global_batch=8", "train.micro_batch=2", "train.seq_len=128", "train.device=cpu", "data.mock=true",
          "log.progress=false", "log.tensorboard=false", "checkpoint.resume=never", "checkpoint.save_on_exit=false",
          "train.eval_interval=0"]


def _worker(rank, world, port, args, out_path):
    set_worker_env(rank, world, port)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    from megatron_jinpan.config import load_config
    from megatron_jinpan.parallel.mesh import ParallelMesh
    from megatron_jinpan.training import straggler
    from megatron_jinpan.training.loop import train
    from megatron_jinpan.training.task import language_model_task

    from megatron_jinpan import device as devices
    from megatron_jinpan.parallel import comm

    ops = [0]
    original_start = devices.Stopwatch.start

    def counted_start(self):
        ops[0] += 1
        return original_start(self)
    devices.Stopwatch.start = counted_start

    cfg0 = load_config(None, LAYOUT)
    mesh = ParallelMesh.create(cfg0.parallel.tp, cfg0.parallel.pp, torch.device("cpu"))
    rows = []
    for r in range(args.rounds):
        modes = (0, args.interval) if r % 2 == 0 else (args.interval, 0)
        times = {}
        for interval in modes:
            cfg = load_config(None, LAYOUT + [f"train.steps={args.steps}", f"log.straggler_interval={interval}",
                                              f"run_dir={args.run_dir}/i{interval}"])
            stamps = []
            task = language_model_task(cfg, mesh)
            task.prepare = lambda mbs, step: (stamps.append(time.perf_counter()), mbs)[1]
            ops[0] = 0
            train(cfg, mesh, task)
            per_step = (stamps[-1] - stamps[1]) / (len(stamps) - 2)  # from step 1: step 0 warms up
            times[interval] = (per_step, ops[0] / args.steps)
        off, on = times[0][0], times[args.interval][0]
        rows.append({"round": r, "order": "off,on" if modes[0] == 0 else "on,off", "step_s_off": off,
                     "step_s_on": on, "ratio_on_off": on / off, "timer_ops_per_step": times[args.interval][1]})
    # Bottom-up: cost of one timed region (start + stop), and of the interval's gather without skew.
    sw = devices.Stopwatch(torch.device("cpu"))
    n = 20000
    t0 = time.perf_counter()
    for _ in range(n):
        sw.stop(original_start(sw))
    op_s = (time.perf_counter() - t0) / n
    gathers = []
    for _ in range(20):
        local = torch.zeros(len(straggler.FIELDS), dtype=torch.float64)
        table = torch.empty(mesh.world_size * len(straggler.FIELDS), dtype=torch.float64)
        mesh.barrier()
        t0 = time.perf_counter()
        comm.all_gather_into_tensor(table, local)
        gathers.append(time.perf_counter() - t0)
    gather_s = statistics.median(gathers)
    for row in rows:
        row["region_cost_us"] = op_s * 1e6
        row["gather_ms"] = gather_s * 1e3
        row["estimated_overhead_pct"] = 100 * (row["timer_ops_per_step"] * 2 * op_s  # x2: wrappers, hooks
                                               + gather_s / args.interval) / row["step_s_off"]
    if mesh.rank == 0:
        torch.save(rows, out_path)
    mesh.destroy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=21)
    ap.add_argument("--interval", type=int, default=10)
    ap.add_argument("--run-dir", default="runs/straggler_overhead")
    ap.add_argument("--out", default="benchmarks/results/straggler_overhead_cpu.csv")
    args = ap.parse_args()
    from megatron_jinpan.perf.metadata import git_commit, hardware

    tmp = Path(args.run_dir)
    tmp.mkdir(parents=True, exist_ok=True)
    out_path = str(tmp / "rows.pt")
    mp.spawn(_worker, args=(args.nproc, free_port(), args, out_path), nprocs=args.nproc, join=True)
    rows = torch.load(out_path)
    median = statistics.median(r["ratio_on_off"] for r in rows)
    summary = {"round": "median", "order": "", "step_s_off": statistics.median(r["step_s_off"] for r in rows),
               "step_s_on": statistics.median(r["step_s_on"] for r in rows), "ratio_on_off": median,
               **{k: statistics.median(r[k] for r in rows)
                  for k in ("timer_ops_per_step", "region_cost_us", "gather_ms", "estimated_overhead_pct")}}
    meta = {"interval": args.interval, "nproc": args.nproc, "steps": args.steps, "layout": "demo (tiny tp2 pp2 sp zero1)",
            "hardware": hardware(), "commit": git_commit()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary) + list(meta))
        writer.writeheader()
        for row in rows + [summary]:
            writer.writerow({**row, **meta})
    for row in rows + [summary]:
        print(f"round {row['round']:>6}: off {row['step_s_off']:.4f} s/step, on {row['step_s_on']:.4f} s/step, "
              f"on/off {row['ratio_on_off']:.4f}; {row['timer_ops_per_step']:.0f} timed regions/step x "
              f"{row['region_cost_us']:.2f} us + gather {row['gather_ms']:.2f} ms/{args.interval} steps "
              f"= {row['estimated_overhead_pct']:.3f}%")
    print(f"detector overhead at interval {args.interval}: measured side by side {100 * (median - 1):+.2f}% "
          f"(median over {len(rows)} rounds), bottom-up {summary['estimated_overhead_pct']:.3f}% -> {args.out}")


if __name__ == "__main__":
    main()
