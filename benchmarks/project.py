"""Projection of LLaMA-7B/13B step time and weak-scaling efficiency from 8 to 640 GPUs (α-β model).

    python benchmarks/project.py                       # a800 + h100 presets -> benchmarks/results/projection.*
    python benchmarks/project.py --cluster h100 --mfu 0.5 --overlap 0.6
    python benchmarks/project.py --grad-reduce-dtype bf16 --out /tmp/proj_bf16   # parallel.grad_reduce_dtype=bf16
    python benchmarks/project.py --calibrate           # gloo α-β fit + CPU step-time validation (validation_cpu.csv)

Same as `jinpan bench project` / `jinpan bench calibrate`; the model is described in docs/scaling.md.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_jinpan.perf.commands import DEFAULT_RESULTS  # noqa: E402
from megatron_jinpan.perf.projection import calibrate_and_validate, run_projection  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cluster", default="a800,h100")
    ap.add_argument("--models", default="llama-7b,llama-13b")
    ap.add_argument("--gpus", default="8,16,32,64,128,256,512,640")
    ap.add_argument("--per-gpu-batch", type=float, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--mfu", type=float, default=None)
    ap.add_argument("--overlap", type=float, default=None)
    ap.add_argument("--grad-reduce-dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--calibrate", action="store_true")
    ap.add_argument("--out", default=str(DEFAULT_RESULTS))
    a = ap.parse_args(argv)
    if a.calibrate:
        calibrate_and_validate(a.out)
        return 0
    run_projection(a.out, a.cluster.split(","), a.models.split(","), [int(x) for x in a.gpus.split(",")],
                   a.per_gpu_batch, a.seq_len, a.mfu, a.overlap, a.grad_reduce_dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
