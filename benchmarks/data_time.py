"""How much of a training step waits for data, with background prefetch off and on (the demo layout).

    python -m megatron_jinpan data demo --output data/demo     # once: corpus, tokenizer, .bin/.idx
    python benchmarks/data_time.py --nproc 4 --steps 12 --out benchmarks/results/data_time_cpu.csv

Trains configs/pretrain/demo.yaml (tiny model, tp=2 x pp=2, SP, ZeRO-1, the real four-dataset blend
read from the memory-mapped .bin/.idx files) for `--steps` steps with data.prefetch=0 and =2 and reads
`data_time_s` / `step_time_s` from each run's metrics.jsonl (the logging rank; every rank reads the
same way). The first two steps are warm-up and left out; medians over the rest.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(nproc: int, steps: int, prefetch: int, run_dir: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "megatron_jinpan", "pretrain", "--config", "configs/pretrain/demo.yaml",
           "--nproc", str(nproc), f"train.steps={steps}", "train.eval_interval=0", "checkpoint.interval=0",
           "checkpoint.save_on_exit=false", "checkpoint.resume=never", "log.progress=false", "log.tensorboard=false",
           f"data.prefetch={prefetch}", f"run_dir={run_dir}"]
    subprocess.run(cmd, cwd=ROOT, check=True)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--run-dir", default="runs/data_time")
    ap.add_argument("--out", default="benchmarks/results/data_time_cpu.csv")
    args = ap.parse_args()
    if not (ROOT / "data/demo/tokenizer.model").exists():
        sys.exit("data/demo is missing: run `python -m megatron_jinpan data demo --output data/demo` first")
    from megatron_jinpan.perf.metadata import git_commit, hardware

    rows = []
    for prefetch in (0, 2):
        records = run(args.nproc, args.steps, prefetch, Path(args.run_dir) / f"prefetch{prefetch}")[2:]
        data = statistics.median(r["data_time_s"] for r in records)
        step = statistics.median(r["step_time_s"] for r in records)
        rows.append({"prefetch": prefetch, "steps_measured": len(records), "data_time_s": data, "step_time_s": step,
                     "data_share_pct": 100 * data / step, "layout": f"demo (tiny tp2 pp2 sp zero1, {args.nproc} proc)",
                     "hardware": hardware(), "commit": git_commit()})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for r in rows:
        print(f"data.prefetch={r['prefetch']}: data {r['data_time_s'] * 1e3:.2f} ms of a {r['step_time_s']:.3f} s step "
              f"= {r['data_share_pct']:.2f}% (median of {r['steps_measured']} steps) -> {args.out}")


if __name__ == "__main__":
    main()
