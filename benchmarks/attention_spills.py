"""Registers and spills of every FlashAttention autotune config (GPU): no config may spill.

    python benchmarks/attention_spills.py                     # head_dim 64 and 128 -> CSV + table
    python benchmarks/attention_spills.py --head-dims 128 --out /tmp/spills.csv

Compiles and launches each config of `_FWD_CONFIGS`, `_DKDV_CONFIGS` and `_DQ_CONFIGS`
(kernels/flash_attention.py) once on a [1, seq 1024, 8 heads, head_dim] bf16 problem, with and
without packed documents, and records the compiled kernel's `n_regs` and `n_spills`. The dK/dV
configs keep two BLOCK_N x head_dim fp32 accumulators; the review (shared/notes/kernel-review.md
item 4) predicts spills for BLOCK_N=128 at 4 warps, which is why those are gone: this checks it.
Needs CUDA (the interpreter has no registers).
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--out", default=None, help="CSV (default benchmarks/results/attention_spills_<gpu>.csv)")
    args = parser.parse_args()
    from megatron_jinpan import device as devices

    if not devices.accelerator_available():  # registers and spills exist only for compiled GPU kernels
        raise SystemExit("attention_spills.py needs a CUDA GPU (registers and spills exist only for compiled kernels)")
    import triton

    from megatron_jinpan.kernels import flash_attention as FA
    from megatron_jinpan.models import ops
    from megatron_jinpan.perf.metadata import run_metadata

    device = devices.resolve_device("auto")
    meta = run_metadata(device)
    rows = []
    b, s, h = 1, args.seq, 8
    for d in (int(x) for x in args.head_dims.split(",")):
        q, k, v = (torch.randn(b, s, h, d, device=device, dtype=torch.bfloat16) for _ in range(3))
        o = torch.empty_like(q)
        lse = torch.empty((b, h, s), device=device, dtype=torch.float32)
        delta, do = torch.zeros_like(lse), torch.randn_like(q)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        cu = torch.tensor([0, s // 3, s], dtype=torch.int32, device=device)
        start, end = ops.document_bounds(cu, b, s)
        scale = d ** -0.5
        for docs in (False, True):
            ds, de = (start, end) if docs else (lse, lse)
            common = dict(HQ=h, HK=h, D=d, HAS_DOCS=docs)
            for name, kernel, configs, grid_of, call_args in (
                ("forward", FA._attn_fwd_kernel, FA._FWD_CONFIGS, lambda c: (triton.cdiv(s, c["BLOCK_M"]), b * h),
                 (q, k, v, o, lse, ds, s, scale * FA.LOG2E)),
                ("dkdv", FA._attn_bwd_dkdv_kernel, FA._DKDV_CONFIGS, lambda c: (triton.cdiv(s, c["BLOCK_N"]), b * h),
                 (q, k, v, do, lse, delta, dk, dv, ds, de, s, scale * FA.LOG2E, scale)),
                ("dq", FA._attn_bwd_dq_kernel, FA._DQ_CONFIGS, lambda c: (triton.cdiv(s, c["BLOCK_M"]), b * h),
                 (q, k, v, do, lse, delta, dq, ds, s, scale * FA.LOG2E, scale)),
            ):
                for cfg in configs:
                    compiled = kernel[grid_of(cfg.kwargs)](*call_args, **common, **cfg.kwargs,
                                                           num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                    rows.append(dict(kernel=name, head_dim=d, packed=docs, block_m=cfg.kwargs["BLOCK_M"],
                                     block_n=cfg.kwargs["BLOCK_N"], num_warps=cfg.num_warps,
                                     num_stages=cfg.num_stages, n_regs=compiled.n_regs, n_spills=compiled.n_spills,
                                     **meta))
                    r = rows[-1]
                    flag = "  <-- SPILLS" if r["n_spills"] else ""
                    print(f"{name:8s} d={d:3d} packed={int(docs)} {r['block_m']:3d}x{r['block_n']:<3d} "
                          f"w{r['num_warps']} s{r['num_stages']}: {r['n_regs']:3d} regs, {r['n_spills']} spills{flag}")
    devices.synchronize(device)
    gpu = devices.device_name(device).replace(" ", "_")
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"attention_spills_{gpu}.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    spilling = sum(1 for r in rows if r["n_spills"])
    print(f"{len(rows)} configs, {spilling} spill -> {out}")
    return 1 if spilling else 0


if __name__ == "__main__":
    sys.exit(main())
