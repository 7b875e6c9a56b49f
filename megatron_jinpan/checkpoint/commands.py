"""`jinpan convert ...` and `jinpan generate`.

    jinpan convert hf-to-mj   --input HF_DIR   --output CKPT_DIR [--tp N --pp N]
    jinpan convert mj-to-hf   --input CKPT_DIR --output HF_DIR [--max-shard-size 5GB] [--task causal-lm|reward]
    jinpan convert meta-to-mj --input META_DIR --output CKPT_DIR
    jinpan convert lora-merge --input LORA_CKPT --output CKPT_DIR [--base BASE]   # adapters folded into the base
    jinpan convert mj-to-hf --lora --input LORA_CKPT --output ADAPTER_DIR          # PEFT adapter directory
    jinpan convert resize     --input CKPT_OR_HF --output CKPT_DIR --tokenizer NEW.model
                              [--base-tokenizer OLD.model --init subtokens] [--vocab-size N] [--hf-output]
    jinpan generate --checkpoint CKPT_OR_HF (--prompt "..." | --input X.jsonl [--output Y.jsonl])
                    [--template NAME] [--tokenizer T] [--max-new-tokens N] [--temperature T] [--top-p P]
                    [--top-k K] [--greedy] [--seed S] [--nproc N --tp N --pp N]   (checkpoint/generate.py)
"""
from __future__ import annotations

import sys


def cmd_convert(args) -> int:
    from .convert import hf_to_mj, meta_to_mj, mj_to_hf
    from .resize import resize_vocab

    progress = not args.no_progress
    if args.direction == "lora-merge" or getattr(args, "lora", False):
        from .lora import export_peft, lora_merge

        if args.direction == "lora-merge":
            out = lora_merge(args.input, args.output, base=args.base, overwrite=args.overwrite, progress=progress)
        elif args.direction == "mj-to-hf":
            out = export_peft(args.input, args.output, base=args.base, overwrite=args.overwrite)
        else:
            raise ValueError("--lora goes with mj-to-hf (PEFT adapter export); use lora-merge to fold adapters in")
        print(f"wrote {out}")
        return 0
    if args.direction == "resize":
        if not args.tokenizer:
            raise ValueError("convert resize needs --tokenizer NEW.model (the extended tokenizer)")
        out = resize_vocab(args.input, args.output, args.tokenizer, base_tokenizer=args.base_tokenizer,
                           vocab_size=args.vocab_size, init=args.init, hf_output=args.hf_output,
                           max_shard_size=args.max_shard_size, overwrite=args.overwrite, progress=progress)
    elif args.direction == "hf-to-mj":
        out = hf_to_mj(args.input, args.output, tp=args.tp, pp=args.pp, overwrite=args.overwrite, progress=progress,
                       task=args.task)
    elif args.direction == "mj-to-hf":
        out = mj_to_hf(args.input, args.output, max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                       progress=progress, task=args.task)
    else:
        out = meta_to_mj(args.input, args.output, overwrite=args.overwrite, progress=progress,
                         tokenizer=args.tokenizer)
    print(f"wrote {out}")
    return 0


def _find_tokenizer(checkpoint: str, explicit: str | None):
    from pathlib import Path

    from ..data.tokenizer import load_tokenizer
    from . import format as fmt
    from .convert import find_tokenizer
    from .load import resolve_source

    if explicit:
        return load_tokenizer(explicit, key="--tokenizer")
    kind, path = resolve_source(checkpoint)
    if kind == "hf":
        if any((Path(path) / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
            return load_tokenizer(path, key="--checkpoint")
    else:
        tok = find_tokenizer(path, fmt.read_meta(path))
        if tok is not None:
            if tok.is_dir() and (tok / "tokenizer.model").is_file() and not (tok / "tokenizer_config.json").is_file():
                tok = tok / "tokenizer.model"
            return load_tokenizer(tok, key="tokenizer")
    raise ValueError(f"no tokenizer is recorded for {checkpoint}; pass --tokenizer T.model")


def cmd_generate(args) -> int:
    from .generate import cmd_generate as run

    return run(args)


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert checkpoints: hf-to-mj, mj-to-hf, meta-to-mj, resize")
    p.add_argument("direction", choices=["hf-to-mj", "mj-to-hf", "meta-to-mj", "resize", "lora-merge"])
    p.add_argument("--input", required=True, help="source directory")
    p.add_argument("--output", required=True, help="new output directory (never overwritten unless --overwrite)")
    p.add_argument("--tp", type=int, default=None, help="hf-to-mj: check divisibility for this tensor-parallel size")
    p.add_argument("--pp", type=int, default=None, help="hf-to-mj: check this pipeline size")
    p.add_argument("--max-shard-size", default="5GB", help="mj-to-hf, resize --hf-output: safetensors shard size (e.g. 2GB, 500MB)")
    p.add_argument("--tokenizer", default=None, help="meta-to-mj: tokenizer.model to store with the checkpoint; "
                   "resize: the extended tokenizer")
    p.add_argument("--base-tokenizer", default=None, help="resize: the checkpoint's own tokenizer (for --init subtokens)")
    p.add_argument("--vocab-size", type=int, default=None, help="resize: rows to resize to (default: tokenizer size)")
    p.add_argument("--init", default="mean", choices=["mean", "subtokens"], help="resize: how new rows start")
    p.add_argument("--hf-output", action="store_true", help="resize: write a Hugging Face directory instead")
    p.add_argument("--task", default=None, choices=["causal-lm", "reward"],
                   help="hf-to-mj / mj-to-hf: the model kind expected (reward = LlamaForSequenceClassification "
                   "with a value head); default: whatever the input is")
    p.add_argument("--lora", action="store_true", help="mj-to-hf: write the LoRA adapters of a train.trainable=lora "
                   "checkpoint as a PEFT adapter directory (adapter_config.json, adapter_model.safetensors)")
    p.add_argument("--base", default=None, help="lora-merge, mj-to-hf --lora: the base the adapters sit on "
                   "(default: the checkpoint.load recorded at training time)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_convert)

    g = subparsers.add_parser("generate", help="continue prompts with a checkpoint (KV cache, any tp/pp/dp layout)")
    from .generate import add_arguments

    add_arguments(g)
    g.set_defaults(func=cmd_generate)
