"""Chat JSONL -> token ids + answer-only loss mask, as megatron-core indexed datasets.

    jinpan preprocess --format chat --input sft.jsonl --tokenizer tok.model --output-prefix data/sft \
        --template plain --max-seq-len 2048 --workers 8

One conversation per line (OpenAI `messages`, ShareGPT `conversations` or
Alpaca; see posttrain/chat.py) becomes one document of three files:

  PREFIX.bin/.idx        the token ids: a plain megatron-core IndexedDataset, one document per
                         conversation (`IndexedDataset(PREFIX)` opens it like any pretraining set)
  PREFIX.mask.bin/.idx   the loss mask, uint8, same document lengths (`IndexedDataset(PREFIX + ".mask")`):
                         1 on every assistant token (its EOS included), 0 on system/user/template text
  PREFIX.chat.json       what made them: format, template, tokenizer and its vocab size, counts

A conversation with no assistant turn, or only empty answers, is skipped and
counted; one longer than --max-seq-len is cut to its first tokens
(--truncation right, counted as truncated; dropped if no answer token is left)
or dropped (--truncation drop). Malformed JSON or an unknown role stops the
run with the file and line. Output is written to temporary files and renamed
at the end, so a failed run never replaces earlier output.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .preprocess import _chunks, encoded_chunks, staged_outputs
from .tokenizer import DataError, load_tokenizer

MASK_SUFFIX = ".mask"
META_SUFFIX = ".chat.json"
TRUNCATION = ("right", "drop")

_worker = {}


def _init_worker(tokenizer_path: str, template: str, max_seq_len: int | None, truncation: str) -> None:
    from ..posttrain.chat import load_template

    _worker.update(tok=load_tokenizer(tokenizer_path, key="--tokenizer"), template=load_template(template),
                   max_len=max_seq_len, truncation=truncation)


def encode_record(record, where: str, tok, template, max_len: int | None, truncation: str):
    """(ids, mask, status) for one JSONL record; status is "kept" | "truncated" | a drop reason
    ("no_assistant", "empty", "too_long") with ids/mask None."""
    from ..posttrain.chat import NoAnswer, to_messages

    try:
        ids, mask = template.encode(to_messages(record, where), tok, where)
    except NoAnswer as exc:
        return None, None, exc.reason
    status = "kept"
    if max_len and len(ids) > max_len:
        if truncation == "drop":
            return None, None, "too_long"
        ids, mask = ids[:max_len], mask[:max_len]
        if not any(mask[1:]):  # the first token is never a label
            return None, None, "too_long"
        status = "truncated"
    return ids, mask, status


def _encode_chunk(args):
    start_lineno, lines, path = args[:3]
    out, counts = [], {}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        where = f"{path} line {start_lineno + i}"
        try:
            record = json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{where} is not valid JSON ({exc.msg} at column {exc.colno}); "
                            "each line must be one conversation object") from None
        ids, mask, status = encode_record(record, where, _worker["tok"], _worker["template"],
                                          _worker["max_len"], _worker["truncation"])
        counts[status] = counts.get(status, 0) + 1
        if ids is not None:
            out.append((np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8)))
    return out, counts, sum(len(line.encode("utf-8")) for line in lines)


def read_meta(prefix: str) -> dict | None:
    """PREFIX.chat.json as a dict, or None when PREFIX is not a chat dataset."""
    path = Path(str(prefix) + META_SUFFIX)
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def is_chat_dataset(prefix: str) -> bool:
    return Path(str(prefix) + MASK_SUFFIX + ".idx").is_file()


def preprocess_chat(input_path: str, tokenizer_path: str, output_prefix: str, *, template: str = "plain",
                    workers: int = 1, max_seq_len: int | None = None, truncation: str = "right",
                    progress: bool = True) -> dict:
    """Tokenize a chat JSONL into PREFIX(.mask).bin/.idx + PREFIX.chat.json; returns the counts."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from tqdm import tqdm

    from ..posttrain.chat import load_template

    if not Path(input_path).is_file():
        raise FileNotFoundError(f"--input {input_path} does not exist; pass a JSONL file with one conversation "
                                "per line")
    if truncation not in TRUNCATION:
        raise DataError(f"--truncation {truncation!r}: choose one of {', '.join(TRUNCATION)}")
    if max_seq_len is not None and max_seq_len < 2:
        raise DataError(f"--max-seq-len {max_seq_len} must be at least 2 tokens")
    tok = load_tokenizer(tokenizer_path, key="--tokenizer")
    load_template(template)  # fail here, once, on a template that does not load
    # the meta file last: a reader that sees it sees complete data
    outputs = [output_prefix + name for name in (".bin", ".idx", MASK_SUFFIX + ".bin", MASK_SUFFIX + ".idx",
                                                 META_SUFFIX)]
    counts = {"kept": 0, "truncated": 0, "no_assistant": 0, "empty": 0, "too_long": 0}
    tokens = answer_tokens = 0
    bar = tqdm(total=Path(input_path).stat().st_size, unit="B", unit_scale=True, disable=not progress,
               desc=f"preprocess chat {Path(input_path).name}", dynamic_ncols=True)
    init = (tokenizer_path, template, max_seq_len, truncation)
    chunks = _chunks(input_path, "messages", False)
    try:
        with staged_outputs(*outputs) as ((tok_bin, tok_idx, mask_bin, mask_idx, meta_path), builders), \
                encoded_chunks(_encode_chunk, chunks, workers, _init_worker, init) as results:
            tokens_out = IndexedDatasetBuilder(str(tok_bin), dtype=DType.optimal_dtype(tok.vocab_size))
            mask_out = IndexedDatasetBuilder(str(mask_bin), dtype=np.uint8)
            builders += [tokens_out, mask_out]
            for pairs, chunk_counts, nbytes in results:
                for ids, mask in pairs:
                    tokens_out.add_document(ids, [len(ids)])
                    mask_out.add_document(mask, [len(mask)])
                    tokens += len(ids)
                    answer_tokens += int(mask.sum())
                for k, v in chunk_counts.items():
                    counts[k] += v
                bar.update(nbytes)
            kept = counts["kept"] + counts["truncated"]
            if kept == 0:
                raise DataError(f"--input {input_path} holds no trainable conversation ({_summary(counts)}); each "
                                "line needs at least one non-empty assistant turn")
            tokens_out.finalize(str(tok_idx))
            mask_out.finalize(str(mask_idx))
            meta = {"format": "chat", "template": template, "tokenizer": str(tokenizer_path),
                    "vocab_size": tok.vocab_size, "max_seq_len": max_seq_len, "truncation": truncation,
                    "conversations": kept, "tokens": tokens, "answer_tokens": answer_tokens, **report(counts),
                    "input": str(input_path)}
            meta_path.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    finally:
        bar.close()
    return {"prefix": output_prefix, "tokens": tokens, "answer_tokens": answer_tokens, **report(counts)}


def report(counts: dict) -> dict:
    """Per-line statuses -> kept (written, truncated ones included), truncated, dropped and why."""
    dropped = {k: counts.get(k, 0) for k in ("no_assistant", "empty", "too_long")}
    return {"kept": counts.get("kept", 0) + counts.get("truncated", 0), "truncated": counts.get("truncated", 0),
            "dropped": sum(dropped.values()), **{f"dropped_{k}": v for k, v in dropped.items()}}


def _summary(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in report(counts).items())
