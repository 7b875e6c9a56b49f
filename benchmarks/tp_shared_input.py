"""Step time of tp=2 (with and without SP) before vs after "one TP input collective per block".

    python benchmarks/tp_shared_input.py --before c043158~1 --after c043158       # -> results/tp_shared_input_tiny_cpu.csv
    python benchmarks/tp_shared_input.py --before c043158~1 --after c043158 --model debug --rounds 5 --steps 8
    python benchmarks/tp_shared_input.py --before c043158~1 --rounds 1 --steps 3 --out /tmp/t.csv   # quick look

`--before REV` is the commit without the change (separate column-parallel q/k/v and gate/up: each
issues its own all-gather under SP, its own input-gradient all-reduce without); `--after REV` the
commit with it (default: this working tree). Their sources are taken with `git archive` into
temporary directories, so nothing else differs between the two. Each round runs, for
sp off and on, both trees back to back (alternating which goes first), in separate processes: the
real trainer (`perf.runner.run_layout_bench`, 2 gloo processes, tp=2, mock data, fp32) on a shortened
`tiny` shape (hidden 384, 4 layers; `--model debug`: hidden 64, where the collectives' latency is a larger
share of the step), so rounds share the machine's load. The first step of each run is
dropped. Reported per run: mean and least-disturbed step time, the TP collectives per step (calls and
bytes, from comm accounting) and the 1-minute load average at its start; the summary is the median
over rounds of after/before.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# One measurement, run inside a source tree (cwd): prints the CSV row fields as JSON on the last line.
_CHILD = r"""
import json, sys
from megatron_jinpan.perf.runner import Layout, run_layout_bench
a = json.loads(sys.argv[1])
res = run_layout_bench(Layout(world=2, tp=2, micro_batch=a["micro_batch"], sp=a["sp"]), model=a["model"],
                       steps=a["steps"], seq_len=a["seq_len"], batch_per_replica=a["batch"],
                       extra=a["extra"], measure_memory=False, timeout_s=a["timeout"], workdir=a["workdir"])
row = res["row"]
tp = {f"{op}": v for (op, g), v in (res["ranks"][0]["comm"].items() if res.get("ranks") else []) if g == "tp"}
out = {k: row.get(k) for k in ("status", "step_time_s", "step_time_min_s", "fb_min_s", "comm_exposed_s")}
out["tp_calls_per_step"] = sum(v["calls"] for v in tp.values())
out["tp_mb_per_step"] = round(sum(v["bytes"] for v in tp.values()) / 2**20, 3)
out["tp_ops"] = ";".join(f"{op}={v['calls']}" for op, v in sorted(tp.items()))
print(json.dumps(out))
"""


def measure(tree: Path, sp: bool, args, workdir: str) -> dict:
    spec = dict(sp=sp, model=args.model, steps=args.steps, seq_len=args.seq_len, batch=args.batch, micro_batch=args.micro_batch,
                extra=[f"model.num_layers={args.layers}", "train.dtype=fp32", "kernels.attention=sdpa"],
                timeout=args.timeout, workdir=workdir)
    env = dict(os.environ, PYTHONPATH=str(tree))
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=args.timeout + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement in {tree} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_csv(rows: list[dict], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def checkout(rev: str, where: Path) -> tuple[Path, str]:
    """The source of `rev` (git archive) under `where`; returns (where, short commit)."""
    where.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    short = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.strip()
    return where, short


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="git revision without the shared-input change")
    ap.add_argument("--after", default=None, help="git revision with it (default: this working tree)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--model", default="tiny", help="registry shape (tiny: compute-bound on CPU; debug: "
                    "hidden 64, where the collectives' latency is a larger share of the step)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4, help="global batch (sequences per step)")
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--out", default=None, help="CSV (default benchmarks/results/tp_shared_input_<model>_cpu.csv)")
    args = ap.parse_args(argv)

    from megatron_jinpan.perf.metadata import git_commit, hardware

    out = Path(args.out or ROOT / "benchmarks" / "results" / f"tp_shared_input_{args.model}_cpu.csv")

    import torch

    with tempfile.TemporaryDirectory(prefix="jinpan_tp_trees_") as tmp:
        trees = {"before": checkout(args.before, Path(tmp) / "before")}
        if args.after:
            trees["after"] = checkout(args.after, Path(tmp) / "after")
        else:
            dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "megatron_jinpan"], cwd=ROOT,
                                        capture_output=True, text=True).stdout.strip())
            trees["after"] = (ROOT, git_commit() + ("+dirty" if dirty else ""))
        rows = []
        for rnd in range(args.rounds):
            for sp in (False, True):
                order = ["before", "after"] if (rnd + sp) % 2 == 0 else ["after", "before"]
                for which in order:
                    tree, rev = trees[which]
                    load = os.getloadavg()[0]
                    with tempfile.TemporaryDirectory(prefix="jinpan_tp_run_") as work:
                        res = measure(tree, sp, args, work)
                    row = {"round": rnd, "code": which, "commit": rev, "sp": sp, **res,
                           "loadavg_1min_at_start": round(load, 2), "model": f"{args.model}/{args.layers} layers",
                           "tp": 2, "world_size": 2, "seq_len": args.seq_len, "global_batch": args.batch,
                           "micro_batch": args.micro_batch, "steps": args.steps, "hardware": hardware(),
                           "torch": torch.__version__}
                    rows.append(row)
                    write_csv(rows, out)  # after every run: a killed sweep keeps what it measured
                    print(f"[round {rnd}] sp={sp!s:5} {which:6} step {res['step_time_s']:.3f}s "
                          f"(min {res['step_time_min_s']:.3f}s) tp collectives/step {res['tp_calls_per_step']} "
                          f"({res['tp_ops']}) load {load:.1f}", flush=True)
    print(f"wrote {out}")
    for sp in (False, True):
        for key in ("step_time_s", "step_time_min_s"):
            ratios = []
            for rnd in range(args.rounds):
                pair = {r["code"]: r[key] for r in rows if r["round"] == rnd and r["sp"] == sp}
                ratios.append(pair["after"] / pair["before"])
            print(f"sp={sp!s:5} {key:16} after/before: median {statistics.median(ratios):.3f} "
                  f"(rounds: {', '.join(f'{x:.3f}' for x in ratios)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
