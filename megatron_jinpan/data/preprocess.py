"""JSONL -> Megatron indexed dataset (`PREFIX.bin` / `PREFIX.idx`).

    jinpan preprocess --input corpus.jsonl --tokenizer tok.model --output-prefix data/corpus --workers 8

Each line is a JSON object whose `--json-key` (default `text`) holds one
document. Lines are tokenized in worker processes (ordered, in chunks) and
written with megatron-core's `IndexedDatasetBuilder`, one document per line,
with the EOD (= eos) id appended when `--append-eod`. Output is written to
temporary files and renamed at the end, so a failed run leaves nothing half
written and never replaces earlier output.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np

from .tokenizer import DataError, load_tokenizer

CHUNK_LINES = 256

_worker_tok = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tok
    _worker_tok = load_tokenizer(tokenizer_path, key="--tokenizer")


def parse_line(line: str, lineno: int, path: str, json_key: str) -> str | None:
    """The document text of one JSONL line (None for a blank line); DataError names the line."""
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} line {lineno} is not valid JSON ({exc.msg} at column {exc.colno}); "
                        "each line must be one JSON object like {\"text\": \"...\"}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} line {lineno} is a JSON {type(obj).__name__}, not an object; "
                        "each line must look like {\"text\": \"...\"}")
    if json_key not in obj:
        keys = ", ".join(sorted(map(str, obj))) or "none"
        raise DataError(f"{path} line {lineno} has no {json_key!r} field (keys: {keys}); "
                        "pick the field with --json-key")
    text = obj[json_key]
    if not isinstance(text, str):
        raise DataError(f"{path} line {lineno}: {json_key!r} is a {type(text).__name__}, not a string")
    if not text.strip():
        raise DataError(f"{path} line {lineno}: {json_key!r} is empty; remove empty documents first "
                        "(`jinpan data clean` drops them)")
    return text


def _encode_chunk(args):
    start_lineno, lines, path, json_key, append_eod = args
    texts = []
    for i, line in enumerate(lines):
        text = parse_line(line, start_lineno + i, path, json_key)
        if text is not None:
            texts.append(text)
    out = []
    for ids in _worker_tok.encode_batch(texts):
        if append_eod:
            ids = list(ids) + [_worker_tok.eod]
        out.append(np.asarray(ids, dtype=np.int64))
    nbytes = sum(len(line.encode("utf-8")) for line in lines)
    return out, nbytes


def _chunks(path: str, json_key: str, append_eod: bool):
    with open(path, encoding="utf-8", errors="strict") as fh:
        lines, start, lineno = [], 1, 0
        try:
            for lineno, line in enumerate(fh, 1):
                lines.append(line)
                if len(lines) >= CHUNK_LINES:
                    yield start, lines, path, json_key, append_eod
                    lines, start = [], lineno + 1
        except UnicodeDecodeError as exc:
            raise DataError(f"{path} line {lineno + 1} is not valid UTF-8 ({exc.reason})") from None
        if lines:
            yield start, lines, path, json_key, append_eod


def preprocess(input_path: str, tokenizer_path: str, output_prefix: str, *, workers: int = 1,
               json_key: str = "text", append_eod: bool = False, progress: bool = True) -> dict:
    """Tokenize a JSONL file into `output_prefix`.bin/.idx; returns counts."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from tqdm import tqdm

    if not Path(input_path).is_file():
        raise FileNotFoundError(f"--input {input_path} does not exist; pass a JSONL file with one {{\"{json_key}\": ...}} per line")
    tok = load_tokenizer(tokenizer_path, key="--tokenizer")
    out_bin, out_idx = Path(output_prefix + ".bin"), Path(output_prefix + ".idx")
    out_bin.parent.mkdir(parents=True, exist_ok=True)
    tmp_bin = out_bin.with_name(out_bin.name + f".tmp{os.getpid()}")
    tmp_idx = out_idx.with_name(out_idx.name + f".tmp{os.getpid()}")
    dtype = DType.optimal_dtype(tok.vocab_size)
    builder = IndexedDatasetBuilder(str(tmp_bin), dtype=dtype)
    docs = tokens = 0
    total = Path(input_path).stat().st_size
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"preprocess {Path(input_path).name}",
               disable=not progress, dynamic_ncols=True)
    pool = None
    try:
        chunks = _chunks(input_path, json_key, append_eod)
        if workers > 1:
            # spawn, not fork: forking a process that holds torch/gloo threads can deadlock.
            ctx = mp.get_context("spawn")
            pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer_path,))
            results = pool.imap(_encode_chunk, chunks, chunksize=1)
        else:
            _init_worker(tokenizer_path)
            results = map(_encode_chunk, chunks)
        for arrays, nbytes in results:
            for arr in arrays:
                if len(arr) == 0:
                    continue
                builder.add_document(arr, [len(arr)])
                docs += 1
                tokens += len(arr)
            bar.update(nbytes)
        if docs == 0:
            raise DataError(f"--input {input_path} holds no documents; each line must be a JSON object with a {json_key!r} string")
        builder.finalize(str(tmp_idx))
        os.replace(tmp_bin, out_bin)
        os.replace(tmp_idx, out_idx)
    except BaseException:
        builder.data_file.close() if not builder.data_file.closed else None
        for p in (tmp_bin, tmp_idx):
            p.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    return {"documents": docs, "tokens": tokens, "prefix": output_prefix, "dtype": np.dtype(dtype).name}
