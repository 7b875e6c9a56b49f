"""`jinpan sft`: supervised fine-tuning with the pretraining loop (see posttrain/sft.py).

    jinpan sft --config configs/sft/tiny_stage1.yaml --nproc 2 [key=value ...]
    torchrun --nproc-per-node 8 -m megatron_jinpan sft --config configs/sft/llama7b_stage1.yaml
    jinpan sft --config configs/sft/tiny_stage2.yaml --eval-only --checkpoint runs/sft_tiny/stage1

--eval-only trains nothing: it loads --checkpoint (default checkpoint.load) on the configured
layout and prints the held-out metrics (eval_loss_<set>, and eval_exact_match / eval_contains
with train.eval_generate), also written to run_dir/eval.json.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..training.commands import add_training_command, launch


def _train_entry(cfg) -> None:
    from ..training.loop import pretrain
    from .sft import sft_task

    pretrain(cfg, make_task=sft_task)


def _eval_entry(cfg) -> None:
    from .. import device as devices
    from ..checkpoint.load import load_parallel_model
    from ..parallel.mesh import ParallelMesh
    from ..training.loop import evaluate
    from .sft import sft_task

    mesh = ParallelMesh.create(cfg.parallel.tp, cfg.parallel.pp, devices.resolve_device(cfg.train.device))
    try:
        cfg, chunks = load_parallel_model(cfg.checkpoint.load, mesh, cfg)
        task = sft_task(cfg, mesh)
        out = evaluate(chunks, task.eval_sets, task.loss_fn, cfg, mesh, task)
        if mesh.is_logging_rank:
            out = {"checkpoint": cfg.checkpoint.load, **out}
            Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
            (Path(cfg.run_dir) / "eval.json").write_text(json.dumps(out, indent=2) + "\n")
            print(json.dumps(out))
        mesh.barrier()
    finally:
        mesh.destroy()


def cmd_sft(args) -> int:
    from ..config import ConfigError, load_config
    from .sft import check_sft_config

    cfg = load_config(args.config, args.overrides)
    if args.checkpoint:
        cfg.checkpoint.load = args.checkpoint
    if args.eval_only and not cfg.checkpoint.load:
        raise ConfigError("--eval-only needs weights: pass --checkpoint PATH or set checkpoint.load")
    if not cfg.data.mock:
        from ..data import check_tokenizer

        check_tokenizer(cfg)
    check_sft_config(cfg)  # bad data/template/eval file: fail before any process starts
    launch(cfg, _eval_entry if args.eval_only else _train_entry, args.nproc)
    return 0


def register(subparsers) -> None:
    p = add_training_command(subparsers, "sft", cmd_sft, help="supervised fine-tuning (chat data, answer-only loss)",
                             description="Fine-tune per a YAML recipe; trailing key=value items override it.",
                             config_example="configs/sft/tiny_stage1.yaml",
                             overrides_example="parallel.tp=2 train.steps=100")
    p.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint (or checkpoint.load); no training")
    p.add_argument("--checkpoint", help="weights to start from / evaluate (sets checkpoint.load)")
