"""`jinpan pretrain`: run under torchrun, or spawn --nproc local workers.

    torchrun --nproc-per-node 4 -m megatron_jinpan pretrain --config configs/pretrain/demo.yaml parallel.tp=2
    jinpan pretrain --config configs/pretrain/demo.yaml --nproc 4 parallel.tp=2 parallel.pp=2
"""
from __future__ import annotations

import os

from ..parallel.local import free_port, set_worker_env


def _worker(rank: int, world: int, port: int, cfg, entry) -> None:
    set_worker_env(rank, world, port)
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    entry(cfg)


def launch(cfg, entry, nproc: int) -> None:
    """Run entry(cfg) on nproc local processes (or in-process when already launched / nproc=1)."""
    from ..parallel.validate import validate_config

    under_launcher = "WORLD_SIZE" in os.environ
    world = int(os.environ["WORLD_SIZE"]) if under_launcher else nproc
    validate_config(cfg, world)  # fail before any process starts
    if under_launcher or nproc == 1:
        entry(cfg)
        return
    import torch.multiprocessing as mp

    from .failure import supervise

    # Share the cores between workers rather than oversubscribing them.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    context = mp.start_processes(_worker, args=(nproc, free_port(), cfg, entry), nprocs=nproc, join=False,
                                 start_method="spawn")
    supervise(context, cfg)  # a dead rank: RankFailure naming it, the others stopped, where to resume


def _pretrain_entry(cfg) -> None:
    from .loop import pretrain

    pretrain(cfg)


def cmd_pretrain(args) -> int:
    from ..config import load_config

    cfg = load_config(args.config, args.overrides)
    launch(cfg, _pretrain_entry, args.nproc)
    return 0


def add_training_command(subparsers, name: str, func, *, help: str, description: str, config_example: str,
                         overrides_example: str, config_required: bool = False):
    """A `jinpan <name>` subcommand in the shape every training command shares: --config, --nproc and trailing
    dotted key=value overrides. Returns the parser for command-specific options."""
    p = subparsers.add_parser(name, help=help, description=description)
    p.add_argument("--config", required=config_required, help=f"YAML recipe, e.g. {config_example}")
    p.add_argument("--nproc", type=int, default=1, help="local worker processes when not under torchrun")
    p.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {overrides_example}")
    p.set_defaults(func=func, accepts_overrides=True)
    return p


def register(subparsers) -> None:
    add_training_command(subparsers, "pretrain", cmd_pretrain, help="(continued) pretraining",
                         description="Pretrain per a YAML recipe; trailing key=value items override it.",
                         config_example="configs/pretrain/demo.yaml",
                         overrides_example="parallel.tp=2 train.steps=100")
