"""End-to-end throughput: a stack of LLaMA-7B-shaped decoder layers, forward+backward on one device.

    python benchmarks/throughput.py                            # GPU: 4 layers, hidden 4096, 32 heads, FFN 11008, seq 4096, bf16
    python benchmarks/throughput.py --layers 8 --batch 1 --seq 4096
    python benchmarks/throughput.py --smoke --out /tmp/bench   # CPU: tiny shape, Triton under the interpreter (CI)
    python benchmarks/throughput.py --smoke --compile-on-cpu   # + the compiled columns on CPU (inductor, slow)

Variants (same weights, same inputs, one run), one row each:
  triton       our Triton kernels for attention, RMSNorm, rotary and SwiGLU
  eager_sdpa   PyTorch eager ops with SDPA attention
Each row times the stack eagerly (ms_per_iter, tokens_per_s, ...) and, in the
compiled_* columns, with every decoder block torch.compile'd exactly as
`train.compile=blocks` does (megatron_jinpan/parallel/compile.py; our kernels
are custom ops inside the compiled blocks); compile_speedup = eager / compiled
time, compile_s = the first compiled iteration (compilation). eager_sdpa's
compiled columns are the torch.compile baseline. Compiled columns are empty on
CPU unless --compile-on-cpu.
The stack is `megatron_jinpan.models.Llama` without embedding, final norm and
LM head (a middle pipeline stage), parameters in the chosen dtype (pure bf16
by default, no autocast). Reports ms/iteration, tokens/s, model TFLOP/s
(6 x layer parameters per token + causal attention 6*h*s per token per
layer) and MFU against the device's bf16 peak (megatron_jinpan.device.peak_tflops;
empty on CPU), and peak memory. CSV in benchmarks/results/.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny CPU run (Triton interpreter), for CI")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--ffn", type=int, default=11008)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", default="triton,eager_sdpa")
    p.add_argument("--compile-on-cpu", action="store_true", help="also fill the compiled_* columns on CPU")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    if args.smoke:
        args.layers, args.batch, args.seq, args.hidden, args.heads, args.ffn = 1, 1, 32, 128, 2, 96
        args.kv_heads = args.kv_heads or 1
        args.dtype, args.iters, args.warmup = "fp32", 1, 1
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.smoke:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from megatron_jinpan import device as dev  # noqa: E402
from megatron_jinpan.perf.metadata import run_metadata  # noqa: E402
from megatron_jinpan.models import KernelChoice, Llama, get_model_config, init_weights  # noqa: E402
from megatron_jinpan.parallel.compile import compile_blocks  # noqa: E402

VARIANTS = {
    "triton": KernelChoice(attention="triton", norm="triton", rope="triton", swiglu="triton"),
    "eager_sdpa": KernelChoice(attention="sdpa", norm="torch", rope="torch", swiglu="torch"),
}




def build_stack(args, device, dtype):
    cfg = get_model_config("llama-7b", num_layers=args.layers, hidden_size=args.hidden, num_heads=args.heads,
                           num_kv_heads=args.kv_heads, intermediate_size=args.ffn, max_seq_len=args.seq,
                           vocab_size=128)
    with torch.device("meta"):
        model = Llama(cfg)
    model.embed_tokens = model.norm = model.lm_head = None  # a middle pipeline stage: hidden in, hidden out
    model = model.to_empty(device=device)
    init_weights(model, seed=0)
    return model.to(dtype), cfg


def flops_per_token(cfg, seq: int) -> float:
    h, f, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_kv_heads * cfg.head_dim
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h
    return cfg.num_layers * (6 * per_layer + 6 * h * seq)


def measure(model, args, device, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.seq, args.hidden, generator=g).to(device, dtype)
    dy = torch.randn(args.batch, args.seq, args.hidden, generator=g).to(device, dtype)

    def step():
        out = model(x)
        out.backward(dy)
        for p in model.parameters():
            p.grad = None

    start = time.perf_counter()
    for _ in range(max(1, args.warmup)):  # >= 1: the compiled stack compiles here
        step()
    dev.synchronize(device)
    first = time.perf_counter() - start
    dev.reset_peak_memory(device)
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    dev.synchronize(device)
    return (time.perf_counter() - start) / args.iters, dev.max_memory_gb(device), first


def main(args) -> Path:
    device = torch.device("cpu") if args.smoke else torch.device(dev.default_device_type())
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    meta = run_metadata(device)
    peak = dev.peak_tflops(device)
    compiled = device.type != "cpu" or args.compile_on_cpu
    if not compiled:
        print("# compiled columns: skipped on CPU (use --compile-on-cpu)")
    rows = []
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        if name not in VARIANTS:
            raise SystemExit(f"--variants: unknown {name!r}; choose from {sorted(VARIANTS)}")
        row = None
        for mode in ("eager", "blocks") if compiled else ("eager",):
            torch.manual_seed(0)
            model, cfg = build_stack(args, device, dtype)
            model.set_kernels(VARIANTS[name])
            if mode == "blocks":
                compile_blocks(model)
            try:
                seconds, mem, first = measure(model, args, device, dtype)
            except Exception as exc:  # e.g. OOM for one variant: report and go on
                print(f"# {name} {mode}: failed ({type(exc).__name__}: {exc})"[:300])
                continue
            finally:
                del model
            tokens = args.batch * args.seq
            tflops = flops_per_token(cfg, args.seq) * tokens / seconds / 1e12
            timing = dict(ms_per_iter=float(f"{seconds * 1e3:.4g}"), tokens_per_s=float(f"{tokens / seconds:.4g}"),
                          tflops=float(f"{tflops:.4g}"), mfu=float(f"{tflops / peak:.4g}") if peak else "",
                          mem_gb=round(mem, 2))
            if mode == "eager":
                row = dict(variant=name, layers=args.layers, batch=args.batch, seq=args.seq, hidden=args.hidden,
                           heads=args.heads, kv_heads=cfg.num_kv_heads, ffn=args.ffn, dtype=args.dtype, **timing,
                           **{f"compiled_{k}": "" for k in timing}, compile_speedup="", compile_s="", **meta)
            elif row is not None:
                row.update({f"compiled_{k}": v for k, v in timing.items()})
                row["compile_speedup"] = float(f"{row['ms_per_iter'] / timing['ms_per_iter']:.4g}")
                row["compile_s"] = round(first, 2)
            print(f"{name:11s} {mode:6s} {timing['ms_per_iter']:10.2f} ms/iter {timing['tokens_per_s']:12.1f} tok/s "
                  f"{timing['tflops']:8.2f} TFLOP/s  MFU {timing['mfu'] or '-'}  mem {timing['mem_gb']} GB", flush=True)
        if row is not None:
            rows.append(row)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "_" for c in meta["device"]).strip("_").lower() or "device"
    path = out_dir / (f"throughput_{slug}_smoke.csv" if args.smoke else f"throughput_{slug}.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()) if rows else ["variant"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {path}")
    return path


if __name__ == "__main__":
    main(ARGS)
