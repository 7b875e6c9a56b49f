"""Resize the embedding and LM head of a checkpoint to an extended tokenizer.

    jinpan convert resize --input ckpt/llama-7b --tokenizer llama_zh.model --output ckpt/llama-7b-zh
    jinpan convert resize --input hf/llama-7b --tokenizer llama_zh.model --base-tokenizer llama.model \
        --init subtokens --output ckpt/llama-7b-zh
    jinpan convert resize --input hf/llama-7b --tokenizer llama_zh.model --output hf/llama-7b-zh --hf-output

The input is one of our checkpoints (a step dir, a checkpoints dir or run dir
with `latest`, or a converted weights dir) or a Hugging Face LLaMA directory.
The first `old_vocab` rows of `embed_tokens` and `lm_head` are kept
bit-identical (an extended tokenizer keeps every old id); the new rows start
at the mean of the old rows (`mean`), or at the mean of the old rows of the
pieces the base tokenizer splits each new piece into (`subtokens`; falls back
to the mean where the split gives nothing usable). A tied model has one
matrix, resized once. Every other tensor is copied unchanged, one at a time
(peak memory: one tensor, or one safetensors shard with `--hf-output`).
The output gets `model.vocab_size` updated and the new tokenizer stored beside
the weights; padding of the vocabulary for tensor parallelism happens when
the trainer loads it, so one resized checkpoint serves every layout.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from . import format as fmt
from .convert import _finish_output, _prepare_output, _progress, write_weights_checkpoint
from .format import CheckpointError
from .hf import HFReader, config_to_hf, copy_tokenizer_files, hf_name, parse_size, plan_shards
from .load import resolve_source

VOCAB_TENSORS = ("embed_tokens.weight", "lm_head.weight")
SPACE = "\u2581"  # sentencepiece's word-boundary marker


class _Source:
    """One tensor at a time from one of our checkpoints or an HF directory (opened once)."""

    def __init__(self, path):
        self.kind, self.path = resolve_source(path)
        if self.kind == "hf":
            self.reader = HFReader(self.path)
            self.config = self.reader.config
            self.keys = self.reader.our_keys()
            missing = [n for n in fmt.model_keys(self.config) if n not in self.keys]
            if missing:
                raise CheckpointError(f"{self.path} lacks tensors {missing[:8]}")
        else:
            fmt.verify_checkpoint(self.path)
            self.config = fmt.model_config_from_meta(fmt.read_meta(self.path))
            self.tensors = fmt.tensor_metadata(self.path)
            fmt.check_model_tensors(self.path, self.config, self.tensors)

    def shape_dtype(self, name: str) -> tuple[tuple, torch.dtype]:
        if self.kind == "hf":
            return self.reader.shape_dtype(self.keys[name])
        shape, dtype = self.tensors[fmt.MODEL_PREFIX + name]
        return tuple(shape), dtype

    def get(self, name: str) -> torch.Tensor:
        if self.kind == "hf":
            return self.reader.get(self.keys[name])
        shape, dtype = self.tensors[fmt.MODEL_PREFIX + name]
        wanted = {fmt.MODEL_PREFIX + name: torch.empty(tuple(shape), dtype=dtype)}
        fmt.read_tensors(self.path, wanted)
        return wanted[fmt.MODEL_PREFIX + name]

    def close(self) -> None:
        if self.kind == "hf":
            self.reader.close()


def _piece(tok, token_id: int) -> str:
    if tok._sp is not None:
        return tok._sp.id_to_piece(token_id)
    return tok._hf.convert_ids_to_tokens(token_id)


def subtoken_ids(piece: str, base_tokenizer, old_vocab: int) -> list[int]:
    """Ids of the pieces `base_tokenizer` splits `piece` into (no unknown/special ids, all < old_vocab).

    The word-boundary marker is handled like the piece has it: a word-initial piece ("▁银行") keeps the
    base's "▁", a word-internal one ("银") loses the dummy "▁" sentencepiece puts before every text.
    """
    initial = piece.startswith(SPACE)
    text = (piece[len(SPACE):] if initial else piece).replace(SPACE, " ")
    if base_tokenizer._sp is not None:
        sp = base_tokenizer._sp
        pieces = sp.encode(text, out_type=str)
        to_id = sp.piece_to_id
        drop = {sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()}
    else:
        hf = base_tokenizer._hf
        pieces = hf.convert_ids_to_tokens(hf.encode(text, add_special_tokens=False))
        to_id = hf.convert_tokens_to_ids
        drop = set(hf.all_special_ids)
    if initial and not (pieces and pieces[0].startswith(SPACE)):
        pieces = [SPACE] + pieces  # a base without a dummy prefix
    elif not initial and pieces and pieces[0] == SPACE:
        pieces = pieces[1:]
    ids = [to_id(p) for p in pieces]
    return [i for i in ids if i is not None and 0 <= i < old_vocab and i not in drop]


def new_rows(old: torch.Tensor, new_vocab: int, init: str, new_tokenizer=None, base_tokenizer=None) -> torch.Tensor:
    """The rows old.shape[0] .. new_vocab-1 of a resized embedding/LM-head matrix (computed in fp32)."""
    old_vocab = old.shape[0]
    mean = old.float().mean(dim=0)
    rows = mean.expand(new_vocab - old_vocab, -1).clone()
    if init == "subtokens":
        pieces = min(new_vocab, new_tokenizer.vocab_size)
        for token_id in range(old_vocab, pieces):
            ids = subtoken_ids(_piece(new_tokenizer, token_id), base_tokenizer, old_vocab)
            if ids:
                rows[token_id - old_vocab] = old[ids].float().mean(dim=0)
    return rows.to(old.dtype)


def _check_tokenizers(new_tok, base_tok) -> None:
    """The extended tokenizer must keep the base tokenizer's ids (resize keeps rows by id)."""
    if base_tok is None:
        return
    n = min(base_tok.vocab_size, new_tok.vocab_size)
    sample = sorted(set(range(min(n, 64))) | set(range(max(0, n - 64), n)) | set(range(0, n, max(1, n // 256))))
    changed = [i for i in sample if _piece(new_tok, i) != _piece(base_tok, i)]
    if base_tok.vocab_size > new_tok.vocab_size or changed:
        raise CheckpointError(f"--tokenizer does not extend --base-tokenizer (ids {changed[:5]} differ); make it "
                              "with `jinpan tokenizer extend --base <base tokenizer>`")


def resize_vocab(input_path, output_dir, tokenizer, *, base_tokenizer=None, vocab_size: int | None = None,
                 init: str = "mean", hf_output: bool = False, overwrite: bool = False,
                 max_shard_size="5GB", progress: bool = True) -> Path:
    """Write `output_dir` (ours, or an HF dir with hf_output=True) with the vocabulary grown to `vocab_size`
    (default: the size of `tokenizer`)."""
    from ..config import ConfigError
    from ..data.tokenizer import load_tokenizer

    if init not in ("mean", "subtokens"):
        raise ConfigError(f"--init {init!r}: choose mean or subtokens")
    new_tok = load_tokenizer(tokenizer, key="--tokenizer")
    base_tok = load_tokenizer(base_tokenizer, key="--base-tokenizer") if base_tokenizer else None
    if init == "subtokens" and base_tok is None:
        raise ConfigError("--init subtokens needs --base-tokenizer (the tokenizer the checkpoint was trained with)")
    output = Path(output_dir)
    if output.exists() and any(output.iterdir()) and not overwrite:  # before reading anything big
        raise CheckpointError(f"output {output} exists and is not empty; choose a new directory "
                              "(nothing is overwritten without --overwrite)")
    src = _Source(input_path)
    try:
        cfg = src.config
        new_vocab = int(vocab_size or new_tok.vocab_size)
        if new_vocab < new_tok.vocab_size:
            raise ConfigError(f"--vocab-size {new_vocab} is smaller than the tokenizer's {new_tok.vocab_size} pieces")
        if new_vocab < cfg.vocab_size:
            raise ConfigError(f"new vocab {new_vocab} is smaller than the checkpoint's model.vocab_size="
                              f"{cfg.vocab_size}; resize only grows the vocabulary (old ids must stay valid)")
        if base_tok is not None and base_tok.vocab_size > cfg.vocab_size:
            raise ConfigError(f"--base-tokenizer has {base_tok.vocab_size} pieces but the checkpoint's vocab is "
                              f"{cfg.vocab_size}; pass the tokenizer the checkpoint was trained with")
        _check_tokenizers(new_tok, base_tok)
        new_cfg = dataclasses.replace(cfg, vocab_size=new_vocab)
        names = fmt.model_keys(new_cfg)

        def fetch(name: str) -> torch.Tensor:
            tensor = src.get(name)
            if name in VOCAB_TENSORS:
                tensor = torch.cat([tensor, new_rows(tensor, new_vocab, init, new_tok, base_tok)], dim=0)
            return tensor.contiguous()

        specs = {}
        for name in names:
            shape, dtype = src.shape_dtype(name)
            specs[name] = ((new_vocab, *shape[1:]) if name in VOCAB_TENSORS else tuple(shape), dtype)
        source = {"format": "resize", "path": str(input_path), "old_vocab_size": cfg.vocab_size, "init": init}
        if hf_output:
            return _write_hf(output, new_cfg, specs, fetch, Path(tokenizer), source, max_shard_size, overwrite,
                             progress)
        return write_weights_checkpoint(output, new_cfg, specs, fetch, extra_meta={"source": source},
                                        tokenizer_src=Path(tokenizer), overwrite=overwrite, progress=progress)
    finally:
        src.close()


def _write_hf(output: Path, cfg, specs: dict, fetch, tokenizer: Path, source: dict, max_shard_size, overwrite: bool,
              progress: bool) -> Path:
    """An HF LlamaForCausalLM directory (sharded safetensors + config.json + tokenizer), one shard in memory."""
    from safetensors.torch import save_file

    sizes = [(n, int(torch.Size(shape).numel()) * torch.empty((), dtype=dt).element_size())
             for n, (shape, dt) in specs.items()]
    shards = plan_shards(sizes, parse_size(max_shard_size))
    dtypes = {dt for _, dt in specs.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    tmp = _prepare_output(output, overwrite)
    try:
        weight_map, total = {}, 0
        bar = _progress(len(specs), f"write {output.name}", progress)
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            out = {}
            for name in shard:
                out[hf_name(name)] = fetch(name)
                bar.update(1)
            save_file(out, str(tmp / fname), metadata={"format": "pt"})
            for key, t in out.items():
                weight_map[key] = fname
                total += t.numel() * t.element_size()
            del out
        bar.close()
        fmt.write_json_atomic(tmp / "model.safetensors.index.json",
                              {"metadata": {"total_size": total, "resize": json.dumps(source)},
                               "weight_map": weight_map})
        (tmp / "config.json").write_text(json.dumps(config_to_hf(cfg, dtype), indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
        copy_tokenizer_files(tokenizer, tmp)
        if tokenizer.is_file() and not (tmp / "tokenizer_config.json").exists():
            (tmp / "tokenizer_config.json").write_text(json.dumps({
                "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}, indent=2) + "\n")
        _finish_output(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output
