"""α-β projection of step time and weak-scaling efficiency from 8 to 640 GPUs, and its CPU validation.

    from megatron_jinpan.perf.projection import CLUSTERS, Projector, run_projection
    best = Projector(CLUSTERS["h100"], "llama-7b").best(640)      # best layout at 640 GPUs
    run_projection("benchmarks/results")                          # CSV + Markdown + PNG

Per GPU and optimizer step (weak scaling: each GPU owns `per_gpu_batch`
sequences of `seq_len` tokens whatever N; a model replica = tp·pp GPUs):

  compute    T_c = F_tok · tokens_per_gpu / (peak · MFU)   (F_tok = LlamaConfig.flops_per_token,
             × (1 + 1/3 of the dense part) with full recompute, + the attention-core forward with selective)
  TP         per micro-batch and local layer, the engine's collectives (comm_model: 4 all-reduces of
             [b,s,h] bf16, or the SP all-gathers/reduce-scatters) on NVLink; the c backward input-grad
             collectives are hidden behind weight-grad GEMMs by the `tp_overlap` share (tp_comm_overlap)
  PP         1F1B: T_pipe = (T_c + T_tp + T_p2p) · (m·v + p - 1)/(m·v)    (bubble (p-1)/(m·v+p-1));
             p2p of [b,s,h] forward and backward per micro-batch on NVLink or IB
  DP         gradient buckets (bucket_mb; fp32, or bf16 with grad_reduce_dtype): ring all-reduce (zero=0) or reduce-scatter +
             all-gather (zero=1), hierarchical across nodes; only the backward of the LAST micro-batch
             can hide the reduce-scatter/all-reduce (gradient accumulation), and only the forward of the
             first one the ZeRO all-gather: exposed = T - min(f·T, window), f = DP overlap fraction
  optimizer  memory-bound: 40 bytes per (local) optimizer parameter at HBM bandwidth
  memory     estimate_memory(...) ≤ 0.9 · device memory - 2 GiB

The best layout per N maximises tokens/s/GPU; weak-scaling efficiency is
tokens/s/GPU(N) / tokens/s/GPU(8) (both at their best layout).
"""
from __future__ import annotations

import csv
import glob
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .comm_model import (COLUMN_INPUTS_PER_LAYER, ROW_LINEARS_PER_LAYER, Cluster, Link, collective_time,
                         expected_comm_bytes, group_placement, p2p_link)

GB = 1e9

# Presets. Bandwidths are per GPU and per direction, derated to what collectives achieve in practice
# (NCCL bus bandwidth ≈ 80% of the link). A800: NVLink 400 GB/s bidirectional -> 200 per direction;
# 4×200 Gb/s HDR IB per 8-GPU node = 100 GB/s per node = 12.5 GB/s per GPU. H100 SXM: NVLink 900 GB/s
# bidirectional -> 450 per direction; 8×400 Gb/s NDR = 400 GB/s per node = 50 GB/s per GPU.
CLUSTERS = {
    "a800": Cluster("8xA800-80GB, 4x200Gb/s IB", 8, Link(5e-6, 0.8 * 200 * GB), Link(10e-6, 0.8 * 12.5 * GB),
                    peak_tflops=312.0, mem_gb=80.0, hbm_gbps=2039.0),
    "h100": Cluster("8xH100-80GB, 8x400Gb/s IB", 8, Link(5e-6, 0.8 * 450 * GB), Link(10e-6, 0.8 * 50 * GB),
                    peak_tflops=989.0, mem_gb=80.0, hbm_gbps=3350.0),
}
# The measured single-device figure: 4 LLaMA-7B layers, eager + SDPA, bf16 on H100: 566 TFLOP/s.
DEFAULT_MFU = 566.0 / 989.0
DEFAULT_OVERLAP = 0.8          # DP overlap fraction when no overlap measurement exists (assumption)
DEFAULT_TP_OVERLAP = 0.5       # share of backward TP input-grad collectives hidden (tp_comm_overlap)
OPT_BYTES_PER_PARAM = 40.0     # AdamW + clip: read/write master, m, v, read grad (fp32), foreach temporaries
RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


