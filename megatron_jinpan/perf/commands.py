"""`jinpan bench scaling | memory | project | calibrate`.

    jinpan bench scaling --smoke --out /tmp/bench           # small CPU sweep (also benchmarks/scaling.py)
    jinpan bench scaling --model debug --world-sizes 1,2,4 --steps 4
    jinpan bench memory --config configs/pretrain/llama7b_stage2.yaml parallel.zero=1 --world-size 64
    jinpan bench memory model.name=llama-7b train.trainable=lora lora.rank=16     # LoRA, all projections
    jinpan bench project --cluster h100 --models llama-7b,llama-13b --out benchmarks/results
    jinpan bench calibrate --out benchmarks/results        # gloo α-β fit + CPU step-time validation
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEFAULT_RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


# ---------------------------------------------------------------- scaling
def add_scaling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--smoke", action="store_true", help="small CPU sweep (world sizes 1-4, debug model, 2 steps)")
    p.add_argument("--out", default=None, help="output directory (default benchmarks/results)")
    p.add_argument("--model", default="debug")
    p.add_argument("--world-sizes", default="1,2,4,8")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-per-replica", type=int, default=4, help="sequences per DP replica per step (weak scaling)")
    p.add_argument("--device", default="cpu", help="cpu | auto (GPUs with nccl where present)")
    p.add_argument("--layouts", default=None,
                   help="explicit list 'world:tp:pp:zero:mb:recompute[:sp]' separated by commas")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per run before it is killed")
    p.add_argument("--no-memory", action="store_true", help="skip the tensor-level memory measurement")


def parse_layouts(text: str):
    from .runner import Layout

    out = []
    for item in text.split(","):
        f = item.split(":")
        vals = f + [None] * (7 - len(f))
        out.append(Layout(world=int(vals[0]), tp=int(vals[1] or 1), pp=int(vals[2] or 1), zero=int(vals[3] or 0),
                          micro_batch=int(vals[4] or 2), recompute=vals[5] or "none", sp=vals[6] in ("sp", "1", "true")))
    return out


def cmd_scaling(args) -> int:
    from .runner import full_layouts, run_sweep, smoke_layouts

    out = Path(args.out) if args.out else DEFAULT_RESULTS
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if args.smoke:
        layouts, steps, name = smoke_layouts(), 2, "scaling_smoke.csv"
        model, seq = "debug", 32
    else:
        sizes = [int(x) for x in args.world_sizes.split(",")]
        layouts = parse_layouts(args.layouts) if args.layouts else full_layouts(sizes)
        layouts = [lay for lay in layouts if lay.world in sizes] if not args.layouts else layouts
        steps, model, seq = args.steps, args.model, args.seq_len
        name = f"scaling_{model}_{args.device}.csv"
    rows = run_sweep(layouts, model=model, steps=steps, seq_len=seq, batch_per_replica=args.batch_per_replica,
                     device=args.device, out_csv=str(out / name), measure_memory=not args.no_memory,
                     timeout_s=args.timeout)
    ok = sum(1 for r in rows if r.get("status") == "ok")
    print(f"[bench] {ok}/{len(rows)} runs ok in {time.time() - t0:.1f}s -> {out / name}")
    failed = [r for r in rows if str(r.get("status", "")).startswith(("error", "timeout"))]
    return 1 if failed else 0


# ---------------------------------------------------------------- memory
def cmd_memory(args) -> int:
    from ..config import load_config
    from .memory import estimate_memory, lora_summary, zero_optimizer_saving

    cfg = load_config(args.config, args.overrides)
    world = args.world_size or cfg.parallel.tp * cfg.parallel.pp * max(1, args.dp)
    for r in range(cfg.parallel.pp):
        print(estimate_memory(cfg, world, r, weights=args.weights).describe())
    if cfg.train.trainable == "lora":
        s = lora_summary(cfg.model, cfg.lora, args.weights)
        gib = 2**30
        print(f"LoRA rank {cfg.lora.rank} on {','.join(cfg.lora.targets)} ({cfg.model.name}): "
              f"{s['trainable_params'] / 1e6:.2f}M trainable params ({100 * s['trainable_fraction']:.2f}% of "
              f"{s['model_params'] / 1e9:.2f}B); optimizer states {s['optimizer_bytes'] / gib:.3f} GiB vs "
              f"{s['full_ft_optimizer_bytes'] / gib:.1f} GiB for full fine-tuning "
              f"({'Adam m+v 8' if args.weights == 'fp32' else 'fp32 master+m+v 12'} B/trainable param, whole model)")
    if getattr(args, "ppo", False):  # actor/critic/reference/reward/KV cache on one layout (posttrain/ppo_memory.py)
        from ..posttrain.ppo_memory import describe

        print(describe(cfg, world, args.weights))
    z = zero_optimizer_saving(cfg.model, dp=args.zero_dp)
    print(f"ZeRO-1 optimizer states ({cfg.model.name}, {z['params'] / 1e9:.2f}B params, fp32 master + Adam m,v = "
          f"12 B/param): {z['optimizer_gb_zero0']:.1f} GiB -> {z['optimizer_gb_zero1']:.1f} GiB per GPU at "
          f"dp={z['dp']}: {100 * z['saving']:.1f}% less optimizer memory")
    return 0


# ---------------------------------------------------------------- projection
def cmd_project(args) -> int:
    from .projection import run_projection

    out = Path(args.out) if args.out else DEFAULT_RESULTS
    run_projection(out, clusters=args.cluster.split(","), models=args.models.split(","),
                   gpu_counts=[int(x) for x in args.gpus.split(",")], per_gpu_batch=args.per_gpu_batch,
                   seq_len=args.seq_len, mfu=args.mfu, overlap=args.overlap, grad_reduce_dtype=args.grad_reduce_dtype)
    return 0


def cmd_calibrate(args) -> int:
    from .projection import calibrate_and_validate

    out = Path(args.out) if args.out else DEFAULT_RESULTS
    calibrate_and_validate(out, model=args.model, steps=args.steps)
    return 0


def register(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="scaling benchmarks, memory estimator, 640-GPU projection")
    sub = bench.add_subparsers(dest="bench_command", metavar="BENCH")

    p = sub.add_parser("scaling", help="measured throughput/memory/comm per layout (real training steps)")
    add_scaling_args(p)
    p.set_defaults(func=cmd_scaling)

    p = sub.add_parser("memory", help="per-rank memory estimate for a config and layout")
    p.add_argument("--config", default=None)
    p.add_argument("--world-size", type=int, default=None, help="ranks (default tp*pp*--dp)")
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--weights", choices=["fp32", "bf16"], default="fp32",
                   help="fp32: this engine (fp32 weights, bf16 autocast); bf16: bf16 weights + fp32 master")
    p.add_argument("--zero-dp", type=int, default=8, help="dp for the ZeRO optimizer-saving line")
    p.add_argument("--ppo", action="store_true", help="also the memory of every PPO role (ppo.* of the config)")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_memory, accepts_overrides=True)

    p = sub.add_parser("project", help="α-β projection of 7B/13B step time and weak scaling to 640 GPUs")
    p.add_argument("--cluster", default="a800,h100", help="presets: a800, h100 (comma list)")
    p.add_argument("--models", default="llama-7b,llama-13b")
    p.add_argument("--gpus", default="8,16,32,64,128,256,512,640")
    p.add_argument("--per-gpu-batch", type=float, default=4, help="sequences per GPU per step (weak scaling)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--mfu", type=float, default=None, help="single-device MFU (default: measured CSV or 0.572)")
    p.add_argument("--overlap", type=float, default=None, help="DP overlap fraction (default: CSV or 0.8)")
    p.add_argument("--grad-reduce-dtype", choices=("fp32", "bf16"), default="fp32",
                   help="parallel.grad_reduce_dtype of the projected runs (bf16: half the DP gradient bytes)")
    p.add_argument("--out", default=None)
    p.set_defaults(func=cmd_project)

    p = sub.add_parser("calibrate", help="fit gloo α-β on this machine and validate predicted CPU step times")
    p.add_argument("--model", default="tiny")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default=None)
    p.set_defaults(func=cmd_calibrate)

    bench.set_defaults(func=lambda args: (bench.print_help(), 0)[1])


def main_scaling(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/scaling.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_scaling_args(parser)
    return cmd_scaling(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main_scaling())
