"""Multiple-choice scoring speed of the eval engine: one row per option vs options sharing their context.

    python benchmarks/eval_mcq.py                       # CPU, debug model -> benchmarks/results/eval_mcq_cpu.csv
    python benchmarks/eval_mcq.py --model tiny --questions 64 --prompt-len 512 --dtype bf16   # GPU

A synthetic exam (random token prompts, four one-token options per question, as `jinpan eval mcq`
scores C-Eval letters) is scored by `EvalModel.score` twice, one process, same weights:
  per_option      every option its own row (what a plain loglikelihood loop does)
  shared_context  the options of a question read at the last position of one row (the default)
Rows: questions/s of each, their ratio, and the largest difference of the log-likelihoods (must be ~0).
Best of --repeats after a warm-up, the two modes alternating (fair on a shared machine).
"""
from __future__ import annotations

import argparse
import csv
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from megatron_jinpan import device as devices  # noqa: E402
from megatron_jinpan.perf.metadata import run_metadata  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="debug")
    p.add_argument("--questions", type=int, default=32)
    p.add_argument("--prompt-len", default="64,256", help="comma list of prompt lengths (tokens)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from megatron_jinpan.config import Config
    from megatron_jinpan.eval.engine import EvalModel, open_mesh
    from megatron_jinpan.models import get_model_config
    from megatron_jinpan.parallel.parallelize import build_model

    device = devices.resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    mesh = open_mesh(1, 1, str(device))
    cfg = Config()
    cfg.model = get_model_config(args.model)
    cfg.model.max_seq_len = max(cfg.model.max_seq_len, max(int(x) for x in args.prompt_len.split(",")) + 8)
    cfg.train.device = str(device)
    chunks = build_model(cfg, mesh)
    for c in chunks:
        c.train(False)
    model = EvalModel(cfg=cfg, chunks=chunks, mesh=mesh, dtype=args.dtype)
    rng = random.Random(0)
    rows = []
    for plen in (int(x) for x in args.prompt_len.split(",")):
        requests = []
        for _ in range(args.questions):
            ctx = [1] + [rng.randrange(3, cfg.model.vocab_size) for _ in range(plen - 1)]
            requests += [(ctx, [rng.randrange(3, cfg.model.vocab_size)]) for _ in range(4)]
        best = {}
        results = {}
        for rep in range(args.repeats + 1):
            for mode in ("per_option", "shared_context"):
                model.share_context = mode == "shared_context"
                devices.synchronize(device)
                start = time.perf_counter()
                results[mode] = model.score(requests, batch_size=args.batch_size)
                devices.synchronize(device)
                if rep:  # the first round warms up
                    best[mode] = min(best.get(mode, float("inf")), time.perf_counter() - start)
        diff = max(abs(a[0] - b[0]) for a, b in zip(results["per_option"], results["shared_context"]))
        row = {"model": args.model, "prompt_len": plen, "questions": args.questions, "batch_size": args.batch_size,
               "dtype": args.dtype, "per_option_q_per_s": args.questions / best["per_option"],
               "shared_context_q_per_s": args.questions / best["shared_context"],
               "speedup": best["per_option"] / best["shared_context"], "max_abs_logprob_diff": diff,
               **run_metadata(device)}
        rows.append(row)
        print(f"prompt {plen}: per_option {row['per_option_q_per_s']:.1f} q/s, shared_context "
              f"{row['shared_context_q_per_s']:.1f} q/s ({row['speedup']:.2f}x), max |diff| {diff:.2e}")
    mesh.destroy()
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"eval_mcq_{device.type}.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
