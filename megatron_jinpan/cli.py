"""`jinpan` command line (also `python -m megatron_jinpan`).

Each area registers its own sub-commands: a module with
`register(subparsers)` that adds parsers whose `func(args)` runs the command.

    jinpan --help
    jinpan pretrain --config configs/pretrain/demo.yaml parallel.tp=2
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "megatron_jinpan.training.commands",    # pretrain (sft, reward, ppo later)
    "megatron_jinpan.data.commands",        # tokenizer, preprocess, data
    "megatron_jinpan.checkpoint.commands",  # convert, generate
    "megatron_jinpan.perf.commands",        # bench
    "megatron_jinpan.posttrain.preference_commands",  # reward, reward score, dpo
    "megatron_jinpan.posttrain.sft_commands",  # sft
    "megatron_jinpan.posttrain.ppo_commands",  # ppo
    "megatron_jinpan.eval.commands",        # eval ppl|mcq|classify|generate|judge|compare
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jinpan", description="megatron-jinpan: 3D-parallel LLaMA training")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):  # that area is not built yet
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = list(getattr(args, "overrides", []) or []) + extra
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        from .config import ConfigError

        if isinstance(exc, (ConfigError, FileNotFoundError)) or getattr(exc, "user_facing", False):
            print(f"jinpan {args.command}: error: {exc}", file=sys.stderr)
            return getattr(exc, "exit_code", 2)
        raise


if __name__ == "__main__":
    sys.exit(main())
