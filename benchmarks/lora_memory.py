"""Activation memory of LoRA under tensor + sequence parallelism: what one forward saves for backward.

    python benchmarks/lora_memory.py --out benchmarks/results/lora_memory_cpu.csv

Builds the `tiny` model on 2 local gloo processes (tp=2, SP) for: full training, LoRA with
`parallel.tp_comm_overlap` on (the column adapters' autograd function keeps the sequence shard and
re-gathers it in backward) and off (the autograd mappings keep the gathered input), with and without
adapter dropout, and measures the peak bytes of tensors saved for backward during one forward of a
[micro_batch, seq_len] batch (`perf.memory.SavedTensorTracker`, parameters excluded). Also records the
trainable parameters and optimizer-state bytes per rank. Bytes, not time: the figures do not depend on
how loaded the machine is.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

VARIANTS = [
    ("full", ["train.trainable=all"]),
    ("lora_overlap", ["train.trainable=lora", "parallel.tp_comm_overlap=true"]),
    ("lora_no_overlap", ["train.trainable=lora", "parallel.tp_comm_overlap=false"]),
    ("lora_overlap_dropout", ["train.trainable=lora", "parallel.tp_comm_overlap=true", "lora.dropout=0.1"]),
    ("lora_no_overlap_dropout", ["train.trainable=lora", "parallel.tp_comm_overlap=false", "lora.dropout=0.1"]),
]


def _worker(rank, world, port, args, out_path):
    from megatron_jinpan.config import load_config
    from megatron_jinpan.parallel.local import set_worker_env
    from megatron_jinpan.parallel.mesh import ParallelMesh
    from megatron_jinpan.parallel.optimizer import build_optimizer, optimizer_state_bytes
    from megatron_jinpan.parallel.parallelize import build_model
    from megatron_jinpan.perf.memory import SavedTensorTracker, model_param_tensors

    set_worker_env(rank, world, port)
    torch.set_num_threads(1)
    mesh = ParallelMesh.create(2, 1, torch.device("cpu"))
    rows = []
    try:
        for name, overrides in VARIANTS:
            cfg = load_config(None, [f"model.name={args.model}", "parallel.tp=2", "parallel.sp=true",
                                     "train.device=cpu", f"lora.rank={args.rank}", *overrides])
            chunks = build_model(cfg, mesh)
            opt = build_optimizer(chunks, cfg, mesh)
            tokens = torch.randint(0, cfg.model.vocab_size, (args.micro_batch, args.seq_len),
                                   generator=torch.Generator().manual_seed(0))
            tracker = SavedTensorTracker(exclude=model_param_tensors(chunks))
            with tracker:
                out = chunks[0](tokens)
            out.float().pow(2).mean().backward()
            rows.append({"variant": name, "model": args.model, "tp": 2, "sp": True, "micro_batch": args.micro_batch,
                         "seq_len": args.seq_len, "lora_rank": args.rank if "lora" in name else "",
                         "saved_activation_mib": round(tracker.peak_bytes / 2**20, 3),
                         "trainable_params_per_rank": sum(p.numel() for c in chunks for p in c.parameters()
                                                          if p.requires_grad),
                         "optimizer_mib_per_rank": round(optimizer_state_bytes(chunks, cfg, mesh) / 2**20, 3)})
            del chunks, opt, out
    finally:
        mesh.destroy()
    if rank == 0:
        torch.save(rows, out_path)


def main(argv=None) -> int:
    from megatron_jinpan.parallel.local import free_port

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--out", default=None, help="CSV path (default: print only)")
    args = p.parse_args(argv)
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"lora_memory_{os.getpid()}.pt"
    mp.spawn(_worker, args=(2, free_port(), args, str(tmp)), nprocs=2, join=True)
    rows = torch.load(tmp, weights_only=False)
    tmp.unlink()
    for r in rows:
        print(f"{r['variant']:26s} saved activations {r['saved_activation_mib']:9.3f} MiB   trainable/rank "
              f"{r['trainable_params_per_rank']:>10,d}   optimizer/rank {r['optimizer_mib_per_rank']:8.3f} MiB")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
