"""How much data-parallel gradient communication is hidden behind backward.

Runs the real engine (build_model -> DataParallel buckets -> forward_backward)
on `--nproc` local processes and times one optimizer step's
forward + backward + gradient reduction (`finish_grad_sync`) with
`parallel.overlap_grad_reduce` on and off, plus the same forward + backward
with no reduction at all (compute only). Then

    exposed_comm(mode) = t(mode) - t(compute only)
    hidden_fraction    = (t(off) - t(on)) / exposed_comm(off)

i.e. the share of the (non-overlapped) communication time that overlapping
removes from the step. The modes run interleaved, iteration by iteration;
`hidden_fraction` uses each mode's fastest iteration and
`hidden_fraction_paired_median` the median over iterations of the same
ratio computed within one iteration (robust to a shared, loaded machine).
`hidden_fraction_wait` = 1 - wait(on) / wait(off), where wait is the median
time blocked in `finish_grad_sync()` after backward (the exposed part of the
communication; the least noisy of the three on a busy machine).
At most the backward time after the first bucket fills can hide
communication, so a link slower than backward caps the fraction below 1.

On CPU, gloo over loopback is nearly free compared with the backward, so the
benchmark injects a slow link (`--link-gbps`, default 2 Gbit/s): each async
collective launched through `megatron_jinpan.parallel.comm` is wrapped so
that its `wait()` also waits for a modelled serial link that transfers the
op's bytes at that bandwidth, starting when the op is launched or when the
link is free (whichever is later). The real gloo collective still runs, so
results stay correct. On a GPU (`--device auto`, nccl) use `--link-gbps 0`
to measure the real link.

`hidden_bound` is the most any bucketing could hide in that run: the link
cannot start before the first bucket exists, and the last bucket (the token
embedding, whose gradient is the last op of backward) cannot start before
backward ends -- in `tiny` the embedding is 16% of all gradient bytes, which
caps the hidden share near 84% whatever the engine does. `--layers N` runs the
same model deeper (a smaller embedding share, as in LLaMA-7B's 2%).

Exact command used for benchmarks/results/overlap_cpu.csv:

    python benchmarks/overlap.py --model tiny --nproc 2 --seq-len 256 --bucket-mb 4 \
        --link-gbps 2 --iters 12 --out benchmarks/results/overlap_cpu.csv
    (and the same with --zero 1, with --link-gbps 8, and with --layers 32; rows carry commit and load)
    and with --sparse-embedding-grad (parallel.sparse_embedding_grad=true: the embedding's reduction
    carries only the rows some rank's step touched -- here 2 x 256 tokens of an 8000-row vocabulary --
    so the last bucket shrinks to what the step used; `embedding_rows_reduced` says how many)
    and with --grad-reduce-dtype bf16 (parallel.grad_reduce_dtype=bf16: each bucket goes on the link
    as bf16, half the bytes; accumulation stays fp32)
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


# ------------------------------------------------------------------ slow link
class _LinkWork:
    def __init__(self, work, done_at: float):
        self.work, self.done_at = work, done_at

    def wait(self, *args, **kwargs):
        if self.work is not None:
            self.work.wait()
        delay = self.done_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        return True


class SlowLink:
    """A serial link of `gbps` Gbit/s under comm.all_reduce / comm.reduce_scatter_tensor (async calls)."""

    def __init__(self, gbps: float):
        self.bytes_per_s = gbps * 1e9 / 8
        self.busy_until = 0.0
        self.modelled_s = 0.0
        self.transfers: list[tuple[float, float]] = []  # (launch time, modelled seconds) per async op

    def reset(self):
        self.busy_until, self.modelled_s, self.transfers = 0.0, 0.0, []

    def install(self):
        from megatron_jinpan.parallel import comm

        real_all_reduce, real_rs = comm.all_reduce, comm.reduce_scatter_tensor

        def delayed(nbytes, work):
            now = time.perf_counter()
            start = max(now, self.busy_until)
            self.busy_until = start + nbytes / self.bytes_per_s
            self.modelled_s += nbytes / self.bytes_per_s
            self.transfers.append((now, nbytes / self.bytes_per_s))
            return _LinkWork(work, self.busy_until)

        def all_reduce(tensor, group=None, op=None, async_op=False):
            kwargs = {} if op is None else {"op": op}
            work = real_all_reduce(tensor, group, async_op=async_op, **kwargs)
            if not async_op:
                return work
            # ring all-reduce moves ~2x the payload per rank
            return delayed(2 * tensor.numel() * tensor.element_size(), work)

        def reduce_scatter_tensor(output, tensor, group=None, op=None, async_op=False):
            kwargs = {} if op is None else {"op": op}
            work = real_rs(output, tensor, group, async_op=async_op, **kwargs)
            if not async_op:
                return work
            return delayed(tensor.numel() * tensor.element_size(), work)

        comm.all_reduce, comm.reduce_scatter_tensor = all_reduce, reduce_scatter_tensor


def _hidden_bound(transfers, backward_end: float) -> float:
    """The largest share of the modelled link time any overlap could hide in this iteration.

    The serial link can only start once the first bucket is launched, and the
    last bucket (launched when the last gradient -- the token embedding's --
    exists) can only start at backward's end. So at best
        exposed >= max(last bucket's transfer, total - (backward_end - first launch))
    of the total transfer time. The measured hidden_fraction_wait is compared with this.
    """
    total = sum(d for _, d in transfers)
    first = transfers[0][0]
    last = transfers[-1][1]
    exposed = max(last, total - max(0.0, backward_end - first))
    return 1.0 - exposed / total if total > 0 else float("nan")


# ------------------------------------------------------------------ worker

def _overrides(args, overlap: bool) -> list[str]:
    layers = [f"model.num_layers={args.layers}"] if args.layers else []
    return [f"model.name={args.model}", *layers, "data.mock=true", f"train.seq_len={args.seq_len}", "train.micro_batch=1",
            f"train.global_batch={args.nproc}", f"train.device={args.device}", f"parallel.bucket_mb={args.bucket_mb}",
            f"parallel.zero={args.zero}", f"parallel.overlap_grad_reduce={str(overlap).lower()}",
            f"parallel.sparse_embedding_grad={str(args.sparse_embedding_grad).lower()}",
            f"parallel.grad_reduce_dtype={args.grad_reduce_dtype}",
            "log.progress=false", "log.tensorboard=false", "run_dir=/tmp/jinpan_overlap_bench"]


def _worker(rank, args, port, out_path):
    set_worker_env(rank, args.nproc, port)
    torch.set_num_threads(args.threads)
    from megatron_jinpan import device as devices
    from megatron_jinpan.config import load_config
    from megatron_jinpan.data import build_train_data
    from megatron_jinpan.parallel.mesh import ParallelMesh
    from megatron_jinpan.parallel.parallelize import build_model
    from megatron_jinpan.training.losses import language_model_loss
    from megatron_jinpan.training.schedules import forward_backward

    link = SlowLink(args.link_gbps) if args.link_gbps > 0 else None
    if link:
        link.install()
    device = devices.resolve_device(args.device)
    mesh = ParallelMesh.create(1, 1, device)
    setups = {}
    for overlap in (False, True):
        cfg = load_config(None, _overrides(args, overlap=overlap))
        (chunk,) = build_model(cfg, mesh)
        mbs = [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in mb.items()}
               for mb in build_train_data(cfg).microbatches(0, mesh.dp_rank, mesh.dp)]
        setups[overlap] = (chunk, mbs, language_model_loss(cfg.model.vocab_size, mesh))
    modes = {"compute_only": False, "overlap_off": False, "overlap_on": True}
    times = {m: [] for m in modes}
    modelled = {m: [] for m in modes}
    waits = {m: [] for m in modes}  # time blocked in finish_grad_sync after backward: the exposed communication
    bounds = []  # per overlap_on iteration: the most any bucketing could hide given when gradients appeared
    # Modes are interleaved iteration by iteration so background load hits them alike.
    for it in range(args.warmup + args.iters):
        for mode, overlap in modes.items():
            chunk, mbs, loss_fn = setups[overlap]
            chunk.zero_grad_buffer()
            mesh.barrier()
            if link:
                link.reset()
            devices.synchronize(device)
            t0 = time.perf_counter()
            if mode == "compute_only":
                with chunk.no_sync():
                    forward_backward([chunk], mbs, loss_fn, mesh, loss_scale=1e-3)
            else:
                forward_backward([chunk], mbs, loss_fn, mesh, loss_scale=1e-3)
                t_sync = time.perf_counter()
                chunk.finish_grad_sync()
            devices.synchronize(device)
            if it >= args.warmup:
                times[mode].append(time.perf_counter() - t0)
                waits[mode].append(time.perf_counter() - t_sync if mode != "compute_only" else 0.0)
                modelled[mode].append(link.modelled_s if link else 0.0)
                if mode == "overlap_on" and link and link.transfers:
                    bounds.append(_hidden_bound(link.transfers, t_sync))
    chunk = setups[True][0]
    # Paired per iteration (the three modes ran back to back): robust to slow drifts in background load.
    paired = [(off - on) / (off - c) for c, off, on in
              zip(times["compute_only"], times["overlap_off"], times["overlap_on"]) if off > c]
    rows = [{"mode": m, "time_s": min(times[m]), "median_s": statistics.median(times[m]),
             "paired_hidden": statistics.median(paired) if paired else float("nan"),
             "sync_wait_s": statistics.median(waits[m]),
             "modelled_link_s": statistics.median(modelled[m]), "buckets": len(chunk.buckets),
             "hidden_bound": statistics.median(bounds) if bounds else float("nan"),
             "last_bucket_mb": chunk.buckets[-1].numel * 4 / 2**20,
             "embedding_rows_reduced": chunk.embedding_rows_reduced,
             "grad_mb": chunk.numel * 4 / 2**20} for m in modes]
    if rank == 0:
        torch.save(rows, out_path)
    mesh.barrier()
    mesh.destroy()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--layers", type=int, default=0, help="override model.num_layers (0: the model's own)")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--bucket-mb", type=float, default=4.0)
    ap.add_argument("--zero", type=int, default=0)
    ap.add_argument("--link-gbps", type=float, default=2.0, help="injected link bandwidth; 0 = the real link only")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--sparse-embedding-grad", action="store_true",
                    help="parallel.sparse_embedding_grad=true: reduce only the embedding rows the step touched")
    ap.add_argument("--grad-reduce-dtype", choices=("fp32", "bf16"), default="fp32",
                    help="parallel.grad_reduce_dtype: bf16 puts half the gradient bytes on the (modelled) link")
    ap.add_argument("--out", default="benchmarks/results/overlap_cpu.csv")
    args = ap.parse_args(argv)

    out_pt = f"/tmp/jinpan_overlap_{os.getpid()}.pt"
    mp.spawn(_worker, args=(args, free_port(), out_pt), nprocs=args.nproc, join=True)
    rows = {r["mode"]: r for r in torch.load(out_pt)}
    os.remove(out_pt)
    # min over iterations: the least-disturbed sample of each mode (the machine may be shared)
    t_c, t_off, t_on = (rows[m]["time_s"] for m in ("compute_only", "overlap_off", "overlap_on"))
    exposed_off, exposed_on = t_off - t_c, t_on - t_c
    hidden = (t_off - t_on) / exposed_off if exposed_off > 0 else float("nan")
    from megatron_jinpan.perf.metadata import git_commit, hardware

    record = {"model": args.model + (f"-L{args.layers}" if args.layers else ""), "nproc": args.nproc, "seq_len": args.seq_len, "zero": args.zero,
              "bucket_mb": args.bucket_mb, "buckets": rows["overlap_on"]["buckets"],
              "grad_mb": round(rows["overlap_on"]["grad_mb"], 2), "link_gbps": args.link_gbps,
              "modelled_link_s": round(rows["overlap_off"]["modelled_link_s"], 4),
              "compute_only_s": round(t_c, 4), "overlap_off_s": round(t_off, 4), "overlap_on_s": round(t_on, 4),
              "exposed_comm_off_s": round(exposed_off, 4), "exposed_comm_on_s": round(exposed_on, 4),
              "hidden_fraction": round(hidden, 3),
              "hidden_fraction_paired_median": round(rows["overlap_on"]["paired_hidden"], 3),
              "sync_wait_off_s": round(rows["overlap_off"]["sync_wait_s"], 4),
              "sync_wait_on_s": round(rows["overlap_on"]["sync_wait_s"], 4),
              "hidden_fraction_wait": round(1 - rows["overlap_on"]["sync_wait_s"] / rows["overlap_off"]["sync_wait_s"], 3),
              "hidden_bound": round(rows["overlap_on"]["hidden_bound"], 3),
              "last_bucket_mb": round(rows["overlap_on"]["last_bucket_mb"], 2),
              "sparse_embedding_grad": args.sparse_embedding_grad,
              "embedding_rows_reduced": rows["overlap_on"]["embedding_rows_reduced"],
              "grad_reduce_dtype": args.grad_reduce_dtype,
              "median_compute_only_s": round(rows["compute_only"]["median_s"], 4),
              "median_overlap_off_s": round(rows["overlap_off"]["median_s"], 4),
              "median_overlap_on_s": round(rows["overlap_on"]["median_s"], 4),
              "hardware": hardware(), "commit": git_commit(), "load_avg_1m": round(os.getloadavg()[0], 2),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for key, value in record.items():
        print(f"{key:>20}: {value}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    old = list(csv.DictReader(out.open())) if out.exists() else []
    fields = list(record) + [k for k in (old[0] if old else {}) if k not in record]  # older rows keep their columns
    with out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(old + [record])
    return record


if __name__ == "__main__":
    main()
