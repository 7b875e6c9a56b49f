"""Generation speed: our KV-cache generator vs Hugging Face `generate` and vs our own no-cache decoding.

    python benchmarks/generation.py                    # CPU: tiny model -> benchmarks/results/generation_cpu.csv
    python benchmarks/generation.py --model small --dtype bf16 --batch 8 --new-tokens 256   # GPU

The same weights run three ways, one process, greedy, no early stop (EOS off),
same batch, prompt length and number of new tokens:
  ours      posttrain/generation.generate (KV cache, the code PPO rollouts use)
  hf        transformers LlamaForCausalLM.generate (its own KV cache, SDPA attention)
  no_cache  our model re-run on the whole sequence for every new token
Rows report new tokens per second (batch * new tokens / median wall time, prefill
included), the speed ratios ours/hf and ours/no_cache (median over rounds of the
within-round ratio, by wall time and by this process's CPU time), and whether ours
and hf produced the same tokens. Goals: >= 1.0x hf on CPU, and >= 5x no_cache at
256 new tokens. After a warm-up, --repeats rounds run every provider back to back,
alternating the order, so load on a shared machine hits them alike; the CPU-time
ratio is the robust one there (other jobs steal wall time, not our CPU seconds).
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from megatron_jinpan import device as devices  # noqa: E402
from megatron_jinpan.models import Llama, get_model_config, init_weights  # noqa: E402
from megatron_jinpan.perf.metadata import run_metadata  # noqa: E402
from megatron_jinpan.posttrain.generation import generate, single_device_mesh  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="registry name (debug, tiny, small, llama-7b, ...)")
    p.add_argument("--batch", default="1,8", help="comma list of batch sizes")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", default="64,256", help="comma list of new-token counts")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (the medians are reported)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: 1 on CPU, where a shared machine makes OpenMP spin)")
    p.add_argument("--no-cache-max", type=int, default=256, help="skip no_cache above this many new tokens")
    p.add_argument("--no-cache-max-batch", type=int, default=1,
                   help="skip no_cache above this batch (its cost grows with the square of the length: at batch 4 "
                        "and 256 tokens one run takes minutes on CPU, and the cache's advantage only grows with batch)")
    p.add_argument("--no-cache-repeats", type=int, default=2, help="rounds that include no_cache")
    p.add_argument("--out", default=None, help="CSV path (default benchmarks/results/generation_<device>.csv)")
    return p.parse_args(argv)


def hf_model_from(model: Llama, dtype):
    """transformers' LlamaForCausalLM with our model's weights (our names are HF's minus `model.`)."""
    import transformers

    from megatron_jinpan.checkpoint.hf import config_to_hf, hf_name

    hf_cfg = config_to_hf(model.cfg, dtype)
    config = transformers.LlamaConfig(**{k: v for k, v in hf_cfg.items() if k not in ("architectures",)})
    config._attn_implementation = "sdpa"
    hf = transformers.LlamaForCausalLM(config).to(dtype)
    state = {hf_name(k): v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if [m for m in missing if not m.endswith("rotary_emb.inv_freq")] or unexpected:
        raise RuntimeError(f"weight names do not map: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return hf.to(next(model.parameters()).device).eval()


@torch.no_grad()
def no_cache_decode(model, tokens: torch.Tensor, new_tokens: int) -> torch.Tensor:
    for _ in range(new_tokens):
        logits = model(tokens)[:, -1, : model.cfg.vocab_size]
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens


def median(xs):
    return statistics.median(xs)


def interleaved_times(fns: dict, repeats: int, device, limited: dict | None = None) -> tuple[dict, dict, dict]:
    """Wall and CPU (process) seconds of each provider in each of `repeats` rounds after a warm-up.

    Providers alternate within a round (and the order flips every round), so a busy machine slows them
    alike instead of whichever ran during a spike. CPU time is what this process used: on a shared,
    oversubscribed CPU it is far less noisy than wall time (other jobs steal wall time, not our CPU
    seconds), while on an idle machine and on GPU the two agree. A provider in `limited` (name -> n) runs
    in the first n rounds only, without a warm-up (the slow no-cache decoding: the others warm the model)."""
    limited = limited or {}
    results = {name: fn() for name, fn in fns.items() if name not in limited}  # warm-up
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            if r >= limited.get(name, repeats):
                continue
            devices.synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            results[name] = fns[name]()
            devices.synchronize(device)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu, results


def main(argv=None) -> None:
    args = parse_args(argv)
    device = devices.resolve_device(args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    cfg = get_model_config(args.model)
    model = init_weights(Llama(cfg), seed=0).to(device=device, dtype=dtype).eval()
    hf = hf_model_from(model, dtype)
    mesh = single_device_mesh(device)
    meta = run_metadata(device)
    rows = []
    for batch in [int(x) for x in args.batch.split(",")]:
        for new in [int(x) for x in args.new_tokens.split(",")]:
            prompts = torch.randint(3, cfg.vocab_size, (batch, args.prompt_len),
                                    generator=torch.Generator().manual_seed(batch)).to(device)
            fns = {
                "ours": lambda: generate([model], mesh, prompts.tolist(), max_new_tokens=new, eos_id=None),
                "hf": lambda: hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new,
                                          min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0),
            }
            if new <= args.no_cache_max and batch <= args.no_cache_max_batch:
                fns["no_cache"] = lambda: no_cache_decode(model, prompts, new)
            load_before = os.getloadavg()[0]
            wall, cpu, out = interleaved_times(fns, args.repeats, device, {"no_cache": args.no_cache_repeats})
            same = out["ours"].responses == out["hf"][:, args.prompt_len:].tolist()
            tokens = batch * new
            # Ratios are medians over rounds of the within-round ratio (both ran back to back).
            ratio = lambda times, other: median([o / s for o, s in zip(times[other], times["ours"])])  # noqa: E731
            nc = "no_cache" in fns
            row = {"model": args.model, "dtype": args.dtype, "batch": batch, "prompt_len": args.prompt_len,
                   "new_tokens": new, "rounds": args.repeats,
                   "ours_tok_s": round(tokens / median(wall["ours"]), 1),
                   "hf_tok_s": round(tokens / median(wall["hf"]), 1),
                   "no_cache_tok_s": round(tokens / median(wall["no_cache"]), 1) if nc else "",
                   "ours_vs_hf": round(ratio(wall, "hf"), 2),
                   "ours_vs_no_cache": round(ratio(wall, "no_cache"), 2) if nc else "",
                   "ours_vs_hf_cpu_time": round(ratio(cpu, "hf"), 2),
                   "ours_vs_no_cache_cpu_time": round(ratio(cpu, "no_cache"), 2) if nc else "",
                   "same_tokens_as_hf": same, "threads": torch.get_num_threads(),
                   "load_avg_1m": round((load_before + os.getloadavg()[0]) / 2, 2), **meta}
            rows.append(row)
            print({k: row[k] for k in ("batch", "new_tokens", "ours_tok_s", "hf_tok_s", "no_cache_tok_s",
                                       "ours_vs_hf", "ours_vs_no_cache", "ours_vs_hf_cpu_time",
                                       "ours_vs_no_cache_cpu_time", "same_tokens_as_hf", "load_avg_1m")}, flush=True)
    tag = "cpu" if device.type == "cpu" else devices.device_name(device).replace(" ", "_").lower()
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"generation_{tag}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
