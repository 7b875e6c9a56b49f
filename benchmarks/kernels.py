"""Kernel benchmarks: our Triton kernels vs torch eager, torch.compile, torch's fused op, Liger-Kernel, flash-attn.

    python benchmarks/kernels.py                          # GPU: LLaMA-7B/13B sweep, bf16 -> benchmarks/results/kernels_<gpu>.csv
    python benchmarks/kernels.py --ops attention,rmsnorm  # a subset
    python benchmarks/kernels.py --smoke --out /tmp/bench # CPU: tiny sweep under the Triton interpreter (< 60 s, CI)

For every op (rmsnorm, rope, swiglu, attention), shape and direction (fwd,
bwd) one CSV row per provider:
  triton     megatron_jinpan.kernels (ours)
  eager      the pure-PyTorch reference in megatron_jinpan.models.ops
  compile    torch.compile of that reference (GPU only)
  fused      torch's own fused op: F.rms_norm (rmsnorm), SDPA (attention)
  liger      Liger-Kernel's op, when `liger_kernel` is importable
  flash_attn the flash-attn package, when importable (attention)
Memory-bound ops report GB/s (bytes that must move at least once: inputs
read + outputs written); attention reports TFLOP/s (causal: half the dense
4*b*h*s^2*d forward FLOPs, backward 2.5x forward). `bwd` times the backward
alone (the forward graph is built once and reused with retain_graph).
Each row carries the device name, torch/triton versions and git commit.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPS = ("rmsnorm", "rope", "swiglu", "attention")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny CPU sweep (Triton interpreter), for CI")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma list of {OPS}")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--providers", default="", help="comma list to restrict providers (default: all available)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="directory for the CSV")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.smoke:
    # CPU: run the Triton kernels under the interpreter; one BLAS thread (see tests/conftest.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megatron_jinpan import device as dev  # noqa: E402
from megatron_jinpan.perf.metadata import run_metadata  # noqa: E402
from megatron_jinpan.models import ops  # noqa: E402


# ------------------------------------------------------------------ metadata and timing


def time_ms(fn, device: torch.device, grad_to_none=(), smoke=False) -> float:
    """Median milliseconds of fn(): triton's do_bench on a GPU, a perf_counter loop on CPU."""
    if device.type != "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=list(grad_to_none) or None))
    fn()  # warm-up (compiles / traces)
    times = []
    for _ in range(1 if smoke else 5):
        for t in grad_to_none:
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return times[len(times) // 2]


# ------------------------------------------------------------------ providers per op
def _optional(name):
    try:
        return __import__(name, fromlist=["_"])
    except Exception:
        return None


def _compiled(fn, enabled):
    return torch.compile(fn, dynamic=False) if enabled else None


def rmsnorm_cases(shapes, dtype, device, compile_ok):
    from megatron_jinpan.kernels.rmsnorm import rms_norm as triton_rms_norm

    liger = _optional("liger_kernel.ops.rms_norm")
    for tokens, hidden in shapes:
        eps = 1e-6

        def make():
            x = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
            w = torch.ones(hidden, device=device, dtype=dtype, requires_grad=True)
            return x, w

        providers = {
            "triton": lambda x, w: triton_rms_norm(x, w, eps),
            "eager": lambda x, w: ops.rms_norm_reference(x, w, eps),
            "fused": lambda x, w: F.rms_norm(x, (hidden,), w, eps),
        }
        compiled = _compiled(ops.rms_norm_reference, compile_ok)
        if compiled is not None:
            providers["compile"] = lambda x, w: compiled(x, w, eps)
        if liger is not None:
            providers["liger"] = lambda x, w: liger.LigerRMSNormFunction.apply(x, w, eps)
        elt = torch.tensor([], dtype=dtype).element_size()
        nbytes = {"fwd": (2 * tokens * hidden + hidden) * elt, "bwd": (3 * tokens * hidden + 2 * hidden) * elt}
        yield f"{tokens}x{hidden}", make, providers, nbytes, None


def rope_cases(shapes, dtype, device, compile_ok):
    from megatron_jinpan.kernels.rotary import apply_rotary

    liger = _optional("liger_kernel.ops.rope")
    for b, s, hq, hk, d in shapes:
        pos = torch.arange(s, device=device).expand(b, -1)
        cos, sin = ops.rotary_cos_sin(pos, d, 10000.0, dtype)

        def make():
            q = torch.randn(b, s, hq, d, device=device, dtype=dtype, requires_grad=True)
            k = torch.randn(b, s, hk, d, device=device, dtype=dtype, requires_grad=True)
            return q, k

        providers = {
            "triton": lambda q, k: apply_rotary(q, k, cos, sin),
            "eager": lambda q, k: ops.apply_rotary_reference(q, k, cos, sin),
        }
        compiled = _compiled(ops.apply_rotary_reference, compile_ok)
        if compiled is not None:
            providers["compile"] = lambda q, k: compiled(q, k, cos, sin)
        if liger is not None:  # Liger wants [b, h, s, d]; the transposes are part of its cost here
            providers["liger"] = lambda q, k: liger.LigerRopeFunction.apply(
                q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        elt = torch.tensor([], dtype=dtype).element_size()
        moved = (2 * b * s * (hq + hk) * d + 2 * b * s * d) * elt
        yield f"b{b}_s{s}_h{hq}_kv{hk}_d{d}", make, providers, {"fwd": moved, "bwd": moved}, None


def swiglu_cases(shapes, dtype, device, compile_ok):
    from megatron_jinpan.kernels.swiglu import swiglu

    liger = _optional("liger_kernel.ops.swiglu")

    def eager(g, u):
        return F.silu(g) * u

    for tokens, ffn in shapes:
        def make():
            return tuple(torch.randn(tokens, ffn, device=device, dtype=dtype, requires_grad=True) for _ in range(2))

        providers = {"triton": swiglu, "eager": eager}
        compiled = _compiled(eager, compile_ok)
        if compiled is not None:
            providers["compile"] = compiled
        if liger is not None:
            providers["liger"] = lambda g, u: liger.LigerSiLUMulFunction.apply(g, u)
        elt = torch.tensor([], dtype=dtype).element_size()
        n = tokens * ffn
        yield f"{tokens}x{ffn}", make, providers, {"fwd": 3 * n * elt, "bwd": 5 * n * elt}, None


def attention_cases(shapes, dtype, device, compile_ok):
    from megatron_jinpan.kernels.flash_attention import flash_attention

    fa = _optional("flash_attn")
    for b, s, hq, hk, d in shapes:
        def make():
            return tuple(torch.randn(b, s, h, d, device=device, dtype=dtype, requires_grad=True) for h in (hq, hk, hk))

        providers = {
            "triton": lambda q, k, v: flash_attention(q, k, v),
            "fused": lambda q, k, v: ops.attention(q, k, v, backend="sdpa"),
        }
        if b * hq * s * s <= 2**31 or device.type == "cpu":  # eager materialises the scores
            providers["eager"] = lambda q, k, v: ops.attention_reference(q, k, v)
        if fa is not None:
            providers["flash_attn"] = lambda q, k, v: fa.flash_attn_func(q, k, v, causal=True)
        fwd = 4 * b * hq * s * s * d / 2
        yield f"b{b}_s{s}_h{hq}_kv{hk}_d{d}", make, providers, None, {"fwd": fwd, "bwd": 2.5 * fwd}


GPU_SHAPES = {
    # LLaMA-7B: hidden 4096, 32 heads, FFN 11008; LLaMA-13B: hidden 5120, 40 heads, FFN 13824; head_dim 128
    "rmsnorm": [(4096, 4096), (8192, 4096), (16384, 4096), (8192, 5120), (16384, 5120)],
    "rope": [(2, 4096, 32, 32, 128), (4, 4096, 32, 32, 128), (2, 4096, 40, 40, 128), (2, 4096, 32, 8, 128)],
    "swiglu": [(4096, 11008), (8192, 11008), (8192, 13824)],
    "attention": [(2, 4096, 32, 32, 128), (4, 2048, 32, 32, 128), (2, 4096, 40, 40, 128), (1, 8192, 32, 32, 128),
                  (2, 4096, 32, 8, 128), (8, 1024, 32, 32, 128)],
}
SMOKE_SHAPES = {
    "rmsnorm": [(64, 96)],
    "rope": [(1, 16, 2, 2, 64)],
    "swiglu": [(64, 160)],
    "attention": [(1, 32, 2, 1, 64)],
}
CASES = {"rmsnorm": rmsnorm_cases, "rope": rope_cases, "swiglu": swiglu_cases, "attention": attention_cases}


def _sig(x: float) -> float:
    """Four significant digits (CPU smoke numbers are tiny, GPU ones large)."""
    return float(f"{x:.4g}")


def _outputs(out):
    return out if isinstance(out, (tuple, list)) else (out,)


def main(args) -> Path:
    device = torch.device("cpu") if args.smoke else torch.device(dev.default_device_type())
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if device.type == "cpu":
        dtype = torch.float32  # the interpreter's bf16 dot is wrong; CPU numbers are a smoke test only
    compile_ok = device.type != "cpu" and not args.no_compile
    shapes = SMOKE_SHAPES if args.smoke or device.type == "cpu" else GPU_SHAPES
    wanted = [o.strip() for o in args.ops.split(",") if o.strip()]
    only = {p.strip() for p in args.providers.split(",") if p.strip()}
    meta = run_metadata(device)
    rows = []
    for op in wanted:
        if op not in CASES:
            raise SystemExit(f"--ops: unknown op {op!r}; choose from {OPS}")
        for shape, make, providers, nbytes, flops in CASES[op](shapes[op], dtype, device, compile_ok):
            for name, fn in providers.items():
                if only and name not in only:
                    continue
                for direction in ("fwd", "bwd"):
                    try:
                        inputs = make()
                        if direction == "fwd":
                            with torch.no_grad():
                                ms = time_ms(lambda: fn(*inputs), device, smoke=args.smoke)
                        else:
                            outs = _outputs(fn(*inputs))
                            grads = [torch.randn_like(o) for o in outs]
                            ms = time_ms(lambda: torch.autograd.backward(outs, grads, retain_graph=True), device,
                                         grad_to_none=inputs, smoke=args.smoke)
                    except Exception as exc:  # one provider failing (OOM, compile) must not stop the sweep
                        print(f"# {op} {shape} {name} {direction}: skipped ({type(exc).__name__}: {exc})"[:300])
                        continue
                    row = dict(op=op, shape=shape, dtype=str(dtype).replace("torch.", ""), direction=direction,
                               provider=name, ms=round(ms, 4),
                               gbps=_sig(nbytes[direction] / ms / 1e6) if nbytes else "",
                               tflops=_sig(flops[direction] / ms / 1e9) if flops else "", **meta)
                    rows.append(row)
                    metric = f"{row['gbps']} GB/s" if nbytes else f"{row['tflops']} TFLOP/s"
                    print(f"{op:9s} {shape:26s} {direction} {name:10s} {ms:9.3f} ms  {metric}", flush=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "_" for c in meta["device"]).strip("_").lower() or "device"
    path = out_dir / (f"kernels_{slug}_smoke.csv" if args.smoke else f"kernels_{slug}.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()) if rows else ["op"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {path}")
    return path


if __name__ == "__main__":
    main(ARGS)
