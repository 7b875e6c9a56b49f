"""Engine overhead: one process of our trainer vs a plain Hugging Face LlamaForCausalLM + AdamW loop, same shape.

    python benchmarks/overhead.py --rounds 5 --steps 12 --out benchmarks/results/overhead_cpu.csv

Shape (issue #17): the `tiny` model (8 layers, hidden 384, GQA 6/2 heads, vocab 8000), global batch 8 x
seq 256 in micro-batches of 4, fp32, SDPA attention, AdamW (same betas, eps, weight decay, lr), gradient
clipping at 1.0, on one process. Ours is `training.loop.pretrain` on mock tokens with everything a real run
does (LR schedule, loss-unit all-reduce, grad-norm, metrics; no eval, no checkpoint, straggler detector
off); tokens/s from its step_time_s. The plain loop is the textbook one: per micro-batch
`model(input_ids, labels=...).loss / 2`, backward; clip; step; zero_grad, on pre-generated random tokens
(no data loading at all).

`--mode interleaved` (default): one run of ours per round, with one plain step run inside each of its steps
(through the task's `prepare` hook, after our data fetch) and timed on its own; ours = step_time_s minus
that plain step. Both see the same machine within the same second, so drift on a shared VM (+-10% over
minutes here) cancels; the ratio is median(plain step) / median(our step) per round.
`--mode separate`: the two loops run one after the other, alternating which goes first; noisier.
The first `--warmup` steps of each run are dropped; the reported ratio is the median over rounds.

`--profile-out CSV`: where the time goes -- torch.profiler self CPU time per op, ms per optimizer step, ours
beside the plain loop (`--profile-steps` steps each after two unprofiled ones), GEMM and non-GEMM totals first:

    python benchmarks/overhead.py --rounds 0 --profile-out benchmarks/results/overhead_profile_cpu.csv
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GLOBAL, MICRO, SEQ = 8, 4, 256


def ours(steps: int, warmup: int, run_dir: str) -> float:
    from megatron_jinpan.training.loop import pretrain

    records = pretrain(_ours_config(steps, run_dir)).records[warmup:]
    return GLOBAL * SEQ / statistics.median(r["step_time_s"] for r in records)


def _ours_config(steps: int, run_dir: str):
    from megatron_jinpan.config import load_config

    return load_config(None, [
        "model.name=tiny", f"train.global_batch={GLOBAL}", f"train.micro_batch={MICRO}", f"train.seq_len={SEQ}",
        "train.dtype=fp32", "train.device=cpu", "kernels.attention=sdpa", "data.mock=true", f"train.steps={steps}",
        "train.eval_interval=0", "log.progress=false", "log.tensorboard=false", "checkpoint.resume=never",
        "checkpoint.save_on_exit=false", f"run_dir={run_dir}"])


def _ours_with_hook(steps: int, run_dir: str, before_step) -> list[dict]:
    """Records of one run of ours that calls `before_step(step)` inside each timed step, after its data fetch
    (through the task's `prepare` hook)."""
    from dataclasses import replace

    from megatron_jinpan.training.loop import pretrain
    from megatron_jinpan.training.task import language_model_task

    def make_task(cfg, mesh):
        def prepare(microbatches, step):
            before_step(step)
            return microbatches
        return replace(language_model_task(cfg, mesh), prepare=prepare)

    return pretrain(_ours_config(steps, run_dir), make_task=make_task).records


def interleaved(steps: int, warmup: int, run_dir: str) -> tuple[float, float]:
    """(ours, plain) tokens/s from one run of ours with a plain step timed inside each of its steps."""
    plain_step = PlainLoop()
    plain_s: list[float] = []
    records = _ours_with_hook(steps, run_dir, lambda step: plain_s.append(plain_step()))
    ours_s = [r["step_time_s"] - p for r, p in zip(records, plain_s)][warmup:]
    return GLOBAL * SEQ / statistics.median(ours_s), GLOBAL * SEQ / statistics.median(plain_s[warmup:])


class PlainLoop:
    """The textbook Hugging Face loop; each call runs one optimizer step and returns its seconds."""

    def __init__(self):
        from transformers import LlamaConfig, LlamaForCausalLM

        from megatron_jinpan.models import get_model_config

        m = get_model_config("tiny")
        hf_cfg = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                             num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
                             num_key_value_heads=m.num_kv_heads, max_position_embeddings=m.max_seq_len,
                             rope_theta=m.rope_theta, rms_norm_eps=m.norm_eps, tie_word_embeddings=False,
                             attn_implementation="sdpa")
        torch.manual_seed(0)
        self.vocab = m.vocab_size
        self.model = LlamaForCausalLM(hf_cfg).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        self.gen = torch.Generator().manual_seed(0)

    def __call__(self) -> float:
        batches = [torch.randint(0, self.vocab, (MICRO, SEQ), generator=self.gen) for _ in range(GLOBAL // MICRO)]
        t0 = time.perf_counter()
        for ids in batches:
            (self.model(input_ids=ids, labels=ids).loss / len(batches)).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0


def plain(steps: int, warmup: int) -> float:
    step = PlainLoop()
    times = [step() for _ in range(steps)]
    return GLOBAL * SEQ / statistics.median(times[warmup:])


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def profile_ops(steps: int, run_dir: str) -> tuple[dict, dict]:
    """{op name: self CPU ms per step} of ours and of the plain loop, `steps` steps each after two warm-up steps."""
    from torch.profiler import ProfilerActivity, profile

    def per_step(prof) -> dict:
        return {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages()}

    profiler = profile(activities=[ProfilerActivity.CPU])

    def start_at_third_step(step):  # from the third step's forward to the end of the run: `steps` whole steps
        if step == 2:
            profiler.__enter__()

    _ours_with_hook(2 + steps, run_dir, start_at_third_step)
    profiler.__exit__(None, None, None)
    ours_ms = per_step(profiler)

    plain_step = PlainLoop()
    for _ in range(2):
        plain_step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            plain_step()
    return ours_ms, per_step(prof)


def profile_rows(ours_ms: dict, plain_ms: dict, top: int = 25) -> list[dict]:
    """Totals (all, GEMM, non-GEMM) then the `top` ops by the larger of the two, ms per step."""
    def total(ms, keep):
        return sum(v for k, v in ms.items() if keep(k))

    rows = [{"op": name, "ours_ms_per_step": total(ours_ms, keep), "plain_hf_ms_per_step": total(plain_ms, keep)}
            for name, keep in (("TOTAL", lambda k: True), ("GEMM", lambda k: k in GEMM_OPS),
                               ("non-GEMM", lambda k: k not in GEMM_OPS))]
    names = sorted(set(ours_ms) | set(plain_ms), key=lambda k: -max(ours_ms.get(k, 0.0), plain_ms.get(k, 0.0)))
    rows += [{"op": k, "ours_ms_per_step": ours_ms.get(k, 0.0), "plain_hf_ms_per_step": plain_ms.get(k, 0.0)}
             for k in names[:top]]
    return rows


def write_csv(path: str, rows: list[dict], meta: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) + list(meta))
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **meta})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--mode", choices=("interleaved", "separate"), default="interleaved")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--run-dir", default="runs/overhead")
    ap.add_argument("--out", default="benchmarks/results/overhead_cpu.csv")
    ap.add_argument("--profile-out", help="also profile both loops and write self CPU ms per op to this CSV")
    ap.add_argument("--profile-steps", type=int, default=3)
    args = ap.parse_args()
    from megatron_jinpan.perf.metadata import git_commit, hardware

    meta = {"shape": f"tiny gb{GLOBAL} mb{MICRO} seq{SEQ} fp32 sdpa, 1 process", "threads": torch.get_num_threads(),
            "hardware": hardware(), "commit": git_commit()}
    if args.profile_out:
        rows = profile_rows(*profile_ops(args.profile_steps, args.run_dir))
        write_csv(args.profile_out, rows, meta)
        for row in rows[:3]:
            print(f"{row['op']}: ours {row['ours_ms_per_step']:.0f} ms/step, plain HF {row['plain_hf_ms_per_step']:.0f}")
        print(f"profile -> {args.profile_out}")
    if args.rounds <= 0:
        return

    rows = []
    for r in range(args.rounds):
        if args.mode == "interleaved":
            order = ("interleaved",)
            tok = dict(zip(("ours", "plain"), interleaved(args.steps, args.warmup, args.run_dir)))
        else:
            order = ("ours", "plain") if r % 2 == 0 else ("plain", "ours")
            tok = {}
            for name in order:
                tok[name] = (ours(args.steps, args.warmup, args.run_dir) if name == "ours"
                             else plain(args.steps, args.warmup))
        rows.append({"round": r, "order": ",".join(order), "ours_tok_s": tok["ours"], "plain_hf_tok_s": tok["plain"],
                     "ratio": tok["ours"] / tok["plain"]})
        print(f"round {r}: ours {tok['ours']:.0f} tok/s, plain HF {tok['plain']:.0f} tok/s, ratio {rows[-1]['ratio']:.3f}",
              flush=True)
    rows.append({"round": "median", "order": "", "ours_tok_s": statistics.median(x["ours_tok_s"] for x in rows),
                 "plain_hf_tok_s": statistics.median(x["plain_hf_tok_s"] for x in rows),
                 "ratio": statistics.median(x["ratio"] for x in rows)})
    write_csv(args.out, rows, meta)
    print(f"ours / plain HF loop: {rows[-1]['ratio']:.3f}x tokens/s (median of {args.rounds} rounds) -> {args.out}")


if __name__ == "__main__":
    main()
