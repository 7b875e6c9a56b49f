"""`jinpan ppo`: PPO / GRPO with every role on one layout (see posttrain/ppo.py, docs/ppo.md).

    jinpan ppo --config configs/ppo/tiny.yaml --nproc 2 [key=value ...]
    torchrun --nproc-per-node 8 -m megatron_jinpan ppo --config configs/ppo/llama7b.yaml
"""
from __future__ import annotations

import os

from ..training.commands import add_training_command, launch


def _ppo_entry(cfg) -> None:
    from .ppo import train_ppo

    train_ppo(cfg)


def cmd_ppo(args) -> int:
    from ..config import load_config
    from .ppo import prepare_config

    cfg = load_config(args.config, args.overrides)
    world = int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else args.nproc
    prepare_config(cfg, world)  # errors before any process starts
    launch(cfg, _ppo_entry, args.nproc)
    return 0


def register(subparsers) -> None:
    add_training_command(subparsers, "ppo", cmd_ppo, help="PPO / GRPO against a reward model and/or a rule reward",
                         description="PPO per a YAML recipe; trailing key=value items override it.",
                         config_example="configs/ppo/tiny.yaml", overrides_example="ppo.kl_coef=0.1 parallel.tp=2",
                         config_required=True)
