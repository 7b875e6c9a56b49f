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

import contextlib
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


@contextlib.contextmanager
def staged_outputs(*finals):
    """Temporary paths for every output of one preprocessing run, renamed to `finals` (in that order, so put the
    file a reader checks for last) only when the block completes. On any failure or interrupt the temporaries
    are closed and deleted: earlier output under the final names is never touched. Yields (tmp_paths,
    builders); append each IndexedDatasetBuilder to `builders` so its open file is closed on failure."""
    finals = [Path(f) for f in finals]
    finals[0].parent.mkdir(parents=True, exist_ok=True)
    tmps = [p.with_name(p.name + f".tmp{os.getpid()}") for p in finals]
    builders: list = []
    try:
        yield tmps, builders
        for tmp, final in zip(tmps, finals):
            os.replace(tmp, final)
    except BaseException:
        for builder in builders:
            if not builder.data_file.closed:
                builder.data_file.close()
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def encoded_chunks(encode, chunks, workers: int, init_worker, initargs: tuple):
    """`encode` mapped over `chunks` in order: in `workers` spawned processes (each set up by
    `init_worker(*initargs)`), or in this process when workers <= 1. The pool is stopped when the block ends."""
    if workers <= 1:
        init_worker(*initargs)
        yield map(encode, chunks)
        return
    # spawn, not fork: forking a process that holds torch/gloo threads can deadlock.
    pool = mp.get_context("spawn").Pool(workers, initializer=init_worker, initargs=initargs)
    try:
        yield pool.imap(encode, chunks, chunksize=1)
    finally:
        pool.terminate()
        pool.join()


def preprocess(input_path: str, tokenizer_path: str, output_prefix: str, *, workers: int = 1,
               json_key: str = "text", append_eod: bool = False, progress: bool = True) -> dict:
    """Tokenize a JSONL file into `output_prefix`.bin/.idx; returns counts."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from tqdm import tqdm

    if not Path(input_path).is_file():
        raise FileNotFoundError(f"--input {input_path} does not exist; pass a JSONL file with one {{\"{json_key}\": ...}} per line")
    tok = load_tokenizer(tokenizer_path, key="--tokenizer")
    dtype = DType.optimal_dtype(tok.vocab_size)
    docs = tokens = 0
    bar = tqdm(total=Path(input_path).stat().st_size, unit="B", unit_scale=True,
               desc=f"preprocess {Path(input_path).name}", disable=not progress, dynamic_ncols=True)
    chunks = _chunks(input_path, json_key, append_eod)
    try:
        with staged_outputs(output_prefix + ".bin", output_prefix + ".idx") as ((tmp_bin, tmp_idx), builders), \
                encoded_chunks(_encode_chunk, chunks, workers, _init_worker, (tokenizer_path,)) as results:
            builder = IndexedDatasetBuilder(str(tmp_bin), dtype=dtype)
            builders.append(builder)
            for arrays, nbytes in results:
                for arr in arrays:
                    if len(arr) == 0:
                        continue
                    builder.add_document(arr, [len(arr)])
                    docs += 1
                    tokens += len(arr)
                bar.update(nbytes)
            if docs == 0:
                raise DataError(f"--input {input_path} holds no documents; each line must be a JSON object with a "
                                f"{json_key!r} string")
            builder.finalize(str(tmp_idx))
    finally:
        bar.close()
    return {"documents": docs, "tokens": tokens, "prefix": output_prefix, "dtype": np.dtype(dtype).name}
