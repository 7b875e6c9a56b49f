"""Resize the embedding and LM head of a checkpoint to an extended tokenizer.

    jinpan convert resize --input ckpt/llama-7b --tokenizer llama_zh.model --output ckpt/llama-7b-zh
    jinpan convert resize --input hf/llama-7b --tokenizer llama_zh.model --base-tokenizer llama.model \
        --init subtokens --output ckpt/llama-7b-zh

The first `old_vocab` rows are kept bit-identical (an extended tokenizer keeps
every old id); the new rows start at the mean of the old rows (`mean`), or at
the mean of the old rows of the pieces the base tokenizer splits each new
piece into (`subtokens`). The output is one of our weights checkpoints with
`model.vocab_size` updated; every other tensor is copied one at a time.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from . import format as fmt
from .convert import write_weights_checkpoint
from .load import read_model_state, resolve_source

VOCAB_TENSORS = ("embed_tokens.weight", "lm_head.weight")


def _model_config(path):
    kind, p = resolve_source(path)
    if kind == "hf":
        from .hf import HFReader

        reader = HFReader(p)
        try:
            return reader.config
        finally:
            reader.close()
    fmt.verify_checkpoint(p)
    return fmt.model_config_from_meta(fmt.read_meta(p))


def new_rows(old: torch.Tensor, new_vocab: int, init: str, new_tokenizer=None, base_tokenizer=None) -> torch.Tensor:
    """The rows old.shape[0] .. new_vocab-1 of a resized embedding/LM-head matrix."""
    old_vocab = old.shape[0]
    mean = old.float().mean(dim=0)
    rows = mean.expand(new_vocab - old_vocab, -1).clone()
    if init == "subtokens":
        for row, token_id in enumerate(range(old_vocab, new_vocab)):
            text = new_tokenizer.decode([token_id])
            ids = [i for i in base_tokenizer.encode(text) if 0 <= i < old_vocab]
            if ids:
                rows[row] = old[ids].float().mean(dim=0)
    return rows.to(old.dtype)


def resize_vocab(input_path, output_dir, tokenizer, *, base_tokenizer=None, vocab_size: int | None = None,
                 init: str = "mean", overwrite: bool = False, progress: bool = True) -> Path:
    from ..config import ConfigError
    from ..data.tokenizer import load_tokenizer

    if init not in ("mean", "subtokens"):
        raise ConfigError(f"--init {init!r}: choose mean or subtokens")
    new_tok = load_tokenizer(tokenizer, key="--tokenizer")
    base_tok = load_tokenizer(base_tokenizer, key="--base-tokenizer") if base_tokenizer else None
    if init == "subtokens" and base_tok is None:
        raise ConfigError("--init subtokens needs --base-tokenizer (the tokenizer the checkpoint was trained with)")
    cfg = _model_config(input_path)
    new_vocab = int(vocab_size or new_tok.vocab_size)
    if new_vocab < new_tok.vocab_size:
        raise ConfigError(f"--vocab-size {new_vocab} is smaller than the tokenizer's {new_tok.vocab_size} pieces")
    if new_vocab < cfg.vocab_size:
        raise ConfigError(f"new vocab {new_vocab} is smaller than the checkpoint's model.vocab_size={cfg.vocab_size}; "
                          "resize only grows the vocabulary (old ids must stay valid)")
    if base_tok is not None and base_tok.vocab_size > cfg.vocab_size:
        raise ConfigError(f"--base-tokenizer has {base_tok.vocab_size} pieces but the checkpoint's vocab is "
                          f"{cfg.vocab_size}; pass the tokenizer the checkpoint was trained with")
    new_cfg = dataclasses.replace(cfg, vocab_size=new_vocab)
    names = fmt.model_keys(new_cfg)
    old_shapes = fmt.model_shapes(cfg)
    dtypes = {}

    def fetch(name: str) -> torch.Tensor:
        (_, state) = read_model_state(input_path, [name], verify=False)
        tensor = state[name]
        dtypes[name] = tensor.dtype
        if name in VOCAB_TENSORS:
            tensor = torch.cat([tensor, new_rows(tensor, new_vocab, init, new_tok, base_tok)], dim=0)
        return tensor.contiguous()

    # Shapes for the writer; dtypes are those of the source (read the first tensor to learn them).
    first = read_model_state(input_path, [names[0]], verify=True)[1][names[0]]
    specs = {}
    for name in names:
        shape = tuple(old_shapes[name])
        if name in VOCAB_TENSORS:
            shape = (new_vocab, *shape[1:])
        specs[name] = (shape, first.dtype)
    return write_weights_checkpoint(
        Path(output_dir), new_cfg, specs, fetch,
        extra_meta={"source": {"format": "resize", "path": str(input_path), "old_vocab_size": cfg.vocab_size,
                               "init": init}},
        tokenizer_src=Path(tokenizer).parent if Path(tokenizer).is_file() else Path(tokenizer),
        overwrite=overwrite, progress=progress)