@dataclass(frozen=True)
class Plan:
    tp: int
    pp: int
    dp: int
    micro_batch: int
    zero: int
    recompute: str
    sp: bool
    vs: int = 1

    def label(self) -> str:
        return (f"tp{self.tp} pp{self.pp}{'' if self.vs == 1 else f'x{self.vs}'} dp{self.dp} mb{self.micro_batch} "
                f"z{self.zero} {self.recompute}{' sp' if self.sp else ''}")


def measured_inputs(results_dir: Path = RESULTS) -> dict:
    """Single-device MFU from GPU benchmark CSVs (CPU files ignored) and the DP overlap fraction: from a
    GPU overlap CSV when present, else the CPU gloo measurement (`cpu_overlap_measurement`)."""
    out = {}
    for path in sorted(glob.glob(str(Path(results_dir) / "throughput*.csv"))):
        if "cpu" in Path(path).name.lower():
            continue
        with open(path) as f:
            vals = [float(r["mfu"]) for r in csv.DictReader(f) if r.get("mfu") not in (None, "", "None")]
        if vals:
            out["mfu"], out["mfu_source"] = max(vals), path
    for path in sorted(glob.glob(str(Path(results_dir) / "overlap*.csv"))):
        if "cpu" in Path(path).name.lower():
            continue
        with open(path) as f:
            vals = [float(r["hidden_fraction"]) for r in csv.DictReader(f)
                    if r.get("hidden_fraction") not in (None, "", "None")]
        if vals:
            out["overlap"], out["overlap_source"] = max(0.0, min(1.0, sum(vals) / len(vals))), path
    if "overlap" not in out:
        out.update(cpu_overlap_measurement(Path(results_dir) / "overlap_cpu.csv"))
    return out


def cpu_overlap_measurement(path: Path) -> dict:
    """DP overlap fraction measured by benchmarks/overlap.py on CPU gloo (no GPU measurement yet).

    The reference rows: `tiny` on 2 processes with the injected 2 Gbit/s link, dense embedding
    reduction; the latest row of each
    of zero=0 and zero=1, `hidden_fraction_wait` (share of the gradient communication no longer
    waited for after backward); their mean. Empty when the file has no such rows.
    """
    if not path.exists():
        return {}
    latest = {}
    with open(path) as f:
        for r in csv.DictReader(f):
            # dense embedding reduction only: at 7B/13B batch sizes a step touches most of the vocabulary,
            # so parallel.sparse_embedding_grad falls back to dense there
            if (r.get("model") == "tiny" and r.get("nproc") == "2" and r.get("link_gbps") in ("2.0", "2")
                    and r.get("sparse_embedding_grad", "") in ("", "False", "false")
                    and r.get("grad_reduce_dtype", "") in ("", "fp32")  # the projection sends fp32 gradients
                    and r.get("hidden_fraction_wait") not in (None, "", "nan")):
                latest[r["zero"]] = float(r["hidden_fraction_wait"])
    if not latest:
        return {}
    value = max(0.0, min(1.0, sum(latest.values()) / len(latest)))
    detail = ", ".join(f"zero={z}: {v:.3f}" for z, v in sorted(latest.items()))
    shown = os.path.relpath(path) if str(path).startswith(os.getcwd()) else str(path)
    return {"overlap": value, "overlap_source": f"{shown} (CPU gloo, 2 Gbit/s injected link, {detail})"}


