"""Traffic ledger: every op of one decoder layer (and of the whole `tiny` model) forward + backward
under bf16 autocast, with its launches and bytes read/written, the per-layer totals and the ideal.

    python benchmarks/layer_traffic.py                                  # after: this tree, CPU
    git worktree add /tmp/wt_before <sha> && \\
      python benchmarks/layer_traffic.py --tree /tmp/wt_before --label before   # the same, another commit
    python benchmarks/layer_traffic.py --device cuda --out benchmarks/results/layer_traffic_gpu.csv

Setup: fp32 master weights and fp32 residual stream, bf16 autocast (the real training setup),
model `tiny` (hidden 384, 6/2 heads of 64, intermediate 1024), batch 2 x seq 60 (no weight dim
equals 2, 60 or 120, so activations are told apart by shape). Backends: `triton` (our kernels;
on CPU under the Triton interpreter, set here) and `torch` (SDPA + the PyTorch fallbacks).
Counting: `megatron_jinpan.perf.traffic.TrafficLedger`, a TorchDispatchMode: each aten op and
each `jinpan::` custom op (our Triton kernels) is one launch; bytes read = its tensor inputs,
written = its outputs. Not timed: the counts are the same on any machine with these dtypes.
The ideal (`ideal_layer_traffic`) writes and reads every activation once per consumer in its
compute dtype; the goal is layer activation bytes <= 1.25x of it.

Writes a CSV (rows of other labels already in it are kept, so before and after sit side by side)
and prints the per-op table of the layer and a before/after summary.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH, SEQ = 2, 60
FIELDS = ["label", "commit", "scope", "backend", "op", "launches", "bytes_read", "bytes_written",
          "act_bytes_read", "act_bytes_written", "ideal_act_bytes", "ratio_to_ideal", "act_casts",
          "model", "batch", "seq", "hardware", "torch", "load_avg"]


def import_tree(tree: Path):
    """Import megatron_jinpan (and its kernels/ as megatron_jinpan.kernels) from `tree`."""
    sys.path.insert(0, str(tree))
    import megatron_jinpan

    if Path(megatron_jinpan.__file__).resolve().parent != (tree / "megatron_jinpan").resolve():
        raise SystemExit(f"layer_traffic: megatron_jinpan was imported from {megatron_jinpan.__file__}, not {tree}")
    kernels = tree / "kernels"
    spec = importlib.util.spec_from_file_location("megatron_jinpan.kernels", kernels / "__init__.py",
                                                  submodule_search_locations=[str(kernels)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["megatron_jinpan.kernels"] = module
    spec.loader.exec_module(module)


def load_ledger():
    """The ledger from this script's tree (an older --tree may not have it)."""
    spec = importlib.util.spec_from_file_location("jinpan_traffic", ROOT / "megatron_jinpan" / "perf" / "traffic.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["jinpan_traffic"] = module
    spec.loader.exec_module(module)
    return module


def commit_of(tree: Path) -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def measure(backend: str, device: str, traffic, model_name: str):
    """-> {scope: (ledger, ideal or None, casts)} for one layer and the whole model."""
    import torch

    from megatron_jinpan.models import Llama, get_model_config, init_weights, ops
    from megatron_jinpan.models.ops import KernelChoice

    choice = (KernelChoice(attention="triton", norm="triton", rope="triton", swiglu="triton") if backend == "triton"
              else KernelChoice(attention="sdpa", norm="torch", rope="torch", swiglu="torch"))
    cfg = get_model_config(model_name)
    model = init_weights(Llama(cfg), seed=0).set_kernels(choice).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, SEQ, cfg.hidden_size, generator=g).to(device).requires_grad_()
    grad = torch.randn(BATCH, SEQ, cfg.hidden_size, generator=g).to(device)
    positions = torch.arange(SEQ, device=device).expand(BATCH, SEQ)
    cos, sin = ops.rotary_cos_sin(positions, cfg.head_dim, cfg.rope_theta, torch.float32)
    layer = model.layers["0"]
    results = {}

    def layer_step():
        with torch.autocast(device, dtype=torch.bfloat16):
            y = layer(x, cos, sin)
        y.backward(grad)

    tokens = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=g).to(device)

    def model_step():
        with torch.autocast(device, dtype=torch.bfloat16):
            logits = model(tokens)
        logits.float().square().mean().backward()

    for scope, step in (("layer", layer_step), ("model", model_step)):
        step()  # warm-up (Triton compiles / interpreter caches); not counted
        model.zero_grad(set_to_none=True)
        with traffic.TrafficLedger(BATCH, SEQ) as ledger:
            step()
        model.zero_grad(set_to_none=True)
        ideal = None
        if scope == "layer":
            ideal = traffic.ideal_layer_traffic(cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim,
                                                cfg.num_kv_heads * cfg.head_dim, cfg.num_heads, BATCH * SEQ)["total"]
        results[scope] = (ledger, ideal)
    return results, cfg


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", default=str(ROOT), help="repository checkout whose model/kernels to measure")
    parser.add_argument("--label", default="after", help="name of this measurement in the CSV (before/after)")
    parser.add_argument("--backends", default="triton,torch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "layer_traffic_cpu.csv"))
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    tree = Path(args.tree).resolve()
    import_tree(tree)
    traffic = load_ledger()
    import torch

    from megatron_jinpan.perf.metadata import hardware

    meta = dict(model=args.model, batch=BATCH, seq=SEQ, hardware=hardware(), torch=torch.__version__,
                load_avg=f"{os.getloadavg()[0]:.2f}", label=args.label, commit=commit_of(tree))
    rows = []
    for backend in args.backends.split(","):
        results, cfg = measure(backend, args.device, traffic, args.model)
        for scope, (ledger, ideal) in results.items():
            for r in ledger.table():
                rows.append(dict(meta, scope=scope, backend=backend, op=r.op, launches=r.launches,
                                 bytes_read=r.read, bytes_written=r.written, act_bytes_read=r.act_read,
                                 act_bytes_written=r.act_written))
            t = ledger.totals()
            act = t.act_read + t.act_written
            rows.append(dict(meta, scope=scope, backend=backend, op="TOTAL", launches=t.launches, bytes_read=t.read,
                             bytes_written=t.written, act_bytes_read=t.act_read, act_bytes_written=t.act_written,
                             ideal_act_bytes=ideal or "", ratio_to_ideal=f"{act / ideal:.3f}" if ideal else "",
                             act_casts=len(ledger.casts())))
            if scope == "layer":
                print(f"\n[{args.label} @ {meta['commit']}] {backend}: one {args.model} decoder layer, fwd+bwd, "
                      f"bf16 autocast, batch {BATCH} x seq {SEQ}")
                print(f"  {'op':44s} {'launches':>8s} {'MB read':>9s} {'MB written':>10s} {'act MB':>8s}")
                for r in ledger.table():
                    print(f"  {r.op:44s} {r.launches:8d} {r.read / 1e6:9.3f} {r.written / 1e6:10.3f} "
                          f"{(r.act_read + r.act_written) / 1e6:8.3f}")
                print(f"  {'TOTAL':44s} {t.launches:8d} {t.read / 1e6:9.3f} {t.written / 1e6:10.3f} {act / 1e6:8.3f}"
                      f"   ideal act {ideal / 1e6:.3f} MB -> {act / ideal:.3f}x; activation casts {len(ledger.casts())}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    if out.exists():
        with out.open() as f:
            kept = [r for r in csv.DictReader(f) if r["label"] != args.label]
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(kept + rows)
    summary = {}
    for r in kept + rows:
        if r["op"] == "TOTAL":
            summary.setdefault((r["backend"], r["scope"]), {})[r["label"]] = r
    print("\nlaunches / activation MB / ratio to ideal, by label")
    for (backend, scope), by_label in sorted(summary.items()):
        cells = [f"{label}: {r['launches']} launches, "
                 f"{(int(r['act_bytes_read']) + int(r['act_bytes_written'])) / 1e6:.2f} MB"
                 + (f", {r['ratio_to_ideal']}x ideal, {r['act_casts']} casts" if r["ratio_to_ideal"] else "")
                 for label, r in sorted(by_label.items())]
        print(f"  {backend:6s} {scope:5s}  " + " | ".join(cells))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