class Projector:
    def __init__(self, cluster: Cluster, model: str, seq_len: int = 2048, per_gpu_batch: float = 4,
                 mfu: float | None = None, overlap: float | None = None, tp_overlap: float = DEFAULT_TP_OVERLAP,
                 bucket_mb: float = 25.0, act_bytes: int = 2, overlap_param_gather: bool = True,
                 grad_reduce_dtype: str = "fp32"):
        from ..models.config import get_model_config

        self.cluster, self.model_name = cluster, model
        self.m = get_model_config(model)
        self.seq, self.per_gpu_batch = seq_len, per_gpu_batch
        meas = measured_inputs()
        self.mfu = mfu if mfu is not None else meas.get("mfu", DEFAULT_MFU)
        self.overlap = overlap if overlap is not None else meas.get("overlap", DEFAULT_OVERLAP)
        self.tp_overlap, self.bucket_mb, self.act = tp_overlap, bucket_mb, act_bytes
        self.overlap_param_gather = overlap_param_gather
        self.grad_reduce_dtype = grad_reduce_dtype  # parallel.grad_reduce_dtype: bytes per gradient element on the wire

    # ------------------------------------------------------------ one layout
    def config(self, n: int, plan: Plan):
        from ..config import load_config

        gb = int(round(self.per_gpu_batch * n))  # sequences per step: per_gpu_batch per GPU (weak scaling)
        ov = [f"model.name={self.model_name}", f"train.seq_len={self.seq}", f"train.global_batch={gb}",
              f"train.micro_batch={plan.micro_batch}", f"train.recompute={plan.recompute}", "train.dtype=bf16",
              f"parallel.tp={plan.tp}", f"parallel.pp={plan.pp}", f"parallel.zero={plan.zero}",
              f"parallel.sp={str(plan.sp).lower()}", f"parallel.bucket_mb={self.bucket_mb}",
              f"parallel.grad_reduce_dtype={self.grad_reduce_dtype}",
              "kernels.attention=flash_attn"]
        if plan.vs > 1:
            ov += ["parallel.pp_schedule=interleaved", f"parallel.virtual_stages={plan.vs}"]
        return load_config(None, ov)

    def step(self, n: int, plan: Plan, with_memory: bool = True) -> dict:
        from .memory import estimate_memory

        c, m = self.cluster, self.m
        tp, pp, dp, b = plan.tp, plan.pp, plan.dp, plan.micro_batch
        seqs_per_replica = self.per_gpu_batch * tp * pp
        n_micro = seqs_per_replica / b
        tokens_gpu = self.per_gpu_batch * self.seq
        rate = c.peak_tflops * 1e12 * self.mfu
        f_tok = m.flops_per_token(self.seq)
        attn = 12 * m.num_layers * m.hidden_size * self.seq / 2
        extra = {"none": 0.0, "selective": attn / 3, "full": (f_tok - attn) / 3 + attn / 3}[plan.recompute]
        t_c = (f_tok + extra) * tokens_gpu / rate
        t_c_mb = t_c / n_micro  # one micro-batch on one stage
        # TP: the engine's collectives per micro-batch and local layer
        layers = m.num_layers / pp
        bsh = b * self.seq * m.hidden_size * self.act
        cl, rl = COLUMN_INPUTS_PER_LAYER, ROW_LINEARS_PER_LAYER
        t_tp = 0.0
        if tp > 1:
            if plan.sp:
                ag = collective_time("all_gather", bsh, tp, 1, c)
                rs = collective_time("reduce_scatter", bsh, tp, 1, c)
                fwd = cl * ag + rl * rs
                bwd = (cl + rl) * ag + cl * rs
                hidden = cl * (ag + rs) * self.tp_overlap  # re-gathers and input-grad RS overlap weight grads
            else:
                ar = collective_time("all_reduce", bsh, tp, 1, c)
                fwd, bwd = rl * ar, cl * ar
                hidden = cl * ar * self.tp_overlap
            t_tp = n_micro * layers * (fwd + bwd - hidden)
            t_tp += n_micro * 2 * collective_time("all_reduce", bsh, tp, 1, c)  # embedding + LM head
        # PP: p2p of activations/grads per micro-batch, neighbours tp*dp ranks apart
        t_p2p = 0.0
        if pp > 1:
            msg = b * (self.seq // tp if plan.sp else self.seq) * m.hidden_size * self.act
            t_p2p = 2 * n_micro * plan.vs * p2p_link(tp * dp, c).p2p(msg)
        ideal = t_c + t_tp + t_p2p
        bubble = (pp - 1) / (n_micro * plan.vs + pp - 1) if pp > 1 else 0.0
        t_pipe = ideal / (1 - bubble)
        # DP: fp32 gradient buckets
        cfg = self.config(n, plan)
        from .comm_model import bucket_numels, chunk_param_numels, grad_wire_bytes

        local = 0
        n_buckets = 0
        worst = 0
        for r in range(pp):
            chunks = chunk_param_numels(m, tp, pp, r, plan.vs, None)
            numels = [x for ch in chunks for x in bucket_numels(ch, dp, self.bucket_mb)]
            if sum(numels) > worst:
                worst, n_buckets = sum(numels), len(numels)
        local = worst
        t_dp_red = t_dp_ag = 0.0
        if dp > 1:
            grads = local * grad_wire_bytes(self.grad_reduce_dtype) / n_buckets  # per bucket, on the wire
            weights = local * 4 / n_buckets  # fp32 weights, all-gathered after a ZeRO-1 step
            if plan.zero == 1:
                t_dp_red = n_buckets * collective_time("reduce_scatter", grads, dp, tp, c)
                t_dp_ag = n_buckets * collective_time("all_gather", weights, dp, tp, c)
            else:
                t_dp_red = n_buckets * collective_time("all_reduce", grads, dp, tp, c)
        window_bwd = t_c_mb * (2 / 3 + (extra / (f_tok + extra)))
        window_fwd = t_c_mb / 3 if self.overlap_param_gather else 0.0
        exp_red = t_dp_red - min(self.overlap * t_dp_red, window_bwd)
        exp_ag = t_dp_ag - min(self.overlap * t_dp_ag, window_fwd)
        opt_params = local / (dp if plan.zero == 1 else 1)
        t_opt = opt_params * OPT_BYTES_PER_PARAM / (c.hbm_gbps * GB)
        total = t_pipe + exp_red + exp_ag + t_opt
        row = {
            "cluster": c.name, "model": self.model_name, "gpus": n, "nodes": math.ceil(n / c.gpus_per_node),
            "layout": plan.label(), "tp": tp, "pp": pp, "vs": plan.vs, "dp": dp, "micro_batch": b,
            "microbatches": n_micro, "zero": plan.zero, "recompute": plan.recompute, "sp": plan.sp,
            "global_batch_seqs": cfg.train.global_batch, "step_time_s": total, "compute_s": t_c,
            "tp_comm_s": t_tp, "pp_p2p_s": t_p2p, "bubble_s": t_pipe - ideal, "dp_comm_s": t_dp_red + t_dp_ag,
            "dp_exposed_s": exp_red + exp_ag, "optimizer_s": t_opt,
            "tokens_per_s_per_gpu": tokens_gpu / total, "tflops_per_gpu": f_tok * tokens_gpu / total / 1e12,
            "mfu": f_tok * tokens_gpu / total / (c.peak_tflops * 1e12),
        }
        if with_memory:
            row["mem_gb"] = estimate_memory(cfg, n).total / 2**30
        return row

    # ------------------------------------------------------------ search
    def plans(self, n: int):
        m, c = self.m, self.cluster
        for tp in (1, 2, 4, 8):
            if tp > c.gpus_per_node or m.num_heads % tp or m.num_kv_heads % tp or n % tp:
                continue
            for pp in (1, 2, 4, 8):
                if m.num_layers % pp or n % (tp * pp):
                    continue
                dp = n // (tp * pp)
                seqs = self.per_gpu_batch * tp * pp
                for b in (1, 2, 4):
                    if seqs % b:
                        continue
                    n_micro = int(seqs // b)
                    for vs in ((1, 2) if pp > 1 else (1,)):
                        if vs > 1 and (n_micro % pp or m.num_layers % (pp * vs)):
                            continue
                        for zero in (0, 1):
                            for rc in ("none", "selective", "full"):
                                for sp in ((False, True) if tp > 1 else (False,)):
                                    yield Plan(tp, pp, dp, b, zero, rc, sp, vs)

    def best(self, n: int) -> dict | None:
        limit = 0.9 * self.cluster.mem_gb - 2.0
        best = None
        for plan in self.plans(n):
            row = self.step(n, plan, with_memory=False)
            if best is not None and row["tokens_per_s_per_gpu"] <= best["tokens_per_s_per_gpu"]:
                continue
            from .memory import estimate_memory

            mem = estimate_memory(self.config(n, plan), n).total / 2**30
            if mem > limit:
                continue
            row["mem_gb"] = mem
            best = row
        return best


def run_projection(out_dir, clusters=("a800", "h100"), models=("llama-7b", "llama-13b"),
                   gpu_counts=(8, 16, 32, 64, 128, 256, 512, 640), per_gpu_batch: float = 4, seq_len: int = 2048,
                   mfu: float | None = None, overlap: float | None = None, grad_reduce_dtype: str = "fp32") -> list[dict]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meas = measured_inputs()
    rows = []
    for cname in clusters:
        cluster = CLUSTERS[cname]
        for model in models:
            proj = Projector(cluster, model, seq_len, per_gpu_batch, mfu, overlap, grad_reduce_dtype=grad_reduce_dtype)
            base = None
            for n in gpu_counts:
                row = proj.best(n)
                if row is None:
                    continue
                base = base or row["tokens_per_s_per_gpu"]
                row["efficiency"] = row["tokens_per_s_per_gpu"] / base
                row["vs_single_device"] = row["mfu"] / proj.mfu  # vs the 1-GPU compute rate, no parallel overhead
                row["cluster_key"] = cname
                rows.append(row)
                print(f"[project] {cname} {model:10s} {n:4d} GPUs  {row['layout']:34s} "
                      f"{row['tokens_per_s_per_gpu']:8.0f} tok/s/GPU  MFU {row['mfu']:.3f}  eff {row['efficiency']:.3f}"
                      f"  mem {row['mem_gb']:.1f} GB")
    fields = ["cluster_key", "cluster", "model", "gpus", "nodes", "layout", "tp", "pp", "vs", "dp", "micro_batch",
              "microbatches", "zero", "recompute", "sp", "global_batch_seqs", "step_time_s", "compute_s", "tp_comm_s",
              "pp_p2p_s", "bubble_s", "dp_comm_s", "dp_exposed_s", "optimizer_s", "tokens_per_s_per_gpu",
              "tflops_per_gpu", "mfu", "efficiency", "vs_single_device", "mem_gb"]
    with open(out_dir / "projection.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})
    inputs = (f"MFU {mfu if mfu is not None else meas.get('mfu', DEFAULT_MFU):.3f} "
              f"({'given' if mfu is not None else meas.get('mfu_source', 'issue: 566 TFLOP/s on H100')}), "
              f"DP overlap fraction {overlap if overlap is not None else meas.get('overlap', DEFAULT_OVERLAP):.2f} "
              f"({'given' if overlap is not None else meas.get('overlap_source', 'assumed')}), "
              f"{per_gpu_batch:g} x {seq_len} tokens per GPU per step, DP gradients in {grad_reduce_dtype}")
    lines = ["# Projected weak scaling (α-β model)", "", f"Inputs: {inputs}.", ""]
    for cname in clusters:
        lines += [f"## {CLUSTERS[cname].describe()}", "",
                  "| model | GPUs | best layout | step s | tok/s/GPU | TFLOP/s/GPU | MFU | efficiency vs 8 | vs 1-GPU rate "
                  "| mem GB |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            if r["cluster_key"] != cname:
                continue
            lines.append(f"| {r['model']} | {r['gpus']} | {r['layout']} | {r['step_time_s']:.3f} | "
                         f"{r['tokens_per_s_per_gpu']:.0f} | {r['tflops_per_gpu']:.0f} | {r['mfu']:.3f} | "
                         f"{100 * r['efficiency']:.1f}% | {100 * r['vs_single_device']:.1f}% | {r['mem_gb']:.1f} |")
        lines.append("")
    (out_dir / "projection.md").write_text("\n".join(lines))
    _plot(rows, clusters, models, out_dir / "projection.png")
    return rows


def _plot(rows, clusters, models, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for cname in clusters:
        for model in models:
            sel = [r for r in rows if r["cluster_key"] == cname and r["model"] == model]
            if not sel:
                continue
            xs = [r["gpus"] for r in sel]
            axes[0].plot(xs, [100 * r["efficiency"] for r in sel], marker="o", label=f"{model} {cname}")
            axes[1].plot(xs, [r["tokens_per_s_per_gpu"] * r["gpus"] / 1e6 for r in sel], marker="o",
                         label=f"{model} {cname}")
    axes[0].axhline(94, color="grey", ls="--", lw=0.8)
    axes[0].set(xscale="log", xlabel="GPUs", ylabel="weak-scaling efficiency vs 8 GPUs (%)",
                title="Projected efficiency (α-β model)")
    axes[1].set(xscale="log", yscale="log", xlabel="GPUs", ylabel="M tokens/s", title="Projected throughput")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ====================================================================== calibration on this machine
def _gloo_worker(rank, world, port, sizes, reps, out_path):
    from ..parallel.local import set_worker_env

    set_worker_env(rank, world, port)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    res = {}
    for size in sizes:
        t = torch.ones(max(1, size // 4))
        dist.all_reduce(t)
        times = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(t)
            times.append(time.perf_counter() - t0)
        res[size] = sorted(times)[len(times) // 2]
    gathered = [None] * world
    dist.all_gather_object(gathered, res)
    if rank == 0:
        torch.save({s: max(g[s] for g in gathered) for s in sizes}, out_path)
    dist.destroy_process_group()


def measure_gloo(worlds=(2, 4), sizes=(4096, 65536, 1 << 20, 4 << 20, 16 << 20), reps=7) -> list[dict]:
    import tempfile

    import torch
    import torch.multiprocessing as mp

    from ..parallel.local import free_port

    rows = []
    for n in worlds:
        path = os.path.join(tempfile.mkdtemp(), "gloo.pt")
        mp.spawn(_gloo_worker, args=(n, free_port(), list(sizes), reps, path), nprocs=n, join=True)
        for size, t in torch.load(path).items():
            rows.append({"world": n, "bytes": size, "time_s": t})
    return rows


def fit_alpha_beta(rows: list[dict]) -> Link:
    """Least squares for t = α·2(n-1) + (1/β)·2(n-1)/n·S (ring all-reduce), weighted by 1/t (relative error)."""
    import numpy as np

    A = np.array([[2 * (r["world"] - 1), 2 * (r["world"] - 1) / r["world"] * r["bytes"]] for r in rows])
    y = np.array([r["time_s"] for r in rows])
    w = 1 / y
    coef, *_ = np.linalg.lstsq(A * w[:, None], y * w, rcond=None)
    alpha, inv_beta = max(coef[0], 1e-7), max(coef[1], 1e-12)
    return Link(alpha, 1 / inv_beta)


def predict_cpu_step(cfg, world: int, link: Link, t_token_fb: float, t_param_opt: float, cores: int,
                     t_fixed: float = 0.0) -> dict:
    """Predicted step time of a CPU gloo run: compute (per-token, from 1 process) × oversubscription + comm."""
    p, t = cfg.parallel, cfg.train
    tp, pp = p.tp, p.pp
    dp = world // (tp * pp)
    slowdown = max(1.0, world / cores)  # one thread per process, `world` processes on `cores` cores
    tokens_replica = t.global_batch // dp * t.seq_len
    n_micro = t.global_batch // (t.micro_batch * dp)
    compute = tokens_replica * t_token_fb / (tp * pp) * slowdown
    bubble = (pp - 1) / (n_micro + pp - 1) if pp > 1 else 0.0
    # every collective this rank makes, from the closed form, priced with the fitted gloo α-β (flat ring)
    comm = 0.0
    flat = Cluster("cpu", 10**6, link, link, 1.0, 1.0, tree_latency=False)
    sizes = {"dp": dp, "tp": tp, "pp": pp, "model": tp * pp, "embedding": 2}
    worst_rank = max(range(world), key=lambda r: sum(v["bytes"] for v in expected_comm_bytes(cfg, world, r).values()))
    for (op, group), v in expected_comm_bytes(cfg, world, worst_rank).items():
        n = sizes.get(group, 2)
        if op in ("send", "recv"):
            comm += v["calls"] * link.p2p(v["bytes"] / v["calls"]) / 2  # a send and its recv overlap
        else:
            comm += v["calls"] * collective_time(op, v["bytes"] / v["calls"], n, 1, flat)
    comm *= slowdown
    from .comm_model import chunk_param_numels

    local = max(sum(k for ch in chunk_param_numels(cfg.model, tp, pp, r, 1) for _, k in ch) for r in range(pp))
    opt = local / (dp if p.zero == 1 else 1) * t_param_opt * slowdown
    total = (compute + comm) / (1 - bubble) + opt + t_fixed * slowdown
    return {"pred_step_s": total, "pred_compute_s": compute, "pred_comm_s": comm, "pred_bubble_s":
            (compute + comm) * bubble / (1 - bubble), "pred_opt_s": opt}


def _baseline(model, steps, seq_len, batch_per_replica) -> dict:
    """Per-token fwd+bwd time, per-param optimizer time and fixed overhead of a 1-process run."""
    from .runner import Layout, run_layout_bench

    res = run_layout_bench(Layout(1), model, steps, seq_len, batch_per_replica, measure_memory=False)
    r0, cfg0 = res["row"], res["cfg"]
    tokens = cfg0.train.global_batch * seq_len
    m = cfg0.model
    params = m.num_params() + (m.padded_vocab_size(1) - m.vocab_size) * 2 * m.hidden_size
    # the fastest (least disturbed by other jobs on this machine) timed step
    return {"t_token": r0["fb_min_s"] / tokens, "t_param": r0["opt_min_s"] / params,
            "t_fixed": max(0.0, r0["step_time_min_s"] - r0["fb_min_s"] - r0["opt_min_s"]),
            "step_time_s": r0["step_time_min_s"]}


def calibrate_and_validate(out_dir, model: str = "tiny", steps: int = 5, seq_len: int = 64,
                           batch_per_replica: int = 4) -> list[dict]:
    """Fit gloo α-β, then for each layout: a fresh 1-process compute calibration right before it
    (paired, because other processes share this machine's cores), a prediction, and the measurement."""
    from .runner import Layout, run_layout_bench

    out_dir = Path(out_dir)
    cores = os.cpu_count() or 1
    gloo = measure_gloo()
    link = fit_alpha_beta(gloo)
    with open(out_dir / "gloo_calibration_cpu.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["world", "bytes", "time_s", "fit_s"])
        w.writeheader()
        for r in gloo:
            fit = collective_time("all_reduce", r["bytes"], r["world"], 1,
                                  Cluster("cpu", 10**6, link, link, 1, 1, tree_latency=False))
            w.writerow({**r, "fit_s": f"{fit:.6g}", "time_s": f"{r['time_s']:.6g}"})
    print(f"[calibrate] gloo α = {link.alpha * 1e6:.1f} µs, β = {link.beta / 1e9:.3f} GB/s")
    rows = []
    for lay in [Layout(2), Layout(2, zero=1), Layout(4), Layout(2, tp=2), Layout(2, pp=2), Layout(4, tp=2, pp=2)]:
        base = _baseline(model, steps, seq_len, batch_per_replica)
        load = os.getloadavg()[0]
        res = run_layout_bench(lay, model, steps, seq_len, batch_per_replica, measure_memory=False)
        row = res["row"]
        if row["status"] != "ok":
            rows.append({"layout": lay.name(), "world": lay.world, "note": row["status"]})
            continue
        pred = predict_cpu_step(res["cfg"], lay.world, link, base["t_token"], base["t_param"], cores,
                                base["t_fixed"])
        measured = row["step_time_min_s"]
        err = 100 * (pred["pred_step_s"] - measured) / measured
        rows.append({"layout": f"tp{lay.tp} pp{lay.pp} dp{lay.dp} z{lay.zero}", "world": lay.world,
                     "measured_step_s": measured, "measured_mean_step_s": row["step_time_s"], **pred, "error_pct": err,
                     "baseline_1proc_step_s": base["step_time_s"], "us_per_token": base["t_token"] * 1e6,
                     "measured_comm_exposed_s": row["comm_exposed_s"], "loadavg_1min": load,
                     "alpha_us": link.alpha * 1e6, "beta_gbps": link.beta / 1e9, "note": ""})
        print(f"[validate] {lay.name():36s} measured {measured:.3f}s predicted {pred['pred_step_s']:.3f}s "
              f"error {err:+.1f}%  (1-proc {base['step_time_s']:.3f}s, load {load:.1f})")
    fields = ["layout", "world", "measured_step_s", "measured_mean_step_s", "pred_step_s", "error_pct", "pred_compute_s", "pred_comm_s",
              "pred_bubble_s", "pred_opt_s", "measured_comm_exposed_s", "baseline_1proc_step_s", "us_per_token",
              "loadavg_1min", "alpha_us", "beta_gbps", "note"]
    with open(out_dir / "validation_cpu.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})
    errs = [abs(r["error_pct"]) for r in rows if "error_pct" in r]
    if errs:
        print(f"[validate] mean |error| {sum(errs) / len(errs):.1f}%, max {max(errs):.1f}% "
              f"({cores} cores, up to 4 processes: oversubscribed)")
    return rows


__all__ = ["CLUSTERS", "Projector", "Plan", "run_projection", "calibrate_and_validate", "fit_alpha_beta",
           "measure_gloo", "predict_cpu_step", "group_placement", "replace"]
